"""bioimage.io packages: export (validated by bioimageio.spec, run by bioimageio.core) and import.

The models are tiny U-Nets with random weights (a fresh network is the identity, so its weights are perturbed);
the field is 69 x 90 pixels, so the image height is not a multiple of the pooling grid of a depth-3 network and
the networks pad internally. Tests that need ``bioimageio.spec`` / ``bioimageio.core`` skip without them
(``pip install 'napari-coordgate[bioimageio]'``); the foreign-package checks need neither.
"""

from __future__ import annotations

import importlib
import json
import os
import stat
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_coordgate import engine
from napari_coordgate.config import ModelConfig
from napari_coordgate.model_io import SavedModel, save_model
from napari_coordgate.model_io.bioimageio.package import (
    MODEL_FILE,
    PackageError,
    arch_kwargs,
    export_package,
    is_package,
    load_any,
    load_package,
)
from napari_coordgate.nn import build_model, field_coordinates

FIELD = (69, 90)
NORM = {"offset": 100.0, "scale": 1000.0}
VARIANTS = {
    "coordgate-d2": ModelConfig(depth=2, channels=4),
    "coordgate-d1": ModelConfig(depth=1, channels=4),
    "coordconv-d3": ModelConfig(depth=3, channels=4, gate="coordconv"),
    "wiener-d2": ModelConfig(depth=2, channels=4, prefilter="wiener", prefilter_grid=2, prefilter_size=9),
}


def _saved(cfg: ModelConfig, seed: int = 0) -> SavedModel:
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = build_model(cfg).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
        if net.prefilter is not None:
            net.prefilter.kernels.copy_(0.05 * torch.randn(net.prefilter.kernels.shape, generator=gen))
    return SavedModel(net, cfg, FIELD, dict(NORM), psf="gaussian",
                      provenance={"training": {"epochs": 1, "note": "random test weights"}})


def _image(seed: int = 1) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    return (NORM["offset"] + 3 * NORM["scale"] * gaussian_filter(rng.random(FIELD), 1.5)).astype(np.float32)


def _coords(offset=(0, 0), shape=FIELD) -> np.ndarray:
    return field_coordinates(FIELD, offset, shape).numpy()[None]


def _skip(reason: str):
    # CI sets COORDGATE_REQUIRE_BIOIMAGEIO=1 (the testing extra installs bioimageio.core): a skip is then a failure
    if os.environ.get("COORDGATE_REQUIRE_BIOIMAGEIO") == "1":
        pytest.fail(f"bioimage.io tests required but cannot run: {reason}")
    pytest.skip(reason)


def _need(module: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        _skip(f"{module} is not installed (pip install 'napari-coordgate[bioimageio]')")


def _export(saved, path):
    _need("bioimageio.spec")
    try:
        return export_package(saved, path)
    except PackageError as exc:
        if "pydantic" in str(exc):  # bioimageio.spec 0.5.12 under pydantic >= 2.14: the extras pin pydantic < 2.14
            _skip(str(exc))
        raise


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    """One exported package per variant, made once: {name: (saved, package path)}."""
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("packages")
    out = {}
    for name, cfg in VARIANTS.items():
        saved = _saved(cfg)
        out[name] = (saved, _export(saved, folder / name))
    return out


def _core_predict(package, image, coords, weight_format="pytorch_state_dict", block=None) -> np.ndarray:
    """The package run through bioimageio.core on one (H, W) image and its (1, 2, H, W) coordinates."""
    core = _need("bioimageio.core")
    from bioimageio.core.axis import AxisId

    descr = core.load_description(package)
    pipeline = core.create_prediction_pipeline(descr, weight_format=weight_format)
    shape = None
    if block is not None:
        shape = {t: {AxisId("y"): block[0], AxisId("x"): block[1]} for t in ("image", "coords")}
    sample = core.predict(model=pipeline, inputs={"image": image[None, None], "coords": coords},
                          input_block_shape=shape)
    return sample.members["restored"].data.values[0, 0]


# -- the package ----------------------------------------------------------------------------------------------
def test_package_validates_with_bioimageio_spec(packages):
    from bioimageio.spec import InvalidDescr, load_description

    for name, (_, path) in packages.items():
        descr = load_description(path)
        assert not isinstance(descr, InvalidDescr), (name, descr.validation_summary.display())
        assert descr.validation_summary.status in ("valid-format", "passed")
        assert [str(t.id) for t in descr.inputs] == ["image", "coords"]
        assert [str(t.id) for t in descr.outputs] == ["restored", "coords_echo"]
        image_axes = [a.type for a in descr.inputs[0].axes]
        assert image_axes == ["batch", "channel", "space", "space"]
        assert [str(a.id) for a in descr.inputs[0].axes[2:]] == ["y", "x"]
        assert descr.inputs[1].axes[1].channel_names == ["x", "y"]
        cfg = VARIANTS[name]
        halo = engine.receptive_halo(cfg)
        assert {a.halo for a in descr.outputs[0].axes[2:]} == {halo}
        assert descr.inputs[0].axes[2].size.step == 1  # any size: the network pads to its pooling multiple
        assert descr.inputs[0].axes[2].size.min == 2 * halo + cfg.min_size
        assert set(descr.weights.model_fields_set) >= {"pytorch_state_dict", "torchscript"}


def test_bioimageio_core_model_test_passes(packages):
    core = _need("bioimageio.core")
    _, path = packages["coordgate-d2"]
    summary = core.test_model(path)  # both weight formats: test tensors reproduced, parametrised sizes run
    failed = [(d.name, [e.msg for e in d.errors]) for d in summary.details if d.status == "failed"]
    assert summary.status == "passed", failed


def test_architecture_file_is_self_contained_and_takes_the_state_dict_unchanged(packages, tmp_path):
    import importlib.util

    saved, path = packages["wiener-d2"]
    with zipfile.ZipFile(path) as zf:
        source = zf.read("coordgate_unet.py").decode("utf-8")
        zf.extract("coordgate_unet.py", tmp_path)
    assert "napari_coordgate" not in source.replace("napari-coordgate", "")
    spec = importlib.util.spec_from_file_location("standalone_coordgate_unet", tmp_path / "coordgate_unet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    net = module.CoordGateUNet(**arch_kwargs(saved))
    net.load_state_dict(saved.model.state_dict(), strict=True)
    assert sorted(net.state_dict()) == sorted(saved.model.state_dict())


def test_documentation_cites_coordgate_and_describes_field_psf_and_provenance(packages):
    saved, path = packages["coordgate-d2"]
    with zipfile.ZipFile(path) as zf:
        doc = zf.read("README.md").decode("utf-8")
    assert "arXiv:2401.04680" in doc and "Howard" in doc and "Döpp" in doc
    assert f"{FIELD[0]} x {FIELD[1]}" in doc
    assert saved.psf.describe() in doc
    assert "random test weights" in doc  # the training provenance
    assert f"Halo: {engine.receptive_halo(saved.config)} pixels" in doc


def test_pooled_coordinates_are_the_field_coordinates_of_each_level():
    """A level-l pixel's coordinate (the centre of its 2**l block) is the mean of the block's coordinates."""
    for offset in [(0, 0), (5, 7), (3, 2)]:
        full = field_coordinates(FIELD, offset, (32, 48), dtype=torch.float64)
        for level in range(1, 5):
            pooled = F.avg_pool2d(full[None], 2**level)[0]
            direct = field_coordinates(FIELD, offset, pooled.shape[-2:], level, dtype=torch.float64)
            torch.testing.assert_close(pooled, direct, rtol=0, atol=1e-14)


# -- running the package --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(VARIANTS))
def test_core_whole_image_equals_apply(packages, name):
    """Whole image through bioimageio.core (which pads both inputs by the halo) == engine.predict, ≤ 1e-4 of range."""
    saved, path = packages[name]
    image = _image()
    expected = engine.predict(saved, image, device="cpu")
    span = float(image.max() - image.min())
    formats = ["pytorch_state_dict", "torchscript"] if name == "coordgate-d2" else ["pytorch_state_dict"]
    for weight_format in formats:
        got = _core_predict(path, image, _coords(), weight_format)
        assert got.shape == image.shape
        assert np.abs(got - expected).max() <= 1e-4 * span, weight_format


def test_core_tiling_equals_apply_where_its_blocks_lie_on_the_pooling_grid(packages):
    """bioimageio.core's own tiling: blocks of 48 pixels with the 12-pixel halo, i.e. cores of 24.

    On a 68 x 90 region every block starts on an even pixel (the pooling grid of U-Net(2)): equal to apply. On the
    69-row field, core puts its last row of blocks flush with the image end (cores start at 69 - 24 = 45): those
    blocks are off the grid and differ like the odd-offset tiles of the next test (same bound).
    """
    saved, path = packages["coordgate-d2"]
    image = _image()
    span = float(image.max() - image.min())
    region = image[:68]
    expected = engine.predict(saved, region, roi=(0, 0), device="cpu")
    got = _core_predict(path, region, _coords((0, 0), region.shape), block=(48, 48))
    assert np.abs(got - expected).max() <= 1e-4 * span
    expected = engine.predict(saved, image, device="cpu")
    got = _core_predict(path, image, _coords(), block=(48, 48))
    assert np.abs(got[:45] - expected[:45]).max() <= 1e-4 * span  # the cores [0, 24) and [24, 48) up to row 45
    assert np.abs(got - expected).max() <= 4.5e-3 * span


@pytest.mark.parametrize("name, tolerance", [("coordgate-d2", 4.5e-3), ("wiener-d2", 5e-3), ("coordgate-d1", 1e-6)])
def test_tile_off_the_pooling_grid(packages, name, tolerance):
    """A tile at an odd offset, with its coordinate tile, run through bioimageio.core.

    It equals napari-coordgate's network applied to that tile at that offset (the gate of each level comes from
    the average-pooled coordinate tile, which are that level's field coordinates) to float rounding. Against the
    whole image's output (inside the tile's halo) it differs only because the tile's 2x2 max-pooling blocks are
    shifted by one pixel. Measured for tiles of 40 x 50 pixels at (5, 7), (3, 3), (1, 2), (7, 1): on these
    random-weight test models (seed 0) U-Net(2) 1.9e-3 to 2.1e-3 of the image range, U-Net(2) with the Wiener
    first stage 1.1e-3 to 2.4e-3, U-Net(1) (no pooling) 0; asserted: about twice the worst, 4.5e-3 and 5e-3, and
    1e-6. Over random-weight seeds 0-4 U-Net(2) ranged from 1.9e-3 to 1.2e-2, so the bound belongs to this model,
    not to every model: tiles that start on multiples of 2**(depth-1) pixels are the exact way (as above).
    """
    saved, path = packages[name]
    image = _image()
    span = float(image.max() - image.min())
    whole = engine.predict(saved, image, device="cpu")
    halo = engine.receptive_halo(saved.config)
    h, w = 40, 50
    for oy, ox in [(5, 7), (3, 3), (1, 2), (7, 1)]:
        tile = image[oy : oy + h, ox : ox + w]
        got = _core_predict(path, tile, _coords((oy, ox), (h, w)))
        with torch.no_grad():
            x = (torch.from_numpy(tile) - NORM["offset"]) / NORM["scale"]
            at_offset = saved.model(x[None, None], offset=(oy, ox), field_shape=FIELD)[0, 0] * NORM["scale"]
        assert np.abs(got - (at_offset.numpy() + NORM["offset"])).max() <= 1e-5 * span
        inner = (slice(halo, h - halo), slice(halo, w - halo))
        diff = np.abs(got[inner] - whole[oy : oy + h, ox : ox + w][inner]).max() / span
        assert diff <= tolerance, (oy, ox, diff)


# -- loading back ---------------------------------------------------------------------------------------------
def test_load_package_round_trip_gives_identical_outputs(packages):
    image = _image()
    for name, (saved, path) in packages.items():
        assert is_package(path)
        loaded = load_package(path)
        assert loaded.config == saved.config and tuple(loaded.field_shape) == FIELD
        assert loaded.normalization == saved.normalization
        assert loaded.psf.describe() == saved.psf.describe()
        for key, value in saved.model.state_dict().items():
            assert torch.equal(loaded.model.state_dict()[key], value), (name, key)
        a = engine.predict(saved, image, device="cpu")
        b = engine.predict(loaded, image, device="cpu")
        assert np.array_equal(a, b), name


def test_export_from_a_model_file_ships_that_file(tmp_path):
    saved = _saved(VARIANTS["coordgate-d1"], seed=3)
    model_file = save_model(tmp_path / "scope", saved)
    path = _export(model_file, tmp_path / "scope-package")
    assert path.name == "scope-package.zip"
    with zipfile.ZipFile(path) as zf:
        assert zf.read(MODEL_FILE) == model_file.read_bytes()
    assert np.array_equal(engine.predict(load_package(path), _image(), device="cpu"),
                          engine.predict(saved, _image(), device="cpu"))


def test_an_exported_package_gets_the_mode_of_any_other_output(packages, tmp_path):
    saved, _ = packages["coordgate-d1"]
    old = os.umask(0o022)
    try:
        path = _export(saved, tmp_path / "p.zip")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # what a plain open gives, not mkstemp's 0600
    assert [p.name for p in tmp_path.iterdir()] == ["p.zip"]


def test_load_any_takes_model_files_and_packages(packages, tmp_path):
    saved, path = packages["coordgate-d1"]
    model_file = save_model(tmp_path / "scope", saved)
    image = _image()
    expected = engine.predict(saved, image, device="cpu")
    for source in (path, model_file, tmp_path / "scope"):  # the .cgmodel suffix may be left out
        assert np.array_equal(engine.predict(load_any(source), image, device="cpu"), expected), source
    again = _export(path, tmp_path / "again.zip")  # a package exported again from the model it holds
    assert np.array_equal(engine.predict(load_any(again), image, device="cpu"), expected)
    with pytest.raises(PackageError, match="does not exist"):
        load_any(tmp_path / "missing.zip")


def test_test_input_must_have_the_field_shape(tmp_path):
    _need("bioimageio.spec")
    saved = _saved(VARIANTS["coordgate-d1"])
    with pytest.raises(ValueError, match="training field's shape 69x90"):
        export_package(saved, tmp_path / "p.zip", test_input=np.zeros((32, 32), np.float32))


def test_given_test_input_becomes_the_test_tensor(tmp_path):
    import io

    saved = _saved(VARIANTS["coordgate-d2"])
    image = _image(seed=5)
    path = _export(saved, tmp_path / "p.zip")  # export_package(..., test_input=image) below, after the skip check
    path = export_package(saved, path, test_input=image)
    with zipfile.ZipFile(path) as zf:
        test_image = np.load(io.BytesIO(zf.read("test_input_image.npy")))
        test_coords = np.load(io.BytesIO(zf.read("test_input_coords.npy")))
    h, w = test_image.shape[-2:]
    assert test_image.shape[:2] == (1, 1) and h % 2 == 0 and w % 2 == 0  # on the pooling grid of U-Net(2)
    oy = round(float(test_coords[0, 1, 0, 0] * (FIELD[0] - 1) + FIELD[0] - 1) / 2)
    ox = round(float(test_coords[0, 0, 0, 0] * (FIELD[1] - 1) + FIELD[1] - 1) / 2)
    assert np.array_equal(test_image[0, 0], image[oy : oy + h, ox : ox + w])
    assert np.array_equal(test_coords, _coords((oy, ox), (h, w)))


# -- foreign and broken packages ------------------------------------------------------------------------------
def _zip(path, files: dict) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)


FOREIGN_RDF = """\
type: model
format_version: 0.5.4
name: Nuclei segmentation U-Net
description: a segmentation network from another tool
inputs:
  - id: raw
    axes: [{type: batch}, {type: channel, channel_names: [raw]}, {type: space, id: y, size: 256},
           {type: space, id: x, size: 256}]
outputs:
  - id: mask
    axes: [{type: batch}, {type: channel, channel_names: [mask]}, {type: space, id: y, size: 256},
           {type: space, id: x, size: 256}]
weights:
  torchscript: {source: weights.pt, pytorch_version: "2.1"}
"""


def test_a_package_from_another_tool_is_refused_with_what_it_is(tmp_path):
    path = tmp_path / "foreign.zip"
    _zip(path, {"rdf.yaml": FOREIGN_RDF, "weights.pt": b"\x80\x04not loaded"})
    assert is_package(path)
    with pytest.raises(PackageError) as info:
        load_package(path)
    message = str(info.value)
    assert "another tool" in message and "'Nuclei segmentation U-Net'" in message
    assert "weights: torchscript" in message and "1 input(s)" in message and "bioimageio.core" in message
    assert "\n" not in message


def test_other_resources_and_non_packages_give_clear_errors(tmp_path):
    dataset = tmp_path / "dataset.zip"
    _zip(dataset, {"rdf.yaml": "type: dataset\nformat_version: 0.3.0\nname: Some images\n"})
    with pytest.raises(PackageError, match="bioimage.io dataset package .*not a model"):
        load_package(dataset)
    plain = tmp_path / "plain.zip"
    _zip(plain, {"notes.txt": "hello"})
    assert not is_package(plain)
    with pytest.raises(PackageError, match="not a bioimage.io package"):
        load_package(plain)
    not_zip = tmp_path / "model.zip"
    not_zip.write_bytes(b"not a zip")
    with pytest.raises(PackageError, match="not a readable zip"):
        load_package(not_zip)
    with pytest.raises(PackageError, match="does not exist"):
        load_package(tmp_path / "missing.zip")


def test_a_package_of_a_newer_napari_coordgate_or_with_a_changed_model_file_is_refused(packages, tmp_path):
    _, path = packages["coordgate-d1"]
    with zipfile.ZipFile(path) as zf:
        files = {n: zf.read(n) for n in zf.namelist()}
    newer = files["rdf.yaml"].decode().replace("schema_version: 1", "schema_version: 99")
    _zip(tmp_path / "newer.zip", {**files, "rdf.yaml": newer})
    with pytest.raises(PackageError, match="schema version 99.*upgrade napari-coordgate"):
        load_package(tmp_path / "newer.zip")
    changed = bytearray(files[MODEL_FILE])
    changed[-1] ^= 1
    _zip(tmp_path / "changed.zip", {**files, MODEL_FILE: bytes(changed)})
    with pytest.raises(PackageError, match="does not match the sha256"):
        load_package(tmp_path / "changed.zip")


def test_package_config_records_the_model(packages):
    import yaml

    saved, path = packages["coordgate-d2"]
    with zipfile.ZipFile(path) as zf:
        rdf = yaml.safe_load(zf.read("rdf.yaml"))
    ours = rdf["config"]["napari-coordgate-bioimageio"]
    assert ours["field_shape"] == list(FIELD)
    assert ours["normalization"] == NORM
    assert ModelConfig.from_dict(ours["model"]) == saved.config
    assert json.loads(json.dumps(rdf["weights"]["pytorch_state_dict"]["architecture"]["kwargs"])) == arch_kwargs(saved)


# -- crafted packages: refused before they cost memory (issue 20) ---------------------------------------------
OUR_RDF = """\
type: model
format_version: 0.5.12
name: napari-coordgate package
attachments:
  - {source: model.cgmodel}
config:
  napari-coordgate-bioimageio: {schema_version: 1, model_file: model.cgmodel}
"""


def _bomb(path, member: str, size: int, rdf: str = OUR_RDF) -> None:
    """A package whose ``member`` inflates to ``size`` zero bytes from a few kilobytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        if member != "rdf.yaml":
            zf.writestr("rdf.yaml", rdf)
        with zf.open(member, "w", force_zip64=True) as out:
            block = bytes(1 << 20)
            for _ in range(size >> 20):
                out.write(block)


@pytest.mark.parametrize("member", [MODEL_FILE, "rdf.yaml"])
def test_a_package_member_that_inflates_far_beyond_its_size_is_refused_before_it_is_read(tmp_path, member):
    import tracemalloc

    path = tmp_path / "bomb.zip"
    _bomb(path, member, 64 << 20)  # 64 MiB of zeros in about 64 KB; the had 3 GiB in 14 MB
    assert path.stat().st_size < 1 << 20

    tracemalloc.start()
    try:
        with pytest.raises(PackageError, match=rf"bomb\.zip: {member} would inflate to 64\.0 MiB") as info:
            load_any(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20 and "\n" not in str(info.value)


def test_a_package_member_larger_than_any_model_is_refused_before_it_is_read(tmp_path, monkeypatch):
    from napari_coordgate.model_io.bioimageio import package as bioimageio

    path = tmp_path / "big.zip"
    with zipfile.ZipFile(path, "w") as zf:  # stored: no compression to judge by, only the size
        zf.writestr("rdf.yaml", OUR_RDF)
        zf.writestr(MODEL_FILE, os.urandom(3 << 20))
    monkeypatch.setattr(bioimageio, "MAX_MEMBER_BYTES", 2 << 20)  # 2 GiB in use; 2 MiB keeps the test small

    with pytest.raises(PackageError, match=rf"big\.zip: {MODEL_FILE} is 3\.0 MiB; .* at most 2\.0 MiB"):
        load_package(path)


def test_a_malformed_rdf_is_one_line_naming_the_file_and_the_place(tmp_path):
    path = tmp_path / "broken.zip"
    _zip(path, {"rdf.yaml": "type: model\nname: [unclosed\nconfig:\n  - a: b\n    c\n"})

    with pytest.raises(PackageError) as info:
        load_package(path)
    message = str(info.value)
    assert "\n" not in message and "broken.zip: rdf.yaml is not valid YAML" in message and "line" in message


def test_a_network_the_architecture_file_cannot_hold_is_refused_in_one_line():
    from napari_coordgate.model_io.bioimageio.package import _standalone_network

    saved = _saved(VARIANTS["coordgate-d1"])
    saved.model.extra = torch.nn.Linear(2, 2)  # two tensors the exported architecture does not have

    with pytest.raises(PackageError, match=r"do not fit the exported architecture \(2 unexpected: first "
                                           r"'extra\.bias'\)$") as info:
        _standalone_network(saved)
    assert "\n" not in str(info.value)
