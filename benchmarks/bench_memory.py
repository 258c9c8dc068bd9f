"""Peak memory of training on a large calibration stack kept on disk: a 100 x 2048^2 uint16 pair stack written as
memory-mapped .npy files (what the dock's training process receives), trained for a few steps.

The training process is a fresh interpreter; its baseline is its peak resident memory after importing torch and
the engine and opening the two memory maps (nothing read yet). Everything above it while the engine checks the
pairs plane by plane (values, identical pairs, registration), fits the normalisation, trains and validates
through the tiled predictor is reported, against the goal of the input's size + 2 GiB (file pages of the memory
maps that were read count as resident memory). On a CUDA device the peak device memory is printed too.

    python benchmarks/bench_memory.py             # 100 x 2048^2 (1.56 GiB of input; a few minutes on 2 cores)
    python benchmarks/bench_memory.py --quick     # 8 x 256^2
    python benchmarks/bench_memory.py --planes 40 --size 1024 --device cuda

Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _write_stack(folder: Path, planes: int, size: int) -> tuple[Path, Path]:
    """Sharp and blurred uint16 stacks as .npy files, written plane by plane (never whole in memory)."""
    from scipy.ndimage import gaussian_filter, shift

    from napari_coordgate.samples.specimens import procedural_specimen

    base = procedural_specimen((size, size), seed=0).astype(np.float32)
    paths = folder / "sharp.npy", folder / "blurred.npy"
    sharp = np.lib.format.open_memmap(paths[0], mode="w+", dtype=np.uint16, shape=(planes, size, size))
    blurred = np.lib.format.open_memmap(paths[1], mode="w+", dtype=np.uint16, shape=(planes, size, size))
    rng = np.random.default_rng(0)
    for i in range(planes):
        # each plane: the specimen moved by a sub-pixel shift and rescaled, as a stage step would give
        plane = shift(base, rng.uniform(-size / 8, size / 8, 2), order=1, mode="reflect")
        plane = 200 + 3000 * plane * rng.uniform(0.7, 1.0)
        sharp[i] = plane.astype(np.uint16)
        blurred[i] = (gaussian_filter(plane, 1.5) + rng.normal(0, 5, plane.shape)).clip(0, 65535).astype(np.uint16)
    sharp.flush()
    blurred.flush()
    del sharp, blurred
    return paths


def _child(sharp_path: str, blurred_path: str, steps: int, device: str, threads: int) -> None:
    """In a fresh process: baseline after imports and opening the maps, then train a few steps."""
    import torch

    from napari_coordgate.config import ModelConfig, TrainConfig
    from napari_coordgate.engine import PairSource, train

    sharp = np.load(sharp_path, mmap_mode="r")
    blurred = np.load(blurred_path, mmap_mode="r")
    model_cfg = ModelConfig(depth=2, channels=16, gate="coordgate")
    train_cfg = TrainConfig(epochs=1, steps_per_epoch=steps, batch=8, crop=128, device=device, threads=threads)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    res = train(model_cfg, train_cfg, PairSource(sharp, blurred))
    secs = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    cuda = torch.cuda.max_memory_allocated() if res.device.startswith("cuda") else None
    print(json.dumps({"input_bytes": int(sharp.nbytes + blurred.nbytes), "baseline": base, "peak": peak,
                      "seconds": secs, "device": res.device, "device_peak": cuda, "steps": steps,
                      "val_psnr": res.best_val_psnr, "input_psnr": res.history[-1].input_psnr}))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="8 x 256^2 planes, 2 steps")
    ap.add_argument("--planes", type=int, default=100)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child(*args.child, args.steps, args.device, args.threads)
        return
    planes, size, steps = (8, 256, 2) if args.quick else (args.planes, args.size, args.steps)
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        t0 = time.perf_counter()
        paths = _write_stack(Path(tmp), planes, size)
        written = time.perf_counter() - t0
        res = subprocess.run([sys.executable, __file__, "--child", str(paths[0]), str(paths[1]), "--steps",
                              str(steps), "--device", args.device, "--threads", str(args.threads)],
                             capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(res.stderr[-3000:])
    r = json.loads(res.stdout.strip().splitlines()[-1])
    gib = 2**30
    above = (r["peak"] - r["baseline"]) / gib
    goal = r["input_bytes"] / gib + 2
    print(f"## Peak memory training on a {planes} x {size}^2 uint16 calibration pair stack (memory-mapped .npy), "
          f"U-Net(2) CoordGate, {steps} steps of 8 x 128^2 + one validation, {r['device']}, {args.threads} thread(s)")
    print(f"{'quantity':<40}{'value':>12}")
    print(f"{'input (sharp + blurred)':<40}{r['input_bytes'] / gib:>10.3f} GiB")
    print(f"{'peak host RSS above baseline':<40}{above:>10.3f} GiB")
    print(f"{'goal: input + 2 GiB':<40}{goal:>10.3f} GiB  ({'met' if above <= goal else 'NOT met'})")
    if r["device_peak"] is not None:
        print(f"{'peak device memory (torch)':<40}{r['device_peak'] / gib:>10.3f} GiB")
    print(f"{'seconds in train() (stack written in)':<40}{r['seconds']:>10.1f} s    ({written:.1f} s)")
    print(f"{'validation PSNR (input)':<40}{r['val_psnr']:>10.2f} dB   ({r['input_psnr']:.2f} dB)")


if __name__ == "__main__":
    main()
