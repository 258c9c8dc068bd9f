"""Render docs/screenshot.png for the README: the dock after training, applying and evaluating.

Not collected by pytest. Run from the repository root on a machine with a display (or under Xvfb):

    xvfb-run -s "-screen 0 1600x1000x24" python tests/_widgets/make_screenshot.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import napari
from qtpy.QtWidgets import QApplication

from napari_coordgate._widgets._state import State


def _wait(dock, timeout: float = 300.0) -> None:
    start = time.monotonic()
    while dock.runner.busy or dock.state is not State.IDLE:
        QApplication.processEvents()
        time.sleep(0.02)
        if time.monotonic() - start > timeout:
            raise TimeoutError("the dock did not finish in time")
    QApplication.processEvents()


def main(out: str = "docs/screenshot.png") -> None:
    viewer = napari.Viewer(show=True)
    viewer.window.resize(1500, 950)
    _, dock = viewer.window.add_plugin_dock_widget("napari-coordgate", "CoordGate deblur")
    viewer.open_sample("napari-coordgate", "calibration_pair")
    t = dock.train_tab
    t.sharp.setCurrentText("calibration (sharp)")
    t.blurred.setCurrentText("calibration (blurred)")
    t.depth.setValue(2)
    t.channels.setValue(8)
    t.budget_kind.setCurrentText("minutes")
    t.budget.setValue(0.5)
    t.steps_per_epoch.setValue(20)
    t.device.setCurrentText("cpu")
    t.start_btn.click()
    _wait(dock)
    dock.apply_tab.image.setCurrentText("calibration (blurred)")
    dock.apply_tab.apply_btn.click()
    _wait(dock)
    ev = dock.eval_tab
    ev.gt.setCurrentText("calibration (sharp)")
    ev.restored.setCurrentText("calibration (blurred) (CoordGate)")
    ev.blurred.setCurrentText("calibration (blurred)")
    ev.eval_btn.click()
    _wait(dock)
    viewer.layers["error map (calibration (blurred) (CoordGate))"].visible = False
    viewer.layers["calibration (sharp)"].visible = False
    viewer.layers["calibration (blurred)"].visible = False
    dock.tabs.setCurrentWidget(t)
    for _ in range(20):
        QApplication.processEvents()
        time.sleep(0.05)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(path=out, canvas_only=False, flash=False)
    print(f"wrote {out}")
    viewer.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
