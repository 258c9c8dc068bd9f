import json
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_coordgate import model_io as modelio
from napari_coordgate.config import ModelConfig
from napari_coordgate.data import Normalization
from napari_coordgate.model_io import (
    ModelFileError,
    SavedModel,
    load_model,
    load_psf_model,
    read_model_info,
    read_psf_info,
    save_model,
    save_psf_model,
)
from napari_coordgate.nn import build_model
from napari_coordgate.optics.psf import PRESETS, PSFConfig
from napari_coordgate.samples.sample_model import SAMPLE_MODEL

DATA = Path(__file__).parents[1] / "data"


@pytest.fixture
def saved(tmp_path):
    cfg = ModelConfig(depth=2, channels=4, gate="coordgate", gate_activation="raw", gate_hidden=8)
    model = build_model(cfg)
    with torch.no_grad():
        model.head.weight.normal_(0, 0.3)
    path = save_model(
        tmp_path / "scope",
        SavedModel(model, cfg, (48, 64), {"offset": 100.0, "scale": 2000.0}, psf={"model": "gaussian"},
                   provenance={"training": {"epochs": 3}}),
    )
    return path, model


def test_save_adds_suffix_and_load_gives_bit_identical_outputs(saved):
    path, model = saved
    assert path.suffix == ".cgmodel"
    loaded = load_model(path)
    x = torch.rand(1, 1, 48, 64)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), loaded.model(x))
    assert loaded.field_shape == (48, 64)
    assert loaded.normalization == Normalization(100.0, 2000.0)
    assert loaded.psf == PSFConfig(model="gaussian")  # a PSFConfig dict becomes the PSF model it names
    assert loaded.provenance["training"] == {"epochs": 3}
    assert "package_version" in loaded.provenance and "created" in loaded.provenance


def test_info_is_readable_without_building_the_network(saved):
    info = read_model_info(saved[0])
    assert info["model"]["gate"] == "coordgate"
    assert info["field_shape"] == [48, 64]


def test_write_leaves_no_temp_files(saved):
    path, _ = saved
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_written_files_get_the_usual_permissions_and_a_replaced_file_keeps_its_own(tmp_path):
    import stat

    old = os.umask(0o022)
    try:
        new = modelio.atomic_write_bytes(tmp_path / "a.bin", b"x")
        assert stat.S_IMODE(new.stat().st_mode) == 0o644  # not mkstemp's 0600: colleagues can read a model
        os.chmod(new, 0o640)
        modelio.atomic_write_bytes(new, b"y")
        assert stat.S_IMODE(new.stat().st_mode) == 0o640 and new.read_bytes() == b"y"
    finally:
        os.umask(old)


def test_a_write_interrupted_half_way_keeps_the_old_file_and_leaves_no_temp_file(saved):
    path, model = saved
    before = path.read_bytes()

    def half_then_crash(tmp):
        with open(tmp, "wb") as fh:
            fh.write(before[: len(before) // 2])
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        modelio.atomic_write(path, half_then_crash)

    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    load_model(path)  # still a whole, readable model


def test_a_save_interrupted_before_the_rename_keeps_the_old_model(saved, monkeypatch):
    path, model = saved
    before = path.read_bytes()
    with torch.no_grad():
        model.head.weight.add_(1.0)  # the new model differs

    def crash(src, dst):
        raise KeyboardInterrupt  # Ctrl-C (or a crash) after the new bytes were written, before the rename

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        save_model(path, SavedModel(model, ModelConfig(depth=2, channels=4, gate="coordgate", gate_activation="raw",
                                                       gate_hidden=8), (48, 64)))

    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_truncated_file_is_rejected(saved):
    path, _ = saved
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="corrupt or truncated"):
        load_model(path)


def test_pickle_file_is_rejected_without_running_it(tmp_path):
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('pickle code ran')",))

    path = tmp_path / "evil.cgmodel"
    path.write_bytes(pickle.dumps(Boom(), protocol=4))
    with pytest.raises(ModelFileError, match="pickle"):
        load_model(path)


def test_torch_save_file_is_rejected(tmp_path):
    path = tmp_path / "weights.cgmodel"
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(ModelFileError, match="never unpickles"):
        load_model(path)


def test_foreign_safetensors_file_is_rejected(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.cgmodel"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(ModelFileError, match="not a napari-coordgate"):
        load_model(path)


def test_garbage_header_is_rejected(tmp_path):
    path = tmp_path / "junk.cgmodel"
    path.write_bytes(struct.pack("<Q", 10) + b"not json!!" + b"\0" * 8)
    with pytest.raises(ModelFileError):
        load_model(path)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        load_model(tmp_path / "nope.cgmodel")


def test_weights_not_matching_config_are_rejected(tmp_path, saved):
    path, model = saved
    other = build_model(ModelConfig(depth=3, channels=4))
    bad = save_model(tmp_path / "bad", SavedModel(other, ModelConfig(depth=3, channels=4), (8, 8)))
    # swap in the first file's config: weights no longer match
    from napari_coordgate import model_io as modelio

    tensors, meta = modelio.decode(bad, "napari-coordgate-model")
    meta["model"] = ModelConfig(depth=2, channels=4).to_dict()
    (tmp_path / "mismatch.cgmodel").write_bytes(modelio.encode(tensors, meta))
    with pytest.raises(ModelFileError, match="do not match"):
        load_model(tmp_path / "mismatch.cgmodel")


def test_newer_schema_asks_to_upgrade(tmp_path, saved):
    from napari_coordgate import model_io as modelio

    tensors, meta = modelio.decode(saved[0], "napari-coordgate-model")
    meta["schema_version"] = 99
    p = tmp_path / "future.cgmodel"
    p.write_bytes(modelio.encode(tensors, meta))
    with pytest.raises(ModelFileError, match="upgrade"):
        load_model(p)


def test_model_saved_from_cuda_loads_on_cpu(tmp_path, device):
    if device.type == "cpu":
        pytest.skip("needs --device cuda (or mps) to save from an accelerator")
    cfg = ModelConfig(depth=2, channels=4)
    model = build_model(cfg).to(device)
    path = save_model(tmp_path / "gpu", SavedModel(model, cfg, (16, 16)))
    loaded = load_model(path, device="cpu")
    assert next(loaded.model.parameters()).device.type == "cpu"


def test_a_valid_file_whose_header_length_starts_with_the_pickle_byte_is_read(tmp_path):
    # the first byte of a safetensors file is the low byte of its header length; 0x80 is also pickle's marker
    import torch

    from napari_coordgate.model_io import decode, encode

    for pad in range(400):
        raw = encode({"w": torch.zeros(3)}, {"format": "napari-coordgate-model", "schema_version": 1, "pad": "x" * pad})
        if raw[0] == 0x80:
            break
    assert raw[0] == 0x80
    (tmp_path / "m.cgmodel").write_bytes(raw)
    tensors, meta = decode(tmp_path / "m.cgmodel", "napari-coordgate-model")
    assert meta["pad"] == "x" * pad and torch.equal(tensors["w"], torch.zeros(3))


def test_one_suffix_rule_for_writing_and_finding_model_files(saved, tmp_path):
    from napari_coordgate.model_io import existing_file

    written, _ = saved  # the fixture saved to tmp_path / "scope"
    assert written == tmp_path / "scope.cgmodel"
    assert existing_file(tmp_path / "scope") == written
    assert load_model(tmp_path / "scope").field_shape == (48, 64)
    assert read_model_info(tmp_path / "scope")["field_shape"] == [48, 64]
    with pytest.raises(ModelFileError, match=r"model file .*other does not exist \(nor .*other\.cgmodel\)"):
        load_model(tmp_path / "other")


# -- PSF models inside model files (schema 2) and the migration from schema 1 --------------------------------
def _tiny_saved(psf, provenance=None) -> SavedModel:
    cfg = ModelConfig(depth=1, channels=2)
    return SavedModel(build_model(cfg), cfg, (16, 16), psf=psf, provenance=provenance or {})


def test_a_psf_model_with_arrays_travels_in_the_model_file_beside_the_weights(tmp_path, fake_psf):
    saved = _tiny_saved(fake_psf.with_provenance({"beads": 42}), {"psf": {"beads": 42}})

    path = save_model(tmp_path / "m", saved)
    tensors, meta = modelio.decode(path, "napari-coordgate-model")
    loaded = load_model(path)

    assert meta["schema_version"] == modelio.SCHEMA_VERSION
    assert meta["psf"] == {"kind": "test_gaussian_grid", "name": "fake beads", "psf_size": 9}
    assert sorted(k for k in tensors if k.startswith("psf/")) == ["psf/sigmas"]
    assert type(loaded.psf) is type(fake_psf)
    np.testing.assert_array_equal(loaded.psf.sigmas, fake_psf.sigmas)
    assert loaded.psf.provenance == {"beads": 42}  # the model's provenance["psf"] goes back onto its PSF model
    sd, ref = loaded.model.state_dict(), saved.model.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in sd)


def test_a_pupil_psf_model_is_stored_as_its_record_without_arrays(tmp_path):
    path = save_model(tmp_path / "m", _tiny_saved("edge_defocus_astigmatism"))

    info = read_model_info(path)

    assert info["psf"]["kind"] == "pupil" and info["psf"]["name"] == "edge_defocus_astigmatism"
    assert load_model(path).psf == PRESETS["edge_defocus_astigmatism"]
    assert load_model(save_model(tmp_path / "none", _tiny_saved(None))).psf is None


def test_a_schema_1_model_file_from_the_previous_release_still_loads():
    # tests/data/model_schema1.cgmodel was written by the code of commit e6fc33d (schema 1: "psf" a PSFConfig
    # dict in the JSON), with its network's output on a ramp input beside it
    path = DATA / "model_schema1.cgmodel"
    stored = modelio.decode(path, "napari-coordgate-model")[1]  # the metadata as stored, not migrated
    assert stored["schema_version"] == 1 and stored["psf"]["kind"] == "psf" and "psf/" not in str(stored)

    saved = load_model(path)
    x = torch.linspace(0, 1, 24 * 32).reshape(1, 1, 24, 32)
    with torch.no_grad():
        out = saved.model(x)[0, 0].numpy()

    np.testing.assert_allclose(out, np.load(DATA / "model_schema1_output.npy"), rtol=0, atol=1e-6)
    assert isinstance(saved.psf, PSFConfig) and saved.psf == PRESETS["gaussian"]
    assert saved.field_shape == (24, 32) and saved.normalization == Normalization(10.0, 200.0)
    assert saved.provenance["training"]["source"] == "psf"
    info = read_model_info(path)  # shown migrated
    assert info["schema_version"] == modelio.SCHEMA_VERSION and info["psf"]["kind"] == "pupil"


def test_a_schema_2_model_keeps_its_fixed_normalisation_and_its_output():
    # tests/data/model_schema2.cgmodel is the sample model shipped at commit c7ce7d1 (schema 2, one offset and
    # scale for every image); beside it, its prediction of a fixed pattern made with numpy arithmetic alone (a
    # specimen generator's output moves with library versions), computed by the code of commit 32f8f8c
    from napari_coordgate.engine import predict

    path = DATA / "model_schema2.cgmodel"
    assert modelio.decode(path, "napari-coordgate-model")[1]["schema_version"] == 2
    saved = load_model(path)

    norm = saved.normalization
    assert (norm.get("percentiles") if isinstance(norm, dict) else norm.percentiles) is None
    yy, xx = np.mgrid[0:256, 0:256].astype(np.float64)
    image = (0.02 + 0.05 * (0.5 + 0.5 * np.sin(xx / 7.0) * np.cos(yy / 11.0))).astype(np.float32)
    out = predict(saved, image, device="cpu")
    np.testing.assert_allclose(out[96:160, 96:160], np.load(DATA / "model_schema2_output.npy"), rtol=0, atol=1e-5)
    # a fixed map is not equivariant: a camera offset changes the result beyond the offset itself
    assert np.abs(predict(saved, image + 100.0, device="cpu") - (out + 100.0)).max() > 1e-2


def test_per_image_normalisation_round_trips_and_nonsense_is_refused(tmp_path, saved):
    tensors, meta = modelio.decode(saved[0], "napari-coordgate-model")
    meta["normalization"] = {"offset": 0.5, "scale": 2.0, "percentiles": [0.1, 99.9]}
    good = tmp_path / "good.cgmodel"
    good.write_bytes(modelio.encode(tensors, meta))
    loaded = load_model(good)
    assert loaded.normalization == Normalization(0.5, 2.0, (0.1, 99.9))
    assert load_model(save_model(tmp_path / "again", loaded)).normalization == loaded.normalization
    meta["normalization"]["percentiles"] = [99.0, 1.0]
    bad = tmp_path / "bad.cgmodel"
    bad.write_bytes(modelio.encode(tensors, meta))
    with pytest.raises(ModelFileError, match="percentiles must satisfy 0 <= low < high <= 100"):
        load_model(bad)


def test_normalization_is_checked_once_on_construction_and_written_as_before(tmp_path):
    cfg = ModelConfig(depth=1, channels=2)
    net = build_model(cfg)
    as_dict = SavedModel(net, cfg, (8, 8), {"offset": 1, "scale": 2, "percentiles": [0.1, 99.9]})
    as_object = SavedModel(net, cfg, (8, 8), Normalization(1, 2, [0.1, 99.9]))
    assert as_dict.normalization == as_object.normalization == Normalization(1.0, 2.0, (0.1, 99.9))
    for bad in ({"offset": 0.0, "scale": 0.0}, Normalization(0.0, -1.0), {"offset": 0.0, "scale": 1.0,
                                                                          "percentiles": [50, 5]}):
        with pytest.raises(ValueError, match="scale must be > 0|percentiles must satisfy"):
            SavedModel(net, cfg, (8, 8), bad)
    with pytest.raises(TypeError, match="normalization must be a Normalization or its dict form"):
        SavedModel(net, cfg, (8, 8), [0.0, 1.0])
    for saved in (as_dict, as_object):
        stored = modelio.decode(save_model(tmp_path / "m", saved), "napari-coordgate-model")[1]
        assert json.dumps(stored["normalization"]) == '{"offset": 1.0, "percentiles": [0.1, 99.9], "scale": 2.0}'


@pytest.mark.parametrize("path", [DATA / "model_schema1.cgmodel", DATA / "model_schema2.cgmodel",
                                  SAMPLE_MODEL], ids=["schema1", "schema2", "sample"])
def test_a_stored_models_normalization_is_written_back_unchanged(tmp_path, path):
    stored = read_model_info(path)["normalization"]
    again = read_model_info(save_model(tmp_path / "again", load_model(path)))["normalization"]
    assert json.dumps(again) == json.dumps(stored)


@pytest.mark.parametrize("version", [4, 99])
def test_a_model_file_from_a_newer_schema_asks_to_upgrade(tmp_path, saved, version):
    tensors, meta = modelio.decode(saved[0], "napari-coordgate-model")
    meta["schema_version"] = version
    p = tmp_path / "future.cgmodel"
    p.write_bytes(modelio.encode(tensors, meta))
    with pytest.raises(ModelFileError, match=rf"schema version {version}; .* reads up to 3: upgrade napari-coordgate"):
        load_model(p)


# -- PSF model files (.cgpsf) ---------------------------------------------------------------------------------
def test_psf_model_file_round_trips_a_model_with_arrays_and_its_provenance(tmp_path, fake_psf):
    prov = {"source_images": ["beads_01.tif"], "beads": 137, "fit_residual": 0.031, "date": "2026-11-20"}

    path = save_psf_model(tmp_path / "scope", fake_psf, provenance=prov)
    loaded = load_psf_model(path)

    assert path == tmp_path / "scope.cgpsf"
    assert type(loaded) is type(fake_psf) and loaded.name == "fake beads"
    np.testing.assert_array_equal(loaded.sigmas, fake_psf.sigmas)
    np.testing.assert_array_equal(loaded.psf_grid((20, 30))[0], fake_psf.psf_grid((20, 30))[0])
    assert {k: loaded.provenance[k] for k in prov} == prov
    assert {"package_version", "created"} <= set(loaded.provenance)
    info = read_psf_info(tmp_path / "scope")  # the suffix rule finds it
    assert info["format"] == "napari-coordgate-psf" and info["schema_version"] == 1
    assert info["provenance"]["beads"] == 137 and info["psf"]["kind"] == "test_gaussian_grid"
    assert [p.name for p in tmp_path.iterdir()] == ["scope.cgpsf"]  # no temporary file left


def test_psf_model_file_keeps_a_models_own_provenance_by_default(tmp_path):
    cfg = PRESETS["strong_astigmatism"].with_provenance({"from": "a colleague"})

    loaded = load_psf_model(save_psf_model(tmp_path / "p", cfg))

    assert loaded == PRESETS["strong_astigmatism"] and loaded.provenance["from"] == "a colleague"


def test_psf_model_file_refuses_provenance_that_is_not_json(tmp_path, fake_psf):
    with pytest.raises(ValueError, match="provenance must be JSON"):
        save_psf_model(tmp_path / "p", fake_psf, provenance={"when": object()})
    assert list(tmp_path.iterdir()) == []


def _edited_psf_file(tmp_path, fake_psf, edit) -> Path:
    tensors, meta = modelio.decode(save_psf_model(tmp_path / "ok", fake_psf), "napari-coordgate-psf")
    edit(tensors, meta)
    path = tmp_path / "edited.cgpsf"
    path.write_bytes(modelio.encode(tensors, meta))
    return path


def test_psf_model_file_from_a_newer_version_asks_to_upgrade(tmp_path, fake_psf):
    path = _edited_psf_file(tmp_path, fake_psf, lambda t, m: m.update(schema_version=2))
    with pytest.raises(ModelFileError, match=r"schema version 2; .* reads up to 1: upgrade napari-coordgate"):
        load_psf_model(path)


@pytest.mark.parametrize("edit, match", [
    (lambda t, m: m["psf"].update(kind="spline_v2"), "unknown PSF model kind 'spline_v2'"),
    (lambda t, m: m.update(psf="fake"), "metadata is not a JSON object"),
    (lambda t, m: t.pop("psf/sigmas"), "needs the array 'sigmas'"),
    (lambda t, m: t.update({"psf/sigmas": torch.full((3, 3), float("nan"), dtype=torch.float64)}), "NaN or Inf"),
    (lambda t, m: t.update({"psf/sigmas": -torch.ones(2, 3, dtype=torch.float64)}), "positive numbers"),
    (lambda t, m: m["psf"].update(psf_size=8), "odd integer"),
    (lambda t, m: m.update(provenance=[1, 2]), "provenance must be a JSON object"),
    (lambda t, m: m.update(schema_version=0), "invalid schema version"),
], ids=["kind", "meta", "missing-array", "nan", "bad-array", "even-size", "provenance", "version-0"])
def test_psf_model_file_edited_into_nonsense_is_a_clear_error(tmp_path, fake_psf, edit, match):
    path = _edited_psf_file(tmp_path, fake_psf, edit)
    with pytest.raises(ModelFileError, match=match) as info:
        load_psf_model(path)
    assert "edited.cgpsf" in str(info.value)


def test_a_pupil_psf_file_edited_out_of_range_names_the_field(tmp_path):
    tensors, meta = modelio.decode(save_psf_model(tmp_path / "ok", "gaussian"), "napari-coordgate-psf")
    meta["psf"]["na"] = 5.0
    (tmp_path / "bad.cgpsf").write_bytes(modelio.encode(tensors, meta))
    with pytest.raises(ModelFileError, match=r"bad\.cgpsf: the PSF model stored in it is invalid: PSFConfig\.na"):
        load_psf_model(tmp_path / "bad.cgpsf")


def test_a_model_file_is_not_a_psf_model_file(tmp_path, saved):
    with pytest.raises(ModelFileError, match="expected a 'napari-coordgate-psf'"):
        load_psf_model(saved[0])
    with pytest.raises(ModelFileError, match="pickle"):
        (tmp_path / "evil.cgpsf").write_bytes(pickle.dumps({"a": 1}, protocol=4))
        load_psf_model(tmp_path / "evil.cgpsf")


def _trained_checkpoint(tmp_path):
    """A checkpoint of a U-Net(1) after one Adam step: (path, network, optimiser, torch RNG state it holds)."""
    cfg = ModelConfig(depth=1, channels=2)
    model = build_model(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.rand(2, 1, 16, 16)).square().mean().backward()
    opt.step()
    best = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    path = modelio.save_checkpoint(tmp_path / "run", weights=model.state_dict(), best=best,
                                   optimizer=opt.state_dict(), rng_tensors={"torch": rng},
                                   state={"epoch": 3, "model": cfg.to_dict()})
    return path, model, opt, rng


def test_checkpoint_round_trip_restores_weights_and_optimizer_state(tmp_path):
    path, model, opt, rng = _trained_checkpoint(tmp_path)
    cfg = ModelConfig(depth=1, channels=2)
    ck = modelio.load_checkpoint(path)

    assert path.suffix == ".cgckpt" and ck["meta"]["epoch"] == 3
    assert all(torch.equal(ck["weights"][k], v) for k, v in model.state_dict().items())
    again = torch.optim.Adam(build_model(cfg).parameters(), lr=1e-3)
    again.load_state_dict(ck["optimizer"])
    a, b = opt.state_dict(), again.state_dict()
    assert a["param_groups"] == b["param_groups"]
    assert all(torch.equal(a["state"][i][k], b["state"][i][k]) for i in a["state"] for k in ("exp_avg", "exp_avg_sq"))
    assert torch.equal(ck["rng_tensors"]["torch"], rng)


# -- integrity: a file changed after it was written is refused, never used (issue 20) --------------------------
def _header(raw: bytes) -> tuple[int, dict]:
    n = int.from_bytes(raw[:8], "little")
    return 8 + n, json.loads(raw[8 : 8 + n])


def _flip(path: Path, tensor: str, byte: int, bit: int) -> None:
    """Flip one bit of one tensor's bytes in the file at ``path``, as a failing disk or a bad copy would."""
    raw = bytearray(path.read_bytes())
    start, header = _header(bytes(raw))
    raw[start + header[tensor]["data_offsets"][0] + byte] ^= 1 << bit
    path.write_bytes(bytes(raw))


def test_a_flipped_exponent_bit_in_one_weight_is_refused_as_corrupt(saved):
    path, _ = saved
    _flip(path, "head.weight", 3, 6)  # float32 little-endian: byte 3 holds the sign and the exponent's top bits

    with pytest.raises(ModelFileError, match=r"scope\.cgmodel is corrupt: it changed after it was written") as info:
        load_model(path)
    assert "\n" not in str(info.value)


def test_an_edited_value_in_the_metadata_is_refused_as_corrupt(saved):
    path, _ = saved
    raw = path.read_bytes()
    assert raw.count(b'\\"offset\\": 100.0') == 1
    path.write_bytes(raw.replace(b'\\"offset\\": 100.0', b'\\"offset\\": 900.0'))  # still valid JSON, same length

    with pytest.raises(ModelFileError, match="corrupt: it changed after it was written"):
        load_model(path)


def test_new_files_carry_a_checksum_and_files_without_one_still_load(saved, tmp_path):
    from safetensors.torch import save

    path, model = saved
    start, header = _header(path.read_bytes())
    stored = json.loads(header["__metadata__"]["napari_coordgate"])
    assert len(stored["content_sha256"]) == 64
    assert "content_sha256" not in modelio.decode(path, "napari-coordgate-model")[1]  # a detail of the container
    # a file as the previous version wrote it: the same metadata without the checksum
    del stored["content_sha256"]
    tensors = modelio.decode(path, "napari-coordgate-model")[0]
    old = tmp_path / "old.cgmodel"
    old.write_bytes(save(tensors, metadata={"napari_coordgate": json.dumps(stored)}))
    x = torch.rand(1, 1, 48, 64)
    with torch.no_grad():
        assert torch.equal(load_model(old).model(x), load_model(path).model(x))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_model_with_non_finite_weights_is_refused_naming_the_file_and_the_tensor(tmp_path, saved, value):
    tensors, meta = modelio.decode(saved[0], "napari-coordgate-model")
    tensors["head.weight"].view(-1)[0] = value
    path = tmp_path / "diverged.cgmodel"
    path.write_bytes(modelio.encode(tensors, meta))  # a valid checksum: the file holds what was written

    with pytest.raises(ModelFileError, match=r"diverged\.cgmodel: .*'head\.weight'.* NaN or Inf") as info:
        load_model(path)
    assert "\n" not in str(info.value)


def test_weights_not_matching_the_config_are_summarised_in_one_line(tmp_path, saved):
    tensors, meta = modelio.decode(saved[0], "napari-coordgate-model")
    del tensors["head.weight"], tensors["head.bias"]
    tensors["extra.weight"] = torch.zeros(2)
    first = sorted(k for k in tensors if not k.startswith("psf/"))[0]
    tensors[first] = torch.zeros(1, 2, 3)
    path = tmp_path / "mismatch.cgmodel"
    path.write_bytes(modelio.encode(tensors, meta))

    with pytest.raises(ModelFileError) as info:
        load_model(path)
    message = str(info.value)
    assert "\n" not in message and "mismatch.cgmodel" in message
    assert "weights do not match the stored configuration (2 missing, 1 unexpected, 1 wrong shape" in message
    assert f"first {first!r})" in message  # the first name in sorted order, so that one can look


def test_a_large_file_that_is_no_model_is_refused_without_reading_it(tmp_path):
    import tracemalloc

    path = tmp_path / "image.cgmodel"
    with open(path, "wb") as fh:
        fh.write(b"II*\x00" + b"\0" * 60)  # a TIFF given as a model
        fh.truncate(256 << 20)  # sparse: no disk space used

    tracemalloc.start()
    try:
        with pytest.raises(ModelFileError, match="not a readable napari-coordgate file"):
            load_model(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20


def test_a_header_declaring_more_data_than_the_file_holds_is_refused(tmp_path):
    hdr = json.dumps({"__metadata__": {"napari_coordgate": json.dumps({"format": "napari-coordgate-model",
                                                                       "schema_version": 3})},
                      "w": {"dtype": "F32", "shape": [100000, 100000], "data_offsets": [0, 40_000_000_000]}}).encode()
    path = tmp_path / "big.cgmodel"
    path.write_bytes(struct.pack("<Q", len(hdr)) + hdr + b"\0" * 16)

    with pytest.raises(ModelFileError, match=r"big\.cgmodel .*(truncated|corrupt)"):
        load_model(path)


def test_psf_metadata_that_is_a_json_list_is_a_clear_error(tmp_path):
    from safetensors.torch import save

    path = tmp_path / "list.cgpsf"
    path.write_bytes(save({"psf/a": torch.zeros(2)}, metadata={"napari_coordgate": "[1, 2]"}))

    with pytest.raises(ModelFileError, match=r"list\.cgpsf: its metadata is not a JSON object") as info:
        load_psf_model(path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("shape", [[0, 0], [512], "big", [10**9, 10**9]])
def test_a_psf_file_whose_provenance_has_an_impossible_field_shape_is_refused(tmp_path, fake_psf, shape):
    path = save_psf_model(tmp_path / "beads", fake_psf, provenance={"field_shape": shape})

    with pytest.raises(ModelFileError, match=r"beads\.cgpsf: .*field_shape") as info:
        load_psf_model(path)
    assert "\n" not in str(info.value)


def test_a_psf_file_whose_measured_grid_is_too_large_is_refused(tmp_path):
    from napari_coordgate.optics.measured import MeasuredGridPSF

    psfs = np.zeros((3, 3, 17, 17))
    psfs[:, :, 8, 8] = 1.0
    tensors, meta = modelio.decode(save_psf_model(tmp_path / "ok", MeasuredGridPSF(psfs)), "napari-coordgate-psf")
    meta["psf"]["grid"] = 5000  # the fast blur would allocate 5000 x 5000 PSFs (53.8 GiB)
    (tmp_path / "huge.cgpsf").write_bytes(modelio.encode(tensors, meta))

    with pytest.raises(ModelFileError, match=r"huge\.cgpsf: .*grid.* 5000"):
        load_psf_model(tmp_path / "huge.cgpsf")


# -- checkpoints ------------------------------------------------------------------------------------------------
def _checkpoint(tmp_path) -> Path:
    return _trained_checkpoint(tmp_path)[0]


def test_a_checkpoint_changed_after_it_was_written_is_refused(tmp_path):
    path = _checkpoint(tmp_path)
    _flip(path, "optim.0.exp_avg", 0, 0)

    with pytest.raises(ModelFileError, match=r"run\.cgckpt is corrupt: it changed after it was written"):
        modelio.load_checkpoint(path)


def test_a_checkpoint_with_non_finite_weights_is_refused(tmp_path):
    tensors, meta = modelio.decode(_checkpoint(tmp_path), "napari-coordgate-checkpoint")
    tensors["best.head.weight"].view(-1)[0] = float("nan")
    path = tmp_path / "nan.cgckpt"
    path.write_bytes(modelio.encode(tensors, meta))

    with pytest.raises(ModelFileError, match=r"nan\.cgckpt: .*'best\.head\.weight'.* NaN or Inf"):
        modelio.load_checkpoint(path)


@pytest.mark.parametrize("edit", [
    lambda m: m.pop("optimizer"),
    lambda m: m.update(optimizer={"state": {}, "param_groups": 5}),
    lambda m: m.update(optimizer={"state": {"zero": {}}, "param_groups": []}),
    lambda m: m.update(optimizer=[1]),
], ids=["no-optimizer", "groups-not-a-list", "bad-index", "not-an-object"])
def test_a_checkpoint_with_an_edited_optimizer_state_is_one_clear_line(tmp_path, edit):
    tensors, meta = modelio.decode(_checkpoint(tmp_path), "napari-coordgate-checkpoint")
    edit(meta)
    path = tmp_path / "edited.cgckpt"
    path.write_bytes(modelio.encode(tensors, meta))

    with pytest.raises(ModelFileError, match=r"edited\.cgckpt: .*optimi") as info:
        modelio.load_checkpoint(path)
    assert "\n" not in str(info.value)


# -- resuming from an edited checkpoint: one line naming the file, before anything is trained or written ------
_RESUME_NET = ModelConfig(depth=1, channels=2)


def _resume_pairs():
    from scipy.ndimage import gaussian_filter

    sharp = np.random.default_rng(0).random((2, 32, 32)).astype(np.float32)
    return sharp, gaussian_filter(sharp, (0, 1.0, 1.0))


def _resume_recipe(epochs):
    from napari_coordgate.config import TrainConfig

    return TrainConfig(crop=16, batch=2, epochs=epochs, steps_per_epoch=2, seed=0, device="cpu", schedule="plateau")


@pytest.fixture(scope="module")
def run_checkpoint(tmp_path_factory) -> Path:
    """The checkpoint of one tiny epoch of training (written once per module)."""
    from napari_coordgate.engine import PairSource, train

    path = tmp_path_factory.mktemp("resume") / "run.cgckpt"
    train(_RESUME_NET, _resume_recipe(1), PairSource(*_resume_pairs()), checkpoint_path=path)
    return path


def _set_meta(key, value):
    return lambda t, m: m.update({key: value})


def _set_tensor(key, value):
    return lambda t, m: t.update({key: value})


@pytest.mark.parametrize("edit", [
    lambda t, m: m.pop("model"),
    lambda t, m: m.pop("normalization"),
    _set_meta("normalization", {"offset": 0.0, "scale": -1.0}),
    _set_meta("field_shape", "32x32"),
    _set_meta("epoch", "three"),
    _set_meta("step", -5),
    _set_meta("elapsed", None),
    _set_meta("best_val_psnr", "high"),
    _set_meta("noise_seed", [1]),
    _set_meta("rng", {"bit_generator": "MT19937"}),
    _set_meta("rng", 7),
    _set_meta("plateau", {"mode": 3}),
    _set_meta("data", {"fingerprint": 5}),
    lambda t, m: t.pop("model.head.weight"),
    lambda t, m: t.pop("best.head.bias"),
    _set_tensor("model.head.weight", torch.zeros(1, 2, 3, 3)),
    _set_tensor("optim.0.exp_avg", torch.zeros(3)),
    lambda t, m: m["optimizer"]["param_groups"][0].update(params=[0]),
    _set_tensor("rng.torch", torch.zeros(5)),
], ids=["no-model", "no-normalization", "bad-normalization", "field-shape", "epoch", "step", "elapsed",
        "best-psnr", "noise-seed", "rng-kind", "rng-type", "plateau", "fingerprint", "missing-weight",
        "missing-best", "weight-shape", "optimizer-shape", "optimizer-groups", "torch-rng"])
def test_resuming_from_an_edited_checkpoint_is_one_line_naming_the_file(tmp_path, run_checkpoint, edit):
    from napari_coordgate.engine import PairSource, train

    tensors, meta = modelio.decode(run_checkpoint, "napari-coordgate-checkpoint")
    edit(tensors, meta)
    path = tmp_path / "edited.cgckpt"
    path.write_bytes(modelio.encode(tensors, meta))
    out = tmp_path / "m.cgmodel"

    with pytest.raises(ModelFileError) as info:
        train(_RESUME_NET, _resume_recipe(2), PairSource(*_resume_pairs()), resume=path, out_path=out,
              checkpoint_path=path)
    message = str(info.value)
    assert "edited.cgckpt" in message and "checkpoint" in message and "\n" not in message
    assert not out.exists() and modelio.decode(path, "napari-coordgate-checkpoint")[1] == meta  # nothing written


def test_the_unedited_checkpoint_resumes(run_checkpoint, tmp_path):
    from napari_coordgate.engine import PairSource, train

    res = train(_RESUME_NET, _resume_recipe(2), PairSource(*_resume_pairs()), resume=run_checkpoint)
    assert [u.epoch for u in res.history if u.kind == "epoch"] == [2]
