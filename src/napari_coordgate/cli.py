"""The ``napari-coordgate`` command: the same steps as the napari widgets, headless, for batch work.

Errors are one clear message and a non-zero exit, never a traceback (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from . import __version__

__all__ = ["main", "build_parser"]


class CLIError(Exception):
    """An error the user can fix; printed as one line."""


def _cmd_models(args: argparse.Namespace) -> int:
    """Parameter counts of the U-Net family, and one CoordGate U-Net run on a bundled image."""
    import numpy as np
    import torch
    from skimage import data

    from .config import ModelConfig
    from .nn import build_model, count_parameters

    torch.set_num_threads(args.threads)
    print(f"Parameters at base channels {args.channels}, growth 2 (gate MLP hidden {ModelConfig().gate_hidden}):")
    print(f"{'depth':>5} {'plain':>12} {'coordgate':>12} {'coordconv':>12}")
    for depth in range(1, 7):
        counts = [
            count_parameters(build_model(ModelConfig(depth=depth, channels=args.channels, gate=g)))
            for g in ("none", "coordgate", "coordconv")
        ]
        print(f"{depth:>5} " + " ".join(f"{c:>12,}" for c in counts))
    image = data.cell().astype(np.float32)
    image = (image - image.min()) / max(float(np.ptp(image)), 1e-12)
    cfg = ModelConfig(depth=args.depth, channels=args.channels, gate="coordgate")
    model = build_model(cfg).eval()
    with torch.no_grad():
        out = model(torch.from_numpy(image)[None, None])
    print(
        f"CoordGate U-Net({args.depth}) on the bundled 'cell' image {image.shape}: output shape "
        f"{tuple(out.shape[-2:])}, {count_parameters(model):,} parameters"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="napari-coordgate",
        description="Position-aware deblurring of microscope images with CoordGate U-Nets.",
    )
    parser.add_argument("--version", action="version", version=f"napari-coordgate {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("models", help="parameter counts of the U-Net family; runs one on a bundled image")
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=_cmd_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("napari-coordgate: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one clear line for the user; --debug for the traceback
        if args.debug:
            raise
        name = "error" if isinstance(exc, CLIError) else type(exc).__name__
        print(f"napari-coordgate: {name}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
