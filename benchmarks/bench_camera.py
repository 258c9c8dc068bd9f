"""Camera offset and gain: does a model restore ``a * x + c`` as well as ``x``?

A CoordGate U-Net(2) is trained on the recipe benchmark's calibration fields in [0, 1] units (bench_recipe.py's
data: preset ``edge_defocus_astigmatism``, 32 fields of 256^2, 1000 photons), once with per-image intensity
normalisation (the default) and once with the fixed normalisation of model files before schema 3. Each model
restores the held-out fields stored as a camera would: ``a * x + c`` (uint16 when ``a`` is large, float32
otherwise). Printed per (a, c): PSNR against the sharp fields after undoing the units (``(out - c) / a``), its
difference to the PSNR on ``x`` itself (issue 13's target: within 0.2 dB), and the output's minimum in camera
units (negative intensities are a symptom of an unseen offset).

    python benchmarks/bench_camera.py               # 600 steps per model (about 5 minutes per model, 1 thread)
    python benchmarks/bench_camera.py --quick       # tiny, seconds (the test suite runs it)
"""

from __future__ import annotations

import argparse
import time

import numpy as np

CAMERAS = [(1.0, 0.0), (0.3, 0.0), (0.3, 100.0), (0.3, 500.0), (3000.0, 0.0), (3000.0, 100.0), (3000.0, 500.0)]


def as_camera(fields: np.ndarray, gain: float, offset: float) -> np.ndarray:
    """Fields in [0, 1] as a camera stores them: uint16 counts for large gains, float32 otherwise."""
    img = gain * fields + offset
    return np.round(img).astype(np.uint16) if gain >= 100 else img.astype(np.float32)


def score(saved, sharp: np.ndarray, blurred: np.ndarray) -> list[tuple[float, float, float, float]]:
    """(gain, offset, PSNR, min output) per camera, PSNR after undoing the units; ring 'edge' not needed here."""
    from napari_coordgate.engine import predict
    from napari_coordgate.metrics import psnr

    rows = []
    for gain, offset in CAMERAS:
        cam = as_camera(blurred, gain, offset)
        out = np.stack([predict(saved, cam[i], device="cpu") for i in range(cam.shape[0])])
        back = (out.astype(np.float64) - offset) / gain
        rows.append((gain, offset, float(np.mean([psnr(sharp[i], back[i]) for i in range(len(sharp))])),
                     float(out.min())))
    return rows


def main() -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_recipe import build_benchmark

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    fields, side = (4, 96) if args.quick else (32, 256)
    steps = 10 if args.quick else args.steps

    import torch

    from napari_coordgate.config import ModelConfig, TrainConfig
    from napari_coordgate.engine import PairSource, train

    torch.set_num_threads(args.threads)
    _, (tr_s, tr_b), (te_s, te_b), _ = build_benchmark("edge_defocus_astigmatism", fields, side, 1000.0)
    print(f"# Camera offset/gain benchmark: {fields} calibration fields {side}^2 in [0, 1], CoordGate U-Net(2), "
          f"{steps} steps per model, {args.threads} thread(s), seed {args.seed}; {len(te_s)} held-out fields")
    print("| normalisation | gain a | offset c | stored as | PSNR (dB) | vs x | min output |")
    print("|---|---:|---:|---|---:|---:|---:|")
    for intensity in ("per_image", "fixed"):
        t0 = time.perf_counter()
        cfg = TrainConfig(epochs=max(1, steps // 50), steps_per_epoch=min(50, steps), seed=args.seed, device="cpu",
                          threads=args.threads, intensity=intensity)
        saved = train(ModelConfig(depth=2, channels=16, gate="coordgate"), cfg, PairSource(tr_s, tr_b)).saved
        rows = score(saved, te_s, te_b)
        ref = rows[0][2]
        for gain, offset, p, lo in rows:
            kind = "uint16" if gain >= 100 else "float32"
            print(f"| {intensity} | {gain:g} | {offset:g} | {kind} | {p:.2f} | {p - ref:+.2f} | {lo:.3g} |")
        print(f"<!-- {intensity}: {time.perf_counter() - t0:.0f} s -->", flush=True)


if __name__ == "__main__":
    main()
