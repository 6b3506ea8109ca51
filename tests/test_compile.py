"""torch.compile of compressed models: one graph, the dense model's logits, the kernels as custom ops."""
import copy

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

import tmps
from tmps.compat import cache_keyword
import tmps.kernels_bridge as bridge

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNELS = bridge.triton_path_available(torch.device(DEVICE))


def tiny(arch):
    if arch == "opt":
        return OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=64,
                                        word_embed_proj_dim=32)).eval()
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=64)).eval()


def prefill_and_step(model, ids):
    """Logits of a prefill and of one cached decode step (the kv modes' latent path)."""
    cache = DynamicCache()
    first = model(ids, **{cache_keyword(model): cache}).logits
    return first, model(ids[:, -1:], **{cache_keyword(model): cache}).logits


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts of the kernel launchers' calls, patched where the custom ops look them up."""
    from tmps.kernels import latent_decode, latent_scores

    calls = {"projection": 0, "decode": 0, "scores": 0}
    for module, name, key in ((bridge, "run_fused_projection", "projection"),
                              (latent_decode, "latent_decode_attention", "decode"),
                              (latent_scores, "latent_rope_scores", "scores")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, _key=key, **k: calls.__setitem__(_key, calls[_key] + 1)
                            or _real(*a, **k))
    return calls


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not KERNELS, reason=f"Triton cannot run on {DEVICE}"))])
@pytest.mark.parametrize("mode", ["weights", "kv"])
@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_compiled_model_is_one_graph_with_the_eager_logits(arch, mode, backend, kernel_calls, one_thread):
    """fullgraph=True: no graph break anywhere in the compressed attention (the RoPE table's cache
    and the kernels' launchers used to break it, or fail inside Triton's interpreter)."""
    dense = tiny(arch)
    model = tmps.compress(copy.deepcopy(dense), torch.randint(0, 64, (4, 16)), mode=mode, ratio=0.5,
                          progress=False).to(DEVICE)
    tmps.set_paths(model, backend=backend)
    ids = torch.randint(0, 64, (2, 9), device=DEVICE)
    torch._dynamo.reset()
    with torch.no_grad():
        want = prefill_and_step(model, ids)
        kernel_calls.update(projection=0, decode=0, scores=0)
        got = prefill_and_step(torch.compile(model, backend="aot_eager", fullgraph=True), ids)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    layers = model.config.num_hidden_layers
    if backend == "triton":  # the kernels ran inside the compiled graphs, one op per layer and call
        assert kernel_calls["projection"] == 2 * layers
        assert kernel_calls["decode"] == (layers if mode == "kv" else 0)
        assert kernel_calls["scores"] == (layers if mode == "kv" and arch == "llama" else 0)
    else:
        assert kernel_calls == {"projection": 0, "decode": 0, "scores": 0}


@pytest.mark.skipif(not KERNELS, reason=f"Triton cannot run on {DEVICE}")
def test_custom_ops_pass_opcheck():
    """Schema, fake (shape-only) implementation and dispatch of each kernel's op, on fresh random inputs."""
    x, in_factor = torch.randn(3, 16, device=DEVICE), torch.randn(16, 8, device=DEVICE)
    cores = [torch.randn(2, 4, 8, device=DEVICE), torch.randn(1, 6, 8, device=DEVICE)]
    projection = (x, in_factor, cores, [torch.randn(5, 4, device=DEVICE), None], [torch.randn(10, device=DEVICE), None])
    b, heads, kv_heads, head_dim, total, r_k, r_v = 2, 4, 2, 16, 37, 24, 40

    def rand(*shape):
        return torch.randn(*shape, device=DEVICE)

    mask = torch.rand(b, 1, 1, total, device=DEVICE) > 0.2
    decode = (rand(b, heads, r_k), None, rand(b, total, r_k), rand(b, total, r_v), rand(kv_heads * head_dim, r_v),
              mask, 0.125, heads, 1, head_dim)
    scores = (rand(b, kv_heads, 2, head_dim), rand(b, total, r_k), rand(kv_heads * head_dim, r_k),
              rand(total, head_dim), rand(total, head_dim))
    for op, args in ((torch.ops.tmps.fused_projection.default, projection),
                     (torch.ops.tmps.latent_decode.default, decode),
                     (torch.ops.tmps.latent_rope_scores.default, scores)):
        results = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in results.values()), (op, results)


def test_auto_leaves_the_chain_to_the_compiler(monkeypatch, kernel_calls, one_thread):
    """Nothing can be timed while tracing: under "auto", even where the kernels would be candidates
    (a GPU, pretended here), compiled code takes the torch chain, untimed, for the compiler to fuse."""
    model = tmps.compress(tiny("llama"), torch.randint(0, 64, (4, 16)), mode="kv", ratio=0.5, progress=False)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        want = prefill_and_step(model, ids)  # "auto" on a CPU: the torch chain
        monkeypatch.setattr(bridge, "kernel_preferred_on", lambda device: True)
        monkeypatch.setattr(bridge, "faster_path", lambda *a, **k: pytest.fail("timed while tracing"))
        torch._dynamo.reset()
        got = prefill_and_step(torch.compile(model, backend="aot_eager", fullgraph=True), ids)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    assert kernel_calls == {"projection": 0, "decode": 0, "scores": 0}


def test_compressing_a_compiled_model_compresses_its_module_eagerly(tmp_path, one_thread):
    """``tmps.compress(torch.compile(model))`` calibrates the original module without tracing (each
    hooked pass used to recompile the model, up to dynamo's limit), returns the same wrapper, whose
    next call runs the compressed layers, and ``tmps.save`` takes the wrapper too."""
    from torch._dynamo.utils import counters

    dense, ids, data = tiny("llama"), torch.randint(0, 64, (2, 9)), torch.randint(0, 64, (4, 16))
    want = tmps.compress(copy.deepcopy(dense), data, mode="kv", ratio=0.5, progress=False)(ids).logits
    torch._dynamo.reset()
    wrapper = torch.compile(copy.deepcopy(dense), backend="eager")
    with torch.no_grad():
        wrapper(ids)  # compiled once, dense
    frames = counters["frames"]["total"]
    assert tmps.compress(wrapper, data, mode="kv", ratio=0.5, progress=False) is wrapper
    assert counters["frames"]["total"] == frames  # nothing traced while compressing
    with torch.no_grad():
        torch.testing.assert_close(wrapper(ids).logits, want, rtol=1e-5, atol=1e-5)
    tmps.save(wrapper, tmp_path / "compiled")
    torch.testing.assert_close(tmps.load(tmp_path / "compiled")(ids).logits, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rope", ["longrope", "dynamic"])
def test_compiled_kv_mode_decodes_past_the_original_context_like_dense(rope, one_thread):
    """kv mode keeps, per token, the RoPE frequencies of the forward that wrote it (longrope's
    switch, dynamic NTK's growth) without a host sync, so compiling it breaks the graph no more often
    than compiling the dense model, whose own frequency update may branch on the positions (dynamic
    NTK; longrope on transformers 5.17): a longrope Phi-3 compiles as one graph where the dense one
    does. A 12-token prompt decoded 6 steps past the 16-position context gives the dense logits."""
    from torch._dynamo.utils import counters
    from test_compress import VOCAB
    from test_latent_attention import dynamic_ntk_llama, greedy_steps
    from test_phi3 import longrope_phi3

    dense = longrope_phi3() if rope == "longrope" else dynamic_ntk_llama()
    model = tmps.compress(copy.deepcopy(dense), torch.randint(0, VOCAB, (16, 12)), mode="kv", ratio=1.0,
                          progress=False)
    ids = torch.randint(1, VOCAB, (2, 12))
    breaks = {}
    with torch.no_grad():
        want = greedy_steps(dense, ids, 6, DynamicCache(config=dense.config))
        for name, module in (("dense", dense), ("kv", model)):
            torch._dynamo.reset()
            counters.clear()
            got = greedy_steps(torch.compile(module, backend="aot_eager"), ids, 6, DynamicCache(config=dense.config))
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            breaks[name] = sum(counters["graph_break"].values())
    assert breaks["kv"] <= breaks["dense"], breaks
    if rope == "dynamic":
        assert breaks["dense"] > 0
