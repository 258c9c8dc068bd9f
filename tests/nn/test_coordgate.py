import pytest
import torch

from napari_coordgate.nn.coordgate import CoordGate, field_coordinates


def test_pixel_centres_follow_the_documented_formula():
    c = field_coordinates((4, 5))
    assert c.shape == (2, 4, 5)
    assert torch.allclose(c[0, 0], torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0]))
    assert torch.allclose(c[1, :, 0], torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0]))


def test_crop_coordinates_equal_the_matching_region_of_the_field():
    full = field_coordinates((40, 60))
    crop = field_coordinates((40, 60), offset=(8, 12), shape=(16, 20))
    assert torch.equal(crop, full[:, 8:24, 12:32])


def test_downsampled_level_takes_block_centres():
    full = field_coordinates((16, 16))
    lvl2 = field_coordinates((16, 16), level=2)
    assert lvl2.shape == (2, 4, 4)
    block_mean = full.reshape(2, 4, 4, 4, 4).mean(dim=(2, 4))
    assert torch.allclose(lvl2, block_mean, atol=1e-6)


def test_batched_offsets_give_one_grid_per_sample():
    offs = torch.tensor([[0, 0], [4, 8]])
    grids = field_coordinates((32, 32), offs, (8, 8))
    assert grids.shape == (2, 2, 8, 8)
    assert torch.equal(grids[1], field_coordinates((32, 32), (4, 8), (8, 8)))
    assert not torch.equal(grids[0], grids[1])


def test_single_pixel_field_is_centred():
    assert torch.equal(field_coordinates((1, 1)), torch.zeros(2, 1, 1))


def test_bad_field_shape_is_rejected():
    with pytest.raises(ValueError, match="field_shape"):
        field_coordinates((0, 5))


def test_one_plus_gate_starts_as_identity():
    g = CoordGate(4, activation="one_plus")
    x = torch.randn(2, 4, 8, 8)
    assert torch.equal(g(x, (8, 8)), x)


@pytest.mark.parametrize("activation", ["sigmoid", "relu", "raw"])
def test_gate_depends_on_coordinates_only(activation):
    g = CoordGate(3, hidden=8, layers=3, activation=activation)
    coords = field_coordinates((8, 8))
    a, b = torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8)
    gate = g.gate(coords)
    assert torch.allclose(g(a, (8, 8)), a * gate)
    assert torch.allclose(g(b, (8, 8)), b * gate)
    if activation == "sigmoid":
        assert bool(((gate > 0) & (gate < 1)).all())
    if activation == "relu":
        assert bool((gate >= 0).all())


def test_cached_gate_is_invalidated_when_weights_change():
    g = CoordGate(2, activation="raw").eval()
    make = lambda: field_coordinates((8, 8))  # noqa: E731
    with torch.no_grad():
        first = g.cached_gate("k", make)
        assert g.cached_gate("k", make) is first
        g.mlp[-1].bias.add_(1.0)
        second = g.cached_gate("k", make)
    assert not torch.equal(first, second)
    assert torch.allclose(second, first + 1.0)


def _trained_gate(channels=3):
    g = CoordGate(channels, hidden=8, activation="one_plus")
    with torch.no_grad():
        for p in g.parameters():
            p.normal_(0, 0.5)
    return g.eval()


def test_a_tile_is_gated_by_its_slice_of_the_whole_field_gate():
    g = _trained_gate()
    field = (40, 56)
    whole = torch.ones(1, 3, 20, 28)  # level 1 of the whole field
    with torch.no_grad():
        full = g(whole, field, (0, 0), level=1)
        tile = g(torch.ones(1, 3, 6, 10), field, (8, 12), level=1)  # offset on the level-1 grid
        odd = g(torch.ones(1, 3, 6, 10), field, (9, 13), level=1)  # off the grid: computed for its own place
    torch.testing.assert_close(tile, full[..., 4:10, 6:16])
    expected = g.gate(field_coordinates(field, (9, 13), (6, 10), 1))
    torch.testing.assert_close(odd, expected)


def test_per_sample_offsets_gather_the_same_gates_with_gradients():
    g = _trained_gate().train()
    field = (64, 64)
    offsets = torch.tensor([[0, 0], [16, 32], [48, 8]])
    x = torch.ones(3, 3, 16, 16)
    out = g(x, field, offsets, level=0)
    for b, (y, x0) in enumerate(offsets.tolist()):
        torch.testing.assert_close(out[b], g.gate(field_coordinates(field, (y, x0), (16, 16), 0))[0])
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in g.parameters())


def test_the_gate_stays_float32_under_autocast_so_cached_gates_do_not_depend_on_precision():
    g = _trained_gate()
    field = (32, 32)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = g.field_gate(torch.ones(1, 3, 32, 32), field, (0, 0), 0)
        high = g.field_gate(torch.ones(1, 3, 32, 32), field, (0, 0), 0)
    assert low.dtype == high.dtype == torch.float32
    torch.testing.assert_close(low, high, rtol=0, atol=0)


def test_the_mlp_runs_as_matrix_products_and_equals_its_1x1_convolutions():
    g = _trained_gate()
    coords = field_coordinates((24, 40), (0, 0), (24, 40), 0)[None]
    with torch.no_grad():
        by_conv = 1.0 + g.mlp(coords)  # the module as stored (1x1 convolutions), one_plus activation
        torch.testing.assert_close(g.gate(coords), by_conv)
        assert g.gate(coords).is_contiguous()


@pytest.mark.parametrize("batched", [False, True])
def test_channels_last_feature_maps_get_channels_last_gates_with_the_same_values(batched):
    g = _trained_gate().train()
    field = (64, 64)
    offsets = torch.tensor([[0, 0], [16, 32], [48, 8]]) if batched else (16, 32)
    x = torch.rand(3 if batched else 1, 3, 16, 16)
    x_cl = x.clone().contiguous(memory_format=torch.channels_last)
    out, out_cl = g(x, field, offsets, level=0), g(x_cl, field, offsets, level=0)
    assert out.is_contiguous() and out_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out_cl, out)
    grads = torch.autograd.grad(out.square().sum(), list(g.parameters()))
    grads_cl = torch.autograd.grad(out_cl.square().sum(), list(g.parameters()))
    for a, b in zip(grads, grads_cl):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_crop_gather_gradient_adds_overlapping_crops_into_the_field():
    from napari_coordgate.nn.coordgate import _CropGather

    field = torch.rand(6, 7, 3, dtype=torch.float64, requires_grad=True)
    corners = [(0, 0), (1, 2), (1, 2), (3, 4)]  # two identical and two overlapping crops
    out = _CropGather.apply(field, corners, 3, 3)
    for k, (y, x) in enumerate(corners):
        assert torch.equal(out[k], field[y : y + 3, x : x + 3])
    assert torch.autograd.gradcheck(lambda f: _CropGather.apply(f, corners, 3, 3), (field,))
