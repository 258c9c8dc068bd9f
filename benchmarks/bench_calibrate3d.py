"""Calibration from a bead z-stack (issue 25): how well the best-focus map and the 3-D PSFs are measured.

Bead slides imaged through focus are rendered by a different model from the one the calibration fits: every bead
gets the exact 3-D PSF of its own field position (no grid: the pupil model of the ``tilted_curved_3d`` preset,
NA 0.8 dry, 520 nm, 0.13 µm pixels, 0.25 µm z-step, best focus tilted 0.4 / -0.25 µm and curved 0.6 µm across the
field), computed on a 4x finer axial grid so the slide sits a quarter plane off the stack's planes, moved to its
exact sub-pixel position, 41 px wide; Poisson noise with a background of 10 e- and read noise 2 e-. ``photons``:
the in-focus peak pixel of a bead (0.5-1 x, random). The stack has 41 planes (10 µm), 1024 x 1024 px.

Printed per case (mean ± standard error over seeds): beads planted and used, the best-focus error (|measured -
true| shift relative to the field centre at 9 x 9 field points, median, in z-steps; target <= 0.1 with 300 beads /
3000 photons), the 3-D PSF error (relative L2 at 5 x 5 field points, both PSFs in the model's volume, unit sum,
centred laterally; median; target <= 0.2), seconds of ``calibrate_zstack``.

Usage::

    python benchmarks/bench_calibrate3d.py                  # 100 and 300 beads, 3000 photons, seeds 0 1 2
    python benchmarks/bench_calibrate3d.py --quick          # a small analytic case, seconds (the test suite runs it)
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np

from napari_coordgate.calibration.zstack import calibrate_zstack
from napari_coordgate.samples.beadstack import AstigmaticBeam3D, bead_zstack, focus_error, psf3d_error

OVERSAMPLE_Z = 4  # the renderer's axial grid: this many planes per z-step


class PupilStack:
    """The ``tilted_curved_3d`` pupil model as a bead renderer (the interface of
    :class:`~napari_coordgate.samples.beadstack.AstigmaticBeam3D`): exact PSFs per bead, sub-plane slide positions
    from a finer axial grid, sub-pixel positions by Fourier shift.

    ``extent`` (planes, pixels), when given, keeps only the light within that box around each emitter (the box the
    preset's own PSFs are cut to, ``(psf_depth, psf_size)``): beads then carry what the preset blurs volumes with,
    and none of the far out-of-focus light the preset drops. Without it every bead carries all its light."""

    def __init__(self, psf_size: int = 41, extent: tuple[int, int] | None = None):
        from napari_coordgate.optics.psf3d import PRESETS_3D

        self.preset = PRESETS_3D["tilted_curved_3d"]
        self.pupil = self.preset.pupil.replace(psf_size=psf_size)
        self.z_step_um = self.preset.z_step_um
        self.extent = extent

    def focus_planes(self, y_norm, x_norm) -> np.ndarray:
        return self.preset.focus_um(y_norm, x_norm) / self.z_step_um

    def volumes(self, y_norm, x_norm, dz0: float, dy, dx, depth: int, size: int) -> np.ndarray:
        from napari_coordgate.optics.shift import fourier_shift

        q = OVERSAMPLE_Z
        off = int(round(dz0 * q))
        fine = self._fine(np.atleast_1d(y_norm), np.atleast_1d(x_norm), depth, size)
        mid = fine.shape[1] // 2
        planes = mid + q * (np.arange(depth) - depth // 2) - off  # plane d sits d - D//2 - dz0 from the emitter
        out = np.empty((fine.shape[0], depth, size, size))
        for a in range(0, out.shape[0], 8):
            v = fine[a : a + 8, planes] * q  # per-plane light as the coarse grid's
            out[a : a + 8] = fourier_shift(v, np.atleast_1d(dy)[a : a + 8, None], np.atleast_1d(dx)[a : a + 8, None])
        return np.clip(out, 0.0, None)

    def _fine(self, y: np.ndarray, x: np.ndarray, depth: int, size: int) -> np.ndarray:
        """Each bead's PSF on the fine axial grid (kept for the next call with the same beads: a finite bead's
        points share their bead's PSF)."""
        from napari_coordgate.optics.psf3d import Pupil3DPSF

        key = (y.tobytes(), x.tobytes(), depth, size)
        if getattr(self, "_key", None) != key:
            q = OVERSAMPLE_Z
            model = Pupil3DPSF.from_pupil(self.pupil.replace(psf_size=size), z_step_um=self.z_step_um / q,
                                          psf_depth=q * (depth + 2) + 1, tilt_y_um=self.preset.tilt_y_um,
                                          tilt_x_um=self.preset.tilt_x_um, curvature_um=self.preset.curvature_um)
            self._psfs = np.concatenate([model.psfs_at(y[a : a + 8], x[a : a + 8]) for a in range(0, y.size, 8)])
            if self.extent is not None:
                self._psfs *= self._box(self._psfs.shape[1], size)
            self._key = key
        return self._psfs

    def _box(self, fine_depth: int, size: int) -> np.ndarray:
        """(fine planes, size, size) mask of the ``extent`` box centred on the emitter (the fine grid's middle)."""
        depth, width = self.extent
        if width > size:
            raise ValueError(f"PupilStack: extent {width} px is wider than the rendered {size} px")
        z = np.abs(np.arange(fine_depth) - fine_depth // 2) <= OVERSAMPLE_Z * (depth // 2)
        xy = np.abs(np.arange(size) - size // 2) <= width // 2
        return z[:, None, None] & xy[None, :, None] & xy[None, None, :]


def run_case(optics, shape, beads: int, photons: float, seed: int, z_step: float) -> dict:
    stack, truth = bead_zstack(optics, shape, beads, photons=photons, seed=seed, psf_size=41 if shape[1] > 512
                               else 31)
    t0 = time.perf_counter()
    result = calibrate_zstack(stack, z_step_um=z_step, pixel_size_um=0.13)
    seconds = time.perf_counter() - t0
    return {"used": result.n_beads, "focus": float(np.median(focus_error(result, optics, 9))),
            "focus_max": float(focus_error(result, optics, 9).max()),
            "psf": float(np.median(psf3d_error(result.model, optics, shape[1:], 5))),
            "slide": abs(result.slide_plane - truth["slide_plane"]), "seconds": seconds,
            "size": f"{result.psf_depth} x {result.psf_size}^2, K {result.model.nodes}"}


def _mean_se(values, fmt: str = "{:.3f}") -> str:
    a = np.asarray(values, float)
    se = a.std(ddof=1) / np.sqrt(a.size) if a.size > 1 else 0.0
    return f"{fmt.format(a.mean())} ± {fmt.format(se)}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small analytic case (seconds)")
    parser.add_argument("--beads", type=int, nargs="+", default=[100, 300])
    parser.add_argument("--photons", type=float, nargs="+", default=[3000.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--planes", type=int, default=41)
    args = parser.parse_args(argv)
    if args.quick:
        optics, shape, z_step, cases, seeds = AstigmaticBeam3D(), (25, 256, 256), 0.25, [(40, 3000.0)], [0]
    else:
        optics, shape, z_step = PupilStack(), (args.planes, args.size, args.size), 0.25
        cases, seeds = [(b, p) for b in args.beads for p in args.photons], args.seeds
    print(f"napari-coordgate calibration from bead z-stacks ({'quick' if args.quick else 'full'}); "
          f"{platform.processor() or platform.machine()}; stack {shape[0]} x {shape[1]} x {shape[2]}, z-step "
          f"{z_step} µm; optics {'analytic astigmatic beam' if args.quick else 'tilted_curved_3d pupil'}; seeds "
          f"{seeds}")
    header = ["beads / photons", "used", "best-focus error (z-steps, median)", "worst", "3-D PSF error (median)",
              "slide plane error", "PSFs", "s"]
    rows = []
    for beads, photons in cases:
        out = [run_case(optics, shape, beads, photons, seed, z_step) for seed in seeds]
        rows.append([f"{beads} / {photons:g}", f"{np.mean([o['used'] for o in out]):.0f}",
                     _mean_se([o["focus"] for o in out]), f"{max(o['focus_max'] for o in out):.3f}",
                     _mean_se([o["psf"] for o in out]), _mean_se([o["slide"] for o in out]), out[0]["size"],
                     f"{np.mean([o['seconds'] for o in out]):.0f}"])
        print("  " + " | ".join(rows[-1]), flush=True)
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
