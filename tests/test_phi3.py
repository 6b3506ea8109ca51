"""Phi-3 / Phi-4-mini (Q, K and V fused into one ``qkv_proj``; partial RoPE where
``partial_rotary_factor < 1``) on small random models: exact at full rank in both modes, through
caches, windows, saving and loading; below full rank, a Llama's weights fused into a Phi-3 compress
to the Llama's logits, which checks the fused layer's rows and the Fisher pass's hooks on them."""
import pytest
import torch
from transformers import Phi3Config, Phi3ForCausalLM
from transformers.models.phi3.modeling_phi3 import Phi3Attention, apply_rotary_pos_emb

import tmps
from tmps.models import Phi3TuckerMPSAttention
from tmps.models.base import LinearRows, architecture_of
from tmps.models.rope import rope_average, rotate

from test_compress import (FULL_RANK, SHAPE, VOCAB, assert_cached_steps_and_generate_match, assert_compresses_like,
                          assert_unchanged, calib, compressed, llama, rel, snapshot)
from test_latent_attention import assert_kv_decodes_like_dense_past_the_context, assert_static_cache_decodes_like_dense


def phi3(attn="sdpa", partial_rotary_factor=1.0, sliding_window=None):
    """Llama's test shape (GQA 6 / 2, head_dim 8); 0.75 rotates 6 of each head's 8 features (Phi-4-mini's factor)."""
    config = Phi3Config(**SHAPE, rms_norm_eps=llama().config.rms_norm_eps, attn_implementation=attn,
                        partial_rotary_factor=partial_rotary_factor,
                        sliding_window=sliding_window, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return Phi3ForCausalLM(config).eval()


def test_rotate_matches_hf_partial_rope():
    q, k = torch.randn(2, 3, 5, 8, dtype=torch.float64), torch.randn(2, 1, 5, 8, dtype=torch.float64)
    for width in (8, 6, 4):
        cos, sin = torch.randn(2, 5, width, dtype=torch.float64), torch.randn(2, 5, width, dtype=torch.float64)
        want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin)
        assert torch.equal(rotate(q, cos[:, None], sin[:, None]), want_q)
        assert torch.equal(rotate(k, cos[:, None], sin[:, None]), want_k)


def test_rope_average_is_the_mean_over_rotation_angles():
    """Averaging ``R_θ m R_θᵀ`` over many angles per pair (one head of 8 features, 6 rotated) gives
    rope_average: rotated pairs become (tr/2)·I₂, their cross terms vanish, the passed features keep
    their block."""
    hd, rot = 8, 6
    a = torch.randn(hd, hd, dtype=torch.float64)
    m = a @ a.T
    freqs = torch.tensor([1.0, 3.0, 7.0], dtype=torch.float64)  # distinct: on a uniform grid of the circle,
    angles = torch.linspace(0, 2 * torch.pi, 4097, dtype=torch.float64)[:-1, None] * freqs  # cross terms cancel
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    eye = torch.eye(hd, dtype=torch.float64)
    rotations = torch.stack([rotate(eye, c, s).T for c, s in zip(cos, sin)])  # R_θ as matrices (columns R e_j)
    mean = (rotations @ m @ rotations.transpose(1, 2)).mean(0)
    torch.testing.assert_close(rope_average(m, hd, rot), mean, rtol=0, atol=1e-9)
    assert torch.equal(rope_average(m, hd, hd), torch.diag(torch.cat([(m.diagonal()[:4] + m.diagonal()[4:]) / 2] * 2)))


def test_fused_rows_are_the_projections():
    dense = phi3()
    attention = dense.model.layers[0].self_attn
    q, k, v, o = architecture_of(dense).projections(attention)
    x = torch.randn(2, 5, SHAPE["hidden_size"])
    fused = attention.qkv_proj(x)
    assert all(isinstance(p, LinearRows) for p in (q, k, v)) and o is attention.o_proj
    assert (q.out_features, k.out_features, v.out_features) == (48, 16, 16)
    assert torch.equal(torch.cat([q(x), k(x), v(x)], -1), fused)
    assert q.weight.data_ptr() == attention.qkv_proj.weight.data_ptr()  # views, not copies


@pytest.mark.parametrize("partial", [1.0, 0.75])
@pytest.mark.parametrize("mode", ["kv", "weights"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_full_rank_reproduces_dense(partial, mode, attn):
    dense = phi3(attn, partial)
    model = compressed(dense, mode=mode, **FULL_RANK[mode])
    attention = model.model.layers[0].self_attn
    assert type(attention) is Phi3TuckerMPSAttention and isinstance(attention, Phi3Attention)
    assert "qkv_proj" not in dict(attention.named_children())
    ids = torch.randint(0, VOCAB, (3, 13))
    assert rel(model(ids).logits, dense(ids).logits) < 1e-4
    assert_cached_steps_and_generate_match(model, dense)


@pytest.mark.parametrize("partial", [1.0, 0.75])
@pytest.mark.parametrize("path", ["latent", "rebuild"])
def test_kv_mode_static_cache_and_window(partial, path):
    """Through HF's StaticCache, and generating past a 5-token window, as the dense model."""
    assert_static_cache_decodes_like_dense(phi3(partial_rotary_factor=partial), path)
    dense = phi3(partial_rotary_factor=partial, sliding_window=5)
    model = tmps.set_paths(compressed(dense, mode="kv", **FULL_RANK["kv"]), kv_attention=path)
    ids = torch.randint(1, VOCAB, (2, 3))
    assert torch.equal(model.generate(ids, max_new_tokens=9, do_sample=False),
                       dense.generate(ids, max_new_tokens=9, do_sample=False))


def longrope_phi3(sliding_window=None):
    """Phi-3 128k / Phi-4-mini's "longrope" on the test shape, its original context cut to 16 positions."""
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0, 1.3, 1.6, 1.9],
            "long_factor": [3.0, 5.5, 8.0, 10.5], "original_max_position_embeddings": 16}
    config = Phi3Config(**{**SHAPE, "max_position_embeddings": 64}, rope_parameters=rope,
                        original_max_position_embeddings=16, sliding_window=sliding_window,
                        rms_norm_eps=llama().config.rms_norm_eps, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return Phi3ForCausalLM(config).eval()


@pytest.mark.parametrize("path", ["latent", "rebuild"])
@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
@pytest.mark.parametrize("window", [None, 6])
def test_kv_mode_holds_longrope_keys_as_the_dense_cache_does(path, cache_kind, window):
    """The dense model rotates a key once, with the factors of the forward that writes it: decoding a
    10-token prompt past the original 16 positions leaves short-factor keys before long-factor ones.
    kv mode rotates its latent keys anew at every step, and rotated them all with the current factors
    (0.3% off the dense logits from there on); it now rotates each as the dense cache holds it, also
    through windows that shift the slots. Calibrated on 24-token sequences, past the original context
    (on transformers 5.17 a long forward during compression once left the tables wrong)."""
    assert_kv_decodes_like_dense_past_the_context(longrope_phi3(window), path, cache_kind, calib())


def fused_llama():
    """A Llama and a Phi-3 holding its weights (Q/K/V rows and gate/up rows concatenated): the same model."""
    source = llama()
    target = phi3()
    state = source.state_dict()
    for i in range(SHAPE["num_hidden_layers"]):
        p = f"model.layers.{i}."
        state[p + "self_attn.qkv_proj.weight"] = torch.cat([state.pop(p + f"self_attn.{n}_proj.weight") for n in "qkv"])
        state[p + "mlp.gate_up_proj.weight"] = torch.cat([state.pop(p + f"mlp.{n}_proj.weight") for n in ("gate", "up")])
    target.load_state_dict(state, strict=True)
    return source, target


@pytest.mark.parametrize("mode, kw", [("kv", {"ratio": 0.5}), ("kv", {"ratio": 0.5, "q_ratio": 0.5}),
                                      ("weights", {"ratio": 0.5}), ("weights", {"ratio": 0.5, "metric": "analytic"})])
def test_llama_weights_fused_into_phi3_compress_to_the_same_model(mode, kw):
    """Below full rank: the Fisher pass hooks Q, K and V inside the fused layer's output (and Q's
    rows with ``q_ratio``), so the plans, factors and logits are the Llama's."""
    source, target = fused_llama()
    assert_compresses_like(target, source, mode, **kw)


def test_save_load_identical_logits(tmp_path):
    model = compressed(phi3(partial_rotary_factor=0.75), mode="kv", ratio=0.5)
    tmps.save(model, tmp_path / "phi3")
    loaded = tmps.load(tmp_path / "phi3")
    assert type(loaded.model.layers[0].self_attn) is Phi3TuckerMPSAttention
    ids = torch.randint(0, VOCAB, (2, 9))
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_bad_input_leaves_the_fused_model_unchanged():
    dense = phi3()
    snap = snapshot(dense)
    with pytest.raises(ValueError, match="ratio"):
        tmps.compress(dense, calib(), ratio=1.5, progress=False)
    assert_unchanged(dense, snap)
