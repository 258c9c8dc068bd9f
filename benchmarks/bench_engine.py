"""Engine figures: inference throughput (MP/s) of U-Net(2) with and without CoordGate (gates cached) and of
SV-RL, measured in one run; and peak memory of applying a 20 x 2048^2 uint16 stack.

    python benchmarks/bench_engine.py            # full (a few minutes on 2 cores)
    python benchmarks/bench_engine.py --quick    # small sizes, < 1 minute
    python benchmarks/bench_engine.py --profile  # where the time of one 2048^2 prediction goes (torch profiler)
    python benchmarks/bench_engine.py --levers   # CPU inference levers against fp32 in the same run

Prints tables; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np


def _throughput(size: int, repeats: int, threads: int, device: str) -> list[tuple[str, float, str]]:
    import torch

    from napari_coordgate.config import ModelConfig
    from napari_coordgate.engine import predict
    from napari_coordgate.model_io import SavedModel
    from napari_coordgate.nn import build_model, count_parameters
    from napari_coordgate.optics.blur import SpatiallyVaryingBlur
    from napari_coordgate.optics.deconv import sv_richardson_lucy
    from napari_coordgate.samples.specimens import procedural_specimen

    torch.set_num_threads(threads)
    img = procedural_specimen((size, size), seed=0).astype(np.float32)
    rows = []
    # tile=None: the default tiling; a tile larger than the image: one whole-image window (the old default)
    # precision "bf16": feature maps in bfloat16 on a CPU (fast with AVX512-BF16 or AMX), autocast on CUDA
    for gate, tile, precision in (("none", None, "fp32"), ("coordgate", None, "fp32"), ("coordconv", None, "fp32"),
                                  ("none", 1 << 16, "fp32"), ("coordgate", 1 << 16, "fp32"), ("none", None, "bf16"),
                                  ("coordgate", None, "bf16")):
        cfg = ModelConfig(depth=2, channels=16, gate=gate)
        torch.manual_seed(0)
        saved = SavedModel(build_model(cfg).eval(), cfg, (size, size))
        predict(saved, img, device=device, tile=tile, precision=precision)  # warm-up (and gate cache fill)
        t0 = time.perf_counter()
        for _ in range(repeats):
            predict(saved, img, device=device, tile=tile, precision=precision)
        secs = (time.perf_counter() - t0) / repeats
        label = f"U-Net(2) {gate}" + (", one window" if tile else "") + (", bf16" if precision == "bf16" else "")
        rows.append((label, size * size / 1e6 / secs, f"{count_parameters(saved.model):,} params"))
    op = SpatiallyVaryingBlur("edge_defocus_astigmatism", (size, size), device=device)
    t0 = time.perf_counter()
    sv_richardson_lucy(img, op, 20)
    secs = time.perf_counter() - t0
    rows.append(("SV-RL (20 it, K=7)", size * size / 1e6 / secs, "true PSFs"))
    return rows


def _levers(size: int, repeats: int, threads: int) -> None:
    """CPU inference levers of issue 15 on CoordGate U-Net(2), each against fp32 measured in the same run, and
    what bf16 costs in PSNR with the shipped sample model's weights."""
    import torch

    from napari_coordgate.config import ModelConfig
    from napari_coordgate.devices import bf16_is_fast
    from napari_coordgate.engine import predict
    from napari_coordgate.model_io import SavedModel
    from napari_coordgate.nn import build_model
    from napari_coordgate.samples.specimens import procedural_specimen

    torch.set_num_threads(threads)
    img = procedural_specimen((size, size), seed=0).astype(np.float32)
    cfg = ModelConfig(depth=2, channels=16, gate="coordgate")
    torch.manual_seed(0)
    net = build_model(cfg).eval()
    with torch.no_grad():  # a trained-looking network: gates and head not at their identity initialisation
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    saved = SavedModel(net, cfg, (size, size))

    def mps(**kw):
        out = predict(saved, img, device="cpu", **kw)  # warm-up (and gate cache fill)
        best = min(_timed(lambda: predict(saved, img, device="cpu", **kw)) for _ in range(repeats))
        return size * size / 1e6 / best, out

    base, ref = mps()
    bf16_cpu = bf16_is_fast(torch.device("cpu"))
    print(f"## CPU inference levers, CoordGate U-Net(2), {size}x{size}, {threads} thread(s), "
          f"CPU bf16 instructions: {'yes' if bf16_cpu else 'no'}")
    print(f"{'lever':<34}{'MP/s':>8}{'vs fp32':>9}{'max|d|':>10}")
    print(f"{'fp32, default tiles':<34}{base:>8.2f}{1.0:>9.2f}{0.0:>10.1e}")
    levers = [("bf16 feature maps", dict(precision="bf16")), ("4 tiles batched", dict(batch_tiles=4)),
              ("bf16 + 4 tiles batched", dict(precision="bf16", batch_tiles=4))]
    for name, kw in levers:
        value, out = mps(**kw)
        print(f"{name:<34}{value:>8.2f}{value / base:>9.2f}{float(np.abs(out - ref).max()):>10.1e}")
    _bf16_quality()


def _bf16_quality() -> None:
    """PSNR of the shipped sample model's fp32 and bf16 output on held-out procedural fields of its optics (it
    was trained from those optics on the built-in specimens; tests/samples/test_sample_model.py checks that it
    leaves crops of moon, hubble_deep_field and retina, which it never saw, no worse than its input)."""
    from napari_coordgate.engine import predict
    from napari_coordgate.metrics import psnr
    from napari_coordgate.model_io import load_model
    from napari_coordgate.optics.blur import synthesize_pairs
    from napari_coordgate.samples.sample_model import sample_model_path
    from napari_coordgate.samples.specimens import specimen_fields

    saved = load_model(sample_model_path())
    sharp = specimen_fields(3, saved.field_shape, seed=123, sources=("procedural",))
    _, blurred = synthesize_pairs(sharp, "gaussian", photons=1000.0, seed=5)
    print(f"\n## bf16 vs fp32, the shipped sample model, {len(sharp)} held-out fields of "
          f"{saved.field_shape[0]}x{saved.field_shape[1]} (its optics, 1000 photons)")
    print(f"{'field':<8}{'blurred':>9}{'fp32':>9}{'bf16':>9}{'bf16-fp32':>11}")
    for i, (s, b) in enumerate(zip(sharp, blurred)):
        rng = float(s.max() - s.min())
        scores = [psnr(s, x, data_range=rng) for x in
                  (b, predict(saved, b, device="cpu"), predict(saved, b, device="cpu", precision="bf16"))]
        print(f"{i:<8}{scores[0]:>9.3f}{scores[1]:>9.3f}{scores[2]:>9.3f}{scores[2] - scores[1]:>11.4f}")


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _peak_memory_child(planes: int, size: int, threads: int) -> None:
    """Run in a fresh process: baseline after importing torch and loading a model, then apply the stack."""
    import torch

    from napari_coordgate.config import ModelConfig
    from napari_coordgate.engine import predict
    from napari_coordgate.model_io import SavedModel
    from napari_coordgate.nn import build_model

    torch.set_num_threads(threads)
    cfg = ModelConfig(depth=2, channels=16, gate="coordgate")
    saved = SavedModel(build_model(cfg).eval(), cfg, (size, size), {"offset": 100.0, "scale": 3000.0})
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rng = np.random.default_rng(0)
    stack = rng.integers(100, 60000, size=(planes, size, size), dtype=np.uint16)
    t0 = time.perf_counter()
    out = predict(saved, stack, device="cpu")
    secs = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"input_bytes": int(stack.nbytes), "output_bytes": int(out.nbytes), "baseline": base,
                      "peak": peak, "seconds": secs}))


def _profile(size: int, threads: int, device: str, gate: str) -> None:
    """Print the operators that take the time of one ``size x size`` prediction (after a warm-up)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from napari_coordgate.config import ModelConfig
    from napari_coordgate.engine import plan_tiles, predict
    from napari_coordgate.model_io import SavedModel
    from napari_coordgate.nn import build_model
    from napari_coordgate.samples.specimens import procedural_specimen

    torch.set_num_threads(threads)
    img = procedural_specimen((size, size), seed=0).astype(np.float32)
    cfg = ModelConfig(depth=2, channels=16, gate=gate)
    torch.manual_seed(0)
    saved = SavedModel(build_model(cfg).eval(), cfg, (size, size))
    predict(saved, img, device=device)
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        predict(saved, img, device=device)
    secs = time.perf_counter() - t0
    print(f"## Profile of one {size}x{size} prediction, U-Net(2) {gate}, {len(plan_tiles((size, size), cfg))} tiles, "
          f"{threads} thread(s): {secs:.2f} s under the profiler")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=32))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    ap.add_argument("--profile", action="store_true", help="profile one prediction instead")
    ap.add_argument("--gate", default="coordgate", help="model profiled with --profile")
    ap.add_argument("--levers", action="store_true", help="CPU inference levers, bf16 PSNR cost")
    args = ap.parse_args()
    if args.levers:
        _levers(256 if args.quick else 1024, 1 if args.quick else 3, args.threads)
        return
    if args.profile:
        _profile(256 if args.quick else 2048, args.threads, args.device, args.gate)
        return
    if args.child:
        _peak_memory_child(args.child[0], args.child[1], args.threads)
        return
    size, repeats = (256, 1) if args.quick else (1024, 3)
    import torch

    dev_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {args.threads} thread(s)"
    print(f"## Inference throughput, {size}x{size} image, {dev_name}")
    rows = _throughput(size, repeats, args.threads, args.device)
    plain = rows[0][1]
    print(f"{'method':<32}{'MP/s':>8}{'vs plain':>10}  notes")
    for name, mps, note in rows:
        print(f"{name:<32}{mps:>8.2f}{mps / plain:>10.2f}  {note}")

    planes, psize = (2, 512) if args.quick else (20, 2048)
    print(f"\n## Peak memory applying a {planes} x {psize}^2 uint16 stack (CoordGate U-Net(2), CPU)")
    res = subprocess.run([sys.executable, __file__, "--child", str(planes), str(psize), "--threads",
                          str(args.threads)], capture_output=True, text=True, check=True)
    r = json.loads(res.stdout.strip().splitlines()[-1])
    gib = 2**30
    above = (r["peak"] - r["baseline"]) / gib
    print(f"input {r['input_bytes'] / gib:.2f} GiB, output {r['output_bytes'] / gib:.2f} GiB (float32), "
          f"peak above baseline {above:.2f} GiB (goal <= input + 1 GiB = {r['input_bytes'] / gib + 1:.2f} GiB), "
          f"{planes * psize * psize / 1e6 / r['seconds']:.2f} MP/s")


if __name__ == "__main__":
    main()
