"""Figures for the optics closing note: blur speed, interpolation accuracy, classical baselines.

Prints three tables:

1. seconds to build the operator for, and blur, a 2048² image with K = 7 (each preset);
2. relative L2 error of the K × K PSF-interpolation blur against the brute-force blur (every pixel with its
   own PSF) at K = 3, 5, 7, 9, on a small image;
3. PSNR of the blurred image, Richardson–Lucy with the central PSF, Wiener with the central PSF and
   spatially varying RL on a 512² image blurred with a preset (plus noise), overall and by field ring
   (per-axis radius r = √(x² + y²): centre r < 0.5, middle 0.5 ≤ r < 1, edge r ≥ 1). Iteration counts and
   the Wiener balance are chosen on a separate image.

Usage::

    python benchmarks/bench_optics.py            # full run (a few minutes on one CPU thread)
    python benchmarks/bench_optics.py --quick    # smaller sizes, under two minutes

Images are bundled with scikit-image (no downloads).
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
from skimage import color, data, transform

from napari_coordgate.optics.blur import SpatiallyVaryingBlur, add_noise, brute_force_blur
from napari_coordgate.optics.deconv import richardson_lucy_central, sv_richardson_lucy, sv_wiener, wiener_central
from napari_coordgate.optics.psf import PRESETS

RINGS = (("centre", 0.0, 0.5), ("middle", 0.5, 1.0), ("edge", 1.0, np.inf))
VARYING = ("edge_defocus_astigmatism", "strong_astigmatism", "gaussian")


def field_rings(shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """Boolean masks of the centre, middle and edge rings by per-axis radius r = sqrt(x² + y²)."""
    y = (2.0 * np.arange(shape[0]) - (shape[0] - 1)) / max(shape[0] - 1, 1)
    x = (2.0 * np.arange(shape[1]) - (shape[1] - 1)) / max(shape[1] - 1, 1)
    r = np.hypot(y[:, None], x[None, :])
    return {name: (r >= lo) & (r < hi) for name, lo, hi in RINGS}


def psnr(reference: np.ndarray, estimate: np.ndarray, mask: np.ndarray | None = None) -> float:
    """PSNR in dB for images scaled to [0, 1], optionally over a mask."""
    diff = (reference.astype(np.float64) - estimate.astype(np.float64)) ** 2
    mse = float(diff[mask].mean() if mask is not None else diff.mean())
    return 10.0 * np.log10(1.0 / mse)


def gray(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if image.ndim == 3:
        image = color.rgb2gray(image[..., :3])
    image = image.astype(np.float64)
    image = (image - image.min()) / (image.max() - image.min())
    return transform.resize(image, shape, anti_aliasing=True).astype(np.float32)


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")


def bench_speed(size: int, device: str, repeats: int) -> None:
    image = gray(data.camera(), (size, size))
    rows = []
    for name in VARYING:
        cfg = PRESETS[name].replace(grid=7)
        t0 = time.perf_counter()
        op = SpatiallyVaryingBlur(cfg, image.shape, device=device)
        build = time.perf_counter() - t0
        op.forward(image)  # warm-up (allocator, FFT plans)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            op.forward(image)
            times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        op.adjoint(image)
        adjoint = time.perf_counter() - t0
        rows.append([name, str(cfg.psf_size), f"{build:.2f}", f"{np.median(times):.2f}", f"{adjoint:.2f}"])
    table(
        f"Blur of a {size}x{size} image, K = 7 ({device}, {torch.get_num_threads()} torch thread(s); "
        f"median of {repeats})",
        ["preset", "PSF px", "build s", "forward s", "adjoint s"],
        rows,
    )


def bench_accuracy(shape: tuple[int, int], grids: list[int]) -> None:
    image = gray(data.camera(), shape)
    rows = []
    for name in VARYING:
        cfg = PRESETS[name]
        t0 = time.perf_counter()
        exact = brute_force_blur(image, cfg)
        seconds = time.perf_counter() - t0
        change = np.linalg.norm(exact - image)
        cells = []
        for k in grids:
            fast = SpatiallyVaryingBlur(cfg.replace(grid=k), shape).forward(image)
            err = np.linalg.norm(fast - exact)
            cells.append(f"{100 * err / np.linalg.norm(exact):.2f} ({100 * err / change:.1f})")
        rows.append([name] + cells + [f"{seconds:.1f}"])
    table(
        f"Interpolated vs brute-force blur, {shape[0]}x{shape[1]} camera image: relative L2 error % "
        "(in brackets: % of the blur's own change, ||fast - exact|| / ||exact - sharp||)",
        ["preset"] + [f"K = {k}" for k in grids] + ["brute force s"],
        rows,
    )


def bench_baselines(size: int, preset: str, photons: float, read_noise: float, candidates: list[int],
                    balances: list[float], device: str) -> None:
    cfg = PRESETS[preset]
    tune = gray(data.astronaut(), (size, size))
    test = gray(data.camera(), (size, size))
    op = SpatiallyVaryingBlur(cfg, (size, size), device=device)

    def degrade(sharp: np.ndarray, seed: int) -> np.ndarray:
        if photons <= 0 and read_noise <= 0:
            return op.forward(sharp)
        return add_noise(op.forward(sharp), photons=photons if photons > 0 else None, read_noise=read_noise,
                         seed=seed)

    tune_blurred, test_blurred = degrade(tune, 1), degrade(test, 2)

    best_rl = max(candidates, key=lambda n: psnr(tune, richardson_lucy_central(tune_blurred, cfg, n)))
    best_sv = max(candidates, key=lambda n: psnr(tune, sv_richardson_lucy(tune_blurred, op, n)))
    best_w = max(balances, key=lambda b: psnr(tune, wiener_central(tune_blurred, cfg, b)))

    t0 = time.perf_counter()
    rl = richardson_lucy_central(test_blurred, cfg, best_rl)
    t_rl = time.perf_counter() - t0
    t0 = time.perf_counter()
    sv = sv_richardson_lucy(test_blurred, op, best_sv)
    t_sv = time.perf_counter() - t0
    t0 = time.perf_counter()
    wi = wiener_central(test_blurred, cfg, best_w)
    t_w = time.perf_counter() - t0
    sv_wiener_rows = []
    for k in sorted({3, 5, cfg.grid}):
        best_b = max(balances, key=lambda b: psnr(tune, sv_wiener(tune_blurred, cfg, k, balance=b)))
        t0 = time.perf_counter()
        est = sv_wiener(test_blurred, cfg, k, balance=best_b)
        sv_wiener_rows.append((f"SV-Wiener K = {k}, balance {best_b:g}", est, time.perf_counter() - t0))

    rings = field_rings(test.shape)
    rows = []
    for label, estimate, seconds in [
        ("blurred (input)", test_blurred, 0.0),
        (f"RL central PSF, {best_rl} it", rl, t_rl),
        (f"Wiener central PSF, balance {best_w:g}", wi, t_w),
        (f"SV-RL (K = {cfg.grid}), {best_sv} it", sv, t_sv),
        *sv_wiener_rows,
    ]:
        rows.append(
            [label, f"{psnr(test, estimate):.2f}"]
            + [f"{psnr(test, estimate, m):.2f}" for m in rings.values()]
            + [f"{seconds:.1f}"]
        )
    share = ", ".join(f"{k} {100 * m.mean():.0f}%" for k, m in rings.items())
    table(
        f"PSNR (dB) on camera {size}x{size}, preset {preset!r}, {photons:g} photons at peak + read noise "
        f"{read_noise:g} e-; iterations/balance chosen on astronaut ({share} of pixels)",
        ["method", "overall", "centre r<0.5", "middle", "edge r>=1", "seconds"],
        rows,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (under two minutes)")
    parser.add_argument("--device", default="cpu", help="torch device for the blur (cpu, cuda, mps, auto)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--preset", default="edge_defocus_astigmatism", choices=sorted(PRESETS))
    parser.add_argument("--photons", type=float, default=1000.0,
                        help="expected photons at the brightest pixel (0: no shot noise)")
    parser.add_argument("--read-noise", type=float, default=2.0, help="read noise, electrons RMS (0: none)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.quick:
        speed, shape, size = 1024, (48, 64), 256
        candidates, balances = [5, 10, 20, 40], [0.005, 0.02, 0.05]
    else:
        speed, shape, size = 2048, (96, 128), 512
        candidates, balances = [5, 10, 15, 20, 30, 40, 60, 80], [0.002, 0.005, 0.01, 0.02, 0.05, 0.1]
    print(f"napari-coordgate optics benchmark ({'quick' if args.quick else 'full'}); torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s)")
    t0 = time.perf_counter()
    bench_speed(speed, args.device, repeats=3)
    bench_accuracy(shape, [3, 5, 7, 9])
    bench_baselines(size, args.preset, args.photons, args.read_noise, candidates, balances, args.device)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
