"""Crowded slides: a spot the joint fit does not need is told from a bead by the evidence it adds."""

import numpy as np

from napari_coordgate.calibration.crowd import Sources, evidence, model_sources


def _gauss(s: int, sigma: float) -> np.ndarray:
    r2 = (np.arange(s) - s // 2)[:, None] ** 2 + (np.arange(s) - s // 2)[None, :] ** 2
    g = np.exp(-r2 / (2 * sigma**2))
    return g / g.sum()


def _pair_image(rng, y, x, flux, sigma: float, size: int = 96, noise: float = 3.0) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size].astype(float)
    img = np.full((size, size), 20.0)
    for a, b, f in zip(y, x, flux):
        img += f * np.exp(-((yy - a) ** 2 + (xx - b) ** 2) / (2 * sigma**2)) / (2 * np.pi * sigma**2)
    return img + rng.normal(0.0, noise, img.shape)


def test_a_spot_between_two_beads_is_not_needed_and_the_beads_are():
    rng = np.random.default_rng(0)
    sigma, s = 1.4, 15
    fwhm = 2.3548 * sigma
    y, x = np.array([48.0, 48.0]), np.array([46.0, 46.0 + 1.4 * fwhm])  # two beads 1.4 FWHM apart
    img = _pair_image(rng, y, x, [3000.0, 2500.0], sigma)
    # the detection's third spot between them (what a blended first fit leaves)
    ys, xs = np.array([48.0, 48.0, 48.0]), np.array([45.6, (x[0] + x[1]) / 2, x[1] + 0.4])
    src = model_sources(img, 3.0, Sources(ys, xs, np.repeat(_gauss(s, sigma)[None], 3, 0), np.full(3, 500.0)))
    ev = evidence(img, 3.0, src, np.arange(3))
    assert ev[1] < 25.0, ev  # the others explain its light
    assert ev[0] > 1000.0 and ev[2] > 1000.0, ev


def test_a_faint_real_bead_beside_a_bright_one_is_needed():
    rng = np.random.default_rng(1)
    sigma, s = 1.4, 15
    fwhm = 2.3548 * sigma
    y, x = np.array([48.0, 48.0]), np.array([46.0, 46.0 + 1.2 * fwhm])
    img = _pair_image(rng, y, x, [4000.0, 400.0], sigma)  # the faint one's peak: about 11 noise sigmas
    src = model_sources(img, 3.0, Sources(y + 0.2, x - 0.2, np.repeat(_gauss(s, sigma)[None], 2, 0), np.full(2, 500.)))
    ev = evidence(img, 3.0, src, np.arange(2))
    assert ev.min() > 25.0, ev


def test_where_a_neighbours_light_outshines_the_bead_its_window_holds_the_beads_model_not_the_leftover():
    from napari_coordgate.calibration.crowd import isolate_windows

    rng = np.random.default_rng(2)
    sigma, s, size = 1.4, 15, 21
    y, x = np.array([48.0, 48.0]), np.array([44.0, 51.0])  # 2.1 FWHM apart
    img = _pair_image(rng, y, x, [2000.0, 20000.0], sigma, noise=1.0)
    psfs = np.repeat(_gauss(s, sigma)[None], 2, 0)
    src = model_sources(img, 1.0, Sources(y, x, psfs, np.full(2, 1000.0)))
    src.amplitude[1] *= 1.05  # the bright neighbour's model 5 % off: its leftover would be the bead's misfit
    plain = isolate_windows(img, src, np.array([0]), size)[0]
    masked = isolate_windows(img, src, np.array([0]), size, noise=1.0)[0]
    r = size // 2
    own = np.zeros((size, size))
    own[r - s // 2 : r + s // 2 + 1, r - s // 2 : r + s // 2 + 1] = src.shifted()[0] * src.amplitude[0]
    at_neighbour = (r, r + 7)  # the neighbour's centre, in the bead's window
    assert plain[at_neighbour] - 20.0 < -20.0  # the over-subtracted neighbour leaves a hole
    assert abs(masked[at_neighbour] - 20.0 - own[at_neighbour]) < 3.0  # masked: the bead's model on the background
    assert np.array_equal(masked[r - 1 : r + 2, r - 1 : r + 2], plain[r - 1 : r + 2, r - 1 : r + 2])  # the core kept
