"""The Triton kernels compile for an H100 (sm_90) without a GPU: benchmarks/compile_check.py --first."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_one_config_of_each_kernel_compiles_for_sm90():
    pytest.importorskip("triton")
    # A fresh interpreter: this process may have Triton in interpreter mode (tests/kernels).
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compile_check.py"), "--first", "--arch", "90"],
                         capture_output=True, text=True, timeout=600)
    if run.returncode == 3:
        pytest.skip(run.stderr.strip().splitlines()[-1])
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 failing config(s)" in run.stdout
    # the first config of each kernel in fp16, bf16, fp32: the projection with and without an in factor,
    # the RoPE scores, and the latent decode's two kernels (partials, combine)
    assert run.stdout.count("  ok") == 15
    # ... and none moves its rows 2 bytes at a time: the first projection case has r = 1224 and the
    # first latent decode case r_k = 712, multiples of 8 that Triton sees as such only through the
    # kernels' alignment hint (kernels/_common.aligned)
    assert "compile_check: 0 case(s) with 2-byte global loads or stores" in run.stdout
    # ... and every 16-bit dot of them runs on tensor cores (wgmma / mma.sync in the PTX)
    assert "compile_check: 0 16-bit case(s) without a tensor-core instruction" in run.stdout


def test_tensor_core_instructions_are_counted_in_ptx():
    """compile_check's count: wgmma and mma.sync instructions, not scalar FMAs or look-alike names."""
    pytest.importorskip("triton")
    ptx = "\n".join([
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%f1}, %rd1, %rd2, p, 1, 1, 0, 1;",
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1, %f2}, {%r1}, {%r2}, {%f3};",
        "wgmma.fence.sync.aligned;",  # fences and commits are not matrix instructions
        "wgmma.commit_group.sync.aligned;",
        "fma.rn.f32 %f4, %f5, %f6, %f7;",  # what a dot off the tensor cores compiles to
    ])
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import compile_check; "
            "print(compile_check.tensor_core_ops(sys.stdin.read()))")
    run = subprocess.run([sys.executable, "-c", code, str(ROOT / "benchmarks")], input=ptx, capture_output=True,
                         text=True, timeout=300)
    if run.returncode == 3:
        pytest.skip(run.stderr.strip().splitlines()[-1])
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["2"]


def test_without_the_alignment_hints_those_cases_move_2_bytes_at_a_time():
    """What the zero above rests on: compiled as before the hints, the same --first cases count
    2-byte accesses (the projection at r = 1224, kv mode's 712-wide output, the latent decode at 712)."""
    pytest.importorskip("triton")
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compile_check.py"), "--first", "--arch", "90",
                          "--dtypes", "float16", "--no-align-hints"], capture_output=True, text=True, timeout=600)
    if run.returncode == 3:
        pytest.skip(run.stderr.strip().splitlines()[-1])
    assert run.returncode == 0, run.stdout + run.stderr
    assert "compile_check: 3 case(s) with 2-byte global loads or stores" in run.stdout
