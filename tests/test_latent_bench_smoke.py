"""benchmarks/latent_attention_bench.py on CPU: the --smoke run checks every provider against the rebuild."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_run_checks_and_times_every_provider(tmp_path):
    out = tmp_path / "latent.md"
    # A fresh interpreter: the script sets TRITON_INTERPRET=1 before Triton is imported.
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "latent_attention_bench.py"), "--smoke",
                          "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = [line for line in out.read_text().splitlines() if line.startswith("| tiny")]
    assert len(rows) == 4
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[4] == "wall"
        timings = cells[5:10]  # dense, rebuild, latent, latent+triton, latent+fused
        expected_missing = 0 if "rope" in cells[0] else 1  # the score kernel serves RoPE shapes only
        assert sum(t == "n/a" for t in timings) == expected_missing, row
        assert float(cells[-1]) < 1e-4, row  # max error against the rebuild, fp32
    assert "0 case(s) outside the tolerance" in out.read_text()


def test_without_cuda_exits_2():
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "latent_attention_bench.py")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "no CUDA device" in run.stderr
