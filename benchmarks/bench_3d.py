"""3-D deconvolution of z-stacks (issue 24): a 3-D CoordGate U-Net against the classical and learned baselines.

Optics: the 3-D pupil preset ``tilted_curved_3d`` (NA 0.8 dry, 520 nm, 0.13 µm pixels, 0.25 µm z-step; the best
focus tilts across the field and curves toward the corners, with radial astigmatism and coma growing toward the
edge): the same z-plane is in focus in the centre and 2-4 planes out of focus in the corners. Specimens: procedural
volumes (``samples.volumes``: nuclei, filaments, puncta, mixed) of 64 x 256 x 256 voxels, in physical units. Blurred
with the true 3-D PSFs (``SpatiallyVaryingBlur3D``) and camera noise (1000 photons at each volume's brightest voxel,
read noise 2 e-).

Rows, each scored on the same test volumes (never trained or tuned on):

- ``blurred``: the input;
- ``3-D RL central PSF`` and ``3-D SV-RL true PSFs``: Richardson-Lucy with the central 3-D PSF, and spatially varying
  RL with the true PSF model; the iteration count chosen on a separate tuning volume (never the test ones), scored
  after every iteration of one run that goes on until 25 iterations bring no gain (at most 2000);
- ``2-D CoordGate per plane``: a 2-D CoordGate U-Net trained for the same budget on the planes of the same training
  volumes (sharp plane, blurred plane), applied plane by plane;
- ``3-D plain U-Net`` and ``3-D CoordGate``: 3-D U-Nets of the same size trained for the same budget from the same
  volumes (fresh noise every epoch; validated on a held-out volume of each kind: nuclei, filaments, puncta);
- ``3-D CoordGate, N-bead calibration`` (``--calibrated N``, issue 25): the same 3-D CoordGate, same volumes, seed
  and budget, trained from the PSF model that ``calibrate_zstack`` measured on a bead slide imaged through focus
  (41 planes of 1024 x 1024, N beads, 3000 photons, each bead the exact pupil PSF of its own field position from a
  4x finer axial grid, as ``bench_calibrate3d.py`` renders them, but cut to the preset's own 17 x 25² box around
  the emitter, so the beads carry exactly the light the test volumes are blurred with; ``--bead-diameter`` renders
  beads as spheres and divides them out) instead of the true one; its validation volume is blurred by the
  calibrated model too. The test volumes are the same (blurred by the true optics).

Printed: PSNR / SSIM overall, PSNR by ring (centre, middle, edge) and by depth (8 slabs of 8 planes), mean over the
test volumes (and over seeds), with the CPU minutes and threads of each model; and the 3-D CoordGate's inference
speed (MVoxel/s, fp32 and bf16).

Usage::

    python benchmarks/bench_3d.py --threads 2                 # 10 minutes per model, 1 seed (about 40 minutes)
    python benchmarks/bench_3d.py --minutes 10 --seeds 0 1 2  # 3 seeds
    python benchmarks/bench_3d.py --rows coordgate --calibrated 300 --epochs 22 --seeds 0 1 2   # issue 25's figure
    python benchmarks/bench_3d.py --rows coordgate --minutes 20 --threads 1 --gate-lr-scale 10   # a recipe probe
    python benchmarks/bench_3d.py --quick                     # tiny, seconds (the test suite runs it)
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from napari_coordgate.config import ModelConfig, TrainConfig, z_pool_start_for
from napari_coordgate.engine import PairSource, SimulatedSource, predict, train
from napari_coordgate.metrics import psnr, quality_report
from napari_coordgate.optics.blur3d import synthesize_pairs3d
from napari_coordgate.optics.deconv3d import richardson_lucy_3d_central, sv_richardson_lucy_3d
from napari_coordgate.optics.psf3d import PRESETS_3D
from napari_coordgate.samples.beadstack import bead_zstack
from napari_coordgate.samples.volumes import VOLUME_KINDS, specimen_volumes

PHOTONS, READ_NOISE = 1000.0, 2.0
BEAD_PHOTONS = 3000.0  # a calibration bead's in-focus peak (--calibrated)
RL_MAX_ITERATIONS = 2000
ROWS = ("rl", "svrl", "2d", "plain", "coordgate")


def _volumes(args, seed: int, psf):
    """(train, val, tune, test) sharp volumes and the noisy blurred tune and test volumes of one seed."""
    shape, a = args.shape, psf.z_step_um / psf.pixel_size_um
    train_s = specimen_volumes(args.train_volumes, shape, seed=10_000 + seed, kinds=VOLUME_KINDS, anisotropy=a)
    # one held-out volume of each kind (as the CLI's built-in training): a single mixed volume's PSNR barely moves
    # while the test volumes gain 5 dB, and it kept near-untrained epochs
    val = specimen_volumes(len(VOLUME_KINDS) - 1, shape, seed=20_000 + seed, kinds=VOLUME_KINDS[1:], anisotropy=a)
    tune = specimen_volumes(1, shape, seed=30_000 + seed, anisotropy=a)
    test = specimen_volumes(args.test_volumes, shape, seed=40_000 + seed, kinds=VOLUME_KINDS[::-1], anisotropy=a)
    noise = {"photons": PHOTONS, "read_noise": READ_NOISE}
    tune_b = synthesize_pairs3d(tune, psf, seed=31_000 + seed, **noise)[1]
    test_b = synthesize_pairs3d(test, psf, seed=41_000 + seed, **noise)[1]
    return train_s, val, (tune, tune_b), (test, test_b)


def _score(sharp, restored, blurred) -> dict:
    """Mean over the test volumes of each volume's report (its own data range)."""
    reps = [quality_report(s, r, b, volumes=True) for s, r, b in zip(sharp, restored, blurred)]
    return {
        "psnr": float(np.mean([r["psnr"] for r in reps])),
        "ssim": float(np.mean([r["ssim"] for r in reps])),
        "rings": [float(np.mean([r["psnr_by_ring"][k]["psnr"] for r in reps])) for k in range(3)],
        "depth": [float(np.mean([r["psnr_by_depth"][k]["psnr"] for r in reps]))
                  for k in range(len(reps[0]["psnr_by_depth"]))],
        "blurred": float(np.mean([r["psnr_blurred"] for r in reps])),
    }


def _rl(method, tune, test_b, psf, max_iterations: int, patience: int = 25):
    """A Richardson-Lucy row: the iteration count chosen on the tuning volume (one run scored after every iteration,
    until ``patience`` iterations pass without a better PSNR, at most ``max_iterations``), then the test volumes."""
    t0 = time.perf_counter()
    tune_s, tune_b = tune
    lo = float(tune_b[0].min())
    scores: dict[int, float] = {}

    def score(done, estimate):
        scores[done] = psnr(tune_s[0], estimate + lo)

    def past_the_peak() -> bool:
        return bool(scores) and len(scores) - max(scores, key=scores.get) >= patience

    method(tune_b[0] - lo, psf, iterations=max_iterations, on_estimate=score, should_stop=past_the_peak)
    best = max(scores, key=scores.get)
    out = np.stack([method(v - float(v.min()), psf, iterations=best) + float(v.min()) for v in test_b])
    note = f"{best} it" + (" (the most tried)" if best >= max_iterations - 1 else "")
    return out, note, time.perf_counter() - t0


def _train_3d(args, gate, train_s, val, psf, seed):
    cfg = ModelConfig(ndim=3, depth=args.depth, channels=args.channels, gate=gate,
                      z_pool_start=z_pool_start_for(psf.z_step_um, psf.pixel_size_um))
    tc = TrainConfig(minutes=args.minutes, epochs=args.epochs, steps_per_epoch=args.steps, batch=args.batch,
                     crop=args.crop, crop_depth=args.crop_depth, seed=seed, threads=args.threads, photons=PHOTONS,
                     read_noise=READ_NOISE, **_recipe(args))
    return train(cfg, tc, SimulatedSource(train_s, psf, val_sharp=val))


def _recipe(args) -> dict:
    """The 3-D networks' recipe flags given (``--lr``, ``--gate-lr-scale``): the rest are TrainConfig's defaults."""
    given = {"lr": args.lr, "gate_lr_scale": args.gate_lr_scale}
    return {k: v for k, v in given.items() if v is not None}


def _train_2d_planes(args, train_s, val, psf, seed):
    """A 2-D CoordGate on the planes of the training volumes (blurred in 3-D, one noise draw) and of the
    validation volumes (the last planes: what PairSource holds out); planes without light are left out."""
    vols = np.concatenate([train_s, val])
    _, blurred = synthesize_pairs3d(vols, psf, seed=50_000 + seed, photons=PHOTONS, read_noise=READ_NOISE)
    h, w = vols.shape[-2:]
    sharp, blurred = vols.reshape(-1, h, w), blurred.reshape(-1, h, w)
    lit = np.ptp(sharp.reshape(len(sharp), -1), axis=1) > 0
    sharp, blurred = sharp[lit], blurred[lit]
    cfg = ModelConfig(depth=args.depth, channels=args.channels)
    tc = TrainConfig(minutes=args.minutes, epochs=args.epochs, steps_per_epoch=args.steps, batch=args.batch_2d,
                     crop=args.crop, seed=seed, threads=args.threads)
    with warnings.catch_warnings():  # out-of-focus planes of comatic, tilted optics look shifted: that is the blur
        warnings.filterwarnings("ignore", message="calibration pairs look misregistered")
        return train(cfg, tc, PairSource(sharp, blurred))


def _calibrated(args, beads: int, seed: int, log):
    """The PSF model ``calibrate_zstack`` measures on a rendered bead z-stack of the true optics, and a note."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_calibrate3d import PupilStack

    from napari_coordgate.calibration.zstack import calibrate_zstack
    from napari_coordgate.samples.beadstack import focus_error, psf3d_error

    # the beads carry the light the preset blurs the test volumes with (its 17 x 25^2 box), no more: the far
    # out-of-focus light the preset drops would otherwise be measured, learnt and missing from the test volumes
    preset = PRESETS_3D["tilted_curved_3d"]
    optics, (planes, size) = PupilStack(extent=(preset.psf_depth, preset.psf_size)), args.bead_stack
    pixel = optics.preset.pixel_size_um
    t0 = time.perf_counter()
    stack, _ = bead_zstack(optics, (planes, size, size), beads, photons=BEAD_PHOTONS, seed=60_000 + seed,
                           psf_size=41 if size > 512 else 31, bead_diameter_px=args.bead_diameter / 1000 / pixel,
                           z_step_px=optics.z_step_um / pixel)
    t1 = time.perf_counter()
    result = calibrate_zstack(stack, z_step_um=optics.z_step_um, pixel_size_um=pixel,
                              bead_diameter_nm=args.bead_diameter or None)
    focus = float(np.median(focus_error(result, optics, 9)))
    err = float(np.median(psf3d_error(result.model, optics, (size, size), 5)))
    log(f"  seed {seed} calibration from {beads} beads: {result.n_beads} used, best-focus error {focus:.3f} "
        f"z-steps, PSF error {err:.3f}; rendered in {t1 - t0:.0f} s, calibrated in {time.perf_counter() - t1:.0f} s")
    # the optics (a preset) vary over the normalised field whatever its size in pixels: the 1024^2 bead slide and
    # the 256^2 volumes see the same variation, so the volumes stand for the calibrated field here
    model = result.model.with_provenance({**result.model.provenance, "field_shape": list(args.shape[1:])})
    return model, f"{result.n_beads} beads used, focus err {focus:.2f}, PSF err {err:.2f}"


def _speed(saved, vol, threads: int) -> dict:
    torch.set_num_threads(threads)
    out = {}
    for precision in ("fp32", "bf16"):
        predict(saved, vol[:, :64, :64], roi=(0, 0), precision=precision)  # warm the gates and kernels
        t0 = time.perf_counter()
        predict(saved, vol, precision=precision)
        out[precision] = vol.size / 1e6 / (time.perf_counter() - t0)
    return out


def run_seed(args, seed: int, log) -> dict:
    psf = PRESETS_3D["tilted_curved_3d"]
    torch.set_num_threads(args.threads)
    train_s, val, tune, (test, test_b) = _volumes(args, seed, psf)
    rows: dict[str, dict] = {}

    def add(name, restored, minutes, note):
        rows[name] = {**_score(test, restored, test_b), "minutes": minutes, "note": note}
        log(f"  seed {seed} {name}: {rows[name]['psnr']:.2f} dB (edge {rows[name]['rings'][2]:.2f}), "
            f"{minutes:.1f} min, {note}")

    if "rl" in args.rows:
        restored, note, secs = _rl(richardson_lucy_3d_central, tune, test_b, psf, args.rl_iterations)
        add("3-D RL central PSF", restored, secs / 60, note)
    if "svrl" in args.rows:
        restored, note, secs = _rl(sv_richardson_lucy_3d, tune, test_b, psf, args.rl_iterations)
        add("3-D SV-RL true PSFs", restored, secs / 60, note)
    if "2d" in args.rows:
        res2 = _train_2d_planes(args, train_s, val, psf, seed)
        restored = predict(res2.saved, test_b.reshape(-1, *test_b.shape[-2:])).reshape(test_b.shape)
        add("2-D CoordGate per plane", restored, _minutes(res2), f"{_steps(res2)} steps")
    speed = None
    for gate, name in (("none", "3-D plain U-Net"), ("coordgate", "3-D CoordGate")):
        if {"none": "plain", "coordgate": "coordgate"}[gate] not in args.rows:
            continue
        res = _train_3d(args, gate, train_s, val, psf, seed)
        restored = predict(res.saved, test_b, z_step_um=psf.z_step_um)
        add(name, restored, _minutes(res), _run_note(res))
        if gate == "coordgate":
            speed = _speed(res.saved, test_b[0], args.threads)
    for beads in args.calibrated:
        model, note = _calibrated(args, beads, seed, log)
        res = _train_3d(args, "coordgate", train_s, val, model, seed)
        restored = predict(res.saved, test_b, z_step_um=psf.z_step_um)
        add(f"3-D CoordGate, {beads}-bead cal.", restored, _minutes(res), f"{_run_note(res)}; {note}")
    blurred = _score(test, test_b, test_b)
    log(f"seed {seed}: blurred {blurred['psnr']:.2f} dB; " + "; ".join(f"{k} {v['psnr']:.2f}" for k, v in rows.items()))
    return {"rows": rows, "speed": speed, "blurred": blurred}


def _minutes(res) -> float:
    return res.history[-1].elapsed / 60 if res.history else 0.0


def _run_note(res) -> str:
    """Steps, and the epoch whose model was kept (best validation PSNR) when it was not the last."""
    last = res.history[-1].epoch if res.history else 0
    if res.best_epoch == last:
        return f"{_steps(res)} steps"
    return f"{_steps(res)} steps, best epoch {res.best_epoch} of {last} ({res.best_val_psnr:.2f} dB val.)"


def _steps(res) -> int:
    return res.history[-1].step if res.history else 0


def _table(results: list[dict], args) -> None:
    names = list(results[0]["rows"])
    n = len(results)
    print(f"\n## 3-D deconvolution, {args.shape[0]} x {args.shape[1]} x {args.shape[2]} volumes, {n} seed(s), "
          f"{args.threads} thread(s), {platform.processor() or platform.machine()}")
    print(f"{'method':<30}{'PSNR':>8}{'± se':>7}{'SSIM':>8}{'centre':>9}{'middle':>9}{'edge':>9}{'CPU min':>9}  note")
    every = [("blurred", [r["blurred"] for r in results])] + [(k, [r["rows"][k] for r in results]) for k in names]
    for name, reps in every:
        ps = np.array([r["psnr"] for r in reps])
        se = ps.std(ddof=1) / np.sqrt(n) if n > 1 else float("nan")
        rings = np.mean([r["rings"] for r in reps], axis=0)
        minutes = np.mean([r.get("minutes", 0.0) for r in reps]) * args.threads
        note = reps[0].get("note", "")
        print(f"{name:<30}{ps.mean():>8.2f}{se:>7.2f}{np.mean([r['ssim'] for r in reps]):>8.3f}"
              + "".join(f"{v:>9.2f}" for v in rings) + f"{minutes:>9.1f}  {note}")
    print("\nPSNR by depth (slabs of planes, mean over test volumes and seeds)")
    depth = {name: np.mean([r["depth"] for r in reps], axis=0) for name, reps in every}
    print(f"{'method':<30}" + "".join(f"{f'slab {k}':>9}" for k in range(len(depth["blurred"]))))
    for name, vals in depth.items():
        print(f"{name:<30}" + "".join(f"{v:>9.2f}" for v in vals))
    if "3-D CoordGate" in names:
        cg = np.mean([r["rows"]["3-D CoordGate"]["psnr"] for r in results])
        print("\n3-D CoordGate minus: " + ", ".join(
            f"{k} {cg - np.mean([r['rows'][k]['psnr'] for r in results]):+.2f} dB" for k in names
            if k != "3-D CoordGate"))
    speeds = [r["speed"] for r in results if r["speed"]]
    if speeds:
        print(f"3-D CoordGate inference on {args.threads} thread(s): "
              + ", ".join(f"{p} {np.mean([s[p] for s in speeds]):.2f} MVoxel/s" for p in ("fp32", "bf16")))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="training minutes per model (default 10)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--channels", type=int, default=16)
    ap.add_argument("--crop-depth", type=int, default=16, help="3-D training crops: planes (default 16)")
    ap.add_argument("--batch", type=int, default=4, help="3-D training crops per step (default 4)")
    ap.add_argument("--rows", nargs="*", default=list(ROWS), choices=ROWS,
                    help="which rows to measure (default all; none: only the --calibrated rows)")
    ap.add_argument("--epochs", type=int, default=0,
                    help="a fixed budget of epochs of 50 steps per model instead of --minutes (0: minutes)")
    ap.add_argument("--calibrated", type=int, nargs="*", default=[],
                    help="add a 3-D CoordGate trained from a bead z-stack calibration with this many beads (each)")
    ap.add_argument("--bead-diameter", type=float, default=0.0,
                    help="--calibrated: the beads' diameter in nm, rendered and divided out (default 0: points)")
    ap.add_argument("--lr", type=float, default=None, help="3-D networks: Adam's learning rate (default TrainConfig's)")
    ap.add_argument("--gate-lr-scale", type=float, default=None,
                    help="3-D CoordGates: the coordinate MLPs' learning-rate multiplier (default: the 3-D recipe's)")
    ap.add_argument("--quick", action="store_true", help="tiny volumes and budgets: seconds (for the tests)")
    args = ap.parse_args(argv)
    args.shape, args.train_volumes, args.test_volumes = (64, 256, 256), 6, 2
    args.steps, args.crop, args.batch_2d, args.bead_stack = 50, 96, 8, (41, 1024)
    args.rl_iterations = RL_MAX_ITERATIONS
    if args.quick:
        args.shape, args.train_volumes, args.test_volumes = (16, 48, 48), 2, 1
        args.epochs, args.steps, args.batch, args.batch_2d, args.crop, args.crop_depth = 1, 2, 2, 2, 32, 8
        args.channels, args.rl_iterations, args.bead_stack = 4, 4, (25, 192)
    t0 = time.perf_counter()
    results = [run_seed(args, seed, lambda line: print(line, flush=True)) for seed in args.seeds]
    _table(results, args)
    print(f"\nwall time {(time.perf_counter() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
