"""Peak memory of ``tmps.compress`` on an OPT-1.3B-shaped model (random weights), against the model's size.

    python benchmarks/memory.py                         # OPT-1.3B shape, kv mode, float32, CPU
    python benchmarks/memory.py --mode weights --calib 4x256 --out results/memory.md

The model is built from ``OPTConfig`` with the published OPT-1.3B sizes (hidden 2048, 24 layers, 32
heads, FFN 8192, vocabulary 50272) and seeded random weights: OPT checkpoints cannot be downloaded
here, and memory does not depend on the weights' values. Calibration is random token ids.

Peak memory is the process's peak resident set (``VmHWM`` from ``/proc/self/status``, reset through
``/proc/self/clear_refs`` just before compressing), so it counts everything: the model, torch's
own runtime, calibration activations, the Fisher pass's backward, float64 statistics and the
factors. The issue's bar is a peak under 2× the model's own size (its parameter bytes); the script
prints the ratio and exits with status 1 when the bar is missed.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import OPTConfig, OPTForCausalLM

import tmps

OPT_1_3B = dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, ffn_dim=8192, vocab_size=50272,
                max_position_embeddings=2048, word_embed_proj_dim=2048)


def _status_kib(field: str) -> int:
    """A ``/proc/self/status`` field (``VmRSS``, ``VmHWM``) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} (Linux only)")


def _reset_peak() -> None:
    """Make VmHWM restart from the current resident set (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=["kv", "weights"], default="kv")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--metric", choices=["auto", "fisher", "analytic"], default="auto")
    p.add_argument("--calib", default="4x256", help="calibration sequences x tokens (random ids)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="also write the table (.md) and numbers (.json) here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    n, t = map(int, args.calib.split("x"))

    torch.manual_seed(0)
    config = OPTConfig(**OPT_1_3B, attn_implementation="sdpa")
    model = OPTForCausalLM(config).to(getattr(torch, args.dtype)).eval()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    calib = torch.randint(4, config.vocab_size, (n, t), generator=torch.Generator().manual_seed(1))

    rss_before = _status_kib("VmRSS") * 1024
    _reset_peak()
    start = time.perf_counter()
    tmps.compress(model, calib, mode=args.mode, ratio=args.ratio, metric=args.metric, progress=True)
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM") * 1024
    s = tmps.summary(model.tmps_info)

    gib = 2 ** 30
    row = {"model": "OPT-1.3B shape, random weights", "dtype": args.dtype, "mode": args.mode, "ratio": args.ratio,
           "metric": model.tmps_info["config"]["metric"], "calibration": args.calib,
           "model_gib": model_bytes / gib, "rss_before_gib": rss_before / gib, "peak_rss_gib": peak / gib,
           "peak_over_model": peak / model_bytes, "compress_s": seconds, "threads": torch.get_num_threads(),
           "qkv_parameters_kept": s["qkv_parameters_kept"], "kv_cache_kept": s["kv_cache_kept"]}
    table = ("| model | dtype | mode | metric | calibration | model size | RSS before | peak RSS while compressing | "
             "peak / model | compress time |\n|---|---|---|---|---|---|---|---|---|---|\n"
             f"| {row['model']} | {args.dtype} | {args.mode} {args.ratio} | {row['metric']} | {args.calib} tokens | "
             f"{row['model_gib']:.2f} GiB | {row['rss_before_gib']:.2f} GiB | {row['peak_rss_gib']:.2f} GiB | "
             f"**{row['peak_over_model']:.2f}×** | {seconds:.0f} s ({row['threads']} threads) |\n")
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(table)
        out.with_suffix(".json").write_text(json.dumps(row, indent=1))
    if row["peak_over_model"] >= 2.0:
        print(f"peak memory {row['peak_over_model']:.2f}x the model's size: over the 2x bar", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
