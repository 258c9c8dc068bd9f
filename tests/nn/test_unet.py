"""One battery for every variant; gate-specific checks for the position-dependent ones."""

import pytest
import torch

from napari_coordgate.config import ModelConfig
from napari_coordgate.nn import ImageTooSmallError, build_model, count_parameters

# tiny widths keep deep variants fast on a 2-core CI machine
VARIANTS = [
    ModelConfig(depth=d, channels=c, gate=g, gate_hidden=8, gate_activation=a)
    for d, c in [(1, 4), (2, 4), (3, 4), (4, 4)]
    for g, a in [("none", "one_plus"), ("coordgate", "raw"), ("coordconv", "one_plus")]
]
# the MultiWienerNet-style first stage (fixed filter bank) with and without gates
VARIANTS += [
    ModelConfig(depth=2, channels=4, gate=g, gate_hidden=8, prefilter="wiener", prefilter_grid=2, prefilter_size=7)
    for g in ("none", "coordgate")
]
GATED = [c for c in VARIANTS if c.gate != "none"]


def _ids(cfg):
    return f"d{cfg.depth}-{cfg.gate}" + ("-wiener" if cfg.prefilter != "none" else "")


def _randomise(model):
    """Fresh residual/one_plus models start as the identity; give the zero-initialised layers random
    weights so the checks are not trivial (the rest keeps torch's default initialisation)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        if model.prefilter is not None:  # fixed kernels start at zero until training sets them
            model.prefilter.kernels.copy_(torch.randn(model.prefilter.kernels.shape, generator=g))
    return model


@pytest.mark.parametrize("cfg", VARIANTS, ids=_ids)
def test_forward_backward_keeps_shape_and_reaches_every_parameter(cfg):
    model = _randomise(build_model(cfg))
    x = torch.rand(2, 1, 24, 32, requires_grad=True)
    y = model(x)
    assert y.shape == x.shape
    y.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert x.grad is not None


@pytest.mark.parametrize("cfg", VARIANTS, ids=_ids)
@pytest.mark.parametrize("shape", [(17, 23), (9, 40), (33, 8)])
def test_odd_and_non_square_sizes_come_back_unchanged_in_shape(cfg, shape):
    if min(shape) < cfg.min_size:
        pytest.skip("below minimum size")
    model = _randomise(build_model(cfg)).eval()
    with torch.no_grad():
        y = model(torch.rand(1, 1, *shape))
    assert y.shape == (1, 1, *shape)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("depth", [2, 4])
def test_too_small_image_names_the_minimum(depth):
    model = build_model(ModelConfig(depth=depth, channels=2))
    m = 2 ** (depth - 1)
    with pytest.raises(ImageTooSmallError, match=f"minimum {m}x{m}"):
        model(torch.rand(1, 1, m - 1, 20))


def test_wrong_input_rank_is_rejected_with_the_shape():
    model = build_model(ModelConfig(depth=1, channels=2))
    with pytest.raises(ValueError, match=r"\(1, 16, 16\)"):
        model(torch.rand(1, 16, 16))


@pytest.mark.parametrize("cfg", VARIANTS, ids=_ids)
def test_aligned_crop_equals_region_of_whole_field(cfg):
    model = _randomise(build_model(cfg)).eval()
    field = torch.rand(1, 1, 192, 224, generator=torch.Generator().manual_seed(2))
    oy, ox = 32, 48  # multiples of 2**(depth-1) for every depth tested
    h, w = 128, 136
    with torch.no_grad():
        whole = model(field)
        crop = model(field[..., oy : oy + h, ox : ox + w], offset=(oy, ox), field_shape=(192, 224))
    # beyond the receptive field's half-width (about 3 * 2**depth), the crop's edges no longer matter
    m = 3 * 2**cfg.depth + 8 + (cfg.prefilter_size // 2 if cfg.prefilter_channels else 0)
    a = whole[..., oy + m : oy + h - m, ox + m : ox + w - m]
    b = crop[..., m : h - m, m : w - m]
    assert a.numel() > 0
    assert torch.allclose(a, b, atol=1e-5)
    # and the crop's edges do differ, so the margin is not hiding everything
    assert not torch.allclose(whole[..., oy : oy + h, ox : ox + w], crop, atol=1e-5)


@pytest.mark.parametrize("cfg", GATED, ids=_ids)
def test_wrong_offset_changes_gated_output(cfg):
    model = _randomise(build_model(cfg)).eval()
    field = torch.rand(1, 1, 64, 64)
    crop = field[..., 16:48, 16:48]
    with torch.no_grad():
        right = model(crop, offset=(16, 16), field_shape=(64, 64))
        wrong = model(crop, offset=(0, 0), field_shape=(64, 64))
    assert (right - wrong).abs().max() > 1e-4  # float error is ~1e-7


@pytest.mark.parametrize("cfg", [c for c in VARIANTS if c.gate == "none"], ids=_ids)
def test_plain_unet_ignores_offset(cfg):
    model = _randomise(build_model(cfg)).eval()
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x, offset=(0, 0), field_shape=(64, 64)),
                           model(x, offset=(16, 8), field_shape=(64, 64)))


@pytest.mark.parametrize("cfg", GATED, ids=_ids)
def test_batched_offsets_match_one_crop_at_a_time(cfg):
    model = _randomise(build_model(cfg)).eval()
    x = torch.rand(2, 1, 16, 16)
    offs = torch.tensor([[0, 0], [16, 32]])
    with torch.no_grad():
        batched = model(x, offset=offs, field_shape=(64, 64))
        one = model(x[1:], offset=(16, 32), field_shape=(64, 64))
    assert torch.allclose(batched[1:], one, atol=1e-6)


@pytest.mark.parametrize("cfg", [c for c in GATED if c.gate == "coordgate"], ids=_ids)
def test_cached_gates_equal_uncached(cfg):
    model = _randomise(build_model(cfg)).eval()
    x = torch.rand(1, 1, 32, 48)
    with torch.no_grad():
        cached_first = model(x)
        cached_again = model(x)
    with torch.enable_grad():
        uncached = model(x).detach()
    assert torch.equal(cached_first, cached_again)
    assert torch.allclose(cached_first, uncached, atol=1e-6)
    assert any(len(g._cache) for g in model.down_gates)


@pytest.mark.parametrize("cfg", [c for c in GATED if c.gate == "coordgate"], ids=_ids)
def test_each_coordgate_multiplies_by_a_factor_that_depends_on_position_only(cfg):
    from napari_coordgate.nn.coordgate import CoordGate

    model = _randomise(build_model(cfg)).train()  # training mode: no cache, the gate is recomputed
    gates = [m for m in model.modules() if isinstance(m, CoordGate)]
    seen = {g: [] for g in gates}
    hooks = [g.register_forward_hook(lambda mod, args, out: seen[mod].append((args[0].detach(), out.detach())))
             for g in gates]
    first, second = torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32) * 5 + 1
    model(first)
    model(second)
    for h in hooks:
        h.remove()
    for g in gates:
        (x1, y1), (x2, y2) = seen[g]
        assert not torch.allclose(x1, x2)  # the features differ ...
        ok = (x1.abs() > 1e-3) & (x2.abs() > 1e-3)
        factor1, factor2 = y1[ok] / x1[ok], y2[ok] / x2[ok]
        assert ok.sum() > 50 and not torch.allclose(factor1, torch.ones_like(factor1))  # ReLU zeros excluded
        # ... the factor at each position does not (a gate computed from the features would fail here)
        torch.testing.assert_close(factor1, factor2, rtol=1e-4, atol=1e-5)


def test_initial_weights_come_from_the_callers_torch_generator():
    import numpy as np

    cfg = ModelConfig(depth=2, channels=4, gate="coordgate", gate_hidden=8)
    numpy_state = np.random.get_state()[1].copy()
    torch.manual_seed(123)
    a, b = build_model(cfg).state_dict(), build_model(cfg).state_dict()
    torch.manual_seed(123)
    again = build_model(cfg).state_dict()
    # a seed reproduces a model, and building does not reseed: the next model draws fresh weights
    assert all(torch.equal(a[k], again[k]) for k in a)
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].any())
    assert (np.random.get_state()[1] == numpy_state).all()  # numpy's global generator is left alone


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_a_fresh_coordgate_unet_equals_the_plain_unet_with_the_same_weights(depth):
    plain = build_model(ModelConfig(depth=depth, channels=4, gate="none")).eval()
    gated = build_model(ModelConfig(depth=depth, channels=4, gate="coordgate", gate_hidden=8)).eval()  # 1 + MLP
    with torch.no_grad():
        for p in plain.parameters():  # a non-trivial plain network (its head starts at zero)
            p.add_(torch.randn_like(p) * 0.1)
    missing, unexpected = gated.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all("gate" in k for k in missing)
    x = torch.rand(2, 1, 40, 48)
    with torch.no_grad():
        out_plain, out_gated = plain(x), gated(x, offset=torch.tensor([[0, 0], [8, 16]]), field_shape=(64, 80))
    assert not torch.equal(out_plain, x)
    assert torch.equal(out_gated, out_plain)  # fresh gates are exactly one at every position


def test_fresh_residual_model_is_identity():
    model = build_model(ModelConfig(depth=3, channels=4)).eval()
    x = torch.rand(1, 1, 20, 28)
    with torch.no_grad():
        assert torch.equal(model(x), x)


def test_depth_one_coordgate_gates_its_single_level():
    model = build_model(ModelConfig(depth=1, channels=4, gate="coordgate"))
    assert len(model.down_gates) == 1 and len(model.up_gates) == 0


def test_parameter_counts_grow_with_depth_and_gates_add_few():
    plain = [count_parameters(build_model(ModelConfig(depth=d, gate="none"))) for d in range(1, 7)]
    gated = [count_parameters(build_model(ModelConfig(depth=d, gate="coordgate"))) for d in range(1, 7)]
    assert plain == sorted(plain)
    assert all(g > p for g, p in zip(gated, plain))
    assert gated[1] * 60 < plain[5] * 1.0  # the paper's ~60x: CoordGate U-Net(2) vs U-Net(6)


@pytest.mark.parametrize("cfg", [c for c in GATED if c.gate == "coordgate"], ids=_ids)
def test_tile_gate_sliced_from_field_cache_equals_direct(cfg):
    model = _randomise(build_model(cfg)).eval()
    x = torch.rand(1, 1, 24, 40)
    with torch.no_grad():
        sliced = model(x, offset=(16, 24), field_shape=(50, 70))  # an aligned tile inside the field
        assert all(any(k[0][0] == "field" for k in g._cache) for g in model.down_gates)
    with torch.enable_grad():
        direct = model(x, offset=(16, 24), field_shape=(50, 70)).detach()
    assert torch.allclose(sliced, direct, atol=1e-6)


@pytest.mark.parametrize("cfg", [c for c in GATED if c.gate == "coordgate"], ids=_ids)
def test_training_batch_gathered_from_the_field_gate_matches_crop_by_crop(cfg):
    # six 16x16 crops of a 32x32 field: the field's gate is cheaper than one per crop pixel, so it is gathered
    model = _randomise(build_model(cfg)).train()
    g = torch.Generator().manual_seed(5)
    x = torch.rand(6, 1, 16, 16, generator=g)
    m = cfg.min_size
    offs = torch.tensor([[0, 0], [16, 16], [8, 0], [0, 16], [16, 8], [8, 8]]) // m * m
    batched = model(x, offset=offs, field_shape=(32, 32))
    batched.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if "gate" in n}
    model.zero_grad()
    one_by_one = torch.cat([model(x[i : i + 1], offset=tuple(offs[i].tolist()), field_shape=(32, 32))
                            for i in range(6)])
    one_by_one.square().sum().backward()
    assert torch.allclose(batched, one_by_one, atol=1e-5)
    for n, p in model.named_parameters():
        if "gate" in n:
            assert torch.allclose(grads[n], p.grad, atol=1e-4, rtol=1e-4), n


@pytest.mark.parametrize("cfg", VARIANTS, ids=_ids)
def test_a_channels_last_network_computes_what_the_usual_layout_computes(cfg):
    # training and prediction lay the network out channels-last on a CPU (devices.on_device): the same function,
    # forward and backward, with batched offsets (training) and cached gates (inference)
    import copy

    from napari_coordgate.devices import on_device

    torch.manual_seed(0)
    nchw = _randomise(build_model(cfg))
    cl = on_device(copy.deepcopy(nchw), torch.device("cpu"))
    assert cl.down[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(2, cfg.in_channels, 32, 32)
    offsets = torch.tensor([[0, 0], [32, 16]])
    out, out_cl = nchw(x, offset=offsets, field_shape=(64, 64)), cl(x, offset=offsets, field_shape=(64, 64))
    torch.testing.assert_close(out_cl, out, rtol=1e-4, atol=1e-5)
    out.square().sum().backward()
    out_cl.square().sum().backward()
    for (name, p), p_cl in zip(nchw.named_parameters(), cl.parameters()):
        torch.testing.assert_close(p_cl.grad, p.grad, rtol=1e-3, atol=1e-5, msg=name)
    with torch.no_grad():
        nchw.eval(), cl.eval()
        torch.testing.assert_close(cl(x[:1], offset=(32, 16), field_shape=(64, 64)),
                                   nchw(x[:1], offset=(32, 16), field_shape=(64, 64)), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cfg", VARIANTS, ids=_ids)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
def test_inference_without_autograd_computes_what_the_modules_compute(cfg, channels_last):
    # without autograd the blocks run as convolutions with fused ReLUs and the gates multiply in place
    torch.manual_seed(0)
    model = _randomise(build_model(cfg)).eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    x = torch.rand(1, cfg.in_channels, 32, 48)
    with torch.enable_grad():
        reference = model(x, offset=(16, 8), field_shape=(64, 64)).detach()
    with torch.no_grad():
        fast = model(x, offset=(16, 8), field_shape=(64, 64))
        again = model(x, offset=(16, 8), field_shape=(64, 64))  # cached gates, not changed by the in-place product
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(again, fast, rtol=0, atol=0)


@pytest.mark.parametrize("cfg", VARIANTS, ids=_ids)
def test_bfloat16_compute_dtype_rounds_only_the_networks_correction(cfg):
    torch.manual_seed(0)
    model = _randomise(build_model(cfg)).eval().to(memory_format=torch.channels_last)
    x = torch.rand(1, cfg.in_channels, 32, 48)
    with torch.no_grad():
        bf16 = model(x, offset=(16, 8), field_shape=(64, 64), compute_dtype=torch.bfloat16)  # fills the gate cache
        fp32_after = model(x, offset=(16, 8), field_shape=(64, 64))
        model.clear_gate_cache()
        fp32 = model(x, offset=(16, 8), field_shape=(64, 64))
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, fp32)
    # the features carry 8 mantissa bits: the output's error is a few percent of the correction at most
    correction = (fp32 - x).abs().max()
    assert (bf16 - fp32).abs().max() <= 0.05 * correction
    torch.testing.assert_close(fp32_after, fp32, rtol=0, atol=0)  # bf16 gates are cached apart from fp32 ones


@pytest.mark.parametrize("fused", [True, False], ids=["fused-relu", "torch-conv"])
def test_bfloat16_inference_runs_with_and_without_onednn_bf16_kernels(monkeypatch, fused):
    # CPUs without AVX512 have no oneDNN bf16 kernels: the fused op is skipped and torch's own convolution runs
    from napari_coordgate.nn import unet

    if not fused:
        monkeypatch.setattr(unet, "_fused_conv_relu", lambda dtype: None)
    elif unet._fused_conv_relu(torch.bfloat16) is None:
        pytest.skip("this CPU or torch build has no oneDNN bf16 convolution to fuse")
    model = _randomise(build_model(ModelConfig(depth=2, channels=4, gate="coordgate", gate_hidden=8))).eval()
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        fp32 = model(x)
        bf16 = model(x, compute_dtype=torch.bfloat16)
    assert bf16.dtype == torch.float32 and (bf16 - fp32).abs().max() <= 0.05 * (fp32 - x).abs().max()


def test_inference_under_cpu_autocast_leaves_the_convolutions_to_autocast():
    # autocast on a CPU casts each convolution's inputs itself: the fused op, which autocast does not know, is skipped
    model = _randomise(build_model(ModelConfig(depth=2, channels=4, gate="coordgate", gate_hidden=8))).eval()
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        feats = model.down[0][0](x)  # what autocast makes of the first convolution
        from napari_coordgate.nn.unet import _conv_relu

        fused_path = _conv_relu(model.down[0][0], x)
        out = model(x)
    assert feats.dtype == fused_path.dtype == torch.bfloat16
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_a_compute_dtype_is_refused_while_autograd_records():
    model = build_model(ModelConfig(depth=2, channels=4))
    with pytest.raises(ValueError, match="compute_dtype is for inference"):
        model(torch.rand(1, 1, 16, 16), compute_dtype=torch.bfloat16)
