"""``generate`` at full rank gives the dense model's tokens and logits, for every supported model type.

One net over the combinations the per-model tests take a few at a time: sdpa and eager attention;
kv mode on its latent and rebuild paths and weights mode; dynamic and static caches; a batch whose
rows are left-padded by 3, 1 and 0 tokens. A compressed model that matches dense only where its
rows are unpadded, or only through one cache class, shows here.
"""
import copy

import pytest
import torch

import tmps

from test_compress import VOCAB, calib
from test_latent_attention import kernels_run_here
from test_pretrained import BUILDERS


def build(arch, attn):
    model = BUILDERS[arch](attn)
    model.generation_config.pad_token_id = 0
    return model


def full_rank(dense, mode):
    rank = {"ratio": 1.0} if mode == "kv" else {"hooi_ranks": [dense.config.hidden_size]}
    return tmps.compress(copy.deepcopy(dense), calib(), mode=mode, progress=False, **rank)


def left_padded_batch():
    ids = torch.randint(3, VOCAB, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[1, :1] = 0
    return ids.masked_fill(mask == 0, 0), mask


def generated(model, ids, mask, cache):
    kwargs = {"cache_implementation": "static"} if cache == "static" else {}
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, **kwargs)
    return out.sequences, torch.stack(out.logits, 1)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", list(BUILDERS))
def test_left_padded_generate_matches_dense(arch, attn, one_thread):
    assert_generate_matches_dense(arch, attn, "torch")


@pytest.mark.skipif(not kernels_run_here(), reason="Triton's interpreter is not on (TRITON_INTERPRET=1)")
@pytest.mark.parametrize("arch", ["llama", "opt", "gemma3", "phi3"])
def test_left_padded_generate_matches_dense_with_the_kernels(arch, one_thread):
    """The same with the Triton kernels forced (the interpreter here): OPT's biases, Llama's RoPE and
    GQA, Gemma 3's key norms and windows, Phi-3's fused projection; sdpa. kv mode's rebuild path
    adds no kernel that weights mode does not run, so it is left to the torch cases."""
    assert_generate_matches_dense(arch, "sdpa", "triton", kv_paths=("latent",))


def assert_generate_matches_dense(arch, attn, backend, kv_paths=("latent", "rebuild")):
    dense = build(arch, attn)
    ids, mask = left_padded_batch()
    want = {cache: generated(dense, ids, mask, cache) for cache in ("dynamic", "static")}
    mismatches = []
    for mode, paths in (("kv", kv_paths), ("weights", (None,))):
        model = full_rank(dense, mode)
        for path in paths:
            tmps.set_paths(model, backend=backend, **({"kv_attention": path} if path else {}))
            for cache, (tokens, logits) in want.items():
                got_tokens, got_logits = generated(model, ids, mask, cache)
                rel = [((g - w).norm() / w.norm()).item() for g, w in zip(got_logits, logits)]
                if not torch.equal(got_tokens, tokens) or max(rel) > 1e-4:
                    mismatches.append(f"{mode} {path or ''} {cache}: per-row relative error "
                                      + ", ".join(f"{r:.1e}" for r in rel))
    assert not mismatches, "\n".join(mismatches)
