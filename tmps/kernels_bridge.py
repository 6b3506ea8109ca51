"""The one place the library touches the Triton kernels, so that a machine without triton still imports tmps."""
from __future__ import annotations

import torch


def triton_path_available(device: torch.device) -> bool:
    """True when the Triton kernels can run on ``device`` (CUDA with triton, or the interpreter when asked)."""
    try:
        from tmps.kernels.fused_projection import triton_available
    except Exception:  # triton missing or broken: the torch path serves
        return False
    return triton_available(device)


def fused_factored_projection(x, in_factor, cores, out_factors, biases):
    from tmps.kernels.fused_projection import fused_factored_projection as kernel

    return kernel(x, in_factor, cores, out_factors, biases)


def kernel_preferred_on(device: torch.device) -> bool:
    """Whether ``backend="auto"`` considers the kernel at all: CUDA with Triton (the interpreter is for tests)."""
    return device.type == "cuda" and triton_path_available(device)


def token_bucket(m: int) -> int:
    """The kernel autotuner's bucket for ``m`` rows: decode sizes share one, then powers of two."""
    from tmps.kernels.fused_projection import _m_bucket

    return _m_bucket(m)


_FASTER: dict = {}


def faster_path(key, run_kernel, run_torch, bench=None) -> str:
    """``"triton"`` or ``"torch"``: whichever runs this projection faster, timed once per ``key``.

    ``backend="auto"`` asks this on CUDA so that it is never slower than the unfused torch chain where
    the (so far untuned) kernel loses, e.g. at prefill sizes where cuBLAS's GEMMs beat the fused
    tile loop. Nothing can be timed while a CUDA graph is being captured: an untimed key then takes
    the kernel, without caching. ``bench(fn) -> ms`` defaults to ``triton.testing.do_bench``'s median.
    """
    choice = _FASTER.get(key)
    if choice is not None:
        return choice
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return "triton"
    bench = bench or _median_ms
    with torch.no_grad():
        run_kernel(), run_torch()  # the kernel's own autotuning happens here, outside the timing
        kernel_ms, torch_ms = bench(run_kernel), bench(run_torch)
    choice = _FASTER[key] = "triton" if kernel_ms <= torch_ms else "torch"
    return choice


def _median_ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median")


def latent_rope_scores_for(device: torch.device, backend: str = "auto", rows: int = 1):
    """The fused RoPE key-score kernel for kv mode's latent attention, or None for the torch chain.

    backend: "auto" (the kernel on CUDA when Triton runs there and the ``rows`` query rows per key
    head fit it), "torch" or "triton" (the kernel, or a RuntimeError saying why it cannot run) -- the
    same switch as ``FactoredProjection.backend``.
    """
    if backend == "torch" or (backend == "auto" and device.type != "cuda"):
        return None
    if not triton_path_available(device):
        if backend == "auto":
            return None
        raise RuntimeError("backend='triton' needs a CUDA device (or TRITON_INTERPRET=1) and triton installed")
    from tmps.kernels.latent_scores import MAX_ROWS, latent_rope_scores

    return latent_rope_scores if backend == "triton" or rows <= MAX_ROWS else None
