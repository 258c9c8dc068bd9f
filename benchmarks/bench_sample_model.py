"""PSNR of the shipped sample model (or ``--model PATH``) on images it never saw, blurred by its optics: the crops
and noise seeds of ``tests/samples/test_sample_model.py`` (which asserts output >= input on each), and the sample
pair itself.

    python benchmarks/bench_sample_model.py                 # the shipped model
    python benchmarks/bench_sample_model.py --model M.cgmodel
    python benchmarks/bench_sample_model.py --quick         # the first two crops and the pair

Prints a table only.
"""

from __future__ import annotations

import argparse

import numpy as np


def main(argv=None) -> None:
    from napari_coordgate.engine import predict
    from napari_coordgate.metrics import psnr
    from napari_coordgate.model_io import load_model
    from napari_coordgate.samples.sample_data import calibration_pair
    from napari_coordgate.samples.sample_model import HELD_OUT, held_out_pair, sample_model_path

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a .cgmodel of the sample optics (default: the shipped one)")
    parser.add_argument("--quick", action="store_true", help="two crops and the pair")
    args = parser.parse_args(argv)
    saved = load_model(args.model or sample_model_path())
    (sharp, _, _), (blurred, _, _) = calibration_pair()
    cases = [(f"{name}, crop {crop}", *held_out_pair(name, crop)) for name, crop in HELD_OUT[: 2 if args.quick
                                                                                               else None]]
    cases.append(("the sample pair", sharp, blurred))
    print(f"the sample model ({args.model or 'shipped'}): PSNR (dB) against the sharp image, data range its ptp")
    print(f"{'image':<28}{'input':>8}{'model':>8}{'gain':>8}")
    for name, s, b in cases:
        rng = float(np.ptp(s))
        before, after = psnr(s, b, data_range=rng), psnr(s, predict(saved, b, device="cpu"), data_range=rng)
        print(f"{name:<28}{before:>8.2f}{after:>8.2f}{after - before:>+8.2f}")


if __name__ == "__main__":
    main()
