"""Terminal front-end helpers shared by the CLI and the demo: tqdm progress, Ctrl-C handling, tables."""

from __future__ import annotations

import signal
import sys

__all__ = ["StopFlag", "train_with_bar", "predict_with_bar", "format_table"]


class StopFlag:
    """Ctrl-C during training: stop at the next step and keep the best model (a second Ctrl-C aborts)."""

    def __init__(self) -> None:
        self.stop = False
        self._old = None

    def __enter__(self):
        def handler(signum, frame):
            if self.stop:
                raise KeyboardInterrupt
            self.stop = True
            print("\nstopping after this step (best model is kept); Ctrl-C again to abort", file=sys.stderr)

        try:
            self._old = signal.signal(signal.SIGINT, handler)
        except ValueError:  # not in the main thread
            self._old = None
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False

    def __call__(self) -> bool:
        return self.stop


def train_with_bar(model_cfg, train_cfg, source, *, out_path=None, checkpoint_path=None, resume=None, label=""):
    from tqdm import tqdm

    from ..engine import train

    bar = tqdm(total=1000, desc=label or "train", unit="‰", leave=True, dynamic_ncols=True,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining} {postfix}")

    def on_update(u) -> None:
        bar.n = int(1000 * u.progress)
        post = f"epoch {u.epoch} loss {u.loss:.4f}"
        if u.best_val_psnr is not None:
            post += f" val {u.best_val_psnr:.2f} dB"
        bar.set_postfix_str(post + f" [{u.device}]")

    try:
        with StopFlag() as stop:
            return train(model_cfg, train_cfg, source, on_update=on_update, should_stop=stop,
                         out_path=out_path, checkpoint_path=checkpoint_path, resume=resume)
    finally:
        bar.n = bar.total
        bar.close()


def predict_with_bar(saved, image, label="apply", **kw):
    from tqdm import tqdm

    from ..engine import predict

    with tqdm(desc=label, unit="tile", dynamic_ncols=True, leave=False) as bar:
        def on_progress(done, total):
            bar.total = total
            bar.n = done
            bar.refresh()

        return predict(saved, image, on_progress=on_progress, **kw)


def format_table(rows: list[dict], rings: bool = True) -> str:
    head = f"{'method':<22}{'PSNR':>8}{'SSIM':>8}"
    if rings:
        head += f"{'centre':>9}{'middle':>9}{'edge':>9}"
    head += f"{'MP/s':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        line = f"{r['method']:<22}{r['psnr']:>8.2f}{r['ssim']:>8.3f}"
        if rings:
            line += "".join(f"{d['psnr']:>9.2f}" for d in r["psnr_by_ring"])
        mps = r.get("mp_per_s")
        line += f"{mps:>9.2f}" if mps else f"{'':>9}"
        lines.append(line)
    return "\n".join(lines)
