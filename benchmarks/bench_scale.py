"""Scale-out of `apply`: MP/s on a stack in one process against dask.distributed workers, outputs compared.

An OME-Zarr uint16 stack (chunks of 256^2) goes through an untrained CoordGate U-Net(2) (16 channels: the speed of a
trained one) into an OME-Zarr output, as `napari-coordgate apply IN.zarr -o OUT.zarr` does (default tiling, CPU):

- in this process with 1 torch thread (the reference) and with 2;
- as `apply --dask local --workers 2 --threads 1` does: a LocalCluster of 2 worker processes, 1 thread each, one
  task per plane. Its time runs from sending the model to the completed store; starting the cluster (once per
  run of the command) is printed apart.

The runs alternate (--repeats rounds) and each row shows its fastest round, so a burst of load from other processes
on a shared machine does not land on one row only; the load average is printed with the table.

    python benchmarks/bench_scale.py            # 20 x 1024^2 planes, 2 rounds (about 4 minutes on 2 idle cores)
    python benchmarks/bench_scale.py --quick    # 4 x 256^2 planes, 1 round

Prints a table; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def _model(size: int):
    import torch

    from napari_coordgate.config import ModelConfig
    from napari_coordgate.model_io import SavedModel
    from napari_coordgate.nn import build_model

    torch.manual_seed(0)
    cfg = ModelConfig(depth=2, channels=16, gate="coordgate")
    return SavedModel(build_model(cfg).eval(), cfg, (size, size), {"offset": 100.0, "scale": 3000.0})


def _input(folder: Path, planes: int, size: int) -> Path:
    import zarr

    from napari_coordgate.samples.specimens import procedural_specimen

    path = folder / "stack.zarr"
    arr = zarr.create_array(str(path), shape=(planes, size, size), dtype="uint16", chunks=(1, 256, 256),
                            dimension_names=("t", "y", "x"))
    for i in range(planes):
        arr[i] = (procedural_specimen((size, size), seed=i) * 3000 + 100).astype(np.uint16)
    return path


def _single(saved, src: Path, out: Path, threads: int) -> tuple[float, np.ndarray]:
    import torch

    from napari_coordgate.engine import predict
    from napari_coordgate.image_io.omezarr import create_ome_zarr, read_zarr

    torch.set_num_threads(threads)
    image = read_zarr(src)
    t0 = time.perf_counter()
    writer = create_ome_zarr(out, image.data.shape, axes=image.axes, scale=image.scale)
    predict(saved, image.data, device="cpu", out=writer)
    writer.finalize()
    return time.perf_counter() - t0, np.asarray(read_zarr(out).data)


def _dask(client, saved, src: Path, out: Path) -> tuple[float, np.ndarray]:
    from napari_coordgate.image_io.omezarr import create_ome_zarr, read_zarr
    from napari_coordgate.runners.distributed import ImageSource, apply_distributed

    image = read_zarr(src)
    t0 = time.perf_counter()
    writer = create_ome_zarr(out, image.data.shape, axes=image.axes, scale=image.scale)
    apply_distributed(client, saved, ImageSource.open(src), writer, predict_kwargs={"device": "cpu"}, threads=1)
    return time.perf_counter() - t0, np.asarray(read_zarr(out).data)


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    from napari_coordgate.runners.distributed import connect

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--planes", type=int, default=20)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="alternating rounds; each row keeps its fastest")
    ap.add_argument("--quick", action="store_true", help="4 x 256^2 planes, one round")
    args = ap.parse_args()
    planes, size, repeats = (4, 256, 1) if args.quick else (args.planes, args.size, args.repeats)
    saved = _model(size)
    mp = planes * size * size / 1e6
    load_before = _load()
    times: dict[str, list[float]] = {"1x1": [], "1x2": [], "dask": []}
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        src = _input(folder, planes, size)
        t0 = time.perf_counter()
        with connect("local", workers=args.workers, threads=1) as client:
            client.wait_for_workers(args.workers)
            start = time.perf_counter() - t0
            for _ in range(repeats):
                secs, ref = _single(saved, src, folder / "one.zarr", 1)
                times["1x1"].append(secs)
                secs, two = _single(saved, src, folder / "two.zarr", 2)
                times["1x2"].append(secs)
                secs, dist = _dask(client, saved, src, folder / "dask.zarr")
                times["dask"].append(secs)

    def same(a):
        return "identical" if np.array_equal(a, ref) else f"max |d| {np.abs(a - ref).max():.2e}"

    t1, t2, td = min(times["1x1"]), min(times["1x2"]), min(times["dask"])
    print(f"{planes} x {size}^2 planes ({mp:.1f} MP), CoordGate U-Net(2) 16 channels, default tiling, CPU, "
          f"{os.cpu_count()} cores; OME-Zarr in and out; fastest of {repeats} alternating round(s)")
    print()
    print("| run | processes x torch threads | seconds | MP/s | vs 1 process | output vs 1 process |")
    print("|---|---:|---:|---:|---:|---|")
    print(f"| apply, 1 process | 1 x 1 | {t1:.1f} | {mp / t1:.2f} | 1.00 | reference |")
    print(f"| apply, 1 process | 1 x 2 | {t2:.1f} | {mp / t2:.2f} | {t1 / t2:.2f} | {same(two)} |")
    print(f"| apply --dask local --workers {args.workers} | {args.workers} x 1 | {td:.1f} | {mp / td:.2f} | "
          f"{t1 / td:.2f} | {same(dist)} |")
    print()
    print("all rounds (s): " + "; ".join(f"{k} " + ", ".join(f"{t:.1f}" for t in v) for k, v in times.items()))
    print(f"LocalCluster start (once per command, not in the row above): {start:.1f} s")
    print(f"load average (1, 5, 15 min) before: {load_before}; after: {_load()}")


if __name__ == "__main__":
    main()
