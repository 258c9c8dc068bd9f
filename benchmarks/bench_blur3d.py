"""Speed and accuracy of the 3-D spatially varying blur (issue 24): seconds per volume, forward and adjoint.

Prints two tables:

1. seconds to build :class:`~napari_coordgate.optics.blur3d.SpatiallyVaryingBlur3D` for, and to blur (forward) and
   apply the adjoint to, one volume of the 3-D preset ``tilted_curved_3d`` (K = 5, 17 x 25 x 25 voxel PSFs), with
   the torch threads given (default 2; the target is 10 s per 64 x 256 x 256 volume on two CPU threads);
2. the largest difference between the fast operator and the voxel-by-voxel reference
   (:func:`~napari_coordgate.optics.blur3d.brute_force_blur3d`) on a small volume, relative to the output's peak.

Usage::

    python benchmarks/bench_blur3d.py                 # 64 x 256 x 256, 2 threads, best of 3
    python benchmarks/bench_blur3d.py --threads 1 2   # one row per thread count
    python benchmarks/bench_blur3d.py --quick         # 16 x 64 x 64, a few seconds
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from napari_coordgate.optics.blur3d import SpatiallyVaryingBlur3D, brute_force_blur3d
from napari_coordgate.optics.psf3d import PRESETS_3D


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def speed_rows(model, shape, threads, repeats):
    volume = torch.from_numpy(np.random.default_rng(0).random(shape, dtype=np.float32))
    rows = []
    for n in threads:
        torch.set_num_threads(n)
        t = time.perf_counter()
        op = SpatiallyVaryingBlur3D(model, shape)
        build = time.perf_counter() - t
        with torch.no_grad():
            fwd = _best(lambda: op.apply(volume), repeats)
            adj = _best(lambda: op.apply_adjoint(volume), repeats)
        rows.append((shape, model.grid, (model.psf_depth, model.psf_size, model.psf_size), n, build, fwd, adj))
    return rows


def accuracy_row(model, shape):
    volume = np.random.default_rng(1).random(shape)
    fast = SpatiallyVaryingBlur3D(model, shape, dtype=torch.float64).forward(volume)
    exact = brute_force_blur3d(volume, model)
    return shape, float(np.abs(fast - exact).max() / np.abs(exact).max())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small volume, one repeat")
    parser.add_argument("--threads", type=int, nargs="+", default=[2], help="torch thread counts to time")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per row (the best is shown)")
    args = parser.parse_args(argv)
    model = PRESETS_3D["tilted_curved_3d"]
    shape = (16, 64, 64) if args.quick else (64, 256, 256)
    repeats = 1 if args.quick else args.repeats
    t = time.perf_counter()
    model.psf_grid()  # the PSFs of the pupil model, computed once per operator: shown apart from the FFT work
    psf_time = time.perf_counter() - t
    print(f"# 3-D blur, preset tilted_curved_3d ({platform.processor() or platform.machine()}, torch "
          f"{torch.__version__}); PSF grid computed in {psf_time:.2f} s (part of 'build')")
    print(f"{'shape (D, H, W)':>18} {'K':>3} {'PSF (D, s, s)':>14} {'threads':>8} {'build s':>8} "
          f"{'forward s/vol':>14} {'adjoint s/vol':>14}")
    for shp, k, psf, n, build, fwd, adj in speed_rows(model, shape, args.threads, repeats):
        print(f"{str(shp):>18} {k:>3} {str(psf):>14} {n:>8} {build:>8.2f} {fwd:>14.2f} {adj:>14.2f}")
    print()
    print(f"{'reference shape':>18} {'max |fast - brute force| / peak':>32}")
    shp, err = accuracy_row(model, (9, 24, 28) if args.quick else (21, 40, 48))
    print(f"{str(shp):>18} {err:>32.2e}")


if __name__ == "__main__":
    main()
