"""The 3-D U-Net (z-stacks): the 2-D battery again, and the gates reading (y, x) only."""

import io

import pytest
import torch

from napari_coordgate.config import ModelConfig
from napari_coordgate.nn import CoordGate, ImageTooSmallError, build_model, count_parameters
from napari_coordgate.nn.unet import receptive_halo, receptive_halo_z

# depth 1-3, isotropic and anisotropic pooling (z_pool_start 2: the first pooling keeps z; 3 at depth 3: never)
VARIANTS = [
    ModelConfig(ndim=3, depth=d, z_pool_start=s, channels=4, gate=g, gate_hidden=8, gate_activation="raw")
    for d, s in [(1, 1), (2, 1), (2, 2), (3, 1), (3, 2), (3, 3)]
    for g in ("none", "coordgate")
]
GATED = [c for c in VARIANTS if c.gate == "coordgate"]


def _ids(cfg):
    return f"d{cfg.depth}-z{cfg.z_pool_start}-{cfg.gate}"


def _randomise(model):
    """Give the zero-initialised layers (the residual head, the gates' last layers) random weights."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def _volume(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("cfg", VARIANTS, ids=_ids)
def test_forward_backward_keeps_shape_and_reaches_every_parameter(cfg):
    model = _randomise(build_model(cfg))
    x = _volume(2, 1, 8, 16, 24).requires_grad_()
    y = model(x, offset=torch.tensor([[0, 0], [16, 8]]), field_shape=(48, 48))
    assert y.shape == x.shape
    y.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert x.grad is not None


def test_layers_are_three_dimensional_and_pool_z_only_from_z_pool_start():
    model = build_model(ModelConfig(ndim=3, depth=4, z_pool_start=3, channels=4))
    assert model.down[0][0].weight.shape[-3:] == (3, 3, 3) and model.head.weight.shape[-3:] == (1, 1, 1)
    # upconv[i] undoes pooling depth - 1 - i: poolings 3 and 2 (in that order on the way up), then 1
    assert [m.stride for m in model.upconv] == [(2, 2, 2), (1, 2, 2), (1, 2, 2)]
    assert model.cfg.min_depth == 2 and model.cfg.min_size == 8


# every variant with every odd size it accepts (a size below a variant's minimum is the error tested below)
_ODD = [(cfg, shape) for cfg in VARIANTS for shape in [(5, 17, 23), (3, 9, 12), (1, 8, 8)]
        if shape[0] >= cfg.min_depth and min(shape[1:]) >= cfg.min_size]


@pytest.mark.parametrize("cfg, shape", _ODD, ids=[f"{_ids(c)}-{'x'.join(map(str, s))}" for c, s in _ODD])
def test_odd_sizes_are_padded_and_cropped_back(cfg, shape):
    model = _randomise(build_model(cfg)).eval()
    with torch.no_grad():
        y = model(_volume(1, 1, *shape))
    assert y.shape == (1, 1, *shape)
    assert torch.isfinite(y).all()


def test_too_small_volume_names_depth_and_the_minimum():
    model = build_model(ModelConfig(ndim=3, depth=3, channels=2))
    with pytest.raises(ImageTooSmallError, match="volume of 3 x 64 x 64 voxels is smaller than the minimum 4 x 4 x 4"):
        model(torch.rand(1, 1, 3, 64, 64))
    with pytest.raises(ImageTooSmallError, match="minimum 4 x 4 x 4"):
        model(torch.rand(1, 1, 8, 3, 64))
    flat = build_model(ModelConfig(ndim=3, depth=3, z_pool_start=3, channels=2))  # never pools z
    assert flat(torch.rand(1, 1, 1, 4, 4)).shape == (1, 1, 1, 4, 4)


def test_a_plane_is_refused_by_a_3d_model_with_its_shape():
    model = build_model(ModelConfig(ndim=3, depth=1, channels=2))
    with pytest.raises(ValueError, match=r"\(batch, channels, depth, height, width\).*\(1, 1, 16, 16\)"):
        model(torch.rand(1, 1, 16, 16))


@pytest.mark.parametrize("cfg", GATED, ids=_ids)
def test_save_and_load_give_bit_identical_outputs(cfg):
    model = _randomise(build_model(cfg)).eval()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    again = build_model(ModelConfig.from_json(cfg.to_json()))
    again.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    x = _volume(1, 1, 6, 20, 12)
    with torch.no_grad():
        assert torch.equal(again.eval()(x, offset=(4, 8), field_shape=(40, 40)),
                           model(x, offset=(4, 8), field_shape=(40, 40)))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("batched", [True, False], ids=["per-sample-offsets", "one-offset"])
def test_a_3d_gate_is_the_2d_gate_of_the_same_place_on_every_plane(training, batched):
    gate = _randomise(CoordGate(5, hidden=8, activation="raw")).train(training)
    offset = torch.tensor([[0, 0], [8, 16]]) if batched else (8, 16)
    with torch.set_grad_enabled(training):
        plane = gate(torch.ones(2, 5, 12, 16), (40, 48), offset, level=2, multiple=4)
        volume = gate(torch.ones(2, 5, 7, 12, 16), (40, 48), offset, level=2, multiple=4)
    assert torch.equal(volume, plane[:, :, None].expand(-1, -1, 7, -1, -1))
    assert plane.std() > 0.1  # it does vary with the position


@pytest.mark.parametrize("cfg", GATED, ids=_ids)
def test_each_coordgate_multiplies_by_a_factor_of_the_yx_position_only(cfg):
    model = _randomise(build_model(cfg)).train()  # training mode: no cache, the gate is recomputed
    gates = [m for m in model.modules() if isinstance(m, CoordGate)]
    seen = {g: [] for g in gates}
    hooks = [g.register_forward_hook(lambda mod, args, out: seen[mod].append((args[0].detach(), out.detach())))
             for g in gates]
    model(_volume(1, 1, 8, 16, 16, seed=1))
    model(_volume(1, 1, 8, 16, 16, seed=2) * 5 + 1)
    for h in hooks:
        h.remove()
    for g in gates:
        (x1, y1), (x2, y2) = seen[g]
        assert not torch.allclose(x1, x2)  # the features differ ...
        factor = torch.where(x1.abs() > 1e-3, y1 / x1, torch.where(x2.abs() > 1e-3, y2 / x2, torch.nan))
        assert (factor.isfinite().sum() > 50) and (factor.nan_to_num(1.0) != 1).any()  # ReLU zeros excluded
        # ... the factor does not, and it is the same on every plane: one value per (y, x) and channel
        per_yx = factor.nanmean(dim=2, keepdim=True).expand_as(factor)
        ok = factor.isfinite()
        torch.testing.assert_close(factor[ok], per_yx[ok], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cfg", [GATED[2], GATED[4]], ids=_ids)
def test_training_batch_gathered_from_the_field_gate_matches_crop_by_crop(cfg):
    # six crops of a 32x32 field: the field's gate is cheaper than one per crop pixel, so it is gathered
    model = _randomise(build_model(cfg)).train()
    x = _volume(6, 1, 4, 16, 16, seed=5)
    m = cfg.min_size
    offs = torch.tensor([[0, 0], [16, 16], [8, 0], [0, 16], [16, 8], [8, 8]]) // m * m
    batched = model(x, offset=offs, field_shape=(32, 32))
    batched.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if "gate" in n}
    model.zero_grad()
    one_by_one = torch.cat([model(x[i : i + 1], offset=tuple(offs[i].tolist()), field_shape=(32, 32))
                            for i in range(6)])
    one_by_one.square().sum().backward()
    torch.testing.assert_close(batched, one_by_one, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        if "gate" in n:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-4, msg=n)


@pytest.mark.parametrize("cfg", GATED, ids=_ids)
def test_wrong_offset_changes_gated_output(cfg):
    model = _randomise(build_model(cfg)).eval()
    crop = _volume(1, 1, 4, 16, 16)
    with torch.no_grad():
        right = model(crop, offset=(16, 16), field_shape=(48, 48))
        wrong = model(crop, offset=(0, 0), field_shape=(48, 48))
    assert (right - wrong).abs().max() > 1e-4  # float error is ~1e-7


def _tiled(model, vol, core, halos, field_shape):
    """``model`` applied tile by tile: cores of ``core`` (z, y, x) voxels, each run with ``halos`` of context on
    every side (cut at the volume's edges), at its (y, x) offset in the field, and its core kept."""
    out = torch.empty_like(vol)
    sizes = vol.shape[2:]
    starts = [range(0, n, c) for n, c in zip(sizes, core)]
    for z in starts[0]:
        for y in starts[1]:
            for x in starts[2]:
                lo = [max(0, s - h) for s, h in zip((z, y, x), halos)]
                hi = [min(n, s + c + h) for s, c, h, n in zip((z, y, x), core, halos, sizes)]
                tile = vol[..., lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
                res = model(tile, offset=(lo[1], lo[2]), field_shape=field_shape)
                end = [min(n, s + c) for s, c, n in zip((z, y, x), core, sizes)]
                out[..., z : end[0], y : end[1], x : end[2]] = res[
                    ..., z - lo[0] : end[0] - lo[0], y - lo[1] : end[1] - lo[1], x - lo[2] : end[2] - lo[2]]
    return out


@pytest.mark.parametrize("cfg, shape, core", [
    (ModelConfig(ndim=3, depth=2, channels=4, gate_hidden=8, gate_activation="raw"), (36, 38, 36), (6, 20, 18)),
    (ModelConfig(ndim=3, depth=3, z_pool_start=2, channels=2, gate_hidden=8, gate_activation="raw"),
     (44, 32, 36), (6, 16, 36)),
], ids=["d2-isotropic", "d3-z-from-pooling-2"])
def test_tiled_output_with_the_receptive_halos_equals_the_whole_volume(cfg, shape, core):
    # float64: tiles and the whole volume sum the same products, so only rounding at 1e-16 could differ
    model = _randomise(build_model(cfg)).double().eval()
    vol = _volume(1, 1, *shape).double()
    halos = (receptive_halo_z(cfg), receptive_halo(cfg), receptive_halo(cfg))
    assert shape[0] - core[0] - 2 * halos[0] >= core[0]  # a tile in z has a full halo on both sides
    with torch.no_grad():
        whole = model(vol)
        tiled = _tiled(model, vol, core, halos, shape[1:])
        short = _tiled(model, vol, core, (cfg.min_depth,) + halos[1:], shape[1:])
    torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-12)
    assert (short - whole).abs().max() > 1e-6  # too little z context is seen: the test can fail


def test_z_halo_follows_the_z_poolings():
    iso = ModelConfig(ndim=3, depth=3)
    assert receptive_halo_z(iso) == receptive_halo(iso) == 28  # isotropic: the xy halo
    # no z pooling: ten 3x3x3 convolutions reach 10 planes, + 2 of margin
    assert receptive_halo_z(iso.replace(z_pool_start=3)) == 12
    assert receptive_halo_z(iso.replace(z_pool_start=2)) == 16
    assert receptive_halo_z(ModelConfig()) == 0  # a 2-D model has no z


@pytest.mark.parametrize("depth, z_pool_start", [(2, 1), (3, 2)])
def test_fresh_residual_3d_model_returns_its_input(depth, z_pool_start):
    model = build_model(ModelConfig(ndim=3, depth=depth, z_pool_start=z_pool_start, channels=4)).eval()
    x = _volume(1, 1, 5, 20, 28)
    with torch.no_grad():
        assert torch.equal(model(x), x)
    assert torch.equal(model.train()(x), x)


@pytest.mark.parametrize("cfg", GATED, ids=_ids)
def test_inference_without_autograd_computes_what_the_modules_compute(cfg):
    # without autograd the blocks run as convolutions with fused ReLUs (oneDNN) and the gates multiply in place
    model = _randomise(build_model(cfg)).eval()
    x = _volume(1, 1, 8, 16, 24)
    with torch.enable_grad():
        reference = model(x, offset=(8, 16), field_shape=(48, 48)).detach()
    with torch.no_grad():
        fast = model(x, offset=(8, 16), field_shape=(48, 48))
        again = model(x, offset=(8, 16), field_shape=(48, 48))  # cached gates, not changed by the in-place product
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, fast, rtol=0, atol=0)


@pytest.mark.parametrize("cfg", [GATED[2], GATED[4]], ids=_ids)
@pytest.mark.parametrize("channels_last", [False, True], ids=["ncdhw", "channels-last-3d"])
def test_bfloat16_compute_dtype_rounds_only_the_networks_correction(cfg, channels_last):
    model = _randomise(build_model(cfg)).eval()
    if channels_last:  # the 5-D weights only: the gates' MLPs have 4-D ones, which channels_last_3d refuses
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d)):
                m.to(memory_format=torch.channels_last_3d)
    x = _volume(1, 1, 8, 16, 24)
    with torch.no_grad():
        bf16 = model(x, offset=(8, 16), field_shape=(48, 48), compute_dtype=torch.bfloat16)
        fp32 = model(x, offset=(8, 16), field_shape=(48, 48))
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, fp32)
    assert (bf16 - fp32).abs().max() <= 0.05 * (fp32 - x).abs().max()


def test_parameters_of_a_3d_network_are_its_2d_twins_with_3x3x3_kernels():
    flat, deep = ModelConfig(depth=3, channels=8), ModelConfig(ndim=3, depth=3, channels=8)
    n2, n3 = count_parameters(build_model(flat)), count_parameters(build_model(deep))
    gates2 = sum(p.numel() for n, p in build_model(flat).named_parameters() if "gate" in n)
    gates3 = sum(p.numel() for n, p in build_model(deep).named_parameters() if "gate" in n)
    assert gates3 == gates2 > 0  # the gates read (y, x) in both
    assert 2.5 * (n2 - gates2) < n3 - gates3 < 3 * (n2 - gates2)  # 27 / 9 taps, except the 1x1 head and 2x2 upconvs
    aniso = count_parameters(build_model(deep.replace(z_pool_start=2)))
    assert aniso < n3  # a (1, 2, 2) transposed convolution has half the weights of a (2, 2, 2) one
