"""Crop sampling: offsets stay on the pooling grid inside the field; 'cover' reaches the border more often."""

import numpy as np
import pytest

from napari_coordgate.data import sample_offsets


def _coverage(offsets, field, crop):
    cov = np.zeros(field)
    for a in offsets:
        cov[a : a + crop] += 1
    return cov / len(offsets)


@pytest.mark.parametrize("mode", ["uniform", "cover"])
def test_offsets_are_aligned_and_inside_the_field(mode):
    offs = sample_offsets(np.random.default_rng(0), 500, (100, 260), (64, 128), 4, mode)
    assert offs.shape == (500, 2) and (offs % 4 == 0).all()
    assert (offs >= 0).all() and (offs[:, 0] + 64 <= 100).all() and (offs[:, 1] + 128 <= 260).all()


def test_cover_puts_the_field_border_in_crops_far_more_often_than_uniform():
    rng = np.random.default_rng(0)
    uniform = _coverage(sample_offsets(rng, 4000, (8, 256), (8, 128), 2, "uniform")[:, 1], 256, 128)
    cover = _coverage(sample_offsets(rng, 4000, (8, 256), (8, 128), 2, "cover")[:, 1], 256, 128)
    assert uniform[0] < 0.05 and uniform[-1] < 0.05
    assert cover[0] > 0.2 and cover[-1] > 0.2
    # the centre is still covered at least as often as the border
    assert cover[128] >= cover[0]


def test_unknown_sampling_mode_is_rejected():
    with pytest.raises(ValueError, match="cover"):
        sample_offsets(np.random.default_rng(0), 2, (64, 64), (32, 32), 2, "edges")


# -- checks and normalisation that read a stack one plane at a time --------------------------------------------
def _stack(n=3, h=40, w=48, seed=0):
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    sharp = (gaussian_filter(rng.random((n, h, w)), (0, 1, 1)) * 3000 + 100).astype(np.uint16)
    blurred = (gaussian_filter(sharp.astype(np.float32), (0, 1.5, 1.5))).astype(np.uint16)
    return sharp, blurred


def test_check_pairs_returns_the_stacks_themselves_not_copies(tmp_path):
    from napari_coordgate.data import check_pairs

    sharp, blurred = _stack()
    np.save(tmp_path / "s.npy", sharp)
    mapped = np.load(tmp_path / "s.npy", mmap_mode="r")

    s, b = check_pairs(mapped, blurred)

    assert np.shares_memory(s, mapped) and s.dtype == np.uint16  # a view of the map, in its own dtype
    assert np.shares_memory(b, blurred)
    one_s, one_b = check_pairs(sharp[0], blurred[0])
    assert one_s.shape == (1, 40, 48) and np.shares_memory(one_s, sharp)


def test_check_pairs_names_the_constant_or_identical_plane():
    from napari_coordgate.data import InputError, check_pairs

    sharp, blurred = _stack()
    flat = sharp.copy()
    flat[1] = 7
    with pytest.raises(InputError, match="sharp plane 1 is constant"):
        check_pairs(flat, blurred)
    same = blurred.copy()
    same[2] = sharp[2]
    with pytest.raises(InputError, match="sharp and blurred plane 2 are identical"):
        check_pairs(sharp, same)


def test_fit_normalization_samples_a_large_stack_plane_by_plane_like_the_flattened_stack():
    from napari_coordgate.data import fit_normalization

    sharp = (np.random.default_rng(1).gamma(2.0, 300.0, (5, 1000, 1001)) + 50).astype(np.uint16)  # > 4 MP
    flat = sharp.astype(np.float32).ravel()
    sample = flat[:: flat.size // 4_000_000 + 1]  # the rule: every k-th pixel of the stack in memory order
    lo, hi = np.percentile(sample, [0.1, 99.9])

    norm = fit_normalization(sharp)

    assert (norm.offset, norm.scale) == (float(lo), float(hi - lo))


def test_check_registration_returns_registered_copies_of_the_shifted_planes_only():
    from napari_coordgate.data import check_registration

    sharp, blurred = _stack()
    shifted = blurred.copy()
    shifted[1] = np.roll(blurred[1], 2, axis=0)
    shifted.flags.writeable = False  # a read-only memory map, say: never written

    registered, shifts = check_registration(sharp, shifted, correct=True)

    assert list(registered) == [1] and registered[1].dtype == np.float32
    assert shifts[1][0] == pytest.approx(-2, abs=0.1) and max(map(abs, shifts[0])) < 0.25
    assert np.abs(registered[1][4:-4] - blurred[1][4:-4]).max() < 0.05 * blurred[1].max()
    with pytest.warns(UserWarning, match=r"\(plane 1: dy=-[12]\.\d\d"):
        assert check_registration(sharp, shifted)[0] == {}


def test_correct_shift_moves_a_plane_by_the_fourier_shift_and_returns_float32():
    from napari_coordgate.data import correct_shift

    plane = np.random.default_rng(3).random((16, 20))

    moved = correct_shift(plane, (1.0, -2.0))

    assert moved.dtype == np.float32
    np.testing.assert_allclose(moved, np.roll(plane, (1, -2), axis=(0, 1)), rtol=0, atol=1e-6)


def test_per_image_normalisation_follows_a_camera_offset_and_gain():
    from napari_coordgate.data import NORM_PERCENTILES, Normalization

    plane = np.random.default_rng(2).gamma(2.0, 0.2, (300, 200))
    norm = Normalization(0.0, 1.0, NORM_PERCENTILES)
    base = norm.for_plane(plane)
    lo, hi = np.percentile(plane, NORM_PERCENTILES)
    assert (base.offset, base.scale, base.per_image) == pytest.approx((lo, hi - lo, False))
    for a, c in ((0.3, 0.0), (3000.0, 100.0), (3000.0, 500.0)):
        m = norm.for_plane(a * plane + c)
        assert m.offset == pytest.approx(a * base.offset + c) and m.scale == pytest.approx(a * base.scale)
        # the network's input is the same whatever the camera's units
        np.testing.assert_allclose(m.apply(a * plane + c), base.apply(plane), atol=1e-5)
    # a constant plane has no range: the training units' scale
    const = Normalization(0.0, 7.0, NORM_PERCENTILES)
    assert const.for_plane(np.full((8, 8), 3.0)) == Normalization(3.0, 7.0)
    # a fixed map ignores the plane
    assert Normalization(1.0, 2.0).for_plane(plane) == Normalization(1.0, 2.0)


def test_per_image_normalisation_reads_a_regular_subsample_of_a_large_plane():
    from napari_coordgate.data import PLANE_SAMPLE_PIXELS, plane_sample

    plane = np.arange(2048 * 1024, dtype=np.uint16).reshape(2048, 1024)
    sample = plane_sample(plane)
    assert sample.dtype == np.float64 and sample.size <= PLANE_SAMPLE_PIXELS
    np.testing.assert_array_equal(sample, plane[::2, ::2].ravel())
    assert plane_sample(plane[:100, :100]).size == 100 * 100


@pytest.mark.parametrize("d, match", [({"offset": 0, "scale": 0}, "scale must be > 0"),
                                      ({"offset": 0, "scale": 1, "percentiles": [50, 50]}, "0 <= low < high")])
def test_normalisation_from_a_file_refuses_nonsense(d, match):
    from napari_coordgate.data import Normalization

    with pytest.raises(ValueError, match=match):
        Normalization.from_dict(d)
