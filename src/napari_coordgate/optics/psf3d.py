"""3-D PSF models for z-stacks: the PSF through focus at every position of the field, behind the one
:class:`~napari_coordgate.optics.psfmodel.PSFModel` interface (``ndim`` 3).

A 3-D PSF is a stack of ``psf_depth`` (odd, D) planes ``z_step_um`` apart, plane ``d`` at axial position
``z_d = (d - D // 2) * z_step_um`` (z grows with the stack index), each plane ``psf_size`` x ``psf_size`` camera
pixels. It varies across the field (y, x) but **not with depth**: a point deep in the specimen is blurred like a
point near the coverslip at the same (y, x) (no depth-dependent spherical aberration), so the blur is a
convolution along z (:mod:`napari_coordgate.optics.blur3d`).

``"pupil3d"`` (:class:`Pupil3DPSF`)
    The scalar pupil model of a 2-D pupil :class:`~napari_coordgate.optics.psf.PSFConfig` carried through focus.
    A point at normalised field position (y, x) has its best focus at
    ``focus(y, x) = tilt_y_um * y + tilt_x_um * x + curvature_um * h²`` (µm; h the field height of
    :func:`~napari_coordgate.optics.psf.field_polar`, 1 at the corners for a centred axis), so in plane ``z_d`` it
    is defocused by ``dz = z_d - focus(y, x)``. Its pupil carries the 2-D config's Zernike wavefront at (y, x)
    (constant terms, ``defocus_h2``, ``astig_h2``, ``coma_h``) plus the exact scalar defocus phase
    ``2 pi / wavelength * dz * sqrt(n² - (NA rho)²)`` (minus its mean over the aperture: a piston changes no
    intensity), with ``rho`` the normalised pupil radius. The field in each plane is the pupil's matrix Fourier
    transform on the oversampled crop (:class:`~napari_coordgate.optics.psf.Pupil`), its squared modulus is binned
    to camera pixels, and the volume is normalised to unit sum.
``"measured_grid3d"`` (:class:`MeasuredGrid3DPSF`)
    A K x K grid of measured 3-D PSFs (K, K, D, s, s) at the nodes ``linspace(-1, 1, K)``, interpolated in
    (y, x) with the tent weights of :func:`~napari_coordgate.coords.tent_weights`, exactly as
    :class:`~napari_coordgate.optics.measured.MeasuredGridPSF` does in 2-D (and as the 3-D blur weights the
    volume), the same weights for every plane.

Normalisation and depth
-----------------------
Every 3-D PSF sums to one over its **stored volume**, not plane by plane: a defocused plane holds less light in its
crop because its light spreads beyond it. Light beyond the stored volume (further from focus than
``psf_depth // 2`` planes, or outside the crop) is not modelled, so choose ``psf_depth`` and ``psf_size`` to cover
the defocus range that matters: :class:`Pupil3DPSF` refuses a depth that does not reach the best focus of every
field position, and its middle plane is in focus where ``focus(y, x) = 0`` (the frame centre when the optical axis
is centred; a constant Zernike ``defocus`` of the 2-D config blurs the middle plane everywhere, as in 2-D).

numpy (and torch, only to compute pupil PSFs, as in 2-D): no Qt.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import numpy as np

from napari_coordgate.config import Config, ConfigError, bounded
from napari_coordgate.optics.measured import NodeGridPSF, _positive_or_none, tent_interpolate
from napari_coordgate.optics.psf import (
    PSFConfig,
    Pupil,
    UndersamplingWarning,
    field_polar,
    nyquist_pixel_size_um,
    pupil_samples,
    zernike_coefficients,
)
from napari_coordgate.optics.psfmodel import PSF_DEPTH_BOUNDS, PSFModel, register_psf_model

__all__ = ["Pupil3DPSF", "MeasuredGrid3DPSF", "PRESETS_3D", "axial_nyquist_um"]

_CHUNK = 128  # pupil PSF planes computed together: bounds the memory of the (N, M²) pupils


def _um(default: float, doc: str):
    return bounded(default, -100.0, 100.0, kind=float, doc=doc)


@register_psf_model
@dataclass(frozen=True)
class Pupil3DPSF(Config, PSFModel):
    """The pupil model through focus: a 2-D pupil :class:`PSFConfig` plus the z sampling and the focus surface.

    A validated config (fields, JSON) and a 3-D :class:`PSFModel` of kind ``"pupil3d"`` whose record holds no
    arrays. See the module docstring for the method; the PSF varies across the field but not with depth.

    Build one from a 2-D pupil config with :meth:`from_pupil`; ``binned`` bins x and y only (z keeps its step).
    """

    KIND: ClassVar[str] = "pupil3d"  # the config kind in its dict / JSON: the PSF-model kind, so its JSON is a record
    kind: ClassVar[str] = "pupil3d"
    ndim: ClassVar[int] = 3

    name: str = field(default="custom", metadata={"kind": str, "doc": "label (the preset name, or custom)"})
    pupil: PSFConfig = field(default_factory=PSFConfig, metadata={
        "kind": PSFConfig, "doc": "the 2-D pupil model in focus: optics, Zernike field laws, psf_size, grid"})
    z_step_um: float = bounded(0.25, 0.001, 100.0, doc="distance between the PSF's planes, µm")
    psf_depth: int = bounded(15, *PSF_DEPTH_BOUNDS, doc="planes of every PSF (odd); the middle one at z = 0")
    tilt_y_um: float = _um(0.0, "focus tilt: best-focus shift at normalised field y = 1 (linear in y), µm")
    tilt_x_um: float = _um(0.0, "focus tilt: best-focus shift at normalised field x = 1 (linear in x), µm")
    curvature_um: float = _um(0.0, "field curvature: best-focus shift at field height h = 1, grows as h², µm")

    def _validate(self) -> None:
        if not isinstance(self.pupil, PSFConfig) or self.pupil.model != "pupil":
            got = self.pupil.model if isinstance(self.pupil, PSFConfig) else type(self.pupil).__name__
            raise ConfigError(f"Pupil3DPSF.pupil must be a PSFConfig of the pupil model, got {got}")
        if self.psf_depth % 2 == 0:
            raise ConfigError(f"Pupil3DPSF.psf_depth must be odd so the PSF is centred on a plane, got "
                              f"{self.psf_depth}")
        reach = self.z_step_um * (self.psf_depth // 2)
        shift = self.max_focus_shift_um()
        if shift > reach + 1e-12:
            raise ConfigError(
                f"Pupil3DPSF: the best focus moves up to {shift:g} µm across the field, but {self.psf_depth} planes "
                f"{self.z_step_um:g} µm apart reach only ±{reach:g} µm; raise psf_depth to at least "
                f"{2 * math.ceil(shift / self.z_step_um) + 1}"
            )

    @classmethod
    def from_pupil(cls, pupil: PSFConfig, *, z_step_um: float, psf_depth: int, tilt_y_um: float = 0.0,
                   tilt_x_um: float = 0.0, curvature_um: float = 0.0, name: str | None = None) -> "Pupil3DPSF":
        """The 3-D model of a 2-D pupil config (a preset of :data:`~napari_coordgate.optics.psf.PRESETS`, say).

        Parameters
        ----------
        pupil
            The optics in focus; its field-dependent Zernike terms (``defocus_h2`` included) apply in every plane.
        z_step_um, psf_depth
            Plane spacing (µm) and number of planes (odd) of every PSF.
        tilt_y_um, tilt_x_um, curvature_um
            The best-focus surface (µm): tilt at y = 1 and x = 1, curvature at h = 1.
        name
            Label; default the pupil config's name.
        """
        return cls(name=pupil.name if name is None else name, pupil=pupil, z_step_um=z_step_um, psf_depth=psf_depth,
                   tilt_y_um=tilt_y_um, tilt_x_um=tilt_x_um, curvature_um=curvature_um)

    # -- geometry ---------------------------------------------------------------------------------------
    @property
    def psf_size(self) -> int:
        return self.pupil.psf_size

    @property
    def grid(self) -> int:
        return self.pupil.grid

    @property
    def pixel_size_um(self) -> float:
        return self.pupil.pixel_size_um

    @property
    def is_uniform(self) -> bool:
        return self.pupil.is_uniform and self.tilt_y_um == 0 and self.tilt_x_um == 0 and self.curvature_um == 0

    @property
    def plane_z_um(self) -> np.ndarray:
        """(psf_depth,) axial position of each plane of a PSF, µm: 0 at the middle plane."""
        return (np.arange(self.psf_depth) - self.psf_depth // 2) * self.z_step_um

    def focus_um(self, y, x, field_shape: Sequence[int] | None = None) -> np.ndarray:
        """Best-focus shift (µm) at normalised field positions: ``tilt_y * y + tilt_x * x + curvature * h²``."""
        y, x = np.broadcast_arrays(np.asarray(y, dtype=np.float64), np.asarray(x, dtype=np.float64))
        h, _ = field_polar(self.pupil, y, x, field_shape)
        return self.tilt_y_um * y + self.tilt_x_um * x + self.curvature_um * h * h

    def max_focus_shift_um(self) -> float:
        """The largest |best-focus shift| anywhere in any frame (field corners, farthest from the axis)."""
        h_max = 1.0 + max(abs(self.pupil.axis_y), abs(self.pupil.axis_x))
        return abs(self.tilt_y_um) + abs(self.tilt_x_um) + abs(self.curvature_um) * h_max * h_max

    # -- the PSFModel interface -------------------------------------------------------------------------
    def psfs_at(self, y, x, field_shape: Sequence[int] | None = None) -> np.ndarray:
        """3-D PSFs at normalised field positions: ``S + (psf_depth, psf_size, psf_size)``, each summing to one.

        Warns
        -----
        UndersamplingWarning
            When the camera pixel is coarser than the lateral Nyquist limit, or ``z_step_um`` than the axial one.
        """
        _warn_if_undersampled(self)
        y, x = np.broadcast_arrays(np.asarray(y, dtype=np.float64), np.asarray(x, dtype=np.float64))
        h, phi = field_polar(self.pupil, y, x, field_shape)
        coeffs = zernike_coefficients(self.pupil, h.ravel(), phi.ravel())
        dz = self.plane_z_um[None, :] - self.focus_um(y, x, field_shape).reshape(-1, 1)
        # the pupil is sampled for the largest defocus of the model, not of this batch: a PSF comes out the same
        # whatever else is computed with it
        vols = _through_focus(self.pupil, coeffs, dz, self.max_focus_shift_um() + float(self.plane_z_um[-1]))
        return vols.reshape(*y.shape, self.psf_depth, self.psf_size, self.psf_size)

    def binned(self, binning: int) -> "Pupil3DPSF":
        """The model seen by a camera binned ``binning`` x ``binning`` in x and y (z keeps its planes and step)."""
        pupil = self.pupil.binned(binning)
        return self if pupil is self.pupil else self.replace(pupil=pupil)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["pupil"] = self.pupil.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Pupil3DPSF":
        if isinstance(data, dict) and isinstance(data.get("pupil"), dict):
            data = {**data, "pupil": PSFConfig.from_dict(data["pupil"])}
        return super().from_dict(data)

    def to_record(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(this config's dict, ``"kind": "pupil3d"``, the 2-D pupil nested as its dict; no arrays)."""
        return self.to_dict(), {}

    @classmethod
    def from_record(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> "Pupil3DPSF":
        """The model of a record; :class:`ConfigError` names a bad field."""
        if arrays:
            raise ConfigError(f"a pupil3d PSF model has no arrays; the record holds {', '.join(sorted(arrays))}")
        data = dict(meta)
        if not isinstance(data.get("pupil"), dict):
            raise ConfigError("a pupil3d PSF record needs its 2-D pupil config as a dict under 'pupil'")
        return cls.from_dict(data)

    def describe(self) -> str:
        p = self.pupil
        focus = [f"{label} {value:g} µm" for label, value in
                 (("tilt y", self.tilt_y_um), ("tilt x", self.tilt_x_um), ("curvature", self.curvature_um)) if value]
        focus_text = ", ".join(focus) if focus else "flat focus"
        return (f"pupil3d 3-D PSF model {self.name!r} (NA {p.na:g}, {p.wavelength_um * 1000:g} nm, "
                f"{p.pixel_size_um:g} µm pixels, z-step {self.z_step_um:g} µm; {focus_text}; {self.psf_depth} x "
                f"{self.psf_size} x {self.psf_size} voxel PSFs, {self.grid} x {self.grid} grid)")


def axial_nyquist_um(cfg: PSFConfig) -> float:
    """Largest z-step (µm) that samples a widefield pupil-model PSF without aliasing: the axial OTF support ends at
    ``n (1 - cos alpha) / wavelength`` (``sin alpha = NA / n``), so the step is ``wavelength / (2 n (1 - cos alpha))``.
    """
    n = cfg.refractive_index
    cos_a = math.sqrt(1.0 - (cfg.na / n) ** 2)
    return cfg.wavelength_um / (2.0 * n * (1.0 - cos_a))


def _warn_if_undersampled(model: Pupil3DPSF) -> None:
    cfg = model.pupil
    for what, step, limit in (("pixel_size_um", cfg.pixel_size_um, nyquist_pixel_size_um(cfg)),
                              ("z_step_um", model.z_step_um, axial_nyquist_um(cfg))):
        if step > limit * (1 + 1e-9):
            warnings.warn(f"Pupil3DPSF: {what} = {step:g} µm undersamples the PSF (Nyquist step for NA {cfg.na:g} "
                          f"at {cfg.wavelength_um:g} µm is {limit:.4g} µm); detail finer than a voxel is lost",
                          UndersamplingWarning, stacklevel=3)


def _defocus_slope(cfg: PSFConfig, dz_max: float) -> float:
    """Largest slope of the defocus phase of ``dz_max`` µm over the pupil, in waves per unit pupil radius (at the
    rim: ``dz NA² / (wavelength sqrt(n² - NA²))``)."""
    n, na = cfg.refractive_index, cfg.na
    return abs(dz_max) * na * na / (cfg.wavelength_um * math.sqrt(n * n - na * na))


def _defocus_phase(pupil: Pupil, cfg: PSFConfig):
    """(M²,) torch phase per µm of defocus at each pupil sample: ``2 pi / wavelength * sqrt(n² - (NA rho)²)``
    minus its mean over the aperture (the piston)."""
    import torch

    cutoff = cfg.na / cfg.wavelength_um
    rho = torch.hypot(pupil.fy, pupil.fx) / (cfg.pixel_size_um * cutoff)
    kz = (2 * math.pi / cfg.wavelength_um) * torch.sqrt(cfg.refractive_index**2 - (cfg.na * rho.clamp(max=1.0))**2)
    inside = pupil.amplitude > 0
    return torch.where(inside, kz - kz[inside].mean(), torch.zeros_like(kz))


def _through_focus(cfg: PSFConfig, coeffs: np.ndarray, dz: np.ndarray, dz_max: float) -> np.ndarray:
    """(N, D, s, s) PSF volumes, each summing to one, of (N, T) Zernike coefficients at (N, D) defocus values (µm).

    The pupil is sampled finely enough that a defocus of ``dz_max`` too moves less than a quarter wave between samples
    (:func:`~napari_coordgate.optics.psf.pupil_samples` plus the defocus slope), which also keeps the periodic
    copies of a defocused field at least two of its diameters apart.
    """
    import torch

    n, d = dz.shape
    s = cfg.psf_size
    samples = pupil_samples(cfg) + 2 * math.ceil(4.0 * _defocus_slope(cfg, dz_max))
    pupil = Pupil(cfg, samples=samples)
    kz = _defocus_phase(pupil, cfg)
    flat_c = np.repeat(np.asarray(coeffs, dtype=np.float64).reshape(n, -1), d, axis=0)
    flat_z = np.ascontiguousarray(dz, dtype=np.float64).ravel()
    out = np.empty((n * d, s, s))
    with torch.no_grad():
        for a in range(0, n * d, _CHUNK):
            c = torch.from_numpy(np.ascontiguousarray(flat_c[a : a + _CHUNK]))
            z = torch.from_numpy(flat_z[a : a + _CHUNK])
            phase = pupil.phase(c) + z[:, None] * kz
            fld = pupil.fields(torch.polar(pupil.amplitude.expand(c.shape[0], -1), phase))
            fine = fld.real**2 + fld.imag**2
            # binned to camera pixels but not normalised plane by plane: the volume is normalised below
            out[a : a + c.shape[0]] = fine.reshape(-1, s, pupil.os, s, pupil.os).sum((2, 4)).numpy()
    out = out.reshape(n, d, s, s)
    return out / out.sum(axis=(1, 2, 3), keepdims=True)


PRESETS_3D: dict[str, Pupil3DPSF] = {
    "tilted_curved_3d": Pupil3DPSF.from_pupil(
        PSFConfig(name="tilted_curved_3d", na=0.8, wavelength_um=0.52, pixel_size_um=0.13, refractive_index=1.0,
                  psf_size=25, grid=5, astig_h2=0.2, coma_h=0.05),
        z_step_um=0.25, psf_depth=17, tilt_y_um=0.4, tilt_x_um=-0.25, curvature_um=0.6,
    ),
}
"""Named 3-D PSF models: ``tilted_curved_3d`` is a dry NA 0.8 objective (520 nm, 0.13 µm pixels, 0.25 µm z-step,
17 x 25 x 25 voxel PSFs on a 5 x 5 grid) whose best focus tilts (0.4 µm at y = 1, -0.25 µm at x = 1) and curves
(0.6 µm at the corners), with radial astigmatism and a little coma towards the edge."""


@register_psf_model
class MeasuredGrid3DPSF(NodeGridPSF):
    """3-D PSFs measured on a K x K grid of the field (from bead z-stacks), interpolated bilinearly in (y, x).

    The PSF varies across the field but not with depth; every node PSF is normalised over its stored volume. What
    the grid shares with the 2-D :class:`~napari_coordgate.optics.measured.MeasuredGridPSF` (properties, binning,
    records) lives in :class:`~napari_coordgate.optics.measured.NodeGridPSF`.

    Parameters
    ----------
    psfs
        (K, K, D, s, s) PSFs, ``psfs[i, j]`` at row node ``i`` and column node ``j`` of ``linspace(-1, 1, K)``;
        D and s odd, plane ``D // 2`` at z = 0. Non-negative (light).
    z_step_um
        Distance between planes (µm); required: a 3-D PSF without it cannot be matched to a z-stack.
    filled
        (K, K) booleans: nodes filled from their neighbours (too few beads). Default: none.
    pixel_size_um
        Camera pixel size in the specimen plane (µm), or None when unknown.
    name, provenance
        A label for people; JSON-able facts about the measurement.
    blur_grid
        K of the grid the fast blur uses by default; default the measured grid's K.
    """

    kind = "measured_grid3d"
    ndim = 3
    psf_dims = 3
    _label = "3-D"
    _grid_shape = "(K, K, D, s, s)"
    _record_axes = (("psf_size", -1), ("psf_depth", 2))
    _extra_args = ("z_step_um",)

    def __init__(self, psfs: np.ndarray, *, z_step_um: float, **kwargs):
        super().__init__(psfs, **kwargs)
        z_step = _positive_or_none(z_step_um, "z_step_um")
        if z_step is None:
            raise ValueError("a 3-D PSF grid needs z_step_um, the distance between its planes in µm")
        self._z_step = z_step

    @classmethod
    def _check_depth(cls, arr: np.ndarray) -> None:
        lo, hi = PSF_DEPTH_BOUNDS
        if arr.shape[2] % 2 == 0 or not lo <= arr.shape[2] <= hi:
            raise ValueError(f"3-D PSFs must have an odd number of planes from {lo} to {hi} (the middle one at "
                             f"z = 0), got {arr.shape[2]}")

    @property
    def psf_depth(self) -> int:
        return int(self._psfs.shape[2])

    @property
    def z_step_um(self) -> float:
        return self._z_step

    def psfs_at(self, y, x, field_shape: Sequence[int] | None = None) -> np.ndarray:
        # the tent weights are of normalised coordinates, so the frame shape does not matter
        out = tent_interpolate(self._psfs, y, x)
        return out / out.sum(axis=(-3, -2, -1), keepdims=True)

    def describe(self) -> str:
        return (f"measured_grid3d 3-D PSF model {self._name!r} ({self.psf_depth} x {self.psf_size} x {self.psf_size} "
                f"voxel PSFs, z-step {self._z_step:g} µm, measured on a {self.nodes} x {self.nodes} grid"
                f"{self._described_extras()})")
