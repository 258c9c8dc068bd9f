"""napari-coordgate: position-aware deblurring of microscope images with CoordGate U-Nets.

Importing the package must stay cheap: it imports neither torch nor Qt, so napari can read the plugin
manifest without them. The few functions of a script's everyday work are here, loaded on first use::

    import napari_coordgate as cg

    psf = cg.calibrate(bead_image, na=1.4, wavelength_um=0.52, immersion=1.518, pixel_size_um=0.1).model
    result = cg.train(cg.ModelConfig(), cg.TrainConfig(minutes=10), cg.SimulatedSource(sharp, psf))
    cg.save_model("scope.cgmodel", result.saved)
    restored = cg.predict(cg.load_model("scope.cgmodel"), blurred)

Everything else lives in the packages by role (``optics``, ``nn``, ``calibration``, ``model_io``, ``image_io``,
``engine``, ``runners``...; docs/architecture.md draws them).
"""

from importlib import import_module

from ._version import __version__

#: public name -> module that defines it (imported when the name is first used)
_FACADE = {
    "ModelConfig": "napari_coordgate.config",
    "TrainConfig": "napari_coordgate.config",
    "PredictConfig": "napari_coordgate.config",
    "AdaptConfig": "napari_coordgate.config",
    "PairSource": "napari_coordgate.engine",
    "SimulatedSource": "napari_coordgate.engine",
    "train": "napari_coordgate.engine",
    "predict": "napari_coordgate.engine",
    "adapt": "napari_coordgate.engine",
    "calibrate": "napari_coordgate.calibration.calibrate",
    "calibrate_zstack": "napari_coordgate.calibration.zstack",
    "resolve_psf": "napari_coordgate.model_io",
    "load_model": "napari_coordgate.model_io",
    "save_model": "napari_coordgate.model_io",
    "load_psf_model": "napari_coordgate.model_io",
    "save_psf_model": "napari_coordgate.model_io",
    "load_any": "napari_coordgate.model_io.bioimageio",
    "export_package": "napari_coordgate.model_io.bioimageio",
}

__all__ = ["__version__", *_FACADE]


def __getattr__(name: str):
    if name in _FACADE:
        value = getattr(import_module(_FACADE[name]), name)
        globals()[name] = value  # looked up once
        return value
    raise AttributeError(f"module 'napari_coordgate' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_FACADE))
