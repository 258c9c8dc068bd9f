"""Bead calibration on slides made with known optics: how close the measured PSF model gets, and how fast.

For each case a bead slide is rendered (``napari_coordgate.samples.beads.bead_slide``): beads at random
sub-pixel positions, each bead's PSF rendered at its exact position; relative brightness 0.6-1; photons at the
brightest bead's peak pixel as given; background 2 % of that peak with a gentle gradient; Poisson shot noise, read
noise 2 e-, hot pixels at 1e-4 of the pixels, a camera offset of 100 e-, three saturated beads (8-15x brighter,
clipped at 1.6x the peak) and three touching pairs (2.5-4 px apart). Two optics:

- ``pupil``: the ``edge_defocus_astigmatism`` preset (NA 0.8, 520 nm, 0.16 µm pixels; defocus and astigmatism
  grow as h², coma as h), rendered at 41 px so its halo is not cut: inside the pupil model's family;
- ``moffat``: an elliptical Moffat (beta 3) whose widths grow across the field and whose long axis turns with the
  field position (not radially): outside the pupil family.

The calibration always gets the optics flags (NA 0.8, 0.52 µm, n 1.0, 0.16 µm), as a user would give their
microscope's; with ``--model auto`` it then fits both models and keeps the one with the smaller held-out residual.
Printed per case: beads planted and used, the chosen model, the PSF error (relative L2 ``||model - true|| /
||true||`` at 5 x 5 field positions, both PSFs centred by their centroids; median and max), both held-out
residuals, seconds (``calibrate`` plus the report PNG and JSON).

With ``--train`` it measures instead what the calibration is for: for each optics a 300-bead / 3000-photon slide
is calibrated, then two CoordGate U-Nets (depth 2, base 16, the TrainConfig defaults) are trained for the same
budget (a fixed number of optimiser steps, or ``--minutes``) from simulated pairs, one with the measured PSF model
and one with the true optics as a PSF model (``as_psf_model`` of the synthetic optics: the preset ``PSFConfig``
for ``pupil``, the exact Moffat PSFs on a 9 x 9 grid for ``moffat``). The sharp training images are those
``napari-coordgate train --psf MEASURED.cgpsf`` uses without ``--sharp`` (built-in specimens at the slide's frame
size, drawn with the training seed), the same for both models. Both are scored on held-out fields (specimens never
used in training: procedural seeds apart, ``moon``, ``hubble_deep_field``) blurred with the true optics plus the
training's noise (1000 photons at the peak, read noise 2 e-): PSNR overall and in the edge ring (r >= 1,
``metrics.ring_psnr``), per seed, with the blurred input as a baseline. Target: measured within 0.5 dB of true.

Usage::

    python benchmarks/bench_calibrate.py                       # 2 optics x beads 30/100/300 x photons 300/3000, 1024^2
    python benchmarks/bench_calibrate.py --size 2048 --beads 300 --photons 3000 --model grid   # the timing target
    python benchmarks/bench_calibrate.py --quick               # tiny, seconds (the test suite runs it)
    python benchmarks/bench_calibrate.py --train --seeds 0 1 2                  # measured vs true PSF model, 1024^2
    python benchmarks/bench_calibrate.py --train --optics moffat --threads 1    # one optics (run two side by side)
    python benchmarks/bench_calibrate.py --train --quick       # tiny: 256^2 slide, 20 steps, 1 seed
    python benchmarks/bench_calibrate.py --fibre --seeds 0 --steps 4500 --threads 1 --brightness 32  # 8-bit fibre
    python benchmarks/bench_calibrate.py --fibre --seeds 1 3 --steps 4500 --threads 1 --brightness 32 \
        --specimens fluorescence --train-photons 5000 --save-restored restored/   # the bead recipe; outputs kept
    python benchmarks/bench_calibrate.py --3d [...]            # bead z-stacks: bench_calibrate3d.py and its flags
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from napari_coordgate.calibration.calibrate import calibrate
from napari_coordgate.samples.beads import EllipticalOptics, PupilOptics, bead_slide, psf_error
from napari_coordgate.samples.specimens import SPECIMEN_HELP, SPECIMEN_SETS

OPTICS = {"na": 0.8, "wavelength_um": 0.52, "immersion": 1.0, "pixel_size_um": 0.16}
TRAIN_CASE = (300, 3000.0)  # beads, photons of the slides the training comparison calibrates
STEPS_10_MIN = 1500  # optimiser steps (batch 8, 128^2 crops) in about 10 min on 1 torch thread (benchmarks/README.md)
TEST_SEED = 1235  # the held-out fields; never a training seed's specimens


def make_optics(name: str, size: int):
    if name == "pupil":
        return PupilOptics("edge_defocus_astigmatism", (size, size), psf_size=41)
    if name == "moffat":
        return EllipticalOptics(width=2.0, radial=0.9, tangential=0.25, beta=3.0, twist=0.35, psf_size=35)
    raise ValueError(name)


def run_case(optics_name: str, size: int, beads: int, photons: float, model: str, device: str, seed: int,
             outdir: Path) -> list[str]:
    optics = make_optics(optics_name, size)
    image, _ = bead_slide(optics, (size, size), n_beads=beads, photons=photons, n_saturated=3, n_touching=3,
                          seed=seed)
    t0 = time.perf_counter()
    result = calibrate(image, model=model, device=device, source=f"{optics_name}-{beads}-{photons:g}.tif",
                       **OPTICS)
    result.report_png(outdir / f"report-{optics_name}-{beads}-{int(photons)}.png")
    (outdir / f"report-{optics_name}-{beads}-{int(photons)}.json").write_text(result.to_json())
    seconds = time.perf_counter() - t0
    err = psf_error(result.model, optics, (size, size))
    res = result.residuals

    def fmt(v):
        return "-" if v is None else f"{v:.3g}"

    k = result.grid_fit.k if result.grid_fit is not None else "-"
    return [optics_name, f"{size}", f"{beads}", f"{photons:g}", f"{result.n_beads}",
            f"{result.chosen} (K={k})" if result.chosen == "grid" else result.chosen, f"{result.psf_size}",
            f"{np.median(err):.3f}", f"{err.max():.3f}", fmt(res.get("grid")), fmt(res.get("pupil")), f"{seconds:.1f}"]


def table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")


# ------------------------------------------------------------------------------ measured vs true PSF model


def _scores(gt, img) -> tuple[float, float]:
    """PSNR overall and in the edge ring (r >= 1)."""
    from napari_coordgate.metrics import psnr, ring_psnr

    edge = next(r["psnr"] for r in ring_psnr(gt, img) if r["name"] == "edge")
    return psnr(gt, img), edge


def _budget(args) -> dict:
    """TrainConfig budget fields: ``--steps`` optimiser steps (validation every 50), or ``--minutes``; and
    ``--brightness`` and ``--train-photons`` where given (else TrainConfig's defaults)."""
    given = {"brightness": getattr(args, "brightness", None), "photons": getattr(args, "train_photons", None)}
    extra = {k: v for k, v in given.items() if v is not None}
    if args.minutes:
        return {"minutes": args.minutes, "epochs": 0, **extra}
    per_epoch = max(1, min(50, args.steps))
    return {"epochs": max(1, round(args.steps / per_epoch)), "steps_per_epoch": per_epoch, "minutes": 0.0, **extra}


def _builtin_fields(measured, seed: int, specimens: str = "mixed") -> tuple[np.ndarray, np.ndarray]:
    """(training, validation) sharp fields as ``train --psf MEASURED.cgpsf [--specimens S]`` takes them without
    ``--sharp``: every built-in specimen field trains, the held-out validation specimens validate."""
    from napari_coordgate.samples.specimens import builtin_fields

    return builtin_fields(measured, seed, specimens)[0], builtin_fields(measured, seed, validation=True)[0]


def _train_and_score(psf, fields, test, seed: int, args) -> tuple[float, float, float]:
    """(PSNR, edge PSNR, seconds) of a CoordGate U-Net trained on ``fields`` (training, validation sharp fields)
    blurred by ``psf``, on ``test``."""
    from napari_coordgate.config import ModelConfig, TrainConfig
    from napari_coordgate.engine import SimulatedSource, predict, train

    model_cfg = ModelConfig(depth=2, channels=16, gate="coordgate")
    train_cfg = TrainConfig(seed=seed, device="cpu", threads=args.train_threads, **_budget(args))
    t0 = time.perf_counter()
    result = train(model_cfg, train_cfg, SimulatedSource(sharp=fields[0], psf=psf, val_sharp=fields[1]))
    seconds = time.perf_counter() - t0
    restored = predict(result.saved, test[1], device="cpu")
    return (*_scores(test[0], restored), seconds)


def _held_out(true_model, shape):
    """Held-out sharp fields and their blurred images through the true optics, with the training's noise."""
    from bench_recipe import TEST_SOURCES

    from napari_coordgate.config import TrainConfig
    from napari_coordgate.optics.blur import synthesize_pairs
    from napari_coordgate.samples.specimens import specimen_fields

    noise = TrainConfig()
    sharp = specimen_fields(len(TEST_SOURCES), shape, seed=TEST_SEED, sources=TEST_SOURCES)
    return synthesize_pairs(sharp, true_model, photons=noise.photons, read_noise=noise.read_noise, seed=TEST_SEED)


def _calibrated(optics_name: str, optics, args, beads: int, photons: float):
    """The measured PSF model of a slide of ``beads`` beads through ``optics``, and a line about it."""
    size = (args.size, args.size)
    image, _ = bead_slide(optics, size, n_beads=beads, photons=photons, n_saturated=3, n_touching=3, seed=args.seed,
                          bead_diameter_px=args.bead_diameter)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    diameter_nm = args.bead_diameter * OPTICS["pixel_size_um"] * 1000.0 if args.bead_diameter else None
    result = calibrate(image, model=args.model, device=args.device, source=f"{optics_name}-{beads}-{photons:g}.tif",
                       bead_diameter_nm=diameter_nm, **OPTICS)
    err = psf_error(result.model, optics, size)
    line = (f"{optics_name}: slide {args.size}^2, {beads} beads of {args.bead_diameter:g} px (diameter given) / "
            f"{photons:g} photons -> {result.n_beads} used, "
            f"model {result.chosen} ({result.model.describe()}), PSF error median {np.median(err):.3f} max "
            f"{err.max():.3f}, {time.perf_counter() - t0:.0f} s")
    return result.model, line


def run_training_case(optics_name: str, args, beads: int, photons: float) -> list[list[str]]:
    """Rows of the measured-vs-true table for one optics: the blurred input, one per seed, mean +- std."""
    optics = make_optics(optics_name, args.size)
    measured, line = _calibrated(optics_name, optics, args, beads, photons)
    true = optics.as_psf_model() if optics_name == "pupil" else optics.as_psf_model(
        9, pixel_size_um=OPTICS["pixel_size_um"])
    print(line + f"; true: {true.describe()}", flush=True)
    test = _held_out(true, (args.size, args.size))
    base = _scores(*test)
    rows = [[optics_name, "blurred input", f"{base[0]:.2f} ({base[1]:.2f})", f"{base[0]:.2f} ({base[1]:.2f})",
             "", ""]]
    diffs = []
    for seed in args.seeds:
        fields = _builtin_fields(measured, seed)
        m = _train_and_score(measured, fields, test, seed, args)
        t = _train_and_score(true, fields, test, seed, args)
        diffs.append((m[0], m[1], t[0], t[1]))
        rows.append([optics_name, f"{seed}", f"{m[0]:.2f} ({m[1]:.2f})", f"{t[0]:.2f} ({t[1]:.2f})",
                     f"{m[0] - t[0]:+.2f} ({m[1] - t[1]:+.2f})", f"{m[2]:.0f} / {t[2]:.0f}"])
        print("  " + " ".join(rows[-1]), flush=True)
    a = np.array(diffs)
    mean, std = a.mean(axis=0), a.std(axis=0)
    d, de = a[:, 0] - a[:, 2], a[:, 1] - a[:, 3]
    rows.append([optics_name, "mean ± std", f"{mean[0]:.2f} ± {std[0]:.2f} ({mean[1]:.2f})",
                 f"{mean[2]:.2f} ± {std[2]:.2f} ({mean[3]:.2f})",
                 f"{d.mean():+.2f} ± {d.std():.2f} ({de.mean():+.2f} ± {de.std():.2f})", ""])
    if len(d) > 1:  # the paired difference's standard error
        se, see = d.std(ddof=1) / np.sqrt(len(d)), de.std(ddof=1) / np.sqrt(len(d))
        rows.append([optics_name, "mean ± s.e.", "", "", f"{d.mean():+.2f} ± {se:.2f} ({de.mean():+.2f} ± {see:.2f})",
                     ""])
    return rows


def main_train(args) -> None:
    """The measured-vs-true training comparison (``--train``)."""
    beads, photons = TRAIN_CASE
    if args.quick:
        args.size, beads, args.steps, args.minutes, args.seeds = 256, 40, 20, 0.0, [0]
    budget = (f"{args.minutes:g} wall minutes per model" if args.minutes else
              f"{_budget(args)['epochs'] * _budget(args)['steps_per_epoch']} optimiser steps per model "
              f"(batch 8, 128^2 crops; {STEPS_10_MIN} steps ≈ 10 CPU-min on one torch thread)")
    print(f"napari-coordgate: CoordGate trained from the measured vs the true PSF model "
          f"({'quick' if args.quick else 'full'}); torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, calibration on {args.threads} torch thread(s), "
          f"training on {args.train_threads}; {budget}; U-Net(2) base 16, TrainConfig defaults; seeds {args.seeds}")
    print("PSNR (edge ring r >= 1) on held-out fields blurred with the true optics + 1000-photon noise; difference = "
          "measured - true (target: >= -0.5 dB overall and at the edge); seconds: training measured / true")
    header = ["optics", "seed", "measured PSNR (edge)", "true PSNR (edge)", "difference (edge)", "s/model"]
    rows = []
    for optics_name in args.optics:
        rows.extend(run_training_case(optics_name, args, beads, photons))
    print()
    table(header, rows)


# ------------------------------------------------------------------ replicas of what real instruments produce


def _moffat(width: float = 2.0) -> EllipticalOptics:
    return EllipticalOptics(width=width, radial=0.9, tangential=0.25, beta=3.0, twist=0.35, psf_size=35)


def _fibre() -> EllipticalOptics:
    """A fibre-like PSF: sharp in the centre, five times wider along the radius at the corners (a radial smear),
    twice across it."""
    return EllipticalOptics(width=1.1, radial=4.0, tangential=1.0, beta=2.5, twist=0.0, psf_size=51)


def _growing() -> EllipticalOptics:
    """A PSF that grows toward the corners: FWHM 2.0 px in the centre, 8.6 px in the corners (six times wider
    along the radius, four times across it), Moffat tails (beta 4) rendered on 121 px."""
    return EllipticalOptics(width=2.0, radial=5.0, tangential=3.0, beta=4.0, twist=0.0, psf_size=121)


def _light_beyond(model, optics) -> float | None:
    """The largest fraction of the true PSF's light beyond a measured grid node's support (None for other models)."""
    from napari_coordgate.coords import grid_positions

    if getattr(model, "kind", "") != "measured_grid":
        return None
    supports = getattr(model, "supports", np.full((model.nodes, model.nodes), model.psf_size))  # before supports
    t = grid_positions(model.nodes)
    yy, xx = np.meshgrid(t, t, indexing="ij")
    true = optics.psfs(yy.ravel(), xx.ravel())
    c = true.shape[-1] // 2
    return max(1.0 - float(true[i, max(c - u // 2, 0) : c + u // 2 + 1, max(c - u // 2, 0) : c + u // 2 + 1].sum())
               for i, u in enumerate(np.asarray(supports).ravel()))


def _reference(truth, optics, shape, psf_size: int, clump: float = 1.0) -> np.ndarray:
    """Planted beads a calibration should use: ordinary (not saturated), not in a clump (no other bead within
    ``clump`` local FWHM), their window inside the frame, no saturated bead within a window."""
    from scipy.spatial import cKDTree

    from napari_coordgate.coords import field_position
    from napari_coordgate.samples.beads import local_fwhm

    y, x, kind = truth["y"], truth["x"], truth["kind"]
    h, w = shape
    pts = np.stack([y, x], 1)
    d, _ = cKDTree(pts).query(pts, k=2)
    fw = local_fwhm(optics, field_position(y, h), field_position(x, w))
    half = psf_size // 2 + 3
    ok = (kind == "bead") & (d[:, 1] >= clump * fw) & (y >= half) & (x >= half) & (y <= h - 1 - half) & (
        x <= w - 1 - half)
    sat = kind == "saturated"
    if sat.any():
        ok &= cKDTree(pts[sat]).query(pts)[0] > psf_size
    return ok


def _lost(result, truth, ref) -> float:
    """Fraction of the reference beads without an accepted bead within 1.5 px."""
    from scipy.spatial import cKDTree

    t = result.beads
    acc = t.accepted
    if not acc.any() or not ref.any():
        return 1.0
    d, _ = cKDTree(np.stack([t.y[acc], t.x[acc]], 1)).query(np.stack([truth["y"][ref], truth["x"][ref]], 1))
    return float(np.mean(d > 1.5))


def real_cases(size: int) -> list[dict]:
    """The replica cases: optics, slide and calibration settings (the bead diameter in px at 0.16 µm pixels)."""
    from napari_coordgate.samples.beads import array_positions, crowded_positions, local_fwhm

    moffat = _moffat()
    corner = float(local_fwhm(moffat, np.array([1.0]), np.array([1.0]))[0])
    cases = []
    for d in (1.25, 2.5):
        for given in (False, True):
            cases.append({"name": f"Moffat, {d:g} px beads", "optics": moffat, "diameter": d, "given": given,
                          "beads": 300, "photons": 3000})
    cases.append({"name": "Moffat, 2.5 px beads", "optics": moffat, "diameter": 2.5, "given": True, "beads": 100,
                  "photons": 300})
    # optics known (a pupil system): the pupil model competes with the grid, as calibrate's default "auto" does
    cases.append({"name": "tilted + decentred + trefoil, 2.5 px beads", "optics": "tilted", "diameter": 2.5,
                  "given": True, "beads": 300, "photons": 3000, "model": "auto"})
    cases.append({"name": "crowded (half within 1.2-3 FWHM)", "optics": moffat, "diameter": 0.0, "given": False,
                  "beads": 300, "photons": 3000, "positions": lambda seed: crowded_positions(moffat, (size, size),
                                                                                             300, seed=seed)})
    cases.append({"name": "Moffat, 2.5 px beads, 8-bit", "optics": moffat, "diameter": 2.5, "given": True,
                  "beads": 300, "photons": 3000, "bits": 8})
    cases.append({"name": "touching-spot array (pitch 1.5 FWHM)", "optics": moffat, "diameter": 0.0,
                  "given": False, "beads": 0, "photons": 3000, "hot": 0.0,
                  "positions": lambda seed: array_positions((size, size), 1.5 * corner, margin=2,
                                                            angle_deg=2.0 + seed)})
    cases.append({"name": "fibre-like, 8-bit, 60 beads, clustered", "optics": _fibre(), "diameter": 0.0,
                  "given": False, "beads": 60, "photons": 3000, "bits": 8, "touching": 6})
    cases.append({"name": "growing: FWHM 2.0 px in the centre, 8.6 px in the corners", "optics": _growing(),
                  "diameter": 0.0, "given": False, "beads": 300, "photons": 3000})
    return cases


def _slide(case: dict, size: int, seed: int):
    """The case's bead image (electrons, or 8-bit counts) and its truth."""
    from napari_coordgate.samples.beads import TiltedOptics

    # the tilted system's comatic, defocused PSFs spread far: 41 px squares (TiltedOptics' default) hold 82-86 % of
    # the light on the right of the field and move its centroid 2.6 px from the full PSF's, so the slide and the
    # truth the PSF error compares with use 61 px (95 %; an exact model then scores 0.01 whether its own side is
    # 59, 61 or 63 px, against 0.16 for an exact model of 61 px against a 41 px truth)
    optics = TiltedOptics((size, size), psf_size=61) if case["optics"] == "tilted" else case["optics"]
    pos = case["positions"](seed) if "positions" in case else None
    image, truth = bead_slide(optics, (size, size), n_beads=case["beads"], photons=case["photons"], n_saturated=3,
                              n_touching=case.get("touching", 3), seed=seed, bead_diameter_px=case["diameter"],
                              positions=pos, hot_fraction=case.get("hot", 1e-4))
    if case.get("bits") == 8:  # a gain that puts the brightest ordinary bead near 200 of 255
        gain = 200.0 / float(np.percentile(image, 99.99))
        image = np.clip(np.round(image * gain), 0, 255).astype(np.uint8)
    return optics, image, truth


def run_real_case(case: dict, size: int, seed: int, device: str) -> dict:
    """One replica slide calibrated: PSF error, beads used and lost, seconds (an error counts as all lost)."""
    from napari_coordgate.calibration import CalibrationError

    optics, image, truth = _slide(case, size, seed)
    diameter_nm = case["diameter"] * OPTICS["pixel_size_um"] * 1000.0 if case["given"] else None
    t0 = time.perf_counter()
    try:
        result = calibrate(image, model=case.get("model", "grid"), device=device, bead_diameter_nm=diameter_nm,
                           **OPTICS)
    except CalibrationError as exc:
        return {"error": str(exc).split(";")[0][:60], "seconds": time.perf_counter() - t0, "lost": 1.0, "used": 0}
    seconds = time.perf_counter() - t0
    err = psf_error(result.model, optics, (size, size))
    ref = _reference(truth, optics, (size, size), result.psf_size)
    return {"err": float(np.median(err)), "err_max": float(err.max()), "used": result.n_beads,
            "beyond": _light_beyond(result.model, optics),
            "ref": int(ref.sum()), "lost": _lost(result, truth, ref), "seconds": seconds,
            "chosen": result.chosen + (" (cubic defocus)" if getattr(result.model, "degree", 2) == 3 else ""),
            "dense": any("point array" in w for w in result.warnings)}


def _mean_se(values) -> str:
    a = np.asarray(values, float)
    if a.size == 0:
        return "-"
    se = a.std(ddof=1) / np.sqrt(a.size) if a.size > 1 else 0.0
    return f"{a.mean():.3f} ± {se:.3f}"


def _beyond(outcomes: list[dict]) -> str:
    """The worst light beyond a node's support over the seeds, in %, or "-" where no grid was kept."""
    values = [o["beyond"] for o in outcomes if o.get("beyond") is not None]
    return f"{100 * max(values):.2f}" if values else "-"


def main_real(args) -> None:
    """The replica table (``--real``)."""
    size = 256 if args.quick else args.size
    seeds = [0] if args.quick else args.seeds
    cases = real_cases(size)
    if args.only:
        cases = [c for c in cases if any(word in c["name"] for word in args.only)]
    if args.quick:  # two cases, as many beads per area as the full slides
        cases = [dict(c, beads=max(20, c["beads"] // 16)) for c in (cases[3], cases[7])]
    print(f"napari-coordgate calibration on replicas of real slides ({'quick' if args.quick else 'full'}); torch "
          f"{torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch "
          f"thread(s); {size}^2, seeds {seeds}; beads rendered as thickness-weighted point sources over the sphere")
    print("PSF error: relative L2 to the true PSF at 5 x 5 field positions, median per slide, mean ± standard error "
          "over seeds; lost: reference beads (ordinary, no other within 1 local FWHM, window inside the frame, no "
          "saturated neighbour) without an accepted bead within 1.5 px")
    header = ["case", "beads / photons", "diameter", "used", "lost %", "PSF error", "worst", "beyond %", "s",
              "notes"]
    rows = []
    for case in cases:
        out = [run_real_case(case, size, seed, args.device) for seed in seeds]
        ok = [o for o in out if "err" in o]
        notes = sorted({o["error"] for o in out if "error" in o} | ({"measured as a point array"} if any(
            o.get("dense") for o in ok) else set()))
        notes += [f"model: {', '.join(sorted({o['chosen'] for o in ok}))}"] if ok else []
        rows.append([case["name"], f"{case['beads']} / {case['photons']:g}",
                     "given" if case["given"] else ("-" if not case["diameter"] else "not given"),
                     f"{np.mean([o['used'] for o in out]):.0f}", f"{100 * np.mean([o['lost'] for o in out]):.1f}",
                     _mean_se([o["err"] for o in ok]), f"{max((o['err_max'] for o in ok), default=0):.3f}",
                     _beyond(ok),
                     f"{np.mean([o['seconds'] for o in out]):.0f}", "; ".join(notes)])
        print("  " + " | ".join(rows[-1]), flush=True)
    print()
    table(header, rows)


#: SV-RL's centre-ring FWHM on the fibre slide (seed 100) stops shrinking about here: 30 / 100 / 300 iterations
#: cut it by 24 / 27 / 28 %
FIBRE_RL_ITERATIONS = 100


def _fibre_seed(case: dict, size: int, seed: int, steps: int, args) -> list[str]:
    """One seed of ``--fibre``: calibrate, train, deblur the held-out slide; the table's row."""
    from napari_coordgate.calibration.beadcheck import bead_fwhm_report
    from napari_coordgate.config import ModelConfig, TrainConfig
    from napari_coordgate.engine import SimulatedSource, predict, train
    from napari_coordgate.optics.deconv import sv_richardson_lucy

    optics, image, _ = _slide(case, size, seed)
    result = calibrate(image, model="grid", device=args.device, **OPTICS)
    err = psf_error(result.model, optics, (size, size))
    _, held, _ = _slide(case, size, seed + 100)
    held = held.astype(np.float64)
    _, ideal, _ = _slide(dict(case, optics=EllipticalOptics(width=0.35, radial=0.0, tangential=0.0, beta=2.5,
                                                            twist=0.0, psf_size=15)), size, seed + 100)
    ref = bead_fwhm_report(held, ideal.astype(np.float64))
    before, floor = ([r["fwhm"] for r in ref[k]["rings"]] for k in ("before", "after"))
    true_model = optics.as_psf_model(9)
    rl_after = [[r["fwhm"] for r in bead_fwhm_report(held, sv_richardson_lucy(
        held, model, FIBRE_RL_ITERATIONS, background=float(np.median(held))))["after"]["rings"]]
        for model in (true_model, result.model)]
    after, val, low = [None] * len(floor), None, None
    if steps > 0:
        psf = result.model
        if args.true_psf:  # the true optics, on the measured model's field (train --psf needs the field shape)
            psf = true_model
            psf.provenance = {"field_shape": [size, size]}
        args.steps = steps
        cfg = TrainConfig(seed=seed, device="cpu", threads=args.train_threads, **_budget(args))
        sharp, val_fields = _builtin_fields(result.model, seed, args.specimens)
        trained = train(ModelConfig(depth=2, channels=16, gate="coordgate"), cfg,
                        SimulatedSource(sharp, psf, val_sharp=val_fields))
        restored = predict(trained.saved, held, device="cpu")
        if args.save_restored:  # for profiles and ringing after the run
            Path(args.save_restored).mkdir(parents=True, exist_ok=True)
            np.save(Path(args.save_restored) / f"fibre_seed{seed}_restored.npy", restored)
        report = bead_fwhm_report(held, restored)
        after, val = [r["fwhm"] for r in report["after"]["rings"]], trained.best_val_psnr
        low = float(restored.min())  # undershoot around bright beads: ringing the FWHM does not see

    def cut(values):
        return " / ".join(f"{100 * (1 - a / b):.0f}" if a and b else "-" for a, b in zip(values, before))

    def fmt(values):
        return " / ".join(f"{v:.2f}" if v else "-" for v in values)

    return [f"{seed}", f"{result.n_beads}", f"{np.median(err):.3f}", fmt(before), fmt(after), cut(after),
            "-" if val is None else f"{val:.2f}", "-" if low is None else f"{low:.0f}", cut(rl_after[0]),
            cut(rl_after[1]), cut(floor), fmt(floor)]


def main_fibre(args) -> None:
    """The fibre-like 8-bit replica end to end (``--fibre``): calibrate, train from the measured model (the true
    optics with ``--true-psf``), deblur a held-out bead slide of the same optics, bead FWHM by ring before and after;
    for reference, SV-RL with the true PSFs and with the measured model, and the same beads imaged through a
    pixel-limited PSF (*sharp*: what a
    perfect restoration would show through the same detector). ``--steps 0``: no training."""
    from napari_coordgate.config import TrainConfig

    size = 512 if args.quick else args.size
    steps = 20 if args.quick else args.steps
    fibre = next(c for c in real_cases(size) if c["name"].startswith("fibre"))  # by name: the list grows
    case = dict(fibre, beads=max(30, 60 * size * size // 1024**2))
    torch.set_num_threads(args.threads)
    rows = []
    for seed in ([0] if args.quick else args.seeds):
        rows.append(_fibre_seed(case, size, seed, steps, args))
        print("  " + " | ".join(rows[-1]), flush=True)
    cfg = TrainConfig(**_budget(args))
    print(f"fibre-like 8-bit replica ({case['beads']} beads, clusters, {size}^2): calibrate (grid), train CoordGate "
          f"U-Net(2) {steps} steps (brightness {cfg.brightness:g}, photons {cfg.photons:g}, {args.specimens} "
          f"specimens) from the "
          f"{'true optics' if args.true_psf else 'measured model'} on {args.train_threads} thread(s), deblur a "
          "held-out slide (seed + 100); bead FWHM (px) by ring centre / middle / edge, each bead the detector accepts "
          "in the held-out slide measured at the same place in the output (beadcheck.bead_fwhm_report); target: "
          f"smaller by >= 25 % in every ring. val: the training's best validation PSNR (dB); SV-RL: "
          f"{FIBRE_RL_ITERATIONS} iterations with the true PSFs and with the measured model; sharp: the ceiling; "
          f"min: the network output's minimum (counts; the held-out slide's background is about 8)")
    table(["seed", "beads used", "PSF error", "FWHM before", "FWHM after", "smaller by %", "val", "min", "SV-RL true %",
           "SV-RL measured %", "sharp %", "FWHM sharp"], rows)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--3d" in argv:  # bead z-stacks: bench_calibrate3d.py (its own flags)
        from bench_calibrate3d import main as main_3d

        main_3d([a for a in argv if a != "--3d"])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny slides (seconds)")
    parser.add_argument("--size", type=int, default=1024, help="side of the square bead image (default 1024)")
    parser.add_argument("--beads", type=int, nargs="+", default=[30, 100, 300])
    parser.add_argument("--photons", type=float, nargs="+", default=[300.0, 3000.0])
    parser.add_argument("--optics", nargs="+", default=["pupil", "moffat"], choices=["pupil", "moffat"])
    parser.add_argument("--model", default="auto", choices=["auto", "grid", "pupil"])
    parser.add_argument("--device", default="cpu", help="torch device of the pupil fit (cpu, cuda, auto)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bead slides")
    parser.add_argument("--train", action="store_true",
                        help="train CoordGate from the measured and from the true PSF model (300 beads / 3000 "
                             "photons) and compare their PSNR on held-out fields")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="--train: training seeds")
    parser.add_argument("--steps", type=int, default=STEPS_10_MIN,
                        help=f"--train: optimiser steps per model (default {STEPS_10_MIN}, about 10 CPU-minutes)")
    parser.add_argument("--minutes", type=float, default=0.0,
                        help="--train: wall minutes per model instead of --steps (an idle machine!)")
    parser.add_argument("--brightness", type=float, default=None,
                        help="--train/--fibre: TrainConfig.brightness (default: TrainConfig's)")
    parser.add_argument("--train-photons", type=float, default=None,
                        help="--train/--fibre: TrainConfig.photons, the training pairs' noise (default: TrainConfig's)")
    parser.add_argument("--true-psf", action="store_true",
                        help="--fibre: train from the true optics (a 9 x 9 grid of its PSFs) instead of the measured "
                             "model: what the calibration costs")
    parser.add_argument("--specimens", default="mixed", choices=list(SPECIMEN_SETS),
                        help=f"--fibre, as train --psf --specimens: the {SPECIMEN_HELP}; default mixed")
    parser.add_argument("--save-restored", metavar="DIR", help="--fibre: save each seed's restored held-out slide "
                        "(DIR/fibre_seedS_restored.npy)")
    parser.add_argument("--train-threads", type=int, default=1, help="--train: torch threads of training (default 1)")
    parser.add_argument("--bead-diameter", type=float, default=0.0,
                        help="--train: beads of this diameter in px, rendered as spheres and given to calibrate")
    parser.add_argument("--real", action="store_true",
                        help="replicas of real slides: finite beads, crowded, 8-bit, tilted optics, a point array, a "
                             "fibre-like PSF (seeds from --seeds)")
    parser.add_argument("--only", nargs="+", metavar="WORD", help="--real: only the cases whose name has a WORD")
    parser.add_argument("--fibre", action="store_true",
                        help="the fibre-like 8-bit replica end to end: calibrate, train (--steps), deblur held-out "
                             "beads, bead FWHM by ring before and after (seeds from --seeds)")
    args = parser.parse_args(argv)
    if args.fibre:
        main_fibre(args)
        return
    if args.real:
        torch.set_num_threads(args.threads)
        if args.seeds == [0, 1, 2] and not args.quick:
            args.seeds = [0, 1, 2, 3, 4]
        main_real(args)
        return
    if args.train:
        main_train(args)
        return
    torch.set_num_threads(args.threads)
    if args.quick:
        args.size, args.beads, args.photons = 256, [40], [3000.0]
        cases = [("moffat", "grid"), ("pupil", "auto")]
    else:
        cases = [(o, args.model) for o in args.optics]
    print(f"napari-coordgate bead calibration benchmark ({'quick' if args.quick else 'full'}); torch "
          f"{torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch "
          f"thread(s), device {args.device}")
    print("PSF error: relative L2 to the true PSF at 5 x 5 field positions (centroid-centred); residuals: held-out "
          "beads' misfit per pixel / noise^2")
    header = ["optics", "size", "beads", "photons", "used", "chosen", "PSF px", "err median", "err max",
              "res grid", "res pupil", "seconds"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for optics_name, model in cases:
            for beads in args.beads:
                for photons in args.photons:
                    rows.append(run_case(optics_name, args.size, beads, photons, model, args.device, args.seed,
                                         Path(tmp)))
                    print("  " + " ".join(rows[-1]), flush=True)
    print()
    table(header, rows)


if __name__ == "__main__":
    main()
