"""Small helpers the benchmark scripts and pytest-benchmark suites share (imported as a sibling module).

Nothing is imported at module level beyond the standard library: some scripts must set
TRITON_INTERPRET before torch or Triton load.
"""
import argparse
import os
import sys


def synced(fn):
    """``fn`` followed by a CUDA synchronize when a GPU is present, so a timer sees the kernels finish."""
    import torch

    def run():
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return out

    return run


def write_lines(path: str, lines: list) -> None:
    """Write a markdown table (or any lines) to ``path``, creating its folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def cuda_missing(script: str) -> bool:
    """True, after saying so on stderr, when torch sees no CUDA device (the caller then exits 2)."""
    import torch

    if torch.cuda.is_available():
        return False
    print(f"{script}: no CUDA device; this benchmark needs a GPU (run with --smoke for a CPU check of the script)",
          file=sys.stderr)
    return True


def cuda_unusable(script: str, device: str) -> bool:
    """True, after saying so on stderr, when ``--device cuda`` was asked for but torch sees no CUDA
    device or Triton would interpret the kernels (TRITON_INTERPRET set): a correctness check on CUDA
    then exits 2 rather than pass on something other than the compiled kernels."""
    if device != "cuda":
        return False
    import torch

    from tmps.kernels._common import interpreted

    if torch.cuda.is_available() and not interpreted():
        return False
    print(f"{script}: needs CUDA and TRITON_INTERPRET unset", file=sys.stderr)
    return True


def count_kernel_calls() -> dict:
    """Count the calls of tmps's Triton entry points from now on: a dict {"projection", "scores",
    "decode"} (the fused Q/K/V projection through the bridge, the RoPE key-score kernel, the fused
    latent decode) that each call increments. Wrapping the module attributes is enough: the library
    looks each of them up at every call. Zero it with ``calls.update(dict.fromkeys(calls, 0))``."""
    from tmps import kernels_bridge
    from tmps.kernels import latent_decode, latent_scores

    calls = {}
    for name, module, attr in (("projection", kernels_bridge, "run_fused_projection"),
                               ("scores", latent_scores, "latent_rope_scores"),
                               ("decode", latent_decode, "latent_decode_attention")):
        def counted(*args, _name=name, _kernel=getattr(module, attr), **kwargs):
            calls[_name] += 1
            return _kernel(*args, **kwargs)

        calls[name] = 0
        setattr(module, attr, counted)
    return calls


def device_parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser described by ``doc``'s first paragraph, with ``--device cpu|cuda`` (default
    cpu: see :func:`interpret_on_cpu`)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    return p


def interpret_on_cpu(device: str) -> None:
    """``--device cpu`` runs the Triton kernels in Triton's interpreter: sets TRITON_INTERPRET=1, which
    Triton reads when it is imported, so call this before torch or Triton is imported."""
    if device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
