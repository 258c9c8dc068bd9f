"""A pupil model whose aberrations are low-order polynomials of the field position (fitted to beads).

The PSF at a field position is the scalar pupil model of :mod:`napari_coordgate.optics.psf` (circular aperture
``NA / wavelength``, aplanatic apodisation, Zernike wavefront in waves RMS, Noll normalisation, oversampled and
binned to camera pixels). Unlike :class:`~napari_coordgate.optics.psf.PSFConfig`, whose coefficients follow fixed
laws of the field height, each coefficient here is a polynomial of degree 2 of the normalised field coordinates:

    c_t(x, y) = C[t, 0] + C[t, 1] x + C[t, 2] y + C[t, 3] x² + C[t, 4] x y + C[t, 5] y²

or of degree 3 (four more columns: x³, x² y, x y², y³), which the pupil fit uses for defocus when the beads show a
focal surface that a quadratic does not follow (a bent specimen or cover glass, field curvature beyond h²)

for the first T terms ``t`` of :data:`~napari_coordgate.optics.psf.ZERNIKE_TERMS`: the six primary ones (defocus,
astigmatism 0° / 45°, coma x / y, spherical), optionally followed by trefoil 0° / 30° and secondary astigmatism
0° / 45°. This family holds every ``PSFConfig`` preset exactly (their field laws are quadratic in x and y, and use
the primary terms only) and any smooth misalignment of the objective a quadratic can describe.

Records (``.cgpsf``) of six-term quadratic models are written as before (version 1), so older releases read them;
a quadratic model with more terms is a version 2 record, a cubic one version 3.

numpy only at import (torch is imported by the pupil computation when PSFs are asked for).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from napari_coordgate.coords import grid_positions
from napari_coordgate.optics.psf import PRIMARY_TERMS, ZERNIKE_TERMS, PSFConfig, Pupil, pair_bound, pupil_samples
from napari_coordgate.optics.psfmodel import PSFModel, binned_psf_size, register_psf_model

__all__ = ["PupilPolyPSF", "MONOMIALS", "QUADRATIC", "monomials"]

#: the monomials of the field coordinates (x: columns, y: rows, normalised to [-1, 1]), in coefficient order: the
#: first :data:`QUADRATIC` make a quadratic field law, all of them a cubic one
MONOMIALS = ("1", "x", "y", "x2", "xy", "y2", "x3", "x2y", "xy2", "y3")
QUADRATIC = 6
_COLUMNS = (QUADRATIC, len(MONOMIALS))  # the field laws a model may have: quadratic or cubic
# the newest record this reads: 1 holds the primary terms only, 2 more of them, 3 a cubic field law
_RECORD_VERSION = 3
_MAX_WAVES = 3.0  # the pupil sampling (and PSFConfig) is built for at most this many waves RMS per term


def monomials(y, x, count: int = QUADRATIC) -> np.ndarray:
    """(..., count) values of the first ``count`` :data:`MONOMIALS` at normalised field positions (clamped to
    [-1, 1])."""
    y = np.clip(np.asarray(y, dtype=np.float64), -1.0, 1.0)
    x = np.clip(np.asarray(x, dtype=np.float64), -1.0, 1.0)
    y, x = np.broadcast_arrays(y, x)
    values = [np.ones_like(x), x, y, x * x, x * y, y * y, x**3, x * x * y, x * y * y, y**3]
    return np.stack(values[:count], axis=-1)


@register_psf_model
class PupilPolyPSF(PSFModel):
    """Pupil/Zernike PSF with coefficients polynomial in the field position.

    Parameters
    ----------
    coefficients
        (T, P) array: ``coefficients[t, p]`` multiplies monomial ``MONOMIALS[p]`` in the coefficient of Zernike
        term ``ZERNIKE_TERMS[t]`` (waves RMS, Noll); T from ``len(PRIMARY_TERMS)`` (6) to ``len(ZERNIKE_TERMS)``:
        the primary terms, then as many of the others as the model uses; P 6 (a quadratic field law) or 10
        (cubic).
    na, wavelength_um, refractive_index, pixel_size_um
        Numerical aperture, emission wavelength (µm, vacuum), immersion index, camera pixel in the specimen
        plane (µm).
    psf_size
        PSF side in camera pixels (odd).
    oversample
        Sub-samples per pixel and axis (odd; raised to Nyquist as in ``PSFConfig``).
    grid
        K of the K x K grid the fast blur interpolates.
    name, provenance
        A label for people, and JSON-able facts about the fit (bead count, residual, date, ...).
    """

    kind = "pupil_poly"

    def __init__(
        self,
        coefficients: np.ndarray,
        *,
        na: float,
        wavelength_um: float,
        refractive_index: float,
        pixel_size_um: float,
        psf_size: int,
        oversample: int = 3,
        grid: int = 7,
        name: str = "pupil fit",
        provenance: Mapping[str, Any] | None = None,
    ):
        coef = np.array(coefficients, dtype=np.float64)
        if coef.ndim != 2 or coef.shape[1] not in _COLUMNS or not (
                len(PRIMARY_TERMS) <= coef.shape[0] <= len(ZERNIKE_TERMS)):
            raise ValueError(f"coefficients must have shape (T, P) with T from {len(PRIMARY_TERMS)} to "
                             f"{len(ZERNIKE_TERMS)} (the first T terms of {', '.join(ZERNIKE_TERMS)}) and P "
                             f"{' or '.join(map(str, _COLUMNS))} (the first P monomials of {', '.join(MONOMIALS)}), "
                             f"got {coef.shape}")
        if not np.all(np.isfinite(coef)):
            raise ValueError("pupil_poly coefficients contain NaN or Inf")
        bound = self._bound(coef)
        if np.any(bound > _MAX_WAVES):
            raise ValueError(
                f"pupil_poly coefficients reach {bound.max():.3g} waves RMS in the field; at most {_MAX_WAVES:g} "
                "per term is supported (a fit that ran away, or a file edited into nonsense)"
            )
        # PSFConfig validates the optics (NA < index, odd sizes, bounds); its constant terms carry the largest
        # |coefficient| of each primary term over the field (which set the pupil sampling of six-term models)
        self._cfg = PSFConfig(
            name=str(name), model="pupil", na=float(na), wavelength_um=float(wavelength_um),
            pixel_size_um=float(pixel_size_um), refractive_index=float(refractive_index), psf_size=int(psf_size),
            oversample=int(oversample), grid=int(grid),
            **{term: float(b) for term, b in zip(PRIMARY_TERMS, bound)},
        )
        # the pupil sampled finely enough for every term everywhere (for six terms: what the config alone gives)
        self._samples = pupil_samples(self._cfg, pair_bound(bound))
        self._coef = coef
        self._coef.setflags(write=False)
        self._provenance = dict(provenance or {})
        self._pupil: Pupil | None = None  # built on first use (it needs the Fourier matrices)

    @classmethod
    def from_psf_config(cls, cfg: "PSFConfig | str", field_shape: Sequence[int] | None = None,
                        **overrides: Any) -> "PupilPolyPSF":
        """The pupil ``PSFConfig`` (or preset name) as a polynomial model: the same PSFs on the same frame.

        Its field laws (defocus and astigmatism in h², coma in h, along the radius) are quadratic in the
        normalised coordinates, so the coefficients are exact (fitted on a grid; rounding only).
        ``overrides`` replace constructor arguments (e.g. ``grid``).
        """
        from napari_coordgate.optics.psf import PRESETS, field_polar, zernike_coefficients

        cfg = PRESETS[cfg] if isinstance(cfg, str) and cfg in PRESETS else cfg
        if not isinstance(cfg, PSFConfig):
            raise ValueError(f"expected a PSFConfig or a preset name ({', '.join(PRESETS)}), got {cfg!r}")
        if cfg.model != "pupil":
            raise ValueError(f"only a pupil PSFConfig has Zernike coefficients, got model {cfg.model!r}")
        t = grid_positions(7)
        yy, xx = np.meshgrid(t, t, indexing="ij")
        h, phi = field_polar(cfg, yy, xx, field_shape)
        z = zernike_coefficients(cfg, h, phi).reshape(-1, len(PRIMARY_TERMS))
        coef = np.linalg.lstsq(monomials(yy, xx).reshape(-1, QUADRATIC), z, rcond=None)[0].T
        kwargs = dict(na=cfg.na, wavelength_um=cfg.wavelength_um, refractive_index=cfg.refractive_index,
                      pixel_size_um=cfg.pixel_size_um, psf_size=cfg.psf_size, oversample=cfg.oversample,
                      grid=cfg.grid, name=cfg.name)
        kwargs.update(overrides)
        return cls(coef, **kwargs)

    @staticmethod
    def _bound(coef: np.ndarray) -> np.ndarray:
        """Largest |coefficient| of each term over the field (on a fine grid; the polynomials are at most cubic)."""
        t = grid_positions(21)
        yy, xx = np.meshgrid(t, t, indexing="ij")
        return np.abs(monomials(yy, xx, coef.shape[1]) @ coef.T).reshape(-1, coef.shape[0]).max(axis=0)

    # --------------------------------------------------------------------------------------- properties

    @property
    def name(self) -> str:
        return self._cfg.name

    @property
    def psf_size(self) -> int:
        return self._cfg.psf_size

    @property
    def grid(self) -> int:
        return self._cfg.grid

    @property
    def pixel_size_um(self) -> float | None:
        return self._cfg.pixel_size_um

    @property
    def is_uniform(self) -> bool:
        return bool(np.all(self._coef[:, 1:] == 0))

    @property
    def coefficients(self) -> np.ndarray:
        """(T, P) polynomial coefficients (read-only view), terms (the first T of ``ZERNIKE_TERMS``) x monomials (the
        first P of ``MONOMIALS``)."""
        return self._coef

    @property
    def degree(self) -> int:
        """The degree of the field law: 2 (quadratic) or 3 (cubic)."""
        return 2 if self._coef.shape[1] == QUADRATIC else 3

    @property
    def terms(self) -> tuple[str, ...]:
        """The Zernike terms the model uses: the first T of ``ZERNIKE_TERMS``."""
        return ZERNIKE_TERMS[: self._coef.shape[0]]

    @property
    def optics(self) -> dict[str, float]:
        """NA, wavelength (µm), immersion index and pixel size (µm) of the model."""
        c = self._cfg
        return {"na": c.na, "wavelength_um": c.wavelength_um, "refractive_index": c.refractive_index,
                "pixel_size_um": c.pixel_size_um}

    @property
    def oversample(self) -> int:
        return self._cfg.oversample

    @property
    def provenance(self) -> dict[str, Any]:
        """Facts about the measurement (not part of :meth:`to_record`: files keep them beside the record)."""
        return dict(self._provenance)

    def zernike_at(self, y, x) -> np.ndarray:
        """(..., T) Zernike coefficients (waves RMS, of :attr:`terms`) at normalised positions."""
        return monomials(y, x, self._coef.shape[1]) @ self._coef.T

    # ------------------------------------------------------------------------------------------- PSFs

    def psfs_at(self, y, x, field_shape: Sequence[int] | None = None) -> np.ndarray:
        y, x = np.broadcast_arrays(np.asarray(y, dtype=np.float64), np.asarray(x, dtype=np.float64))
        if self._pupil is None:
            self._pupil = Pupil(self._cfg, self._samples)
        s = self.psf_size
        flat = self._pupil.psfs_numpy(self.zernike_at(y.ravel(), x.ravel()))
        return flat.reshape(*y.shape, s, s)

    def binned(self, binning: int) -> "PupilPolyPSF":
        """The same optics seen through ``binning`` times larger pixels (PSFs integrated over them)."""
        size = binned_psf_size(self.psf_size, binning)
        if binning == 1:
            return self
        prov = dict(self._provenance)
        prov["binning"] = int(binning) * int(prov.get("binning", 1))
        c = self._cfg
        return PupilPolyPSF(self._coef, na=c.na, wavelength_um=c.wavelength_um, refractive_index=c.refractive_index,
                            pixel_size_um=c.pixel_size_um * binning, psf_size=size, oversample=c.oversample,
                            grid=c.grid, name=c.name, provenance=prov)

    # ---------------------------------------------------------------------------------------- records

    def to_record(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        c = self._cfg
        meta = {
            "kind": self.kind,
            # older releases read six-term quadratic files, and (from version 2) more terms
            "version": 3 if self.degree == 3 else 1 if len(self.terms) == len(PRIMARY_TERMS) else 2,
            "name": c.name,
            "na": c.na,
            "wavelength_um": c.wavelength_um,
            "refractive_index": c.refractive_index,
            "pixel_size_um": c.pixel_size_um,
            "psf_size": c.psf_size,
            "oversample": c.oversample,
            "grid": c.grid,
            "terms": list(self.terms),
            "monomials": list(MONOMIALS[: self._coef.shape[1]]),
        }
        return meta, {"coefficients": self._coef.copy()}

    @classmethod
    def from_record(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> "PupilPolyPSF":
        if not isinstance(meta, dict) or meta.get("kind") != cls.kind:
            raise ValueError(f"not a {cls.kind} PSF record")
        version = meta.get("version", 1)
        if not isinstance(version, int) or version > _RECORD_VERSION:
            raise ValueError(
                f"{cls.kind} PSF record version {version!r} is newer than this napari-coordgate reads "
                f"({_RECORD_VERSION}); upgrade napari-coordgate"
            )
        if "coefficients" not in arrays:
            raise ValueError(f"{cls.kind} PSF record has no 'coefficients' array")
        coef = np.asarray(arrays["coefficients"])
        if coef.dtype.kind != "f":
            raise ValueError(f"{cls.kind} PSF record: 'coefficients' must be a float array, got {coef.dtype}")
        terms = meta.get("terms", ZERNIKE_TERMS[: coef.shape[0] if coef.ndim else 0])
        names = meta.get("monomials", MONOMIALS[:QUADRATIC])
        if (not isinstance(terms, list | tuple) or list(terms) != list(ZERNIKE_TERMS[: len(terms)])
                or not isinstance(names, list | tuple) or len(names) not in _COLUMNS
                or list(names) != list(MONOMIALS[: len(names)])):
            raise ValueError(f"{cls.kind} PSF record uses terms {meta.get('terms')} / monomials "
                             f"{meta.get('monomials')}; this napari-coordgate reads the first 6 to "
                             f"{len(ZERNIKE_TERMS)} of {list(ZERNIKE_TERMS)} / the first "
                             f"{' or '.join(map(str, _COLUMNS))} of {list(MONOMIALS)}")
        if coef.ndim != 2 or coef.shape != (len(terms), len(names)):
            raise ValueError(f"{cls.kind} PSF record: 'coefficients' has shape {coef.shape}, expected one row per "
                             f"term ({len(terms)}) and one column per monomial ({len(names)})")
        missing = [k for k in ("na", "wavelength_um", "refractive_index", "pixel_size_um", "psf_size") if k not in meta]
        if missing:
            raise ValueError(f"{cls.kind} PSF record lacks {', '.join(missing)}")
        provenance = meta.get("provenance") or {}
        if not isinstance(provenance, dict):
            raise ValueError(f"{cls.kind} PSF record: provenance must be a dict")
        try:
            return cls(coef, na=meta["na"], wavelength_um=meta["wavelength_um"],
                       refractive_index=meta["refractive_index"], pixel_size_um=meta["pixel_size_um"],
                       psf_size=meta["psf_size"], oversample=meta.get("oversample", 3), grid=meta.get("grid", 7),
                       name=str(meta.get("name", "pupil fit")), provenance=provenance)
        except (TypeError, ValueError) as exc:  # ConfigError is a ValueError
            raise ValueError(f"{cls.kind} PSF record is invalid: {exc}") from None

    def describe(self) -> str:
        c = self._cfg
        return (f"pupil_poly PSF model {c.name!r} (NA {c.na:g}, {1000 * c.wavelength_um:g} nm, n = "
                f"{c.refractive_index:g}, {c.pixel_size_um:g} µm pixels, {c.psf_size} px PSFs; "
                f"{len(self.terms)} Zernike coefficients {'quadratic' if self.degree == 2 else 'cubic'} in the "
                "field)")
