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
    ("bench_process.py", "separate process"),
    ("bench_bioimageio_tiles.py", "off the pooling grid"),
    ("bench_memory.py", "peak host RSS above baseline"),
    ("bench_camera.py", "| fixed | 3000 | 500 | uint16 |"),
    ("bench_adapt.py", "adapted - PSF only, edge ring"),
    ("bench_blur3d.py", "forward s/vol"),
    ("bench_3d.py", "3-D CoordGate minus"),
    ("bench_apply3d.py", "peak host RSS above baseline"),
    ("bench_calibrate3d.py", "best-focus error"),
    ("bench_arrays.py", "pitch/FWHM"),
    ("bench_sample_model.py", "the sample pair"),
])
def test_benchmark_quick_mode_prints_its_table(script, expect):
    result = subprocess.run([sys.executable, str(BENCH / script), "--quick"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert expect in result.stdout
    rows = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(rows) >= 3, result.stdout  # a header and at least two rows


def test_3d_benchmark_quick_mode_trains_a_coordgate_from_a_bead_zstack_calibration_beside_the_true_model():
    result = subprocess.run([sys.executable, str(BENCH / "bench_3d.py"), "--quick", "--rows", "coordgate",
                             "--calibrated", "30", "--bead-diameter", "200"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows: dict[str, str] = {}
    for line in result.stdout.splitlines():  # the first table's row of each name (the depth table's come later)
        rows.setdefault(line.split("  ")[0].strip(), line)
    assert "3-D CoordGate" in rows and "3-D CoordGate, 30-bead cal." in rows, result.stdout
    assert "beads used" in rows["3-D CoordGate, 30-bead cal."], result.stdout
    assert "3-D CoordGate minus: 3-D CoordGate, 30-bead cal." in result.stdout


def test_gpu_benchmark_quick_mode_runs_on_the_cpu_and_prints_both_tables():
    result = subprocess.run([sys.executable, str(BENCH / "bench_gpu.py"), "--quick"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "## Training" in out and "## Inference" in out and "torch thread" in out, out
    rows = [line.split() for line in out.splitlines() if line.startswith("U-Net(2)")]
    train_rows = [r for r in rows if r[2].isdigit()]  # model (2 words), batch, precision, steps/s, ...
    infer_rows = [r for r in rows if not r[2].isdigit()]
    assert len(train_rows) == 8 and len(infer_rows) == 12, out
    # batching tiles changes nothing beyond float rounding: the fp32 rows' max|d| (second-last column)
    assert all(float(r[-2]) <= 1e-5 for r in infer_rows if r[2] == "fp32"), out


def test_cpu_inference_levers_quick_mode_prints_each_lever_against_fp32():
    result = subprocess.run([sys.executable, str(BENCH / "bench_engine.py"), "--levers", "--quick"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    levers, quality = result.stdout.split("## bf16 vs fp32")
    rows = [line for line in levers.splitlines() if line[:1].isalnum() and "MP/s" not in line]
    assert [r.split("  ")[0] for r in rows] == ["fp32, default tiles", "bf16 feature maps", "4 tiles batched",
                                                 "bf16 + 4 tiles batched"], result.stdout
    # each held-out field: bf16 within 0.05 dB of fp32 (issue 15), and the model beats its input
    fields = [line.split() for line in quality.splitlines() if line[:1].isdigit()]
    assert len(fields) == 3, result.stdout
    for _, blurred, fp32, _, diff in fields:
        assert abs(float(diff)) <= 0.05 and float(fp32) > float(blurred), result.stdout


def test_calibration_benchmark_trains_from_the_measured_and_the_true_psf_model_in_quick_mode():
    result = subprocess.run([sys.executable, str(BENCH / "bench_calibrate.py"), "--train", "--quick"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "measured PSNR (edge)" in out and "true PSNR (edge)" in out, out
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith(("| pupil", "| moffat"))]
    # per optics: the blurred input, seed 0, mean +- std
    assert [r[1].strip() for r in rows] == ["blurred input", "0", "mean ± std"] * 2, out
