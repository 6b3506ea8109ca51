"""The checkout's kernels/ folder is importable as the top-level ``kernels`` wherever the repository
root is on sys.path (``python -m pytest``, ``python -c`` in the checkout, ``PYTHONPATH=.``). It must
not shadow Hugging Face's ``kernels`` distribution, which transformers 5.25 requires and imports."""
import importlib.metadata
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_in_checkout(code):
    """Run ``code`` with the checkout root as the working directory, hence first on sys.path."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def distribution_installed(name):
    try:
        importlib.metadata.version(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def test_transformers_builds_its_models_from_the_checkout_root():
    run = run_in_checkout("from transformers import LlamaConfig, LlamaForCausalLM\n"
                          "import tmps.kernels.fused_projection\n"
                          "LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,"
                          " num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))\nprint('built')")
    assert run.returncode == 0 and "built" in run.stdout, run.stderr


def test_top_level_kernels_is_the_distribution_if_installed_else_this_folder():
    run = run_in_checkout("import kernels; print(kernels.__file__)")
    assert run.returncode == 0, run.stderr
    ours = run.stdout.strip() == str(ROOT / "kernels" / "__init__.py")
    assert ours != distribution_installed("kernels"), run.stdout


def test_tmps_kernels_stays_ours_beside_the_distribution():
    run = run_in_checkout("import kernels, tmps.kernels.fused_projection as f; print(f.__file__)")
    assert run.returncode == 0 and run.stdout.strip() == str(ROOT / "kernels" / "fused_projection.py"), run.stderr
