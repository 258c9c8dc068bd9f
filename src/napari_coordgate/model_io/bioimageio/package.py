"""BioImage Model Zoo (bioimage.io) packages: export a model, load a package this tool exported.

:func:`export_package` writes a zip that follows the current bioimage.io model description (format 0.5.x; the
description is built and validated with ``bioimageio.spec``, the optional extra ``napari-coordgate[bioimageio]``):

- two inputs: ``image`` (batch, channel, y, x) and ``coords`` (batch, channel = x then y, y, x), the normalised
  field coordinates of every pixel (:func:`napari_coordgate.nn.field_coordinates`), so a consumer that tiles
  the image tiles the coordinates with it and every tile is gated for its place in the field;
- two outputs: ``restored`` and ``coords_echo`` (the coordinates passed through). A bioimage.io consumer pads
  and tiles an input by the halo of an output that refers to it, so the echo output is what makes it pad and
  tile the coordinates like the image;
- weights as ``pytorch_state_dict`` with a self-contained architecture file (``coordgate_unet.py``, copied from
  :mod:`napari_coordgate.model_io.bioimageio.arch`; it imports only torch) and as ``torchscript`` (scripted, because the
  network finds the unpadded part of its input from the coordinates, which tracing cannot record);
- test input and output tensors computed by the exported network, a README with the CoordGate citation, the
  training provenance, the field and the PSF model, and the original ``.cgmodel`` file as an attachment.

A 3-D model (``ModelConfig(ndim=3)``) gets the same package with a z axis: ``image``, ``coords`` (the same (x, y)
on every plane: the gates depend on the field position only) and both outputs are (batch, channel, z, y, x), the
outputs with the z halo of :func:`napari_coordgate.nn.unet.receptive_halo_z`; the architecture is the file's
``CoordGateUNet3D``, the test tensors a small volume, and the z-step goes in the z axes' descriptions, the
``config`` and the attached model file (loading the package back gives it).

The intensity normalisation lives inside the network, not in pre/postprocessing: the network computes
``(x - offset) / scale`` and ``y * scale + offset`` as :func:`napari_coordgate.engine.predict` does (with per-image
normalisation, offset and scale from each input's own percentiles; bioimage.io's ``scale_linear`` has no inverse
for the output), and a consumer that runs the weights without the description's processing (a TorchScript
runtime, a Java tool) still gets output in the input's units.

:func:`load_package` reads a package back (the ``.cgmodel`` attachment: safetensors + JSON, nothing unpickled)
and refuses, with a one-line reason, a package that another tool made: running it would mean running its
architecture code and unpickling its weights.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from ..._version import __version__
from ...data import PLANE_SAMPLE_PIXELS, Normalization
from .. import (
    MODEL_SUFFIX,
    ModelFileError,
    SavedModel,
    atomic_write,
    existing_file,
    load_model,
    save_model,
    state_dict_mismatch,
)

__all__ = [
    "PACKAGE_FORMAT", "PackageError", "describe_package", "export_package", "is_package", "load_any", "load_package",
]

PACKAGE_FORMAT = "napari-coordgate-bioimageio"
PACKAGE_SCHEMA_VERSION = 1
ARCH_FILE = "coordgate_unet.py"
ARCH_CALLABLE = "CoordGateUNet"
ARCH_CALLABLE_3D = "CoordGateUNet3D"  # the architecture of 3-D models (ModelConfig.ndim = 3), in the same file
MODEL_FILE = "model" + MODEL_SUFFIX
FORMAT_VERSION = "0.5.12"  # the bioimage.io model format written (and validated with bioimageio.spec 0.5.12)
_RDF_NAMES = ("rdf.yaml", "bioimageio.yaml")
_TEST_SIDE = 256  # test tensors: a crop of at most this side from the field's centre
#: 3-D models: a volume of at most this side in y and x and this many planes, or the smallest bioimage.io tools
#: accept if larger (twice the halo plus the network's minimum, per axis; bioimageio.core's test needs it)
_TEST_SIDE_3D = 64
_TEST_PLANES = 16
#: largest uncompressed member a package may hold: far more than a model file of any network napari-coordgate trains
#: (a U-Net of 64 base channels and depth 5 is about 100 MB); a member is read whole into memory
MAX_MEMBER_BYTES = 2 << 30
MAX_RDF_BYTES = 16 << 20  # the description: ours are a few kilobytes
#: a model file's float weights deflate about 1.1 times; only a crafted (or zero-filled) member inflates 100 times.
#: Members smaller than _RATIO_FLOOR are not judged by it (tiny files compress unevenly, and cost nothing)
_MAX_RATIO = 100
_RATIO_FLOOR = 1 << 20
COORDGATE_DOI = "10.48550/arXiv.2401.04680"
COORDGATE_CITATION = (
    "Howard, Norreys & Döpp, CoordGate: Efficiently Computing Spatially-Varying Convolutions in "
    "Convolutional Neural Networks, arXiv:2401.04680"
)


class PackageError(ModelFileError):
    """A bioimage.io package cannot be written or read (or was made by another tool)."""


# -- export ---------------------------------------------------------------------------------------------------
def arch_kwargs(saved: SavedModel) -> dict[str, Any]:
    """Keyword arguments of the architecture file's ``CoordGateUNet`` for ``saved``."""
    cfg = saved.config
    kwargs = {
        "depth": int(cfg.depth),
        "level_channels": [int(c) for c in cfg.level_channels()],
        "gate": cfg.gate,
        "gate_hidden": int(cfg.gate_hidden),
        "gate_layers": int(cfg.gate_layers),
        "gate_activation": cfg.gate_activation,
        "residual": bool(cfg.residual),
        "prefilter_channels": int(cfg.prefilter_channels),
        "prefilter_size": int(cfg.prefilter_size),
        "in_channels": int(cfg.in_channels),
        "out_channels": int(cfg.out_channels),
        "offset": saved.normalization.offset,
        "scale": saved.normalization.scale,
        "percentiles": saved.normalization.to_dict().get("percentiles"),
        "sample_pixels": PLANE_SAMPLE_PIXELS,
    }
    if cfg.ndim == 3:  # CoordGateUNet3D: no Wiener first stage (2-D only), z pooled from pooling z_pool_start on
        del kwargs["prefilter_channels"], kwargs["prefilter_size"]
        kwargs = {"depth": kwargs.pop("depth"), "level_channels": kwargs.pop("level_channels"),
                  "z_pool_start": int(cfg.z_pool_start), **kwargs}
    return kwargs


def arch_callable(saved: SavedModel) -> str:
    """The name of the architecture file's network class for ``saved``: 2-D or 3-D."""
    return ARCH_CALLABLE_3D if saved.config.ndim == 3 else ARCH_CALLABLE


def _architecture_source() -> str:
    return (Path(__file__).parent / "arch.py").read_text(encoding="utf-8")


def _standalone_network(saved: SavedModel):
    """The exported network (architecture file + the model's state dict, keys unchanged), on CPU, eval."""
    import torch

    from . import arch

    net = getattr(arch, arch_callable(saved))(**arch_kwargs(saved))
    state = {k: v.detach().to("cpu") for k, v in saved.model.state_dict().items()}
    mismatch = state_dict_mismatch(net.state_dict(), state)
    if mismatch is not None:  # a network this module does not know how to export
        raise PackageError(f"the model's weights do not fit the exported architecture ({mismatch})")
    net.load_state_dict(state, strict=True)
    return net.eval().to(torch.float32)


def _synthetic_field(shape: tuple[int, int], channels: int, norm: Normalization) -> np.ndarray:
    """A deterministic test image: blurred blobs and a gradient, spanning the model's normalisation range."""
    rng = np.random.default_rng(0)
    H, W = shape
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    img = 0.1 + 0.2 * (xx / max(W - 1, 1))
    for _ in range(max(8, H * W // 400)):
        cy, cx = rng.uniform(0, H), rng.uniform(0, W)
        s = rng.uniform(1.0, 4.0)
        img = img + rng.uniform(0.2, 0.8) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
    img = np.clip(img, 0.0, 1.2)
    img = norm.offset + norm.scale * img
    return np.repeat(img[None], channels, axis=0).astype(np.float32)


def _synthetic_volume(shape: tuple[int, int, int], channels: int, norm: Normalization) -> np.ndarray:
    """A deterministic test volume (3-D models): blurred 3-D blobs and a gradient in the normalisation range."""
    rng = np.random.default_rng(0)
    D, H, W = shape
    zz, yy, xx = np.mgrid[0:D, 0:H, 0:W].astype(np.float64)
    img = 0.1 + 0.2 * (xx / max(W - 1, 1))
    for _ in range(max(8, D * H * W // 2000)):
        cz, cy, cx = rng.uniform(0, D), rng.uniform(0, H), rng.uniform(0, W)
        s = rng.uniform(1.0, 3.0)
        img = img + rng.uniform(0.2, 0.8) * np.exp(-((zz - cz) ** 2 + (yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
    img = np.clip(img, 0.0, 1.2)
    img = norm.offset + norm.scale * img
    return np.repeat(img[None], channels, axis=0).astype(np.float32)


def _checked_test_input(test_input, cfg, H: int, W: int) -> np.ndarray:
    """``test_input`` as (C, H, W), or (C, D, H, W) for a 3-D model, checked against the training field."""
    field = np.asarray(test_input)
    if field.ndim == cfg.ndim:
        field = field[None]
    if cfg.ndim == 2:
        ok = field.ndim == 3 and field.shape[0] == cfg.in_channels and field.shape[1:] == (H, W)
        want = f"{H}x{W}" if cfg.in_channels == 1 else f"({cfg.in_channels}, {H}, {W})"
        what = f"an image of the training field's shape {want}"
    else:
        min_z = _z_geometry(cfg)[1]  # the test tensor must be a size bioimage.io tools accept
        ok = (field.ndim == 4 and field.shape[0] == cfg.in_channels and field.shape[2:] == (H, W)
              and field.shape[1] >= min_z)
        want = f"(D, {H}, {W})" if cfg.in_channels == 1 else f"({cfg.in_channels}, D, {H}, {W})"
        what = f"a volume of the training field's shape {want} with D >= {min_z} planes"
    if not ok:
        raise ValueError(f"test_input must be {what} (the test tensor is cut from its centre); got shape "
                         f"{tuple(np.shape(test_input))}")
    if not np.issubdtype(field.dtype, np.number) or np.issubdtype(field.dtype, np.complexfloating):
        raise ValueError(f"test_input must hold grey values, got dtype {field.dtype}")
    if not np.isfinite(field).all():
        raise ValueError("test_input contains NaN or Inf values")
    return field


def _test_crop(saved: SavedModel, test_input) -> tuple[np.ndarray, np.ndarray]:
    """Test tensors: (1, C, h, w) image and (1, 2, h, w) coordinates of a centre crop of the field; for a 3-D
    model a (1, C, d, h, w) volume and its (1, 2, d, h, w) coordinates (the same (x, y) on every plane)."""
    from ...nn.coordgate import field_coordinates
    from ...nn.unet import receptive_halo

    cfg = saved.config
    H, W = (int(s) for s in saved.field_shape)
    m = cfg.min_size
    field = None if test_input is None else _checked_test_input(test_input, cfg, H, W)
    side = _TEST_SIDE if cfg.ndim == 2 else max(_TEST_SIDE_3D, 2 * receptive_halo(cfg) + m)
    h, w = min(H, side) // m * m, min(W, side) // m * m
    if h < m or w < m:
        raise PackageError(f"the {H}x{W} field is smaller than the network's minimum {m}x{m}")
    oy, ox = (H - h) // 2 // m * m, (W - w) // 2 // m * m
    coords = field_coordinates((H, W), (oy, ox), (h, w)).numpy().astype(np.float32)
    if cfg.ndim == 3:
        return _test_volume(saved, field, (oy, ox, h, w), coords)
    if field is None:
        img = _synthetic_field((h, w), cfg.in_channels, saved.normalization)
    else:
        img = field[:, oy : oy + h, ox : ox + w].astype(np.float32)
    return img[None], coords[None]


def _test_volume(saved: SavedModel, field, box, coords: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_test_crop` of a 3-D model: ``box`` = (oy, ox, h, w) in the field, ``coords`` its (2, h, w)."""
    oy, ox, h, w = box
    mz = saved.config.min_depth
    planes = _TEST_PLANES if field is None else field.shape[1]
    d = max(_z_geometry(saved.config)[1], min(planes, _TEST_PLANES) // mz * mz)
    if field is None:
        img = _synthetic_volume((d, h, w), saved.config.in_channels, saved.normalization)
    else:
        oz = (planes - d) // 2
        img = field[:, oz : oz + d, oy : oy + h, ox : ox + w].astype(np.float32)
    volume_coords = np.repeat(coords[:, None], d, axis=1)
    return img[None], volume_coords[None]


def _psf_text(psf) -> str:
    if psf is None:
        return "No PSF model is stored with this model (trained on image pairs without a known PSF model)."
    if hasattr(psf, "describe"):
        lines = [str(psf.describe())]
        record = None
        if hasattr(psf, "to_record"):
            try:
                record = psf.to_record()
            except (TypeError, ValueError, AttributeError, NotImplementedError):  # the docs must not fail an export
                record = None
        arrays = {}
        if isinstance(record, tuple):
            record, arrays = record[0], (record[1] if len(record) > 1 and isinstance(record[1], dict) else {})
        if isinstance(record, dict):
            lines += ["", "```json", json.dumps(record, indent=2, sort_keys=True, default=str), "```"]
        if arrays:
            lines += ["", f"Its arrays ({', '.join(sorted(arrays))}) are stored in the attached `{MODEL_FILE}`."]
        return "\n".join(lines)
    if isinstance(psf, dict):
        kind = psf.get("kind", "psf")
        name = psf.get("name")
        head = f"PSF config ({kind}{', ' + repr(name) if name else ''}) the training pairs were simulated from:"
        return "\n".join([head, "", "```json", json.dumps(psf, indent=2, sort_keys=True, default=str), "```"])
    return f"PSF model: {psf!r}"


def _doc_intro(saved: SavedModel, name: str, created: str) -> str:
    cfg = saved.config
    H, W = (int(s) for s in saved.field_shape)
    gate = {"coordgate": "CoordGate", "coordconv": "CoordConv", "none": "plain (no position input)"}[cfg.gate]
    first = " with a Wiener first stage" if cfg.prefilter_channels else ""
    net, what = ("U-Net", "images") if cfg.ndim == 2 else ("3-D U-Net", f"z-stacks ({saved.z_step_um:g} µm z-step)")
    return f"""# {name}

Deblurring network exported by napari-coordgate {__version__} ({created}): a {gate} {net} with {cfg.depth}
resolution level(s){first}, trained to undo the spatially varying blur of one microscope. It restores {what} of
that microscope's {H} x {W} pixel field (or regions of it); the gate of every pixel depends on where the pixel lies
in that field.

"""


def _axes_text(cfg) -> str:
    return "batch, channel, y, x" if cfg.ndim == 2 else "batch, channel, z, y, x"


def _doc_units(norm: Normalization, axes: str = "batch, channel, y, x", whole: str = "planes") -> str:
    if norm.percentiles is None:
        return f"""- `image` ({axes}), float32: the raw image, in the intensity units of the training
  images. The network normalises it itself (`(image - {norm.offset!r}) / {norm.scale!r}`) and maps its
  output back, so no pre- or postprocessing is needed; do not rescale the image."""
    lo, hi = norm.percentiles
    return f"""- `image` ({axes}), float32: the raw image, in any units (camera offset and gain
  included). The network normalises each sample itself (its {lo:g} and {hi:g} percentiles become 0 and 1) and
  maps its output back to the input's units, so no pre- or postprocessing is needed. Give whole {whole}: a tile
  would be normalised by its own percentiles."""


def _doc_inputs(saved: SavedModel) -> str:
    H, W = (int(s) for s in saved.field_shape)
    norm = saved.normalization
    axes = _axes_text(saved.config)
    return f"""## Inputs

{_doc_units(norm, axes, "planes" if saved.config.ndim == 2 else "volumes")}
- `coords` ({axes}) with channel 0 = x (column) and channel 1 = y (row), float32: the position of
  every pixel in the {H} x {W} training field, each axis normalised to [-1, 1] at pixel centres:

  ```
  x = (2 * column - ({W} - 1)) / ({W} - 1)        y = (2 * row - ({H} - 1)) / ({H} - 1)
  ```

  where `row, column` are the pixel's indices in the full field. For an image of the whole field:

  ```python
  import numpy as np
  H, W = {H}, {W}
  y, x = np.meshgrid((2 * np.arange(H) - (H - 1)) / max(H - 1, 1),
                     (2 * np.arange(W) - (W - 1)) / max(W - 1, 1), indexing="ij")
  coords = np.stack([x, y])[None].astype(np.float32)   # (1, 2, H, W)
  ```

  For a region of interest starting at (row0, col0) of the field, use `np.arange(row0, row0 + h)` and
  `np.arange(col0, col0 + w)` instead; for an image binned B x B, the field is `H / B` x `W / B` pixels.

"""


def _doc_tiles(m: int, halo: int, min_side: int, per_image: bool = False, axes: str = "batch, channel, y, x",
               whole_input: str = "planes") -> str:
    whole = ("- This model normalises each input by its own percentiles: a tile is normalised by the tile's, so tiles "
             "differ\n  from the whole image's output (a U-Net(2) trained 1 minute on napari-coordgate's sample pair, "
             "96 x 96\n  tiles on the pooling grid: medians up to 5e-5 of the range, single pixels up to 0.26). Run "
             f"whole {whole_input}.\n") if per_image else ""
    return f"""## Outputs

- `restored` ({axes}): the deblurred image, same shape and units as `image`.
- `coords_echo`: `coords` passed through. Ignore it: it exists so that bioimage.io tools pad and tile the
  coordinates exactly as they pad and tile the image (a tool pads an input by the halo of an output that refers
  to it).

## Tiles, halo and sizes

{whole}- The network runs on any image of at least {m} x {m} pixels (it pads to a multiple of {m} itself);
  bioimage.io tools ask for at least {min_side} x {min_side} (twice the halo plus {m}).
- Halo: {halo} pixels (the network's receptive radius, rounded up to {m}); crop it from every tile's output.
  Every tile of `image` must come with the same tile of `coords`.
- Tiles whose top-left corner lies on a multiple of {m} pixels of the image give the whole image's output inside
  their halo (with bioimage.io tiles of {min_side} + n pixels, n a multiple of {m}). Other tiles see a shifted
  pooling grid: they are correct for their own grid but differ from the whole image's output, most at small
  bright features (a U-Net(2) trained 1 minute on napari-coordgate's sample pair: tile medians up to 7e-4 of the
  image range, single pixels up to 0.86; napari-coordgate's benchmarks/bench_bioimageio_tiles.py).
  bioimageio.core puts its last row and column of tiles flush with the image end, off the grid unless the image
  size minus the tile core is a multiple of {m}: for exact output run the whole image, or pad the image to such
  a size.
- At the image border a tool pads the inputs; the network recognises the padding from the coordinates (they stop
  forming an increasing grid), runs on the unpadded part and pads its output back, so border tiles give what the
  image without padding gives. Pad with `symmetric`, `reflect` or `edge` (bioimage.io's default is symmetric);
  constant padding can be mistaken for one extra pixel.

"""


def _doc_field_psf_provenance(saved: SavedModel, test_shape) -> str:
    cfg = saved.config
    H, W = (int(s) for s in saved.field_shape)
    prov = json.dumps(saved.provenance or {}, indent=2, sort_keys=True, default=str)
    return f"""## Field

Field coordinates refer to the {H} x {W} pixel (rows x columns) sensor frame the model was trained on.

## PSF model

{_psf_text(saved.psf)}

## Training provenance

```json
{prov}
```

Network config (napari-coordgate `ModelConfig`):

```json
{cfg.to_json()}
```

Test tensors: a {" x ".join(map(str, test_shape))} crop from the centre of the field and its coordinates.

"""


def _z_geometry(cfg) -> tuple[int, int]:
    """A 3-D model's (z halo, smallest z extent a bioimage.io tool may give): as y and x, twice the halo plus the
    network's minimum depth."""
    from ...nn.unet import receptive_halo_z

    halo_z = receptive_halo_z(cfg)
    return halo_z, 2 * halo_z + cfg.min_depth


def _doc_z(saved: SavedModel) -> str:
    mz = saved.config.min_depth
    halo_z, min_z = _z_geometry(saved.config)
    z = saved.z_step_um
    return f"""## z-stacks (3-D)

- Planes {z:g} µm apart: the z-step of the training volumes. Resample stacks of another z-step to it (the
  network learnt the PSF's extent in planes; `napari-coordgate apply --resample-z` does it for you). The z-step
  is in the z axes' descriptions and in `config`, not in their `scale`: bioimageio.spec computes an output's size
  from its input's as `int(size * scale / scale)`, which for many scales comes out one plane short.
- Every plane of `coords` holds the same (x, y) coordinates: the gates depend on the (y, x) field position only.
  For a volume of D planes, `coords = np.repeat(coords[:, :, None], D, axis=2)` (1, 2, D, H, W) from the 2-D
  snippet above. Tile `coords` in z with the volume (the `coords_echo` output makes bioimage.io tools do so).
- The network runs on volumes of at least {mz} plane(s) (it pads z to a multiple of {mz} itself); bioimage.io
  tools ask for at least {min_z} (twice the z halo plus {mz}). z halo: {halo_z} planes (rounded up to {mz}, so
  z tiles that start on a multiple of {mz} planes give the whole volume's output inside their halo).
- At the first and last planes a tool pads the volume in z. The network cannot tell z padding from planes (the
  coordinates do not change along z), so the output's planes within the z halo of either end see the mirrored
  stack where napari-coordgate sees nothing beyond it, and differ from its output; the other planes equal it. Run
  `napari-coordgate apply -m PACKAGE.zip` for napari-coordgate's output at the ends.

"""


def _doc_citation() -> str:
    return f"""## Citation

If you use this model, cite CoordGate: {COORDGATE_CITATION} (https://arxiv.org/abs/2401.04680).

## napari-coordgate

`napari-coordgate apply -m PACKAGE.zip ...` (or the Model tab) loads this package back exactly: it holds the
original `{MODEL_FILE}` as an attachment.
"""


def _documentation(saved: SavedModel, name: str, halo: int, min_side: int, test_shape, created: str) -> str:
    return (
        _doc_intro(saved, name, created)
        + _doc_inputs(saved)
        + _doc_tiles(saved.config.min_size, halo, min_side, saved.normalization.per_image, _axes_text(saved.config),
                     "planes" if saved.config.ndim == 2 else "volumes")
        + (_doc_z(saved) if saved.config.ndim == 3 else "")
        + _doc_field_psf_provenance(saved, test_shape)
        + _doc_citation()
    )


def _require_spec():
    try:
        import bioimageio.spec  # noqa: F401
    except ImportError:
        raise PackageError(
            "exporting a bioimage.io package needs bioimageio.spec: pip install 'napari-coordgate[bioimageio]'"
        ) from None


def _model_and_file(model) -> tuple[SavedModel, Path | None]:
    """The model to export and the ``.cgmodel`` file it came from (None: save it anew)."""
    if isinstance(model, SavedModel):
        return model, None
    if _looks_like_package(Path(model)):
        return load_package(model), None
    source_file = existing_file(model)
    return load_model(source_file), source_file


def _zip_path(out_zip) -> Path:
    """``out_zip`` with ``.zip`` added if missing; PackageError if its folder does not exist."""
    out = Path(out_zip)
    if out.suffix.lower() != ".zip":
        out = out.with_name(out.name + ".zip")
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise PackageError(f"cannot write {out}: folder {out.parent} does not exist")
    if not os.access(folder, os.W_OK):  # before the export's work, not after it
        raise PackageError(f"cannot write {out}: folder {folder} is not writable")
    return out


def _write_weights(net, d: Path) -> None:
    """The architecture file, the state dict and the TorchScript weights of ``net``, into folder ``d``."""
    import torch

    (d / ARCH_FILE).write_text(_architecture_source(), encoding="utf-8")
    torch.save(net.state_dict(), d / "weights.pt")
    with warnings.catch_warnings():
        # torch >= 2.10 deprecates TorchScript, but it is the bioimage.io weights format Java tools run
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*torch.jit")
        torch.jit.script(net).save(str(d / "weights_torchscript.pt"))


def export_package(model: SavedModel | str | os.PathLike, out_zip: str | os.PathLike, *, test_input=None) -> Path:
    """Write a bioimage.io model package (zip) of a napari-coordgate model.

    Parameters
    ----------
    model
        A :class:`~napari_coordgate.model_io.SavedModel`, the path of a ``.cgmodel`` file, or a package this
        function wrote (exported again from the model it holds).
    out_zip
        Where to write the package (``.zip`` is added if missing); written atomically.
    test_input
        Optional image of the training field's shape ((H, W), or (C, H, W) for several channels) from whose
        centre the test tensor is cut (at most 256 x 256 pixels); by default a synthetic image in the model's
        intensity range. For a 3-D model a volume ((D, H, W) or (C, D, H, W), D at least twice the z halo plus
        the network's minimum depth), from whose centre a test volume of at most 16 x 64 x 64 voxels (or the
        smallest that bioimage.io tools accept, twice the halo plus the network's minimum per axis, if larger) is
        cut; by default a synthetic one.

    Returns
    -------
    Path
        The package written.

    Raises
    ------
    PackageError
        ``bioimageio.spec`` is missing, or the description does not validate.
    """
    _require_spec()
    import torch

    from ...nn.unet import receptive_halo

    saved, source_file = _model_and_file(model)
    out = _zip_path(out_zip)
    cfg = saved.config
    H, W = (int(s) for s in saved.field_shape)
    halo = receptive_halo(cfg)
    m = cfg.min_size
    # bioimage.io: a tile keeps at least one output pixel inside its halo; + m: tiles of min + n pixels, n a
    # multiple of m, keep their cores (and so their starts) on the pooling grid
    min_side = 2 * halo + m
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    gate_name = {"coordgate": "CoordGate", "coordconv": "CoordConv", "none": "plain"}[cfg.gate]
    net_name = "U-Net" if cfg.ndim == 2 else "3-D U-Net"
    name = f"napari-coordgate {gate_name} {net_name}({cfg.depth}) deblurring ({H}x{W} field)"

    net = _standalone_network(saved)
    image, coords = _test_crop(saved, test_input)
    with torch.no_grad():
        restored, echo = net(torch.from_numpy(image), torch.from_numpy(coords))
    restored, echo = restored.numpy(), echo.numpy()

    with tempfile.TemporaryDirectory(prefix="coordgate-bioimageio-") as tmp:
        d = Path(tmp)
        _write_weights(net, d)
        for fname, arr in (("test_input_image.npy", image), ("test_input_coords.npy", coords),
                           ("test_output_restored.npy", restored), ("test_output_coords_echo.npy", echo)):
            np.save(d / fname, arr)
        if source_file is not None:
            shutil.copyfile(source_file, d / MODEL_FILE)
        else:
            save_model(d / MODEL_FILE, saved)
        (d / "README.md").write_text(
            _documentation(saved, name, halo, min_side, image.shape[2:], created), encoding="utf-8"
        )
        rdf = _rdf(saved, d, name, halo, min_side, torch.__version__)
        _validate(rdf, d)
        _write_zip(rdf, d, out)
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _file(d: Path, fname: str) -> dict:
    return {"source": fname, "sha256": _sha256(d / fname)}


def _tile(axis: str, min_side: int) -> dict:
    # step 1: the network takes any size (it pads to its pooling multiple itself), and bioimageio.core refuses
    # an image whose size is not min + n * step. coords cannot refer to the image's size (only an axis of
    # independent size can be referred to, and the echo output refers to coords): the same min/step give both
    # inputs the same size for every tile parameter
    return {"type": "space", "id": axis, "size": {"min": min_side, "step": 1}}


def _out_axis(axis: str, tensor: str, halo: int) -> dict:
    return {"type": "space", "id": axis, "halo": halo, "size": {"tensor_id": tensor, "axis_id": axis}}


def _float32() -> dict:
    return {"type": "float32"}  # a new dict each time: YAML would otherwise write anchors and aliases


def _z_axes(saved: SavedModel, tensor: str | None = None) -> list[dict]:
    """A 3-D model's z axis (none for a 2-D model): of an input, or of an output whose size is ``tensor``'s."""
    if saved.config.ndim == 2:
        return []
    halo_z, min_z = _z_geometry(saved.config)
    # the z-step in words only: a scale would meet bioimageio.spec's int(size * scale / scale) (see _doc_z)
    note = {"description": f"planes {saved.z_step_um:g} micrometer apart (the z-step of the training volumes)"}
    return [{**(_tile("z", min_z) if tensor is None else _out_axis("z", tensor, halo_z)), **note}]


def _rdf_inputs(saved: SavedModel, d: Path, min_side: int) -> list[dict]:
    cfg = saved.config
    H, W = (int(v) for v in saved.field_shape)
    in_names = ["raw"] if cfg.in_channels == 1 else [f"raw{i}" for i in range(cfg.in_channels)]
    same = ", the same on every plane" if cfg.ndim == 3 else ""
    return [
        {
            "id": "image",
            "description": "raw image in the training images' units (normalised inside the network)",
            "axes": [{"type": "batch"}, {"type": "channel", "channel_names": in_names}, *_z_axes(saved),
                     _tile("y", min_side), _tile("x", min_side)],
            "data": _float32(),
            "test_tensor": _file(d, "test_input_image.npy"),
        },
        {
            "id": "coords",
            "description": f"field coordinates (x, y in [-1, 1] over the {H}x{W} field) of every image pixel{same}",
            "axes": [{"type": "batch"}, {"type": "channel", "channel_names": ["x", "y"]}, *_z_axes(saved),
                     _tile("y", min_side), _tile("x", min_side)],
            "data": _float32(),
            "test_tensor": _file(d, "test_input_coords.npy"),
        },
    ]


def _rdf_outputs(saved: SavedModel, d: Path, halo: int) -> list[dict]:
    cfg = saved.config
    out_names = ["restored"] if cfg.out_channels == 1 else [f"restored{i}" for i in range(cfg.out_channels)]
    return [
        {
            "id": "restored",
            "description": "deblurred image, same units as the input image",
            "axes": [{"type": "batch"}, {"type": "channel", "channel_names": out_names}, *_z_axes(saved, "image"),
                     _out_axis("y", "image", halo), _out_axis("x", "image", halo)],
            "data": _float32(),
            "test_tensor": _file(d, "test_output_restored.npy"),
        },
        {
            "id": "coords_echo",
            "description": "the coords input passed through (makes tools pad and tile coords with the image)",
            "axes": [{"type": "batch"}, {"type": "channel", "channel_names": ["x", "y"]}, *_z_axes(saved, "coords"),
                     _out_axis("y", "coords", halo), _out_axis("x", "coords", halo)],
            "data": _float32(),
            "test_tensor": _file(d, "test_output_coords_echo.npy"),
        },
    ]


def _rdf_weights(saved: SavedModel, d: Path, torch_version: str) -> dict:
    version = torch_version.split("+")[0]
    return {
        "pytorch_state_dict": {
            **_file(d, "weights.pt"),
            "architecture": {**_file(d, ARCH_FILE), "callable": arch_callable(saved), "kwargs": arch_kwargs(saved)},
            "pytorch_version": version,
        },
        "torchscript": {
            **_file(d, "weights_torchscript.pt"),
            "pytorch_version": version,
            "parent": "pytorch_state_dict",
            "comment": "torch.jit.script of the pytorch_state_dict architecture (scripted: its border handling "
                       "depends on the coordinate values)",
        },
    }


def _rdf_config(saved: SavedModel) -> dict:
    H, W = (int(v) for v in saved.field_shape)
    ours = {
        "schema_version": PACKAGE_SCHEMA_VERSION,
        "package_version": __version__,
        "model_file": MODEL_FILE,
        "field_shape": [H, W],
        "normalization": saved.normalization.to_dict(),
        "model": saved.config.to_dict(),
    }
    if saved.z_step_um is not None:  # 3-D models only: 2-D descriptions stay as they were
        ours["z_step_um"] = float(saved.z_step_um)
    return {PACKAGE_FORMAT: ours}


def _rdf_description(saved: SavedModel) -> str:
    cfg = saved.config
    H, W = (int(v) for v in saved.field_shape)
    if cfg.ndim == 3:
        return (f"Position-aware 3-D deblurring of z-stacks ({saved.z_step_um:g} micrometer z-step) of one "
                f"microscope's spatially varying blur ({cfg.gate}, depth {cfg.depth}); inputs: the volume and the "
                f"field coordinates of its voxels (x, y in [-1, 1] over the {H}x{W} training field, the same on "
                "every plane).")
    return (
        f"Position-aware deblurring of one microscope's spatially varying blur ({cfg.gate}, depth {cfg.depth}); "
        f"inputs: the image and the field coordinates of its pixels (x, y in [-1, 1] over the {H}x{W} "
        "training field)."
    )


def _rdf(saved: SavedModel, d: Path, name: str, halo: int, min_side: int, torch_version: str) -> dict:
    """The bioimage.io model description (model format :data:`FORMAT_VERSION`) of the files in folder ``d``.

    Written as plain YAML data and validated by ``bioimageio.spec`` (:func:`_validate`) rather than serialised
    from its pydantic classes: ``bioimageio.spec``'s packaging serialiser fails under pydantic >= 2.14 (it passes
    its ``SerializationInfo`` where pydantic now requires an index key), while its validation works.
    """
    cfg = saved.config
    tags = ["deblurring", "deconvolution", "spatially-varying", "coordgate", "u-net", "napari-coordgate"]
    return {
        "type": "model",
        "format_version": FORMAT_VERSION,
        "name": name,
        "description": _rdf_description(saved),
        "authors": [{"name": "napari-coordgate user"}],
        "cite": [{"text": COORDGATE_CITATION, "doi": COORDGATE_DOI}],
        "license": "BSD-3-Clause",
        "documentation": _file(d, "README.md"),
        "tags": tags if cfg.ndim == 2 else [*tags, "3d"],
        "inputs": _rdf_inputs(saved, d, min_side),
        "outputs": _rdf_outputs(saved, d, halo),
        "weights": _rdf_weights(saved, d, torch_version),
        "attachments": [_file(d, MODEL_FILE)],
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": _rdf_config(saved),
    }


def _validate(rdf: dict, root: Path):
    """Validate ``rdf`` (files in ``root``) with ``bioimageio.spec``; the model description, or PackageError."""
    from bioimageio.spec import ValidationContext, build_description

    with ValidationContext(root=root, perform_io_checks=True):
        descr = build_description(rdf)
    summary = descr.validation_summary
    if summary.status == "failed":
        errors = "; ".join(f"{'.'.join(map(str, e.loc))}: {e.msg}" for e in summary.errors) or summary.status
        if "index_key" in errors and "SerializationInfo" in errors:
            import pydantic
            from bioimageio.spec import __version__ as spec_version

            raise PackageError(
                f"bioimageio.spec {spec_version} cannot check descriptions under pydantic {pydantic.VERSION} (a known "
                "incompatibility of pydantic >= 2.14): pip install 'pydantic<2.14' (the bioimageio extra pins it)"
            )
        raise PackageError(f"the bioimage.io description does not validate: {errors}")
    return descr


def _write_zip(rdf: dict, d: Path, out: Path) -> None:
    """``rdf.yaml`` and the files it names, into ``out`` (atomically)."""
    import yaml

    text = yaml.safe_dump(rdf, sort_keys=False, allow_unicode=True, width=110)

    def write(tmp: str) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
            zf.writestr("rdf.yaml", text)
            for f in sorted(d.iterdir()):
                zf.write(f, arcname=f.name)

    atomic_write(out, write)  # the mode a plain file gets (umask), not mkstemp's 0600; fsynced before the rename


# -- import ---------------------------------------------------------------------------------------------------
def is_package(path: str | os.PathLike) -> bool:
    """True if ``path`` is a zip file holding a bioimage.io description (``rdf.yaml`` / ``*bioimageio.yaml``)."""
    p = Path(path)
    if not p.is_file() or not zipfile.is_zipfile(p):
        return False
    try:
        with zipfile.ZipFile(p) as zf:
            return _rdf_name(zf) is not None
    except (zipfile.BadZipFile, OSError):
        return False


def _rdf_name(zf: zipfile.ZipFile) -> str | None:
    names = zf.namelist()
    for n in _RDF_NAMES:
        if n in names:
            return n
    found = [n for n in names if "/" not in n and n.endswith(".bioimageio.yaml")]
    return found[0] if found else None


def _read_rdf(path: Path) -> tuple[zipfile.ZipFile, dict]:
    if not path.is_file():
        raise PackageError(f"bioimage.io package {path} does not exist")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise PackageError(f"{path} is not a readable zip file: {exc}") from None
    name = _rdf_name(zf)
    if name is None:
        zf.close()
        raise PackageError(f"{path} is a zip file but not a bioimage.io package (no rdf.yaml inside)")
    import yaml

    try:
        text = _read_member(path, zf, name, MAX_RDF_BYTES).decode("utf-8")
        rdf = yaml.safe_load(text)
    except UnicodeDecodeError:
        zf.close()
        raise PackageError(f"{path}: {name} is not UTF-8 text") from None
    except yaml.YAMLError as exc:
        zf.close()
        raise PackageError(f"{path}: {name} is not valid YAML: {_yaml_problem(exc)}") from None
    except PackageError:
        zf.close()
        raise
    if not isinstance(rdf, dict):
        zf.close()
        raise PackageError(f"{path}: {name} does not hold a bioimage.io description")
    return zf, rdf


def _yaml_problem(exc) -> str:
    """One line for a YAML error (PyYAML's message spans several lines with a copy of the text)."""
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or type(exc).__name__
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return " ".join(str(problem).split()) + where


def _mib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MiB"


def _read_member(path: Path, zf: zipfile.ZipFile, name: str, limit: int) -> bytes:
    """The bytes of member ``name``, once its declared size and compression are known to be sane.

    The sizes are the zip directory's; reading stops at the declared size (and a member that inflates to more
    fails its CRC check), so nothing larger than what was checked is ever held in memory.

    Raises
    ------
    KeyError
        No such member.
    PackageError
        A member larger than ``limit``, inflating beyond :data:`_MAX_RATIO`, of another compression, or unreadable.
    """
    info = zf.getinfo(name)
    size, packed = info.file_size, info.compress_size
    if size > _RATIO_FLOOR and size > _MAX_RATIO * max(packed, 1):
        raise PackageError(
            f"{path}: {name} would inflate to {_mib(size)} from {packed} bytes ({size // max(packed, 1)} times; model "
            "files shrink about 1.1 times): a crafted or damaged package, not read"
        )
    if size > limit:
        raise PackageError(f"{path}: {name} is {_mib(size)}; a package member may be at most {_mib(limit)} "
                           "uncompressed (a crafted or damaged package?), not read")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        # bzip2 / lzma members inflate a whole read block at once: only what this tool writes is read
        raise PackageError(f"{path}: {name} uses zip compression method {info.compress_type}; napari-coordgate "
                           "packages are stored or deflated")
    try:
        with zf.open(info) as fh:
            return fh.read(size)
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:
        raise PackageError(f"{path}: {name} cannot be read from the zip (corrupt package?): {exc}") from None


def _foreign(path: Path, rdf: dict) -> PackageError:
    kind = rdf.get("type", "unknown")
    name = rdf.get("name") or rdf.get("id") or "unnamed"
    version = rdf.get("format_version", "?")
    if kind != "model":
        return PackageError(
            f"{path} is a bioimage.io {kind} package ({name!r}), not a model; napari-coordgate loads only model "
            "packages it exported"
        )
    weights = ", ".join(sorted((rdf.get("weights") or {}).keys())) or "none"
    n_in = len(rdf.get("inputs") or [])
    return PackageError(
        f"{path} is a bioimage.io model package from another tool ({name!r}, format {version}, weights: {weights}, "
        f"{n_in} input(s)); napari-coordgate loads only packages it exported, not other tools' networks "
        "(that would mean running their code): run it with bioimageio.core or the tool that made it"
    )


def load_package(path: str | os.PathLike, device: str | Any = "cpu") -> SavedModel:
    """Load a bioimage.io package exported by :func:`export_package` as a :class:`SavedModel`.

    The model comes from the package's ``.cgmodel`` attachment (safetensors + JSON: nothing is unpickled, no
    code from the package runs), so it is the exported model bit for bit.

    Raises
    ------
    PackageError
        Not a readable package, a package from another tool (the message says what it is), or a package whose
        attachment is missing or does not match its description.
    """
    path = Path(path)
    zf, rdf = _read_rdf(path)
    with zf:
        ours = (rdf.get("config") or {}).get(PACKAGE_FORMAT) if isinstance(rdf.get("config"), dict) else None
        if not isinstance(ours, dict):
            raise _foreign(path, rdf)
        version = ours.get("schema_version")
        if not isinstance(version, int) or version > PACKAGE_SCHEMA_VERSION:
            raise PackageError(
                f"{path} is a napari-coordgate package of schema version {version!r}; this napari-coordgate "
                f"({__version__}) reads up to {PACKAGE_SCHEMA_VERSION}: upgrade napari-coordgate"
            )
        member = str(ours.get("model_file", MODEL_FILE))
        try:
            raw = _read_member(path, zf, member, MAX_MEMBER_BYTES)
        except KeyError:
            raise PackageError(f"{path} lacks its model file {member!r}") from None
        expected = _attachment_sha256(rdf, member)
        if expected is not None and hashlib.sha256(raw).hexdigest() != expected:
            raise PackageError(f"{path}: {member} does not match the sha256 in the description (corrupt package?)")
    with tempfile.TemporaryDirectory(prefix="coordgate-package-") as tmp:
        model_path = Path(tmp) / MODEL_FILE
        model_path.write_bytes(raw)
        try:
            saved = load_model(model_path, device=device)
        except ModelFileError as exc:
            raise PackageError(f"{path}: {str(exc).replace(str(model_path), member)}") from None
    return saved


def _looks_like_package(path: Path) -> bool:
    return path.suffix.lower() == ".zip" or is_package(path)


def load_any(path: str | os.PathLike, device: str | Any = "cpu") -> SavedModel:
    """A model from a ``.cgmodel`` file (suffix rule of :func:`~napari_coordgate.model_io.existing_file`) or from a
    bioimage.io package (``.zip``) exported by napari-coordgate: the one loader for ``-m`` and the Model tab.

    Raises
    ------
    ModelFileError
        Anything unreadable; :class:`PackageError` (a subclass) for packages, including other tools' packages.
    """
    p = Path(path)
    if _looks_like_package(p):
        return load_package(p, device)
    return load_model(p, device)


def _attachment_sha256(rdf: dict, member: str) -> str | None:
    for att in rdf.get("attachments") or []:
        if isinstance(att, dict) and str(att.get("source", "")).split("/")[-1] == member:
            sha = att.get("sha256")
            return str(sha) if sha else None
    return None


def describe_package(path: str | os.PathLike) -> dict:
    """The description (parsed ``rdf.yaml``) of a package, without loading its model."""
    zf, rdf = _read_rdf(Path(path))
    zf.close()
    return rdf

