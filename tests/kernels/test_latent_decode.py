"""kv mode's fused latent decode attention: the Triton kernels against their float64 torch reference.

On a machine without CUDA the kernels run in Triton's interpreter (see conftest.py).
"""

import copy
import dataclasses
import functools

import pytest
import torch
from transformers import DynamicCache, OPTConfig, OPTForCausalLM

import tmps
from tmps.compat import cache_keyword
from tmps.kernels import latent_decode as ld
from tmps.kernels.latent_decode import DecodeConfig, latent_decode_attention, latent_decode_attention_ref

DEVICE = "cuda" if torch.cuda.is_available() and not ld._interpreted() else "cpu"
needs_kernel = pytest.mark.skipif(not ld.triton_available(DEVICE), reason=f"Triton cannot run on {DEVICE}")

# max|error| / max|reference|. The torch chain itself, in fp16 / bf16 against float64, is off by up to
# 1.6e-3 / 9e-3 at benchmarks/latent_decode_check.py's reduced shapes (probabilities and ō rounded to
# the dtype); fp32 runs as 3xTF32 on a GPU.
TOLERANCE = {torch.float32: 3e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}
# Every dtype in the interpreter (CI); on a GPU each specialisation compiles (about a second each, two
# kernels), so the sweeps run fp16 there and gpu_check's c2 checks all three dtypes at model sizes.
SWEEP_DTYPES = [torch.float16] if DEVICE == "cuda" else [torch.float32, torch.float16, torch.bfloat16]
# One fixed config for the sweep keeps the CUDA compile count down; test_autotuned_config covers the tuner.
FIXED = DecodeConfig(chunk=64, block_t=32, block_v=64, block_k=32, block_b=16, block_r=32, num_warps=4, num_stages=2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _nan_workspace(monkeypatch):
    """Every workspace element the partials kernel should write starts as NaN: one it skips shows."""
    monkeypatch.setattr(ld, "_new_workspace", lambda shape, device: torch.full(shape, float("nan"), device=device))


def make_case(b, heads, kv_heads, q_len, head_dim, total, r_k, r_v, mask_kind, scores_given, dtype):
    """(low-precision args, float64 args) for latent_decode_attention; the float64 ones are the
    low-precision tensors widened, so the reference sees exactly the kernel's inputs."""
    rows = heads * q_len
    q_latent = torch.randn(b, rows, r_k, dtype=torch.float64)
    c_k = torch.randn(b, total, r_k, dtype=torch.float64)
    c_v = torch.randn(b, total, r_v, dtype=torch.float64)
    v_up = torch.randn(kv_heads * head_dim, r_v, dtype=torch.float64) / r_v**0.5
    scores = 3 * torch.randn(b, rows, total, dtype=torch.float64)
    mask = None
    if mask_kind == "bool":  # per sequence, broadcast over heads, longer than T (a static cache's)
        mask = torch.rand(b, 1, q_len, total + 5) > 0.3
        mask[0, 0, 0] = False  # a fully masked row: zeros, as torch's SDPA gives (test_a_query_that_attends_to_nothing)
    elif mask_kind == "additive":  # broadcast over the batch, per head
        mask = torch.where(torch.rand(1, heads, q_len, total) > 0.3, 0.0, torch.finfo(torch.float32).min)
    low = dict(q_latent=None if scores_given else q_latent.to(dtype), scores=scores.float() if scores_given else None,
               c_k=None if scores_given else c_k.to(dtype), c_v=c_v.to(dtype), v_up=v_up.to(dtype))
    exact = {k: None if v is None else v.double() for k, v in low.items()}
    low = {k: None if v is None else v.to(DEVICE) for k, v in low.items()}
    common = dict(scaling=0.125, heads=heads, q_len=q_len, head_dim=head_dim)
    return (dict(low, mask=None if mask is None else mask.to(DEVICE), **common),
            dict(exact, mask=mask, **common))


def check(low, exact, dtype, **kw):
    ref = latent_decode_attention_ref(**exact)
    out = latent_decode_attention(**low, **kw)
    assert out.dtype == dtype and out.shape == ref.shape and out.is_contiguous()
    assert torch.isfinite(out).all(), "an element was left unwritten or overflowed"
    err = (out.double().cpu() - ref).abs().max().item() / ref.abs().max().item()
    assert err < TOLERANCE[dtype], f"relative max error {err:.2e} for {dtype}"


@needs_kernel
@pytest.mark.parametrize("dtype", SWEEP_DTYPES)
@pytest.mark.parametrize("b,heads,kv_heads,q_len,head_dim,total,r_k,r_v,mask_kind,scores_given", [
    (2, 4, 4, 1, 16, 37, 24, 40, "none", False),      # OPT-like MHA, one token, no mask
    (1, 6, 2, 3, 32, 129, 40, 96, "bool", False),     # GQA, 3 tokens, T over three chunks, r_v over two tiles
    (3, 4, 2, 2, 16, 70, 24, 40, "additive", True),   # RoPE path: fp32 scores given, additive per-head mask
    (2, 9, 3, 1, 64, 65, 24, 96, "bool", True),       # SmolLM2's 9 / 3 heads of 64
    (1, 3, 1, 1, 8, 1, 17, 17, "none", False),        # a first decode step (T = 1), head_dim 8 padded to 16
])
def test_matches_reference(dtype, b, heads, kv_heads, q_len, head_dim, total, r_k, r_v, mask_kind, scores_given):
    low, exact = make_case(b, heads, kv_heads, q_len, head_dim, total, r_k, r_v, mask_kind, scores_given, dtype)
    check(low, exact, dtype, config=FIXED)


@needs_kernel
@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
@pytest.mark.parametrize("dtype", SWEEP_DTYPES)
def test_a_query_that_attends_to_nothing(mask_kind, dtype):
    """What the dense model's attention gives a query whose every position is masked: under HF's
    sdpa (a boolean mask) torch's SDPA returns zeros; under eager (an additive mask of the dtype's
    minimum) every score sits at that minimum and the softmax averages the values uniformly. The
    kernel and the chain gave the uniform average under both until the boolean case was fixed."""
    b, heads, kv_heads, q_len, head_dim, total, r_v = 2, 4, 2, 1, 16, 70, 40
    low, exact = make_case(b, heads, kv_heads, q_len, head_dim, total, 24, r_v, "none", False, dtype)
    if mask_kind == "bool":
        mask = torch.ones(b, 1, q_len, total, dtype=torch.bool)
        mask[1] = False
        want_row = torch.zeros(heads, head_dim, dtype=torch.float64)
    else:
        mask = torch.zeros(b, 1, q_len, total)
        mask[1] = torch.finfo(torch.float32).min
        mean_v = exact["c_v"][1].mean(0)  # (r_v,)
        want_row = (exact["v_up"] @ mean_v).view(kv_heads, head_dim).repeat_interleave(heads // kv_heads, 0)
    low["mask"], exact["mask"] = mask.to(DEVICE), mask
    ref = latent_decode_attention_ref(**exact)
    torch.testing.assert_close(ref[1, 0], want_row, rtol=1e-9, atol=1e-9)
    out = latent_decode_attention(**low, config=FIXED)
    torch.testing.assert_close(out[1, 0].double().cpu(), want_row, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])
    check(low, exact, dtype, config=FIXED)  # and the other sequence as usual


@needs_kernel
@pytest.mark.parametrize("config", [
    DecodeConfig(chunk=32, block_t=32, block_v=16, block_k=16, block_b=16, block_r=16),  # many small programs
    DecodeConfig(chunk=256, block_t=64, block_v=128, block_k=64, block_b=32, block_r=64),  # one chunk, one tile
    DecodeConfig(chunk=32, block_t=32, block_v=32, block_k=16, block_b=16, block_r=16, scores_first=True),
    # head_dim split into 16-wide combine tiles: 24 columns over two tiles, the second masked
    DecodeConfig(chunk=64, block_t=32, block_v=32, block_k=16, block_b=16, block_r=16, block_d=16),
])
@pytest.mark.parametrize("dtype", [d for d in SWEEP_DTYPES if d != torch.bfloat16])
def test_tilings(config, dtype):
    low, exact = make_case(2, 6, 2, 2, 24 if config.block_d else 16, 100, 40, 72, "bool", False, dtype)
    check(low, exact, dtype, config=config)


@needs_kernel
@pytest.mark.parametrize("head_dim,block_d", [(64, 32), (40, 16), (8, 32)])
def test_split_head_dim_combine(head_dim, block_d):
    """The combine's head_dim tiles together write every column: full tiles, a masked last one, and a
    tile wider than the head (clamped to it)."""
    low, exact = make_case(3, 4, 2, 1, head_dim, 70, 24, 40, "bool", True, torch.float16)
    check(low, exact, torch.float16, config=dataclasses.replace(FIXED, block_d=block_d))


@needs_kernel
def test_scores_first_computes_the_scores_once(monkeypatch):
    """A scores-first config runs one score GEMM (the scale as its alpha), then the pass that reads them."""
    low, exact = make_case(2, 4, 4, 1, 16, 70, 24, 40, "bool", False, torch.float16)
    gemms = []
    baddbmm = torch.baddbmm
    monkeypatch.setattr(torch, "baddbmm", lambda *a, **k: gemms.append(k.get("alpha")) or baddbmm(*a, **k))
    check(low, exact, torch.float16, config=dataclasses.replace(FIXED, scores_first=True))
    assert gemms == [0.125]


@needs_kernel
def test_scores_in_the_latents_dtype():
    """Given scores may come in the latents' dtype (fp16 here), as the torch chain's score GEMM writes them."""
    low, exact = make_case(2, 9, 3, 1, 32, 45, 24, 40, "bool", True, torch.float16)
    low["scores"] = low["scores"].half()
    exact["scores"] = low["scores"].double().cpu()
    check(low, exact, torch.float16, config=FIXED)


@needs_kernel
def test_autotuned_config():
    low, exact = make_case(2, 4, 2, 1, 32, 150, 40, 80, "bool", False, torch.float16)
    check(low, exact, torch.float16)  # on CUDA: tuned over every candidate, then cached
    if DEVICE == "cuda":
        assert ld._TUNED, "the autotuner did not cache its choice"


@needs_kernel
def test_strided_latents_of_a_static_cache():
    """The latents are slices of a larger cache buffer (row stride > width): strides are passed, not assumed."""
    low, exact = make_case(2, 4, 4, 1, 16, 33, 24, 40, "bool", False, torch.float32)
    for name in ("c_k", "c_v"):
        buffer = torch.full((2, 50, low[name].shape[2] + 8), float("nan"), device=DEVICE)
        buffer[:, :33, : low[name].shape[2]] = low[name]
        low[name] = buffer[:, :33, : low[name].shape[2]]
    check(low, exact, torch.float32, config=FIXED)


def _args(**change):
    args = dict(q_latent=torch.randn(1, 4, 8, device=DEVICE), scores=None, c_k=torch.randn(1, 5, 8, device=DEVICE),
                c_v=torch.randn(1, 5, 12, device=DEVICE), v_up=torch.randn(32, 12, device=DEVICE), mask=None,
                scaling=1.0, heads=4, q_len=1, head_dim=16)
    args.update(change)
    return args


@pytest.mark.parametrize("change,error,match", [
    (dict(scores=torch.randn(1, 4, 5)), ValueError, "exactly one of q_latent"),
    (dict(c_k=torch.randn(1, 5, 8, device=DEVICE).half()), TypeError, "share one dtype"),
    (dict(c_k=torch.randn(1, 6, 8, device=DEVICE)), ValueError, "expected q_latent"),
    (dict(v_up=torch.randn(30, 12, device=DEVICE)), ValueError, "kv_heads dividing heads"),
    (dict(heads=200, q_latent=torch.randn(1, 200, 8, device=DEVICE)), ValueError, "serves decode"),
    (dict(q_len=2, q_latent=torch.randn(1, 8, 8, device=DEVICE)), ValueError, "without a mask"),
    (dict(mask=torch.ones(1, 1, 1, 4, dtype=torch.bool, device=DEVICE)), ValueError, "mask has shape"),
    (dict(mask=torch.ones(1, 1, 1, 5, dtype=torch.int32, device=DEVICE)), TypeError, "boolean .* or an additive"),
    (dict(c_v=torch.randn(1, 5, 12, device=DEVICE).numpy() if DEVICE == "cpu" else 3), TypeError, "must be a torch"),
])
def test_bad_arguments_are_explained(change, error, match):
    if not ld.triton_available(DEVICE) and error is not TypeError and "mask" not in change:
        pytest.skip("validation order past the Triton check")
    with pytest.raises(error, match=match):
        latent_decode_attention(**_args(**change), config=FIXED)


# --------------------------------------------------------------------------------------------
# In a compressed model
# --------------------------------------------------------------------------------------------


def _tiny_opt(attn="sdpa"):
    """A 2-layer OPT with random weights (eval)."""
    cfg = OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=64, word_embed_proj_dim=32, attn_implementation=attn)
    return OPTForCausalLM(cfg).eval()


def _count_launches(monkeypatch):
    calls = []
    launch = ld._launch
    monkeypatch.setattr(ld, "_launch", lambda *a, **k: calls.append(1) or launch(*a, **k))
    return calls


@needs_kernel
def test_kv_opt_decodes_through_the_kernel_like_dense(monkeypatch):
    """At full rank a kv-mode OPT's cached decode step through the fused kernel reproduces the dense
    logits (the prefill rebuilds keys and values and does not use it)."""
    dense = _tiny_opt()
    model = tmps.compress(copy.deepcopy(dense), torch.randint(0, 64, (4, 16)), mode="kv", ratio=1.0, progress=False)
    model, dense = model.to(DEVICE), dense.to(DEVICE)
    tmps.set_paths(model, backend="triton")
    calls = _count_launches(monkeypatch)
    ids = torch.randint(0, 64, (2, 9), device=DEVICE)
    logits = {}
    with torch.no_grad():
        for name, m in (("kv", model), ("dense", dense)):
            first = m(ids, **{cache_keyword(m): DynamicCache()}, use_cache=True)
            logits[name] = m(ids[:, -1:], **{cache_keyword(m): first.past_key_values}, use_cache=True).logits.double().cpu()
    assert len(calls) == dense.config.num_hidden_layers
    err = (logits["kv"] - logits["dense"]).abs().max() / logits["dense"].abs().max()
    assert err < 1e-4


@needs_kernel
def test_eager_attention_keeps_the_torch_chain(monkeypatch):
    """Eager attention returns the probabilities, which the kernel never forms: it is not used there."""
    model = tmps.compress(_tiny_opt("eager"), torch.randint(0, 64, (4, 16)), mode="kv", ratio=0.5,
                          progress=False).to(DEVICE)
    tmps.set_paths(model, backend="triton")
    calls = _count_launches(monkeypatch)
    ids = torch.randint(1, 64, (1, 5), device=DEVICE)
    with torch.no_grad():
        first = model(ids, use_cache=True)
        out = model(ids[:, -1:], **{cache_keyword(model): first.past_key_values}, use_cache=True, output_attentions=True)
    assert not calls and out.attentions[0] is not None


# Ops that launch no device kernel: views and allocations.
_NO_KERNEL = ("view", "expand", "permute", "transpose", "slice", "alias", "t.default", "select", "unsqueeze",
              "squeeze", "detach", "as_strided", "empty", "reshape")


def _decode_launches():
    """benchmarks/decode_launches.py as a module: the launch recorder and the decode-step counts."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "decode_launches.py"
    spec = importlib.util.spec_from_file_location("decode_launches", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_kernel
def test_no_rope_decode_attention_is_one_gemm_and_two_kernels(monkeypatch):
    """The torch chain launches six device ops for this (tests/test_latent_attention.py); with the kernel:
    the absorbed query's GEMM, then the partials and combine kernels, nothing else."""
    from tmps.models.latent_attention import latent_attention

    calls = _count_launches(monkeypatch)
    monkeypatch.setattr(ld, "_new_workspace", lambda shape, device: torch.empty(shape, device=device))
    q = torch.randn(2, 8, 1, 16, device=DEVICE, dtype=torch.float16)
    c_k, c_v = torch.randn(2, 40, 24, device=DEVICE).half(), torch.randn(2, 40, 40, device=DEVICE).half()
    k_up, v_up = torch.randn(128, 24, device=DEVICE).half(), torch.randn(128, 40, device=DEVICE).half()
    mask = torch.ones(2, 1, 1, 40, dtype=torch.bool, device=DEVICE)
    fused = functools.partial(latent_decode_attention, config=FIXED)  # on CUDA: no autotuning launches
    launches = _decode_launches()
    with launches.counting_kernels(launches.recorder()) as record, record:
        out, probs = latent_attention(q, c_k, c_v, k_up, v_up, mask, 0.25, values=fused)
    launched = record.kernel_ops(_NO_KERNEL)
    assert launched == ["aten.bmm.default"], launched
    assert len(calls) == 1 and probs is None  # one _launch: the two kernels
    ref, _ = latent_attention(q.double(), c_k.double(), c_v.double(), k_up.double(), v_up.double(), mask, 0.25)
    assert (out.double() - ref).abs().max() / ref.abs().max() < TOLERANCE[torch.float16]


@needs_kernel
@pytest.mark.parametrize("choice", ["triton", "torch"])
def test_auto_takes_the_kernel_only_where_it_was_timed_faster(choice, monkeypatch):
    """backend="auto" asks kernels_bridge.faster_path once per decode shape (the prefill is not asked)
    and follows its answer."""
    from tmps import kernels_bridge as bridge

    asked = []
    monkeypatch.setattr(bridge, "kernel_preferred_on", lambda device: True)
    monkeypatch.setattr(bridge, "faster_path", lambda key, *a, **k: asked.append(key) or choice)
    model = tmps.compress(_tiny_opt(), torch.randint(0, 64, (4, 16)), mode="kv", ratio=0.5,
                          progress=False).to(DEVICE)
    calls = _count_launches(monkeypatch)
    ids = torch.randint(0, 64, (2, 9), device=DEVICE)
    with torch.no_grad():
        first = model(ids, use_cache=True)
        assert not [key for key in asked if key[0] == "latent_decode"]  # prefill: rebuild, no question
        model(ids[:, -1:], **{cache_keyword(model): first.past_key_values}, use_cache=True)
    keys = [key for key in asked if key[0] == "latent_decode"]
    assert len(keys) == model.config.num_hidden_layers and len(set(keys)) == 1  # one shape: one timing when cached
    assert keys[0][3:6] == (2, 4, 1)  # batch, heads, q_len
    assert len(calls) == (model.config.num_hidden_layers if choice == "triton" else 0)


@needs_kernel
@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_with_the_kernels_a_kv_decode_step_launches_fewer_ops_than_dense(arch, monkeypatch):
    """Device launches of one static-cache decode step (aten ops that run a kernel, plus Triton launches,
    the interpreter's own tensor traffic inside those not counted): the torch chain's latent decode
    costs more launches than dense attention, the fused kernels fewer."""
    monkeypatch.setattr(ld, "_new_workspace", lambda shape, device: torch.empty(shape, device=device))  # no fill
    counting = _decode_launches()
    launches = counting.step_launches(arch, DEVICE)
    # Everything outside the layers is the same in all three. `python benchmarks/decode_launches.py`
    # with transformers 5.24: OPT 59 / 67 / 55, Llama 94 / 114 / 90 (dense / kv torch / kv triton).
    layers = counting.LAYERS
    assert launches["kv torch"] >= launches["dense"] + 4 * layers, launches
    assert launches["kv triton"] <= launches["dense"] - 2 * layers, launches
