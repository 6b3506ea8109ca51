"""Mistral, Qwen2, Qwen3 and Gemma 3 (Llama-shaped attention; Qwen2 with q/k/v biases, Qwen3 and Gemma 3
with per-head q/k norms; sliding windows, in Gemma 3 alternating with full attention) on small random
models: exact at full rank in both modes, through caches, saved and loaded; kv mode caching latents of
the normalised keys where the model normalises them; sliding windows kept in both modes (kv mode through
HF's window caches), and each layer calibrated on what the model hands it."""
import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.models.gemma3.modeling_gemma3 import Gemma3Attention
from transformers.models.mistral.modeling_mistral import MistralAttention
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention

import tmps
from tmps.calibration import calibration_batches, capture_layer_inputs, head_norm_moments, run_layer
from tmps.models import (Gemma3TuckerMPSAttention, MistralTuckerMPSAttention, Qwen2TuckerMPSAttention,
                         Qwen3TuckerMPSAttention)
from tmps.models import attention as attention_module
from tmps.models.base import architecture_of
from tmps.sensitivity import projection_fisher

from test_latent_attention import static_cache_steps
from test_compress import (FULL_RANK, MODELS, SHAPE, VOCAB, assert_cached_steps_and_generate_match, assert_compresses_like,
                          calib, compressed, llama, mistral, qwen2, rel)

CLASSES = {"mistral": (MistralAttention, MistralTuckerMPSAttention), "qwen2": (Qwen2Attention, Qwen2TuckerMPSAttention)}


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_replaced_modules_subclass_hf(arch):
    """The full-rank, cache and static-cache tests of test_compress.py and test_latent_attention.py run
    over these two models too (their MODELS); here, what replaces their attention."""
    model = compressed(MODELS[arch](), ratio=0.5)
    hf_class, ours = CLASSES[arch]
    attention = model.model.layers[1].self_attn
    assert type(attention) is ours and isinstance(attention, hf_class) and attention.layer_idx == 1


def test_qwen2_kv_cache_holds_latents_of_the_biased_projections():
    model = compressed(qwen2(), mode="kv", hooi_ranks=[5, 7])
    layer0 = model(torch.randint(0, VOCAB, (2, 10)), use_cache=True).past_key_values.layers[0]
    assert layer0.keys.shape == (2, 1, 10, 5) and layer0.values.shape == (2, 1, 10, 7)
    assert model.tmps_info["layers"][0]["ranks"] == {"k": 5, "v": 7}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_weights_mode_keeps_the_sliding_window(attn):
    """A window of 5 tokens over sequences of 17 (HF's masks cut it), then generation past the window
    through HF's sliding-window cache."""
    dense = mistral(attn, sliding_window=5)
    model = compressed(dense, mode="weights", **FULL_RANK["weights"])
    ids = torch.randint(0, VOCAB, (3, 17))
    assert rel(model(ids).logits, dense(ids).logits) < 1e-4
    ids = torch.randint(1, VOCAB, (2, 11))
    g_dense = dense.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), g_dense)


def test_attention_function_gets_the_dense_sliding_window(monkeypatch):
    """Flash attention reads ``sliding_window`` rather than the mask: the compressed layers pass it as
    the dense ones do (recorded at sdpa, which ignores it)."""
    dense = mistral(sliding_window=5)
    model = compressed(dense, mode="weights", **FULL_RANK["weights"])
    sdpa = attention_module.ALL_ATTENTION_FUNCTIONS["sdpa"]
    windows = []

    def recording(module, *args, **kwargs):
        windows.append((type(module).__name__, kwargs.get("sliding_window")))
        return sdpa(module, *args, **kwargs)

    monkeypatch.setitem(attention_module.ALL_ATTENTION_FUNCTIONS._global_mapping, "sdpa", recording)
    ids = torch.randint(0, VOCAB, (1, 9))
    dense(ids), model(ids)
    assert windows == [("MistralAttention", 5)] * 2 + [("MistralTuckerMPSAttention", 5)] * 2


def mixed_qwen2(attn="sdpa"):
    """Layer 0 full attention, layer 1 a window of 5 tokens (Qwen2's ``max_window_layers``)."""
    return qwen2(attn, use_sliding_window=True, sliding_window=5, max_window_layers=1)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_weights_mode_keeps_layers_that_mix_full_and_sliding_attention(attn):
    dense = mixed_qwen2(attn)
    assert [layer.self_attn.sliding_window for layer in dense.model.layers] == [None, 5]
    model = compressed(dense, mode="weights", **FULL_RANK["weights"])
    ids = torch.randint(0, VOCAB, (3, 17))
    assert rel(model(ids).logits, dense(ids).logits) < 1e-4
    assert_cached_steps_and_generate_match(model, dense)


WINDOWED = {"mistral": lambda attn="sdpa": mistral(attn, sliding_window=5), "mixed_qwen2": mixed_qwen2}


@pytest.mark.parametrize("build", list(WINDOWED))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("path", ["latent", "rebuild"])
def test_kv_mode_keeps_sliding_windows(build, attn, path):
    """kv mode caches latents in HF's sliding-window cache layers, which drop the oldest keys: the
    keys' RoPE slots shift, and at full rank the logits, a cached step and generation past the window
    are still the dense model's (Mistral: every layer a window of 5; mixed Qwen2: one full layer, one
    window)."""
    dense = WINDOWED[build](attn)
    model = tmps.set_paths(compressed(dense, mode="kv", **FULL_RANK["kv"]), kv_attention=path)
    ids = torch.randint(0, VOCAB, (3, 17))
    assert rel(model(ids).logits, dense(ids).logits) < 1e-4
    assert_cached_steps_and_generate_match(model, dense)
    ids = torch.randint(1, VOCAB, (2, 3))  # a short prompt: generation crosses the window step by step
    g_dense = dense.generate(ids, max_new_tokens=9, do_sample=False)
    assert torch.equal(model.generate(ids, max_new_tokens=9, do_sample=False), g_dense)


@pytest.mark.parametrize("build", list(WINDOWED))
@pytest.mark.parametrize("chunks", [(3,), (9,), (3, 4), (5, 2)])
@pytest.mark.parametrize("path", ["latent", "rebuild"])
def test_kv_mode_static_cache_past_the_window(build, chunks, path):
    """HF's static sliding-window layer counts filled slots on the device until the window (5) is full,
    then shifts its keys left and returns the latest ones in order. Prompts within the window, past it
    in one chunk, crossing it in a second chunk (3 then 4) and starting full (5 then 2), then steps
    past it: as the dense model takes them."""
    dense = WINDOWED[build]()
    model = tmps.set_paths(compressed(dense, mode="kv", **FULL_RANK["kv"]), kv_attention=path)
    ids = torch.randint(1, VOCAB, (2, sum(chunks)))
    torch.testing.assert_close(static_cache_steps(model, ids, 4, chunks), static_cache_steps(dense, ids, 4, chunks),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("build", ["mixed_qwen2", "gemma3", "llama"])
def test_calibration_hands_each_layer_what_the_model_hands_it(build):
    """Each layer rerun on the captured inputs, one after another as tmps.compress runs them, gives the
    outputs it gives inside the model's own forward: the sliding layers get the window's mask (and in
    Gemma 3 their own RoPE tables), the full ones the causal mask. With every layer on the first layer's
    arguments, the sliding layers' outputs differ from the model's."""
    model = {"mixed_qwen2": mixed_qwen2, "gemma3": gemma3, "llama": llama}[build]()
    layers = model.model.layers
    batches = calibration_batches(torch.randint(0, VOCAB, (3, 17)), model)
    want = []
    handles = [layer.register_forward_hook(lambda m, a, k, out: want.append(out[0] if isinstance(out, tuple) else out),
                                           with_kwargs=True) for layer in layers]
    with torch.no_grad():
        model(input_ids=batches[0][0], attention_mask=batches[0][1], use_cache=False)
    for handle in handles:
        handle.remove()
    (first, kwargs), = capture_layer_inputs(model, layers, batches)
    assert len(kwargs) == len(layers)
    with torch.no_grad():
        hidden = first
        for index, layer in enumerate(layers):
            hidden = run_layer(layer, hidden, kwargs[index])
            torch.testing.assert_close(hidden, want[index], rtol=1e-5, atol=1e-5)
        if build != "llama":
            hidden = first
            for layer in layers:
                hidden = run_layer(layer, hidden, kwargs[0])
            assert rel(hidden, want[-1]) > 1e-3  # a hundred times the tolerance above


@pytest.mark.parametrize("arch, mode", [("qwen2", "kv"), ("mistral", "weights")])
def test_save_load_identical_logits(tmp_path, arch, mode):
    model = compressed(MODELS[arch](), mode=mode, ratio=0.5)
    tmps.save(model, tmp_path / arch)
    loaded = tmps.load(tmp_path / arch)
    assert type(loaded.model.layers[0].self_attn) is CLASSES[arch][1]
    ids = torch.randint(0, VOCAB, (2, 9))
    assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
@pytest.mark.parametrize("mode", ["kv", "weights"])
def test_llama_weights_as_mistral_or_qwen2_compress_to_the_same_model(arch, mode):
    """Below full rank too: a Llama's weights in a Mistral (no window) or a Qwen2 (zero biases) give
    the Llama's compressed logits, so everything tested on Llama holds for them."""
    source = llama()
    config = (MistralConfig if arch == "mistral" else Qwen2Config)(**SHAPE, attn_implementation="sdpa")
    if arch == "mistral":
        config.sliding_window = None
    target = (MistralForCausalLM if arch == "mistral" else Qwen2ForCausalLM)(config).eval()
    missing, unexpected = target.load_state_dict(source.state_dict(), strict=False)
    assert not unexpected and all(name.endswith("_proj.bias") for name in missing)
    with torch.no_grad():
        for name in missing:
            target.get_parameter(name).zero_()
    assert_compresses_like(target, source, mode, ratio=0.5)


def randomise_head_norms(model, seed: int, offset: float):
    """Random q_norm / k_norm weights (HF initialises them to the identity, which would leave them untested)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                norm.weight.copy_(torch.rand(norm.weight.shape, generator=gen) + offset)
    return model


def qwen3(attn="sdpa"):
    """head_dim 16 with 6 heads: q is 96 wide on a hidden size of 48, as in Qwen3 (head_dim 128 at
    hidden 1024); norm gains in [0.5, 1.5)."""
    return randomise_head_norms(Qwen3ForCausalLM(Qwen3Config(**SHAPE, head_dim=16, attn_implementation=attn)).eval(),
                                seed=8, offset=0.5)


def gemma3(attn="sdpa", kv_heads=1):
    """Gemma 3's layout at toy size: 4 query heads over 1 key/value head of 16 (q 64 wide on a hidden
    size of 48), layers alternating a window of 5 tokens with full attention (each kind with its own
    RoPE base), a softmax scale of 24^-½ (query_pre_attn_scalar) rather than 16^-½, and norm gains
    ``1 + w`` in [0.5, 1.5)."""
    config = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=16,
                              max_position_embeddings=256,
                              sliding_window=5, query_pre_attn_scalar=24,
                              layer_types=["sliding_attention", "full_attention"] * 2, attn_implementation=attn)
    return randomise_head_norms(Gemma3ForCausalLM(config).eval(), seed=9, offset=-0.5)


# Models with per-head q/k norms: builder, HF attention class, ours.
NORMED = {"qwen3": (qwen3, Qwen3Attention, Qwen3TuckerMPSAttention),
          "gemma3": (gemma3, Gemma3Attention, Gemma3TuckerMPSAttention)}


@pytest.mark.parametrize("arch", list(NORMED))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("mode", ["weights", "kv"])
def test_normed_full_rank_reproduces_dense_logits(arch, attn, mode):
    build, hf_class, ours = NORMED[arch]
    dense = build(attn)
    model = compressed(dense, mode=mode, **FULL_RANK[mode])
    attention = model.model.layers[0].self_attn
    assert type(attention) is ours and isinstance(attention, hf_class)
    assert [n for n, _ in attention.named_children()] == ["o_proj", "q_norm", "k_norm", "qkv"]
    assert (attention.k_down is not None) == (mode == "kv")
    ids = torch.randint(0, VOCAB, (3, 17))
    assert rel(model(ids).logits, dense(ids).logits) < 1e-4
    assert_cached_steps_and_generate_match(model, dense)


@pytest.mark.parametrize("arch", list(NORMED))
@pytest.mark.parametrize("path", ["latent", "rebuild"])
def test_normed_kv_mode_caches_latents_of_the_normalised_keys(arch, path):
    """At full rank the cached key latents, taken back up by ``k_up``, are the dense layer's keys after
    its k_norm (before RoPE); generation through a static cache (Gemma 3: past its 5-token window, in
    two chunks) takes the dense model's steps, on the latent and the rebuild path."""
    dense = NORMED[arch][0]()
    model = tmps.set_paths(compressed(dense, mode="kv", **FULL_RANK["kv"]), kv_attention=path)
    ids = torch.randint(1, VOCAB, (2, 9))
    attention, dense_attention = model.model.layers[1].self_attn, dense.model.layers[1].self_attn
    captured = {}
    handle = dense_attention.k_norm.register_forward_hook(lambda m, a, out: captured.update(k=out))
    with torch.no_grad():
        dense(ids)
        cache = model(ids, use_cache=True).past_key_values
    handle.remove()
    keys = captured["k"]  # (b, s, kv_heads, head_dim) in Qwen3, (b, kv_heads, s, head_dim) in Gemma 3
    if keys.shape[1] != ids.shape[1]:
        keys = keys.transpose(1, 2)
    rebuilt = cache.layers[1].keys.squeeze(1) @ attention.k_up.T
    torch.testing.assert_close(rebuilt, keys.flatten(2), rtol=1e-4, atol=1e-5)
    chunks = (3, 4)
    torch.testing.assert_close(static_cache_steps(model, ids, 4, chunks), static_cache_steps(dense, ids, 4, chunks),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", list(NORMED))
@pytest.mark.parametrize("mode", ["weights", "kv"])
def test_normed_models_apply_their_norms(arch, mode):
    """Scaling a k_norm weight changes the compressed model's logits, and as it changes the dense one's."""
    dense = NORMED[arch][0]()
    model = compressed(dense, mode=mode, **FULL_RANK[mode])
    ids = torch.randint(0, VOCAB, (2, 9))
    before = model(ids).logits
    with torch.no_grad():
        for m in (dense, model):
            m.model.layers[1].self_attn.k_norm.weight.mul_(3.0)
    assert rel(model(ids).logits, before) > 1e-3
    assert rel(model(ids).logits, dense(ids).logits) < 1e-4


@pytest.mark.parametrize("arch", list(NORMED))
@pytest.mark.parametrize("mode", ["weights", "kv"])
def test_normed_models_below_full_rank(arch, mode):
    """At half the Q/K/V parameters (weights) or half the KV cache (kv) every layer's calibration
    error is in (0, 1)."""
    model = compressed(NORMED[arch][0](), mode=mode, ratio=0.5, calibration=calib(16, 24))
    errors = [layer["calibration_error"] for layer in model.tmps_info["layers"]]
    assert all(0 < e < 1 for e in errors), errors


@pytest.mark.parametrize("arch", list(NORMED))
@pytest.mark.parametrize("mode", ["weights", "kv"])
def test_normed_save_load_identical_logits(tmp_path, arch, mode):
    model = compressed(NORMED[arch][0](), mode=mode, ratio=0.5)
    tmps.save(model, tmp_path / arch)
    loaded = tmps.load(tmp_path / arch)
    assert type(loaded.model.layers[0].self_attn) is NORMED[arch][2]
    ids = torch.randint(0, VOCAB, (2, 9))
    assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("arch", list(NORMED))
def test_head_norm_moments_are_those_of_the_dense_norms_outputs(arch):
    """``Σ q̂ q̂ᵀ`` and ``Σ k̂ k̂ᵀ`` over the real tokens, from the attention's input alone, equal those of
    what the dense layer's q_norm and k_norm output inside the model's forward."""
    model = NORMED[arch][0]()
    attention = model.model.layers[1].self_attn
    ids = torch.randint(1, VOCAB, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    seen = {}
    handles = [attention.register_forward_pre_hook(lambda m, a, k: seen.update(x=k["hidden_states"]),
                                                   with_kwargs=True),
               attention.q_norm.register_forward_hook(lambda m, a, out: seen.update(q=out)),
               attention.k_norm.register_forward_hook(lambda m, a, out: seen.update(k=out))]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for handle in handles:
        handle.remove()
    got = head_norm_moments(attention, architecture_of(model), seen["x"], mask)
    for name in ("q", "k"):
        heads = seen[name] if seen[name].shape[1] == ids.shape[1] else seen[name].transpose(1, 2)
        flat = heads.flatten(2)[mask.bool()].double()
        torch.testing.assert_close(got[name], flat.T @ flat, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("arch", list(NORMED))
def test_key_fisher_is_taken_at_the_normalised_keys(arch):
    """kv mode's K Fisher is ``(1/N) Σ g gᵀ`` over real tokens with ``g = ∂loss/∂k̂``, the gradient at
    the key norm's output, heads concatenated per token. The reference finds the token axis of that
    output by its length (9 tokens, 2 key heads), so it holds for both models' layouts (Qwen3 hands
    its norms (b, s, heads, head_dim), Gemma 3 (b, heads, s, head_dim))."""
    model = NORMED[arch][0]()
    if arch == "gemma3":
        model = randomise_head_norms(gemma3(kv_heads=2), seed=9, offset=-0.5)
    ids = torch.randint(1, VOCAB, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    got = projection_fisher(model, architecture_of(model), [(ids, mask)], ("k",), progress=False, key_norms=True)

    deltas = []

    def add_leaf(module, args, out):
        deltas.append(torch.zeros_like(out, requires_grad=True))
        return out + deltas[-1]

    handles = [layer.self_attn.k_norm.register_forward_hook(add_leaf) for layer in model.model.layers]
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100,
                                      reduction="sum").backward()
    for handle in handles:
        handle.remove()
    for layer_fisher, delta in zip(got, deltas):
        grad = delta.grad
        if grad.shape[1] != ids.shape[1]:
            grad = grad.transpose(1, 2)
        g = grad.flatten(2)[mask.bool()]
        assert layer_fisher["k"].shape == (32, 32)
        torch.testing.assert_close(layer_fisher["k"], g.T @ g / mask.sum(), rtol=1e-4, atol=1e-8)


def test_gemma3_keeps_its_scale_and_windows_and_generates_past_the_window():
    """query_pre_attn_scalar's scale and each layer's window stay the dense layer's; 17 prompt tokens
    and 8 new ones through HF's hybrid cache, whose sliding layers drop keys older than 5."""
    dense = gemma3()
    model = compressed(dense, mode="weights", **FULL_RANK["weights"])
    assert model.model.layers[1].self_attn.scaling == dense.model.layers[1].self_attn.scaling == 24 ** -0.5
    assert [layer.self_attn.sliding_window for layer in model.model.layers] == [5, None, 5, None]
    ids = torch.randint(1, VOCAB, (2, 17))
    g_dense = dense.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), g_dense)
