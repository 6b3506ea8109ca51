"""gpu_check's correctness scripts on the CPU, under Triton's interpreter at reduced sizes:
benchmarks/projection_check.py (c2) and benchmarks/full_rank_check.py (c3) pass on this code, and
fail when the kernel or the model is wrong; and every ``--device cuda`` check refuses to run on
Triton's interpreter."""
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_script(name, *args):
    run = subprocess.run([sys.executable, str(BENCHMARKS / name), *args], capture_output=True, text=True, timeout=600)
    return run.returncode, run.stdout + run.stderr


def run_patched(code, script, *args):
    """Import ``script``'s module from benchmarks/, run ``code`` (which may patch what it uses), then
    its ``main(args)``, in a fresh interpreter with Triton's interpreter on."""
    program = (f"import os, sys; os.environ['TRITON_INTERPRET'] = '1'; sys.path.insert(0, {str(BENCHMARKS)!r})\n"
               f"import {script} as script\n{code}\nsys.exit(script.main({list(args)!r}))\n")
    run = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=600)
    return run.returncode, run.stdout + run.stderr


def test_projection_check_passes_at_reduced_sizes():
    rc, output = run_script("projection_check.py")
    assert rc == 0, output
    assert "projection check: 0 failing case(s) on cpu" in output
    assert output.count(" ok (") == 3 * 3 * 3  # layouts x dtypes x token counts


def test_projection_check_fails_on_a_wrong_kernel():
    rc, output = run_patched(
        "import tmps.kernels.fused_projection as fp\n"
        "kernel = fp.fused_factored_projection\n"
        "fp.fused_factored_projection = lambda *a, **k: [y * 1.001 for y in kernel(*a, **k)]",
        "projection_check", "--layouts", "opt", "--dtypes", "float32")
    assert rc == 1, output
    assert output.count("MISMATCH") == 3 and "3 failing case(s)" in output


def test_full_rank_check_kv_mode_passes():
    # kv mode on Llama exercises every check: the projection, RoPE score and latent decode kernels
    # counted, cached steps against dense, and torch.compile(fullgraph=True) of the same steps
    rc, output = run_script("full_rank_check.py", "--cases", "llama:float32", "--modes", "kv")
    assert rc == 0, output
    line = next(line for line in output.splitlines() if line.startswith("llama  float32  kv"))
    assert " ok " in line and "latent score kernel calls 6" in line and "latent decode kernel calls 6" in line
    assert "torch.compile(fullgraph)" in line


@pytest.mark.parametrize("arch", ["qwen2", "gemma3", "phi3"])
def test_full_rank_check_passes_on_other_layouts(arch):
    # Qwen2: Llama's layout with q/k/v biases, so the kernels get biased (latent) groups next to RoPE.
    # Gemma 3: per-head q/k norms (kv mode: full key heads out of the kernel, then the norm and the key
    # basis), a window on one layer, a RoPE table per kind of layer. Phi-3: Q/K/V fused in the dense
    # model, partial RoPE (the key scores on the torch chain, the values through the kernel).
    rc, output = run_script("full_rank_check.py", "--cases", f"{arch}:float32")
    assert rc == 0, output
    lines = [line for line in output.splitlines() if line.startswith(f"{arch:<6} float32")]
    assert len(lines) == 2 and all(" ok " in line for line in lines), output
    scores = 0 if arch == "phi3" else 6
    assert f"latent score kernel calls {scores}" in lines[1] and "latent decode kernel calls 6" in lines[1]
    assert "torch.compile(fullgraph)" in lines[1]


def test_full_rank_check_fails_beyond_its_tolerance():
    rc, output = run_patched("script.TOLERANCE['float16'] = 1e-9", "full_rank_check",
                             "--cases", "llama:float16", "--modes", "weights")
    assert rc == 1 and "MISMATCH" in output and "1 failing case(s)" in output, output


def test_full_rank_check_refuses_a_malformed_case():
    rc, output = run_script("full_rank_check.py", "--cases", "gpt2:float32")
    assert rc == 2 and "is not arch:dtype" in output


@pytest.mark.parametrize("script", ["projection_check", "full_rank_check", "latent_decode_check",
                                    "kernel_model_check"])
def test_a_cuda_check_refuses_to_run_interpreted(script):
    # with TRITON_INTERPRET set, --device cuda would pass on the interpreter, not the compiled kernels:
    # every check must refuse (exit 2), on a CPU machine and on a GPU one alike
    rc, output = run_patched("", script, "--device", "cuda")
    assert rc == 2 and f"{script}: needs CUDA and TRITON_INTERPRET unset" in output, output
