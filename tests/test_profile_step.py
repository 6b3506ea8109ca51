"""benchmarks/profile_step.py on CPU: the --smoke run profiles every variant's decode step and a prefill."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_smoke_run_profiles_each_variant(tmp_path, cache):
    out = tmp_path / "profile.md"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "profile_step.py"), "--smoke", "--prefill", "1x16",
                          "--top", "3", "--cache", cache, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    text = out.read_text()
    for variant in ("dense", "kv", "weights"):
        assert f"### {variant}: one decode step" in text and f"### {variant}: prefill 1x16" in text
        row = next(line for line in text.splitlines() if line.startswith(f"| {variant} |"))
        launches, micros, wall = (float(cell.replace(",", "")) for cell in row.strip("|").split("|")[1:4])
        assert launches > 0 and micros > 0 and wall > 0
    assert "aten::" in text  # on the CPU the rows are aten operators
