"""tmps.compress on small random OPT and Llama models: exact at full rank, smaller when asked, safe on bad input."""
import copy

import pytest
import torch
from transformers import (
    DynamicCache,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import tmps
from tmps.compat import cache_keyword
from tmps.models import LlamaTuckerMPSAttention, OPTTuckerMPSAttention, OPTTuckerMPSDecoderLayer

VOCAB = 96


# The Llama-family shape (GQA 6 / 2): Llama, and Mistral and Qwen2, whose attention is Llama's.
SHAPE = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
             num_key_value_heads=2, max_position_embeddings=256)


def llama(attn="sdpa", **kw):
    return LlamaForCausalLM(LlamaConfig(**SHAPE, attn_implementation=attn, **kw)).eval()


def mistral(attn="sdpa", sliding_window=None):
    """MistralConfig's default window is 4096 tokens; None (full attention) unless asked."""
    return MistralForCausalLM(MistralConfig(**SHAPE, attn_implementation=attn, sliding_window=sliding_window)).eval()


def randomise_qkv_biases(model, seed: int = 7):
    """Random q/k/v biases: HF initialises them to zero, which would leave their handling untested."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.copy_(torch.randn(proj.bias.shape, generator=gen))
    return model


def qwen2(attn="sdpa", **kw):
    """Random q/k/v biases (:func:`randomise_qkv_biases`)."""
    return randomise_qkv_biases(Qwen2ForCausalLM(Qwen2Config(**SHAPE, attn_implementation=attn, **kw)).eval())


def opt(attn="sdpa"):
    cfg = OPTConfig(vocab_size=VOCAB, hidden_size=48, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=256, word_embed_proj_dim=48, attn_implementation=attn)
    return OPTForCausalLM(cfg).eval()


MODELS = {"llama": llama, "opt": opt, "mistral": mistral, "qwen2": qwen2}
ARCHS = list(MODELS)
FULL_RANK = {"kv": {"ratio": 1.0}, "weights": {"hooi_ranks": [48]}}


def calib(n=8, seq=24):
    return torch.randint(0, VOCAB, (n, seq))


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def compressed(model, **kw):
    kw.setdefault("progress", False)
    return tmps.compress(copy.deepcopy(model), kw.pop("calibration", calib()), **kw)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ["kv", "weights"])
@pytest.mark.parametrize("method", ["tucker-mps", "tucker", "mps", "svd", "eigen"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_full_rank_reproduces_dense_logits(arch, mode, method, attn):
    if method == "eigen" and mode == "weights":
        pytest.skip("eigen is a kv-mode method")
    dense = MODELS[arch](attn)
    model = compressed(dense, mode=mode, method=method, **FULL_RANK[mode])
    ids = torch.randint(0, VOCAB, (3, 17))
    assert rel(model(ids).logits, dense(ids).logits) < 1e-4


@pytest.mark.parametrize("mode", ["kv", "weights"])
@pytest.mark.parametrize("method", ["tucker-mps", "tucker", "mps"])
@pytest.mark.parametrize("metric", ["fisher", "analytic"])
def test_full_rank_is_exact_with_fewer_calibration_tokens_than_hidden(mode, method, metric):
    """16 tokens against hidden 48: the input covariance is singular, and directions it never saw
    carry almost no whitened energy. Full rank keeps them all: inputs outside the calibration use them
    (tucker-mps with the Fisher metric dropped one by the MPS step's noise rule: 4e-4 off)."""
    dense = llama()
    model = compressed(dense, mode=mode, method=method, metric=metric, calibration=calib(1, 16), **FULL_RANK[mode])
    ids = torch.randint(0, VOCAB, (2, 20))
    assert rel(model(ids).logits, dense(ids).logits) < 1e-5


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ["kv", "weights"])
def test_full_rank_with_cache_padding_and_generate(arch, mode):
    dense = MODELS[arch]()
    assert_cached_steps_and_generate_match(compressed(dense, mode=mode, **FULL_RANK[mode]), dense)


def assert_cached_steps_and_generate_match(model, dense):
    """A left-padded prefill then one cached step, and greedy generation, as the dense model does them."""
    ids = torch.randint(1, VOCAB, (2, 11))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    outs = []
    for m in (dense, model):
        cache = DynamicCache()
        first = m(ids, attention_mask=mask, **{cache_keyword(m): cache}, use_cache=True)
        step = m(ids[:, -1:], attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1),
                 **{cache_keyword(m): first.past_key_values}, use_cache=True)
        outs.append((first.logits[mask.bool()], step.logits))
    assert rel(outs[1][0], outs[0][0]) < 1e-4
    assert rel(outs[1][1], outs[0][1]) < 1e-4
    g_dense = dense.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    g_model = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(g_dense, g_model)


def assert_compresses_like(target, source, mode, **kw):
    """``target`` holds ``source``'s weights in another architecture: the same dense logits, and,
    compressed on the same calibration data, the same ranks and logits. Returns both compressed models."""
    ids, data = torch.randint(0, VOCAB, (2, 13)), calib()
    torch.testing.assert_close(target(ids).logits, source(ids).logits, rtol=1e-5, atol=1e-5)
    want = compressed(source, mode=mode, calibration=data, **kw)
    got = compressed(target, mode=mode, calibration=data, **kw)
    assert [layer["ranks"] for layer in got.tmps_info["layers"]] == [layer["ranks"] for layer in want.tmps_info["layers"]]
    torch.testing.assert_close(got(ids).logits, want(ids).logits, rtol=1e-5, atol=1e-5)
    assert rel(want(ids).logits, source(ids).logits) > 1e-3  # below full rank, so the match means something
    return want, got


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_kv_latent_cache_reorders_and_crops_like_the_dense_cache(arch):
    """Beam search reorders the cache (``reorder_cache``), assisted and prompt-lookup decoding crop
    it (``crop``): on kv mode's latents both must act as on the dense keys and values. Each is
    checked by the next step's logits, then through ``generate`` itself."""
    dense = MODELS[arch]()
    model = compressed(dense, mode="kv", **FULL_RANK["kv"])
    ids = torch.randint(1, VOCAB, (3, 10))
    new = torch.randint(1, VOCAB, (1, 1)).expand(3, 1)  # one token for every row
    beams = torch.tensor([2, 0, 0])
    logits = []
    for m in (dense, model):
        cache = m(ids, **{cache_keyword(m): DynamicCache()}, use_cache=True).past_key_values
        cache.reorder_cache(beams)
        reordered = m(new, **{cache_keyword(m): cache}, use_cache=True).logits
        cache.crop(-4)  # drop the step and the prompt's last 3 tokens (a count: transformers 5.17 and 5.25)
        cropped = m(ids[:, 7:8], **{cache_keyword(m): cache}, use_cache=True).logits
        logits.append((reordered, cropped))
    (dense_reordered, dense_cropped), (reordered, cropped) = logits
    assert rel(reordered, dense_reordered) < 1e-4 and rel(cropped, dense_cropped) < 1e-4
    # the reorder did something: rows 1 and 2 now continue the same prompt
    assert torch.allclose(reordered[1], reordered[2]) and not torch.allclose(reordered[0], reordered[1])

    prompt = ids[:1]
    assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False, num_beams=3),
                       dense.generate(ids, max_new_tokens=5, do_sample=False, num_beams=3))
    greedy = dense.generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(prompt, max_new_tokens=8, do_sample=False, assistant_model=MODELS[arch]()),
                       greedy)
    assert torch.equal(model.generate(prompt, max_new_tokens=8, do_sample=False, prompt_lookup_num_tokens=3), greedy)


def test_bare_model_class_is_supported():
    dense = LlamaModel(llama().config).eval()
    model = compressed(dense, ratio=1.0)
    ids = torch.randint(0, VOCAB, (2, 9))
    assert rel(model(ids).last_hidden_state, dense(ids).last_hidden_state) < 1e-4


def test_replaced_modules_keep_prototype_names_and_subclass_hf():
    model = compressed(opt(), ratio=0.5)
    layer = model.model.decoder.layers[0]
    assert isinstance(layer, OPTTuckerMPSDecoderLayer)
    assert isinstance(layer.self_attn, OPTTuckerMPSAttention)
    llama_attn = compressed(llama(), ratio=0.5).model.layers[1].self_attn
    assert isinstance(llama_attn, LlamaTuckerMPSAttention) and llama_attn.layer_idx == 1


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_kv_cache_holds_reduced_width(arch):
    model = compressed(MODELS[arch](), mode="kv", hooi_ranks=[5, 7])
    out = model(torch.randint(0, VOCAB, (2, 10)), use_cache=True)
    layer0 = out.past_key_values.layers[0]
    assert layer0.keys.shape == (2, 1, 10, 5)
    assert layer0.values.shape == (2, 1, 10, 7)
    info = model.tmps_info["layers"][0]
    assert info["ranks"] == {"k": 5, "v": 7}
    d_kv = 2 * 8 if arch == "llama" else 48  # llama: 2 KV heads of 48/6; opt: 4 heads of 48/4
    assert info["kv_cache_kept"] == pytest.approx(12 / (2 * d_kv))


@pytest.mark.parametrize("mode", ["kv", "weights"])
def test_parameter_counts_match_report(mode):
    # rank_multiple=1: at these widths (K/V 16, input 48) steps of 8 could not land near 0.5
    dense = llama()
    model = compressed(dense, mode=mode, ratio=0.5, rank_multiple=1)
    for layer, info in zip(model.model.layers, model.tmps_info["layers"]):
        attn = layer.self_attn
        counted = sum(p.numel() for p in attn.qkv.parameters())
        counted += sum(p.numel() for p in (attn.k_up, attn.v_up) if p is not None)
        assert counted == info["qkv_parameters"]
    # the factors are parameters: HF's count is the dense one with Q/K/V's weights traded for them
    dense_qkv = sum(p.numel() for layer in dense.model.layers for name in ("q_proj", "k_proj", "v_proj")
                    for p in getattr(layer.self_attn, name).parameters())
    kept = sum(info["qkv_parameters"] for info in model.tmps_info["layers"])
    assert model.num_parameters() == dense.num_parameters() - dense_qkv + kept
    summary = tmps.summary(model.tmps_info)
    if mode == "weights":
        assert summary["qkv_parameters_kept"] <= 0.5 + 1e-9
        assert summary["qkv_parameters_kept"] > 0.4
    else:
        assert summary["kv_cache_kept"] == pytest.approx(0.5, abs=0.02)
    assert "total" in tmps.report(model)


@pytest.mark.parametrize("mode", ["kv", "weights"])
def test_factors_are_parameters_trained_like_the_dense_weights(mode):
    """Fine-tuning after compression: one Adam step over ``model.parameters()`` moves every factor
    (they were buffers, which no optimizer saw; Adam's step does not scale with the gradient, and
    in this random model the keys barely move the loss); a frozen model compresses to frozen factors."""
    model = compressed(llama(), mode=mode, ratio=0.5)
    attention = model.model.layers[0].self_attn
    factors = {n: p for n, p in attention.named_parameters() if n.startswith("qkv.") or n in ("k_up", "v_up")}
    assert len(factors) == (5 if mode == "kv" else 4) and all(p.requires_grad for p in factors.values())
    before = {n: p.detach().clone() for n, p in factors.items()}
    ids = torch.randint(0, VOCAB, (2, 9))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    assert all(not torch.equal(before[n], p) for n, p in factors.items())
    frozen = compressed(llama().requires_grad_(False), mode=mode, ratio=0.5)
    assert not any(p.requires_grad for p in frozen.parameters())


def test_ratio_orders_error_and_size():
    dense = llama()
    ids = torch.randint(0, VOCAB, (2, 16))
    ref = dense(ids).logits
    errors, kept = [], []
    for ratio in (0.25, 0.5, 0.9):
        m = compressed(dense, mode="kv", ratio=ratio, rank_multiple=1)  # 16-wide K/V: steps of 1
        errors.append(rel(m(ids).logits, ref))
        kept.append(tmps.summary(m.tmps_info)["kv_cache_kept"])
    assert kept[0] < kept[1] < kept[2]
    assert errors[0] > errors[2]


def wide_llama():
    """K/V 64 wide, input 64: room for ranks in steps of 8."""
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def planned_ranks(model) -> list[int]:
    ranks = []
    for layer in model.tmps_info["layers"]:
        r = layer["ranks"]
        ranks += [r["k"], r["v"]] if "k" in r else [r["r_in"]]
    return ranks


@pytest.mark.parametrize("mode, rule", [
    ("kv", {"ratio": 0.3}),                                           # Fisher, greedy over K, V and layers
    ("kv", {"ratio": 0.3, "metric": "analytic"}),                     # k_share split, energy threshold
    ("kv", {"ratio": 0.3, "metric": "analytic", "allocation": "uniform"}),
    ("kv", {"error_budget": 0.1}),                                    # energy rule: rounded up
    ("weights", {"ratio": 0.3}),
    ("weights", {"ratio": 0.3, "metric": "analytic"}),
    ("weights", {"ratio": 0.3, "allocation": "uniform"}),
])
def test_planned_ranks_are_multiples_of_rank_multiple(mode, rule):
    dense, data = wide_llama(), calib()
    aligned = compressed(dense, mode=mode, calibration=data, **rule)  # default rank_multiple=8
    free = compressed(dense, mode=mode, calibration=data, rank_multiple=1, **rule)
    ranks, unaligned = planned_ranks(aligned), planned_ranks(free)
    assert all(r % 8 == 0 and r > 0 for r in ranks), ranks
    assert any(r % 8 for r in unaligned), f"the case does not exercise the rounding: {unaligned}"
    # the budget rules stay within budget; their rounding costs less than one step per basis
    if "ratio" in rule:
        key = "kv_cache_kept" if mode == "kv" else "qkv_parameters_kept"
        kept = tmps.summary(aligned.tmps_info)[key]
        assert kept <= rule["ratio"] + 1e-9
        assert sum(ranks) > sum(unaligned) - 8 * len(ranks)
    else:  # an error budget keeps at least what the rule keeps
        assert all(a >= u for a, u in zip(ranks, unaligned))
    # the stored factors have those widths: latent rows of 8k numbers, 16-byte aligned in fp16
    attn = aligned.model.layers[0].self_attn
    if mode == "kv":
        assert attn.k_up.shape[1] % 8 == 0 and attn.v_up.shape[1] % 8 == 0
    else:
        assert attn.qkv.in_factor.shape[1] % 8 == 0


def test_rank_multiple_leaves_explicit_ranks_and_baselines_alone():
    dense, data = wide_llama(), calib()
    explicit = compressed(dense, mode="kv", hooi_ranks=[13, 21], calibration=data)
    assert all(layer["ranks"] == {"k": 13, "v": 21} for layer in explicit.tmps_info["layers"])
    for mode, method in (("weights", "svd"), ("kv", "svd"), ("kv", "eigen")):
        ranks = [[layer["ranks"] for layer in compressed(dense, mode=mode, method=method, ratio=0.3,
                                                          calibration=data, rank_multiple=multiple).tmps_info["layers"]]
                 for multiple in (8, 1)]
        assert ranks[0] == ranks[1], (mode, method)


@pytest.mark.parametrize("bad", [0, -8, 2.5, True, "8"])
def test_bad_rank_multiple_is_refused_before_touching_the_model(bad):
    model = llama()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="rank_multiple"):
        tmps.compress(model, calib(), rank_multiple=bad, progress=False)
    assert not tmps.is_compressed(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_mps_eps_and_error_budget_change_ranks():
    dense = llama()
    low = compressed(dense, mode="weights", mps_eps=0.5)
    high = compressed(dense, mode="weights", mps_eps=0.99)
    assert low.tmps_info["layers"][0]["ranks"]["r_in"] < high.tmps_info["layers"][0]["ranks"]["r_in"]
    tight = compressed(dense, mode="kv", error_budget=0.01)
    loose = compressed(dense, mode="kv", error_budget=0.3)
    assert tmps.summary(tight.tmps_info)["kv_cache_kept"] > tmps.summary(loose.tmps_info)["kv_cache_kept"]


def test_hooi_ranks_set_every_layer():
    model = compressed(llama(), mode="weights", method="tucker", hooi_ranks=[20, 4, 6])
    for layer in model.model.layers:
        qkv = layer.self_attn.qkv
        assert qkv.in_factor.shape == (48, 20)  # (hidden, r_in)
        assert qkv.core_0.shape == (6, 6, 20) and qkv.out_factor_0.shape == (8, 6)  # 6 q heads; head_dim 8 -> 6
        assert qkv.core_1.shape == (2, 6, 20)


def test_greedy_allocation_beats_uniform_on_calibration_error():
    dense = llama()
    greedy = compressed(dense, mode="kv", ratio=0.4, allocation="greedy")
    uniform = compressed(dense, mode="kv", ratio=0.4, allocation="uniform")
    g, u = tmps.summary(greedy.tmps_info), tmps.summary(uniform.tmps_info)
    assert g["kv_cache_kept"] == pytest.approx(u["kv_cache_kept"], abs=0.03)


def test_calibration_none_samples_from_the_model_deterministically():
    dense = llama()
    a = tmps.compress(copy.deepcopy(dense), None, ratio=0.5, calibration_samples=4, calibration_seq_len=16, progress=False)
    b = tmps.compress(copy.deepcopy(dense), None, ratio=0.5, calibration_samples=4, calibration_seq_len=16, progress=False)
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(x, y)


def test_tokenizer_style_batches_with_padding_are_accepted():
    dense = llama()
    ids = torch.randint(0, VOCAB, (4, 20))
    mask = torch.ones_like(ids)
    mask[:, :5] = 0
    model = compressed(dense, calibration=[{"input_ids": ids, "attention_mask": mask}], ratio=0.5)
    assert tmps.is_compressed(model)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_full_rank_close(dtype):
    dense = llama().to(dtype)
    model = compressed(dense, ratio=1.0)
    ids = torch.randint(0, VOCAB, (2, 12))
    assert model.model.layers[0].self_attn.qkv.core_0.dtype == dtype
    assert rel(model(ids).logits.float(), dense(ids).logits.float()) < 3e-2


def test_save_load_identical_logits(tmp_path):
    for mode in ("kv", "weights"):
        model = compressed(llama(tie_word_embeddings=True), mode=mode, ratio=0.5)
        tmps.save(model, tmp_path / mode)
        loaded = tmps.load(tmp_path / mode)
        ids = torch.randint(0, VOCAB, (2, 9))
        assert torch.equal(loaded(ids).logits, model(ids).logits)
        assert loaded.tmps_info["layers"] == model.tmps_info["layers"]


# ---------------------------------------------------------------- bad input leaves the model unchanged
def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def assert_unchanged(model, snap):
    state, types = snap
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], state[k]) for k in state)
    assert [type(m) for m in model.modules()] == types
    assert not tmps.is_compressed(model)


@pytest.mark.parametrize(
    "kwargs,calibration,error,match",
    [
        ({"ratio": 0.0}, None, ValueError, r"outside \(0, 1\]"),
        ({"ratio": 1.5}, None, ValueError, r"outside \(0, 1\]"),
        ({"mps_eps": 0.0}, None, ValueError, r"outside \(0, 1\]"),
        ({"error_budget": -0.1}, None, ValueError, "error_budget"),
        ({"mode": "weights", "hooi_ranks": [999]}, None, ValueError, "exceeds"),
        ({"mode": "kv", "hooi_ranks": [0, 3]}, None, ValueError, "positive"),
        ({"mode": "kv", "hooi_ranks": [500, 3]}, None, ValueError, "exceeds"),
        ({"mode": "fast"}, None, ValueError, "mode='fast'"),
        ({"method": "magic"}, None, ValueError, "method='magic'"),
        ({"ratio": 0.5, "error_budget": 0.1}, None, ValueError, "one rank rule"),
        ({}, torch.empty(0, 8, dtype=torch.long), ValueError, "empty"),
        ({}, [], ValueError, "empty"),
        ({}, torch.rand(2, 8), TypeError, "integer token ids"),
        ({}, torch.full((2, 8), VOCAB + 5), ValueError, "vocabulary"),
        ({}, torch.randint(0, VOCAB, (1, 300)), ValueError, "max_position_embeddings"),
    ],
)
def test_bad_input_raises_and_leaves_model_unchanged(kwargs, calibration, error, match):
    model = llama()
    snap = snapshot(model)
    with pytest.raises(error, match=match):
        tmps.compress(model, calibration if calibration is not None else calib(), progress=False, **kwargs)
    assert_unchanged(model, snap)


def test_unsupported_model_lists_supported():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).eval()
    with pytest.raises(ValueError, match=r"supports model types \['gemma3_text', 'granite', 'llama', 'mistral', 'mixtral', 'opt', 'phi3', 'qwen2', 'qwen2_moe', 'qwen3', 'qwen3_moe', 'smollm3'\]"):
        tmps.compress(model, torch.randint(0, 50, (2, 8)), progress=False)


def test_nan_weights_rejected_and_unchanged():
    model = llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    snap = snapshot(model)
    with pytest.raises(ValueError, match="NaN/Inf"):
        tmps.compress(model, calib(), progress=False)
    state, _ = snap
    assert all(torch.equal(v, state[k]) or torch.isnan(v).any() for k, v in model.state_dict().items())


class _Int8Linear(torch.nn.Module):
    """What a quantized projection looks like to tmps: packed integers where the weight was."""

    def __init__(self, linear):
        super().__init__()
        self.weight = torch.nn.Parameter(linear.weight.detach().to(torch.int8), requires_grad=False)

    def forward(self, x):
        return x @ self.weight.to(x.dtype).T


class _LoraLinear(torch.nn.Module):
    """PEFT's layout: the dense layer as ``base_layer``, the adapters beside it."""

    def __init__(self, linear):
        super().__init__()
        self.base_layer = linear
        self.lora_A = torch.nn.Linear(linear.in_features, 2, bias=False)

    @property
    def weight(self):
        return self.base_layer.weight

    def forward(self, x):
        return self.base_layer(x)


@pytest.mark.parametrize("wrap, match", [(_Int8Linear, "torch.int8 weight.*quantized"),
                                         (_LoraLinear, "adapters.*merge_and_unload")])
def test_quantized_or_adapter_projections_refused_and_unchanged(wrap, match):
    model = llama()
    attention = model.model.layers[1].self_attn
    attention.k_proj = wrap(attention.k_proj)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=f"layer 1: the k projection \\({wrap.__name__}\\) .*{match}"):
        tmps.compress(model, calib(), progress=False)
    assert_unchanged(model, snap)


def test_already_compressed_refused():
    model = compressed(llama(), ratio=0.5)
    with pytest.raises(ValueError, match="already compressed"):
        tmps.compress(model, calib(), progress=False)


def test_failure_in_a_middle_layer_restores_everything(monkeypatch):
    import tmps.compressor as compress_module

    model = opt()
    snap = snapshot(model)
    original = compress_module.build_compressed_attention
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(compress_module, "build_compressed_attention", failing)
    with pytest.raises(KeyboardInterrupt):
        tmps.compress(model, calib(), progress=False)
    assert calls["n"] == 2
    assert_unchanged(model, snap)


def test_calibration_on_wrong_device_is_explained():
    model = llama()
    ids = calib().to("meta")
    with pytest.raises(ValueError, match="move it"):
        tmps.compress(model, ids, progress=False)


# ---------------------------------------------------------------- Q factored in kv mode (q_ratio)
@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_q_ratio_is_exact_when_queries_span_a_shared_subspace(arch):
    """Every head's Q rows inside one s-dim subspace of head_dim: q_ratio = s / head_dim loses nothing."""
    dense = MODELS[arch]()
    for layer in (dense.model.layers if arch == "llama" else dense.model.decoder.layers):
        attn = layer.self_attn
        w = attn.q_proj.weight
        hd = attn.head_dim
        shared = torch.randn(hd, hd // 2)
        with torch.no_grad():
            w.copy_(torch.cat([shared @ torch.randn(hd // 2, w.shape[1]) for _ in range(w.shape[0] // hd)]) * 0.1)
    # head_dim is 8 here: ranks in steps of 8 could not keep half of it
    model = compressed(dense, ratio=1.0, q_ratio=0.5, rank_multiple=1)
    assert all(layer["ranks"]["q"] == hd // 2 for layer in model.tmps_info["layers"])
    ids = torch.randint(0, VOCAB, (2, 9))
    assert rel(model(ids).logits, dense(ids).logits) < 1e-4


def test_q_ratio_trades_query_error_for_parameters(tmp_path):
    dense = llama()
    calibration = calib()
    kept, errors = [], []
    ids = torch.randint(0, VOCAB, (2, 9))
    for q_ratio in (1.0, 0.75, 0.25):
        model = compressed(dense, ratio=1.0, q_ratio=q_ratio, calibration=calibration, rank_multiple=1)
        kept.append(tmps.summary(model.tmps_info)["qkv_parameters_kept"])
        errors.append(rel(model(ids).logits, dense(ids).logits))
        assert tmps.summary(model.tmps_info)["kv_cache_kept"] == 1.0
    assert kept[0] > kept[1] > kept[2]
    assert errors[0] < 1e-4 < errors[1] < errors[2]
    tmps.save(model, tmp_path / "q")
    assert torch.equal(tmps.load(tmp_path / "q")(ids).logits, model(ids).logits)


@pytest.mark.parametrize("kw, match", [
    ({"q_ratio": 0.0}, "outside"),
    ({"q_ratio": 1.5}, "outside"),
    ({"q_ratio": 0.5, "mode": "weights"}, "kv mode"),
    ({"q_ratio": 0.5, "method": "svd"}, "kv mode"),
])
def test_q_ratio_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        compressed(llama(), **kw)
