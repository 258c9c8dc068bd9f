"""What to change for each rejection reason: one line per reason with its count, for every reason the detector
has, and a line from its meaning for a reason added later."""

from napari_coordgate.calibration.advice import ADVICE, advice_line, advice_lines
from napari_coordgate.calibration.detect import REASONS


def test_every_detector_reason_has_its_own_advice():
    assert set(ADVICE) == set(REASONS)


def test_one_line_per_rejection_reason_most_frequent_first_without_accepted_or_zero_counts():
    lines = advice_lines({"accepted": 2, "hot pixel": 33, "edge": 1, "too close": 28, "fit failed": 0})
    assert [line.split(":")[0] for line in lines] == ["33 spots taken for hot pixels", "28 beads too close to a "
                                                      "neighbour", "1 bead too close to the frame edge"]


def test_the_advice_says_what_to_change():
    assert "finer pixel size" in advice_line("hot pixel", 33)
    assert "sparser slide" in advice_line("too close", 28) and "several positions" in advice_line("too close", 28)
    assert "exposure" in advice_line("saturated", 1)
    assert "--min-snr" in advice_line("too faint", 4) and "--psf-size" in advice_line("too large", 3)


def test_an_unknown_reason_gets_a_generic_line_with_its_count():
    assert advice_line("smudged", 3) == "3 spots rejected as 'smudged': see the 'detail' column of the bead table"
