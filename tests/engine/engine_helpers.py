"""Small builders shared by the engine tests."""

import numpy as np
from scipy.ndimage import gaussian_filter

from napari_coordgate.config import ModelConfig, TrainConfig

TINY = ModelConfig(depth=2, channels=4, gate="coordgate", gate_hidden=8)
WIENER = ModelConfig(depth=2, channels=4, gate="coordgate", gate_hidden=8, prefilter="wiener", prefilter_grid=2,
                     prefilter_size=9)


def _specimen(n, h=64, w=64, seed=0):
    rng = np.random.default_rng(seed)
    imgs = gaussian_filter(rng.random((n, h, w)), (0, 1.0, 1.0))
    return (imgs - imgs.min()) / np.ptp(imgs)


def _pairs(n=3, h=64, w=64):
    sharp = _specimen(n, h, w)
    # blur that grows toward the right edge: a position-dependent problem in miniature
    blurred = np.stack([np.where(np.arange(w)[None] < w // 2, gaussian_filter(s, 0.7), gaussian_filter(s, 1.8))
                        for s in sharp])
    return (sharp * 4000 + 100).astype(np.uint16), (blurred * 4000 + 100).astype(np.uint16)


def _quick(**kw):
    base = dict(crop=32, batch=4, epochs=3, steps_per_epoch=8, seed=0, device="cpu", lr=3e-3)
    return TrainConfig(**{**base, **kw})


