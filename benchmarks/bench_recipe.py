"""Training-recipe benchmark: CoordGate vs plain U-Net vs SV-RL on a fixed held-out set.

A fixed synthetic calibration set (``--fields`` sharp fields from bundled and procedural specimens, blurred with a
PSF preset and camera noise once, as a calibration slide would be) trains each recipe for the same budget; scores
are on held-out fields whose specimens are never used in training (procedural seeds apart, ``moon`` and
``hubble_deep_field``). Every setting runs for several seeds; the table gives mean and spread.

    python benchmarks/bench_recipe.py --steps 600 --seeds 0 1 2                 # fixed step budget
    python benchmarks/bench_recipe.py --minutes 10 --seeds 0 1 2                # wall-clock budget (idle machine!)
    python benchmarks/bench_recipe.py --quick                                   # < 2 minutes, smoke test

Recipes are named in RECIPES below (model / training config changes against the defaults). Prints tables only.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

# Every recipe spells out the training settings it was measured with, so the commands quoted in
# benchmarks/README.md reproduce their rows whatever the current TrainConfig defaults are.
_FIRST = {"loss": "l1", "lr": 1e-3, "sampling": "uniform", "gate_lr_scale": 1.0}  # the starting recipe
_L2 = {"loss": "l2", "lr": 3e-3, "sampling": "uniform", "gate_lr_scale": 1.0}
_COVER = {**_L2, "sampling": "cover"}
_WIENER3 = {"prefilter": "wiener", "prefilter_grid": 3}

RECIPES: dict[str, tuple[dict, dict]] = {
    # name: (ModelConfig changes, TrainConfig changes)
    "plain": ({"gate": "none"}, _FIRST),
    "coordgate": ({"gate": "coordgate"}, _FIRST),
    "coordconv": ({"gate": "coordconv"}, _FIRST),
    "plain-lr3e-3": ({"gate": "none"}, {**_FIRST, "lr": 3e-3}),
    "coordgate-lr3e-3": ({"gate": "coordgate"}, {**_FIRST, "lr": 3e-3}),
    "plain-crop64": ({"gate": "none"}, {**_FIRST, "crop": 64, "batch": 16}),
    "coordgate-crop64": ({"gate": "coordgate"}, {**_FIRST, "crop": 64, "batch": 16}),
    "coordgate-sigmoid": ({"gate": "coordgate", "gate_activation": "sigmoid"}, _FIRST),
    "plain-l2": ({"gate": "none"}, {**_FIRST, "loss": "l2"}),
    "coordgate-l2": ({"gate": "coordgate"}, {**_FIRST, "loss": "l2"}),
    "plain-l2-lr3e-3": ({"gate": "none"}, _L2),
    "coordgate-l2-lr3e-3": ({"gate": "coordgate"}, _L2),
    # crop centres uniform over the field: the border and corners are in a crop far more often
    "plain-cover": ({"gate": "none"}, _COVER),
    "coordgate-cover": ({"gate": "coordgate"}, _COVER),
    # the coordinate MLPs learn faster than the convolutions
    "coordgate-gatelr10": ({"gate": "coordgate"}, {**_L2, "gate_lr_scale": 10.0}),
    "coordgate-cover-gatelr3": ({"gate": "coordgate"}, {**_COVER, "gate_lr_scale": 3.0}),
    "coordgate-cover-gatelr10": ({"gate": "coordgate"}, {**_COVER, "gate_lr_scale": 10.0}),
    # MultiWienerNet-style first stage: Wiener filters of the PSF model's PSFs on a K x K grid (needs the PSF model)
    "plain-wiener3": ({"gate": "none", **_WIENER3}, _L2),
    "coordgate-wiener3": ({"gate": "coordgate", **_WIENER3}, _L2),
    "plain-wiener5": ({"gate": "none", "prefilter": "wiener", "prefilter_grid": 5}, _L2),
    "coordgate-wiener5": ({"gate": "coordgate", "prefilter": "wiener", "prefilter_grid": 5}, _L2),
    # float32 training on a CPU with bf16 instructions, where the default (amp) trains under bfloat16 autocast
    "plain-fp32": ({"gate": "none"}, {"amp": False}),
    "coordgate-fp32": ({"gate": "coordgate"}, {"amp": False}),
    # whatever the current defaults of napari-coordgate train are
    "plain-default": ({"gate": "none"}, {}),
    "coordgate-default": ({"gate": "coordgate"}, {}),
}
TEST_SOURCES = ("procedural", "moon", "procedural", "hubble_deep_field")
TUNE_SOURCES = ("retina",)


def build_benchmark(preset: str, n_fields: int, field: int, photons: float, seed: int = 1234):
    from napari_coordgate.optics.blur import SpatiallyVaryingBlur, add_noise
    from napari_coordgate.samples.specimens import TRAIN_SOURCES, specimen_fields

    shape = (field, field)
    op = SpatiallyVaryingBlur(preset, shape)
    train_sharp = specimen_fields(n_fields, shape, seed=seed, sources=TRAIN_SOURCES)
    test_sharp = specimen_fields(len(TEST_SOURCES), shape, seed=seed + 1, sources=TEST_SOURCES)
    tune_sharp = specimen_fields(1, shape, seed=seed + 2, sources=TUNE_SOURCES)
    blur = lambda s, k: add_noise(op.forward(s), photons=photons, seed=seed + k)  # noqa: E731
    return (op, (train_sharp, blur(train_sharp, 10)), (test_sharp, blur(test_sharp, 11)),
            (tune_sharp, blur(tune_sharp, 12)))


def _ring_row(gt, img):
    from napari_coordgate.metrics import psnr, ring_psnr

    rings = {d["name"]: d["psnr"] for d in ring_psnr(gt, img)}
    return {"psnr": psnr(gt, img), **rings}


def dataset_arguments(ap: argparse.ArgumentParser) -> None:
    """The fixed benchmark's options (shared with bench_sweep.py)."""
    ap.add_argument("--preset", default="edge_defocus_astigmatism")
    ap.add_argument("--fields", type=int, default=32)
    ap.add_argument("--field", type=int, default=256)
    ap.add_argument("--photons", type=float, default=1000.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    dataset_arguments(ap)
    ap.add_argument("--steps", type=int, default=600, help="optimiser steps per model (ignored with --minutes)")
    ap.add_argument("--minutes", type=float, default=0.0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--recipes", nargs="+", default=["plain-default", "coordgate-default"], choices=sorted(RECIPES))
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--channels", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.fields, args.field, args.steps, args.minutes, args.seeds = 4, 96, 20, 0.0, [0]

    import torch

    from napari_coordgate.config import ModelConfig, TrainConfig
    from napari_coordgate.engine import PairSource, predict, train
    from napari_coordgate.metrics import psnr
    from napari_coordgate.optics.deconv import sv_richardson_lucy

    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    op, (tr_s, tr_b), (te_s, te_b), (tu_s, tu_b) = build_benchmark(args.preset, args.fields, args.field, args.photons)
    budget = f"{args.minutes:g} min" if args.minutes else f"{args.steps} steps"
    print(f"# Recipe benchmark: preset {args.preset}, {args.fields} calibration fields {args.field}^2, "
          f"{args.photons:g} photons, U-Net({args.depth}) base {args.channels}, budget {budget} per model, "
          f"{args.threads} thread(s), seeds {args.seeds}")

    rows = [("blurred", [_ring_row(te_s, te_b)], None)]
    its = max((5, 10, 20, 40), key=lambda n: psnr(tu_s, sv_richardson_lucy(tu_b, op, n)))
    rows.append((f"SV-RL true PSFs ({its} it)", [_ring_row(te_s, sv_richardson_lucy(te_b, op, its))], None))

    for name in args.recipes:
        mchange, tchange = RECIPES[name]
        results, secs = [], []
        for seed in args.seeds:
            mcfg = ModelConfig(depth=args.depth, channels=args.channels, **mchange)
            steps_per_epoch = max(1, min(50, args.steps // 4 or 1))
            budget_kw = ({"minutes": args.minutes, "epochs": 0} if args.minutes
                         else {"epochs": max(1, args.steps // steps_per_epoch), "minutes": 0.0})
            tcfg = TrainConfig(seed=seed, device="cpu", threads=args.threads, steps_per_epoch=steps_per_epoch,
                               **{**budget_kw, **tchange})
            t0 = time.perf_counter()
            # the pairs come with their PSF model; only models with a Wiener first stage use it
            res = train(mcfg, tcfg, PairSource(tr_s, tr_b, psf=args.preset))
            secs.append(time.perf_counter() - t0)
            out = predict(res.saved, te_b, device="cpu")
            results.append(_ring_row(te_s, out))
        rows.append((name, results, float(np.mean(secs))))

    ref = {k: np.mean([r[k] for r in rows[1][1]]) for k in ("psnr", "centre", "middle", "edge")}
    print(f"\n{'method':<26}{'PSNR':>14}{'centre':>9}{'middle':>9}{'edge':>9}{'vs SV-RL':>10}{'edge vs':>9}"
          f"{'s/model':>9}")
    for name, res, sec in rows:
        mean = {k: float(np.mean([r[k] for r in res])) for k in ("psnr", "centre", "middle", "edge")}
        spread = float(np.std([r["psnr"] for r in res])) if len(res) > 1 else 0.0
        print(f"{name:<26}{mean['psnr']:>8.2f} ±{spread:>4.2f}{mean['centre']:>9.2f}{mean['middle']:>9.2f}"
              f"{mean['edge']:>9.2f}{mean['psnr'] - ref['psnr']:>+10.2f}{mean['edge'] - ref['edge']:>+9.2f}"
              f"{'' if sec is None else f'{sec:9.0f}'}")
    print(f"\n(total {time.perf_counter() - t_all:.0f} s)")


if __name__ == "__main__":
    main()
