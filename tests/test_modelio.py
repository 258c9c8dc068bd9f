import pickle
import struct

import pytest
import torch

from napari_coordgate.config import ModelConfig
from napari_coordgate.modelio import ModelFileError, SavedModel, load_model, read_model_info, save_model
from napari_coordgate.nn import build_model


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
    assert loaded.normalization == {"offset": 100.0, "scale": 2000.0}
    assert loaded.psf == {"model": "gaussian"}
    assert loaded.provenance["training"] == {"epochs": 3}
    assert "package_version" in loaded.provenance and "created" in loaded.provenance


def test_info_is_readable_without_building_the_network(saved):
    info = read_model_info(saved[0])
    assert info["model"]["gate"] == "coordgate"
    assert info["field_shape"] == [48, 64]


def test_write_is_atomic_and_leaves_no_temp_files(saved):
    path, _ = saved
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
    from napari_coordgate import modelio

    tensors, meta = modelio.decode(bad, "napari-coordgate-model")
    meta["model"] = ModelConfig(depth=2, channels=4).to_dict()
    (tmp_path / "mismatch.cgmodel").write_bytes(modelio.encode(tensors, meta))
    with pytest.raises(ModelFileError, match="do not match"):
        load_model(tmp_path / "mismatch.cgmodel")


def test_newer_schema_asks_to_upgrade(tmp_path, saved):
    from napari_coordgate import modelio

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

    from napari_coordgate.modelio import decode, encode

    for pad in range(400):
        raw = encode({"w": torch.zeros(3)}, {"format": "napari-coordgate-model", "schema_version": 1, "pad": "x" * pad})
        if raw[0] == 0x80:
            break
    assert raw[0] == 0x80
    (tmp_path / "m.cgmodel").write_bytes(raw)
    tensors, meta = decode(tmp_path / "m.cgmodel", "napari-coordgate-model")
    assert meta["pad"] == "x" * pad and torch.equal(tensors["w"], torch.zeros(3))


def test_one_suffix_rule_for_writing_and_finding_model_files(saved, tmp_path):
    from napari_coordgate.modelio import existing_file

    written, _ = saved  # the fixture saved to tmp_path / "scope"
    assert written == tmp_path / "scope.cgmodel"
    assert existing_file(tmp_path / "scope") == written
    assert load_model(tmp_path / "scope").field_shape == (48, 64)
    assert read_model_info(tmp_path / "scope")["field_shape"] == [48, 64]
    with pytest.raises(ModelFileError, match=r"model file .*other does not exist \(nor .*other\.cgmodel\)"):
        load_model(tmp_path / "other")
