"""benchmarks/gpu_check.sh rehearsed without a GPU: its steps, caps, fallbacks and exit status, and
every command line it passes to a benchmark script, parsed by that script's own parser.

A GPU lease is short and rare: a typo in a flag, a step left out of its part or a wrong exit status
would cost one. Here the script runs as it is, from a stand-in repository root whose ``benchmarks``
is this one's, with ``PYTHON`` set to ``tests/gpu_check_stand_in.py`` (which logs every call, runs
the import checks for real, compiles the heredocs and parses each script's arguments).
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = ("a", "b", "c1", "c2", "c3", "d", "d2", "e", "d3", "p", "f", "g")
PART_STEPS = {
    "1": ("a", "b", "c1", "c2", "d", "d2", "g"),
    "2": ("a", "b", "c3", "e", "d3", "p", "f", "g"),
    "all": STEPS,
}

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def rehearse(tmp_path: Path, real_imports=False, **env):
    """Run gpu_check.sh with the stand-in Python; (exit status, output, the stand-in's call records,
    {step: status line}). ``real_imports``: b's import check imports tmps for real (~13 s here)."""
    root = tmp_path / "root"
    (root / "tmps").mkdir(parents=True)  # b's fallback links tmps/kernels -> ../kernels here
    (root / "benchmarks").symlink_to(REPO / "benchmarks")
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{REPO / "tests" / "gpu_check_stand_in.py"}" "$@"\n')
    python.chmod(0o755)
    log = tmp_path / "calls.jsonl"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("GPU_CHECK_", "E2E_", "PROFILE_"))}
    full_env.update(PYTHON=str(python), OUT=str(tmp_path / "out"), STAND_IN_LOG=str(log), **env)
    if not real_imports:
        full_env["STAND_IN_SKIP_IMPORT"] = "1"
    run = subprocess.run(["bash", str(root / "benchmarks" / "gpu_check.sh")], env=full_env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=240)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    summary = run.stdout[run.stdout.index("gpu_check summary"):] if "gpu_check summary" in run.stdout else ""
    status = {}
    for line in summary.splitlines()[1:]:
        status[line.strip().partition(". ")[0]] = line.strip()
    return run.returncode, run.stdout + run.stderr, calls, status


def scripts_called(calls):
    """{script name: [argv, ...]} of the calls that ran a benchmark script (parsed or not)."""
    out = {}
    for call in calls:
        first = call["argv"][0]
        if first.endswith(".py"):
            out.setdefault(Path(first).name, []).append(call)
    return out


def test_gpu_check_is_valid_bash():
    subprocess.run(["bash", "-n", str(REPO / "benchmarks" / "gpu_check.sh")], check=True)


def test_part_all_runs_every_step_and_every_command_line_parses(tmp_path):
    rc, output, calls, status = rehearse(tmp_path, real_imports=True, GPU_CHECK_PART="all")
    assert rc == 0, output
    assert list(status) == [s for s in STEPS], output
    assert all(line.split(": ", 1)[1].startswith("ok") for line in status.values()), status
    scripts = scripts_called(calls)
    want = {"latent_decode_check.py", "projection_check.py", "full_rank_check.py", "kernel_microbench.py",
            "latent_attention_bench.py", "e2e.py", "profile_step.py", "targets.py"}
    assert set(scripts) == want, scripts
    for name, runs in scripts.items():
        assert all(run.get("parsed") for run in runs), (name, runs)
        assert (REPO / "benchmarks" / name).is_file()
    assert len(scripts["kernel_microbench.py"]) == 2  # d, then d3 merging torch.compile's rows
    assert "--merge" in scripts["kernel_microbench.py"][1]["argv"]
    # the CUDA checks ask for the GPU: on the CPU they would run in the interpreter at reduced sizes
    for name in ("latent_decode_check.py", "projection_check.py", "full_rank_check.py"):
        argv = scripts[name][0]["argv"]
        assert argv[argv.index("--device") + 1] == "cuda", argv
    heredocs = [call for call in calls if call["argv"] == ["-"]]
    assert heredocs and all("compiled" in call for call in heredocs)  # a's version probe
    pytest_calls = [call["argv"] for call in calls if call["argv"][:2] == ["-m", "pytest"]]
    assert "tests/kernels" in pytest_calls[0], pytest_calls  # c1
    if len(pytest_calls) > 1:  # f, where pytest-benchmark is installed
        assert pytest_calls[1][2] == "benchmarks/bench_attention.py" and "--benchmark-only" in pytest_calls[1]
    # e2e's budget ends before its step's cap, and both inside the part's total
    e2e = scripts["e2e.py"][0]["argv"]
    budget = int(e2e[e2e.index("--budget-s") + 1])
    cap = int(re.search(r"== e\. end-to-end benchmark \(cap (\d+)s\)", output).group(1))
    assert 0 < budget < cap <= 720


@pytest.mark.parametrize("part", ["1", "2"])
def test_each_part_runs_its_own_steps(tmp_path, part):
    rc, output, calls, status = rehearse(tmp_path, GPU_CHECK_PART=part)
    assert rc == 0, output
    ran = [step for step, line in status.items() if not line.endswith(f"not in part {part}")]
    assert tuple(ran) == PART_STEPS[part], status
    assert set(status) == set(STEPS)


def test_a_failing_step_fails_the_run_and_the_later_steps_still_run(tmp_path):
    rc, output, calls, status = rehearse(tmp_path, GPU_CHECK_PART="1", STAND_IN_RC="projection_check.py=1")
    assert rc == 1, output
    assert "FAILED rc=1" in status["c2"], status
    assert all(status[s].split(": ", 1)[1].startswith("ok") for s in ("d", "d2", "g")), status
    # c2's latent decode check ran before the failing projection check, and was not skipped by it
    assert "latent_decode_check.py" in scripts_called(calls)


def test_a_missed_target_is_a_result_not_a_failure(tmp_path):
    rc, output, _, status = rehearse(tmp_path, GPU_CHECK_PART="1", GPU_CHECK_SKIP="c d",
                                     STAND_IN_RC="targets.py=3")
    assert rc == 0, output
    assert status["g"].split(": ", 1)[1].startswith("ok"), status
    rc, output, _, status = rehearse(tmp_path / "crash", GPU_CHECK_PART="1", GPU_CHECK_SKIP="c d",
                                     STAND_IN_RC="targets.py=1")
    assert rc == 1 and "FAILED rc=1" in status["g"], output


def test_offline_install_failure_falls_back_to_a_link_removed_on_exit(tmp_path):
    rc, output, calls, status = rehearse(tmp_path, GPU_CHECK_PART="1", GPU_CHECK_SKIP="c d",
                                         STAND_IN_RC="pip install=1")
    assert rc == 0, output  # the fallback passed: the run goes on as if b had
    assert "FAILED rc=1" in status["b"] and status["b'"].endswith("ok"), status
    later = [call for call in calls if call["argv"][0].endswith("targets.py")]
    assert later and all(call["link"] for call in later)  # the link served the later steps...
    assert not os.path.lexists(tmp_path / "root" / "tmps" / "kernels")  # ...and is gone


def test_steps_without_time_are_skipped_and_only_required_ones_fail(tmp_path):
    # part 2 in 60 s: c3 keeps e's, p's and g's reserves (150 s) and so has no time: a failure
    rc, output, _, status = rehearse(tmp_path, GPU_CHECK_PART="2", GPU_CHECK_SECONDS="60")
    assert rc == 1, output
    assert status["c3"].endswith("skipped (no time left)"), status
    assert status["g"].split(": ", 1)[1].startswith("ok"), status  # the last step still runs
    # the optional steps alone out of time: not a failure
    rc, output, _, status = rehearse(tmp_path / "optional", GPU_CHECK_PART="2", GPU_CHECK_SKIP="c e p",
                                     GPU_CHECK_SECONDS="40")
    assert rc == 0, output
    assert status["d3"].endswith("skipped (no time left)") and status["f"].endswith("skipped (no time left)")


def test_an_unknown_part_is_refused(tmp_path):
    rc, output, calls, _ = rehearse(tmp_path, GPU_CHECK_PART="3")
    assert rc == 2 and "GPU_CHECK_PART must be 1, 2 or all" in output
    assert not calls
