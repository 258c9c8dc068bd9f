"""Sharp 3-D specimens that need no download: procedural fluorescence-like volumes (nuclei, filaments, puncta).

What a z-stack of a fluorescent sample holds, drawn in physical units so the same specimen looks right at any
voxel size: nuclei are textured ellipsoids a few micrometres across, filaments are smooth 3-D curves (microtubules,
neurites) thinner than the resolution, puncta are sub-resolution points (vesicles, beads). Voxels are anisotropic
when the z-step is coarser than the pixel: sizes along z are divided by the ``anisotropy`` (z-step / pixel).

Used by 3-D training without sharp volumes (``train --psf scope3d.cgpsf``, the dock's *built-in specimens + measured
PSF model*: :func:`builtin_volumes`), the 3-D benchmarks and the tests.
Outputs are float32 (D, H, W) in [0, 1]; the same arguments give the same volume.
"""

from __future__ import annotations

import numpy as np

__all__ = ["VOLUME_KINDS", "builtin_volume_shape", "builtin_volumes", "specimen_volume", "specimen_volumes"]

#: the procedural contents: one of each, or all three mixed
VOLUME_KINDS = ("mixed", "nuclei", "filaments", "puncta")

# sizes in lateral pixels (the specimens' scale at the pixel size of the pupil presets, ~0.1-0.16 µm)
_NUCLEUS_RADIUS = (10.0, 26.0)
_FILAMENT_SIGMA = 0.6
_PUNCTUM_SIGMA = 0.7


def _check_shape(shape) -> tuple[int, int, int]:
    dims = tuple(int(n) for n in shape)
    if len(dims) != 3 or min(dims) < 1:
        raise ValueError(f"a specimen volume's shape is (depth, height, width) with positive sides, got {shape!r}")
    return dims  # type: ignore[return-value]


def _blur(vol: np.ndarray, sigma: float, anisotropy: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(vol, (sigma / anisotropy, sigma, sigma))


def _nuclei(shape, rng: np.random.Generator, anisotropy: float, density: float) -> np.ndarray:
    """Soft-edged, randomly oriented ellipsoids with a speckled interior, drawn box by box."""
    from scipy.special import expit

    d, h, w = shape
    out = np.zeros(shape, np.float32)
    volume_um = d * anisotropy * h * w
    for _ in range(max(1, int(density * volume_um / 120_000))):
        centre = rng.uniform((0, 0, 0), (d, h, w))
        radii = rng.uniform(*_NUCLEUS_RADIUS, size=3) * np.array([0.6, 1.0, 1.0])  # flatter along z
        axes = np.linalg.qr(rng.standard_normal((3, 3)))[0]  # a random rotation (physical units)
        reach = radii.max() * 1.2
        lo = np.maximum(np.floor(centre - reach / np.array([anisotropy, 1, 1])), 0).astype(int)
        hi = np.minimum(np.ceil(centre + reach / np.array([anisotropy, 1, 1])) + 1, shape).astype(int)
        if np.any(hi <= lo):
            continue
        zz, yy, xx = np.meshgrid(*(np.arange(a, b) - c for a, b, c in zip(lo, hi, centre)), indexing="ij")
        phys = np.stack([zz * anisotropy, yy, xx], axis=-1) @ axes  # coordinates along the ellipsoid's axes
        r = np.sqrt(((phys / radii) ** 2).sum(-1))
        box = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
        out[box] += (rng.uniform(0.25, 0.6) * expit(-10.0 * (r - 1.0))).astype(np.float32)
    texture = 1.0 + 0.45 * _blur(rng.standard_normal(shape).astype(np.float32), 1.5, anisotropy)
    return out * texture


def _filaments(shape, rng: np.random.Generator, anisotropy: float, density: float) -> np.ndarray:
    """Random walks with momentum through the volume (steps of one lateral pixel), drawn thin."""
    d, h, w = shape
    lines = np.zeros(shape, np.float32)
    n = max(1, int(density * d * anisotropy * h * w / 60_000))
    for _ in range(n):
        pos = rng.uniform((0, 0, 0), (d * anisotropy, h, w))
        direction = rng.standard_normal(3)
        direction[0] *= 0.4  # filaments run mostly across the field
        direction /= np.linalg.norm(direction)
        value = rng.uniform(0.4, 1.0)
        for _ in range(int(rng.uniform(60, 260))):
            direction += rng.normal(0.0, 0.12, 3)
            direction /= np.linalg.norm(direction)
            pos = pos + direction
            z, y, x = int(pos[0] / anisotropy), int(pos[1]), int(pos[2])
            if not (0 <= z < d and 0 <= y < h and 0 <= x < w):
                break
            lines[z, y, x] = value
    return _blur(lines, _FILAMENT_SIGMA, anisotropy) * 3.0


def _puncta(shape, rng: np.random.Generator, anisotropy: float, density: float) -> np.ndarray:
    d, h, w = shape
    pts = np.zeros(shape, np.float32)
    n = max(1, int(density * d * anisotropy * h * w / 6000))
    idx = tuple(rng.integers(0, s, n) for s in shape)
    pts[idx] = rng.uniform(0.5, 1.0, n)
    return _blur(pts, _PUNCTUM_SIGMA, anisotropy) * 6.0


def specimen_volume(shape, kind: str = "mixed", *, seed: int = 0, anisotropy: float = 1.0,
                    density: float = 1.0) -> np.ndarray:
    """A procedural fluorescence-like volume.

    Parameters
    ----------
    shape
        (D, H, W) in voxels.
    kind
        ``"nuclei"``, ``"filaments"``, ``"puncta"`` or ``"mixed"`` (all three, as a cell culture looks).
    seed
        The same seed gives the same volume.
    anisotropy
        z-step / lateral pixel size (>= 1 for microscope stacks): objects keep their physical shape.
    density
        Multiplies the number of objects (1: a moderately dense sample).

    Returns
    -------
    ndarray, float32, (D, H, W), in [0, 1], with a small background above zero
    """
    shape = _check_shape(shape)
    if kind not in VOLUME_KINDS:
        raise ValueError(f"unknown specimen volume kind {kind!r}; choose from {', '.join(VOLUME_KINDS)}")
    if not (np.isfinite(anisotropy) and anisotropy > 0) or not (np.isfinite(density) and density > 0):
        raise ValueError(f"anisotropy and density must be positive, got {anisotropy!r} and {density!r}")
    rng = np.random.default_rng(seed)
    parts = {"nuclei": _nuclei, "filaments": _filaments, "puncta": _puncta}
    chosen = list(parts) if kind == "mixed" else [kind]
    vol = np.full(shape, 0.02, np.float32)
    for name in chosen:
        # one stream per part, so a mixed volume holds the same nuclei as the nuclei-only one of its seed
        part_rng = np.random.default_rng([seed, list(parts).index(name)])
        vol += parts[name](shape, part_rng, float(anisotropy), float(density))
    del rng
    lo, hi = float(vol.min()), float(vol.max())
    return ((vol - lo) / (hi - lo)).astype(np.float32) if hi > lo else np.zeros(shape, np.float32)


def specimen_volumes(n: int, shape, *, seed: int = 0, kinds=("mixed",), anisotropy: float = 1.0) -> np.ndarray:
    """``n`` procedural volumes (N, D, H, W), cycling through ``kinds``, each of its own seed of the stream
    ``seed``."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    seeds = np.random.default_rng(seed).integers(0, 2**31, size=n)
    return np.stack([specimen_volume(shape, kinds[i % len(kinds)], seed=int(s), anisotropy=anisotropy)
                     for i, s in enumerate(seeds)])


#: built-in 3-D training specimens: this many voxels in all (at least 3 volumes), at most this many per volume
BUILTIN_VOXELS, MAX_BUILTIN_VOLUME = 24_000_000, 2**27


def builtin_volume_shape(psf, sharp_hint: str = "--sharp") -> tuple[int, int, int, int]:
    """(N, D, H, W) of the built-in training volumes for ``psf`` (:func:`builtin_volumes`): its calibrated field,
    32 planes (more for a deep PSF), N for about :data:`BUILTIN_VOXELS` voxels in all (3 to 8 volumes).

    Raises ValueError (saying to give sharp volumes, ``sharp_hint`` naming how) for a PSF model whose field shape
    is not known (a preset) or too large."""
    shape = (psf.provenance or {}).get("field_shape") if psf is not None else None
    if not shape:
        raise ValueError(f"give sharp volumes ({sharp_hint}), or a 3-D PSF model measured from beads (its field shape "
                         "is known); a preset or JSON PSF model does not say how large the field is")
    depth = int(min(64, max(32, 2 * psf.psf_depth)))
    h, w = int(shape[0]), int(shape[1])
    if depth * h * w > MAX_BUILTIN_VOLUME:
        raise ValueError(f"the PSF model's field is {h} x {w}; built-in volumes go up to "
                         f"{MAX_BUILTIN_VOLUME // depth} pixels per plane: give sharp volumes of the field "
                         f"({sharp_hint})")
    return int(min(8, max(3, -(-BUILTIN_VOXELS // (depth * h * w))))), depth, h, w


def builtin_volumes(psf, seed: int, validation: bool = False, sharp_hint: str = "--sharp") -> tuple[np.ndarray, str]:
    """Sharp training volumes when the user gives none: procedural nuclei, filaments and puncta of
    :func:`builtin_volume_shape`, in the PSF's voxel units; ``validation``: one more volume of each kind from a
    fixed stream, never trained on.

    Returns the (N, D, H, W) volumes and a line that says what they are; raises ValueError as
    :func:`builtin_volume_shape` does.
    """
    n, depth, h, w = builtin_volume_shape(psf, sharp_hint)
    anisotropy = psf.z_step_um / psf.pixel_size_um if psf.pixel_size_um else 1.0
    kinds = VOLUME_KINDS[1:]
    if validation:
        return (specimen_volumes(len(kinds), (depth, h, w), seed=7_310_421, kinds=kinds, anisotropy=anisotropy),
                f"{len(kinds)} held-out procedural volumes ({', '.join(kinds)})")
    return (specimen_volumes(n, (depth, h, w), seed=seed, kinds=VOLUME_KINDS, anisotropy=anisotropy),
            f"{n} built-in procedural volumes of {depth} x {h} x {w} (nuclei, filaments, puncta, mixed)")
