"""Every benchmark script runs in its --quick mode and prints a table (no timing asserts)."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[1] / "benchmarks"


@pytest.mark.parametrize("script, expect", [
    ("bench_engine.py", "MP/s"),
    ("bench_recipe.py", "SV-RL"),
    ("bench_optics.py", "K = 7"),
    ("bench_threads.py", "s/step"),
    ("bench_sweep.py", "CoordGate U-Net(2)"),
])
def test_benchmark_quick_mode_prints_its_table(script, expect):
    result = subprocess.run([sys.executable, str(BENCH / script), "--quick"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert expect in result.stdout
    rows = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(rows) >= 3, result.stdout  # a header and at least two rows
