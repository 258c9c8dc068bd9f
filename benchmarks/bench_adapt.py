"""Adaptation to the user's images (issue 23): how much of the gap to a same-content model self-supervised
adaptation closes, with no sharp images of the content.

Optics: a spatially varying PSF preset (default ``strong_astigmatism``: astigmatism and defocus growing toward the
edge). For each seed a CoordGate U-Net(2) (the dock's default network) is trained from the PSF model on the built-in
specimens (``TRAIN_SOURCES``, validated on ``validation_fields``), as ``train --psf`` does. Then, for each content
far from those specimens:

- ``filaments``: a dense mesh of thin curved filaments (0.5 px wide);
- ``cells``: large flat cells (a Voronoi tessellation) with thin bright membranes;
- ``puncta``: dense diffraction-limited spots on a slowly varying background;
- ``real``: crops of the bundled ``moon``, ``hubble_deep_field`` and ``retina`` images (never in training or
  validation),

the test stack (``--planes`` fields, blurred with the true PSFs, 1000 photons at each plane's peak, read noise 2 e-)
is restored by:

- ``PSF model only``: the model trained from the PSF model;
- ``adapted``: that model after ``napari_coordgate.engine.adapt`` on the blurred test stack itself (the noise
  measured from it; the best state chosen by the held-out criterion, never by ground truth);
- ``same content (upper)``: a model trained for the same budget on true pairs of *other* images of the same content
  (the reference adaptation aims at; a user would not have it);
- ``SV-RL true PSFs``: spatially varying Richardson-Lucy with the true PSFs, its iteration count chosen on a separate
  tuning field of the same content (never the test fields).

Printed: PSNR / SSIM overall and PSNR in the edge ring (r >= 1, ``metrics.ring_psnr``), mean over planes, per seed
and the mean over seeds, the gain of adaptation and the fraction of the gap it closes; CPU minutes and threads.

Usage::

    python benchmarks/bench_adapt.py --threads 2                     # 256^2, 8 planes, 3 seeds, all contents
    python benchmarks/bench_adapt.py --contents filaments --seeds 0  # one content, one seed
    python benchmarks/bench_adapt.py --stack --threads 2             # the 2-minute figure: 8 planes of 512^2
    python benchmarks/bench_adapt.py --quick                         # tiny, seconds (the test suite runs it)
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from napari_coordgate.config import AdaptConfig, ModelConfig, TrainConfig
from napari_coordgate.engine import SimulatedSource, adapt, predict, train
from napari_coordgate.metrics import quality_report
from napari_coordgate.optics.blur import synthesize_pairs
from napari_coordgate.optics.deconv import sv_richardson_lucy
from napari_coordgate.samples.specimens import TRAIN_SOURCES, bundled_specimen, specimen_fields, validation_fields

PHOTONS, READ_NOISE = 1000.0, 2.0
REAL = ("moon", "hubble_deep_field", "retina")
RL_ITERATIONS = (10, 20, 40, 80, 160)


def _unit(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float32)
    return (a - a.min()) / max(float(np.ptp(a)), 1e-12)


def filaments(shape, rng) -> np.ndarray:
    """A dense mesh of thin, gently curving filaments of varied brightness."""
    h, w = shape
    img = np.zeros(shape)
    for _ in range(h * w // 400):
        y, x, ang, val = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0, 2 * np.pi), rng.uniform(0.3, 1.0)
        for _ in range(int(rng.uniform(30, 120))):
            ang += rng.normal(0, 0.08)
            y, x = y + 0.7 * np.sin(ang), x + 0.7 * np.cos(ang)
            if not (0 <= y < h and 0 <= x < w):
                break
            img[int(y), int(x)] = max(img[int(y), int(x)], val)
    return _unit(gaussian_filter(img, 0.5) + 0.03)


def cells(shape, rng) -> np.ndarray:
    """Large flat cells (a Voronoi tessellation, one intensity per cell) with thin bright membranes."""
    h, w = shape
    seeds = rng.uniform(0, 1, (max(2, h * w // 1500), 2)) * [h, w]
    yy, xx = np.mgrid[0:h, 0:w]
    d1 = np.full(shape, np.inf)
    d2 = np.full(shape, np.inf)
    label = np.zeros(shape, int)
    for i, (py, px) in enumerate(seeds):
        d = np.hypot(yy - py, xx - px)
        nearer = d < d1
        d2 = np.where(nearer, d1, np.minimum(d2, d))
        label = np.where(nearer, i, label)
        d1 = np.where(nearer, d, d1)
    img = rng.uniform(0.2, 0.6, len(seeds))[label] + 0.8 * np.exp(-((d2 - d1) / 1.0) ** 2)
    return _unit(gaussian_filter(img, 0.4))


def puncta(shape, rng) -> np.ndarray:
    """Dense diffraction-limited spots of varied brightness on a slowly varying background."""
    h, w = shape
    img = np.zeros(shape)
    n = h * w // 60
    img[rng.integers(0, h, n), rng.integers(0, w, n)] = rng.uniform(0.2, 1.0, n)
    background = gaussian_filter(rng.standard_normal(shape), 20)
    return _unit(gaussian_filter(img, 0.6) * 8 + 0.3 * _unit(background))


def real(shape, rng, index: int) -> np.ndarray:
    """A random crop of one of the bundled images that never train or validate (moon, hubble, retina)."""
    img = bundled_specimen(REAL[index % len(REAL)])
    y0 = int(rng.integers(0, img.shape[0] - shape[0] + 1))
    x0 = int(rng.integers(0, img.shape[1] - shape[1] + 1))
    return _unit(img[y0 : y0 + shape[0], x0 : x0 + shape[1]])


CONTENTS = {"filaments": filaments, "cells": cells, "puncta": puncta, "real": real}


def content_fields(kind: str, n: int, shape, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    make = CONTENTS[kind]
    return np.stack([make(shape, rng, i) if kind == "real" else make(shape, rng) for i in range(n)])


def _blur(sharp, psf, seed):
    return synthesize_pairs(sharp, psf, photons=PHOTONS, read_noise=READ_NOISE, seed=seed)[1]


def _scores(sharp, restored) -> dict:
    reps = [quality_report(s, r) for s, r in zip(sharp, restored)]
    rings = {ring["name"]: float(np.mean([r["psnr_by_ring"][k]["psnr"] for r in reps]))
             for k, ring in enumerate(reps[0]["psnr_by_ring"])}  # metrics.RINGS: centre, middle, edge
    return {"psnr": float(np.mean([r["psnr"] for r in reps])), "ssim": float(np.mean([r["ssim"] for r in reps])),
            **rings, "planes": [r["psnr"] for r in reps]}


def _train(sharp, psf, minutes, seed, threads, val=None, steps=None):
    budget = {"epochs": max(1, steps // 25), "steps_per_epoch": 25, "minutes": 0.0} if steps else {"minutes": minutes}
    cfg = TrainConfig(seed=seed, threads=threads, device="cpu", photons=PHOTONS, read_noise=READ_NOISE, **budget)
    t = time.perf_counter()
    res = train(ModelConfig(), cfg, SimulatedSource(sharp, psf, val_sharp=val))
    return res.saved, time.perf_counter() - t


def _sv_rl(blurred, psf, tune_sharp, tune_blurred, iterations):
    def run(stack, its):
        return np.stack([sv_richardson_lucy(b - b.min(), psf, iterations=its) + b.min() for b in stack])

    best = max(iterations, key=lambda n: _scores(tune_sharp, run(tune_blurred, n))["psnr"])
    return run(blurred, best), best


def _adapt_cfg(args, seed: int) -> AdaptConfig:
    extra = {"epochs": 2, "steps_per_epoch": 3} if args.quick else {}
    if args.adapt_steps and not args.quick:  # a steps budget: the same work however loaded the machine is
        extra["epochs"] = max(1, args.adapt_steps // AdaptConfig().steps_per_epoch)
    if args.whiten is not None:
        extra["whiten"] = args.whiten
    if args.transfer is not None:
        extra["transfer"] = args.transfer
    return AdaptConfig(minutes=args.adapt_minutes, seed=seed, threads=args.threads, device="cpu", **extra)


def run_content(kind, base, args, seed, psf, shape, log) -> dict:
    """The four rows for one content and seed."""
    test = content_fields(kind, args.planes, shape, 10_000 + seed)
    blurred = _blur(test, psf, 20_000 + seed)
    rows = {"blurred": _scores(test, blurred)}
    rows["PSF model only"] = _scores(test, predict(base, blurred, device="cpu"))
    t = time.perf_counter()
    res = adapt(base, blurred, _adapt_cfg(args, seed))
    adapt_s = time.perf_counter() - t
    rows["adapted"] = _scores(test, predict(res.saved, blurred, device="cpu"))
    rows["adapted"]["kept original"] = res.kept_original
    upper, up_s = _train(content_fields(kind, args.ref_fields, shape, 30_000 + seed), psf, args.minutes, seed,
                         args.threads, val=content_fields(kind, 2, shape, 35_000 + seed), steps=args.steps)
    rows["same content (upper)"] = _scores(test, predict(upper, blurred, device="cpu"))
    tune = content_fields(kind, 1, shape, 40_000 + seed)
    rl, its = _sv_rl(blurred, psf, tune, _blur(tune, psf, 41_000 + seed), args.rl_iterations)
    rows["SV-RL true PSFs"] = _scores(test, rl)
    log(f"  {kind}, seed {seed}: adapted {adapt_s / 60:.1f} min ({res.steps} steps, criterion "
        f"{res.criterion_before:.4f} -> {res.criterion_best:.4f}, {res.noise.describe()}); upper trained "
        f"{up_s / 60:.1f} min; SV-RL {its} iterations")
    return rows


def _table(results: dict[str, list[dict]], log) -> None:
    names = ["blurred", "SV-RL true PSFs", "PSF model only", "adapted", "same content (upper)"]
    log(f"{'content':<10}{'method':<24}{'PSNR':>8}{'SSIM':>8}{'centre':>8}{'middle':>8}{'edge':>8}   (mean over "
        f"seeds; PSNR by ring of the field)")
    for kind, per_seed in results.items():
        for name in names:
            vals = {k: np.mean([r[name][k] for r in per_seed]) for k in ("psnr", "ssim", "centre", "middle", "edge")}
            log(f"{kind:<10}{name:<24}{vals['psnr']:>8.2f}{vals['ssim']:>8.3f}{vals['centre']:>8.2f}"
                f"{vals['middle']:>8.2f}{vals['edge']:>8.2f}")
        for k, label in (("psnr", "overall"), ("edge", "edge ring")):
            gains = [r["adapted"][k] - r["PSF model only"][k] for r in per_seed]
            gaps = [r["same content (upper)"][k] - r["PSF model only"][k] for r in per_seed]
            closed = np.mean(gains) / np.mean(gaps) if abs(np.mean(gaps)) > 1e-9 else float("nan")
            log(f"{'':<10}adapted - PSF only, {label}: {np.mean(gains):+.2f} dB (per seed "
                f"{', '.join(f'{g:+.2f}' for g in gains)}); gap to upper {np.mean(gaps):.2f} dB; closed "
                f"{100 * closed:.0f} %")
        worst = min(min(np.subtract(r["adapted"]["planes"], r["PSF model only"]["planes"])) for r in per_seed)
        kept = sum(bool(r["adapted"]["kept original"]) for r in per_seed)
        log(f"{'':<10}worst single image: adapted - PSF only {worst:+.2f} dB; original kept in {kept} of "
            f"{len(per_seed)} run(s)")


def stack_figure(args, log) -> None:
    """The issue's speed figure: adapting a stack of 8 planes of 512^2 for 2 minutes on the given threads."""
    shape, psf = (args.size, args.size), args.psf
    results = {}
    for seed in args.seeds:
        base, secs = _train(specimen_fields(args.train_fields, shape, seed=seed, sources=TRAIN_SOURCES), psf,
                            args.minutes, seed, args.threads, val=validation_fields(shape, 2), steps=args.steps)
        log(f"seed {seed}: PSF-model training {secs / 60:.1f} min")
        for kind in args.contents:
            test = content_fields(kind, args.planes, shape, 10_000 + seed)
            blurred = _blur(test, psf, 20_000 + seed)
            before = _scores(test, predict(base, blurred, device="cpu"))
            t = time.perf_counter()
            res = adapt(base, blurred, _adapt_cfg(args, seed))
            after = _scores(test, predict(res.saved, blurred, device="cpu"))
            results.setdefault(kind, []).append(after["psnr"] - before["psnr"])
            log(f"  {kind}: {args.planes} x {shape[0]}^2, {(time.perf_counter() - t) / 60:.2f} min, {res.steps} "
                f"steps: PSNR {before['psnr']:.2f} -> {after['psnr']:.2f} ({after['psnr'] - before['psnr']:+.2f} "
                f"dB), edge {before['edge']:.2f} -> {after['edge']:.2f}")
    for kind, gains in results.items():
        log(f"{kind:<10} gain {np.mean(gains):+.2f} dB (per seed {', '.join(f'{g:+.2f}' for g in gains)})")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--psf", default="strong_astigmatism")
    p.add_argument("--size", type=int, default=None, help="field side (default 256; 512 with --stack)")
    p.add_argument("--planes", type=int, default=8, help="test planes per content (the stack adapted on)")
    p.add_argument("--contents", nargs="+", default=list(CONTENTS), choices=list(CONTENTS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--minutes", type=float, default=4.0, help="training minutes of each trained model")
    p.add_argument("--steps", type=int, default=None, help="a steps budget for the trained models instead")
    p.add_argument("--adapt-minutes", type=float, default=None, help="adaptation budget (default 4; 2 with --stack)")
    p.add_argument("--adapt-steps", type=int, default=None,
                   help="an adaptation budget in optimiser steps instead (whole epochs of 25)")
    p.add_argument("--train-fields", type=int, default=16)
    p.add_argument("--ref-fields", type=int, default=16, help="fields of the same content for the upper reference")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--whiten", type=float, default=None, help="AdaptConfig.whiten (default: the config's; 0 = "
                                                               "compare blurred residuals)")
    p.add_argument("--transfer", type=float, default=None, help="AdaptConfig.transfer (default: the config's; 0 = "
                                                                 "PSF consistency alone, no pseudo-sharp pairs)")
    p.add_argument("--stack", action="store_true", help="the 2-minute figure on 8 planes of 512^2")
    p.add_argument("--quick", action="store_true", help="tiny run for the test suite")
    args = p.parse_args(argv)
    args.size = args.size or (512 if args.stack else 256)
    args.adapt_minutes = args.adapt_minutes or (2.0 if args.stack else 4.0)
    args.rl_iterations = RL_ITERATIONS
    if args.quick:
        args.size, args.planes, args.seeds, args.steps = 64, 2, [0], 2
        args.train_fields, args.ref_fields, args.contents, args.rl_iterations = 2, 2, ["puncta"], (2,)
        args.psf = "gaussian"
    torch.set_num_threads(args.threads)

    def log(msg):
        print(msg, flush=True)

    log(f"# bench_adapt: {platform.processor() or platform.machine()}, {args.threads} torch thread(s), PSF "
        f"{args.psf}, field {args.size}^2, {args.planes} test planes, models trained "
        f"{f'{args.steps} steps' if args.steps else f'{args.minutes:g} min'}, adaptation "
        f"{f'{args.adapt_steps} steps' if args.adapt_steps else f'{args.adapt_minutes:g} min'}, "
        f"{_adapt_cfg(args, 0)}")
    if args.stack:
        stack_figure(args, log)
        return
    shape = (args.size, args.size)
    results: dict[str, list[dict]] = {k: [] for k in args.contents}
    for seed in args.seeds:
        base, secs = _train(specimen_fields(args.train_fields, shape, seed=seed, sources=TRAIN_SOURCES), args.psf,
                            args.minutes, seed, args.threads, val=validation_fields(shape, 2), steps=args.steps)
        log(f"seed {seed}: PSF-model training {secs / 60:.1f} min")
        for kind in args.contents:
            results[kind].append(run_content(kind, base, args, seed, args.psf, shape, log))
    _table(results, log)


if __name__ == "__main__":
    main()
