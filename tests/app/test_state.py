"""The State enum decides which actions are enabled (pure Python, no viewer)."""

from napari_coordgate.app.state import State, enabled_actions


def test_only_stop_is_enabled_while_training():
    assert enabled_actions(State.TRAINING, has_model=True) == {"stop"}


def test_model_actions_need_a_model():
    idle = enabled_actions(State.IDLE, has_model=False)
    assert "train" in idle and "load" in idle
    assert not {"apply", "save", "gates"} & idle
    assert {"apply", "save", "gates"} <= enabled_actions(State.IDLE, has_model=True)


def test_nothing_is_enabled_while_stopping_or_busy():
    assert not enabled_actions(State.STOPPING, True)
    assert not enabled_actions(State.BUSY, True)


def test_adapt_is_enabled_like_train_even_without_a_model():
    # without a model its button says to train or load one first, rather than being greyed out unexplained
    assert "adapt" in enabled_actions(State.IDLE, has_model=False)
    assert not {"adapt", "train"} & (enabled_actions(State.TRAINING, True) | enabled_actions(State.STOPPING, True))
