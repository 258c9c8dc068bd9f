"""Bead calibration on slides made with known optics: how close the measured PSF model gets, and how fast.

For each case a bead slide is rendered (``napari_coordgate.calibration.synthetic.bead_slide``): beads at random
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

Usage::

    python benchmarks/bench_calibrate.py                       # 2 optics x beads 30/100/300 x photons 300/3000, 1024^2
    python benchmarks/bench_calibrate.py --size 2048 --beads 300 --photons 3000 --model grid   # the timing target
    python benchmarks/bench_calibrate.py --quick               # tiny, seconds (the test suite runs it)
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from napari_coordgate.calibrate import calibrate
from napari_coordgate.calibration.synthetic import EllipticalOptics, PupilOptics, bead_slide, psf_error

OPTICS = {"na": 0.8, "wavelength_um": 0.52, "immersion": 1.0, "pixel_size_um": 0.16}


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny slides (seconds)")
    parser.add_argument("--size", type=int, default=1024, help="side of the square bead image (default 1024)")
    parser.add_argument("--beads", type=int, nargs="+", default=[30, 100, 300])
    parser.add_argument("--photons", type=float, nargs="+", default=[300.0, 3000.0])
    parser.add_argument("--optics", nargs="+", default=["pupil", "moffat"], choices=["pupil", "moffat"])
    parser.add_argument("--model", default="auto", choices=["auto", "grid", "pupil"])
    parser.add_argument("--device", default="cpu", help="torch device of the pupil fit (cpu, cuda, auto)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
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
