"""What to change when beads are rejected: one line per rejection reason, with the count and the remedy.

The reasons are the keys of :data:`napari_coordgate.calibration.detect.REASONS` (what each means); this module says
what a user can do about each (slide, exposure, sampling, or a calibrate option). A reason it has no advice for
(a key added to the detector later) still gets a line, from its meaning in ``REASONS``. Shown in the Calibrate tab,
the report figure and the JSON report, successful or not. Plain Python: no numpy.
"""

from __future__ import annotations

from typing import Mapping

from .detect import REASONS

__all__ = ["ADVICE", "advice_lines", "advice_line"]

#: per reason: (how one spot is described, how several are, what to change)
ADVICE: dict[str, tuple[str, str, str]] = {
    "hot pixel": (
        "spot taken for a hot pixel", "spots taken for hot pixels",
        "single-pixel spikes; if these are your beads, they are undersampled: image at a finer pixel size (more "
        "magnification, less binning) so that a bead covers a few pixels; camera defects and cosmic rays need "
        "nothing"),
    "saturated": (
        "bead saturated", "beads saturated",
        "pixels at the camera's maximum clip the PSF: lower the exposure time or the excitation power"),
    "edge": (
        "bead too close to the frame edge", "beads too close to the frame edge",
        "the PSF window does not fit in the image there: more slide positions put beads inside the frame near its "
        "border, and a smaller window (--psf-size) keeps beads nearer the edge"),
    "too close": (
        "bead too close to a neighbour", "beads too close to a neighbour",
        "a saturated or oversized spot's light reaches into the window: a sparser slide (dilute the beads), a lower "
        "exposure for the saturated ones, or several positions of the slide as a series of images"),
    "clump": (
        "bead in a clump", "beads in clumps",
        "touching beads that cannot be told apart: disperse the beads better (vortex or sonicate the suspension, "
        "dilute it), or image several positions of the slide as a series"),
    "too faint": (
        "spot too faint", "spots too faint",
        "peak below --min-snr times the noise: a longer exposure or more excitation (below saturation), or a lower "
        "--min-snr (noisier PSFs)"),
    "fit failed": (
        "spot not bead-like (fit failed)", "spots not bead-like (fit failed)",
        "no compact spot was found there: check the focus and that the slide holds sub-resolution beads; debris, "
        "out-of-focus blobs and background structure end here"),
    "too large": (
        "spot too large for the PSF window", "spots too large for the PSF window",
        "aggregates or debris, or single beads whose PSF is wider than the window: then a larger --psf-size; "
        "otherwise a cleaner, well-dispersed slide"),
    "outlier": (
        "bead unlike its neighbours (outlier)", "beads unlike their neighbours (outliers)",
        "touching pairs, debris or a bead out of the focal plane; a few need nothing, many mean the PSF changes "
        "faster than the grid follows: more beads, or a finer --grid"),
}


def advice_line(reason: str, n: int) -> str:
    """One line for ``n`` spots rejected for ``reason``: the count, what they are and what to change."""
    if reason in ADVICE:
        one, many, what = ADVICE[reason]
        return f"{n} {one if n == 1 else many}: {what}"
    meaning = REASONS.get(reason, "see the 'detail' column of the bead table")
    return f"{n} {'spot' if n == 1 else 'spots'} rejected as '{reason}': {meaning}"


def advice_lines(counts: Mapping[str, int]) -> list[str]:
    """A line per rejection reason in ``counts`` (a :meth:`~napari_coordgate.calibration.detect.BeadTable.counts`
    dict; ``"accepted"`` and zero counts are skipped), most frequent first."""
    rejected = [(k, int(n)) for k, n in counts.items() if k != "accepted" and n]
    return [advice_line(k, n) for k, n in sorted(rejected, key=lambda kn: -kn[1])]
