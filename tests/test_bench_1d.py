"""The 1-D benchmark (paper section IV.1) runs in its --quick mode and prints its table (no numeric asserts)."""

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parents[1] / "benchmarks" / "bench_1d.py"
MODELS = (
    "CNN(1,7,1)",
    "CNN(3,7,4)",
    "CNN(4,7,4)",
    "CNN(8,7,4)",
    "CNN(4,7,20)",
    "CoordConv CNN(4,7,4)",
    "CoordGate(1,7,3)",
    "CoordGate(1,7,3), random gate input",
)


def test_bench_1d_quick_mode_prints_header_and_every_model_row():
    result = subprocess.run([sys.executable, str(BENCH), "--quick"], capture_output=True, text=True, timeout=300)

    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    header = next((ln for ln in lines if ln.startswith("| model |")), None)
    assert header is not None, result.stdout[-2000:]
    for column in ("params", "PSNR (dB) length 30", "PSNR (dB) length 128", "epochs", "inference µs/sample"):
        assert column in header
    rows = {ln.split("|")[1].strip() for ln in lines[lines.index(header) + 2:] if ln.startswith("| ")}
    assert set(MODELS) <= rows
    assert all(len(ln.split("|")) == 8 for ln in lines if ln.startswith("| ") and ln.split("|")[1].strip() in MODELS)
