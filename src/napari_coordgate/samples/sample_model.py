"""The model shipped for the bundled sample optics: *Open Sample -> Apply -> Evaluate* works without training.

It is a CoordGate U-Net(2) (the dock's default network) trained from the PSF model of the sample data (preset
``gaussian`` on a 256 x 256 field, 1000-photon noise) on the built-in training specimens (bundled and procedural,
:data:`~napari_coordgate.samples.specimens.TRAIN_SOURCES`), the best epoch picked on the held-out validation
specimens (:func:`~napari_coordgate.samples.specimens.validation_fields`). It knows those synthetic optics, not any
real microscope. Regenerate it with::

    python -m napari_coordgate.samples.sample_model   # writes samples/models/sample_gaussian.cgmodel
"""

from __future__ import annotations

import sys
from pathlib import Path

SAMPLE_MODEL = Path(__file__).parent / "models" / "sample_gaussian.cgmodel"
# the recipe: the dock's defaults, an epochs budget so the file is reproducible on any machine (seeded, 1 thread,
# float32: no bf16 autocast, which only CPUs with bf16 instructions would use)
EPOCHS, STEPS_PER_EPOCH = 60, 25
TRAIN_FIELDS = 48  # six fields of each training source


#: images in neither its training nor its validation specimens, blurred by its optics: two fixed crops of each
#: (what tests/samples/test_sample_model.py and benchmarks/bench_sample_model.py score it on)
HELD_OUT = tuple((name, crop) for name in ("moon", "hubble_deep_field", "retina") for crop in (0, 1))


def held_out_pair(name: str, crop: int):
    """(sharp, blurred) float32 of one of :data:`HELD_OUT`: a crop of the sample field's shape, blurred by the
    sample optics with the sample photons, its noise seeded by its place in the list."""
    from ..optics.blur import synthesize_pairs
    from .sample_data import SAMPLE_PHOTONS, SAMPLE_PRESET, SAMPLE_SHAPE
    from .specimens import specimen_fields

    sharp = specimen_fields(1, SAMPLE_SHAPE, seed=crop, sources=(name,))[0]
    _, blurred = synthesize_pairs(sharp, SAMPLE_PRESET, photons=SAMPLE_PHOTONS, seed=10 + HELD_OUT.index((name, crop)))
    return sharp, blurred


def sample_model_path() -> Path:
    """The shipped model file (raises FileNotFoundError with the regeneration command if it is missing)."""
    if not SAMPLE_MODEL.is_file():
        raise FileNotFoundError(f"the sample model {SAMPLE_MODEL} is missing; regenerate it with "
                                "`python -m napari_coordgate.samples.sample_model`")
    return SAMPLE_MODEL


def make_sample_model(out: Path = SAMPLE_MODEL) -> Path:
    """Train the sample model from the sample optics on the built-in specimens and write it to ``out``."""
    from .. import engine
    from ..config import ModelConfig, TrainConfig
    from ..model_io import save_model
    from .sample_data import SAMPLE_PHOTONS, SAMPLE_PRESET, SAMPLE_SHAPE
    from .specimens import TRAIN_SOURCES, specimen_fields, validation_fields

    source = engine.SimulatedSource(specimen_fields(TRAIN_FIELDS, SAMPLE_SHAPE, seed=0, sources=TRAIN_SOURCES),
                                    SAMPLE_PRESET, val_sharp=validation_fields(SAMPLE_SHAPE))
    recipe = TrainConfig(epochs=EPOCHS, steps_per_epoch=STEPS_PER_EPOCH, device="cpu", threads=1, seed=0, amp=False,
                         photons=SAMPLE_PHOTONS, read_noise=0.0)  # the sample data's noise
    result = engine.train(ModelConfig(), recipe, source)
    result.saved.provenance["note"] = (f"trained from the synthetic sample optics (preset {SAMPLE_PRESET!r}) on the "
                                       "built-in specimens; not a model of any real microscope")
    out.parent.mkdir(parents=True, exist_ok=True)
    return save_model(out, result.saved)


if __name__ == "__main__":  # pragma: no cover - the regeneration command
    print(make_sample_model(Path(sys.argv[1]) if len(sys.argv) > 1 else SAMPLE_MODEL))
