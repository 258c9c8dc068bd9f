"""The pupil/Zernike field-dependent PSF model: :class:`PSFConfig`, one implementation of
:class:`~napari_coordgate.optics.psfmodel.PSFModel` (kind ``"pupil"``), its presets and its functions.

Two models describe how a microscope blurs each point of its field of view:

``"pupil"``
    A scalar Fourier-optics model. The pupil of a circular aperture (cut-off ``NA / wavelength``) carries
    a wavefront error built from Zernike polynomials (Noll normalisation, so each coefficient is the RMS
    wavefront error of its term, in waves): the primary aberrations (defocus, astigmatism, coma, spherical)
    whose field laws a config sets; :class:`Pupil` also renders trefoil and secondary astigmatism
    (``ZERNIKE_TERMS``), which the fitted :class:`~napari_coordgate.optics.pupil_poly.PupilPolyPSF` may use. The
    coherent field is the pupil's Fourier transform, the PSF
    its squared modulus, computed on a grid ``oversample`` times finer than the camera and binned to
    camera pixels so small PSFs are not aliased, then normalised to unit sum.
``"gaussian"``
    A cheap anisotropic Gaussian whose width grows with field height, the long axis along the radius.

Field dependence follows the aberration theory of rotationally symmetric objectives: defocus (field
curvature) and astigmatism grow with the square of the field height ``h``, coma linearly with ``h``,
and astigmatism and coma are oriented along the radial direction (the line from the optical axis to the
field point). Constant terms model a misaligned or imperfect objective. The optical axis may be off the
frame centre.

Coordinates
-----------
Field positions are per-axis normalised coordinates shared with the network: pixel centre ``p`` of an axis
with ``N`` pixels sits at ``(2 p - (N - 1)) / (N - 1)``, in [-1, 1]. The field height ``h`` is a physical
distance (in pixels, so non-square frames stay round) from the optical axis, divided by the distance from
the frame centre to a corner: ``h = 1`` at the corners when the axis is centred. The field angle ``phi``
is measured in image axes (x to the right, y down).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import numpy as np

from napari_coordgate.config import Config, ConfigError, bounded, choice
from napari_coordgate.optics.psfmodel import GRID_BOUNDS, PSF_SIZE_BOUNDS, PSFModel, register_psf_model

__all__ = [
    "PSFConfig",
    "PRESETS",
    "UndersamplingWarning",
    "field_polar",
    "nyquist_pixel_size_um",
    "ZERNIKE_TERMS",
    "ZERNIKE_ORDERS",
    "PRIMARY_TERMS",
    "zernike_coefficients",
    "pair_bound",
    "pupil_samples",
    "Pupil",
]

PSF_MODELS = ("pupil", "gaussian")

# The Zernike terms of the pupil model: (name, n, m) in Noll's normalisation, m < 0 the sine (45°, 30°, y) term of
# a pair. Their order is the order of every coefficient vector; the first six are the primary aberrations, which
# PSFConfig's field laws set and which the coefficient arrays of files written before the others existed hold.
_ZERNIKE = (("defocus", 2, 0), ("astig_0", 2, 2), ("astig_45", 2, -2), ("coma_x", 3, 1), ("coma_y", 3, -1),
            ("spherical", 4, 0), ("trefoil_0", 3, 3), ("trefoil_30", 3, -3), ("astig2_0", 4, 2), ("astig2_45", 4, -2))
ZERNIKE_TERMS = tuple(name for name, _, _ in _ZERNIKE)
ZERNIKE_ORDERS = tuple((n, m) for _, n, m in _ZERNIKE)  # (radial order n, azimuthal frequency m) of each term
PRIMARY_TERMS = ZERNIKE_TERMS[:6]  # PSFConfig's terms (zernike_coefficients); older files' coefficient rows
# Largest slope of each Noll-normalised term over the unit pupil, in waves per unit pupil radius: at the rim, the
# radial slope (n (n + 2) - m²) / 2 times the normalisation. It sets how finely the pupil must be sampled so the
# phase does not wrap between neighbouring samples.
_MAX_SLOPE = np.array([math.sqrt((n + 1) * (1 if m == 0 else 2)) * ((n * (n + 2) - m * m) // 2)
                       for n, m in ZERNIKE_ORDERS])
_MIN_PUPIL_SAMPLES = 32
_CHUNK = 256  # PSFs computed together; bounds memory for brute-force use (thousands of PSFs)


class UndersamplingWarning(UserWarning):
    """The camera pixel is larger than the Nyquist limit of the PSF."""


def _waves(default: float = 0.0, doc: str = ""):
    return bounded(default, -3.0, 3.0, kind=float, doc=doc)


@register_psf_model
@dataclass(frozen=True)
class PSFConfig(Config, PSFModel):
    """How the microscope blurs each point of the field of view: the pupil/Zernike (or Gaussian) PSF model.

    A validated config (fields, presets, JSON) and a :class:`~napari_coordgate.optics.psfmodel.PSFModel` of
    kind ``"pupil"``: its PSFs are computed from the fields, so its record holds no arrays.

    Aberration coefficients are RMS wavefront errors in waves (Noll-normalised Zernike terms). The
    coefficient of a term at field height ``h`` and field angle ``phi`` is

    - defocus: ``defocus + defocus_h2 * h**2``
    - astigmatism: ``astig_0`` (cos 2θ) and ``astig_45`` (sin 2θ) plus ``astig_h2 * h**2`` along the radius,
      i.e. ``cos 2(θ - phi)``
    - coma: ``coma_x`` (cos θ) and ``coma_y`` (sin θ) plus ``coma_h * h`` along the radius, ``cos(θ - phi)``
    - spherical: ``spherical``

    The Gaussian model has standard deviation ``sigma_px * (1 + sigma_radial_h2 * h**2)`` along the
    radius and ``sigma_px * (1 + sigma_tangential_h2 * h**2)`` across it.
    """

    KIND: ClassVar[str] = "psf"  # the config kind in its dict / JSON (kept: files written before the interface)
    kind: ClassVar[str] = "pupil"  # the PSF-model kind in records

    name: str = field(default="custom", metadata={"kind": str, "doc": "label (the preset name, or custom)"})
    model: str = choice("pupil", PSF_MODELS, doc="pupil (Zernike wavefront) or gaussian")
    na: float = bounded(0.8, 0.01, 1.7, doc="numerical aperture of the objective")
    wavelength_um: float = bounded(0.52, 0.1, 10.0, doc="emission wavelength in vacuum, micrometres")
    pixel_size_um: float = bounded(0.16, 0.001, 100.0, doc="camera pixel size in the specimen plane, µm")
    refractive_index: float = bounded(1.0, 1.0, 3.0, doc="index of the immersion medium")
    psf_size: int = bounded(21, *PSF_SIZE_BOUNDS, doc="PSF side in camera pixels (odd)")
    oversample: int = bounded(3, 1, 15, doc="sub-samples per pixel and axis (odd); raised if undersampled")
    grid: int = bounded(7, *GRID_BOUNDS, doc="K: PSFs on a K x K grid across the field for the fast blur")
    axis_y: float = bounded(0.0, -1.0, 1.0, doc="optical axis row, normalised field coordinate")
    axis_x: float = bounded(0.0, -1.0, 1.0, doc="optical axis column, normalised field coordinate")
    defocus: float = _waves(doc="constant defocus, waves RMS")
    astig_0: float = _waves(doc="constant astigmatism, cos 2θ, waves RMS")
    astig_45: float = _waves(doc="constant astigmatism, sin 2θ, waves RMS")
    coma_x: float = _waves(doc="constant coma, cos θ, waves RMS")
    coma_y: float = _waves(doc="constant coma, sin θ, waves RMS")
    spherical: float = _waves(doc="constant primary spherical aberration, waves RMS")
    defocus_h2: float = _waves(doc="field curvature: defocus at h = 1, grows as h²")
    astig_h2: float = _waves(doc="radial astigmatism at h = 1, grows as h²")
    coma_h: float = _waves(doc="radial coma at h = 1, grows as h")
    sigma_px: float = bounded(1.0, 0.1, 50.0, doc="gaussian model: standard deviation at the axis, pixels")
    sigma_radial_h2: float = bounded(0.0, 0.0, 20.0, doc="gaussian model: relative growth along the radius at h = 1")
    sigma_tangential_h2: float = bounded(0.0, 0.0, 20.0, doc="gaussian model: relative growth across the radius")

    def _validate(self) -> None:
        if self.na >= self.refractive_index:
            raise ConfigError(
                f"PSFConfig.na ({self.na}) must be smaller than PSFConfig.refractive_index "
                f"({self.refractive_index}): the numerical aperture cannot reach the index of the medium"
            )
        for name in ("psf_size", "oversample"):
            if getattr(self, name) % 2 == 0:
                raise ConfigError(
                    f"PSFConfig.{name} must be odd so the PSF is centred on a pixel, got {getattr(self, name)}"
                )

    @property
    def is_uniform(self) -> bool:
        """True when the PSF is the same everywhere in the field (no field-dependent terms)."""
        if self.model == "gaussian":
            return self.sigma_radial_h2 == 0 and self.sigma_tangential_h2 == 0
        return self.defocus_h2 == 0 and self.astig_h2 == 0 and self.coma_h == 0

    # -- the PSFModel interface ------------------------------------------------------------------------
    def psfs_at(self, y, x, field_shape: Sequence[int] | None = None) -> np.ndarray:
        """PSFs at normalised field positions (see :meth:`PSFModel.psfs_at`).

        Warns
        -----
        UndersamplingWarning
            When the camera pixel is coarser than the Nyquist limit of the PSF.
        """
        _warn_if_undersampled(self)
        y, x = np.broadcast_arrays(np.asarray(y, dtype=np.float64), np.asarray(x, dtype=np.float64))
        h, phi = field_polar(self, y, x, field_shape)
        return _psfs_polar(self, h, phi)

    def binned(self, binning: int) -> "PSFConfig":
        """The PSF model as a camera binning ``binning`` x ``binning`` pixels sees it: pixels ``binning`` times larger.

        The pupil model gets ``pixel_size_um * binning`` (its PSFs are integrated over the larger pixels); the
        Gaussian model ``sigma_px / binning``. ``psf_size`` shrinks to cover the same area (odd, at least 3).
        ``binning`` 1 returns ``self``.
        """
        from .psfmodel import binned_psf_size

        size = binned_psf_size(self.psf_size, binning)
        if binning == 1:
            return self
        if self.model == "gaussian":
            return self.replace(sigma_px=self.sigma_px / binning, psf_size=size)
        return self.replace(pixel_size_um=self.pixel_size_um * binning, psf_size=size)

    def to_record(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(this config's dict with ``"kind": "pupil"``, no arrays)."""
        return {**self.to_dict(), "kind": self.kind}, {}

    @classmethod
    def from_record(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> "PSFConfig":
        """The config of a record (or of a plain ``PSFConfig`` dict); :class:`ConfigError` names a bad field."""
        if arrays:
            raise ConfigError(f"a pupil PSF model has no arrays; the record holds {', '.join(sorted(arrays))}")
        data = dict(meta)
        data.pop("kind", None)
        return cls.from_dict(data)

    def describe(self) -> str:
        """One line: the model family, name and the parameters that set the PSF's size."""
        if self.model == "gaussian":
            optics = f"sigma {self.sigma_px:g} px on axis"
        else:
            optics = f"NA {self.na:g}, {self.wavelength_um * 1000:g} nm, {self.pixel_size_um:g} µm pixels"
        variation = "uniform" if self.is_uniform else "field-dependent"
        return (f"{self.model} PSF model {self.name!r} ({optics}; {variation}; {self.psf_size} px PSFs, "
                f"{self.grid} x {self.grid} grid)")


PRESETS: dict[str, PSFConfig] = {
    "diffraction_limited": PSFConfig(name="diffraction_limited"),
    "edge_defocus_astigmatism": PSFConfig(
        name="edge_defocus_astigmatism", psf_size=25, defocus_h2=0.3, astig_h2=0.25, coma_h=0.1,
    ),
    "strong_astigmatism": PSFConfig(
        name="strong_astigmatism", psf_size=31, astig_0=0.15, defocus_h2=0.15, astig_h2=0.45, coma_h=0.1,
    ),
    "gaussian": PSFConfig(
        name="gaussian", model="gaussian", psf_size=21, sigma_px=1.0, sigma_radial_h2=2.0, sigma_tangential_h2=0.5,
    ),
}
"""Named PSF models a user can pick instead of writing a config."""


def nyquist_pixel_size_um(cfg: PSFConfig) -> float:
    """Largest pixel (in the specimen plane, µm) that samples the pupil-model PSF without aliasing.

    The incoherent optical transfer function extends to ``2 NA / wavelength``, so the Nyquist pixel is
    ``wavelength / (4 NA)``.

    Parameters
    ----------
    cfg
        The PSF model (its ``na`` and ``wavelength_um``).

    Returns
    -------
    float
        Pixel size in µm; :class:`UndersamplingWarning` is issued for larger ``pixel_size_um``.
    """
    return cfg.wavelength_um / (4.0 * cfg.na)


def _warn_if_undersampled(cfg: PSFConfig, stacklevel: int = 3) -> None:
    if cfg.model == "pupil":
        limit = nyquist_pixel_size_um(cfg)
        if cfg.pixel_size_um > limit * (1 + 1e-9):
            warnings.warn(
                f"PSFConfig.pixel_size_um = {cfg.pixel_size_um:g} µm undersamples the PSF (Nyquist pixel for "
                f"NA {cfg.na:g} at {cfg.wavelength_um:g} µm is {limit:.4g} µm); the PSF is still computed "
                "on a finer grid and binned, but detail finer than a pixel is lost by the camera",
                UndersamplingWarning,
                stacklevel=stacklevel,
            )
    elif cfg.sigma_px < 0.5:
        warnings.warn(
            f"PSFConfig.sigma_px = {cfg.sigma_px:g} px: a Gaussian narrower than half a pixel is undersampled",
            UndersamplingWarning,
            stacklevel=stacklevel,
        )


def _effective_oversample(cfg: PSFConfig) -> int:
    """The configured oversampling, raised (staying odd) until the fine grid samples the PSF at Nyquist."""
    os_ = cfg.oversample
    if cfg.model == "pupil":
        limit = nyquist_pixel_size_um(cfg)
        while cfg.pixel_size_um / os_ > limit and os_ < 31:
            os_ += 2
    return os_


def _field_shape(field_shape: Sequence[int] | None) -> tuple[int, int]:
    if field_shape is None:
        return (2, 2)  # any square frame: normalised coordinates map to the same h
    shape = tuple(int(n) for n in field_shape)
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"field_shape must be (H, W) with positive sides, got {tuple(field_shape)}")
    return shape  # type: ignore[return-value]


def field_polar(
    cfg: PSFConfig, y: "float | np.ndarray", x: "float | np.ndarray", field_shape: Sequence[int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Field height and field angle of normalised field positions.

    Parameters
    ----------
    cfg
        Supplies the optical axis (``axis_y``, ``axis_x``).
    y, x
        Normalised field coordinates in [-1, 1] (scalars or arrays of one shape).
    field_shape
        (H, W) of the frame; sets the pixel aspect so that ``h`` is a physical distance. ``None`` means a
        square frame.

    Returns
    -------
    h, phi : ndarray
        Field height (1 at the frame corners for a centred axis) and field angle in radians,
        ``atan2(dy, dx)`` in image axes.
    """
    h_px, w_px = _field_shape(field_shape)
    half_h, half_w = (h_px - 1) / 2.0, (w_px - 1) / 2.0
    half_diag = math.hypot(half_h, half_w)
    dy = (np.asarray(y, dtype=np.float64) - cfg.axis_y) * half_h
    dx = (np.asarray(x, dtype=np.float64) - cfg.axis_x) * half_w
    if half_diag == 0:
        return np.zeros(np.broadcast(dy, dx).shape), np.zeros(np.broadcast(dy, dx).shape)
    return np.hypot(dy, dx) / half_diag, np.arctan2(dy, dx)


def _max_field_height(cfg: PSFConfig) -> float:
    # distance from the axis to the farthest corner, in half-diagonals, for any frame shape
    return 1.0 + max(abs(cfg.axis_y), abs(cfg.axis_x))


def zernike_coefficients(cfg: PSFConfig, h: np.ndarray, phi: np.ndarray) -> np.ndarray:
    """(..., 6) Zernike coefficients (waves RMS, of the ``PRIMARY_TERMS``, the first six of ``ZERNIKE_TERMS``) of
    ``cfg``'s field laws at field heights ``h`` and angles ``phi`` (:func:`field_polar`); a config has no others."""
    h2 = h * h
    astig = cfg.astig_h2 * h2
    coma = cfg.coma_h * h
    return np.stack(
        [
            cfg.defocus + cfg.defocus_h2 * h2,
            cfg.astig_0 + astig * np.cos(2 * phi),
            cfg.astig_45 + astig * np.sin(2 * phi),
            cfg.coma_x + coma * np.cos(phi),
            cfg.coma_y + coma * np.sin(phi),
            np.full_like(h, cfg.spherical),
        ],
        axis=-1,
    )


def pair_bound(bound: np.ndarray) -> np.ndarray:
    """What each term may reach at any orientation: ``bound`` (T, the largest |coefficient| of each of the first T
    terms of ``ZERNIKE_TERMS``, waves RMS) with the two terms of each pair (e.g. astigmatism 0° and 45°) given
    their sum, a bound of ``a cos mθ + b sin mθ`` turned to either axis. The ``worst`` of :func:`pupil_samples`."""
    bound = np.abs(np.asarray(bound, dtype=np.float64))
    orders = ZERNIKE_ORDERS[: bound.shape[0]]
    out = bound.copy()
    for t, (n, m) in enumerate(orders):
        if m != 0:
            out[t] = sum(bound[u] for u, (n2, m2) in enumerate(orders) if n2 == n and abs(m2) == abs(m))
    return out


def pupil_samples(cfg: PSFConfig, worst: np.ndarray | None = None, margin: float = 4.0) -> int:
    """Pupil samples across the diameter (even) for the PSFs of ``cfg``.

    Enough that the phase of Zernike coefficients up to ``worst`` (T <= ``len(ZERNIKE_TERMS)``, waves RMS, for the
    first T terms; default: the largest ``cfg`` reaches in its field, :func:`pair_bound`) moves less than
    ``1 / margin`` wave between neighbouring samples (a quarter wave by default: no wrap-around), at least
    ``_MIN_PUPIL_SAMPLES``, and enough that the periodic copies of the field (period ``m * wavelength / (2 NA)``)
    stay at least one PSF crop away from the crop.
    """
    if worst is None:
        h = _max_field_height(cfg)
        worst = np.abs(zernike_coefficients(cfg, np.array([h]), np.array([0.0]))[0])
        worst[1:3] = abs(cfg.astig_0) + abs(cfg.astig_45) + abs(cfg.astig_h2) * h * h
        worst[3:5] = abs(cfg.coma_x) + abs(cfg.coma_y) + abs(cfg.coma_h) * h
    worst = np.asarray(worst, dtype=np.float64)
    if worst.ndim != 1 or worst.shape[0] > len(ZERNIKE_TERMS):
        raise ValueError(f"worst must hold at most {len(ZERNIKE_TERMS)} coefficients, got shape {worst.shape}")
    radius = max(_MIN_PUPIL_SAMPLES / 2, margin * float(worst @ _MAX_SLOPE[: worst.shape[0]]))
    radius = max(radius, 2.0 * cfg.psf_size * cfg.pixel_size_um * cfg.na / cfg.wavelength_um)
    return 2 * int(math.ceil(radius))


class Pupil:
    """The sampled pupil of one pupil ``PSFConfig``, and the PSFs of Zernike wavefronts across it.

    The one pupil-PSF computation of the package: :class:`PSFConfig` and
    :class:`~napari_coordgate.optics.pupil_poly.PupilPolyPSF` render their PSFs with it (:meth:`psfs_numpy`), the
    calibration's pupil fit differentiates it (:meth:`psfs`, torch autograd, any device), and synthetic bead
    slides move their beads with its shifts. ``samples`` x ``samples`` points span the aperture's bounding square;
    the aperture edge is soft, the amplitude aplanatic; the phase is ``2 pi`` times the Noll Zernike terms
    (``ZERNIKE_TERMS``) weighted by their coefficients, minus a linear ramp for a sub-pixel shift of the PSF; a
    matrix Fourier transform gives the field on the oversampled PSF crop; ``|field|²`` is binned to camera pixels
    and normalised to unit sum.

    Parameters
    ----------
    cfg
        The optics (``na``, ``wavelength_um``, ``refractive_index``, ``pixel_size_um``, ``psf_size``,
        ``oversample``, raised to Nyquist); its aberrations set the default ``samples`` only.
    samples
        Pupil samples across the diameter (even); default :func:`pupil_samples` of ``cfg``.
    device, dtype
        Torch device, and ``torch.float64`` (default) or ``torch.float32`` (complex128 / complex64 inside).
    """

    def __init__(self, cfg: PSFConfig, samples: int | None = None, *, device="cpu", dtype=None):
        import torch  # deferred: reading configs and presets must not need torch

        self.cfg = cfg
        self.size = cfg.psf_size
        self.os = _effective_oversample(cfg)
        self.m = m = pupil_samples(cfg) if samples is None else int(samples)
        self.device = torch.device(device)
        self.dtype = torch.float64 if dtype is None else dtype
        cutoff = cfg.na / cfg.wavelength_um
        f = (np.arange(m) - (m - 1) / 2.0) * (2.0 * cutoff / m)
        fy, fx = np.meshgrid(f, f, indexing="ij")
        rho = np.hypot(fy, fx) / cutoff
        theta = np.arctan2(fy, fx)
        # the fraction of each pupil sample inside the aperture (approximately): a soft edge makes the
        # PSF converge quickly with the number of pupil samples instead of depending on a jagged circle
        coverage = np.clip((1.0 - rho) * (m / 2.0) + 0.5, 0.0, 1.0)
        inside = coverage > 0
        # aplanatic detection objective: light per pupil area grows as 1 / cos(angle in the medium)
        sin_t = np.clip(cfg.na * np.minimum(rho, 1.0) / cfg.refractive_index, 0.0, 0.999999)
        amplitude = coverage * (1.0 - sin_t**2) ** -0.25
        basis = _zernike_basis(rho, theta)
        fine = self.size * self.os
        u = (np.arange(fine) - (fine - 1) / 2.0) * (cfg.pixel_size_um / self.os)
        real = {"device": self.device, "dtype": self.dtype}
        cplx = {"device": self.device, "dtype": torch.complex128 if self.dtype == torch.float64 else torch.complex64}
        self.basis = torch.as_tensor(np.stack([np.where(inside, b, 0.0).ravel() for b in basis]), **real)  # (T, M²)
        self.amplitude = torch.as_tensor(amplitude.ravel(), **real)
        # phase per pixel of shift: a shift (dy, dx) adds -2 pi (dy fy + dx fx) * pixel
        self.fy = torch.as_tensor(fy.ravel() * cfg.pixel_size_um, **real)
        self.fx = torch.as_tensor(fx.ravel() * cfg.pixel_size_um, **real)
        # matrix Fourier transform: evaluates the field only where the crop needs it, with no wrap-around
        self.fourier_t = torch.as_tensor(np.exp(2j * np.pi * np.outer(f, u)), **cplx)  # (M, S)

    def phase(self, coeffs, shifts=None):
        """(N, M²) pupil phase in radians for (N, T) Zernike coefficients of the first T terms of ``ZERNIKE_TERMS``
        (6: the primary ones, up to all) and optional (N, 2) shifts (px)."""
        if not 1 <= coeffs.shape[1] <= self.basis.shape[0]:
            raise ValueError(f"expected (N, T) Zernike coefficients with 1 <= T <= {self.basis.shape[0]} "
                             f"({', '.join(ZERNIKE_TERMS)}), got shape {tuple(coeffs.shape)}")
        # term by term in a fixed order, not a matrix product (whose rounding depends on the batch): a PSF
        # comes out the same whatever else is computed with it (and the same with or without zero terms after it)
        phase = coeffs[:, :1] * self.basis[0]
        for j in range(1, coeffs.shape[1]):
            phase = phase + coeffs[:, j : j + 1] * self.basis[j]
        phase = (2 * math.pi) * phase
        if shifts is not None:
            phase = phase - (2 * math.pi) * (shifts[:, :1] * self.fy + shifts[:, 1:] * self.fx)
        return phase

    def fields(self, pupils):
        """(N, S, S) complex fields on the oversampled crop (rows y, columns x) of (N, M²) complex pupils."""
        # field = F P F^T, as two products over the whole batch: X = P F^T, then field^T = X^T F^T
        n, m, s = pupils.shape[0], self.m, self.fourier_t.shape[1]
        x = pupils.reshape(n * m, m) @ self.fourier_t
        field_t = x.reshape(n, m, s).transpose(1, 2).reshape(n * s, m) @ self.fourier_t
        return field_t.reshape(n, s, s).transpose(1, 2)

    def psfs(self, coeffs, shifts=None):
        """(N, s, s) PSFs (torch, unit sum) for (N, T) Zernike coefficients (waves RMS, the first T terms of
        ``ZERNIKE_TERMS``) and optional (N, 2) shifts (dy, dx) in pixels; a shift moves the PSF towards larger
        coordinates (the point's image at ``centre + shift``)."""
        import torch

        coeffs = coeffs.to(device=self.device, dtype=self.dtype)
        if shifts is not None:
            shifts = shifts.to(device=self.device, dtype=self.dtype)
        pupil = torch.polar(self.amplitude.expand(coeffs.shape[0], -1), self.phase(coeffs, shifts))
        field = self.fields(pupil)
        return self.camera(field.real**2 + field.imag**2)

    def camera(self, fine):
        """(N, s, s) camera PSFs, unit sum, of (N, S, S) intensities on the oversampled crop: binned."""
        return _bin(fine, self.size, self.os)

    def psfs_numpy(self, coeffs: np.ndarray, shifts: np.ndarray | None = None) -> np.ndarray:
        """:meth:`psfs` of (N, T) numpy coefficients (one (T,) vector: N = 1; and (N, 2) shifts), without
        autograd, in chunks of ``_CHUNK`` PSFs; float64 (N, s, s)."""
        # torch, not NumPy: the caller controls its threads (torch.set_num_threads), while NumPy's BLAS picks
        # its own and its spinning threads can be many times slower on a busy machine
        import torch

        coeffs = np.atleast_2d(np.asarray(coeffs, dtype=np.float64))
        coeffs = coeffs.reshape(-1, coeffs.shape[-1])
        out = np.empty((coeffs.shape[0], self.size, self.size))
        with torch.no_grad():
            for a in range(0, coeffs.shape[0], _CHUNK):
                c = torch.from_numpy(np.ascontiguousarray(coeffs[a : a + _CHUNK]))
                sh = None if shifts is None else torch.from_numpy(np.ascontiguousarray(shifts[a : a + _CHUNK]))
                out[a : a + c.shape[0]] = self.psfs(c, sh).cpu().numpy()
        return out


def _zernike_basis(rho: np.ndarray, theta: np.ndarray) -> list[np.ndarray]:
    """The Noll-normalised Zernike polynomials of ``ZERNIKE_TERMS`` (unit RMS over the unit disc), in their order."""
    r2 = rho**2
    basis = [
        math.sqrt(3) * (2 * r2 - 1),
        math.sqrt(6) * r2 * np.cos(2 * theta),
        math.sqrt(6) * r2 * np.sin(2 * theta),
        math.sqrt(8) * (3 * r2 - 2) * rho * np.cos(theta),
        math.sqrt(8) * (3 * r2 - 2) * rho * np.sin(theta),
        math.sqrt(5) * (6 * r2 * r2 - 6 * r2 + 1),
        math.sqrt(8) * r2 * rho * np.cos(3 * theta),
        math.sqrt(8) * r2 * rho * np.sin(3 * theta),
        math.sqrt(10) * (4 * r2 - 3) * r2 * np.cos(2 * theta),
        math.sqrt(10) * (4 * r2 - 3) * r2 * np.sin(2 * theta),
    ]
    return basis


def _bin(fine, size: int, os_: int):
    """(N, S, S) fine intensities (numpy or torch) summed into (N, size, size) camera pixels, unit sum."""
    binned = fine.reshape(fine.shape[0], size, os_, size, os_).sum((2, 4))
    return binned / binned.sum((1, 2))[:, None, None]


def _gaussian_psfs(cfg: PSFConfig, h: np.ndarray, phi: np.ndarray) -> np.ndarray:
    os_ = _effective_oversample(cfg)
    fine = cfg.psf_size * os_
    u = (np.arange(fine) - (fine - 1) / 2.0) / os_
    uy, ux = np.meshgrid(u, u, indexing="ij")
    h, phi = h.reshape(-1), phi.reshape(-1)
    out = np.empty((h.size, cfg.psf_size, cfg.psf_size))
    for start in range(0, h.size, _CHUNK):
        hh, pp = h[start : start + _CHUNK, None, None], phi[start : start + _CHUNK, None, None]
        s_r = cfg.sigma_px * (1 + cfg.sigma_radial_h2 * hh**2)
        s_t = cfg.sigma_px * (1 + cfg.sigma_tangential_h2 * hh**2)
        radial = ux * np.cos(pp) + uy * np.sin(pp)
        tangential = -ux * np.sin(pp) + uy * np.cos(pp)
        fine_psf = np.exp(-0.5 * ((radial / s_r) ** 2 + (tangential / s_t) ** 2))
        out[start : start + _CHUNK] = _bin(fine_psf, cfg.psf_size, os_)
    return out


def _psfs_polar(cfg: PSFConfig, h: np.ndarray, phi: np.ndarray) -> np.ndarray:
    shape = np.shape(h)
    if cfg.model == "gaussian":
        flat = _gaussian_psfs(cfg, np.asarray(h), np.asarray(phi))
    else:
        flat = Pupil(cfg).psfs_numpy(zernike_coefficients(cfg, np.asarray(h), np.asarray(phi)))
    return flat.reshape(*shape, cfg.psf_size, cfg.psf_size)
