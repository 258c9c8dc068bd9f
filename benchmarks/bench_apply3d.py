"""Applying a 3-D model to a large z-stack (issue 24): peak memory against input + 2 GiB, and MVoxel/s.

A 100 x 2048 x 2048 uint16 ZYX TIFF (0.78 GiB, ImageJ metadata with its z-step) is written plane by plane, and a 3-D
CoordGate U-Net(2) (16 channels, random weights: the cost does not depend on them) at its z-step is saved. A fresh
interpreter then runs ``napari-coordgate apply -m m3d vol.tif -o out.tif`` (the command a user types: the input
memory-mapped, restored slab by slab through 3-D tiles, written through a memory-mapped float32 TIFF). Its baseline is
the peak resident memory after importing the CLI; everything above it is reported against the input's size + 2 GiB
(file pages of the memory maps count as resident memory while they stay mapped).

    python benchmarks/bench_apply3d.py --threads 2                 # 100 x 2048^2 (several minutes on 2 cores)
    python benchmarks/bench_apply3d.py --precision bf16 --threads 2
    python benchmarks/bench_apply3d.py --quick                     # 16 x 256^2

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

Z_STEP, PIXEL = 0.25, 0.13


def _write_volume(path: Path, planes: int, size: int) -> None:
    """A uint16 ZYX TIFF written plane by plane through a memory map (never whole in memory)."""
    import tifffile

    from napari_coordgate.samples.specimens import procedural_specimen

    base = (200 + 3000 * procedural_specimen((size, size), seed=0)).astype(np.uint16)
    vol = tifffile.memmap(path, shape=(planes, size, size), dtype=np.uint16, imagej=True,
                          resolution=(1 / PIXEL, 1 / PIXEL), metadata={"axes": "ZYX", "spacing": Z_STEP, "unit": "um"})
    for z in range(planes):  # each plane: the specimen moved, as structures drift through a stack
        vol[z] = np.roll(base, (3 * z, 5 * z), axis=(0, 1))
    vol.flush()
    del vol


def _write_model(path: Path, size: int) -> None:
    import torch

    from napari_coordgate.config import ModelConfig, z_pool_start_for
    from napari_coordgate.model_io import SavedModel, save_model
    from napari_coordgate.nn.unet import build_model

    torch.manual_seed(0)
    cfg = ModelConfig(ndim=3, depth=2, channels=16, z_pool_start=z_pool_start_for(Z_STEP, PIXEL))
    net = build_model(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.05)
    save_model(path, SavedModel(net, cfg, (size, size), z_step_um=Z_STEP))


def _child(model: str, volume: str, out: str, precision: str, threads: int) -> None:
    """In a fresh process: the baseline after importing the CLI, then ``apply`` as a user runs it."""
    from napari_coordgate.cli import main

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    code = main(["apply", "-m", model, volume, "-o", out, "--precision", precision, "--threads", str(threads),
                 "--device", "cpu"])
    secs = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"code": code, "baseline": base, "peak": peak, "seconds": secs}))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="16 x 256^2")
    ap.add_argument("--planes", type=int, default=100)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child(*args.child, args.precision, args.threads)
        return
    planes, size = (16, 256) if args.quick else (args.planes, args.size)
    with tempfile.TemporaryDirectory(prefix="bench_apply3d_") as tmp:
        vol, model, out = Path(tmp) / "vol.tif", Path(tmp) / "m3d.cgmodel", Path(tmp) / "out.tif"
        _write_volume(vol, planes, size)
        _write_model(model, size)
        res = subprocess.run([sys.executable, __file__, "--child", str(model), str(vol), str(out), "--precision",
                              args.precision, "--threads", str(args.threads)], capture_output=True, text=True)
        if res.returncode != 0:
            sys.exit(res.stderr[-3000:])
        r = json.loads(res.stdout.strip().splitlines()[-1])
        written = out.stat().st_size
    gib, voxels = 2**30, planes * size * size
    above, goal = (r["peak"] - r["baseline"]) / gib, voxels * 2 / gib + 2
    print(f"## apply, a 3-D CoordGate U-Net(2) (16 channels) on a {planes} x {size} x {size} uint16 z-stack TIFF, "
          f"{args.precision}, {args.threads} thread(s)")
    print(f"{'quantity':<40}{'value':>12}")
    print(f"{'input':<40}{voxels * 2 / gib:>10.3f} GiB")
    print(f"{'output written (float32 TIFF)':<40}{written / gib:>10.3f} GiB")
    print(f"{'peak host RSS above baseline':<40}{above:>10.3f} GiB")
    print(f"{'goal: input + 2 GiB':<40}{goal:>10.3f} GiB  ({'met' if above <= goal else 'NOT met'})")
    print(f"{'seconds (apply, exit code ' + str(r['code']) + ')':<40}{r['seconds']:>10.1f} s")
    print(f"{'MVoxel/s':<40}{voxels / 1e6 / r['seconds']:>10.2f}")


if __name__ == "__main__":
    main()
