"""A run whose kept model is no better than its input says so (3-D runs have stalled at their input)."""

import pytest
from engine_helpers import TINY, _pairs, _quick

from napari_coordgate.engine import PairSource, TrainResult, train
from napari_coordgate.engine.run import STALLED_GAIN_DB


@pytest.mark.parametrize("stopped", ["budget", "early_stop"])
def test_a_model_no_better_than_its_input_gets_a_stall_message(stopped):
    res = TrainResult(None, best_val_psnr=41.30, input_val_psnr=41.299, stopped=stopped)
    msg = res.stall_message()
    assert msg is not None and "no better than its input" in msg and "41.30 dB" in msg and "another seed" in msg


def test_a_model_above_its_input_or_a_run_with_its_own_message_gets_none():
    assert TrainResult(None, best_val_psnr=41.3 + 2 * STALLED_GAIN_DB, input_val_psnr=41.3).stall_message() is None
    for stopped in ("stopped", "diverged", "crashed: killed"):
        assert TrainResult(None, best_val_psnr=41.3, input_val_psnr=41.3, stopped=stopped).stall_message() is None
    assert TrainResult(None, best_val_psnr=41.3).stall_message() is None  # the input's PSNR unknown


def test_training_reports_the_inputs_validation_psnr_and_a_run_that_cannot_learn_stalls():
    sharp, blurred = _pairs()
    frozen = train(TINY, _quick(epochs=1, steps_per_epoch=2, lr=1e-6), PairSource(sharp, blurred))
    assert frozen.input_val_psnr == pytest.approx(frozen.history[-1].input_psnr)
    assert frozen.stall_message() is not None
    learnt = train(TINY, _quick(epochs=3, steps_per_epoch=8), PairSource(sharp, blurred))
    assert learnt.best_val_psnr > learnt.input_val_psnr + STALLED_GAIN_DB and learnt.stall_message() is None
