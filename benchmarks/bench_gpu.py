"""GPU figures: training steps/s and inference MP/s of U-Net(2) plain and CoordGate, float32 and bfloat16
autocast, tiles one at a time or batched (``predict(..., batch_tiles=N)``); peak CUDA memory per row.

    python benchmarks/bench_gpu.py                   # on the GPU if there is one (20 s on an H200)
    python benchmarks/bench_gpu.py --quick           # tiny sizes on the CPU, seconds (the test suite runs this)
    python benchmarks/bench_gpu.py --size 4096 --train-steps 100 --device cuda

Training: the recipe's shape (docs/method.md: random 128^2 crops whose offsets are drawn with ``sampling="cover"`` on
the pooling grid of a synthetic 512^2 field stack, L2 loss, Adam 3e-3), a plain loop built from ``build_model``,
timed after a warm-up with the device synchronised around the timing; one loss read back per step, as
``engine.train`` does. Inference: ``engine.predict`` on a ``size x size`` plane (a procedural specimen tiled to
that size), end to end (reading, normalising, copies to and from the device). The ``max|d|`` column is the
largest difference from the fp32, one-tile-at-a-time output of the same model, in normalised units (the
image spans [0, 1]): batching must leave it at float rounding, bf16 moves it by its rounding.

Prints tables; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np

GATES = (("U-Net(2) plain", "none"), ("U-Net(2) CoordGate", "coordgate"))
PRECISIONS = ("fp32", "bf16")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def _sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _reset_peak(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)


def _peak(dev) -> str:
    import torch

    if dev.type != "cuda":
        return "-"
    return f"{torch.cuda.max_memory_allocated(dev) / 2**30:.2f}"


def _model(gate: str, dev, seed: int = 0):
    import torch

    from napari_coordgate.config import ModelConfig
    from napari_coordgate.nn import build_model

    cfg = ModelConfig(depth=2, gate=gate)
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():
        # a fresh residual network is the identity (zero head, zero last gate layers): give those layers
        # small weights so bf16 and batching differences show in the output
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    return cfg, model.to(dev)


def _training(dev, field: int, crop: int, batches, steps: int, warmup: int) -> None:
    import torch
    from scipy.ndimage import gaussian_filter

    from napari_coordgate.data import sample_offsets
    from napari_coordgate.samples.specimens import procedural_specimen

    planes = 4
    sharp = np.stack([procedural_specimen((field, field), seed=s) for s in range(planes)]).astype(np.float32)
    blurred = np.stack([gaussian_filter(s, 1.5) for s in sharp]).astype(np.float32)
    sharp_t, blurred_t = torch.from_numpy(sharp).to(dev), torch.from_numpy(blurred).to(dev)
    print(f"\n## Training, {crop}^2 crops of a {planes} x {field}^2 field stack, Adam, L2 loss; "
          f"{steps} timed steps after {warmup} warm-up", flush=True)
    print(f"{'model':<20}{'batch':>6}{'precision':>10}{'steps/s':>9}{'Mpx/s':>8}{'peak GiB':>10}", flush=True)
    for label, gate in GATES:
        for batch in batches:
            for precision in PRECISIONS:
                cfg, model = _model(gate, dev)
                model.train()
                opt = torch.optim.Adam(model.parameters(), lr=3e-3)
                rng = np.random.default_rng(0)
                amp = precision == "bf16"

                def step() -> float:
                    pl = torch.from_numpy(rng.integers(0, planes, size=batch))[:, None, None].to(dev)
                    offs = sample_offsets(rng, batch, (field, field), (crop, crop), cfg.min_size, "cover")
                    yi = torch.from_numpy(offs[:, 0, None] + np.arange(crop)[None])[:, :, None].to(dev)
                    xi = torch.from_numpy(offs[:, 1, None] + np.arange(crop)[None])[:, None, :].to(dev)
                    x, y = blurred_t[pl, yi, xi][:, None], sharp_t[pl, yi, xi][:, None]
                    with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=amp):
                        out = model(x, offset=torch.from_numpy(offs).to(dev), field_shape=(field, field))
                    loss = (out.float() - y).square().mean()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    return float(loss.detach())

                for _ in range(warmup):
                    step()
                _reset_peak(dev)
                t0 = time.perf_counter()
                for _ in range(steps):
                    step()
                _sync(dev)
                rate = steps / (time.perf_counter() - t0)
                print(f"{label:<20}{batch:>6}{precision:>10}{rate:>9.1f}{rate * batch * crop * crop / 1e6:>8.1f}"
                      f"{_peak(dev):>10}", flush=True)


def _inference(dev, size: int, tile: int | None, batch_list, repeats: int) -> None:
    import torch

    from napari_coordgate.engine import plan_tiles, predict
    from napari_coordgate.model_io import SavedModel
    from napari_coordgate.samples.specimens import procedural_specimen

    base = procedural_specimen((256, 256), seed=0)
    reps = -(-size // 256)
    img = np.tile(base, (reps, reps))[:size, :size].astype(np.float32)
    img = (img - img.min()) / np.ptp(img)
    print(f"\n## Inference, engine.predict on one {size}x{size} plane, mean of {repeats} after a warm-up", flush=True)
    print(f"{'model':<20}{'precision':>10}  {'tiling':<28}{'batch':>6}{'MP/s':>9}{'max|d|':>10}{'peak GiB':>10}",
          flush=True)
    for label, gate in GATES:
        cfg, model = _model(gate, dev)
        saved = SavedModel(model.eval(), cfg, (size, size), {"offset": 0.0, "scale": 1.0})
        tiles = plan_tiles((size, size), cfg, tile)
        (y0, y1, x0, x1), (wy0, wy1, wx0, wx1) = tiles[len(tiles) // 2]
        tiled = f"{len(tiles)} tiles, core {y1 - y0}, window {wy1 - wy0}"
        variants = [(tiled, tile, b) for b in batch_list] + [("one whole-image window", 1 << 20, 1)]
        reference = predict(saved, img, tile=tile, device=str(dev))
        for precision in PRECISIONS:
            for name, t, b in variants:
                kw = dict(tile=t, device=str(dev), precision=precision, batch_tiles=b)
                predict(saved, img, **kw)  # warm-up: gates, allocator, kernel selection
                _reset_peak(dev)
                t0 = time.perf_counter()
                for _ in range(repeats):
                    out = predict(saved, img, **kw)
                _sync(dev)
                secs = (time.perf_counter() - t0) / repeats
                diff = float(np.abs(out - reference).max())
                print(f"{label:<20}{precision:>10}  {name:<28}{b:>6}{size * size / 1e6 / secs:>9.2f}{diff:>10.1e}"
                      f"{_peak(dev):>10}", flush=True)
        del saved, model
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cuda, cuda:1, cpu, ...")
    ap.add_argument("--quick", action="store_true", help="tiny sizes on the CPU, for the test suite")
    ap.add_argument("--size", type=int, default=2048, help="side of the predicted plane (default 2048)")
    ap.add_argument("--train-steps", type=int, default=50, help="timed training steps per row (default 50)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; --quick: 1)")
    args = ap.parse_args()

    import torch

    from napari_coordgate.engine import resolve_device

    if args.quick:
        dev = torch.device("cpu") if args.device == "auto" else resolve_device(args.device)
        size, tile, batch_list, repeats = 192, 32, (1, 16), 1
        field, crop, batches, steps, warmup = 128, 32, (4, 8), 2, 1
    else:
        dev = resolve_device(args.device)
        size, tile, batch_list, repeats = args.size, None, (1, 16, 64), 5
        field, crop, batches, steps, warmup = 512, 128, (8, 64), args.train_steps, 5
    threads = args.threads if args.threads is not None else (1 if args.quick else None)
    if threads is not None:
        torch.set_num_threads(threads)
    if dev.type == "cuda":
        name = f"{torch.cuda.get_device_name(dev)} (CUDA {torch.version.cuda}, cuDNN TF32 convolutions " \
               f"{'on' if torch.backends.cudnn.allow_tf32 else 'off'})"
    else:
        name = f"{dev.type.upper() if dev.type != 'cpu' else _cpu_name()}, {torch.get_num_threads()} torch thread(s)"
    print(f"# bench_gpu: {name}, torch {torch.__version__}", flush=True)
    t0 = time.perf_counter()
    _training(dev, field, crop, batches, steps, warmup)
    _inference(dev, size, tile, batch_list, repeats)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
