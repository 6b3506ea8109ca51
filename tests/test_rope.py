"""tmps.models.rope.rope_pairs: HF's rotary table at cache slots 0..T-1, computed once and sliced."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from tmps.models.rope import current_frequencies, longrope_call_is_long, longrope_pairs, per_token_pairs, rope_pairs

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64, "rope_theta": 10000.0}
DYNAMIC = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}


def rotary(params=None):
    kw = {} if params is None else {"rope_parameters": params}
    return LlamaRotaryEmbedding(config=LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=128,
                                                   **kw))


def hf_table(module, total, like):
    cos, sin = module(like, torch.arange(total).unsqueeze(0))
    return cos[0].to(like.dtype), sin[0].to(like.dtype)


class RecordOps(TorchDispatchMode):
    """Records the name of every aten op run inside it (``.ops``): the kernels a step would launch."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("params", [None, LLAMA3, DYNAMIC], ids=["default", "llama3", "dynamic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tables_equal_hf_at_every_length(params, dtype):
    module, like = rotary(params), torch.zeros(1, dtype=dtype)
    for total in (5, 100, 7, 300, 129):  # grows past the cached length twice, shrinks in between
        pairs = rope_pairs(module, total, like)
        got, want = (pairs[:, 0], pairs[:, 1]), hf_table(module, total, like)
        for g, w in zip(got, want):
            assert g.shape == (total, 16) and g.dtype == dtype
            torch.testing.assert_close(g, w, rtol=0, atol=1e-6 if dtype == torch.float32 else 8e-3)
    cached = "_tmps_rope_tables" in module.__dict__
    assert cached == (params is not DYNAMIC)  # dynamic RoPE rescales by the longest position: never cached


def test_a_cached_table_is_a_view_without_kernels():
    module, like = rotary(), torch.zeros(1)
    rope_pairs(module, 1024, like)
    with RecordOps() as record:
        pairs = rope_pairs(module, 1024, like)
        cos, sin = pairs[:, 0], pairs[:, 1]
    assert all(any(view in op for view in ("slice", "select", "alias", "view")) for op in record.ops), record.ops
    with RecordOps() as uncached:
        hf_table(module, 1024, like)
    assert any("cos" in op for op in uncached.ops)  # what each layer paid per step before


def test_a_changed_inv_freq_is_seen():
    module, like = rotary(), torch.zeros(1)
    before = rope_pairs(module, 50, like)[:, 0].clone()
    with torch.no_grad():
        module.inv_freq.mul_(0.5)  # in place: same storage, new version
    after = rope_pairs(module, 50, like)[:, 0]
    torch.testing.assert_close(after, hf_table(module, 50, like)[0], rtol=0, atol=1e-6)
    assert not torch.allclose(after, before)
    module.inv_freq = module.inv_freq * 2.0  # replaced: new storage
    torch.testing.assert_close(rope_pairs(module, 50, like)[:, 0], before, rtol=0, atol=1e-6)


@pytest.mark.parametrize("state", ["after a short forward", "after a long forward"])
def test_longrope_tables_are_hfs_short_and_long_ones_whatever_the_rotary_state(state):
    """Each slot's row is HF's table of its factors at that position, wherever the rotary's own
    choice stands (on transformers 5.17 the long table once came out short after a short forward),
    and reading the tables leaves that choice as it was."""
    from test_phi3 import longrope_phi3

    r, like = longrope_phi3().model.rotary_emb, torch.zeros(1, 1, 48)
    with torch.no_grad():
        short_hf = r(like, torch.arange(16)[None])[0][0]  # 16 positions: the original context, short factors
        long_hf = r(like, torch.arange(40)[None])[0][0]   # past it: the long factors at every position
        r(like, torch.arange(10 if "short" in state else 30)[None])
        long_now, inv_freq = longrope_call_is_long(r), r.inv_freq.clone()
        assert bool(long_now) == (state == "after a long forward")
        slots = torch.arange(40) >= 16
        pairs = longrope_pairs(r, 40, like, slots)
    assert torch.equal(pairs[:16, 0], short_hf) and torch.equal(pairs[16:, 0], long_hf[16:])
    assert not torch.equal(short_hf, long_hf[:16])  # the two tables differ
    assert torch.equal(r.inv_freq, inv_freq) and r.rope_type == "longrope"
    assert bool(longrope_call_is_long(r)) == bool(long_now)


@pytest.mark.parametrize("params", [None, DYNAMIC, LLAMA3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_token_pairs_with_one_frequency_row_are_hfs_table(params, dtype):
    """Every token at the rotary's current frequencies: HF's own table, bit for bit (the per-token
    tables of dynamic NTK RoPE compute it the way HF's forward does)."""
    module, like = rotary(params), torch.zeros(1, 1, 64, dtype=dtype)
    with torch.no_grad():
        cos, sin = module(like, torch.arange(40)[None])
        pairs = per_token_pairs(module, current_frequencies(module).expand(40, -1), like)
    assert pairs.dtype == dtype
    assert torch.equal(pairs[:, 0], cos[0]) and torch.equal(pairs[:, 1], sin[0])
