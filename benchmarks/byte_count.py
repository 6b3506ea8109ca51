"""Decode bytes of dense and compressed OPT-shaped models, counted, next to e2e.py's cost model.

    python benchmarks/byte_count.py                          # opt-1.3b and opt-6.7b, in seconds
    python benchmarks/byte_count.py --shapes opt-1.3b --batch 1 16 --context 1024 --align-ranks 1

e2e.py judges each decode speed-up against a bound, dense bytes / compressed bytes per step
(:func:`e2e.decode_bytes`: every weight read once, the LM head included, plus the KV cache at
``--context``). This script builds the models e2e.py times (the same shapes, variants and random
factors) on torch's ``meta`` device, where nothing is allocated or computed, and counts what one
decode step reads, in two ways:

* **reads** -- the storages of the model's parameters and buffers and of the cache that any op of
  the step takes as input, each counted once, in full. The step attends eagerly (the storages
  sdpa reads too) over a ``DynamicCache`` of ``context`` positions (``context - 1`` prefilled,
  then the new token's). Embedding lookups are
  left out: they read one row per token (learned positions are read only that way), and the tied
  token embedding is read in full by the LM head. This is what the bound says a step must move.
* **torch-path traffic** -- what the step would move if every op read its inputs from memory and
  wrote its output there (nothing kept on chip or in L2): e2e.py's CUDA-graph step (``context``
  tokens prefilled into a ``StaticCache``, the mask and positions on the device), each op moving
  the bytes of its tensor inputs and outputs (broadcast views at their full size). Views and
  allocations move nothing; ``index_copy_`` moves its source (the new token's slots); an
  embedding lookup its rows; ``F.scaled_dot_product_attention`` counts as one fused op (on
  ``meta`` it would decompose into the math path a GPU does not run). The static cache has
  ``e2e.static_cache_length`` slots, all read by attention, masked or not.

The table gives both, the bound, and traffic over reads: how far the op-by-op torch path is from the
fewest bytes. The exit status is 1 when the reads and the cost model disagree: the bound would then
judge the GPU's speed-ups against traffic the model does not have. ``tests/test_byte_count.py``
runs it.
"""
from __future__ import annotations

import argparse
import collections
import sys

import e2e  # benchmarks/ is sys.path[0] when run as a script
from flop_count import MODES, shape_config, variant_model

STEPS = 4  # static cache slots for a few steps past the context, as e2e.py sizes them


def _tensors(tree):
    import torch

    return [t for t in torch.utils._pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


def count_decode_reads(cfg, mode: str, batch: int, context: int, device: str = "meta",
                       align: int = 8) -> tuple[int, int]:
    """(counted, modelled) bytes of parameters, buffers and cache that one decode step reads.

    counted: the storages of ``model.parameters()``, ``model.buffers()`` and the step's cache layers
    that some op takes as input (embedding lookups aside), each once; modelled:
    :func:`e2e.decode_bytes` of the model's shapes at ``context``, scaled to the model's element
    size (the cost model is in fp16's 2 bytes; the CPU runs fp32).
    """
    import torch
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers import DynamicCache

    from tmps.compat import cache_keyword

    class StoragesRead(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.read = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is not torch.ops.aten.embedding.default:
                self.read.update(StorageWeakRef(t.untyped_storage()) for t in _tensors((args, kwargs)))
            return func(*args, **kwargs)

    if context < 2:
        raise ValueError(f"context must be at least 2 (one prefilled token and the new one), got {context}")
    # Eager attention reads the same storages as sdpa; transformers 5.17's sdpa mask calls .item(),
    # which the meta device cannot answer.
    model, cost = variant_model(cfg, mode, device, align, attention="eager")
    ids = torch.randint(4, cfg.vocab_size, (batch, context), device=device)
    cache, keyword = DynamicCache(), cache_keyword(model)
    reads = StoragesRead()
    with torch.no_grad():
        model(input_ids=ids[:, :-1], **{keyword: cache}, use_cache=True, logits_to_keep=1)
        with reads:
            model(input_ids=ids[:, -1:], **{keyword: cache}, use_cache=True, logits_to_keep=1)
    state = list(model.parameters()) + list(model.buffers())
    state += [t for layer in cache.layers for t in (layer.keys, layer.values)]
    sizes = {StorageWeakRef(t.untyped_storage()): t.untyped_storage().nbytes() for t in state}
    counted = sum(size for storage, size in sizes.items() if storage in reads.read)
    element = next(model.parameters()).element_size()
    return counted, round(e2e.decode_bytes(cost, batch, context, dense=mode == "dense") * element / 2)


def torch_path_traffic(cfg, mode: str, batch: int, context: int, device: str = "meta",
                       align: int = 8) -> tuple[int, dict[str, int]]:
    """(total, bytes per aten op) that one static-cache decode step moves op by op (module docstring)."""
    import torch
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    moves_nothing = {aten.empty.memory_format, aten.empty_strided.default, aten.new_empty.default,
                     aten.detach.default}

    class OpTraffic(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.by_op = collections.Counter()
            self.fused = 0  # inside an op counted as one

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            if self.fused or func.is_view or func in moves_nothing:
                return out
            if func is aten.index_copy_.default:  # (self, dim, index, source): the source's slots
                moved = 2 * _nbytes(args[3]) + _nbytes(args[2])
            elif func is aten.embedding.default:  # (weight, indices): the rows looked up
                moved = 2 * _nbytes(out) + _nbytes(args[1])
            else:
                moved = sum(map(_nbytes, _tensors((args, kwargs)))) + sum(map(_nbytes, _tensors(out)))
            self.by_op[func.__name__] += moved
            return out

    class FusedAttention(TorchFunctionMode):
        def __init__(self, traffic):
            super().__init__()
            self.traffic = traffic

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is not F.scaled_dot_product_attention:
                return func(*args, **kwargs)
            self.traffic.fused += 1
            try:
                out = func(*args, **kwargs)
            finally:
                self.traffic.fused -= 1
            self.traffic.by_op["scaled_dot_product_attention"] += sum(map(_nbytes, _tensors((args, kwargs, out))))
            return out

    model, _ = variant_model(cfg, mode, device, align)
    step, _, _ = e2e.static_decoder(model, batch, context, STEPS, device, seed=0)
    traffic = OpTraffic()
    with FusedAttention(traffic), traffic:
        step()
    return sum(traffic.by_op.values()), dict(traffic.by_op)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=list(e2e.SHAPES), choices=list(e2e.SHAPES) + list(e2e.SMOKE_SHAPE))
    p.add_argument("--batch", nargs="+", type=int, default=[1, 16], help="decode batch sizes (default: e2e.py's 1 16)")
    p.add_argument("--context", type=int, default=1024, help="cached positions a step attends over (default 1024)")
    p.add_argument("--align-ranks", type=int, default=8, help="e2e.py's --align-ranks (1: the raw uniform ranks)")
    p.add_argument("--top", type=int, default=0, help="also list each case's N ops that move the most bytes")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    for name in args.shapes:
        limit = shape_config(name).max_position_embeddings
        if not 2 <= args.context < limit:  # the static step's new token sits at position ``context``
            print(f"--context: {args.context} is outside 2..{limit - 1} for {name}'s {limit} positions",
                  file=sys.stderr)
            return 2
    print("| shape | batch | variant | reads GB | cost model GB | agree | bound | torch-path traffic GB | "
          "traffic / reads |")
    print("|---|---|---|---|---|---|---|---|---|")
    disagree, tops = 0, []
    for name in args.shapes:
        cfg = shape_config(name)
        for batch in args.batch:
            for mode in MODES:  # dense first: the bound is dense reads over the variant's
                counted, modelled = count_decode_reads(cfg, mode, batch, args.context, align=args.align_ranks)
                traffic, by_op = torch_path_traffic(cfg, mode, batch, args.context, align=args.align_ranks)
                if mode == "dense":
                    dense = counted
                disagree += counted != modelled
                agree = "yes" if counted == modelled else "**no**"
                print(f"| {name} | {batch} | {mode} | {counted / 1e9:.4f} | {modelled / 1e9:.4f} | {agree} | "
                      f"{dense / counted:.3f}x | {traffic / 1e9:.4f} | {traffic / counted:.2f} |", flush=True)
                top = sorted(by_op.items(), key=lambda item: -item[1])[:args.top]
                if top:
                    tops.append(f"{name} b={batch} {mode}: " + ", ".join(f"{op} {b / 1e9:.3f}" for op, b in top))
    if tops:
        print("\nGB moved by the ops that move the most, per case:\n")
        print("\n".join(f"- {line}" for line in tops))
    if disagree:
        print(f"{disagree} counts disagree with e2e.py's cost model", file=sys.stderr)
    return 1 if disagree else 0


if __name__ == "__main__":
    sys.exit(main())
