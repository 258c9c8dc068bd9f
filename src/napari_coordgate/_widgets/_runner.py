"""Run one job at a time in a napari ``thread_worker``, with a stop flag and a message relay.

A job (:mod:`napari_coordgate.app.jobs`) is a plain function; it reports through a callable and polls
``should_stop``. The callable emits a Qt signal of a relay object living on the GUI thread, so messages cross threads
through Qt's queued connections and the GUI thread alone touches widgets and layers. Errors reach napari's
notifications through the dock's ``errored`` handler.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

from napari.qt.threading import create_worker
from qtpy.QtCore import QObject, Signal
from superqt.utils import FunctionWorker


class _Relay(QObject):
    message = Signal(object)


class Task:
    """A started job: its worker, its stop flag, and a flag set when the thread has left the job."""

    def __init__(self, name: str, worker, stop: threading.Event, finished: threading.Event):
        self.name = name
        self.worker = worker
        self.stop = stop
        self.finished = finished

    def cancel(self) -> None:
        # the job polls ``stop`` and returns what it has (training: the best model so far); worker.quit()
        # would make the worker drop that return value
        self.stop.set()


def _guarded(fn: Callable, finished: threading.Event) -> Callable:
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        finally:
            finished.set()

    return run


class TaskRunner:
    """Owns the dock's current task. A plain Python object (no Qt), so it outlives the dock's C++ side:
    connect the dock's ``destroyed`` signal to :meth:`shutdown` and a closing viewer stops the worker."""

    def __init__(self) -> None:
        self.task: Task | None = None

    @property
    def busy(self) -> bool:
        return self.task is not None and not self.task.finished.is_set()

    def start(
        self,
        parent: QObject,
        name: str,
        fn: Callable,
        *args: Any,
        on_message: Callable[[Any], None],
        on_returned: Callable[[Any], None],
        on_errored: Callable[[Exception], None],
        on_finished: Callable[[], None],
    ) -> Task:
        if self.busy:
            raise RuntimeError(f"a task ({self.task.name}) is already running")
        relay = _Relay(parent)
        relay.message.connect(on_message)
        stop, finished = threading.Event(), threading.Event()

        def report(msg: Any) -> None:
            try:
                relay.message.emit(msg)
            except RuntimeError:  # the dock (and its relay) was deleted: nobody listens, stop working
                stop.set()

        # superqt's plain worker: the dock shows each error once, as a napari notification (napari's own
        # worker class would relay it a second time); connecting ``errored`` here also keeps
        # create_worker from re-raising it on the GUI thread
        worker = create_worker(_guarded(fn, finished), *args, report=report, should_stop=stop.is_set,
                               _start_thread=False, _worker_class=FunctionWorker,
                               _connect={"errored": on_errored})
        worker.returned.connect(on_returned)
        worker.finished.connect(on_finished)
        worker.finished.connect(relay.deleteLater)
        self.task = Task(name, worker, stop, finished)
        worker.start()
        return self.task

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()

    def shutdown(self, *_: Any, timeout: float = 10.0) -> None:
        """Stop the running task and wait (bounded) for its thread to leave the job."""
        if self.task is not None:
            self.task.cancel()
            self.task.finished.wait(timeout)
