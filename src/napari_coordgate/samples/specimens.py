"""Sharp specimens that need no download: bundled scikit-image images and procedural microscopy-like fields.

Used by the demo, the napari sample data, the benchmarks and the tests. All outputs are float32 in [0, 1].
"""

from __future__ import annotations

import numpy as np

__all__ = ["BUNDLED", "TRAIN_SOURCES", "bundled_specimen", "procedural_specimen", "specimen_fields"]

# images shipped inside scikit-image (no network); colour ones are converted to grey
BUNDLED = ("cell", "coins", "camera", "moon", "immunohistochemistry", "hubble_deep_field", "retina", "brick",
           "gravel", "grass", "astronaut", "clock", "page", "text", "coffee", "chelsea", "rocket")


def _unit(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float32)
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def bundled_specimen(name: str) -> np.ndarray:
    """A scikit-image bundled image as grey float32 in [0, 1]."""
    from skimage import data
    from skimage.color import rgb2gray

    if name not in BUNDLED:
        raise ValueError(f"unknown bundled specimen {name!r}; choose from {', '.join(BUNDLED)}")
    img = getattr(data, name)()
    if img.ndim == 3:
        img = rgb2gray(img[..., :3])
    return _unit(img)


def procedural_specimen(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """A fluorescence-like field: nuclei (blobs), filaments (smooth random curves) and point sources."""
    from scipy.ndimage import gaussian_filter
    from scipy.special import expit

    rng = np.random.default_rng(seed)
    h, w = shape
    img = np.zeros((h, w), np.float64)
    area = h * w
    # nuclei: soft-edged ellipses with internal texture
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(max(1, area // 9000)):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(6, 18, size=2)
        ang = rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u = (dy * np.cos(ang) + dx * np.sin(ang)) / ry
        v = (-dy * np.sin(ang) + dx * np.cos(ang)) / rx
        img += rng.uniform(0.3, 0.8) * expit(-8 * (np.sqrt(u * u + v * v) - 1))
    img *= 1 + 0.4 * gaussian_filter(rng.standard_normal((h, w)), 1.5)
    # filaments: random walks with momentum, drawn thin
    lines = np.zeros((h, w))
    for _ in range(max(1, area // 6000)):
        y, x = rng.uniform(0, h), rng.uniform(0, w)
        ang, val = rng.uniform(0, 2 * np.pi), rng.uniform(0.4, 1.0)
        for _ in range(int(rng.uniform(40, 200))):
            ang += rng.normal(0, 0.15)
            y, x = y + np.sin(ang), x + np.cos(ang)
            if not (0 <= y < h and 0 <= x < w):
                break
            lines[int(y), int(x)] = val
    img += gaussian_filter(lines, 0.6) * 3
    # point sources (vesicles, beads)
    pts = np.zeros((h, w))
    n = max(1, area // 800)
    pts[rng.integers(0, h, n), rng.integers(0, w, n)] = rng.uniform(0.5, 1.0, n)
    img += gaussian_filter(pts, 0.7) * 6
    return _unit(img + 0.02)


#: the training specimens of the demo and of ``train`` without sharp images: procedural plus bundled images of
#: varied structure (moon and hubble_deep_field stay out: the demo and the benchmarks test and tune on them)
TRAIN_SOURCES = ("procedural", "cell", "coins", "immunohistochemistry", "brick", "gravel", "astronaut", "camera")


def specimen_fields(n: int, field_shape: tuple[int, int], *, seed: int = 0, sources=("procedural",)) -> np.ndarray:
    """``n`` sharp fields of ``field_shape``: random crops of the given sources (bundled names or
    ``"procedural"``), cycling through them. Returns float32 (n, H, W) in [0, 1]."""
    from skimage.transform import resize

    rng = np.random.default_rng(seed)
    h, w = field_shape
    out = np.empty((n, h, w), np.float32)
    for i in range(n):
        src = sources[i % len(sources)]
        if src == "procedural":
            out[i] = procedural_specimen((h, w), seed=int(rng.integers(2**31)))
            continue
        img = bundled_specimen(src)
        if img.shape[0] < h or img.shape[1] < w:
            scale = max(h / img.shape[0], w / img.shape[1])
            img = resize(img, (int(np.ceil(img.shape[0] * scale)), int(np.ceil(img.shape[1] * scale))),
                         anti_aliasing=True)
        y0 = int(rng.integers(0, img.shape[0] - h + 1))
        x0 = int(rng.integers(0, img.shape[1] - w + 1))
        out[i] = _unit(img[y0 : y0 + h, x0 : x0 + w])
    return out
