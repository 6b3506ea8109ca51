"""kv mode's attention over the latent cache against rebuilding full keys and values."""
import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

import tmps
from tmps.compat import cache_keyword
from tmps.models import attention as attention_module
from tmps.models.rope import rotate_half
from tmps.models.latent_attention import latent_attention, prefers_latent, rope_key_scores_torch

from test_compress import ARCHS, MODELS, SHAPE, VOCAB, calib, llama, opt, rel
from test_rope import RecordOps


def rebuild_reference(q, c_k, c_v, k_up, v_up, mask, scaling, rope=None):
    """Full keys/values from the latents, RoPE on the keys, SDPA with GQA: (b, q_len, heads, head_dim)."""
    b, heads, q_len, head_dim = q.shape
    kv_heads = k_up.shape[0] // head_dim
    k = (c_k @ k_up.T).view(b, -1, kv_heads, head_dim).transpose(1, 2)
    v = (c_v @ v_up.T).view(b, -1, kv_heads, head_dim).transpose(1, 2)
    if rope is not None:
        cos, sin = rope
        k = k * cos + rotate_half(k) * sin
    k = k.repeat_interleave(heads // kv_heads, dim=1)
    v = v.repeat_interleave(heads // kv_heads, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2)


def random_case(b, heads, kv_heads, q_len, total, head_dim, r_k, r_v, dtype=torch.float64):
    q = torch.randn(b, heads, q_len, head_dim, dtype=dtype)
    c_k, c_v = torch.randn(b, total, r_k, dtype=dtype), torch.randn(b, total, r_v, dtype=dtype)
    k_up = torch.randn(kv_heads * head_dim, r_k, dtype=dtype) / r_k**0.5
    v_up = torch.randn(kv_heads * head_dim, r_v, dtype=dtype) / r_v**0.5
    return q, c_k, c_v, k_up, v_up


def rope_tables(total, head_dim, dtype=torch.float64):
    inv = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, dtype=dtype) / head_dim)
    freqs = torch.outer(torch.arange(total, dtype=dtype), inv)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def bottom_right_causal(q_len, total):
    return torch.arange(total).unsqueeze(0) <= torch.arange(total - q_len, total).unsqueeze(1)


@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive", "causal"])
@pytest.mark.parametrize("heads,kv_heads,q_len", [(6, 2, 1), (4, 4, 3), (9, 3, 7)])
def test_matches_rebuilding_keys_and_values(rope, mask_kind, heads, kv_heads, q_len):
    b, total, head_dim, r_k, r_v = 2, 13, 8, 5, 11
    q, c_k, c_v, k_up, v_up = random_case(b, heads, kv_heads, q_len, total, head_dim, r_k, r_v)
    tables = rope_tables(total, head_dim) if rope else None
    keep = bottom_right_causal(q_len, total).expand(b, 1, q_len, total).clone()
    keep[0, ..., :4] = False  # left padding of the first sequence
    if mask_kind == "none":
        if q_len > 1:
            pytest.skip("no mask means causal when q_len > 1: the 'causal' case")
        mask, ref_mask = None, None
    elif mask_kind == "causal":  # None with several queries: SDPA's is_causal, top-left aligned
        if q_len == 1:
            pytest.skip("None with one query means no mask: the 'none' case")
        mask, ref_mask = None, torch.ones(q_len, total, dtype=torch.bool).tril()
    elif mask_kind == "bool":
        mask, ref_mask = keep, keep
    else:
        additive = torch.zeros(b, 1, q_len, total + 3, dtype=torch.float64)  # wider than T, as a static cache's
        additive[..., :total].masked_fill_(~keep, torch.finfo(torch.float64).min)
        mask, ref_mask = additive, keep
    out, probs = latent_attention(q, c_k, c_v, k_up, v_up, mask, 0.3, rope=tables)
    ref = rebuild_reference(q, c_k, c_v, k_up, v_up, ref_mask, 0.3, rope=tables)
    assert out.shape == (b, q_len, heads, head_dim)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert probs.shape == (b, heads, q_len, total)
    torch.testing.assert_close(probs.sum(-1), torch.ones(b, heads, q_len, dtype=torch.float64))


def test_rope_key_scores_are_query_dot_rotated_rebuilt_keys():
    q, c_k, _, k_up, _ = random_case(1, 2, 2, 3, 9, 8, 6, 6)
    cos, sin = rope_tables(9, 8)
    scores = rope_key_scores_torch(q, c_k, k_up, cos, sin)
    k = (c_k @ k_up.T).view(1, 9, 2, 8).transpose(1, 2)
    for t in range(9):
        angle = torch.arange(0, 8, 2, dtype=torch.float64) / 8
        theta = t / 10000**angle
        rotation = torch.zeros(8, 8, dtype=torch.float64)  # the rotation matrix R_t of rotate_half pairs (j, j+4)
        for j in range(4):
            c, s = theta[j].cos(), theta[j].sin()
            rotation[j, j], rotation[j, j + 4], rotation[j + 4, j], rotation[j + 4, j + 4] = c, -s, s, c
        expected = q @ (k[:, :, t] @ rotation.T).unsqueeze(-1)
        torch.testing.assert_close(scores[..., t:t + 1], expected)


def test_prefers_latent_is_the_flop_crossover():
    assert prefers_latent(num_heads=32, q_len=1, kv_width=2048)
    assert prefers_latent(num_heads=32, q_len=64, kv_width=2048)
    assert not prefers_latent(num_heads=32, q_len=65, kv_width=2048)


def kv_model(arch, attn):
    dense = {"llama": llama, "opt": opt}[arch](attn)
    return tmps.compress(copy.deepcopy(dense), calib(), mode="kv", ratio=0.5, progress=False)


def count_latent_calls(monkeypatch):
    calls = []
    original = attention_module.latent_attention

    def counted(*args, **kwargs):
        calls.append(args[0].shape[2])  # q_len
        return original(*args, **kwargs)

    monkeypatch.setattr(attention_module, "latent_attention", counted)
    return calls


def cached_steps(model, ids, mask, chunk):
    """Prefill ``ids`` then feed ``chunk`` new tokens at once: (prefill logits, chunk logits)."""
    cache = DynamicCache()
    first = model(ids, attention_mask=mask, **{cache_keyword(model): cache}, use_cache=True)
    new = torch.randint(1, VOCAB, (ids.shape[0], chunk))
    mask = torch.cat([mask, torch.ones(ids.shape[0], chunk, dtype=mask.dtype)], 1)
    step = model(new, attention_mask=mask, **{cache_keyword(model): first.past_key_values}, use_cache=True)
    return first.logits, step.logits


def kernels_run_here():
    """Whether the Triton kernels run on this CPU (the interpreter is on: TRITON_INTERPRET=1)."""
    import tmps.kernels_bridge as bridge

    return bridge.triton_path_available(torch.device("cpu"))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not kernels_run_here(), reason="Triton's interpreter is not on (TRITON_INTERPRET=1)"))])
@pytest.mark.parametrize("path", ["latent", "rebuild"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_a_decode_query_that_attends_to_nothing_gets_what_dense_gives(arch, attn, path, backend):
    """A decode step whose attention mask hides every position of one row (transformers 5.17's
    Phi-3 generate passes such a row once it crosses the original context): HF's sdpa attention
    returns zeros there (torch's SDPA), eager the values' uniform average. The latent path averaged
    under both: 0.57 (Llama) and 0.43 (OPT) relative off the dense logits of that row under sdpa
    (this test on the library of b00a0cc); at full rank it now gives the dense logits on every path."""
    dense = {"llama": llama, "opt": opt}[arch](attn)
    model = tmps.compress(copy.deepcopy(dense), calib(), mode="kv", ratio=1.0, progress=False)
    tmps.set_paths(model, kv_attention=path, backend=backend)
    ids, step = torch.randint(1, VOCAB, (2, 7)), torch.randint(1, VOCAB, (2, 1))
    step_mask = torch.ones(2, 8, dtype=torch.long)
    step_mask[0] = 0
    logits = []
    for m in (dense, model):
        cache = DynamicCache(config=dense.config)
        with torch.no_grad():
            m(ids, **{cache_keyword(m): cache})
            logits.append(m(step, attention_mask=step_mask, **{cache_keyword(m): cache}).logits)
    errors = [rel(got, want) for got, want in zip(*logits[::-1])]  # per row: the hidden one, then a plain one
    assert max(errors) < 1e-5, errors


@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("chunk", [1, 3])
def test_compressed_model_latent_equals_rebuild(arch, attn, chunk, monkeypatch):
    model = kv_model(arch, attn)
    ids = torch.randint(1, VOCAB, (2, 11))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    results = {}
    for path in ("rebuild", "latent"):
        tmps.set_paths(model, kv_attention=path)
        torch.manual_seed(1)
        results[path] = cached_steps(model, ids, mask, chunk)
    valid = mask.bool()
    torch.testing.assert_close(results["latent"][0][valid], results["rebuild"][0][valid], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results["latent"][1], results["rebuild"][1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_auto_reads_latents_for_decode_and_rebuilds_for_prefill(arch, monkeypatch):
    model = kv_model(arch, "sdpa")
    calls = count_latent_calls(monkeypatch)
    ids = torch.randint(1, VOCAB, (2, 15))
    cached_steps(model, ids, torch.ones_like(ids), 1)
    layers = model.config.num_hidden_layers
    assert calls == [1] * layers  # 15 query tokens x heads exceed d_kv (llama 16, opt 48); one token does not
    g_auto = model.generate(ids, max_new_tokens=5, do_sample=False)
    tmps.set_paths(model, kv_attention="rebuild")
    assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False), g_auto)


def test_eager_returns_the_attention_probabilities():
    model = kv_model("llama", "eager")
    ids = torch.randint(1, VOCAB, (1, 7))
    out = {}
    for path in ("rebuild", "latent"):
        tmps.set_paths(model, kv_attention=path)
        cache = DynamicCache()
        first = model(ids, **{cache_keyword(model): cache}, use_cache=True)
        out[path] = model(ids[:, -1:], **{cache_keyword(model): first.past_key_values}, use_cache=True,
                          output_attentions=True).attentions
    for latent, rebuilt in zip(out["latent"], out["rebuild"]):
        assert latent.shape == rebuilt.shape == (1, 6, 1, 8)
        torch.testing.assert_close(latent, rebuilt, rtol=1e-5, atol=1e-6)


def test_unknown_kv_attention_is_a_clear_error():
    model = kv_model("opt", "sdpa")
    next(m for m in model.modules() if hasattr(m, "kv_attention")).kv_attention = "fast"
    with pytest.raises(ValueError, match="kv_attention must be 'auto', 'latent' or 'rebuild'"):
        model(torch.randint(1, VOCAB, (1, 5)))


def static_cache_steps(model, ids, steps, chunks=None, max_len=32):
    """Logits ``(b, s + steps, vocab)`` of ``ids`` fed through HF's StaticCache in ``chunks`` (token counts;
    default all at once), then of ``steps`` greedy single-token steps."""
    from transformers import StaticCache

    cache, logits, start = StaticCache(config=model.config, max_cache_len=max_len), [], 0
    for size in chunks or (ids.shape[1],):
        out = model(ids[:, start:start + size], **{cache_keyword(model): cache}, use_cache=True)
        logits.append(out.logits)
        start += size
    for _ in range(steps):
        out = model(out.logits[:, -1:].argmax(-1), **{cache_keyword(model): cache}, use_cache=True)
        logits.append(out.logits)
    return torch.cat(logits, 1)


def assert_static_cache_decodes_like_dense(dense, path):
    """kv mode at full rank on ``path`` ("latent" or "rebuild"): a prompt and 4 greedy steps through
    HF's StaticCache give the dense model's logits."""
    model = tmps.compress(copy.deepcopy(dense), calib(), mode="kv", ratio=1.0, progress=False)
    tmps.set_paths(model, kv_attention=path)
    ids = torch.randint(1, VOCAB, (2, 9))
    torch.testing.assert_close(static_cache_steps(model, ids, 4), static_cache_steps(dense, ids, 4),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("path", ["latent", "rebuild"])
def test_static_cache_decodes_like_dense(arch, path):
    """A static cache holds more slots than are filled: RoPE must use the filled positions, not its size."""
    assert_static_cache_decodes_like_dense(MODELS[arch](), path)


def test_set_paths_sets_every_layer_and_explains_bad_values():
    model = kv_model("llama", "sdpa")
    assert tmps.set_paths(model, backend="torch", kv_attention="rebuild") is model
    attentions = [m for m in model.modules() if hasattr(m, "kv_attention")]
    assert len(attentions) == model.config.num_hidden_layers
    assert all(m.kv_attention == "rebuild" and m.qkv.backend == "torch" for m in attentions)
    tmps.set_paths(model, kv_attention="latent")  # backend=None leaves the backend as it was
    assert all(m.kv_attention == "latent" and m.qkv.backend == "torch" for m in attentions)
    with pytest.raises(ValueError, match=r"kv_attention='fast': choose one of auto, latent, rebuild"):
        tmps.set_paths(model, kv_attention="fast")
    with pytest.raises(ValueError, match=r"backend='cuda': choose one of auto, torch, triton"):
        tmps.set_paths(model, backend="cuda")
    assert all(m.kv_attention == "latent" for m in attentions)  # a refused call changes nothing
    with pytest.raises(ValueError, match="holds no compressed module: compress it first"):
        tmps.set_paths(llama(), backend="torch")


# Ops that launch no device kernel: views, allocations, the CPU scalar a where() fills with.
_NO_KERNEL = ("view", "expand", "permute", "transpose", "slice", "alias", "t.default", "select", "unsqueeze",
              "squeeze", "detach", "as_strided", "new_empty", "empty", "scalar_tensor")


def test_no_rope_decode_launches_at_most_seven_ops():
    """Under CUDA graphs a decode step pays per kernel: scores (baddbmm, scale as alpha), mask (where),
    one softmax, and the two absorbed up-projections (einsum -> bmm) plus the value product; a
    boolean (sdpa) mask also zeroes the probabilities of a row with nothing to attend to (where), as
    torch's SDPA does."""
    q, c_k, c_v, k_up, v_up = random_case(2, 8, 8, 1, 40, 16, 24, 40, dtype=torch.float16)
    mask = torch.ones(2, 1, 1, 40, dtype=torch.bool)
    with RecordOps() as record:
        latent_attention(q, c_k, c_v, k_up, v_up, mask, 0.25)
    launched = [op for op in record.ops if not any(name in op for name in _NO_KERNEL)]
    assert len(launched) <= 7, launched


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_softmax_equals_float_softmax_then_cast(dtype):
    """What lets the latent path drop the upcast and the cast back: one rounding of the fp32 softmax,
    in one kernel. Bit-equal on some CPUs; on an AVX-512 EPYC a few outputs land one unit in the last
    place the other way, so the check is at most one unit apart (positive floats of one dtype are
    ordered like their bit patterns), and never further from the exact softmax than the cast."""
    from tmps.models.latent_attention import _softmax

    scores = (torch.randn(64, 8, 1, 1000) * 4).to(dtype)
    want = torch.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)
    got = _softmax(scores, dtype)
    assert got.dtype == dtype
    units_apart = (got.view(torch.int16).int() - want.view(torch.int16).int()).abs()
    assert int(units_apart.max()) <= 1
    exact = torch.softmax(scores.double(), dim=-1)
    spacing = torch.finfo(dtype).eps * exact + torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    assert bool(((got.double() - exact).abs() <= spacing).all())


def test_rope_decode_computes_the_rotary_table_once_per_step():
    """The cache's cos/sin table is computed once and sliced by every layer: a decode step computes
    only the model's own table for the new position (HF's, once per forward), not one per layer."""
    model = kv_model("llama", "sdpa")
    assert model.config.num_hidden_layers == 2
    ids = torch.randint(1, VOCAB, (2, 6))
    cache = DynamicCache()
    with torch.no_grad():
        out = model(ids, **{cache_keyword(model): cache}, use_cache=True)
        for _ in range(2):  # the second step's context still fits the first one's table
            nxt = out.logits[:, -1:].argmax(-1)
            with RecordOps() as record:
                out = model(nxt, **{cache_keyword(model): cache}, use_cache=True)
    assert sum("aten.cos" in op for op in record.ops) == 1


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_latent_decode_with_gradients_keeps_to_the_torch_chain(arch, monkeypatch):
    """Gradients through a cached decode step over the latents (attributions, training on decode
    steps): with the kernels pretended available, none is asked for, since they have no backward, and
    the input's gradient is the torch path's."""
    from tmps import kernels_bridge as bridge

    model = tmps.set_paths(tmps.compress(copy.deepcopy(MODELS[arch]()), calib(), mode="kv", ratio=0.5,
                                         progress=False), kv_attention="latent")
    ids = torch.randint(1, VOCAB, (2, 6))
    embed = model.get_input_embeddings()

    def step_gradient():
        cache = model(ids[:, :-1], **{cache_keyword(model): DynamicCache()}, use_cache=True).past_key_values
        x = embed(ids[:, -1:]).detach().requires_grad_()
        model(inputs_embeds=x, **{cache_keyword(model): cache}, use_cache=True).logits.square().sum().backward()
        return x.grad

    want = step_gradient()
    monkeypatch.setattr(bridge, "kernel_preferred_on", lambda device: True)
    for name in ("latent_decode_for", "latent_rope_scores_for", "faster_path"):
        monkeypatch.setattr(bridge, name, lambda *a, _n=name, **k: pytest.fail(f"{_n} asked where gradients flow"))
    torch.testing.assert_close(step_gradient(), want)


def greedy_steps(model, ids, steps, cache):
    """Logits of ``ids`` at once through ``cache``, then of ``steps`` greedy single-token steps."""
    keyword = cache_keyword(model)
    out = model(ids, **{keyword: cache}, use_cache=True)
    logits = [out.logits]
    for _ in range(steps):
        out = model(out.logits[:, -1:].argmax(-1), **{keyword: cache}, use_cache=True)
        logits.append(out.logits)
    return torch.cat(logits, 1)


def assert_kv_decodes_like_dense_past_the_context(dense, path, cache_kind, calibration, context=16):
    """For RoPE whose frequencies change past the original ``context`` (longrope, dynamic NTK): the
    dense cache holds each key as rotated by the forward that wrote it. kv mode at full rank on
    ``path``, through a ``cache_kind`` cache, gives the dense logits for a 10-token prompt decoded 14
    steps past the context and for a 20-token prompt past it from the start. The first case has
    teeth: there the dense cache's last logits differ from one forward over the same tokens (which
    rotates every key with the latest frequencies, as kv mode did before it kept a record)."""
    from transformers import StaticCache

    model = tmps.compress(copy.deepcopy(dense), calibration, mode="kv", ratio=1.0, progress=False)
    tmps.set_paths(model, kv_attention=path)

    def cache():
        if cache_kind == "static":
            return StaticCache(config=dense.config, max_cache_len=40)
        return DynamicCache(config=dense.config)

    for prompt, steps in ((10, 14), (20, 4)):
        ids = torch.randint(1, VOCAB, (2, prompt))
        want = greedy_steps(dense, ids, steps, cache())
        torch.testing.assert_close(greedy_steps(model, ids, steps, cache()), want, rtol=1e-4, atol=1e-4)
        if prompt < context:
            tokens = torch.cat([ids, want[:, prompt - 1:-1].argmax(-1)], 1)
            fresh = dense(tokens).logits[:, -1]
            assert ((want[:, -1] - fresh).norm() / fresh.norm()).item() > 1e-4


@pytest.mark.parametrize("path", ["latent", "rebuild"])
@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
@pytest.mark.parametrize("window", [None, 6])
def test_kv_mode_holds_dynamic_ntk_keys_as_the_dense_cache_does(path, cache_kind, window):
    """HF's dynamic NTK RoPE rescales its frequencies to the longest sequence seen once a forward
    passes the original context. kv mode rotated every cached key with the latest ones: 5e-4
    (relative) off the dense logits past the context, a strict xfail until it kept each token's
    frequencies (a Mistral for the 6-token window that shifts the slots). Calibrated on 24-token
    sequences: such models run past ``max_position_embeddings`` by design (it is their original
    context), and calibration that long used to be refused."""
    rope = {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0}
    shape = {**SHAPE, "max_position_embeddings": 16}
    if window is None:
        dense = dynamic_ntk_llama()
    else:
        dense = MistralForCausalLM(MistralConfig(**shape, rope_parameters=rope, sliding_window=window)).eval()
    assert_kv_decodes_like_dense_past_the_context(dense, path, cache_kind, torch.randint(0, VOCAB, (8, 24)))


def dynamic_ntk_llama(context=16):
    rope = {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0}
    return LlamaForCausalLM(LlamaConfig(**{**SHAPE, "max_position_embeddings": context}, rope_parameters=rope)).eval()


@pytest.mark.parametrize("path,cache,backend", [
    ("latent", "dynamic", "torch"), ("rebuild", "dynamic", "torch"), ("latent", "static", "torch"),
    pytest.param("latent", "static", "triton", marks=pytest.mark.skipif(
        not kernels_run_here(), reason="Triton's interpreter is not on (TRITON_INTERPRET=1)"))])
@pytest.mark.parametrize("rope", ["longrope", "dynamic", "dynamic_window"])
def test_left_padded_generate_past_the_original_context(rope, path, cache, backend):
    """HF's ``generate`` numbers a left-padded row's tokens from its first real one, so there a
    token's position is its slot less the padding. Where the frequencies change past the original
    context, keys and queries rotated with different ones score by absolute position: kv mode, which
    read the tables at slots, was 1.3e-4 (relative) off the dense logits for that row under dynamic
    NTK, both transformers versions (a strict xfail until 0ce84e7); it now reads each sequence's
    tables at its own positions (a static cache: its slots are a device index; the RoPE score kernel
    takes one table per sequence).
    Phi-3's ``generate`` drops the cache when it crosses the original context (5.25 recomputes the
    sequence; 5.17 feeds the new token alone, the padded row's mask hiding every position), so
    longrope never mixes factors there and matches (on 5.17 once fully masked rows gave zeros, as
    SDPA: test_a_decode_query_that_attends_to_nothing_gets_what_dense_gives). ``dynamic_window``: a
    Mistral with a 6-token window, whose cache drops the oldest tokens and shifts the slots."""
    from test_phi3 import longrope_phi3

    if rope == "dynamic_window":
        config = MistralConfig(**{**SHAPE, "max_position_embeddings": 16}, sliding_window=6,
                               rope_parameters={"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0})
        dense = MistralForCausalLM(config).eval()
    else:
        dense = longrope_phi3() if rope == "longrope" else dynamic_ntk_llama()
    dense.generation_config.pad_token_id = 0
    model = tmps.set_paths(tmps.compress(copy.deepcopy(dense), torch.randint(0, VOCAB, (16, 12)), mode="kv",
                                         ratio=1.0, progress=False), kv_attention=path, backend=backend)
    ids, mask = torch.randint(3, VOCAB, (2, 10)), torch.ones(2, 10, dtype=torch.long)
    ids[0, :4], mask[0, :4] = 0, 0
    options = {"cache_implementation": "static"} if cache == "static" else {}
    with torch.no_grad():
        want, got = (torch.stack(m.generate(ids, attention_mask=mask, max_new_tokens=14, do_sample=False,
                                            output_logits=True, return_dict_in_generate=True, **options).logits, 1)
                     for m in (dense, model))
    errors = [rel(g, w) for g, w in zip(got, want)]  # per row: the padded one, then the other
    assert max(errors) < 1e-5, errors  # float noise: ~2e-7


@pytest.mark.parametrize("path", ["latent", "rebuild"])
@pytest.mark.parametrize("shifts", [(3,), (3, 3), (0, 5)])
def test_dynamic_ntk_honours_shifted_position_ids(shifts, path):
    """Position ids that start past 0 (one row for every sequence, or one row each), through a
    prompt and cached steps that cross the original context: under dynamic NTK scores depend on
    absolute positions, so kv mode must rotate at the positions given, not at the cache slots."""
    dense = dynamic_ntk_llama()
    model = tmps.set_paths(tmps.compress(copy.deepcopy(dense), torch.randint(0, VOCAB, (8, 12)), mode="kv",
                                         ratio=1.0, progress=False), kv_attention=path)
    ids = torch.randint(1, VOCAB, (2, 8))
    start = torch.tensor(shifts)[:, None]  # (1 | 2, 1)

    def run(m):
        cache, logits = DynamicCache(config=dense.config), []
        keyword = cache_keyword(m)
        out = m(ids, position_ids=start + torch.arange(8), **{keyword: cache}, use_cache=True)
        logits.append(out.logits)
        for step in range(8, 16):
            out = m(out.logits[:, -1:].argmax(-1), position_ids=start + step, **{keyword: cache}, use_cache=True)
            logits.append(out.logits)
        return torch.cat(logits, 1)

    with torch.no_grad():
        want, got = run(dense), run(model)
    assert rel(got, want) < 1e-5, rel(got, want)


@pytest.mark.parametrize("outcome", ["compressed", "failed"])
def test_compressing_leaves_dynamic_ntk_rope_as_it_was(outcome, monkeypatch):
    """HF's dynamic NTK RoPE remembers the longest forward it ran: after 24-token calibration past
    the 16-position context, the model's frequencies stayed grown, and its next 20-token forward was
    1.7e-4 (relative) off the logits of the same model never calibrated (this test on the library of
    bbf96f9). Compression, finished or
    failed, now leaves the rotary embedding as it found it."""
    dense = dynamic_ntk_llama()
    fresh, rotary = copy.deepcopy(dense), dense.model.rotary_emb
    inv_freq, before = rotary.inv_freq, rotary.inv_freq.clone()
    calibration = torch.randint(0, VOCAB, (8, 24))
    if outcome == "failed":
        def fail_after_a_long_forward(model, *args, **kwargs):
            model(calibration)
            raise RuntimeError("injected")

        monkeypatch.setattr("tmps.compressor._compress_layers", fail_after_a_long_forward)
        with pytest.raises(RuntimeError, match="injected"):
            tmps.compress(dense, calibration, mode="kv", ratio=1.0, progress=False)
    else:
        tmps.compress(dense, calibration, mode="kv", ratio=1.0, progress=False)
    kept = rotary.inv_freq is inv_freq and torch.equal(inv_freq, before) and int(rotary.max_seq_len_cached) == 16
    ids = torch.randint(1, VOCAB, (2, 20))  # this forward grows the frequencies again, past the context
    with torch.no_grad():
        error = rel(dense(ids).logits, fresh(ids).logits)
    assert error < 1e-6, error
    assert kept
