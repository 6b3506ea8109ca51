"""IBM Granite (Llama's attention with the softmax scale from ``attention_multiplier``, optional
biases, and multipliers outside the attention) on small random models: exact at full rank in both
modes with its own scale and biases; below full rank, a Llama's weights in a Granite whose
multipliers are Llama's compress to the Llama's logits."""
import pytest
import torch
from transformers import GraniteConfig, GraniteForCausalLM
from transformers.models.granite.modeling_granite import GraniteAttention

from tmps.models import GraniteTuckerMPSAttention

from test_compress import (FULL_RANK, SHAPE, VOCAB, assert_cached_steps_and_generate_match, assert_compresses_like,
                          compressed, llama, randomise_qkv_biases, rel)
from test_latent_attention import assert_static_cache_decodes_like_dense


def granite(attn="sdpa", as_llama=False):
    """Granite's own multipliers (a softmax scale of 0.2 instead of 8^-½ = 0.35, embeddings ×4,
    residuals ×0.5, logits ÷3) and random q/k/v/o biases; ``as_llama``: Llama's scale, no multipliers,
    no biases."""
    head_dim = SHAPE["hidden_size"] // SHAPE["num_attention_heads"]
    multipliers = dict(attention_multiplier=head_dim ** -0.5, embedding_multiplier=1.0, residual_multiplier=1.0,
                       logits_scaling=1.0, attention_bias=False) if as_llama else \
        dict(attention_multiplier=0.2, embedding_multiplier=4.0, residual_multiplier=0.5, logits_scaling=3.0,
             attention_bias=True)
    config = GraniteConfig(**SHAPE, rms_norm_eps=llama().config.rms_norm_eps, attn_implementation=attn,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, **multipliers)
    model = GraniteForCausalLM(config).eval()
    return model if as_llama else randomise_qkv_biases(model)


@pytest.mark.parametrize("mode", ["kv", "weights"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_full_rank_reproduces_dense(mode, attn):
    dense = granite(attn)
    model = compressed(dense, mode=mode, **FULL_RANK[mode])
    attention = model.model.layers[0].self_attn
    assert type(attention) is GraniteTuckerMPSAttention and isinstance(attention, GraniteAttention)
    assert attention.scaling == 0.2
    ids = torch.randint(0, VOCAB, (3, 13))
    assert rel(model(ids).logits, dense(ids).logits) < 1e-4
    assert_cached_steps_and_generate_match(model, dense)


@pytest.mark.parametrize("path", ["latent", "rebuild"])
def test_kv_mode_static_cache(path):
    assert_static_cache_decodes_like_dense(granite(), path)


@pytest.mark.parametrize("mode", ["kv", "weights"])
def test_llama_weights_in_a_granite_with_llamas_multipliers_compress_to_the_same_model(mode):
    source = llama()
    target = granite(as_llama=True)
    target.load_state_dict(source.state_dict(), strict=True)
    assert_compresses_like(target, source, mode, ratio=0.5)
