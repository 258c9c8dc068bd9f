"""Progress for people and for log files: a bar on a terminal, plain lines in a batch job's output."""

import io

import numpy as np
import tifffile

from napari_coordgate.cli import main
from napari_coordgate.runners.console import LineProgress, progress


def test_a_log_gets_a_line_at_most_every_period_and_every_forced_one():
    now = [0.0]
    out = io.StringIO()
    log = LineProgress("job", every=10.0, stream=out, clock=lambda: now[0])
    for t in range(0, 35):  # one update a second
        now[0] = float(t)
        log.line(f"step {t}", force=(t == 17))
    lines = out.getvalue().splitlines()
    assert lines == ["job: step 0 [0 s]", "job: step 10 [10 s]", "job: step 17 [17 s]", "job: step 27 [27 s]"]


def test_counting_progress_into_a_log_ends_with_the_total(capsys):
    with progress("stack.tif", "plane") as on_progress:
        for done in range(1, 6):
            on_progress(done, 5)
    err = capsys.readouterr().err
    assert "\r" not in err
    assert err.splitlines()[-1].startswith("stack.tif: 5 of 5 planes (100 %)")


def test_training_into_a_log_writes_a_plain_line_per_epoch_not_bar_redraws(tmp_path, capsys):
    image = (np.random.default_rng(0).random((64, 64)) * 1000 + 100).astype(np.float32)
    tifffile.imwrite(tmp_path / "s.tif", image)

    code = main(["train", "--sharp", str(tmp_path / "s.tif"), "--psf", "gaussian", "-o", str(tmp_path / "m"),
                 "--depth", "1", "--channels", "2", "--crop", "32", "--batch", "2", "--steps-per-epoch", "3",
                 "--epochs", "3", "--device", "cpu"])

    err = capsys.readouterr().err
    assert code == 0, err
    assert "\r" not in err
    epochs = [line for line in err.splitlines() if line.startswith("train coordgate U-Net(1): epoch")]
    assert 3 <= len(epochs) <= 5  # the first step, one per epoch, the end
    assert any("epoch 3 " in line and "best val" in line for line in epochs)
