"""Qwen3: Qwen2's attention without q/k/v biases (``attention_bias`` optional) and with each query and
key head RMS-normalised (``q_norm``, ``k_norm``) before RoPE. Weights mode only: kv mode folds the key
and value projections into its latent ones, which the per-head key norm, not linear, forbids."""
from __future__ import annotations

from transformers.models.qwen3 import modeling_qwen3
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention

from .base import register
from .llama import LlamaFamilyForward
from .qwen2 import Qwen2Architecture


class Qwen3TuckerMPSAttention(LlamaFamilyForward, Qwen3Attention):
    """Replaces ``Qwen3Attention``: Q/K/V through a FactoredProjection, then the dense q_norm / k_norm; ``o_proj`` kept dense."""

    head_norms = True
    eager_fallback = staticmethod(modeling_qwen3.eager_attention_forward)


class Qwen3Architecture(Qwen2Architecture):
    def check_supported(self, model, mode):
        if mode == "kv":
            raise ValueError(f"kv mode does not support {type(model).__name__}: Qwen3 RMS-normalises each key head "
                             "(k_norm) before RoPE, so its keys are not linear in the input and cannot be cached as "
                             "latents of one projection; use mode='weights'")
        super().check_supported(model, mode)


QWEN3 = register(Qwen3Architecture(
    model_type="qwen3",
    dense_attention_class=Qwen3Attention,
    compressed_attention_class=Qwen3TuckerMPSAttention,
    uses_rope=True,
))
