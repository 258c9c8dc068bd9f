"""Sharp specimens that need no download: bundled scikit-image images and procedural microscopy-like fields.

Used by the demo, the napari sample data, the benchmarks and the tests. All outputs are float32 in [0, 1].
"""

from __future__ import annotations

import numpy as np

__all__ = ["BUNDLED", "SPECIMEN_HELP", "SPECIMEN_SETS", "TRAIN_SOURCES", "VALIDATION_SOURCES", "builtin_field_count",
           "builtin_fields", "bundled_specimen", "procedural_specimen", "specimen_fields", "validation_fields"]

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
    # puncta below the pixel (single molecules, small vesicles, beads) at sub-pixel places: without them the
    # sharpest thing a network trained on these fields sees is a 1.6 px spot, and it restores points no narrower
    img += _puncta((h, w), max(1, area // 1600), rng)
    return _unit(img + 0.02)


def _puncta(shape: tuple[int, int], n: int, rng: np.random.Generator, sigma: float = 0.4) -> np.ndarray:
    """``n`` point sources at uniform sub-pixel places, each a Gaussian of ``sigma`` px integrated over the pixels
    (5 x 5 stamps), fluxes 1-2.5."""
    from scipy.special import erf

    h, w = shape
    out = np.zeros((h + 4, w + 4))
    ys, xs = rng.uniform(0, h, n), rng.uniform(0, w, n)
    flux = rng.uniform(1.0, 2.5, n)
    offsets = np.arange(-2, 3)

    def weights(c):  # (n, 5) fraction of a 1-D Gaussian at c in each of the 5 pixels around it
        edges = np.floor(c)[:, None] + offsets[None, :] - c[:, None]
        return 0.5 * (erf((edges + 1) / (sigma * np.sqrt(2))) - erf(edges / (sigma * np.sqrt(2))))

    stamps = flux[:, None, None] * weights(ys)[:, :, None] * weights(xs)[:, None, :]
    rows = np.floor(ys).astype(int)[:, None, None] + offsets[None, :, None] + 2
    cols = np.floor(xs).astype(int)[:, None, None] + offsets[None, None, :] + 2
    np.add.at(out, (rows, cols), stamps)
    return out[2:-2, 2:-2]


#: the training specimens of the demo and of ``train`` without sharp images: procedural plus bundled images of
#: varied structure (moon, hubble_deep_field and retina stay out: the demo and the benchmarks test and tune on them)
TRAIN_SOURCES = ("procedural", "cell", "coins", "immunohistochemistry", "brick", "gravel", "astronaut", "camera")

#: the sets of built-in specimens ``train --specimens`` chooses from: ``mixed`` (:data:`TRAIN_SOURCES`, the default:
#: varied structure) or ``fluorescence`` (procedural fluorescence-like fields only: nuclei, filaments and puncta below
#: the pixel; richer in point sources, for punctate samples and beads)
SPECIMEN_SETS = {"mixed": TRAIN_SOURCES, "fluorescence": ("procedural",)}
#: what the sets are, for the help of the CLI flag, the Train tab and the benchmarks (one text)
SPECIMEN_HELP = ("built-in specimens that train a 2-D model: mixed (bundled images + procedural fields) or "
                 "fluorescence (procedural nuclei, filaments and sub-pixel puncta only: for punctate samples and "
                 "beads)")
_SPECIMEN_KINDS = {"mixed": "bundled + procedural", "fluorescence": "procedural nuclei, filaments, puncta"}

#: the held-out validation specimens of training from a PSF model with the built-in specimens: bundled images in
#: neither TRAIN_SOURCES nor the test and tuning images (moon, hubble_deep_field, retina), and procedural fields
#: from a seed stream of their own (:func:`validation_fields`), so the best epoch is never picked on training content
VALIDATION_SOURCES = ("procedural", "grass", "coffee", "procedural", "chelsea", "rocket")
_VALIDATION_SEED = 7_310_421  # one fixed stream: every run validates on the same fields
# procedural seeds: specimen_fields draws them below 2**31, validation_fields at or above, so no field is in both
_PROCEDURAL_SEEDS = 2**31


def specimen_fields(n: int, field_shape: tuple[int, int], *, seed: int = 0, sources=("procedural",)) -> np.ndarray:
    """``n`` sharp fields of ``field_shape``: random crops of the given sources (bundled names or
    ``"procedural"``), cycling through them. Returns float32 (n, H, W) in [0, 1]."""
    return _fields(n, field_shape, np.random.default_rng(seed), sources, procedural_base=0)


def validation_fields(field_shape: tuple[int, int], n: int = len(VALIDATION_SOURCES)) -> np.ndarray:
    """The fixed held-out validation fields of ``field_shape``: the first ``n`` of :data:`VALIDATION_SOURCES`
    (cycling), cropped and seeded from their own stream. The same for every run and training seed, and never
    among :func:`specimen_fields` of :data:`TRAIN_SOURCES` (other images, other procedural seeds).

    Parameters
    ----------
    field_shape
        (H, W) of the training fields.
    n
        How many fields (at least 1).

    Returns
    -------
    ndarray, float32, (n, H, W) in [0, 1]
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    return _fields(n, field_shape, np.random.default_rng(_VALIDATION_SEED), VALIDATION_SOURCES,
                   procedural_base=_PROCEDURAL_SEEDS)


BUILTIN_PIXELS = 1_600_000  # about this many pixels of built-in training fields (at least 4, at most 32 fields)
BUILTIN_VALIDATION_PIXELS = 400_000  # and this many of held-out validation fields (1 to 6)
MAX_BUILTIN_FIELD = 2**26  # four fields of a larger camera would not fit in memory: ask for sharp images instead


def builtin_field_count(psf, sharp_hint: str = "--sharp") -> tuple[int, int, int]:
    """(N, H, W) of the built-in training fields for the 2-D PSF model ``psf`` (:func:`builtin_fields`): its
    calibrated field, N for about :data:`BUILTIN_PIXELS` pixels in all.

    Raises ValueError (saying to give sharp images, ``sharp_hint`` naming how) for a PSF model whose field shape is
    not known (a preset) or too large."""
    shape = (psf.provenance or {}).get("field_shape") if psf is not None else None
    if not shape:
        raise ValueError(f"give sharp images ({sharp_hint}), or a PSF model measured from beads (its field shape is "
                         "known); a preset or JSON PSF model does not say how large the field is")
    h, w = int(shape[0]), int(shape[1])
    if h * w > MAX_BUILTIN_FIELD:
        raise ValueError(f"the PSF model's field is {h} x {w}; built-in specimens go up to 64 megapixels: give sharp "
                         f"images of the field ({sharp_hint})")
    return int(min(32, max(4, -(-BUILTIN_PIXELS // (h * w))))), h, w


def builtin_fields(psf, seed: int = 0, specimens: str = "mixed", validation: bool = False,
                   sharp_hint: str = "--sharp") -> tuple[np.ndarray, str]:
    """Sharp training fields when the user gives none: the built-in specimens of ``specimens`` (a key of
    :data:`SPECIMEN_SETS`) at the field shape the PSF model was calibrated on (:func:`builtin_field_count`), drawn
    from the stream ``seed``; ``validation``: the held-out :func:`validation_fields` (about
    :data:`BUILTIN_VALIDATION_PIXELS`, whatever ``specimens`` and ``seed``), never trained on.

    Returns the (N, H, W) float32 fields and a line that says what they are; raises ValueError as
    :func:`builtin_field_count` does, or for an unknown ``specimens``."""
    if specimens not in SPECIMEN_SETS:
        raise ValueError(f"unknown built-in specimens {specimens!r}: choose {' or '.join(SPECIMEN_SETS)}")
    n, h, w = builtin_field_count(psf, sharp_hint)
    if validation:
        n = int(min(len(VALIDATION_SOURCES), max(1, -(-BUILTIN_VALIDATION_PIXELS // (h * w)))))
        return (validation_fields((h, w), n),
                f"{n} held-out specimen fields ({', '.join(VALIDATION_SOURCES[:n])})")
    return (specimen_fields(n, (h, w), seed=seed, sources=SPECIMEN_SETS[specimens]),
            f"{n} built-in specimen fields of {h} x {w} ({specimens}: {_SPECIMEN_KINDS[specimens]})")


def _fields(n: int, field_shape: tuple[int, int], rng: np.random.Generator, sources, *,
            procedural_base: int) -> np.ndarray:
    from skimage.transform import resize

    h, w = field_shape
    out = np.empty((n, h, w), np.float32)
    for i in range(n):
        src = sources[i % len(sources)]
        if src == "procedural":
            out[i] = procedural_specimen((h, w), seed=procedural_base + int(rng.integers(_PROCEDURAL_SEEDS)))
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
