"""Run a job in a separate, spawned Python process, so nothing it loads can take the caller down.

Why: a plain ``pip install`` of torch on Linux brings its CUDA build, and the first optimiser step imports
``torch._dynamo``, which imports triton with its own copy of LLVM. A viewer that renders through Mesa
(llvmpipe under Xvfb, virtual machines, remote desktops; Mesa's AMD driver) already holds Mesa's LLVM, and
the two in one process crash it (``xvfb-run python -c "import napari; napari.Viewer(); import triton"``).
A CUDA out-of-memory error, a driver fault or a killed process must not take the user's layers either. So
training from the viewer runs in a *spawned* child (a fresh interpreter: no GL state, no Qt), which streams
its progress back through a pipe and writes the best model so far into a private folder; if the child dies,
the caller gets the reason and that model.

Arrays travel through files, not through the pipe: every numpy (or lazy dask/zarr) array in the job's
arguments is written once into the job's temporary folder, plane by plane, and the child memory-maps it. The
caller's memory therefore never holds a second full copy of the data (writes go to the page cache).

No Qt and no napari here: the dock's worker thread calls :func:`run_isolated` (or :func:`train_isolated`),
passing its ``report`` and ``should_stop`` callables; :func:`adapt_isolated` does the same for adaptation.
"""

from __future__ import annotations

import dataclasses
import importlib
import io
import pickle
import shutil
import signal
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np

__all__ = ["IsolationError", "run_isolated", "train_isolated", "adapt_isolated", "portable_exception"]

_STOP = "stop"
_POLL_S = 0.1
_MIN_SPILL_BYTES = 1 << 12  # smaller arrays are pickled with the arguments


class IsolationError(RuntimeError):
    """The child process could not start, or died before returning (the message says why)."""


# -- arrays through files -------------------------------------------------------------------------
def _is_lazy_array(obj: Any) -> bool:
    return not isinstance(obj, np.ndarray) and hasattr(obj, "shape") and hasattr(obj, "dtype") and (
        hasattr(obj, "chunks") or hasattr(obj, "compute"))


def _write_array(arr: Any, path: Path) -> None:
    """``arr`` into an ``.npy`` file, one leading-axis slice at a time (a lazy array is never materialised)."""
    shape, dtype = tuple(arr.shape), np.dtype(arr.dtype)
    if isinstance(arr, np.ndarray) and (arr.ndim < 3 or arr.flags.c_contiguous):
        with open(path, "wb") as fh:
            np.lib.format.write_array(fh, np.ascontiguousarray(arr), allow_pickle=False)
        return
    out = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    for i in range(shape[0]):
        part = arr[i]
        out[i] = np.asarray(part.compute() if hasattr(part, "compute") else part)
    out.flush()
    del out


class _SpillingPickler(pickle.Pickler):
    """Pickles the job's arguments with every large array replaced by a reference to an ``.npy`` file."""

    def __init__(self, fh, folder: Path):
        super().__init__(fh, protocol=pickle.HIGHEST_PROTOCOL)
        self.folder = folder
        self.count = 0

    def persistent_id(self, obj: Any):
        is_big_ndarray = isinstance(obj, np.ndarray) and obj.dtype != object and obj.nbytes >= _MIN_SPILL_BYTES
        if not (is_big_ndarray or _is_lazy_array(obj)):
            return None
        path = self.folder / f"array{self.count}.npy"
        self.count += 1
        _write_array(obj, path)
        return ("npy", path.name)


class _MappingUnpickler(pickle.Unpickler):
    def __init__(self, fh, folder: Path):
        super().__init__(fh)
        self.folder = folder

    def persistent_load(self, pid):
        kind, name = pid
        if kind != "npy":
            raise pickle.UnpicklingError(f"unknown reference {kind!r}")
        return np.load(self.folder / name, mmap_mode="r", allow_pickle=False)


def _write_job(folder: Path, args: tuple, kwargs: dict) -> None:
    buf = io.BytesIO()
    _SpillingPickler(buf, folder).dump((args, kwargs))
    (folder / "job.pkl").write_bytes(buf.getvalue())


def _read_job(folder: Path) -> tuple[tuple, dict]:
    with open(folder / "job.pkl", "rb") as fh:
        return _MappingUnpickler(fh, folder).load()


# -- the child ------------------------------------------------------------------------------------
def _resolve(target: str) -> Callable:
    module, _, name = target.partition(":")
    if not module.startswith("napari_coordgate") or not name:
        raise ValueError(f"not a napari_coordgate job: {target!r}")
    return getattr(importlib.import_module(module), name)


def _child_main(conn, folder: Path, target: str) -> None:
    """Run ``target(*args, report=, should_stop=, workdir=)`` and send its result (or error) to the caller."""
    stopped = False

    def should_stop() -> bool:
        nonlocal stopped
        try:
            while not stopped and conn.poll():
                stopped = conn.recv() == _STOP
        except (EOFError, OSError):  # the caller is gone: stop and keep what we have
            stopped = True
        return stopped

    def report(msg: Any) -> None:
        nonlocal stopped
        try:
            conn.send(("update", msg))
        except OSError:
            stopped = True

    try:
        args, kwargs = _read_job(folder)
        result = _resolve(target)(*args, report=report, should_stop=should_stop, workdir=folder, **kwargs)
        conn.send(("result", result))
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the caller, nothing is lost here
        try:
            conn.send(("error", portable_exception(exc), traceback.format_exc()))
        except OSError:
            pass


def portable_exception(exc: BaseException) -> BaseException:
    """``exc`` as it can cross to another process: itself, whole (its attributes too, e.g. a
    :class:`~napari_coordgate.calibration.CalibrationError`'s bead table), when it survives a pickling round trip;
    else its type with its message only; else a RuntimeError naming its type, with its message."""
    def survives(e: BaseException) -> bool:
        try:
            pickle.loads(pickle.dumps(e))  # some pickle but fail to load (a required keyword argument)
            return True
        except Exception:
            return False

    if survives(exc):
        return exc
    try:
        plain = type(exc)(str(exc))
    except Exception:
        plain = None
    if plain is not None and survives(plain):
        return plain
    return RuntimeError(f"{type(exc).__name__}: {exc}")


def _child_entry() -> None:
    """``python -c "...; _child_entry()" ADDRESS FOLDER TARGET``: the child's side of :func:`run_isolated`."""
    import sys
    from multiprocessing.connection import Client

    address, folder, target = sys.argv[1:4]
    conn = Client(address)
    (Path(folder) / _CONNECTED).touch()  # tells the caller that accept() will not block
    try:
        _child_main(conn, Path(folder), target)
    finally:
        conn.close()


# -- the caller -----------------------------------------------------------------------------------
_CONNECTED = "connected"


def _death_reason(returncode: int | None) -> str:
    if returncode is None:
        return "it did not exit"
    if returncode < 0:
        try:
            return f"killed by signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


def run_isolated(
    target: str,
    *args: Any,
    report: Callable[[Any], None],
    should_stop: Callable[[], bool],
    on_result: Callable[[Path, Any], Any] | None = None,
    on_death: Callable[[Path, str], Any] | None = None,
    stop_grace_s: float = 30.0,
    **kwargs: Any,
) -> Any:
    """Run ``target(*args, **kwargs, report=, should_stop=, workdir=)`` in a new Python process; return its result.

    The child is a fresh interpreter (``sys.executable``): it inherits no GL or Qt state, and unlike
    ``multiprocessing``'s spawn it never re-imports the caller's ``__main__`` (a napari script without a
    ``__main__`` guard would open a second viewer).

    Parameters
    ----------
    target
        ``"napari_coordgate.module:function"``.
    report
        Receives every message the child reports, in this (the caller's) thread.
    should_stop
        Polled about every 0.1 s; once True, the child is asked to stop (its job then returns what it has) and,
        if it has not exited within ``stop_grace_s``, it is killed.
    on_result
        Called as ``on_result(workdir, result)`` while the job's folder (arrays, files the job wrote) still
        exists; its return value is returned. The folder is removed afterwards.
    on_death
        Called as ``on_death(workdir, reason)`` when the child dies without returning; its return value is
        returned (e.g. the last model the child wrote). Without it, :class:`IsolationError` is raised.

    An exception raised by the job is raised here again (same type where it pickles).
    """
    import subprocess
    import sys
    from multiprocessing.connection import Listener

    folder = None
    try:
        folder = Path(tempfile.mkdtemp(prefix="coordgate-job-"))
        _write_job(folder, args, kwargs)
    except OSError as exc:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        raise IsolationError(f"cannot start the background process: cannot write its temporary files in "
                             f"{tempfile.gettempdir()} ({exc.strerror or exc}); free some space or set "
                             "TMPDIR to another folder") from exc
    listener = Listener()  # a Unix socket (a named pipe on Windows) in a private temporary folder
    proc = conn = None
    try:
        code = "from napari_coordgate.runners.isolate import _child_entry; _child_entry()"
        try:
            proc = subprocess.Popen([sys.executable, "-c", code, str(listener.address), str(folder), target],
                                    stdin=subprocess.DEVNULL)
        except OSError as exc:
            raise IsolationError(f"cannot start the background process: {exc}") from exc
        if not _wait_connected(proc, folder):
            raise IsolationError(f"the background process ended before it started its job "
                                 f"({_death_reason(proc.poll())}); see its messages on the terminal")
        conn = listener.accept()
        outcome = _pump(proc, conn, report, should_stop, stop_grace_s)
        if outcome[0] == "result":
            return outcome[1] if on_result is None else on_result(folder, outcome[1])
        if outcome[0] == "error":
            raise outcome[1]
        reason = f"the background process died ({_death_reason(proc.poll())})"
        if on_death is not None:
            return on_death(folder, reason)
        raise IsolationError(reason)
    finally:
        for closable in (conn, listener):
            if closable is not None:
                closable.close()
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        shutil.rmtree(folder, ignore_errors=True)


def _wait_connected(proc, folder: Path) -> bool:
    """Wait until the child has connected (True) or has ended (False).

    A stop requested meanwhile is sent once connected: the job then returns what it has (training: a model).
    """
    while not (folder / _CONNECTED).exists():
        if proc.poll() is not None:
            return (folder / _CONNECTED).exists()
        time.sleep(0.02)
    return True


def _pump(proc, conn, report, should_stop, stop_grace_s: float) -> tuple:
    """Relay the child's messages until it returns, fails or dies; ask it to stop when ``should_stop()``."""
    stop_deadline = None
    while True:
        if stop_deadline is None and should_stop():
            stop_deadline = time.monotonic() + stop_grace_s
            try:
                conn.send(_STOP)
            except OSError:
                pass
        if stop_deadline is not None and time.monotonic() > stop_deadline and proc.poll() is None:
            proc.kill()
        try:
            msg = conn.recv() if conn.poll(_POLL_S) else None
        except (EOFError, OSError):
            proc.wait()
            return ("died",)
        if msg is None:
            continue  # a dead child closes its end: poll() then reports EOF
        if msg[0] == "update":
            report(msg[1])
        elif msg[0] == "result":
            return ("result", msg[1])
        elif msg[0] == "error":
            exc = msg[1]
            if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit
                exc = IsolationError(f"the background process was interrupted ({type(exc).__name__})")
            return ("error", exc)


# -- training -------------------------------------------------------------------------------------
def _relaying(report: Callable[[Any], None]) -> tuple[list, Callable[[Any], None]]:
    """(history, relay): ``relay`` passes each message to ``report`` and keeps it in ``history`` (what a crashed
    run's result is rebuilt from)."""
    history: list = []

    def relay(msg: Any) -> None:
        history.append(msg)
        report(msg)

    return history, relay


_BEST = "best.cgmodel"


def _train_in_child(model_cfg, train_cfg, source, init=None, *, report, should_stop, workdir: Path):
    from .. import engine

    result = engine.train(model_cfg, train_cfg, source, on_update=report, should_stop=should_stop,
                          out_path=workdir / _BEST, init=init)
    return dataclasses.replace(result, saved=None, history=[])  # the model travels as a file


def train_isolated(model_cfg, train_cfg, source, *, report: Callable[[Any], None],
                   should_stop: Callable[[], bool], init=None):
    """:func:`napari_coordgate.engine.train` in a spawned process; returns its ``TrainResult``.

    ``init`` (a loaded model) fine-tunes it instead of starting from fresh weights.
    Every :class:`~napari_coordgate.engine.Update` reaches ``report``. If the process dies (a segfault, an
    out-of-memory kill), the best model it had written is returned with ``stopped`` saying why; if it died
    before writing one, :class:`IsolationError` says so.
    """
    from ..model_io import load_model

    history, relay = _relaying(report)

    def recovered(folder: Path, reason: str):
        from ..engine import TrainResult

        best = folder / _BEST
        if not best.is_file():
            raise IsolationError(f"training failed: {reason} before it saved a model")
        epochs = [u for u in history if getattr(u, "kind", "") == "epoch"]
        top = max(epochs, key=lambda u: u.val_psnr, default=None)
        return TrainResult(load_model(best, "cpu"), history, None if top is None else top.val_psnr,
                           0 if top is None else top.epoch, f"crashed: {reason}",
                           history[-1].device if history else "cpu",
                           getattr(history[-1], "input_psnr", None) if history else None)

    def finished(folder: Path, result):
        return dataclasses.replace(result, saved=load_model(folder / _BEST, "cpu"), history=history)

    return run_isolated("napari_coordgate.runners.isolate:_train_in_child", model_cfg, train_cfg, source, init,
                        report=relay, should_stop=should_stop, on_result=finished, on_death=recovered)


# -- adaptation -----------------------------------------------------------------------------------
def _adapt_in_child(saved, images, cfg, psf=None, *, report, should_stop, workdir: Path):
    from .. import engine

    result = engine.adapt(saved, images, cfg, psf=psf, on_update=report, should_stop=should_stop,
                          out_path=workdir / _BEST)
    return dataclasses.replace(result, saved=None, history=[])  # the model travels as a file


def _criterion(db: float | None) -> float | None:
    """The held-out criterion back from the ``-10 log10`` an adaptation ``Update`` carries it as."""
    return None if db is None else 10.0 ** (-db / 10.0)


def adapt_isolated(saved, images, cfg, *, report: Callable[[Any], None], should_stop: Callable[[], bool],
                   psf=None):
    """:func:`napari_coordgate.engine.adapt` in a spawned process; returns its ``AdaptResult``.

    Adaptation runs torch's optimiser like training, so it must not run in the viewer's process either. Every
    :class:`~napari_coordgate.engine.Update` reaches ``report`` (the held-out criterion in its PSNR slots as
    ``-10 log10``); a stop keeps the best state so far. When adaptation did not help, the result holds ``saved``
    itself (``kept_original``). If the process dies, the best adapted model it had written is returned with
    ``stopped`` saying why (its ``noise`` is then None: it was measured in the process); if it died before any
    state beat the original, :class:`IsolationError` says so. An error of the job (a model without a PSF model,
    images of another field) is raised here with its type and message.
    """
    from ..model_io import load_model

    history, relay = _relaying(report)

    def recovered(folder: Path, reason: str):
        from ..engine import AdaptResult

        best = folder / _BEST
        if not best.is_file():
            raise IsolationError(f"adaptation failed: {reason} before any state beat the original model, "
                                 "which is unchanged")
        last = history[-1] if history else None
        before = _criterion(getattr(last, "input_psnr", None))
        return AdaptResult(load_model(best, "cpu"), before, _criterion(getattr(last, "best_val_psnr", None)),
                           False, None, history, f"crashed: {reason}", getattr(last, "device", "cpu"),
                           getattr(last, "step", 0))

    def finished(folder: Path, result):
        model = saved if result.kept_original else load_model(folder / _BEST, "cpu")
        return dataclasses.replace(result, saved=model, history=history)

    return run_isolated("napari_coordgate.runners.isolate:_adapt_in_child", saved, images, cfg, psf,
                        report=relay, should_stop=should_stop, on_result=finished, on_death=recovered)
