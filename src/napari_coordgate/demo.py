"""The demo: a synthetic calibration set, a plain and a CoordGate U-Net trained for the same budget, and the
classical baselines, compared overall and by field ring. Runs on 2 CPU cores in a few minutes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

__all__ = ["run_demo", "DEMO_PSF"]

DEMO_PSF = "edge_defocus_astigmatism"
TEST_SOURCES = ("procedural", "moon")  # moon is never used in training; procedural seeds differ
TUNE_SOURCES = ("hubble_deep_field",)  # picks the RL iteration counts, never used for scoring


def _best_iterations(fn, blurred, sharp, candidates=(5, 10, 20, 40)) -> int:
    from .metrics import psnr

    scores = {n: psnr(sharp, fn(blurred, n)) for n in candidates}
    return max(scores, key=scores.get)


class _Scores:
    """The comparison table: one row per method, scored on the test fields, and each method's output."""

    def __init__(self, test_sharp):
        self.test_sharp, self.rows, self.restored = test_sharp, [], {}

    def add(self, name: str, img, secs: float | None = None, extra: dict | None = None) -> None:
        from .metrics import quality_report

        rep = quality_report(self.test_sharp, img)
        row = {"method": name, "psnr": rep["psnr"], "ssim": rep["ssim"], "psnr_by_ring": rep["psnr_by_ring"]}
        if secs:
            row["mp_per_s"] = self.test_sharp.size / 1e6 / secs
        row.update(extra or {})
        self.rows.append(row)
        self.restored[name] = img


def _fields(psf, shape, seed: int, n_train: int, photons: float):
    """Training fields, two test fields and a tuning field (bundled and procedural specimens), and the test and
    tuning fields blurred with camera noise."""
    from .optics.blur import synthesize_pairs
    from .samples.specimens import TRAIN_SOURCES, specimen_fields

    train_sharp = specimen_fields(n_train, shape, seed=seed, sources=TRAIN_SOURCES)
    test_sharp = specimen_fields(2, shape, seed=seed + 1000, sources=TEST_SOURCES)
    tune_sharp = specimen_fields(1, shape, seed=seed + 2000, sources=TUNE_SOURCES)
    _, test_blurred = synthesize_pairs(test_sharp, psf, photons=photons, seed=seed + 1)
    _, tune_blurred = synthesize_pairs(tune_sharp, psf, photons=photons, seed=seed + 2)
    return train_sharp, (test_sharp, test_blurred), (tune_sharp, tune_blurred)


def _baselines(scores: _Scores, psf, shape, test_blurred, tune, log) -> None:
    """RL-central and SV-RL with the true PSFs, their iteration counts chosen on the tuning field."""
    from .optics.blur import SpatiallyVaryingBlur
    from .optics.deconv import richardson_lucy_central, sv_richardson_lucy

    tune_sharp, tune_blurred = tune
    op = SpatiallyVaryingBlur(psf, shape, device="cpu")  # SV-RL's forward model: the true PSFs
    log("classical baselines: choosing iteration counts on a separate image ...")
    n_rl = _best_iterations(lambda b, n: richardson_lucy_central(b, psf, n), tune_blurred, tune_sharp)
    t0 = time.perf_counter()
    rl = richardson_lucy_central(test_blurred, psf, n_rl)
    scores.add(f"RL-central ({n_rl} it)", rl, time.perf_counter() - t0, {"iterations": n_rl})
    n_sv = _best_iterations(lambda b, n: sv_richardson_lucy(b, op, n), tune_blurred, tune_sharp)
    t0 = time.perf_counter()
    sv = sv_richardson_lucy(test_blurred, op, n_sv)
    scores.add(f"SV-RL ({n_sv} it)", sv, time.perf_counter() - t0, {"iterations": n_sv})


def _networks(scores: _Scores, outdir: Path, psf, train_sharp, test_blurred, *, minutes: float, seed: int,
              device: str, photons: float) -> None:
    """A plain and a CoordGate U-Net(2) trained for the same budget, saved and scored (after a warm-up)."""
    from .config import ModelConfig, TrainConfig
    from .engine import SimulatedSource, predict
    from .model_io import save_model
    from .nn import count_parameters
    from .runners.console import train_with_bar

    for gate, label in (("none", "plain U-Net(2)"), ("coordgate", "CoordGate U-Net(2)")):
        mcfg = ModelConfig(depth=2, channels=16, gate=gate)
        tcfg = TrainConfig(minutes=minutes, seed=seed, device=device, photons=photons, read_noise=0.0)
        res = train_with_bar(mcfg, tcfg, SimulatedSource(train_sharp, psf), label=label)
        path = save_model(outdir / ("coordgate" if gate == "coordgate" else "plain"), res.saved)
        predict(res.saved, test_blurred[:1], device=device)  # warm-up: gates cached, allocator primed
        t0 = time.perf_counter()
        out = predict(res.saved, test_blurred, device=device)
        scores.add(label, out, time.perf_counter() - t0,
                   {"parameters": count_parameters(res.saved.model), "best_val_psnr": res.best_val_psnr,
                    "epochs": res.saved.provenance["training"]["epochs"], "device": res.device,
                    "model_file": str(path)})


def _write_outputs(outdir: Path, scores: _Scores, test_blurred, minutes: float) -> None:
    """The test images, the CoordGate output and the report figure."""
    from .image_io.tiff import write_tiff
    from .report import write_report_png

    best = "CoordGate U-Net(2)"
    write_tiff(outdir / "test_sharp.tif", scores.test_sharp)
    write_tiff(outdir / "test_blurred.tif", test_blurred)
    write_tiff(outdir / "test_restored_coordgate.tif", scores.restored[best])
    write_report_png(
        outdir / "report.png", scores.test_sharp, test_blurred, scores.restored[best],
        title=f"CoordGate U-Net(2), {minutes:g} min on {scores.rows[-1].get('device', 'cpu')}, PSF '{DEMO_PSF}'",
        others={k: v for k, v in scores.restored.items() if k not in ("blurred", best)},
    )


def run_demo(
    outdir: Path,
    *,
    minutes: float = 2.0,
    seed: int = 0,
    threads: int = 0,
    device: str = "auto",
    field: int = 256,
    n_train: int = 24,
    photons: float = 1000.0,
    log: Callable[[str], None] = print,
) -> dict:
    """Run the demo and write models, a JSON report and a PNG report to ``outdir``; returns the report."""
    import torch

    from .optics.models import get_psf_model
    from .runners.console import format_table

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    if threads > 0:
        torch.set_num_threads(threads)
    t_start = time.perf_counter()
    psf = get_psf_model(DEMO_PSF)
    shape = (field, field)
    log(f"napari-coordgate demo: PSF preset '{DEMO_PSF}', {n_train} training fields of {field}x{field}, "
        f"{photons:g} photons, {minutes:g} training minute(s) per model, torch threads {torch.get_num_threads()}")
    train_sharp, (test_sharp, test_blurred), tune = _fields(psf, shape, seed, n_train, photons)
    scores = _Scores(test_sharp)
    scores.add("blurred", test_blurred)
    _baselines(scores, psf, shape, test_blurred, tune, log)
    _networks(scores, outdir, psf, train_sharp, test_blurred, minutes=minutes, seed=seed, device=device,
              photons=photons)
    log("")
    log(f"Test set: {len(test_sharp)} unseen fields ({', '.join(TEST_SOURCES)}), PSNR/SSIM against the sharp "
        "fields; rings by per-axis radius r: centre < 0.5, middle 0.5-1, edge >= 1")
    log(format_table(scores.rows))
    _write_outputs(outdir, scores, test_blurred, minutes)
    report = {
        "psf": DEMO_PSF, "field": list(shape), "train_fields": n_train, "photons": photons,
        "minutes_per_model": minutes, "threads": torch.get_num_threads(), "seed": seed,
        "rows": scores.rows, "seconds": round(time.perf_counter() - t_start, 1),
    }
    (outdir / "report.json").write_text(json.dumps(report, indent=2, default=float))
    log(f"\nwrote {outdir}/coordgate.cgmodel, plain.cgmodel, report.png, report.json, test_*.tif "
        f"({report['seconds']:.0f} s)")
    log(f"try: napari-coordgate evaluate -m {outdir}/coordgate.cgmodel --sharp {outdir}/test_sharp.tif "
        f"--blurred {outdir}/test_blurred.tif")
    return report
