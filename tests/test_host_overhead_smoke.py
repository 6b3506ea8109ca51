"""benchmarks/host_overhead.py on CPU: every case takes its kernel path (launches counted) and is timed."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_short_run_times_every_call_and_step(tmp_path):
    out = tmp_path / "host.json"
    # A fresh interpreter: the script sets TRITON_INTERPRET=1 before Triton is imported.
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "host_overhead.py"), "--calls", "3",
                          "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    results = json.loads(out.read_text())
    # the script itself fails when a case launches the wrong number of (stubbed) kernels
    assert len(results["calls"]) == 10 and all(us > 0 for us in results["calls"].values())
    assert set(results["steps"]) == {f"{arch}: {variant}" for arch in ("opt", "llama")
                                     for variant in ("dense", "kv, torch path", "kv, kernels (stubbed)")}
    assert all(ms > 0 for ms in results["steps"].values())
    assert "| opt | kv, kernels (stubbed) |" in run.stdout
