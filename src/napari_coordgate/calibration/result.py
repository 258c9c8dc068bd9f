"""What :func:`~napari_coordgate.calibration.calibrate.calibrate` returns, its progress messages, and the JSON
report of a calibration that failed with its bead table."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_coordgate.calibration.advice import advice_lines
from napari_coordgate.calibration.detect import REASONS, BeadTable
from napari_coordgate.calibration.grid import GridFit
from napari_coordgate.optics.psfmodel import PSFModel
from napari_coordgate.optics.pupil_poly import MONOMIALS

if TYPE_CHECKING:  # pragma: no cover
    from napari_coordgate.calibration import CalibrationError

__all__ = ["CalibrationResult", "CalibrationUpdate", "failure_dict", "failure_json"]


@dataclass(frozen=True)
class CalibrationUpdate:
    """One progress message (small and picklable): stage, overall fraction done, a line for people."""

    stage: str  # "detect", "grid", "pupil", "refit", "done"
    progress: float
    message: str
    elapsed: float


@dataclass
class CalibrationResult:
    """What :func:`calibrate` found.

    Attributes
    ----------
    model
        The chosen PSF model (``measured_grid`` or ``pupil_poly``), with provenance.
    chosen
        ``"grid"`` or ``"pupil"``.
    residuals
        Held-out residual of each candidate (``"grid"``, ``"pupil"``; None when not fitted): the mean squared
        misfit per pixel of the held-out beads over their noise variance, after fitting each bead's amplitude,
        offset and sub-pixel shift (1 for a perfect model with pure background noise; shot noise adds to it).
    beads
        Every detected spot, accepted or rejected with the reason (:class:`BeadTable`).
    warnings
        What the user should know (thin coverage, filled grid nodes, many rejections, ...).
    candidates
        Both fitted models by name (the chosen one refitted on all beads).
    """

    model: PSFModel
    chosen: str
    residuals: dict[str, float | None]
    beads: BeadTable
    warnings: list[str]
    candidates: dict[str, PSFModel]
    field_shape: tuple[int, int]
    psf_size: int
    noise: list[float]
    grid_fit: GridFit | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    device: str = "cpu"

    @property
    def n_beads(self) -> int:
        """Beads the model was fitted to: accepted, and not held out to check it (``holdout``)."""
        return int((self.beads.accepted & ~self.beads.holdout).sum())

    def summary(self) -> str:
        """One line: bead count, chosen model and its held-out residual."""
        res = self.residuals.get(self.chosen)
        other = [f"{k} {v:.3g}" for k, v in self.residuals.items() if v is not None and k != self.chosen]
        vs = f" (vs {', '.join(other)})" if other else ""
        return (f"{self.n_beads} beads used of {len(self.beads)} spots; model {self.chosen} "
                f"({self.model.kind}, {self.model.psf_size} px PSFs), held-out residual {res:.3g}{vs}")

    def to_dict(self) -> dict[str, Any]:
        """Everything but the PSF arrays, JSON-able."""
        meta, _ = self.model.to_record()
        out = {
            "summary": self.summary(),
            "chosen": self.chosen,
            "model": {"kind": self.model.kind, "description": self.model.describe(), "record": meta},
            "residuals": self.residuals,
            "counts": self.beads.counts(),
            "field_shape": list(self.field_shape),
            "psf_size": self.psf_size,
            "noise": self.noise,
            "warnings": list(self.warnings),
            "settings": self.settings,
            "seconds": round(self.seconds, 2),
            "device": self.device,
            "provenance": self.model.provenance,
            "rejection_reasons": {k: v for k, v in REASONS.items()},
            "advice": advice_lines(self.beads.counts()),
            "beads": self.beads.to_dict(),
        }
        if self.grid_fit is not None:
            out["grid"] = {"k": self.grid_fit.k, "lambda": self.grid_fit.lam,
                           "node_beads": np.round(self.grid_fit.node_weight, 2).tolist(),
                           "filled": self.grid_fit.filled.tolist()}
        if self.model.kind == "pupil_poly":
            out["model"]["coefficients"] = np.round(self.model.coefficients, 5).tolist()  # type: ignore[attr-defined]
            out["model"]["terms"] = list(self.model.terms)  # type: ignore[attr-defined]
            out["model"]["monomials"] = list(MONOMIALS[: self.model.coefficients.shape[1]])  # type: ignore
        return out

    def to_json(self, indent: int | None = 2) -> str:
        """:meth:`to_dict` as JSON text."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False, default=_json_default)

    def report_png(self, path: "str | Path") -> Path:
        """Write the report figure (FWHM, ellipticity and orientation maps, measured vs model PSFs at the grid
        nodes, residual per bead, beads per region, warnings) as PNG; returns the path."""
        from napari_coordgate.calibration.report import write_report_png

        return write_report_png(self, path)


def failure_dict(error: "CalibrationError", settings: dict | None = None) -> dict[str, Any]:
    """The JSON report of a failed calibration: its message, and, when it got as far as detecting spots, the
    counts, what to change and the bead table (``beads``, the columns of :class:`BeadTable`, ``holdout``
    included) as in :meth:`CalibrationResult.to_dict`. ``settings``: what it was run with, recorded as given."""
    table = error.beads
    out: dict[str, Any] = {"failed": True, "error": str(error), "settings": dict(settings or {}),
                           "field_shape": None if error.field_shape is None else list(error.field_shape)}
    if table is not None:
        out.update(counts=table.counts(), rejection_reasons=dict(REASONS), advice=advice_lines(table.counts()),
                   beads=table.to_dict())
    return out


def failure_json(error: "CalibrationError", settings: dict | None = None, indent: int | None = 2) -> str:
    """:func:`failure_dict` as JSON text."""
    return json.dumps(failure_dict(error, settings), indent=indent, allow_nan=False, default=_json_default)


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")
