"""The model shipped for the bundled sample optics: *Open Sample -> Apply -> Evaluate* works without training.

It is a CoordGate U-Net(2) (the dock's default network) trained on the synthetic calibration pair of
``samples.sample_data.calibration_pair`` (preset ``gaussian``, 256 x 256) only: it knows those synthetic optics, not
any real microscope. Regenerate it with::

    python -m napari_coordgate.samples.sample_model   # writes samples/models/sample_gaussian.cgmodel
"""

from __future__ import annotations

import sys
from pathlib import Path

SAMPLE_MODEL = Path(__file__).parent / "models" / "sample_gaussian.cgmodel"
# the recipe: the dock's defaults, an epochs budget so the file is reproducible on any machine (seeded, 1 thread,
# float32: no bf16 autocast, which only CPUs with bf16 instructions would use)
EPOCHS, STEPS_PER_EPOCH = 30, 20


def sample_model_path() -> Path:
    """The shipped model file (raises FileNotFoundError with the regeneration command if it is missing)."""
    if not SAMPLE_MODEL.is_file():
        raise FileNotFoundError(f"the sample model {SAMPLE_MODEL} is missing; regenerate it with "
                                "`python -m napari_coordgate.samples.sample_model`")
    return SAMPLE_MODEL


def make_sample_model(out: Path = SAMPLE_MODEL) -> Path:
    """Train the sample model on the bundled calibration pair and write it to ``out``."""
    from .. import engine
    from ..config import ModelConfig, TrainConfig
    from ..model_io import save_model
    from .sample_data import calibration_pair

    (sharp, _, _), (blurred, meta, _) = calibration_pair()
    result = engine.train(ModelConfig(), TrainConfig(epochs=EPOCHS, steps_per_epoch=STEPS_PER_EPOCH, device="cpu",
                                                     threads=1, seed=0, amp=False),
                          engine.PairSource(sharp, blurred, psf=meta["metadata"]["psf_preset"]))
    result.saved.provenance["note"] = ("trained on the synthetic sample pair only (preset 'gaussian'); "
                                       "not a model of any real microscope")
    out.parent.mkdir(parents=True, exist_ok=True)
    return save_model(out, result.saved)


if __name__ == "__main__":  # pragma: no cover - the regeneration command
    print(make_sample_model(Path(sys.argv[1]) if len(sys.argv) > 1 else SAMPLE_MODEL))
