"""Prefill FLOPs of dense and compressed OPT-shaped models, counted, next to e2e.py's cost model.

    python benchmarks/flop_count.py                          # opt-1.3b and opt-6.7b, in seconds
    python benchmarks/flop_count.py --shapes opt-1.3b --prefill 1x2048 8x512 --align-ranks 1

e2e.py judges each prefill speed-up against a bound, dense FLOPs / compressed FLOPs, computed from
shapes (:func:`e2e.prefill_flops`). This script builds the models e2e.py times (the same shapes,
variants and random factors) on torch's ``meta`` device, where nothing is allocated or computed,
and counts what one prefill forward dispatches with ``torch.utils.flop_counter.FlopCounterMode``:
every mm / addmm / bmm, 2 FLOPs per multiply-add. Attention is eager, so that its two products are
counted bmms on any device; it multiplies the masked half of ``QKᵀ`` and ``PV`` too, which the cost
model (causal: ``2·T²·width`` per sequence and layer) leaves out, so that half is subtracted.

The table gives both counts, whether they agree, and compressed over dense (1 / the bound). The
exit status is 1 when a count and the cost model disagree: the bound would then judge the GPU's
speed-ups against work the model does not do. ``tests/test_flop_count.py`` runs it.
"""
from __future__ import annotations

import argparse
import copy
import sys

import e2e  # benchmarks/ is sys.path[0] when run as a script
from tmps.models.latent_attention import prefers_latent

MODES = ("dense", "kv", "weights")


def variant_model(cfg, mode: str, device: str = "meta", align: int = 8, attention: str | None = None):
    """``(model, cost)``: e2e.py's ``mode`` model of ``cfg`` with its random factors, fp16 on
    ``meta`` and fp32 elsewhere, and :func:`e2e.cost_model` of it. ``attention`` overrides
    ``cfg``'s attention implementation (``cfg`` itself is left as it is)."""
    import torch

    cfg = copy.deepcopy(cfg)
    if attention is not None:
        cfg._attn_implementation = attention
    model = e2e.build_model(cfg, torch.float16 if device == "meta" else torch.float32, device, seed=0)
    if mode != "dense":
        e2e.random_factors(model, mode, e2e.RATIO, align=align)
    return model, e2e.cost_model(cfg, getattr(model, "tmps_info", None))


def count_prefill(cfg, mode: str, batch: int, seq: int, device: str = "meta", align: int = 8) -> tuple[int, int]:
    """(counted, modelled) FLOPs of one ``(batch x seq)`` prefill of e2e.py's ``mode`` model.

    counted: FlopCounterMode's total with eager attention's masked half subtracted; modelled:
    :func:`e2e.prefill_flops` of the model's shapes (kv mode at ratio 0.5 rebuilds keys and values,
    so ``seq`` must exceed ``d_kv / heads`` queries, past which kv mode stops reading the latents).
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model, cost = variant_model(cfg, mode, device, align, attention="eager")
    ids = torch.randint(4, cfg.vocab_size, (batch, seq), device=device)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    masked_half = cost["layers"] * batch * 2 * seq * seq * cost["attn_width"]
    return counter.get_total_flops() - masked_half, e2e.prefill_flops(cost, batch, seq, dense=mode == "dense")


def shape_config(name: str):
    """e2e.py's OPTConfig of the shape ``name`` (its smoke shape "tiny" too)."""
    smoke = name in e2e.SMOKE_SHAPE
    return e2e.opt_config((e2e.SMOKE_SHAPE if smoke else e2e.SHAPES)[name], smoke)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=list(e2e.SHAPES), choices=list(e2e.SHAPES) + list(e2e.SMOKE_SHAPE))
    p.add_argument("--prefill", nargs="+", type=e2e._pair, default=[(1, 2048), (8, 512)],
                   help="BATCHxSEQ cases (default: e2e.py's 1x2048 8x512)")
    p.add_argument("--align-ranks", type=int, default=8, help="e2e.py's --align-ranks (1: the raw uniform ranks)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    longest = max(seq for _, seq in args.prefill)
    for name in args.shapes:
        limit = shape_config(name).max_position_embeddings
        if longest > limit:  # the meta device would count a forward that cannot run
            print(f"--prefill: {longest} tokens exceed {name}'s {limit} positions", file=sys.stderr)
            return 2
    print("| shape | prefill | variant | counted GFLOP | cost model GFLOP | agree | over dense |")
    print("|---|---|---|---|---|---|---|")
    disagree = 0
    for name in args.shapes:
        cfg = shape_config(name)
        for batch, seq in args.prefill:
            for mode in MODES:  # dense first: the others are given over it
                counted, modelled = count_prefill(cfg, mode, batch, seq, align=args.align_ranks)
                if mode == "dense":
                    dense = counted
                disagree += counted != modelled
                agree = "yes" if counted == modelled else "**no**"
                latent = mode == "kv" and prefers_latent(cfg.num_attention_heads, seq, cfg.hidden_size)
                if counted != modelled and latent:
                    agree += " (kv reads the latents at this size; the cost model rebuilds)"
                print(f"| {name} | {batch}x{seq} | {mode} | {counted / 1e9:.6g} | {modelled / 1e9:.6g} | {agree} | "
                      f"{counted / dense:.4f} |", flush=True)
    if disagree:
        print(f"{disagree} counts disagree with e2e.py's cost model", file=sys.stderr)
    return 1 if disagree else 0


if __name__ == "__main__":
    sys.exit(main())
