"""SmolLM3 (RoPE left out of some layers: NoPE; an optional window on those) on small random models:
exact at full rank in both modes, through caches, windows, saving and loading; below full rank, a
Llama's weights in a SmolLM3 whose layers all rotate compress to the Llama's logits, and the NoPE
layers are solved and run without RoPE."""
import pytest
import torch
from transformers import SmolLM3Config, SmolLM3ForCausalLM
from transformers.models.smollm3.modeling_smollm3 import SmolLM3Attention

import tmps
from tmps import compressor
from tmps.models import SmolLM3TuckerMPSAttention

from test_compress import (FULL_RANK, SHAPE, VOCAB, assert_cached_steps_and_generate_match, assert_compresses_like,
                          compressed, llama, rel)
from test_latent_attention import assert_static_cache_decodes_like_dense


def smollm3(attn="sdpa", rope_every_layer=False, sliding_window=None):
    """Llama's test shape (2 layers); layer 1 without RoPE unless ``rope_every_layer``; with ``sliding_window``
    the NoPE layer gets that window (SmolLM3's rule: windows only where there is no RoPE)."""
    config = SmolLM3Config(**SHAPE, rms_norm_eps=llama().config.rms_norm_eps, attn_implementation=attn,
                           no_rope_layers=[1, 1] if rope_every_layer else [1, 0],
                           use_sliding_window=sliding_window is not None, sliding_window=sliding_window,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                           rope_parameters={"rope_theta": 10000.0, "rope_type": "default"})  # Llama's defaults
    return SmolLM3ForCausalLM(config).eval()


@pytest.mark.parametrize("mode", ["kv", "weights"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_full_rank_reproduces_dense(mode, attn):
    dense = smollm3(attn)
    model = compressed(dense, mode=mode, **FULL_RANK[mode])
    layers = [layer.self_attn for layer in model.model.layers]
    assert all(type(a) is SmolLM3TuckerMPSAttention and isinstance(a, SmolLM3Attention) for a in layers)
    assert [a.uses_rope for a in layers] == [True, False]
    ids = torch.randint(0, VOCAB, (3, 13))
    assert rel(model(ids).logits, dense(ids).logits) < 1e-4
    assert_cached_steps_and_generate_match(model, dense)


@pytest.mark.parametrize("path", ["latent", "rebuild"])
def test_kv_mode_static_cache_and_window(path):
    """Through HF's StaticCache, and generating past a 5-token window on the NoPE layer, as the dense model."""
    assert_static_cache_decodes_like_dense(smollm3(), path)
    dense = smollm3(sliding_window=5)
    assert [layer.self_attn.sliding_window for layer in dense.model.layers] == [None, 5]
    model = tmps.set_paths(compressed(dense, mode="kv", **FULL_RANK["kv"]), kv_attention=path)
    ids = torch.randint(1, VOCAB, (2, 3))
    assert torch.equal(model.generate(ids, max_new_tokens=9, do_sample=False),
                       dense.generate(ids, max_new_tokens=9, do_sample=False))


@pytest.mark.parametrize("mode", ["kv", "weights"])
def test_llama_weights_in_a_smollm3_that_always_rotates_compress_to_the_same_model(mode):
    source = llama()
    target = smollm3(rope_every_layer=True)
    target.load_state_dict(source.state_dict(), strict=True)
    assert_compresses_like(target, source, mode, ratio=0.5)


def test_nope_layers_are_solved_and_decoded_without_rope(monkeypatch):
    """The solver of the NoPE layer gets ``uses_rope=False`` (no angle average in its metrics), and
    kv mode's decode asks for RoPE tables in the RoPE layer only."""
    seen = []
    real = compressor.LayerSolver

    def recording(*args, **kwargs):
        solver = real(*args, **kwargs)
        seen.append(solver.uses_rope)
        return solver

    monkeypatch.setattr(compressor, "LayerSolver", recording)
    model = compressed(smollm3(), mode="kv", ratio=0.5)
    assert set(seen) == {True, False} and seen[: len(seen) // 2] == [True, False] * (len(seen) // 4)

    tables = []
    for layer in model.model.layers:
        attention = layer.self_attn
        original = attention._rotate_queries
        monkeypatch.setattr(attention, "_rotate_queries",
                            lambda *a, _o=original, _i=attention.layer_idx: tables.append(_i) or _o(*a))
    ids = torch.randint(1, VOCAB, (2, 5))
    model.generate(ids, max_new_tokens=3, do_sample=False)
    assert tables and set(tables) == {0}
