"""Calibrate a microscope from a bead slide: a 2-D image of sub-resolution beads -> a field-dependent PSF model.

:func:`calibrate` detects the beads (:mod:`~napari_coordgate.calibration.detect`), cuts registered PSF patches
(:mod:`~napari_coordgate.calibration.patches`) and fits two models of how the PSF changes across the field:

- ``"grid"``: a measured K x K grid of PSFs (:class:`~napari_coordgate.optics.measured.MeasuredGridPSF`,
  :mod:`~napari_coordgate.calibration.grid`), for any optics;
- ``"pupil"``: a pupil model whose Zernike aberrations are quadratic polynomials of the field position (defocus
  cubic where the beads show a bent focal surface)
  (:class:`~napari_coordgate.optics.pupil_poly.PupilPolyPSF`, :mod:`~napari_coordgate.calibration.pupilfit`),
  fitted to all beads jointly with torch autograd; it needs the NA, emission wavelength, immersion index and pixel
  size.

``model="auto"`` fits both (the pupil model only when the optics are given) on four fifths of the beads and keeps
the one that predicts the held-out fifth better, then refits it on all beads. The result carries the model, both
held-out residuals, a table of every detected spot (accepted or rejected, with the reason), warnings about thin
coverage, a report figure (:meth:`CalibrationResult.report_png`) and JSON (:meth:`CalibrationResult.to_json`).

Below the engine: uses optics, never Qt or napari. What the slide should look like: sparse beads (a few hundred
over the field, most further apart than the PSF window), in focus, the brightest peaks well below saturation
(a few thousand photons is plenty), pixels at or below the Nyquist limit ``wavelength / (4 NA)``.
"""

from __future__ import annotations

import datetime as _dt
import math
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from napari_coordgate.calibration import CalibrationCancelled, CalibrationError
from napari_coordgate.calibration.detect import BeadTable, find_beads, reject_by_window
from napari_coordgate.calibration.grid import GridFit, choose_grid, fit_grid
from napari_coordgate.calibration.patches import Patches, extract_patches, fit_beads
from napari_coordgate.calibration.result import CalibrationResult, CalibrationUpdate
from napari_coordgate.calibration.windows import Windows, window_sizes
from napari_coordgate.config import CALIBRATION_MODELS
from napari_coordgate.optics.measured import MeasuredGridPSF
from napari_coordgate.optics.psfmodel import PSFModel

__all__ = ["calibrate", "CalibrationResult", "CalibrationUpdate", "CalibrationError", "CalibrationCancelled",
           "BeadTable", "MODELS", "PUPIL_MIN_BEADS", "GRID_MIN_BEADS"]

MODELS = CALIBRATION_MODELS
PUPIL_MIN_BEADS = 10  # 36 (60 with trefoil and secondary astigmatism, 4 more for a cubic defocus) coefficients, each
# bead constrains its place's
GRID_MIN_BEADS = 5  # four to fit, one to check
_MIN_SIDE = 16  # the smallest bead image side: a PSF window and its background ring
_MARGIN = 3  # width of the background ring around each PSF window
_HOLD_OUT = 5  # every 5th accepted bead is held out to compare the models
_OUTLIER_RATIO = 10.0
_MIN_ALONE = 8  # beads without a neighbour in reach needed to start modelling the crowded ones
_DEBLEND_SWEEPS = 2  # refits of the PSF model from windows with the neighbours' light removed
_LIKENESS = 0.7  # correlation with its PSF below which a spot found in the residual is not a bead
_FOUND = "found beside a neighbour, in the residual of the modelled spots"
# a spot closer than a PSF width to another is dropped when taking it out raises the chi-square of its square by less
# than this (noise variances): the others explain its light (a bead at the detection's 5-sigma floor: hundreds)
_EVIDENCE = 25.0
_UNNEEDED_ROUNDS = 3
_REGIONS = (("top-left corner", "top edge", "top-right corner"), ("left edge", "centre", "right edge"),
            ("bottom-left corner", "bottom edge", "bottom-right corner"))


# ------------------------------------------------------------------------------------------------ input


def _check_images(images) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(raw planes, float64 planes) of a 2-D image, a 3-D series or a sequence of 2-D images of one shape.

    What a bead image's shape and values must be is checked here first, each rule with what it means for a bead
    image; the dtype, empty-axis and NaN/Inf rules are those of every entry point
    (:func:`napari_coordgate.checks.check_image`).
    """
    from napari_coordgate.checks import InputError, check_image

    if isinstance(images, (list, tuple)):
        if not images:
            raise CalibrationError("no bead image given; pass a 2-D image (H, W) of the focal plane")
        planes = [np.asarray(im) for im in images]
        for i, p in enumerate(planes):
            if p.ndim != 2:
                raise CalibrationError(f"bead image {i} has shape {p.shape}; each image of a list must be 2-D (H, W)")
        if len({p.shape for p in planes}) > 1:
            raise CalibrationError(f"bead images have different shapes {sorted({p.shape for p in planes})}; they "
                                   "must be images of the same field (same camera frame)")
        images = np.stack(planes)
    _check_bead_shape(tuple(int(n) for n in np.shape(images)))
    try:
        arr = check_image(images, "bead image", min_ndim=2, max_ndim=3)
    except InputError as exc:
        raise CalibrationError(str(exc)) from None
    arr = arr[None] if arr.ndim == 2 else arr
    raw = [arr[i] for i in range(arr.shape[0])]
    planes = [np.asarray(r, dtype=np.float64) for r in raw]
    for i, plane in enumerate(planes):
        lo, hi = float(plane.min()), float(plane.max())
        if lo == hi:
            which = "bead image" if len(planes) == 1 else f"bead image plane {i}"
            raise CalibrationError(f"{which} is constant (all {lo:g}): there are no beads to detect (lens cap on? "
                                   "wrong channel?)")
    return raw, planes


def _check_bead_shape(shape: tuple[int, ...]) -> None:
    """A bead image is (H, W) or a series (N, H, W) of at least :data:`_MIN_SIDE` pixels a side, never RGB: the
    layout rules of :func:`~napari_coordgate.checks.check_layout`, said for a bead image (checked before them)."""
    if len(shape) == 3 and shape[-1] in (3, 4) and min(shape[:2]) > 4:
        raise CalibrationError(f"bead image of shape {shape} looks like an RGB(A) image; convert it to grey or pick "
                               "one channel (for multichannel beads, calibrate each channel separately: one PSF "
                               "model per channel)")
    if not 2 <= len(shape) <= 3:
        raise CalibrationError(f"bead image: expected a 2-D image (H, W) or a series (N, H, W) of 2-D images of the "
                               f"same field, got shape {shape}; a bead image is the in-focus 2-D plane (a z-stack is "
                               "not supported: give its focal plane); calibrate multichannel data one channel at a "
                               "time")
    h, w = shape[-2:]
    if 0 < min(h, w) < _MIN_SIDE:  # an empty axis is check_layout's to name
        raise CalibrationError(f"bead image is {h}x{w} pixels, smaller than the minimum {_MIN_SIDE}x{_MIN_SIDE} for "
                               "a bead image (the PSF windows need room)")


def _coverage_warnings(table: BeadTable, field_shape) -> tuple[list[str], np.ndarray]:
    ok = table.accepted
    counts = np.zeros((3, 3), int)
    ry = np.clip(((table.y_norm[ok] + 1) / 2 * 3).astype(int), 0, 2)
    rx = np.clip(((table.x_norm[ok] + 1) / 2 * 3).astype(int), 0, 2)
    np.add.at(counts, (ry, rx), 1)
    out = []
    for i in range(3):
        for j in range(3):
            name = _REGIONS[i][j]
            if counts[i, j] == 0:
                out.append(f"no beads in the {name}: the model there is extrapolated from its neighbours")
            elif counts[i, j] < 3:
                out.append(f"only {counts[i, j]} bead(s) in the {name}: the model there rests on few beads")
    return out, counts


def _score(model: PSFModel, patches: Patches, field_shape, bead_px: float = 0.0) -> tuple[float, dict]:
    """Held-out misfit of ``model`` to the beads: its PSFs, as beads of ``bead_px`` image them, fitted to each."""
    from napari_coordgate.optics.bead import blur_by_bead

    psfs = blur_by_bead(model.psfs_at(patches.y_norm, patches.x_norm, field_shape), bead_px)
    s, w = psfs.shape[-1], patches.psf_size
    if s > w:  # a pupil model keeps the halo beyond the data's window; compare on the window (amplitude is free)
        lo = (s - w) // 2
        psfs = psfs[:, lo : lo + w, lo : lo + w]
    elif s < w:
        lo = (w - s) // 2
        psfs = np.pad(psfs, ((0, 0), (lo, lo), (lo, lo)))
    fit = fit_beads(psfs, patches)
    return float(np.sum(fit["chi2"]) / np.sum(fit["pixels"])), fit


def calibrate(
    images,
    *,
    model: str = "auto",
    grid: int | None = None,
    na: float | None = None,
    wavelength_um: float | None = None,
    immersion: float | None = None,
    pixel_size_um: float | None = None,
    psf_size: int | None = None,
    device: str = "auto",
    should_stop: Callable[[], bool] | None = None,
    report: Callable[[CalibrationUpdate], None] | None = None,
    source: str | Sequence[str] | None = None,
    min_snr: float = 5.0,
    bead_diameter_nm: float | None = None,
    holdout: float = 0.0,
    target: str = "auto",
) -> CalibrationResult:
    """Measure a microscope's field-dependent PSF from an image of sub-resolution beads.

    Parameters
    ----------
    images
        A 2-D image (H, W) of the beads in the focal plane, or a series (N, H, W) / list of 2-D images of the
        *same field* (their beads are pooled); a z-stack: :func:`~napari_coordgate.calibration.zstack.
        calibrate_zstack`. One channel per call. Raw camera units (any real dtype); RGB images are refused.
    model
        ``"auto"`` (both models when the optics are given, else the grid; the one with the smaller held-out
        residual wins), ``"pupil"`` or ``"grid"``.
    grid
        K of the measured K x K grid; default: cross-validated from the bead count.
    na, wavelength_um, immersion, pixel_size_um
        Numerical aperture, emission wavelength (µm, vacuum), immersion index and camera pixel size in the
        specimen plane (µm). The pupil model needs all four; the grid stores the pixel size when given.
    psf_size
        PSF side in pixels (odd); default from the widest beads (and the Airy rings when the optics are known).
    device
        Torch device of the pupil fit: ``"auto"`` (CUDA, MPS, CPU), ``"cpu"``, ``"cuda"``, ...
    should_stop, report
        Checked between stages and during the pupil fit (a stop during the pupil fit keeps the grid model; before
        any model exists it raises :class:`CalibrationCancelled`); called with a :class:`CalibrationUpdate` at
        each stage.
    source, min_snr
        Names of the bead files, for the model's provenance; beads whose peak is below ``min_snr`` times the
        background noise are rejected as too faint.
    bead_diameter_nm
        Diameter of the beads (nm; needs ``pixel_size_um``). The beads' own size is removed from the measured
        PSFs (:mod:`~napari_coordgate.calibration.beadsize`); None or 0: point sources are assumed (the result's
        warnings say so).
    target
        ``"beads"``, ``"array"`` (a point array, every site modelled jointly: :func:`_as_array`) or ``"auto"`` (a
        dense point array, pitch under three PSF widths, as an array; anything else as beads).
    holdout
        Fraction (0 to 0.5) of the usable beads kept out of every fit, to check the model later without ground
        truth (``evaluate --holdout-from``); the table's ``holdout`` column marks them.

    Returns :class:`CalibrationResult`.

    Raises
    ------
    CalibrationError
        No beads found, all beads saturated, fewer usable beads than the model needs (the message says how many
        are needed), RGB or >3-D input, NaN/Inf, a constant or empty image, the pupil model without its optics.
    CalibrationCancelled
        ``should_stop()`` returned True before a model was fitted.
    """
    settings = {"model": model, "grid": grid, "na": na, "wavelength_um": wavelength_um, "immersion": immersion,
                "pixel_size_um": pixel_size_um, "psf_size": psf_size, "min_snr": min_snr, "device": device,
                "bead_diameter_nm": bead_diameter_nm, "holdout": holdout, "target": target}
    run = _Run(settings, _check_settings(settings), should_stop, report)
    array = _detect(run, images, psf_size, should_stop, source)
    if array is not None:  # a point array
        return array
    patches = run.hold_out(run.usable_patches())
    train, test = run.split(patches)
    run.fit_grid(train, test)
    run.fit_pupil(train, test)
    return run.result(run.refit(patches), patches, source)


def _check_settings(settings: dict) -> dict | None:
    """The optics as the pupil fit wants them (None when not all given); CalibrationError for bad settings.

    Each setting's type and bounds are :class:`~napari_coordgate.config.CalibrateConfig`'s (their one home); here
    only the rules that tie settings to the run: the pupil model needs all four optics, a bead diameter a pixel
    size."""
    from napari_coordgate.config import CalibrateConfig, ConfigError
    from napari_coordgate.optics.bead import bead_diameter_px

    try:
        cfg = CalibrateConfig.from_calibrate_kwargs(**settings)
    except ConfigError as exc:
        raise CalibrationError(str(exc)) from None
    try:
        bead_diameter_px(cfg.bead_diameter_nm, cfg.pixel_size_um)
    except ValueError as exc:
        raise CalibrationError(str(exc)) from None
    given = {"na": cfg.na, "wavelength": cfg.wavelength_nm, "immersion": cfg.immersion,
             "pixel size": cfg.pixel_size_um}
    missing = [k for k, v in given.items() if v is None]
    if cfg.model == "pupil" and missing:
        raise CalibrationError(f"the pupil model needs the NA, emission wavelength, immersion index and pixel size; "
                               f"missing: {', '.join(missing)} (or use model 'grid', which needs none)")
    if missing:
        return None
    return {"na": float(cfg.na), "wavelength_um": float(settings["wavelength_um"]),
            "refractive_index": float(cfg.immersion), "pixel_size_um": float(cfg.pixel_size_um)}


def _optics_warnings(optics: dict | None, table, chosen: str, residuals: dict) -> list[str]:
    """Optics that contradict the beads: a pixel size far off (beads much wider or narrower than the diffraction
    limit says, or pixels far coarser than Nyquist), and a pupil model that explains held-out beads far worse than
    the measured grid (a wrong pixel size, NA or wavelength shows there first)."""
    out = []
    if optics is not None and table.accepted.any():
        na, lam, px = optics["na"], optics["wavelength_um"], optics["pixel_size_um"]
        ok = table.accepted
        widths = np.sqrt(table.fwhm_x[ok] * table.fwhm_y[ok])  # NaN for spots found beside a neighbour
        measured = float(np.median(widths[np.isfinite(widths)])) if np.isfinite(widths).any() else math.nan
        # the Airy FWHM 0.51 lambda / NA, as a camera pixel (about 1 px wide itself) records it
        expected = math.hypot(0.51 * lam / na / px, 1.0)
        optics_text = f"{px:g} µm pixels, NA {na:g}, {lam * 1000:g} nm"
        if math.isfinite(measured) and not 0.5 <= measured / expected <= 2.0:
            out.append(f"the beads are {measured:.2f} px wide (median FWHM) but the diffraction limit at "
                       f"{optics_text} is {expected:.2f} px: check the pixel size (--pixel-size, metadata) and NA")
        nyquist = lam / (4.0 * na)
        if px > 2.0 * nyquist:
            out.append(f"{px:g} µm pixels under-sample this optics {px / nyquist:.1f}-fold (Nyquist: "
                       f"{nyquist:.3g} µm): a pupil fit has little to go on; is the pixel size right?")
    pupil, grid = residuals.get("pupil"), residuals.get("grid")
    if chosen == "pupil" and pupil is not None and grid is not None and pupil > 3.0 * grid:
        out.append(f"the pupil model explains the held-out beads {pupil / grid:.0f}x worse than the measured grid "
                   f"(residual {pupil:.3g} vs {grid:.3g}): check the pixel size, NA, wavelength and immersion, or "
                   "use the grid (--model grid or auto)")
    return out


class _Run:
    """One calibration, stage by stage (each method one stage of :func:`calibrate`)."""

    def __init__(self, settings: dict, optics: dict | None, should_stop, report):
        self.t0 = time.perf_counter()
        self.settings, self.optics = settings, optics
        self.model, self.grid = settings["model"], settings["grid"]
        self.should_stop, self.report = should_stop, report
        self.warnings: list[str] = []
        self.residuals: dict[str, float | None] = {"grid": None, "pupil": None}
        self.candidates: dict[str, PSFModel] = {}
        self.device = "cpu"
        self.pupil_fit = None
        from napari_coordgate.optics.bead import bead_diameter_px

        self.bead_px = bead_diameter_px(settings["bead_diameter_nm"], settings["pixel_size_um"])
        self.need = max(GRID_MIN_BEADS, math.ceil(self.grid * self.grid / 2) if self.grid else 0)
        if self.model == "pupil":
            self.need = max(self.need, PUPIL_MIN_BEADS)

    def say(self, stage: str, progress: float, message: str) -> None:
        if self.report is not None:
            self.report(CalibrationUpdate(stage, float(progress), message, time.perf_counter() - self.t0))

    def stopped(self) -> bool:
        return self.should_stop is not None and bool(self.should_stop())

    def detect(self, raw: list[np.ndarray], planes: list[np.ndarray]) -> None:
        """Beads in every image; CalibrationError when none, or all saturated."""
        self.shapes = [p.shape for p in planes]
        self.field_shape = planes[0].shape
        tables, self.cleaned, self.noises = [], [], []
        for i, r in enumerate(raw):
            self.say("detect", 0.05 + 0.15 * i / len(raw), f"detecting beads in image {i + 1} of {len(raw)}")
            tab, clean, noise = find_beads(r, image_index=i, min_snr=self.settings["min_snr"])
            tables.append(tab)
            self.cleaned.append(clean)
            self.noises.append(noise)
            if self.stopped():
                raise CalibrationCancelled("calibration stopped during bead detection")
        table = self.table = BeadTable.concat(tables)
        spots = ~np.isin(table.reason, ["hot pixel", "fit failed", "too faint"])
        self.n_spots = int(spots.sum())
        if self.n_spots == 0:
            dense = _dense_array(self.cleaned, table)
            raise (DenseArrayError if dense else CalibrationError)(dense or table.nothing_found(), beads=table,
                                                                  field_shape=self.field_shape)
        self.n_sat = int((table.reason == "saturated").sum())
        if self.n_sat == self.n_spots:
            raise CalibrationError(f"all {self.n_sat} beads are saturated (pixels at the camera's maximum); lower "
                                   "the exposure time or the excitation power and image the slide again",
                                   beads=table, field_shape=self.field_shape)

    def choose_window(self, psf_size: int | None) -> None:
        h, w = self.field_shape
        limit = min(h, w) - 2 * _MARGIN - 3
        # a window per region of the field (a given psf_size: that one everywhere); self.size, the largest, is the
        # side of every bead's arrays
        self.windows = (Windows.one(psf_size) if psf_size is not None
                        else window_sizes(self.table, self.cleaned, limit, self.optics, _MARGIN))
        self.size = size = self.windows.largest()
        if size > limit:
            raise CalibrationError(f"psf_size {size} does not fit in a {h} x {w} frame with its background ring")
        reject_by_window(self.table, self.shapes, self.sizes(), _MARGIN)
        dense = _dense_array(self.cleaned, self.table)
        if dense:  # before any modelling: tens of thousands of touching spots would take long, for nothing
            raise DenseArrayError(dense, beads=self.table, field_shape=self.field_shape)

    def sizes(self, rows: np.ndarray | None = None, core: bool = False) -> np.ndarray:
        """(N,) the window side of table ``rows`` (default all), at the place each sits in; ``core``: the side
        of its light above the noise (:func:`~napari_coordgate.calibration.windows.window_sizes`)."""
        t = self.table
        rows = np.arange(len(t)) if rows is None else rows
        return self.windows.at(t.y_norm[rows], t.x_norm[rows], core=core)

    def usable_patches(self) -> Patches:
        """Registered patches of the accepted beads, their neighbours' light removed, without outliers;
        CalibrationError when too few."""
        table = self.table
        self._enough(np.flatnonzero(table.accepted).size)
        # the first model from the beads without a neighbour within reach, when there are enough of them
        alone = table.accepted & _alone(table, self.sizes(core=True))
        crowded = table.accepted & ~alone
        sweeps = _DEBLEND_SWEEPS
        if crowded.any() and alone.sum() < _MIN_ALONE:
            sweeps = 0
            # the first PSF model comes from beads without neighbours; crowds are measured with its help only
            detail = np.full(len(table), "", dtype=object)
            detail[crowded] = "too crowded: too few beads without neighbours to start the PSF model"
            table.reject(crowded, "too close", detail)
            if alone.sum() < self.need:
                light = int(self.windows.cores.max())
                raise CalibrationError(f"too crowded: {int(alone.sum())} of {int(alone.sum() + crowded.sum())} beads "
                                       f"have no neighbour within reach of their light ({light} px), and "
                                       f"{_MIN_ALONE} are needed to start the PSF model the crowded ones are measured "
                                       "with; image a sparser slide (or give a smaller PSF size)", beads=table,
                                       field_shape=self.field_shape)
        patches = self._patches(np.flatnonzero(alone))
        k0 = self.grid or int(np.clip(round(math.sqrt(len(patches) / 8.0)), 1, 7))
        pre = fit_grid(patches, k0, bead_diameter_px=self.bead_px)
        for sweep in range(sweeps):
            if self.stopped():
                raise CalibrationCancelled("calibration stopped before fitting")
            self.say("deblend", 0.22 + 0.03 * sweep, "removing the neighbours' light from each bead's window")
            sources = self._model_spots(_grid_model(pre, None), find=True)
            rows = np.flatnonzero(self.table.accepted)
            self._enough(rows.size)
            patches = self._patches(rows, self._isolated(rows, sources))
            pre = fit_grid(patches, k0, bead_diameter_px=self.bead_px)
        # outliers (touching pairs, debris): beads that a robust grid through all beads cannot explain
        table = self.table  # spots found beside their neighbours made it longer
        out = pre.outlier_ratio > _OUTLIER_RATIO
        if out.any() and (len(patches) - out.sum()) >= self.need:
            rows = patches.index[out]
            detail = np.full(len(table), "", dtype=object)
            detail[rows] = [f"misfit {r:.0f}x the median" for r in pre.outlier_ratio[out]]
            table.reject(np.isin(np.arange(len(table)), rows), "outlier", detail)
            patches = patches.subset(~out)
        self._enough(len(patches))
        if self.stopped():
            raise CalibrationCancelled("calibration stopped before fitting")
        return patches

    def _enough(self, n: int) -> None:
        """CalibrationError (with the bead table) when fewer than the needed beads are usable."""
        if n >= self.need:
            return
        table = self.table
        counts = ", ".join(f"{v} {k}" for k, v in table.counts().items() if k != "accepted")
        what = ("pupil model" if self.model == "pupil" else f"{self.grid} x {self.grid} grid" if self.grid
                else "measured grid")
        message = (f"the {what} needs at least {self.need} usable beads, found {n}"
                   + (f" (rejected: {counts})" if counts else "")
                   + "; image more beads (a denser slide, or several positions of the slide as a series)")
        dense = _dense_array(self.cleaned, table)
        raise CalibrationError(f"{dense}; {n} usable spots" if dense else message, beads=table,
                               field_shape=self.field_shape)

    def _patches(self, rows: np.ndarray, windows: np.ndarray | None = None) -> Patches:
        """Patches of table ``rows`` (beads without light above their background are rejected)."""
        table = self.table
        patches = extract_patches(self.cleaned, self.noises, table.image[rows], table.y[rows], table.x[rows],
                                  table.y_norm[rows], table.x_norm[rows], rows, self.size, _MARGIN, windows,
                                  self.sizes(rows))
        good = np.isfinite(patches.flux) & (patches.flux > 0) & np.all(np.isfinite(patches.patches), axis=(1, 2))
        if not good.all():
            table.reject(np.isin(np.arange(len(table)), patches.index[~good]), "fit failed",
                         "no light above the local background")
            patches = patches.subset(good)
        return patches

    def _model_spots(self, model: PSFModel, find: bool) -> list:
        """Every spot of each image modelled with ``model`` (:func:`~napari_coordgate.calibration.crowd.model_sources`);
        with ``find``, spots the detection merged with a neighbour are looked for in the residual and added to the
        table (then the window rules run again). The table's centres of accepted beads are refined. Returns the
        :class:`~napari_coordgate.calibration.crowd.Sources` of each image with the table rows they belong to."""
        from scipy.spatial import cKDTree

        from napari_coordgate.calibration.crowd import find_missed, model_sources, psf_fwhm, recentre_on_rest
        from napari_coordgate.optics.bead import blur_by_bead

        out = []
        t = self.table
        if find:  # spots the detection could not fit or judged touching are judged again once modelled
            t.reason[np.isin(t.reason, ["fit failed", "clump", "too close"]) & np.isfinite(t.y)] = ""
        for i, img in enumerate(self.cleaned):
            src_rows, src = self._sources(i, model)
            model_sources(img, self.noises[i], src)
            if find:
                sigma = max(0.7, float(np.nanmedian(psf_fwhm(src.psfs))) / 2.3548 if len(src) else 1.0)
                pad = src.psfs.shape[-1]
                image_model = src.render(img.shape, pad)[pad:-pad, pad:-pad]
                new = find_missed(img, image_model, self.noises[i], sigma,
                                  np.stack([src.y, src.x], axis=1))
                if len(new):
                    self._add_spots(i, new, src, src_rows)
                    src_rows, src = self._sources(i, model)
                    model_sources(img, self.noises[i], src, sweeps=1)
                    fresh = np.flatnonzero(self.table.detail[src_rows] == _FOUND)
                    d, j = cKDTree(np.stack([src.y, src.x], 1)).query(np.stack([src.y[fresh], src.x[fresh]], 1),
                                                                       k=2)
                    recentre_on_rest(img, src, np.unique(j[:, 1]), sigma, 2.5 * sigma)
                    model_sources(img, self.noises[i], src, sweeps=5)
                    if self._drop_artefacts(img, src_rows, src, self.noises[i]):
                        src_rows, src = self._sources(i, model)
                        model_sources(img, self.noises[i], src, sweeps=2)
                for _ in range(_UNNEEDED_ROUNDS):
                    if not self._drop_unneeded(img, src_rows, src, self.noises[i]):
                        break
                    src_rows, src = self._sources(i, model)
                    model_sources(img, self.noises[i], src, sweeps=2)
            self._refine_centres(src_rows, src, img.shape, everyone=find)
            out.append((src_rows, src))
        # the rows again: spots a later image dropped moved every row after them up the table
        out = [(self._source_rows(i), src) for i, (_, src) in enumerate(out)]
        if find:
            t = self.table
            psfs = blur_by_bead(model.psfs_at(t.y_norm, t.x_norm, self.field_shape), self.bead_px)
            self._measure_widths_alone(out)
            reject_by_window(t, self.shapes, self.sizes(), _MARGIN, fwhm=psf_fwhm(psfs))
        return out

    def _sources(self, i: int, model: PSFModel):
        """(table rows, Sources) of every real spot of image ``i``, PSFs from ``model`` as the beads image them."""
        from napari_coordgate.calibration.crowd import Sources
        from napari_coordgate.optics.bead import blur_by_bead

        t = self.table
        rows = self._source_rows(i)
        psfs = np.clip(blur_by_bead(model.psfs_at(t.y_norm[rows], t.x_norm[rows], self.field_shape), self.bead_px),
                       0.0, None)
        side = min(int(self.windows.cores.max()), psfs.shape[-1])
        if side < psfs.shape[-1]:  # a neighbour's light above the noise is what its model must remove; the faint
            lo = (psfs.shape[-1] - side) // 2  # halo beyond only slows every step of the joint fit
            psfs = psfs[:, lo : lo + side, lo : lo + side]
        psfs /= psfs.sum(axis=(1, 2), keepdims=True)
        amp0 = np.nan_to_num(t.peak[rows] / psfs.max(axis=(1, 2)), nan=0.0)
        return rows, Sources(t.y[rows], t.x[rows], psfs, amp0)

    def _source_rows(self, i: int) -> np.ndarray:
        """The table rows of image ``i``'s real spots (all but hot pixels), in table order."""
        t = self.table
        return np.flatnonzero((t.image == i) & (t.reason != "hot pixel") & np.isfinite(t.y) & np.isfinite(t.x))

    def _add_spots(self, i: int, yx: np.ndarray, src, src_rows) -> None:
        """Rows for spots found in the residual of image ``i`` (accepted unless a rule rejects them later)."""
        from napari_coordgate.calibration.detect import empty_table
        from napari_coordgate.coords import field_position

        new = empty_table(len(yx), i)
        h, w = self.shapes[i]
        new.y, new.x = yx[:, 0].astype(float), yx[:, 1].astype(float)
        new.y_norm, new.x_norm = field_position(new.y, h), field_position(new.x, w)
        new.detail[:] = _FOUND
        img = self.cleaned[i]
        new.background = np.full(len(yx), float(np.median(src.offset)) if len(src) else 0.0)
        new.peak = img[yx[:, 0], yx[:, 1]] - new.background
        new.snr = new.peak / self.noises[i]
        new.reject(new.snr < self.settings["min_snr"], "too faint", "below the SNR threshold")
        self.table = BeadTable.concat([self.table, new])

    def _drop_artefacts(self, img: np.ndarray, rows: np.ndarray, src, noise: float) -> bool:
        """Remove spots found in the residual that the joint fit does not confirm: too faint once fitted, a
        fraction of a brighter neighbour closer than its FWHM, or not shaped like the PSF (the model a little
        off around a bead, not a bead). True when any was removed."""
        from scipy.spatial import cKDTree

        from napari_coordgate.calibration.crowd import likeness, psf_fwhm

        t = self.table
        fresh = t.detail[rows] == _FOUND
        if not fresh.any() or len(src) < 2:
            return False
        peak = src.amplitude * src.psfs.max(axis=(1, 2))
        d, j = cKDTree(np.stack([src.y, src.x], 1)).query(np.stack([src.y, src.x], 1), k=2)
        d, j = d[:, 1], j[:, 1]
        shadow = (d < psf_fwhm(src.psfs)) & (src.amplitude < 0.5 * src.amplitude[j])
        unlike = np.zeros(len(src), bool)
        which = np.flatnonzero(fresh)
        unlike[which] = likeness(img, src, which, 1.5 * float(np.median(psf_fwhm(src.psfs[which])))) < _LIKENESS
        drop = fresh & ((peak < self.settings["min_snr"] * noise) | shadow | unlike)
        if not drop.any():
            return False
        keep = np.ones(len(t), bool)
        keep[rows[drop]] = False
        self.table = t.take(keep)
        return True

    def _measure_widths_alone(self, modelled: list) -> None:
        """Spots whose detection fit was too wide for the window (``"too large"`` to come) but that look like
        their PSF once their neighbours' light is removed (:func:`~napari_coordgate.calibration.crowd.likeness`)
        were several beads fitted as one: their width becomes their modelled PSF's. Debris stays too large."""
        from napari_coordgate.calibration.crowd import likeness, psf_fwhm

        t = self.table
        for i, (rows, src) in enumerate(modelled):
            wide = np.flatnonzero(np.nan_to_num(np.maximum(t.fwhm_x[rows], t.fwhm_y[rows])) > self.sizes(rows) / 2.0)
            if wide.size == 0:
                continue
            fw = psf_fwhm(src.psfs[wide])
            alone = likeness(self.cleaned[i], src, wide, 1.5 * float(np.median(fw))) >= _LIKENESS
            t.fwhm_x[rows[wide[alone]]] = t.fwhm_y[rows[wide[alone]]] = fw[alone]

    def _drop_unneeded(self, img: np.ndarray, rows: np.ndarray, src, noise: float) -> bool:
        """Remove spots closer than a PSF width to another that the joint fit does not need (the others explain
        their light: :func:`~napari_coordgate.calibration.crowd.evidence` below :data:`_EVIDENCE`): what the
        detection found between two beads it first saw as one. Of two such neighbours only the less needed goes
        in a round. True when any was removed."""
        from scipy.spatial import cKDTree

        from napari_coordgate.calibration.crowd import evidence, psf_fwhm

        if len(src) < 2:
            return False
        d, j = cKDTree(np.stack([src.y, src.x], 1)).query(np.stack([src.y, src.x], 1), k=2)
        close = np.flatnonzero(d[:, 1] < psf_fwhm(src.psfs))
        if close.size == 0:
            return False
        ev = np.full(len(src), np.inf)
        ev[close] = evidence(img, noise, src, close)
        weak = (ev < _EVIDENCE) & ~((ev[j[:, 1]] < ev) | ((ev[j[:, 1]] == ev) & (j[:, 1] < np.arange(len(src)))))
        if not weak.any():
            return False
        keep = np.ones(len(self.table), bool)
        keep[rows[weak]] = False
        self.table = self.table.take(keep)
        return True

    def _refine_centres(self, rows: np.ndarray, src, shape, everyone: bool = False) -> None:
        """The modelled centres of accepted beads (``everyone``: of all spots) into the table (moves of more than
        1.5 px are not trusted, except for spots found in the residual); spots the model gives no light are
        rejected as not fitted."""
        from napari_coordgate.coords import field_position

        t = self.table
        dark = np.zeros(len(t), bool)
        dark[rows[~(src.amplitude > 0)]] = True
        t.reject(dark, "fit failed", "no light left once its neighbours were modelled")
        acc = t.accepted[rows] | everyone
        r = rows[acc]
        y, x = src.y[acc], src.x[acc]
        fresh = ~np.isfinite(t.fwhm_x[r])  # found in the residual: no centre of their own yet
        near = (np.hypot(y - t.y[r], x - t.x[r]) < 1.5) | fresh
        t.y[r] = np.where(near, y, t.y[r])
        t.x[r] = np.where(near, x, t.x[r])
        t.y_norm[r], t.x_norm[r] = field_position(t.y[r], shape[0]), field_position(t.x[r], shape[1])
        amp_peak = src.amplitude[acc] * src.psfs[acc].max(axis=(1, 2))
        t.peak[r] = np.where(fresh, amp_peak, t.peak[r])

    def _isolated(self, rows: np.ndarray, sources: list) -> np.ndarray:
        """Windows of the beads ``rows`` with every other spot's modelled light removed."""
        from napari_coordgate.calibration.crowd import isolate_windows

        size = self.size + 2 * _MARGIN
        windows = np.empty((rows.size, size, size))
        for i, (src_rows, src) in enumerate(sources):
            mine = np.flatnonzero(self.table.image[rows] == i)
            if mine.size == 0:
                continue
            where = np.searchsorted(src_rows, rows[mine])
            t = self.table
            src.iy[where], src.ix[where] = np.round(t.y[rows[mine]]).astype(int), np.round(t.x[rows[mine]]).astype(int)
            src.shift[where] = np.stack([t.y[rows[mine]] - src.iy[where], t.x[rows[mine]] - src.ix[where]], 1)
            windows[mine] = isolate_windows(self.cleaned[i], src, where, size, self.noises[i])
        return windows

    def hold_out(self, patches: Patches) -> Patches:
        """Without the ``holdout`` fraction of the beads (a seeded random choice, marked in the table's
        ``holdout`` column), kept out of every fit to check the model later; never below the beads it needs."""
        frac = float(self.settings["holdout"] or 0.0)
        n = len(patches)
        k = min(int(round(frac * n)), n - self.need)
        if frac <= 0 or k <= 0:
            if frac > 0:
                self.warnings.append(f"no beads held out: the {n} usable beads are all needed for the fit")
            return patches
        held = np.zeros(n, bool)
        held[np.random.default_rng(0).permutation(n)[:k]] = True
        self.table.holdout[patches.index[held]] = True
        return patches.subset(~held)

    def split(self, patches: Patches) -> tuple[Patches, Patches]:
        """Every 5th bead held out to compare the models."""
        n = len(patches)
        held = (np.arange(n) % _HOLD_OUT) == _HOLD_OUT - 1
        if held.sum() == 0:
            held[-1] = True
        self.table.held_out[patches.index[held]] = True
        return patches.subset(~held), patches.subset(held)

    def fit_grid(self, train: Patches, test: Patches) -> None:
        self.say("grid", 0.3, f"fitting the measured grid to {len(train)} beads")
        self.grid_fit, grid_model, self.lam = _fit_grid_model(train, self.grid, self.settings["pixel_size_um"],
                                                              self.bead_px)
        self.residuals["grid"] = _score(grid_model, test, self.field_shape, self.bead_px)[0]
        self.candidates["grid"] = grid_model

    def fit_pupil(self, train: Patches, test: Patches) -> None:
        n = len(train) + len(test)
        if not (self.model == "pupil" or (self.model == "auto" and self.optics is not None)):
            return
        if n < PUPIL_MIN_BEADS:
            self.warnings.append(f"only {n} usable beads: the pupil model needs at least {PUPIL_MIN_BEADS}, so "
                                 "only the measured grid was fitted")
            return
        from napari_coordgate.calibration.pupilfit import fit_pupil_poly
        from napari_coordgate.optics.blur import resolve_device

        dev = resolve_device(self.settings["device"])
        self.device = str(dev)
        self.say("pupil", 0.4, f"fitting the pupil model to {len(train)} beads")
        fit = fit_pupil_poly(self._pupil_data(train), train.y_norm, train.x_norm, train.shift, train.noise,
                             **self.optics, grid=7, device=dev, node_psfs=self.grid_fit.psfs,
                             should_stop=self.should_stop, bead_diameter_px=self.bead_px,
                             on_iteration=lambda d, t, loss: self.say("pupil", 0.4 + 0.4 * d / max(t, 1),
                                                                      f"pupil fit: iteration {d} of {t}, "
                                                                      f"loss {loss:.4g}"))
        if fit.stopped:
            if self.model == "pupil":
                raise CalibrationCancelled("calibration stopped during the pupil fit")
            self.warnings.append("stopped during the pupil fit: the measured grid is used")
            return
        self.pupil_fit = fit
        self.residuals["pupil"] = _score(fit.model, test, self.field_shape, self.bead_px)[0]
        self.candidates["pupil"] = fit.model

    def _pupil_data(self, patches: Patches) -> np.ndarray:
        """The beads' squares the pupil fit reads: each bead's light above its noise (its region's core), NaN beyond;
        the model carries its own halo (:func:`~napari_coordgate.calibration.pupilfit.extent`), and the faint wings
        that the grid's windows hold would only slow it."""
        return patches.core_within(self.windows.at(patches.y_norm, patches.x_norm, core=True))

    def refit(self, patches: Patches) -> PSFModel:
        """The chosen model refitted on all beads; per-bead residuals into the table."""
        if self.pupil_fit is None or self.model == "grid":
            self.chosen = "grid"
        elif self.model == "pupil" or self.residuals["pupil"] < self.residuals["grid"]:
            self.chosen = "pupil"
        else:
            self.chosen = "grid"
        self.say("refit", 0.85, f"refitting the {self.chosen} model on all {len(patches)} beads")
        if self.chosen == "grid":
            self.grid_fit = fit_grid(patches, self.grid_fit.k, self.lam, bead_diameter_px=self.bead_px)
            final: PSFModel = _grid_model(self.grid_fit, self.settings["pixel_size_um"])
        else:
            from napari_coordgate.calibration.pupilfit import fit_pupil_poly

            refit = fit_pupil_poly(self._pupil_data(patches), patches.y_norm, patches.x_norm, patches.shift,
                                   patches.noise, **self.optics, grid=7, device=self.device,
                                   init=self.pupil_fit.model.coefficients, max_iterations=0, polish_iterations=8,
                                   bead_diameter_px=self.bead_px,
                                   should_stop=self.should_stop,
                                   on_iteration=lambda d, t, _loss: self.say(
                                       "refit", 0.85 + 0.1 * d / max(t, 1), f"pupil refit: iteration {d} of {t}"))
            final = refit.model
            if refit.stopped:
                self.warnings.append("stopped during the final pupil refit: its coefficients so far are used")
        _, fit_all = _score(final, patches, self.field_shape, self.bead_px)
        self.table.residual[patches.index] = fit_all["relative"]
        return final

    def result(self, final: PSFModel, patches: Patches, source) -> CalibrationResult:
        n, table = len(patches), self.table
        self.warnings.extend(_coverage_warnings(table, self.field_shape)[0])
        fit = self.grid_fit
        if self.chosen == "grid" and fit.filled.any():
            nodes = ", ".join(f"({i}, {j})" for i, j in zip(*np.nonzero(fit.filled)))
            self.warnings.append(f"{int(fit.filled.sum())} of {fit.k * fit.k} grid nodes had too few beads nearby "
                                 f"and were filled from their neighbours (row, column): {nodes}")
        if self.n_sat > 0.2 * self.n_spots:
            self.warnings.append(f"{self.n_sat} of {self.n_spots} beads are saturated: lower the exposure to use "
                                 "them")
        n_close = int((table.reason == "too close").sum())
        if n_close > 0.3 * self.n_spots:
            self.warnings.append(f"{n_close} of {self.n_spots} beads are too close to a neighbour: a sparser slide "
                                 "would use more")
        if not self.bead_px:
            self.warnings.append("no bead diameter given: the beads were taken for point sources; beads wider than "
                                 "about a third of the PSF make it look broader (give the bead diameter)")
        if n < 30:
            self.warnings.append(f"only {n} beads were usable: the model is noisy; a few hundred beads over the "
                                 "field are better")
        self.warnings.extend(_optics_warnings(self.optics, table, self.chosen, self.residuals))
        final = _with_provenance(final, self._provenance(n, source))
        self.candidates[self.chosen] = final
        self.say("done", 1.0, "calibration done")
        return CalibrationResult(final, self.chosen, self.residuals, table, self.warnings, self.candidates,
                                 tuple(self.field_shape), self.size, [float(v) for v in self.noises], fit,
                                 self.settings, time.perf_counter() - self.t0, self.device)

    def _provenance(self, n: int, source) -> dict:
        prov = {
            "source": [str(s) for s in ([source] if isinstance(source, (str, Path)) else (source or []))],
            "date": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
            "bead_count": n,
            "images": len(self.shapes),
            "field_shape": list(self.field_shape),
            "fit_residual": self.residuals[self.chosen],
            "held_out_residuals": {k: v for k, v in self.residuals.items() if v is not None},
            "chosen_model": self.chosen,
            "psf_size": self.size,
            # the window side of each region of the field (rows of a 3 x 3 partition), its light above the noise, and
            # the windows grown at the four corners of the field
            **self.windows.provenance(),
            "bead_diameter_px": self.bead_px,
            "holdout_beads": int(self.table.holdout.sum()),
        }
        from napari_coordgate._version import __version__

        prov["napari_coordgate"] = __version__
        return prov


def _detect(run: "_Run", images, psf_size, should_stop, source) -> CalibrationResult | None:
    """Detect the beads and choose the window; or, for target ``"array"`` (or ``"auto"`` and a dense array), the
    point-array calibration's result."""
    raw, planes = _check_images(images)
    target = run.settings["target"]
    if target == "array":
        return _as_array(planes, run.settings, should_stop, source)
    try:
        run.detect(raw, planes)
        run.choose_window(psf_size)
    except DenseArrayError:
        if target != "auto":
            raise
        return _as_array(planes, run.settings, should_stop, source)
    return None


class DenseArrayError(CalibrationError):
    """The bead image is a dense point array (target ``"auto"`` measures it as one)."""


def _as_array(planes: list[np.ndarray], settings: dict, should_stop, source) -> CalibrationResult:
    """The point-array calibration of the first image (pinholes, nanoholes, a scanned spot array: every lattice
    site modelled jointly, :func:`~napari_coordgate.calibration.arrays.array_calibration`; a measured grid of
    K = ``grid`` or 5); what it does not take is refused."""
    from napari_coordgate.calibration.arrays import array_calibration

    given = [name for name, off in (("model pupil", settings["model"] == "pupil"),
                                    ("bead diameter", bool(settings["bead_diameter_nm"])),
                                    ("holdout", bool(settings["holdout"]))) if off]
    if given:
        raise CalibrationError(f"a point array is measured as a PSF grid of its sites; {', '.join(given)} do not apply "
                               "to it: leave them out")
    return array_calibration(planes[0], settings, should_stop=should_stop, source=source)


def _dense_array(images: list[np.ndarray], table: BeadTable) -> str | None:
    """A sentence when the image is a dense point array (its local maxima on a lattice whose pitch is under three
    PSF widths, or any lattice when no bead could be measured), else None: such spots are modelled one neighbour
    at a time, which does not hold for touching spots, and their crowd hides the noise from the detection."""
    from scipy import ndimage
    from skimage.feature import peak_local_max

    from napari_coordgate.calibration.lattice import fit_lattice

    sm = ndimage.gaussian_filter(images[0], 1.0)
    lo, hi = np.percentile(sm, [1, 99.9])
    pk = peak_local_max(sm, min_distance=2, threshold_abs=lo + 0.2 * (hi - lo), exclude_border=False)
    lattice = fit_lattice(pk[:, 0], pk[:, 1])
    if lattice is None or lattice.explained < 0.6:
        return None
    ok = table.accepted
    widths = np.sqrt(table.fwhm_x[ok] * table.fwhm_y[ok])
    fwhm = float(np.median(widths[np.isfinite(widths)])) if np.isfinite(widths).any() else None
    if fwhm is not None and lattice.pitch > 3.0 * fwhm:
        return None
    width = f", {lattice.pitch / fwhm:.1f} PSF widths" if fwhm else ""
    return (f"the spots sit on a lattice of pitch {lattice.pitch:.1f} px{width}: a dense point array, whose spots "
            "cannot be measured as beads (their neighbours modelled one at a time are not reliable this close); "
            "calibrate it as an array (target 'array', --target array), or image scattered beads")


def _alone(table: BeadTable, psf_size) -> np.ndarray:
    """Rows without another real spot of their image within their PSF window (``psf_size``: one side for all, or
    (N,) one per row) and a neighbour's core."""
    from scipy.spatial import cKDTree

    out = np.ones(len(table), bool)
    real = (table.reason != "hot pixel") & np.isfinite(table.y)
    reach = np.asarray(psf_size) / 2.0 + 2.0 * float(np.nanmedian(np.fmax(table.fwhm_x, table.fwhm_y)[real]))
    reach = np.broadcast_to(reach, (len(table),))
    for i in np.unique(table.image):
        idx = np.flatnonzero((table.image == i) & real)
        if idx.size > 1:
            pts = np.stack([table.y[idx], table.x[idx]], axis=1)
            d, _ = cKDTree(pts).query(pts, k=2)
            out[idx] = d[:, 1] >= reach[idx]
    return out


def _fit_grid_model(train: Patches, grid: int | None, pixel_size_um, bead_px: float = 0.0
                    ) -> tuple[GridFit, MeasuredGridPSF, float]:
    n = len(train)
    if grid is None:
        kmax = int(np.clip(math.floor(math.sqrt(n / 3.0)) + 1, 1, 15))
        ks = list(range(1, kmax + 1))
    else:
        ks = [int(grid)]
    k, lam, scores = choose_grid(train, ks)
    fit = fit_grid(train, k, lam, bead_diameter_px=bead_px)
    fit.cv_scores = {f"{kk}/{ll:g}": v for (kk, ll), v in scores.items()}
    return fit, _grid_model(fit, pixel_size_um), lam


def _grid_model(fit: GridFit, pixel_size_um) -> MeasuredGridPSF:
    return MeasuredGridPSF(fit.psfs, filled=fit.filled, pixel_size_um=pixel_size_um, name="measured",
                           blur_grid=fit.k, supports=fit.supports)


def _with_provenance(model: PSFModel, prov: dict) -> PSFModel:
    name = "measured from " + ", ".join(Path(s).name for s in prov["source"]) if prov["source"] else model.name
    if isinstance(model, MeasuredGridPSF):
        return MeasuredGridPSF(model.node_psfs, filled=model.filled, pixel_size_um=model.pixel_size_um, name=name,
                               provenance=prov, blur_grid=model.grid, supports=model.supports)
    from napari_coordgate.optics.pupil_poly import PupilPolyPSF

    assert isinstance(model, PupilPolyPSF)
    return PupilPolyPSF(model.coefficients, **model.optics, psf_size=model.psf_size, oversample=model.oversample,
                        grid=model.grid, name=name if prov["source"] else "pupil fit", provenance=prov)
