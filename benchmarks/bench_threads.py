"""Seconds per training step of U-Net(2) (batch 8, 128^2 crops, base 16) for 1 and 2 torch threads.

    python benchmarks/bench_threads.py           # 10 timed steps per setting
    python benchmarks/bench_threads.py --quick   # 2 timed steps

Each thread count runs in a fresh process (torch's thread pool is fixed once used). Prints a table only.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time


def _child(threads: int, gate: str, steps: int) -> float:
    import torch

    from napari_coordgate.config import ModelConfig
    from napari_coordgate.nn import build_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(ModelConfig(depth=2, channels=16, gate=gate))
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x = torch.rand(8, 1, 128, 128)
    offs = torch.randint(0, 16, (8, 2)) * 2
    for i in range(steps + 2):
        if i == 2:  # two warm-up steps
            t0 = time.perf_counter()
        loss = (model(x, offset=offs, field_shape=(256, 256)) - x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(_child(int(args.child[0]), args.child[1], int(args.child[2])))
        return
    steps = 2 if args.quick else 10
    print(f"{'gate':<12}{'threads':>8}{'s/step':>9}")
    for gate in ("none", "coordgate"):
        for threads in (1, 2):
            out = subprocess.run([sys.executable, __file__, "--child", str(threads), gate, str(steps)],
                                 capture_output=True, text=True, check=True).stdout
            print(f"{gate:<12}{threads:>8}{float(out.strip().splitlines()[-1]):>9.3f}")


if __name__ == "__main__":
    main()
