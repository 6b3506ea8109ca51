"""Mixture-of-experts models whose attention is one tmps knows (Mixtral: Mistral's; Qwen2-MoE:
Qwen2's, biases and per-layer windows; Qwen3-MoE: Qwen3's, per-head q/k norms) on small random
models: exact at full rank in both modes, through caches and ``generate``; below full rank the
Fisher pass runs through the routed experts. The experts themselves are left as they are."""
import pytest
import torch
from transformers import (MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3MoeConfig,
                          Qwen3MoeForCausalLM)

import tmps
from tmps.models import MixtralTuckerMPSAttention, Qwen2MoeTuckerMPSAttention, Qwen3MoeTuckerMPSAttention

from test_architectures import randomise_head_norms
from test_compress import (FULL_RANK, SHAPE, VOCAB, assert_cached_steps_and_generate_match, compressed,
                          randomise_qkv_biases, rel)
from test_latent_attention import assert_static_cache_decodes_like_dense

MOE = dict(num_local_experts=4, num_experts_per_tok=2)  # Mixtral's names
QWEN_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                decoder_sparse_step=1)


def mixtral(attn="sdpa"):
    return MixtralForCausalLM(MixtralConfig(**SHAPE, **MOE, attn_implementation=attn, sliding_window=None)).eval()


def qwen2_moe(attn="sdpa"):
    """Random q/k/v biases (HF initialises them to zero) and a 5-token window on layer 0."""
    return randomise_qkv_biases(Qwen2MoeForCausalLM(Qwen2MoeConfig(
        **SHAPE, **QWEN_MOE, attn_implementation=attn, qkv_bias=True, use_sliding_window=True, sliding_window=5,
        max_window_layers=1)).eval())


def qwen3_moe(attn="sdpa"):
    """Random q/k norm weights (HF initialises them to the identity)."""
    config = {k: v for k, v in QWEN_MOE.items() if k != "shared_expert_intermediate_size"}
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**SHAPE, **config, head_dim=8, attn_implementation=attn)).eval()
    return randomise_head_norms(model, seed=5, offset=0.5)  # gains in [0.5, 1.5)


MODELS = {"mixtral": (mixtral, MixtralTuckerMPSAttention), "qwen2_moe": (qwen2_moe, Qwen2MoeTuckerMPSAttention),
          "qwen3_moe": (qwen3_moe, Qwen3MoeTuckerMPSAttention)}


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("mode", ["kv", "weights"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_full_rank_reproduces_dense(arch, mode, attn):
    build, compressed_class = MODELS[arch]
    dense = build(attn)
    if arch == "qwen2_moe":
        assert [getattr(layer.self_attn, "sliding_window", None) for layer in dense.model.layers] == [5, None]
    model = compressed(dense, mode=mode, **FULL_RANK[mode])
    assert all(type(layer.self_attn) is compressed_class for layer in model.model.layers)
    ids = torch.randint(0, VOCAB, (3, 13))
    assert rel(model(ids).logits, dense(ids).logits) < 1e-4
    assert_cached_steps_and_generate_match(model, dense)


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("path", ["latent", "rebuild"])
def test_kv_mode_static_cache(arch, path):
    assert_static_cache_decodes_like_dense(MODELS[arch][0](), path)


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("mode", ["kv", "weights"])
def test_below_full_rank_through_the_experts(arch, mode):
    """The default Fisher metric: its forward/backward runs through the routers and experts; the
    compressed model is finite, keeps at most half of the cache (kv) or of the Q/K/V parameters
    (weights), and stays near dense (random weights)."""
    dense = MODELS[arch][0]()
    model = compressed(dense, mode=mode, ratio=0.5)
    assert model.tmps_info["config"]["metric"] == "fisher"
    totals = tmps.summary(model.tmps_info)
    assert totals["kv_cache_kept" if mode == "kv" else "qkv_parameters_kept"] <= 0.5 + 1e-9
    ids = torch.randint(0, VOCAB, (2, 13))
    logits = model(ids).logits
    assert torch.isfinite(logits).all() and rel(logits, dense(ids).logits) < 0.5
