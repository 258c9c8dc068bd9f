"""Render docs/screenshot.png for the README: the dock after training, applying and evaluating.

Not collected by pytest. Run from the repository root on a machine with a display (or under Xvfb):

    xvfb-run -s "-screen 0 1920x1080x24" python tests/_widgets/make_screenshot.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import napari
from qtpy.QtWidgets import QApplication

from napari_coordgate.app.state import State


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
    viewer.window.resize(1850, 1000)
    _, dock = viewer.window.add_plugin_dock_widget("napari-coordgate", "CoordGate deblur")
    viewer.open_sample("napari-coordgate", "calibration_pair")
    t = dock.train_tab  # the dock's defaults (network, recipe, sample pair picked by itself), a short budget
    t.budget_kind.value = "epochs"
    t.budget.value = 6
    t.steps_per_epoch.value = 20
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
    # sharp | blurred | restored side by side (grid order = layer order), all with the sharp image's contrast limits
    viewer.layers.remove("error map (calibration (blurred) (CoordGate))")
    limits = tuple(viewer.layers["calibration (sharp)"].contrast_limits)
    for layer in viewer.layers:
        layer.contrast_limits = limits
    viewer.grid.enabled = True
    viewer.grid.shape = (1, 3)
    viewer.grid.spacing = 0.05
    viewer.reset_view()
    dock.tabs.setCurrentWidget(t)
    from napari._qt.dialogs.qt_notification import NapariQtNotification

    for widget in QApplication.allWidgets():  # the "training budget" toast would cover the images
        if isinstance(widget, NapariQtNotification):
            widget.close()
    for _ in range(40):
        QApplication.processEvents()
        time.sleep(0.05)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(path=out, canvas_only=False, flash=False)
    h = [u for u in t.history if u.kind == "epoch"]
    print(f"wrote {out}: validation PSNR {h[0].val_psnr:.2f} -> {h[-1].val_psnr:.2f} dB "
          f"(input {h[-1].input_psnr:.2f} dB)")
    viewer.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
