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
