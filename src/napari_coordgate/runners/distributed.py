"""Batch runs on a dask.distributed cluster: every plane of a stack (every z-slab of a volume, for a 3-D model) is
one task, all write into one OME-Zarr store.

::

    with connect("local", workers=2, threads=1) as client:        # or connect("tcp://scheduler:8786")
        writer = create_ome_zarr("out.zarr", source.shape, axes=...)
        apply_distributed(client, saved, source, writer, threads=1)   # -> Path("out.zarr") once complete

The model travels to each worker once, as a worker plugin holding its model-file bytes (safetensors and JSON, the
format of :func:`napari_coordgate.model_io.save_model`; nothing is unpickled from a model file); workers that join
later get it from the scheduler. Each task reads its plane (through the zarr chunk cache, or one TIFF page), runs
:func:`napari_coordgate.engine.predict` on it with the caller's tile plan and torch thread count, so the result is
bit-identical to a single-process run with the same options, and writes the plane into the unfinished store. The
input and the output must be on a file system that every worker sees.

A 3-D model's volumes go as z-slabs, the slabs :func:`napari_coordgate.engine.predict` itself goes through
(:func:`~napari_coordgate.engine.prediction.volume_slabs`: cores of up to ``SLAB_DEPTH`` planes, so a task's memory
stays bounded): each task reads its slab's window (the core and the network's z halo, clipped at the volume's ends),
runs :func:`~napari_coordgate.engine.prediction.predict_slab` (the same tiles, batches and normalisation as the
whole volume's) and writes only its core planes, so the store is again bit-identical to a single-process run; its
chunks are single planes, so no two tasks write one chunk. With per-image normalisation one more task per volume
measures it first. A volume of another z-step is refused before any task (as without a cluster), or with
``resample_z`` restored whole in one task, as a single process does.

Failures: an address where no dask scheduler answers (nothing listening, a web server, a socket that never
speaks) fails in :func:`connect` within its ``timeout`` (before anything is written); a worker that dies
while running a plane gets the plane run again elsewhere by the scheduler (``distributed.scheduler.allowed-failures``
times), after which the run fails; a failed run leaves the output at ``OUT.zarr.partial``, never at ``OUT.zarr``,
and the store is only completed when every plane is recorded as written and holds a chunk for each. The worker
processes of a local cluster ignore Ctrl-C (SIGINT): the terminal sends it to the whole process group, and only the
client process must act on it, by cancelling the tasks and closing the cluster.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import signal
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..image_io.omezarr import OmeZarrWriter, PlaneSink
from ..image_io.read import image_shape, read_plane

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
    "parse_dask_target",
]

INSTALL_HINT = "pip install 'napari-coordgate[distributed]'"
CONNECT_TIMEOUT_S = 5.0  # the whole wait for a scheduler; docs/big-data.md promises a failure within 10 s
_TARGET_HELP = "give 'local' or a scheduler address such as tcp://node01:8786"
_NOT_SCHEDULERS = ("Worker", "Nanny")  # dask servers that answer a handshake but cannot run a client's tasks
_TASK_PREFIX = "napari-coordgate"  # task keys: napari-coordgate-{plane,slab,norm}-...


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


def parse_dask_target(text: str) -> str:
    """The value of ``--dask``, checked: ``"local"`` or a scheduler address, without surrounding blanks.

    Parameters
    ----------
    text
        ``"local"``, or a scheduler address: ``tcp://node01:8786``, ``node01:8786`` (tcp), ``tls://...``.

    Raises
    ------
    ValueError
        An empty value, an unknown scheme or an address without a host or a valid port; one line that says what to
        give instead. Nothing is contacted.
    """
    target = text.strip()
    if not target:
        raise ValueError(f"--dask is empty; {_TARGET_HELP}")
    if target == "local":
        return target
    _distributed()
    from distributed.comm.addressing import parse_address, parse_host_port
    from distributed.comm.registry import get_backend

    scheme, location = parse_address(target)
    try:
        get_backend(scheme)
    except (ValueError, ImportError) as exc:
        raise ValueError(f"--dask {target!r}: {exc}; {_TARGET_HELP}") from None
    if scheme == "inproc":  # a scheduler in this very process (tests, notebooks): no host or port
        return target
    try:
        host, port = parse_host_port(location)
    except ValueError as exc:
        raise ValueError(f"--dask {target!r}: {exc}; {_TARGET_HELP}") from None
    if not host or not 0 < port < 65536:
        raise ValueError(f"--dask {target!r}: an address needs a host and a port from 1 to 65535; {_TARGET_HELP}")
    return target


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _run_coroutine(coro):
    """Run ``coro`` to completion on a new event loop, also when the calling thread already runs one (notebooks)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def _probe_scheduler(address: str, timeout: float) -> None:
    """Return once a dask scheduler at ``address`` answers an identity request; raise within ``timeout`` s otherwise.

    ``distributed.Client(address, timeout=...)`` bounds the connection but not dask's handshake that follows: a
    server that accepts and never answers (a web dashboard waiting for a request line, a stuck process) holds it
    until that server hangs up. Here one deadline bounds the connection, the handshake and the request.
    """
    distributed = _distributed()
    from distributed.comm import connect as comm_connect
    from distributed.comm.addressing import parse_address
    from distributed.comm.registry import get_backend

    args = distributed.Security().get_connection_args("client")  # tls:// settings from the dask config
    scheme = parse_address(address)[0]
    try:  # offline: a comm package that is missing or broken fails here, not as "nothing answered"
        get_backend(scheme).get_connector()
    except Exception as exc:  # noqa: BLE001
        raise SchedulerUnreachableError(f"cannot connect to {address}: {_first_line(exc)}") from None
    if scheme in ("tls", "wss") and args.get("ssl_context") is None:
        raise SchedulerUnreachableError(f"cannot connect to {address}: {scheme}:// needs the TLS settings of the dask "
                                        "config (distributed.comm.tls)")

    async def identity():
        comm = await comm_connect(address, timeout=timeout, **args)  # retries until timeout, then dask's handshake
        try:
            await comm.write({"op": "identity", "reply": True})
            return await comm.read()
        finally:
            comm.abort()

    async def bounded():
        # a little over the connect's own timeout, so that a connection nobody accepts reports as such
        return await asyncio.wait_for(identity(), timeout + 0.25)

    failed = f"no dask scheduler answered at {address} within {timeout:g} s"
    other = "something else listens there"
    try:
        reply = _run_coroutine(bounded())
    except (asyncio.TimeoutError, TimeoutError):  # connected, then silence: the handshake got no answer
        raise SchedulerUnreachableError(f"{failed} ({other}? it accepted the connection but never answered)") \
            from None
    except Exception as exc:  # noqa: BLE001 - whatever a non-scheduler sends or does ends here as one line
        if type(exc) is OSError:  # dask's connect gave up: refused, unresolvable or unanswered until the timeout
            root = exc
            while root.__cause__ is not None:
                root = root.__cause__
            why = (getattr(root, "strerror", None) or str(root) or _probe(address)).lower()
            raise SchedulerUnreachableError(
                f"{failed} ({why}; start one with 'dask scheduler' or check the address)") from None
        how = "it closed the connection" if isinstance(exc, OSError) else "it does not speak dask's protocol"
        raise SchedulerUnreachableError(f"{failed} ({other}: {how})") from None
    kind = reply.get("type") if isinstance(reply, dict) else None
    if kind is None:
        raise SchedulerUnreachableError(f"{failed} ({other}: its answer is not dask's)")
    if kind in _NOT_SCHEDULERS:
        raise SchedulerUnreachableError(
            f"{address} is a dask {kind.lower()}, not a scheduler; give the scheduler's address (it prints it when "
            "it starts, usually on port 8786)")


def _probe(address: str) -> str:
    """Why a TCP address did not answer, when dask's connect only says it timed out: on a loaded machine its last
    attempt can be cut by the deadline, and the refusals before it are not kept. One plain connection says whether
    the port refuses (nothing listens) or stays silent."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(address)
    if parts.scheme not in ("tcp", "tls") or parts.hostname is None or parts.port is None:
        return "no answer"
    try:
        with socket.create_connection((parts.hostname, parts.port), timeout=0.5):
            return "no answer in time"
    except ConnectionRefusedError:
        return "connection refused"
    except OSError:
        return "no answer"


def dask_setup(worker) -> None:
    """Preload hook, run by each local-cluster worker process as it starts: ignore Ctrl-C (SIGINT) there.

    The terminal sends SIGINT to every process of the foreground group; a worker that took it would print its
    traceback and die while the client is already cancelling the tasks and closing the cluster.
    """
    if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _worker_preloads() -> dict:
    """Preload arguments for local-cluster workers: the dask config's preloads, then :func:`dask_setup`'s module."""
    import dask

    preload = list(dask.config.get("distributed.worker.preload", None) or [])
    argv = list(dask.config.get("distributed.worker.preload-argv", None) or [])
    if argv and isinstance(argv[0], str):  # one argv for all the configured preloads
        argv = [argv] * len(preload)
    argv = argv or [[] for _ in preload]
    return {"preload": [*preload, __name__], "preload_argv": [*argv, []]}


@contextmanager
def _quiet_distributed_logs() -> Iterator[None]:
    """Silence dask's loggers in this process while a cluster is shut down after Ctrl-C: its workers and comms going
    away then are the expected outcome, not an error to report."""
    loggers = [logging.getLogger(name) for name in ("distributed", "tornado", "asyncio")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _set_sigint_blocked(blocked: bool) -> None:
    """Block or unblock SIGINT in the calling thread (POSIX); threads it starts, and their processes, inherit it."""
    if hasattr(signal, "pthread_sigmask"):  # elsewhere the workers' preload alone ignores Ctrl-C
        signal.pthread_sigmask(signal.SIG_BLOCK if blocked else signal.SIG_UNBLOCK, {signal.SIGINT})


def _start_local_cluster(**kwargs):
    """A ``distributed.LocalCluster(**kwargs)``, started so that Ctrl-C reaches only this process's main thread.

    The cluster is built in a helper thread started with SIGINT blocked: the cluster's event-loop thread, and the
    worker processes that it spawns (also the ones it respawns later), inherit the blocked signal from their first
    instruction on, before any preload runs. The calling thread stays interruptible; a Ctrl-C while the cluster
    comes up waits for it, closes it and passes the ``KeyboardInterrupt`` on.
    """
    distributed = _distributed()
    from distributed.gc import disable_gc_diagnosis

    started: Future = Future()

    def start() -> None:
        try:
            started.set_result(distributed.LocalCluster(**kwargs))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            started.set_exception(exc)

    thread = threading.Thread(target=start, name="napari-coordgate-cluster-start", daemon=True)
    if hasattr(signal, "pthread_sigmask"):
        from multiprocessing import resource_tracker

        # Started from here, not from the cluster's thread: starting it unblocks SIGINT in the starting thread.
        resource_tracker.ensure_running()
    was_blocked = hasattr(signal, "pthread_sigmask") and signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    _set_sigint_blocked(True)
    try:
        thread.start()
        _set_sigint_blocked(was_blocked)  # a Ctrl-C that came meanwhile is raised here, with the thread running
        cluster = started.result()
        # The in-process scheduler hooks a Python callback into every garbage collection of this process; a Ctrl-C
        # landing in a collection raises inside that callback, where Python prints and drops it. Its statistics
        # are of no use here, and Ctrl-C must reach the caller.
        disable_gc_diagnosis(force=True)
        return cluster
    except KeyboardInterrupt:
        _set_sigint_blocked(was_blocked)
        if thread.is_alive() or started.done():
            with _quiet_distributed_logs():
                try:
                    started.result().close()
                except Exception:  # noqa: BLE001 - a cluster that failed to start has nothing to close
                    pass
        raise


def _close(client, cluster) -> None:
    """Close a client (if any) and then its local cluster; closing either twice does nothing."""
    if client is not None:
        client.close()
    cluster.close()


@contextmanager
def connect(address: str = "local", *, workers: int | None = None, threads: int = 1,
            timeout: float = CONNECT_TIMEOUT_S) -> Iterator:
    """A dask.distributed client: a new ``LocalCluster`` for ``"local"``, else the scheduler at ``address``.

    Parameters
    ----------
    address
        ``"local"``, or a scheduler address such as ``tcp://node01:8786`` (a cluster started with
        ``dask scheduler`` / ``dask worker`` or by dask-jobqueue); checked by :func:`parse_dask_target`.
    workers
        Worker processes of the local cluster (one task at a time each); default: the CPU cores divided by
        ``threads``. Not allowed with an address: that cluster has its own workers. The local workers ignore
        Ctrl-C; a ``KeyboardInterrupt`` in the ``with`` block closes the cluster without their tracebacks.
    threads
        torch threads per worker, used to size the local cluster.
    timeout
        Seconds to wait for the scheduler, in all: connecting, dask's handshake and a first request.

    Raises
    ------
    ValueError
        ``address`` is empty or malformed (nothing is contacted).
    SchedulerUnreachableError
        Nothing answered as a dask scheduler at ``address`` within ``timeout`` seconds (nothing listening, or
        something else listening there: a web server, a socket that never answers, a dask worker).
    """
    distributed = _distributed()
    address = parse_dask_target(address)
    if workers is not None and workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    if address == "local":
        n = workers or max(1, (os.cpu_count() or 1) // max(threads, 1))
        cluster = _start_local_cluster(n_workers=n, threads_per_worker=1, processes=True,
                                       dashboard_address="127.0.0.1:0", silence_logs=logging.ERROR,
                                       **_worker_preloads())
        client = None
        try:
            client = distributed.Client(cluster)
            yield client
        except KeyboardInterrupt:
            with _quiet_distributed_logs():  # workers and comms going away now are expected, not errors
                _close(client, cluster)
            raise
        finally:
            _close(client, cluster)
        return
    if workers:
        raise ValueError("--workers sizes a local cluster (--dask local); a cluster at an address has its own workers")
    deadline = time.monotonic() + timeout
    _probe_scheduler(address, timeout)
    try:  # a scheduler answered: the client's own connection takes milliseconds, its timeout is a backstop
        client = distributed.Client(address, timeout=max(deadline - time.monotonic(), 1.0))
    except Exception as exc:  # noqa: BLE001 - the scheduler went away between the probe and now
        raise SchedulerUnreachableError(
            f"cannot reach a dask scheduler at {address} within {timeout:g} s ({_first_line(exc)}); start one with "
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
        return cls(str(Path(path).resolve()), image_shape(path))

    def read_plane(self, index: Sequence[int]) -> np.ndarray:
        """One (H, W) plane: a zarr plane through the chunk cache (each chunk decoded once), or one TIFF page."""
        if not Path(self.path).exists():
            raise FileNotFoundError(f"{self.path} is not visible on worker {_worker_name()}; the input and output "
                                    "must be on a file system that every worker shares")
        return read_plane(self.path, self.shape, index)


def _worker_name() -> str:
    try:
        return _distributed().get_worker().address
    except (ValueError, ImportError):
        return "(not a worker)"


def _model_bytes(saved) -> bytes:
    from ..model_io import save_model

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
        self.placed = None  # the device the model sits on, in its layout (predict then uses it without a copy)

    def setup(self, worker=None) -> None:
        import torch

        from ..model_io import load_model

        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "model.cgmodel"
            path.write_bytes(self.model_bytes)
            self.saved = load_model(path, "cpu")
        self.model_bytes = b""  # the loaded model holds the weights now
        self.lock = threading.Lock()  # a model (and its gate cache) serves one task at a time
        if self.threads > 0:
            torch.set_num_threads(self.threads)


@contextmanager
def _worker_model(plugin_name: str, device: str, threads: int) -> Iterator:
    """The worker's model (:class:`ModelPlugin`) on ``device``, held by the calling task alone meanwhile."""
    import torch

    from ..devices import on_device, resolve_device

    plugin = _distributed().get_worker().plugins[plugin_name]
    with plugin.lock:
        if threads > 0:
            torch.set_num_threads(threads)  # in this thread too: torch's OpenMP thread count is per thread
        dev = resolve_device(device)
        if plugin.placed != str(dev):  # once per worker: the model and its gate cache then serve every task
            on_device(plugin.saved.model, dev)
            plugin.placed = str(dev)
        yield plugin.saved


def _run_plane(plugin_name: str, source: ImageSource, sink: PlaneSink, index: tuple[int, ...], roi,
               predict_kwargs: dict, threads: int) -> tuple[int, ...]:
    """One task: read a plane, deblur it with the worker's model, write it into the unfinished store."""
    from ..engine import predict

    plane = source.read_plane(index)
    with _worker_model(plugin_name, predict_kwargs.get("device", "auto"), threads) as saved:
        restored = predict(saved, plane, roi=roi, **predict_kwargs)
    sink.write(index, restored)
    return index


class _VolumeView:
    """One (D, H, W) volume of an :class:`ImageSource` as the engine slices it, read plane by plane (zarr chunks or
    TIFF pages); the last ``keep`` planes read stay in memory, so a slab's overlapping windows read each plane once
    and a sample of every plane (per-image normalisation) holds one at a time."""

    ndim = 3

    def __init__(self, source: ImageSource, lead: tuple[int, ...], keep: int = 1):
        self.source, self.lead, self.keep = source, tuple(lead), max(1, int(keep))
        self.shape = tuple(source.shape[-3:])
        self._planes: OrderedDict[int, np.ndarray] = OrderedDict()

    @property
    def dtype(self) -> np.dtype:
        return (next(iter(self._planes.values())) if self._planes else self.plane(0)).dtype

    def plane(self, z: int) -> np.ndarray:
        if z in self._planes:
            self._planes.move_to_end(z)
            return self._planes[z]
        plane = self._planes[z] = np.asarray(self.source.read_plane(self.lead + (z,)))
        while len(self._planes) > self.keep:
            self._planes.popitem(last=False)
        return plane

    def load(self, z0: int, z1: int) -> _VolumeView:
        """Read the planes ``z0:z1`` now (the caller then computes without waiting on files)."""
        for z in range(z0, z1):
            self.plane(z)
        return self

    def __getitem__(self, key) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        if key and key[0] is Ellipsis:
            key = (slice(None),) * (4 - len(key)) + key[1:]
        zs, ys, xs = (key + (slice(None),) * 3)[:3]
        if len(key) > 3 or not all(isinstance(k, slice) for k in (zs, ys, xs)):
            raise TypeError(f"a volume of {self.source.path} takes three slices, got {key!r}")
        return np.stack([self.plane(z)[ys, xs] for z in range(*zs.indices(self.shape[0]))])


def _measure_volume(plugin_name: str, source: ImageSource, lead: tuple[int, ...]):
    """One task: the per-image normalisation of one volume, measured once for all its slabs."""
    from ..engine.prediction import volume_normalization

    saved = _distributed().get_worker().plugins[plugin_name].saved  # only its normalisation: no lock needed
    return volume_normalization(saved, _VolumeView(source, lead))


def _run_slab(plugin_name: str, source: ImageSource, sink: PlaneSink, lead: tuple[int, ...],
              slab: tuple[int, int, int, int], normalization, roi, predict_kwargs: dict,
              threads: int) -> list[tuple[int, ...]]:
    """One task: read a slab's window (its core and z halo), restore the core planes, write them; their indices."""
    from ..engine.prediction import predict, predict_slab

    z0, z1, w0, w1 = slab
    volume = _VolumeView(source, lead, keep=w1 - w0).load(w0, w1)
    kwargs = dict(predict_kwargs)
    with _worker_model(plugin_name, kwargs.get("device", "auto"), threads) as saved:
        if (z0, z1) == (0, volume.shape[0]):  # one slab: the volume as predict restores it (resampled, too)
            restored = predict(saved, volume, roi=roi, **kwargs)
        else:
            kwargs.pop("resample_z", None)
            restored = predict_slab(saved, volume, (z0, z1), normalization=normalization, roi=roi, **kwargs)
    indices = [lead + (z,) for z in range(z0, z1)]
    for index, plane in zip(indices, restored):
        sink.write(index, plane)
    return indices


def _submit_planes(client, plugin_name: str, source: ImageSource, sink: PlaneSink, roi, kwargs: dict,
                   threads: int, token: str) -> dict:
    """A task per plane: future -> what it restores (for messages)."""
    indices = np.ndindex(*source.shape[:-2])
    return {client.submit(_run_plane, plugin_name, source, sink, idx, roi, kwargs, threads,
                          key=f"{_TASK_PREFIX}-plane-{token}-{k}", pure=False, retries=0): f"plane {idx}"
            for k, idx in enumerate(indices)}


def _submit_slabs(client, saved, plugin_name: str, source: ImageSource, sink: PlaneSink, slabs: list, roi,
                  kwargs: dict, threads: int, token: str) -> dict:
    """A task per z-slab (:func:`~napari_coordgate.engine.prediction.volume_slabs`) of every volume, and one per
    volume measuring its per-image normalisation where it has several slabs: future -> what it restores."""
    futures, k = {}, 0
    for lead in np.ndindex(*source.shape[:-3]):
        norm = None  # the model's own, or measured within the one slab
        where = f" of volume {lead}" if lead else ""
        if len(slabs) > 1 and saved.normalization.per_image:
            norm = client.submit(_measure_volume, plugin_name, source, lead, key=f"{_TASK_PREFIX}-norm-{token}-{k}",
                                 pure=False, retries=0)
            futures[norm], k = f"the normalisation{where}", k + 1
        for slab in slabs:
            fut = client.submit(_run_slab, plugin_name, source, sink, lead, slab, norm, roi, kwargs, threads,
                                key=f"{_TASK_PREFIX}-slab-{token}-{k}", pure=False, retries=0)
            futures[fut], k = f"planes {slab[0]}-{slab[1] - 1}{where}", k + 1
    return futures


def apply_distributed(client, saved, source: ImageSource, writer: OmeZarrWriter, *,
                      roi: Sequence[int] | None = None, predict_kwargs: dict | None = None, threads: int = 1,
                      on_progress: Callable[[int, int], None] | None = None, z_step_um: float | None = None) -> Path:
    """Deblur every plane of ``source`` as one task each on ``client``'s cluster (with a 3-D model every z-slab of
    every volume), into ``writer``'s store.

    Parameters
    ----------
    client
        A ``distributed.Client`` (:func:`connect`).
    saved
        The model (:class:`~napari_coordgate.model_io.SavedModel`); sent to each worker once.
    source, writer
        The input and the unfinished OME-Zarr output (:func:`~napari_coordgate.image_io.omezarr.create_ome_zarr`) of the
        same shape.
    roi, predict_kwargs
        As for :func:`napari_coordgate.engine.predict` (tile, device, precision...): the same tile plan as a
        single-process run.
    threads
        torch threads per task (with the same number, the output equals a single-process run bit for bit).
    on_progress
        Called as ``on_progress(done_planes, total_planes)``.
    z_step_um
        A 3-D model only: the volumes' z-step (µm), when known; checked as by ``predict`` (``resample_z`` in
        ``predict_kwargs`` resamples a volume of another z-step, else it is refused before any task starts).

    Returns
    -------
    The completed store's path.

    Raises
    ------
    WorkerDiedError
        A task's workers died more often than the scheduler's ``allowed-failures``.
    napari_coordgate.checks.InputError
        A volume a 3-D model refuses (fewer planes than it needs, another z-step without ``resample_z``).
    Exception
        The first task error (a bad plane, a path a worker cannot see); the remaining tasks are cancelled.
    """
    distributed = _distributed()
    if tuple(source.shape) != tuple(writer.shape):
        raise ValueError(f"input shape {source.shape} and output shape {writer.shape} differ")
    kwargs, slabs = dict(predict_kwargs or {}), None
    if saved.config.ndim == 3:  # a volume predict would refuse (too few planes, another z-step) fails before any task
        from ..engine.prediction import volume_slabs

        slabs = volume_slabs(saved, source.shape, z_step_um=z_step_um, resample_z=bool(kwargs.get("resample_z")))
    plugin = ModelPlugin(_model_bytes(saved), threads)
    client.register_plugin(plugin, name=plugin.name)
    sink, token = writer.sink(), uuid.uuid4().hex[:8]
    if slabs is None:
        futures = _submit_planes(client, plugin.name, source, sink, roi, kwargs, threads, token)
    else:
        futures = _submit_slabs(client, saved, plugin.name, source, sink, slabs, roi,
                                dict(kwargs, z_step_um=z_step_um), threads, token)
    total, done = int(np.prod(writer.shape[:-2], dtype=np.int64)), 0
    try:
        for fut in distributed.as_completed(futures):
            try:
                result = fut.result()  # a plane's index, a slab's plane indices, or a volume's normalisation
            except distributed.KilledWorker:
                raise WorkerDiedError(
                    f"{futures[fut]}: every worker that ran it died (out of memory? see the worker logs); "
                    f"the run stopped and the output stays at {writer.store_path}") from None
            written = [result] if isinstance(result, tuple) else result if isinstance(result, list) else []
            for index in written:
                writer.mark_written(index)
            done += len(written)
            if on_progress is not None and written:
                on_progress(done, total)
    except BaseException:
        writer.release()  # the unfinished store stays .partial; the next run may write it
        client.cancel(list(futures))
        raise
    finally:
        try:
            client.unregister_worker_plugin(plugin.name)
        except Exception:  # noqa: BLE001 - a cluster going away must not hide the run's own outcome
            pass
    return writer.finalize()
