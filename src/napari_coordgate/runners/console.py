"""Terminal front-end helpers shared by the CLI and the demo: progress (a tqdm bar on a terminal, plain lines
in a log file or a batch job's output), Ctrl-C handling, tables."""

from __future__ import annotations

import signal
import sys

__all__ = ["StopFlag", "LineProgress", "progress", "train_with_bar", "adapt_with_bar", "predict_with_bar",
           "format_table"]


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


def _interactive(stream) -> bool:
    """A terminal redraws a progress bar in place; a file (a SLURM log, ``> log.txt``) keeps every redraw."""
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class LineProgress:
    """Progress for a log file: one plain line when asked to (``force``) or at most every ``every`` seconds.

    Parameters
    ----------
    label
        What the line is about (a file name, "train ...").
    every
        Seconds between two lines that are not forced.
    stream
        Where lines go (default: standard error, as tqdm's bars).
    clock
        Seconds as a float (a parameter so tests need not sleep).
    """

    def __init__(self, label: str, every: float = 30.0, stream=None, clock=None) -> None:
        import time

        self.label, self.every = label, float(every)
        self.stream = sys.stderr if stream is None else stream
        self.clock = time.monotonic if clock is None else clock
        self.t0 = self.clock()
        self.last = None
        self._text = None

    def line(self, text: str, force: bool = False) -> None:
        """Print ``text`` if ``force`` or the period has passed; never the same text twice in a row."""
        now = self.clock()
        if text == self._text:
            return
        if force or self.last is None or now - self.last >= self.every:
            print(f"{self.label}: {text} [{now - self.t0:.0f} s]", file=self.stream, flush=True)
            self.last, self._text = now, text


def _train_line(u) -> str:
    text = f"epoch {u.epoch} step {u.step} loss {u.loss:.4f}"
    if u.best_val_psnr is not None:
        text += f" best val {u.best_val_psnr:.2f} dB"
    return text + f" ({100 * u.progress:.0f} %, {u.device})"


def _update_callbacks(label: str, line, postfix):
    """(on_update, close) for a run's :class:`~napari_coordgate.engine.Update` records: a bar on a terminal (with
    ``postfix(u)``), a line per epoch (and every 30 s) in a log (``line(u)``)."""
    if _interactive(sys.stderr):
        from tqdm import tqdm

        bar = tqdm(total=1000, desc=label, unit="‰", leave=True, dynamic_ncols=True,
                   bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining} {postfix}")

        def on_update(u) -> None:
            bar.n = int(1000 * u.progress)
            bar.set_postfix_str(postfix(u) + f" [{u.device}]")

        def close() -> None:
            bar.n = bar.total
            bar.close()

        return on_update, close
    log = LineProgress(label)

    def on_log(u) -> None:
        log.line(line(u), force=u.kind in ("epoch", "done"))

    return on_log, lambda: None


def _train_postfix(u) -> str:
    post = f"epoch {u.epoch} loss {u.loss:.4f}"
    if u.best_val_psnr is not None:
        post += f" val {u.best_val_psnr:.2f} dB"
    return post


def train_with_bar(model_cfg, train_cfg, source, *, out_path=None, checkpoint_path=None, resume=None, label=""):
    """:func:`~napari_coordgate.engine.train` with Ctrl-C handling and progress: a bar on a terminal, a line per
    epoch (and every 30 s) in a log."""
    from ..engine import train

    on_update, close = _update_callbacks(label or "train", _train_line, _train_postfix)
    try:
        with StopFlag() as stop:
            return train(model_cfg, train_cfg, source, on_update=on_update, should_stop=stop,
                         out_path=out_path, checkpoint_path=checkpoint_path, resume=resume)
    finally:
        close()


def _adapt_gain(u) -> str:
    """The held-out criterion's best gain over the original model (its ``-10 log10`` values are in the Update)."""
    if u.best_val_psnr is None or u.input_psnr is None:
        return ""
    return f" held-out consistency {u.best_val_psnr - u.input_psnr:+.3f} dB"


def _adapt_line(u) -> str:
    return f"epoch {u.epoch} step {u.step}{_adapt_gain(u)} ({100 * u.progress:.0f} %, {u.device})"


def adapt_with_bar(saved, images, cfg, *, psf=None, roi=None, binning: int = 1, out_path=None, label="adapt"):
    """:func:`~napari_coordgate.engine.adapt` with Ctrl-C handling (a stop keeps the best state) and progress."""
    from ..engine import adapt

    on_update, close = _update_callbacks(label, _adapt_line, lambda u: f"epoch {u.epoch}{_adapt_gain(u)}")
    try:
        with StopFlag() as stop:
            return adapt(saved, images, cfg, psf=psf, roi=roi, binning=binning, on_update=on_update,
                         should_stop=stop, out_path=out_path)
    finally:
        close()


class _CountBar:
    """``on_progress(done, total)`` for a terminal (a tqdm bar) or a log (a line every 10 s and at the end)."""

    def __init__(self, label: str, unit: str) -> None:
        self.label, self.unit = label, unit
        self.bar = self.log = None
        if _interactive(sys.stderr):
            from tqdm import tqdm

            self.bar = tqdm(desc=label, unit=unit, dynamic_ncols=True, leave=False)
        else:
            self.log = LineProgress(label, every=10.0)

    def __call__(self, done: int, total: int) -> None:
        if self.bar is not None:
            self.bar.total, self.bar.n = total, done
            self.bar.refresh()
        else:
            percent = f" ({100 * done / total:.0f} %)" if total else ""
            self.log.line(f"{done} of {total} {self.unit}s{percent}", force=bool(total) and done >= total)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
        return False


def progress(label: str, unit: str) -> _CountBar:
    """A context manager whose value is ``on_progress(done, total)``: a bar on a terminal, plain lines in a log."""
    return _CountBar(label, unit)


def predict_with_bar(saved, image, label="apply", **kw):
    from ..engine import predict

    with progress(label, "tile") as on_progress:
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
