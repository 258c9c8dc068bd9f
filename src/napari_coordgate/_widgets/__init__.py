"""The napari dock widget: the only Qt code of napari-coordgate.

Widgets read layers and build configs on the GUI thread, then hand copies of the arrays to a
``thread_worker`` that calls the engine (see :mod:`napari_coordgate.app.jobs`, which has no Qt).
"""

from ._dock import CoordGateDock

__all__ = ["CoordGateDock"]
