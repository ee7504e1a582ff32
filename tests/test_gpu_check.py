"""scripts/gpu_check.sh end to end on the CPU (``--device cpu --smoke``): every stage runs and is summarised, so
the script is known to work before a GPU is lent. Takes ~40-60 s on 2 cores."""
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"


def test_gpu_check_smoke_runs_every_stage_on_cpu(tmp_path):
    out = tmp_path / "gpu_check"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(SCRIPT), "--device", "cpu", "--smoke", "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr + (out / "stages.md").read_text()
    stages = (out / "stages.md").read_text()
    for name in ("tests", "bench", "steps_hungarian", "steps_influencer", "steps_table", "compare"):
        assert f"| {name} | 0 |" in stages, stages
    summary = (out / "summary.md").read_text()
    assert "# GPU check (smoke, device cpu)" in summary
    assert "peaked inputs:" in summary and "| 16 | 4 |" in summary  # the benchmark's tables
    assert "| hungarian | hungarian | 2 |" in summary and "| influencer | influencer | 2 |" in summary
    assert "# Criterion comparison" in summary  # the compare report
    assert (out / "compare" / "report.md").is_file() and (out / "tests.xml").is_file()


def test_gpu_check_rejects_unknown_arguments():
    proc = subprocess.run(["bash", str(SCRIPT), "--nope"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "unknown argument --nope" in proc.stderr
    help_text = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=30).stdout
    assert "--device cpu --smoke" in help_text and "pytest -m cuda" in help_text
