"""RoPE key scores against the latent cache: the Triton kernel against its float64 torch reference.

On a machine without CUDA the kernel runs in Triton's interpreter (see conftest.py).
"""

import copy

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM

import tmps
from tmps.compat import cache_keyword
from tmps.kernels import latent_scores as ls
from tmps.kernels.latent_scores import ScoresConfig, latent_rope_scores, latent_rope_scores_ref, triton_available

DEVICE = "cuda" if torch.cuda.is_available() and not ls._interpreted() else "cpu"
needs_kernel = pytest.mark.skipif(not triton_available(DEVICE), reason=f"Triton cannot run on {DEVICE}")

# max|error| / max|reference|: keys are rounded to the input dtype twice (rebuild, rotation) on top
# of fp32 accumulation; fp32 runs as 3xTF32 on the GPU.
TOLERANCE = {torch.float32: 3e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}
# One fixed config for the shape sweep keeps the CUDA compile count down (the autotuner would try
# every candidate per shape); test_autotuned_config_matches_reference covers the tuner's choice.
FIXED = ScoresConfig(block_t=32, block_r=32, num_warps=4, num_stages=2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def rope_tables(total, head_dim):
    inv = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    emb = torch.outer(torch.arange(total, dtype=torch.float64), inv).repeat(1, 2)
    return emb.cos(), emb.sin()


def make_inputs(b, kv_heads, m, head_dim, total, r, dtype):
    """Inputs rounded to ``dtype`` once; the float64 copies are what the reference sees."""
    q = torch.randn(b, kv_heads, m, head_dim, dtype=torch.float64) / head_dim**0.5
    c_k = torch.randn(b, total, r, dtype=torch.float64)
    k_up = torch.randn(kv_heads * head_dim, r, dtype=torch.float64) / r**0.5
    cos, sin = rope_tables(total, head_dim)
    low = [t.to(device=DEVICE, dtype=dtype) for t in (q, c_k, k_up, cos, sin)]
    exact = [t.to(torch.float64).cpu() for t in low]
    return low, exact


def check(low, exact, dtype, **kw):
    ref = latent_rope_scores_ref(*exact)
    poisoned = torch.full(ref.shape, float("nan"), device=DEVICE, dtype=torch.float32)
    out = latent_rope_scores(*low, out=poisoned, **kw)
    assert out.data_ptr() == poisoned.data_ptr()
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert torch.isfinite(out).all(), "an element was left unwritten or overflowed"
    err = (out.double().cpu() - ref).abs().max().item() / ref.abs().max().item()
    assert err < TOLERANCE[dtype], f"relative max error {err:.2e} for {dtype}"


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,kv_heads,m,head_dim,total,r", [
    (1, 3, 3, 64, 1, 24),      # SmolLM2's GQA group of 3, a first decode step
    (2, 2, 4, 32, 7, 40),      # odd T, r not a power of two
    (1, 1, 1, 96, 129, 96),    # half = 48 padded to 64, T across five 32-wide tiles
    (3, 2, 17, 16, 33, 17),    # 17 rows (chunked prefill), half = 8 padded to 16
])
def test_matches_reference(dtype, b, kv_heads, m, head_dim, total, r):
    low, exact = make_inputs(b, kv_heads, m, head_dim, total, r, dtype)
    check(low, exact, dtype, config=FIXED)


@needs_kernel
def test_autotuned_config_matches_reference():
    low, exact = make_inputs(2, 2, 4, 64, 150, 40, torch.float16)
    check(low, exact, torch.float16)  # on CUDA: tuned over every candidate, then cached
    if DEVICE == "cuda":
        assert ls._TUNED, "the autotuner did not cache its choice"


@needs_kernel
def test_strided_queries_and_larger_tiles():
    low, exact = make_inputs(2, 3, 2, 32, 45, 40, torch.float16)
    q = low[0]
    padded = torch.full((2, 3, 2, 40), float("nan"), device=DEVICE, dtype=torch.float16)
    padded[..., :32] = q  # unit stride on head_dim, row stride 40: strides are passed, not assumed
    low[0] = padded[..., :32]
    check(low, exact, torch.float16, config=ScoresConfig(block_t=64, block_r=64))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_one_table_per_sequence(dtype):
    """Dynamic NTK RoPE with left-padded rows: each sequence's keys sit at their own positions, so
    each has its own ``(T, head_dim)`` table. Sequence i's table is the shared one shifted by 5·i
    positions; its scores must match the reference for that table, not the shared one."""
    b, kv_heads, m, head_dim, total, r = 3, 2, 3, 32, 37, 24
    low, exact = make_inputs(b, kv_heads, m, head_dim, total, r, dtype)
    cos, sin = rope_tables(total + 5 * (b - 1), head_dim)
    tables = [torch.stack([t[5 * i:5 * i + total] for i in range(b)]) for t in (cos, sin)]
    low[3:], exact[3:] = [t.to(DEVICE, dtype) for t in tables], [t.to(dtype).double() for t in tables]
    check(low, exact, dtype, config=FIXED)
    shared = latent_rope_scores_ref(*exact[:3], exact[3][0], exact[4][0])
    per_sequence = latent_rope_scores(*low, config=FIXED).double().cpu()
    assert (per_sequence[1:] - shared[1:]).abs().max() > 0.1 * shared.abs().max()  # the tables differ in use


@needs_kernel
def test_allocates_its_output_when_none_is_given():
    low, exact = make_inputs(1, 2, 5, 32, 70, 24, torch.float32)
    out = latent_rope_scores(*low)
    torch.testing.assert_close(out.double().cpu(), latent_rope_scores_ref(*exact), rtol=0, atol=3e-5)


@pytest.mark.parametrize("change,error,match", [
    (lambda a: a.update(c_k=a["c_k"].half()), TypeError, "share one dtype"),
    (lambda a: a.update(k_up=a["k_up"][:-1]), ValueError, "shapes do not match"),
    (lambda a: a.update(cos=a["cos"][:-1]), ValueError, r"cos has shape"),
    (lambda a: a.update(sin=a["sin"].expand(2, 5, 32)), ValueError, r"sin has shape .*one table per sequence"),
    (lambda a: a.update(q=a["q"].expand(1, 2, 200, 32)), ValueError, "serves decode"),
    (lambda a: a.update(q=a["q"].cpu().numpy()), TypeError, "must be a torch.Tensor"),
    (lambda a: a.update(out=torch.empty(1, 2, 1, 5, dtype=torch.float16, device=DEVICE)), ValueError, "out must be"),
])
def test_bad_arguments_are_explained(change, error, match):
    # On the kernel's device: CPU tensors on a GPU machine would fail the device check first.
    args = {name: torch.randn(*shape, device=DEVICE) for name, shape in
            dict(q=(1, 2, 1, 32), c_k=(1, 5, 8), k_up=(64, 8), cos=(5, 32), sin=(5, 32)).items()}
    change(args)
    with pytest.raises(error, match=match):
        latent_rope_scores(**args)


SMALL = dict(vocab_size=64, hidden_size=192, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
             num_key_value_heads=2, max_position_embeddings=128, attn_implementation="sdpa")


@needs_kernel
@pytest.mark.parametrize("dtype, arch", [(torch.float32, "llama"), (torch.bfloat16, "llama"),
                                         (torch.float32, "phi3-partial"), (torch.float32, "phi3-longrope")])
def test_compressed_llama_decodes_through_the_kernel(dtype, arch, monkeypatch):
    """A kv-mode Llama's cached decode step with the Triton path equals the torch path. The kernel
    rotates whole heads: under partial RoPE (a Phi-3 rotating 24 of 32 features, as Phi-4-mini
    does) the key scores stay on the torch chain, also with backend='triton', and the projection
    and latent decode kernels still serve the step. Under longrope with a 12-token original context,
    the step past it rotates the prompt's keys with the short factors and its own with the long ones:
    the kernel reads those tables."""
    if arch == "llama":
        cfg = LlamaConfig(**SMALL)
        dense = LlamaForCausalLM(cfg).eval()
    elif arch == "phi3-partial":
        cfg = Phi3Config(**SMALL, partial_rotary_factor=0.75, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        dense = Phi3ForCausalLM(cfg).eval()
    else:
        rope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0 + 0.1 * i for i in range(16)],
                "long_factor": [2.0 + 0.5 * i for i in range(16)], "original_max_position_embeddings": 12}
        cfg = Phi3Config(**SMALL, rope_parameters=rope, original_max_position_embeddings=12,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
        dense = Phi3ForCausalLM(cfg).eval()
    model = tmps.compress(copy.deepcopy(dense), torch.randint(0, 64, (4, 16)), mode="kv", ratio=0.5,
                          progress=False).to(device=DEVICE, dtype=dtype)
    calls = []
    monkeypatch.setattr(ls, "latent_rope_scores", lambda *a, **k: calls.append(1) or latent_rope_scores(*a, **k))
    ids = torch.randint(0, 64, (2, 12), device=DEVICE)  # 12 x 6 heads > d_kv = 64: the prefill rebuilds
    logits = {}
    for backend in ("torch", "triton"):
        tmps.set_paths(model, backend=backend)
        cache = DynamicCache()
        with torch.no_grad():  # the kernels have no backward: "triton" refuses calls that record gradients
            first = model(ids, **{cache_keyword(model): cache}, use_cache=True)
            logits[backend] = model(ids[:, -1:], **{cache_keyword(model): first.past_key_values},
                                    use_cache=True).logits.double()
    # the decode step of each layer, not the prefill
    assert len(calls) == (0 if arch == "phi3-partial" else cfg.num_hidden_layers)
    err = (logits["triton"] - logits["torch"]).abs().max() / logits["torch"].abs().max()
    assert err < {torch.float32: 1e-4, torch.bfloat16: 5e-2}[dtype]
