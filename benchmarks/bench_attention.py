"""pytest-benchmark timings of one attention block: dense against compressed, torch path against kernel path.

    pytest benchmarks/bench_attention.py --benchmark-only

The block is the attention of a one-layer model with random weights; the compressed blocks get
random factors of the ranks that ratio 0.5 gives (``benchmarks/e2e.py``'s ``random_factors``: the
modules and code paths of ``tmps.compress``, other numbers). Shapes: on CUDA, fp16, OPT-1.3B's
attention (hidden 2048, 32 heads) and a Llama-3.2-1B-like one (2048, 32 query / 8 key-value heads,
RoPE); on CPU, fp32, the same head layouts at hidden 512, where only the torch paths run (the
Triton kernels need CUDA; their interpreted runs are checked in tests/kernels).

Cases: ``prefill`` (one sequence, no cache) and ``decode`` (one new token per sequence over a
prefilled cache; the cache is cropped back after each timed step). Variants:

* ``dense``: the model's own attention;
* ``weights-torch`` / ``weights-triton``: weights mode, ``qkv.backend`` torch or the fused kernel;
* ``kv-rebuild``: kv mode rebuilding full keys and values from the latents (``kv_attention``);
* ``kv-latent``: kv mode attending over the latents at decode (``auto``; on CUDA a RoPE model's key
  scores run in the Triton kernel), ``kv-latent-torch`` the same with the torch chain,
  ``kv-latent-triton`` with the kernels forced (the Q/K/V kernel, the RoPE scores and the fused
  latent decode of ``tmps.kernels.latent_decode``).
"""

import functools
import importlib.util
from pathlib import Path

import pytest
import torch
from _bench_common import synced  # benchmarks/, on sys.path under pytest

import tmps
from tmps.compat import cache_keyword

CUDA = torch.cuda.is_available()
DEVICE, DTYPE = ("cuda", torch.float16) if CUDA else ("cpu", torch.float32)
HIDDEN = 2048 if CUDA else 512
LAYOUTS = {"opt": dict(heads=HIDDEN // 64, kv_heads=HIDDEN // 64), "llama": dict(heads=HIDDEN // 64, kv_heads=HIDDEN // 256)}
PREFILL_TOKENS = 2048 if CUDA else 256
CONTEXT = 1024 if CUDA else 256
DECODE_BATCHES = (1, 16) if CUDA else (1, 4)
RATIO = 0.5
# variant: (mode, qkv.backend, kv_attention)
VARIANTS = {
    "dense": ("dense", "auto", "auto"),
    "weights-torch": ("weights", "torch", "auto"),
    "weights-triton": ("weights", "triton", "auto"),
    "kv-rebuild": ("kv", "auto", "rebuild"),
    "kv-latent": ("kv", "auto", "auto"),
    "kv-latent-torch": ("kv", "torch", "auto"),
    "kv-latent-triton": ("kv", "triton", "auto"),
}
CUDA_ONLY = {"weights-triton", "kv-latent-torch", "kv-latent-triton"}  # on CPU the kernel does not run / is the same as kv-latent


@functools.lru_cache(maxsize=None)
def _e2e():
    """benchmarks/e2e.py as a module (for its random_factors), loaded once."""
    spec = importlib.util.spec_from_file_location("e2e_bench", Path(__file__).with_name("e2e.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_MODELS: dict = {}


def one_layer_model(arch: str, mode: str):
    """A one-layer random model, compressed with random factors unless ``mode == "dense"`` (cached)."""
    key = (arch, mode)
    if key not in _MODELS:
        from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

        layout = LAYOUTS[arch]
        torch.manual_seed(0)
        if arch == "opt":
            cfg = OPTConfig(vocab_size=1024, hidden_size=HIDDEN, ffn_dim=4 * HIDDEN, num_hidden_layers=1,
                            num_attention_heads=layout["heads"], max_position_embeddings=4096,
                            word_embed_proj_dim=HIDDEN, attn_implementation="sdpa")
            cls = OPTForCausalLM
        else:
            cfg = LlamaConfig(vocab_size=1024, hidden_size=HIDDEN, intermediate_size=4 * HIDDEN, num_hidden_layers=1,
                              num_attention_heads=layout["heads"], num_key_value_heads=layout["kv_heads"],
                              max_position_embeddings=4096, attn_implementation="sdpa")
            cls = LlamaForCausalLM
        with torch.device(DEVICE):
            model = cls._from_config(cfg, dtype=DTYPE).eval()
        if mode != "dense":
            _e2e().random_factors(model, mode, RATIO)
        _MODELS[key] = model
    return _MODELS[key]


def attention_block(model):
    layers = model.model.decoder.layers if hasattr(model.model, "decoder") else model.model.layers
    return layers[0].self_attn


def block_call(model, attention, batch: int, tokens: int, cache, start: int):
    """A function running ``attention`` on ``(batch, tokens)`` hidden states at positions ``start…``."""
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(batch, tokens, HIDDEN, generator=gen).to(DEVICE, DTYPE)
    kwargs = {cache_keyword(attention): cache}
    rotary = getattr(model.model, "rotary_emb", None)
    if rotary is not None:
        positions = torch.arange(start, start + tokens, device=DEVICE).unsqueeze(0).expand(batch, -1)
        kwargs["position_embeddings"] = rotary(hidden, positions)
    return lambda: attention(hidden, attention_mask=None, **kwargs)


def variant_model(arch, variant):
    if variant in CUDA_ONLY and not CUDA:
        pytest.skip(f"{variant}: the Triton path needs CUDA (its interpreted runs are tested in tests/kernels)")
    mode, backend, kv_attention = VARIANTS[variant]
    model = one_layer_model(arch, mode)
    if mode != "dense":
        tmps.set_paths(model, backend=backend, kv_attention=kv_attention)
    return model


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("arch", list(LAYOUTS))
def test_prefill(benchmark, arch, variant):
    model = variant_model(arch, variant)
    with torch.no_grad():
        fn = synced(block_call(model, attention_block(model), 1, PREFILL_TOKENS, None, 0))
        fn()  # autotune / warm up outside the timing
        benchmark.extra_info.update(device=torch.cuda.get_device_name() if CUDA else "cpu", dtype=str(DTYPE),
                                    tokens=PREFILL_TOKENS, hidden=HIDDEN)
        benchmark(fn)


@pytest.mark.parametrize("batch", DECODE_BATCHES)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("arch", list(LAYOUTS))
def test_decode(benchmark, arch, variant, batch):
    from transformers import DynamicCache

    model = variant_model(arch, variant)
    attention = attention_block(model)
    with torch.no_grad():
        cache = DynamicCache()
        block_call(model, attention, batch, CONTEXT, cache, 0)()  # prefill the cache
        step = block_call(model, attention, batch, 1, cache, CONTEXT)

        def one_step():
            out = step()
            cache.crop(-1)  # drop the step's token: every timed step sees the same context
            return out

        fn = synced(one_step)
        fn()
        assert cache.get_seq_length() == CONTEXT
        benchmark.extra_info.update(device=torch.cuda.get_device_name() if CUDA else "cpu", dtype=str(DTYPE),
                                    batch=batch, context=CONTEXT, hidden=HIDDEN)
        benchmark(fn)
