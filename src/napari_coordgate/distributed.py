"""Batch runs on a dask.distributed cluster: every plane of a stack is one task, all write into one OME-Zarr store.

::

    with connect("local", workers=2, threads=1) as client:        # or connect("tcp://scheduler:8786")
        writer = create_ome_zarr("out.zarr", source.shape, axes=...)
        apply_distributed(client, saved, source, writer, threads=1)   # -> Path("out.zarr") once complete

The model travels to each worker once, as a worker plugin holding its model-file bytes (safetensors and JSON, the
format of :func:`napari_coordgate.modelio.save_model`; nothing is unpickled from a model file); workers that join
later get it from the scheduler. Each task reads its plane (through the zarr chunk cache, or one TIFF page), runs
:func:`napari_coordgate.engine.predict` on it with the caller's tile plan and torch thread count, so the result is
bit-identical to a single-process run with the same options, and writes the plane into the unfinished store. The
input and the output must be on a file system that every worker sees.

Failures: an unreachable scheduler fails in :func:`connect` (before anything is written); a worker that dies
while running a plane gets the plane run again elsewhere by the scheduler (``distributed.scheduler.allowed-failures``
times), after which the run fails; a failed run leaves the output at ``OUT.zarr.partial``, never at ``OUT.zarr``,
and the store is only completed when every plane is recorded as written and holds a chunk for each.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .zarrio import OmeZarrWriter, PlaneSink, is_zarr, read_zarr

try:  # a worker plugin must subclass WorkerPlugin; without distributed the module still imports
    from distributed import WorkerPlugin as _WorkerPluginBase
except ImportError:  # pragma: no cover - exercised only without the 'distributed' extra
    _WorkerPluginBase = object

__all__ = [
    "ImageSource",
    "ModelPlugin",
    "SchedulerUnreachableError",
    "WorkerDiedError",
    "apply_distributed",
    "connect",
]

INSTALL_HINT = "pip install 'napari-coordgate[distributed]'"
CONNECT_TIMEOUT_S = 5.0
_TASK_PREFIX = "napari-coordgate-plane"


class SchedulerUnreachableError(ConnectionError):
    """No dask scheduler answered at the given address in time."""


class WorkerDiedError(RuntimeError):
    """The workers running a plane died more often than the scheduler allows; the run failed."""


def _distributed():
    try:
        import distributed
    except ImportError:
        raise ImportError(f"--dask needs dask.distributed: {INSTALL_HINT}") from None
    return distributed


@contextmanager
def connect(address: str = "local", *, workers: int | None = None, threads: int = 1,
            timeout: float = CONNECT_TIMEOUT_S) -> Iterator:
    """A dask.distributed client: a new ``LocalCluster`` for ``"local"``, else the scheduler at ``address``.

    Parameters
    ----------
    address
        ``"local"``, or a scheduler address such as ``tcp://node01:8786`` (a cluster started with
        ``dask scheduler`` / ``dask worker`` or by dask-jobqueue).
    workers
        Worker processes of the local cluster (one task at a time each); default: the CPU cores divided by
        ``threads``. Not allowed with an address: that cluster has its own workers.
    threads
        torch threads per worker, used to size the local cluster.
    timeout
        Seconds to wait for the scheduler.

    Raises
    ------
    SchedulerUnreachableError
        Nothing answered as a dask scheduler at ``address`` within ``timeout`` seconds.
    """
    distributed = _distributed()
    if workers is not None and workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    if address == "local":
        n = workers or max(1, (os.cpu_count() or 1) // max(threads, 1))
        cluster = distributed.LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                           dashboard_address="127.0.0.1:0", silence_logs=logging.ERROR)
        try:
            client = distributed.Client(cluster)
            try:
                yield client
            finally:
                client.close()
        finally:
            cluster.close()
        return
    if workers:
        raise ValueError("--workers sizes a local cluster (--dask local); a cluster at an address has its own workers")
    try:
        client = distributed.Client(address, timeout=timeout)
    except Exception as exc:  # OSError/TimeoutError mostly; anything at the address that is not a scheduler too
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SchedulerUnreachableError(
            f"cannot reach a dask scheduler at {address} within {timeout:g} s ({why}); start one with "
            "'dask scheduler' or check the address") from None
    try:
        yield client
    finally:
        client.close()


@dataclass(frozen=True)
class ImageSource:
    """A (..., H, W) input that a worker opens by path: an OME-Zarr image, a plain zarr array or a TIFF."""

    path: str
    shape: tuple[int, ...]

    @classmethod
    def open(cls, path: str | os.PathLike) -> ImageSource:
        """The source at ``path``, its shape read from the metadata (no pixels)."""
        p = Path(path)
        if is_zarr(p):
            return cls(str(p.resolve()), read_zarr(p).data.shape)
        import tifffile

        if not p.is_file():
            raise FileNotFoundError(f"input file {p} does not exist")
        with tifffile.TiffFile(p) as tf:
            return cls(str(p.resolve()), tuple(int(s) for s in tf.series[0].shape))

    def read_plane(self, index: Sequence[int]) -> np.ndarray:
        """One (H, W) plane: a zarr plane through the chunk cache (each chunk decoded once), or one TIFF page."""
        index = tuple(int(i) for i in index)
        p = Path(self.path)
        if not p.exists():
            raise FileNotFoundError(f"{self.path} is not visible on worker {_worker_name()}; the input and output "
                                    "must be on a file system that every worker shares")
        if is_zarr(p):
            return read_zarr(p).data[index]
        import tifffile

        with tifffile.TiffFile(p) as tf:
            series = tf.series[0]
            lead = self.shape[:-2]
            if len(series.pages) == int(np.prod(lead, dtype=np.int64)):  # one page per plane
                return series.asarray(key=int(np.ravel_multi_index(index, lead)) if lead else 0)
            return np.asarray(series.asarray()[index])


def _worker_name() -> str:
    try:
        return _distributed().get_worker().address
    except (ValueError, ImportError):
        return "(not a worker)"


def _model_bytes(saved) -> bytes:
    from .modelio import save_model

    with tempfile.TemporaryDirectory() as d:
        return save_model(Path(d) / "model.cgmodel", saved).read_bytes()


class ModelPlugin(_WorkerPluginBase):
    """Worker plugin carrying one model: sent once to every worker (and to workers that join later), loaded there
    from model-file bytes, and used by every plane task on that worker, one task at a time."""

    def __init__(self, model_bytes: bytes, threads: int = 1):
        self.model_bytes = model_bytes
        self.threads = int(threads)
        self.name = f"napari-coordgate-model-{hashlib.sha256(model_bytes).hexdigest()[:16]}-t{self.threads}"
        self.saved = None
        self.lock = None

    def setup(self, worker=None) -> None:
        import torch

        from .modelio import load_model

        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "model.cgmodel"
            path.write_bytes(self.model_bytes)
            self.saved = load_model(path, "cpu")
        self.model_bytes = b""  # the loaded model holds the weights now
        self.lock = threading.Lock()  # a model (and its gate cache) serves one task at a time
        if self.threads > 0:
            torch.set_num_threads(self.threads)


def _run_plane(plugin_name: str, source: ImageSource, sink: PlaneSink, index: tuple[int, ...], roi,
               predict_kwargs: dict, threads: int) -> tuple[int, ...]:
    """One task: read a plane, deblur it with the worker's model, write it into the unfinished store."""
    import torch

    from .engine import predict

    plugin = _distributed().get_worker().plugins[plugin_name]
    plane = source.read_plane(index)
    with plugin.lock:
        if threads > 0:
            torch.set_num_threads(threads)  # in this thread too: torch's OpenMP thread count is per thread
        restored = predict(plugin.saved, plane, roi=roi, **predict_kwargs)
    sink.write(index, restored)
    return index


def apply_distributed(client, saved, source: ImageSource, writer: OmeZarrWriter, *,
                      roi: Sequence[int] | None = None, predict_kwargs: dict | None = None, threads: int = 1,
                      on_progress: Callable[[int, int], None] | None = None) -> Path:
    """Deblur every plane of ``source`` as one task each on ``client``'s cluster, into ``writer``'s store.

    Parameters
    ----------
    client
        A ``distributed.Client`` (:func:`connect`).
    saved
        The model (:class:`~napari_coordgate.modelio.SavedModel`); sent to each worker once.
    source, writer
        The input and the unfinished OME-Zarr output (:func:`~napari_coordgate.zarrio.create_ome_zarr`) of the
        same shape.
    roi, predict_kwargs
        As for :func:`napari_coordgate.engine.predict` (tile, device, precision...): the same tile plan as a
        single-process run.
    threads
        torch threads per task (with the same number, the output equals a single-process run bit for bit).
    on_progress
        Called as ``on_progress(done_planes, total_planes)``.

    Returns
    -------
    The completed store's path.

    Raises
    ------
    WorkerDiedError
        A plane's workers died more often than the scheduler's ``allowed-failures``.
    Exception
        The first task error (a bad plane, a path a worker cannot see); the remaining tasks are cancelled.
    """
    distributed = _distributed()
    if tuple(source.shape) != tuple(writer.shape):
        raise ValueError(f"input shape {source.shape} and output shape {writer.shape} differ")
    plugin = ModelPlugin(_model_bytes(saved), threads)
    client.register_plugin(plugin, name=plugin.name)
    sink, kwargs = writer.sink(), dict(predict_kwargs or {})
    indices = list(np.ndindex(*writer.shape[:-2]))
    token = uuid.uuid4().hex[:8]
    futures = {
        client.submit(_run_plane, plugin.name, source, sink, idx, roi, kwargs, threads,
                      key=f"{_TASK_PREFIX}-{token}-{k}", pure=False, retries=0): idx
        for k, idx in enumerate(indices)
    }
    try:
        for done, fut in enumerate(distributed.as_completed(futures), start=1):
            try:
                writer.mark_written(fut.result())
            except distributed.KilledWorker:
                raise WorkerDiedError(
                    f"plane {futures[fut]}: every worker that ran it died (out of memory? see the worker logs); "
                    f"the run stopped and the output stays at {writer.store_path}") from None
            if on_progress is not None:
                on_progress(done, len(indices))
    except BaseException:
        client.cancel(list(futures))
        raise
    finally:
        try:
            client.unregister_worker_plugin(plugin.name)
        except Exception:  # noqa: BLE001 - a cluster going away must not hide the run's own outcome
            pass
    return writer.finalize()
