"""Speed and accuracy of the 3-D spatially varying blur (issue 24): seconds per volume, forward and adjoint.

Prints two tables:

1. seconds to build :class:`~napari_coordgate.optics.blur3d.SpatiallyVaryingBlur3D` for, and to blur (forward) and
   apply the adjoint to, one volume of the 3-D preset ``tilted_curved_3d`` (K = 5, 17 x 25 x 25 voxel PSFs), with
   the torch threads given (default 2; the target is 10 s per 64 x 256 x 256 volume on two CPU threads);
   and the memory the operator's block OTFs hold;
2. on a small volume, for K = 3, 5, 7: the largest difference between the fast operator and its voxel-by-voxel
   reference (:func:`~napari_coordgate.optics.blur3d.brute_force_blur3d`: the same interpolated node PSFs; float64,
   relative to the output's peak), and the relative L2 error of the K x K interpolation against the exact blur
   (``exact=True``: every pixel with its own pupil-model PSF).

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
        otf_mib = sum(b.otf.numel() * b.otf.element_size() for b in op._blocks) / 2**20
        rows.append((shape, model.grid, (model.psf_depth, model.psf_size, model.psf_size), n, build, fwd, adj,
                     otf_mib))
    return rows


def accuracy_rows(model, shape, grids):
    volume = np.random.default_rng(1).random(shape)
    exact = brute_force_blur3d(volume, model, exact=True).astype(np.float64)
    rows = []
    for k in grids:
        m = model.replace(pupil=model.pupil.replace(grid=k))
        with torch.no_grad():
            fast = SpatiallyVaryingBlur3D(m, shape, dtype=torch.float64).apply(torch.from_numpy(volume)).numpy()
        reference = brute_force_blur3d(volume, m).astype(np.float64)
        implementation = float(np.abs(fast - reference).max() / np.abs(reference).max())
        rows.append((shape, k, implementation, float(np.linalg.norm(fast - exact) / np.linalg.norm(exact))))
    return rows


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
          f"{'forward s/vol':>14} {'adjoint s/vol':>14} {'OTFs MiB':>9}")
    for shp, k, psf, n, build, fwd, adj, mib in speed_rows(model, shape, args.threads, repeats):
        print(f"{str(shp):>18} {k:>3} {str(psf):>14} {n:>8} {build:>8.2f} {fwd:>14.2f} {adj:>14.2f} {mib:>9.0f}")
    print()
    print(f"{'reference shape':>18} {'K':>3} {'max |fast - reference| / peak':>30} {'L2 error vs exact PSFs':>23}")
    small = (5, 12, 12) if args.quick else (17, 24, 24)
    for shp, k, impl, interp in accuracy_rows(model, small, (3, 5) if args.quick else (3, 5, 7)):
        print(f"{str(shp):>18} {k:>3} {impl:>30.1e} {interp:>23.2e}")


if __name__ == "__main__":
    main()
