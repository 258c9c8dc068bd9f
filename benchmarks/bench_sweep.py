"""The paper's 2-D depth sweep (Howard et al., arXiv:2401.04680, section IV.2 / Fig. 4b) at an equal budget.

One fixed synthetic dataset (the recipe benchmark's: ``--fields`` calibration fields of bundled and procedural
specimens, blurred once with a PSF preset and camera noise; held-out test specimens never used in training),
then every model trains for the same wall-clock budget on one torch thread, ``--jobs`` models side by side:

- U-Net(2..6) without position information (CARE-style),
- CoordGate U-Net(2) and (6), CoordConv U-Net(6),
- MultiWienerNet-style: a fixed first stage of Wiener filters for the PSFs on a 3 x 3 grid of the field, then a
  U-Net(2), without and with CoordGate,
- classical baselines with the PSF model: Richardson-Lucy with the central PSF, spatially varying RL.

Prints a table (parameters, PSNR/SSIM overall and PSNR by field ring, optimiser steps, inference MP/s on a
1024^2 image with ``--threads`` threads after training) and writes a plot (parameters vs PSNR) to ``--png``.

    python benchmarks/bench_sweep.py --minutes 3                  # benchmarks/README.md (about 20 min on 2 cores)
    python benchmarks/bench_sweep.py --quick                      # < 2 minutes, smoke test
    python benchmarks/bench_sweep.py --device cuda --jobs 1 --steps 1500   # on a GPU, equal steps per model
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_recipe import build_benchmark, dataset_arguments

# name: ModelConfig fields
MODELS: dict[str, dict] = {
    "U-Net(2)": {"depth": 2, "gate": "none"},
    "U-Net(3)": {"depth": 3, "gate": "none"},
    "U-Net(4)": {"depth": 4, "gate": "none"},
    "U-Net(5)": {"depth": 5, "gate": "none"},
    "U-Net(6)": {"depth": 6, "gate": "none"},
    "CoordGate U-Net(2)": {"depth": 2, "gate": "coordgate"},
    "CoordGate U-Net(6)": {"depth": 6, "gate": "coordgate"},
    "CoordConv U-Net(6)": {"depth": 6, "gate": "coordconv"},
    "MultiWiener(3x3) U-Net(2)": {"depth": 2, "gate": "none", "prefilter": "wiener", "prefilter_grid": 3},
    "MultiWiener(3x3) CoordGate U-Net(2)": {"depth": 2, "gate": "coordgate", "prefilter": "wiener",
                                            "prefilter_grid": 3},
}
QUICK_MODELS = ("U-Net(2)", "U-Net(3)", "CoordGate U-Net(2)", "MultiWiener(3x3) CoordGate U-Net(2)")


def _train_one(job: dict) -> dict:
    """Worker: train one model on the shared dataset file, save it, score it on the test set."""
    import torch

    from napari_coordgate.config import ModelConfig, TrainConfig
    from napari_coordgate.engine import PairSource, predict, train
    from napari_coordgate.metrics import quality_report
    from napari_coordgate.model_io import save_model
    from napari_coordgate.nn import count_parameters

    torch.set_num_threads(1)
    data = np.load(job["data"])
    mcfg = ModelConfig(channels=job["channels"], **MODELS[job["name"]])
    budget = ({"minutes": job["minutes"], "epochs": 0} if job["minutes"]
              else {"epochs": max(1, job["steps"] // 10), "steps_per_epoch": min(10, job["steps"]), "minutes": 0.0})
    tcfg = TrainConfig(seed=job["seed"], device=job["device"], threads=1, **budget)
    t0 = time.perf_counter()
    res = train(mcfg, tcfg, PairSource(data["train_sharp"], data["train_blurred"], psf=job["preset"]))
    secs = time.perf_counter() - t0
    out = predict(res.saved, data["test_blurred"], device=job["device"])
    rep = quality_report(data["test_sharp"], out)
    path = save_model(Path(job["outdir"]) / f"model{job['index']}", res.saved)
    return {"name": job["name"], "params": count_parameters(res.saved.model), "psnr": rep["psnr"],
            "ssim": rep["ssim"], "rings": {d["name"]: d["psnr"] for d in rep["psnr_by_ring"]},
            "steps": res.saved.provenance["training"]["steps"], "seconds": secs, "model": str(path)}


def _throughput(model_path: str, size: int, threads: int, device: str = "cpu") -> float:
    import torch

    from napari_coordgate.engine import predict
    from napari_coordgate.model_io import load_model
    from napari_coordgate.samples.specimens import procedural_specimen

    torch.set_num_threads(threads)
    saved = load_model(model_path)
    fh, fw = saved.field_shape
    img = procedural_specimen((size, size), seed=0).astype(np.float32)
    # the test field is small; time a size x size image as a region of a field that large
    saved.field_shape = (max(fh, size), max(fw, size))
    predict(saved, img, device=device)  # warm-up: gate caches, allocator
    t0 = time.perf_counter()
    predict(saved, img, device=device)  # returns a numpy array: the GPU work is finished when it returns
    return size * size / 1e6 / (time.perf_counter() - t0)


def _plot(rows: list[dict], classical: list[dict], path: Path, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), dpi=90)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for ax, key, label in ((axes[0], None, "PSNR, whole field (dB)"), (axes[1], "edge", "PSNR, edge ring r >= 1 (dB)")):
        for r in rows:
            y = r["psnr"] if key is None else r["rings"][key]
            gate = "CoordGate" in r["name"]
            kind = "^" if "CoordConv" in r["name"] else "x"
            marker = "s" if "MultiWiener" in r["name"] else ("o" if gate else kind)
            ax.scatter(r["params"], y, marker=marker, color="tab:red" if gate else "tab:blue")
            ax.annotate(r["name"].replace(" U-Net", "\nU-Net"), (r["params"], y), fontsize=6,
                        textcoords="offset points", xytext=(4, 2))
        for c, style in zip(classical, ("--", ":", "-.")):
            y = c["psnr"] if key is None else c["rings"][key]
            ax.axhline(y, linestyle=style, color="gray", linewidth=1, label=c["name"])
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel(label)
        ax.legend(fontsize=7, loc="lower right")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    dataset_arguments(ap)
    ap.add_argument("--minutes", type=float, default=3.0, help="wall-clock training budget per model")
    ap.add_argument("--steps", type=int, default=0, help="fixed step budget instead of minutes")
    ap.add_argument("--channels", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2, help="models trained side by side, one torch thread each")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the inference timing")
    ap.add_argument("--mp-size", type=int, default=1024, help="image side for the inference timing")
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    ap.add_argument("--png", default="docs/sweep.png")
    ap.add_argument("--device", default="cpu", help="training and inference device (cuda: use --jobs 1)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.fields, args.field, args.minutes, args.steps, args.models = 4, 96, 0.0, 10, list(QUICK_MODELS)
        args.mp_size, args.png = 256, str(Path(tempfile.gettempdir()) / "coordgate_sweep_quick.png")
    if args.steps:
        args.minutes = 0.0

    from napari_coordgate.metrics import quality_report
    from napari_coordgate.optics.deconv import richardson_lucy_central, sv_richardson_lucy

    t_all = time.perf_counter()
    op, (tr_s, tr_b), (te_s, te_b), (tu_s, tu_b) = build_benchmark(args.preset, args.fields, args.field, args.photons)
    budget = f"{args.minutes:g} min wall" if args.minutes else f"{args.steps} steps"
    head = (f"# Depth sweep: preset {args.preset}, {args.fields} calibration fields {args.field}^2, "
            f"{args.photons:g} photons, base {args.channels} channels, budget {budget} per model "
            f"(1 torch thread, {args.jobs} model(s) side by side, device {args.device}), seed {args.seed}")
    print(head, flush=True)

    def scored(name, img, secs):
        rep = quality_report(te_s, img)
        return {"name": name, "psnr": rep["psnr"], "ssim": rep["ssim"],
                "rings": {d["name"]: d["psnr"] for d in rep["psnr_by_ring"]},
                "mp_s": te_s.size / 1e6 / secs if secs else None}

    from napari_coordgate.metrics import psnr

    classical = [scored("blurred", te_b, None)]
    n_rl = max((5, 10, 20, 40), key=lambda n: psnr(tu_s, richardson_lucy_central(tu_b, args.preset, n)))
    t0 = time.perf_counter()
    classical.append(scored(f"RL-central ({n_rl} it)", richardson_lucy_central(te_b, args.preset, n_rl),
                            time.perf_counter() - t0))
    n_sv = max((5, 10, 20, 40), key=lambda n: psnr(tu_s, sv_richardson_lucy(tu_b, op, n)))
    t0 = time.perf_counter()
    classical.append(scored(f"SV-RL ({n_sv} it)", sv_richardson_lucy(te_b, op, n_sv), time.perf_counter() - t0))

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data.npz"
        np.savez(data, train_sharp=tr_s, train_blurred=tr_b, test_sharp=te_s, test_blurred=te_b)
        jobs = [{"name": n, "index": i, "data": str(data), "outdir": tmp, "channels": args.channels,
                 "minutes": args.minutes, "steps": args.steps, "seed": args.seed, "preset": args.preset,
                 "device": args.device}
                for i, n in enumerate(args.models)]
        # deepest first, so the slowest models do not end up alone at the end
        jobs.sort(key=lambda j: -MODELS[j["name"]]["depth"])
        rows = []
        with mp.get_context("spawn").Pool(args.jobs) as pool:
            # each model's scores are printed as soon as it is done, so a long run never loses finished rows
            for r in pool.imap_unordered(_train_one, jobs, chunksize=1):
                rows.append(r)
                print(f"done: {r['name']}: {r['params']:,} params, PSNR {r['psnr']:.2f}, "
                      f"edge {r['rings']['edge']:.2f}, {r['steps']} steps", flush=True)
        rows.sort(key=lambda r: args.models.index(r["name"]))
        for r in rows:
            r["mp_s"] = _throughput(r["model"], args.mp_size, args.threads, args.device)

    print(f"\n{'method':<38}{'params':>11}{'PSNR':>8}{'SSIM':>7}{'centre':>8}{'middle':>8}{'edge':>8}"
          f"{'steps':>7}{'MP/s':>7}")
    for r in classical + rows:
        params = f"{r['params']:,}" if "params" in r else "-"
        steps = str(r["steps"]) if "steps" in r else "-"
        mps = f"{r['mp_s']:.2f}" if r.get("mp_s") else "-"
        print(f"{r['name']:<38}{params:>11}{r['psnr']:>8.2f}{r['ssim']:>7.3f}{r['rings']['centre']:>8.2f}"
              f"{r['rings']['middle']:>8.2f}{r['rings']['edge']:>8.2f}{steps:>7}{mps:>7}")
    print(f"(MP/s: model inference on a {args.mp_size}^2 image, {args.threads} thread(s), after training; "
          f"classical methods on the test fields)")
    _plot(rows, classical, Path(args.png), head.lstrip("# "))
    print(f"plot: {args.png}  (total {time.perf_counter() - t_all:.0f} s)")


if __name__ == "__main__":
    main()
