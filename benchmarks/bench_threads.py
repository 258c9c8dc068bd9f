"""Seconds per training step of U-Net(2) (batch 8, 128^2 crops, base 16) for 1 and 2 torch threads.

    python benchmarks/bench_threads.py           # 10 timed steps per setting
    python benchmarks/bench_threads.py --quick   # 2 timed steps
    python benchmarks/bench_threads.py --compile # also torch.compile'd steps (inductor; warm-up seconds printed)
    python benchmarks/bench_threads.py --bf16    # also steps under bfloat16 autocast (training's default on CPUs
                                                 # with AVX512-BF16 or AMX, devices.bf16_is_fast)

Each thread count runs in a fresh process (torch's thread pool is fixed once used). Prints a table only. The model
is laid out as training lays it out (``devices.on_device``); run the script with ``PYTHONPATH=<old checkout>/src``
to time an older version's training step on the same machine.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time


def _child(threads: int, gate: str, steps: int, mode: str = "eager") -> tuple[float, float]:
    """(seconds per step, seconds of the two warm-up steps: compilation included for ``mode="compile"``);
    ``mode="bf16"``: the forward pass under bfloat16 autocast, as training runs it where that is faster."""
    import torch

    from napari_coordgate.config import ModelConfig
    from napari_coordgate.nn import build_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(ModelConfig(depth=2, channels=16, gate=gate))
    try:  # the layout training uses on this device (channels-last on a CPU); older versions had none
        from napari_coordgate.devices import on_device

        model = on_device(model, torch.device("cpu"))
    except ImportError:
        pass
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    fwd = torch.compile(model) if mode == "compile" else model
    x = torch.rand(8, 1, 128, 128)
    offs = torch.randint(0, 16, (8, 2)) * 2
    t_start = time.perf_counter()
    for i in range(steps + 2):
        if i == 2:  # two warm-up steps
            t0 = time.perf_counter()
            warm = t0 - t_start
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16"):
            out = fwd(x, offset=offs, field_shape=(256, 256))
        loss = (out.float() - x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (time.perf_counter() - t0) / steps, warm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd training steps")
    ap.add_argument("--bf16", action="store_true", help="also time steps under bfloat16 autocast")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(*_child(int(args.child[0]), args.child[1], int(args.child[2]), args.child[3]))
        return
    steps = 2 if args.quick else 10
    modes = ("eager",) + (("compile",) if args.compile else ()) + (("bf16",) if args.bf16 else ())
    print(f"{'gate':<12}{'mode':<9}{'threads':>8}{'s/step':>9}{'warm-up s':>11}")
    for gate in ("none", "coordgate"):
        for mode in modes:
            for threads in (1, 2):
                out = subprocess.run([sys.executable, __file__, "--child", str(threads), gate, str(steps), mode],
                                     capture_output=True, text=True, check=True).stdout
                per, warm = (float(v) for v in out.strip().splitlines()[-1].split())
                print(f"{gate:<12}{mode:<9}{threads:>8}{per:>9.3f}{warm:>11.1f}", flush=True)


if __name__ == "__main__":
    main()
