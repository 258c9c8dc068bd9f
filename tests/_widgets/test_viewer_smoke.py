"""The plugin's manifest reaches a real napari viewer, and the viewer renders under Xvfb."""

import numpy as np


def test_sample_data_opens_and_canvas_is_not_blank(make_napari_viewer):
    viewer = make_napari_viewer(show=True)  # an unshown window renders nothing
    viewer.open_sample("napari-coordgate", "cell_field")
    assert [layer.name for layer in viewer.layers] == ["cell (sharp)"]
    shot = viewer.screenshot(canvas_only=True, flash=False)
    assert shot.ndim == 3 and shot.shape[-1] == 4
    assert float(np.std(shot[..., :3])) > 5.0, "canvas rendered blank (no GL context?)"
