"""Which implementation a compressed model runs: Triton kernels or torch, latent or rebuilt keys/values."""
from __future__ import annotations

from torch import nn

BACKENDS = ("auto", "torch", "triton")
KV_ATTENTION = ("auto", "latent", "rebuild")


def set_paths(model: nn.Module, *, backend: str | None = None, kv_attention: str | None = None) -> nn.Module:
    """Set the execution paths of every compressed module in ``model``, in place; returns ``model``.

    backend : "auto" | "torch" | "triton" or None (unchanged)
        ``FactoredProjection.backend`` of every Q/K/V projection, which the RoPE key-score kernel of
        kv mode follows too: "auto" runs the Triton kernels on CUDA where they are faster, "torch"
        the torch chain, "triton" the kernels (an error where they cannot run). The kernels have no
        backward: a call that records gradients takes the torch chain under "auto" and is refused
        under "triton" (run inference under ``torch.no_grad()``, as ``generate`` does).
    kv_attention : "auto" | "latent" | "rebuild" or None (unchanged)
        kv mode's attention: over the latent cache at decode ("auto"), always ("latent"), or over
        keys and values rebuilt from it ("rebuild").
    """
    from .models.attention import CompressedAttentionMixin
    from .projection import FactoredProjection

    for name, value, choices in (("backend", backend, BACKENDS), ("kv_attention", kv_attention, KV_ATTENTION)):
        if value is not None and value not in choices:
            raise ValueError(f"{name}={value!r}: choose one of {', '.join(choices)}")
    projections = [m for m in model.modules() if isinstance(m, FactoredProjection)]
    attentions = [m for m in model.modules() if isinstance(m, CompressedAttentionMixin)]
    if not projections and not attentions:
        raise ValueError(f"{type(model).__name__} holds no compressed module: compress it first (tmps.compress)")
    for projection in projections if backend is not None else ():
        projection.backend = backend
    for attention in attentions if kv_attention is not None else ():
        attention.kv_attention = kv_attention
    return model
