"""How far tiles of an exported bioimage.io package are from the whole-image output, for a trained model.

Trains the default CoordGate U-Net (``--depth``, 16 channels) on the 256 x 256 sample calibration pair for
``--minutes``, exports it with :func:`napari_coordgate.model_io.bioimageio.export_package`, and prints, in units of the
blurred image's range, the largest difference from ``engine.predict`` on the whole image of:

- the package run on the whole image (bioimageio.core when installed, else the exported network itself);
- tiles of ``--tile`` pixels (with their coordinate tiles) that start on the pooling grid and that do not
  (odd offsets), inside the tile's halo (the largest difference, and the largest of the tiles' medians).

    python benchmarks/bench_bioimageio_tiles.py [--minutes 1] [--depth 2] [--tile 96] [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=1.0)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--tile", type=int, default=96)
    parser.add_argument("--quick", action="store_true", help="a few training steps (checks that the script runs)")
    args = parser.parse_args(argv)

    import torch

    from napari_coordgate import engine
    from napari_coordgate.config import ModelConfig, TrainConfig
    from napari_coordgate.model_io.bioimageio.package import _standalone_network, export_package
    from napari_coordgate.nn import field_coordinates
    from napari_coordgate.samples.sample_data import SAMPLE_PRESET, calibration_pair

    torch.set_num_threads(1)
    (sharp, _, _), (blurred, _, _) = calibration_pair()
    model_cfg = ModelConfig(depth=args.depth)
    budget = {"epochs": 1, "steps_per_epoch": 3} if args.quick else {"minutes": args.minutes}
    train_cfg = TrainConfig(crop=64, batch=4, seed=0, device="cpu", **budget)
    saved = engine.train(model_cfg, train_cfg, engine.PairSource(sharp, blurred, psf=SAMPLE_PRESET)).saved
    H, W = blurred.shape
    image = blurred.astype(np.float32)
    span = float(image.max() - image.min())
    whole = engine.predict(saved, image, device="cpu")
    coords = field_coordinates((H, W)).numpy()[None]
    net = _standalone_network(saved)

    def run(img, c):
        with torch.no_grad():
            return net(torch.from_numpy(np.ascontiguousarray(img))[None, None], torch.from_numpy(c))[0][0, 0].numpy()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        package = export_package(saved, Path(tmp) / "bench.zip")
        try:
            from bioimageio import core

            sample = core.predict(model=str(package), inputs={"image": image[None, None], "coords": coords})
            got, how = sample.members["restored"].data.values[0, 0], "bioimageio.core"
        except ImportError:
            got, how = run(image, coords), "exported network"
        diff = np.abs(got - whole) / span
        rows.append((f"whole image ({how})", float(diff.max()), float(np.median(diff))))
    halo = engine.receptive_halo(model_cfg)
    m = model_cfg.min_size
    t = args.tile
    for label, offsets in (("tiles on the pooling grid", [(m * 5, m * 7), (m * 11, m * 3), (m * 20, m * 20)]),
                           ("tiles off the pooling grid", [(5, 7), (33, 3), (41, 82), (1, 2)])):
        worst, median = 0.0, 0.0
        for oy, ox in offsets:
            tile = image[oy : oy + t, ox : ox + t]
            out = run(tile, coords[:, :, oy : oy + t, ox : ox + t])
            inner = (slice(halo, t - halo), slice(halo, t - halo))
            diff = np.abs(out[inner] - whole[oy : oy + t, ox : ox + t][inner]) / span
            worst, median = max(worst, float(diff.max())), max(median, float(np.median(diff)))
        rows.append((f"{label} ({t}^2, halo {halo})", worst, median))
    print(f"CoordGate U-Net({args.depth}), {'3 steps' if args.quick else f'{args.minutes:g} min'} on the sample pair; "
          "|package - apply| / image range (max, and the largest per-tile median)")
    print(f"  {'':<48s} {'max':>9s} {'median':>9s}")
    for label, worst, median in rows:
        print(f"  {label:<48s} {worst:9.2e} {median:9.2e}")


if __name__ == "__main__":
    main()
