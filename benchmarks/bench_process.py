"""What training in a separate process costs: time to the first training step, and the caller's memory.

The dock trains through ``napari_coordgate.runners.isolate.train_isolated`` (a fresh Python process, arrays passed as
memory-mapped files). This prints, for the 256 x 256 sample pair and the dock's default network:

- seconds from the call to the first training step's report, in a separate process and in this process
  (``engine.train``; this process has torch imported already, as the viewer has after any Apply);
- the caller's peak resident memory above its baseline while the job starts, for a calibration stack of
  ``--planes`` x ``--size``^2 float32 planes (a second full copy would show as its size).

    python benchmarks/bench_process.py [--repeats 3] [--planes 16] [--size 1024] [--quick]
"""

from __future__ import annotations

import argparse
import threading
import time

import numpy as np


def _first_step_seconds(run) -> float:
    t0 = time.perf_counter()
    first = []

    def report(u):
        if not first and u.kind == "step":
            first.append(time.perf_counter() - t0)

    run(report, lambda: bool(first))  # stop as soon as the first step is reported
    return first[0]


def _peak_rss_during(fn, interval: float = 0.005) -> tuple[float, float]:
    """(baseline, peak) resident memory of this process in MiB while ``fn()`` runs."""
    import psutil

    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(interval)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    return base / 2**20, peak[0] / 2**20


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--planes", type=int, default=16)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--quick", action="store_true", help="1 repeat, a 2 x 128^2 stack (for the test suite)")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats, args.planes, args.size = 1, 2, 128

    import torch  # noqa: F401 - the viewer has torch loaded after any Apply; measure from that state

    from napari_coordgate import engine
    from napari_coordgate.config import ModelConfig, TrainConfig
    from napari_coordgate.runners import isolate
    from napari_coordgate.samples.sample_data import calibration_pair

    (sharp, _, _), (blurred, _, _) = calibration_pair()
    model_cfg, train_cfg = ModelConfig(), TrainConfig(epochs=1, steps_per_epoch=50, device="cpu")
    source = engine.PairSource(sharp, blurred)

    def in_process(report, stop):
        engine.train(model_cfg, train_cfg, source, on_update=report, should_stop=stop)

    def separate(report, stop):
        isolate.train_isolated(model_cfg, train_cfg, source, report=report, should_stop=stop)

    print("## Seconds from the call to the first training step (256^2 sample pair, U-Net(2) CoordGate, CPU)")
    print(f"{'where':<22}{'min':>8}{'median':>8}{'max':>8}")
    for name, run in (("this process", in_process), ("separate process", separate)):
        times = [_first_step_seconds(run) for _ in range(args.repeats)]
        print(f"{name:<22}{min(times):8.2f}{float(np.median(times)):8.2f}{max(times):8.2f}", flush=True)

    rng = np.random.default_rng(0)
    stack = rng.random((args.planes, args.size, args.size), dtype=np.float32) + 0.1
    blurred_stack = stack * 0.5 + 0.05
    mib = stack.nbytes / 2**20
    big = engine.PairSource(stack, blurred_stack)

    def start_and_stop():  # until the first training step on the big stack, then stop
        _first_step_seconds(lambda report, stop: isolate.train_isolated(model_cfg, train_cfg, big, report=report,
                                                                         should_stop=stop))

    base, peak = _peak_rss_during(start_and_stop)
    print(f"\n## Caller's memory while a {args.planes} x {args.size}^2 float32 pair stack ({2 * mib:.0f} MiB) "
          "goes to the training process")
    print(f"baseline {base:.0f} MiB, peak {peak:.0f} MiB: +{peak - base:.0f} MiB "
          f"({(peak - base) / (2 * mib):.2f} of the data's size)")


if __name__ == "__main__":
    main()
