"""Microbenchmark: one decode step of attention over kv mode's latent cache, against the dense cache.

    python benchmarks/latent_attention_bench.py --out results/latent_attention.md   # CUDA, fp16
    python benchmarks/latent_attention_bench.py --device cpu --shapes opt-1.3b      # CPU, fp32, torch only
    python benchmarks/latent_attention_bench.py --smoke                             # CPU, tiny, interpreter

One attention layer at decode (one new query token per sequence), fp16, batch 1 and 16, contexts
1024 and 4096, at kv ratio 0.5 split between K and V as tmps' uniform allocation does
(``k_share`` 0.35: ``r_k = 0.35 · d_kv``, ``r_v = 0.65 · d_kv``), rounded down to multiples of 8 as
``tmps.compress``'s ``rank_multiple`` does (``--align-ranks 1 8`` times the raw ranks beside them: at
OPT-1.3B's shape 717 / 1331, rows of 1434 / 2662 bytes, against 712 / 1328). Shapes of real models' attention:

* ``opt-1.3b``, ``opt-6.7b``: 32 heads of 64 / 128, no RoPE: both up-projections absorbed;
* ``llama-3-8b``: 32 query / 8 key-value heads of 128, RoPE; ``smollm2-135m``: 9 / 3 heads of 64, RoPE:
  keys rebuilt and rotated (torch chain or the Triton kernel), values absorbed.

Providers (``triton.testing.do_bench``, median):

* ``dense``: ``F.scaled_dot_product_attention`` over the full fp16 K/V cache (GQA by ``enable_gqa``);
* ``rebuild``: what kv mode did before the latent path: ``k = c_k U_kᵀ``, ``v = c_v U_vᵀ`` for the
  whole context, RoPE on the keys, then the same SDPA;
* ``latent``: :func:`tmps.models.latent_attention.latent_attention`, torch chain;
* ``latent+triton`` (RoPE shapes): the same with the fused key-score kernel
  (:mod:`tmps.kernels.latent_scores`);
* ``latent+fused``: the fused decode kernels (:mod:`tmps.kernels.latent_decode`: mask, softmax,
  values and ``U_v`` in two launches; no RoPE: the scores too), after the RoPE-score kernel where
  there is RoPE: what ``backend="triton"`` runs in a kv-mode model.

On CUDA every provider is timed twice, one row each: ``eager`` (do_bench: host launches included,
what a Python decode loop pays) and ``graph`` (device time of a CUDA-graph replay,
``tmps.kernels_bridge.device_ms``: what a captured decode step pays; at decode sizes the two differ
by the launches). Both flush L2 before every call (do_bench's 256 MiB): at b=1 a layer's latents
and ``U_k, U_v`` (~12 MB at OPT-1.3B's shape) would otherwise be read from the H200's 50 MB L2,
faster than any decode step that streams every layer gets them. A provider whose capture fails
gets no graph cell (and, after that, no provider does: see ``kernels/_common.py``).
The table is rewritten after every case, so a run cut short keeps the cases it finished.

Bytes: the dense step reads ``2·b·T·d_kv`` cache elements, the latent step ``b·T·(r_k + r_v)`` plus
``U_k, U_v``; "bound" is their ratio, the speedup a purely memory-bound step could reach. The
latent outputs are checked against the rebuild's (fp16 tolerance) in the same run.
"""

import argparse
import math
import os
import platform
import statistics
import sys
import time

from _bench_common import cuda_missing, write_lines  # benchmarks/ is sys.path[0] when run as a script

K_SHARE = 0.35
RATIO = 0.5
# name: (heads, kv_heads, head_dim, rope)
SHAPES = {
    "opt-1.3b": (32, 32, 64, False),
    "opt-6.7b": (32, 32, 128, False),
    "llama-3-8b": (32, 8, 128, True),
    "smollm2-135m": (9, 3, 64, True),
}
SMOKE_SHAPES = {"tiny-mha": (4, 4, 16, False), "tiny-gqa-rope": (6, 2, 32, True)}
PROVIDERS = ("dense", "rebuild", "latent", "latent+triton", "latent+fused")
LATENT_PROVIDERS = PROVIDERS[2:]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="also write the markdown table to this file")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (kernel under TRITON_INTERPRET=1)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: the real shapes in fp32, median of 5 wall-clock runs, torch providers only")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--context", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--align-ranks", type=int, nargs="+", default=[8], metavar="N",
                   help="ranks rounded down to multiples of N (tmps.compress's rank_multiple); several: a row each")
    return p.parse_args(argv)


def latent_ranks(kv_width, align=8):
    from e2e import uniform_kv_ranks  # the end-to-end benchmark's rule, so both time the same ranks

    return uniform_kv_ranks(kv_width, RATIO, K_SHARE, align)


def make_case(shape, batch, context, dtype, device, torch, align=8):
    heads, kv_heads, head_dim, rope = shape
    kv_width = kv_heads * head_dim
    r_k, r_v = latent_ranks(kv_width, align)
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*size, scale=1.0):
        return (torch.randn(*size, generator=gen) * scale).to(device=device, dtype=dtype)

    case = dict(q=rand(batch, heads, 1, head_dim), c_k=rand(batch, context, r_k), c_v=rand(batch, context, r_v),
                k_up=rand(kv_width, r_k, scale=r_k**-0.5), v_up=rand(kv_width, r_v, scale=r_v**-0.5),
                k=rand(batch, kv_heads, context, head_dim), v=rand(batch, kv_heads, context, head_dim),
                rope=None, r_k=r_k, r_v=r_v, scaling=head_dim**-0.5)
    if rope:
        inv = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        emb = torch.outer(torch.arange(context, dtype=torch.float32), inv).repeat(1, 2)
        case["rope"] = (emb.cos().to(device=device, dtype=dtype), emb.sin().to(device=device, dtype=dtype))
    return case


def providers(case, torch, latent_attention, kernel, fused):
    from tmps.models.rope import rotate

    F = torch.nn.functional
    q, scaling = case["q"], case["scaling"]
    b, heads, _, head_dim = q.shape
    kv_heads = case["k"].shape[1]
    gqa = dict(enable_gqa=True) if kv_heads != heads else {}

    def rebuild():
        k = (case["c_k"] @ case["k_up"].T).view(b, -1, kv_heads, head_dim).transpose(1, 2)
        v = (case["c_v"] @ case["v_up"].T).view(b, -1, kv_heads, head_dim).transpose(1, 2)
        if case["rope"] is not None:
            k = rotate(k, *case["rope"])
        return F.scaled_dot_product_attention(q, k, v, scale=scaling, **gqa).transpose(1, 2)

    args = (q, case["c_k"], case["c_v"], case["k_up"], case["v_up"], None, scaling)
    fns = {
        "dense": lambda: F.scaled_dot_product_attention(q, case["k"], case["v"], scale=scaling, **gqa),
        "rebuild": rebuild,
        "latent": lambda: latent_attention(*args, rope=case["rope"])[0],
    }
    if case["rope"] is not None and kernel is not None:
        fns["latent+triton"] = lambda: latent_attention(*args, rope=case["rope"], key_scores=kernel)[0]
    if fused is not None and (case["rope"] is None or kernel is not None):
        scores = kernel if case["rope"] is not None else None
        fns["latent+fused"] = lambda: latent_attention(*args, rope=case["rope"], key_scores=scores, values=fused)[0]
    return fns


def bytes_moved(case, elt):
    dense = 2 * case["k"].numel() * elt
    latent = (case["c_k"].numel() + case["c_v"].numel() + case["k_up"].numel() + case["v_up"].numel()) * elt
    return dense, latent


HEADER = ("| shape | batch | context | r_k / r_v | timing | " + " | ".join(f"{p} ms" for p in PROVIDERS)
          + " | best latent vs dense | vs rebuild | bound | latent GB/s | max err vs rebuild |")


def fmt(value, spec):
    return "n/a" if value is None else format(value, spec)


def table_row(name, batch, context, case, timing, ms, err, elt):
    dense_bytes, latent_bytes = bytes_moved(case, elt)
    latent_ms = [ms[p] for p in LATENT_PROVIDERS if ms.get(p) is not None]
    best = min(latent_ms) if latent_ms else None
    speed = None if best is None or ms.get("dense") is None else ms["dense"] / best
    vs_rebuild = None if best is None or ms.get("rebuild") is None else ms["rebuild"] / best
    gbps = None if best is None else latent_bytes / (best * 1e-3) / 1e9
    cells = [name, str(batch), str(context), f"{case['r_k']} / {case['r_v']}", timing]
    cells += [fmt(ms.get(p), ".4f") for p in PROVIDERS]
    cells += [fmt(speed, ".2f") + ("x" if speed else ""), fmt(vs_rebuild, ".2f") + ("x" if vs_rebuild else ""),
              f"{dense_bytes / latent_bytes:.2f}x", fmt(gbps, ".0f"), fmt(err, ".1e")]
    return "| " + " | ".join(cells) + " |"


def wall_clock_ms(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def max_error(fns):
    """max |out - rebuild| / max |rebuild| over the latent providers."""
    want = fns["rebuild"]().float()
    errors = [((fns[p]().float() - want).abs().max() / want.abs().max()).item()
              for p in LATENT_PROVIDERS if p in fns]
    return max(errors)


def run(args):
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before Triton and the kernels are imported
    import torch

    from tmps.models.latent_attention import latent_attention

    try:
        from tmps.kernels import latent_decode, latent_scores
        kernel, fused = latent_scores.latent_rope_scores, latent_decode.latent_decode_attention
        import triton
        triton_version = triton.__version__
    except Exception as exc:  # noqa: BLE001: the torch providers still run
        print(f"latent_attention_bench: no Triton kernel ({type(exc).__name__}: {exc})", file=sys.stderr)
        kernel, fused, triton_version = None, None, "absent"
    if args.smoke:
        device, dtype, shapes = "cpu", torch.float32, SMOKE_SHAPES
        batches, contexts = [1, 2], [33]
        if kernel is not None and not latent_scores._interpreted():
            raise SystemExit("--smoke: the kernel module was imported before TRITON_INTERPRET=1 could take effect")
    elif args.device == "cpu":
        device, dtype, shapes = "cpu", torch.float32, {name: SHAPES[name] for name in args.shapes}
        batches, contexts, kernel, fused = args.batch, args.context, None, None
    else:
        device, dtype, shapes = "cuda", torch.float16, {name: SHAPES[name] for name in args.shapes}
        batches, contexts = args.batch, args.context
        import triton.testing

        from tmps.kernels._common import L2_FLUSH_BYTES
        from tmps.kernels_bridge import device_ms
    if device == "cuda":
        gpu = torch.cuda.get_device_name()
    else:
        how = "smoke run, wall clock of one call" if args.smoke else "median of 5 wall-clock runs"
        gpu = f"CPU ({platform.machine()}, {torch.get_num_threads()} threads; {how})"
    tolerance = 2e-2 if dtype == torch.float16 else 1e-4
    lines = [f"# kv decode attention over the latent cache on {gpu}", "",
             f"torch {torch.__version__}, triton {triton_version}, {str(dtype)[6:]}, one decode token per sequence, "
             f"kv ratio {RATIO} (r_k = {K_SHARE} of the latent width), times in ms (do_bench median on CUDA). "
             f"Tolerance of the check against the rebuild: {tolerance:g}.", "", HEADER,
             "|" + "---|" * (HEADER.count("|") - 1)]
    failures = 0
    for name, shape in shapes.items():
        for batch in batches:
            for context, align in ((c, a) for c in contexts for a in args.align_ranks):
                case = make_case(shape, batch, context, dtype, device, torch, align)
                timings = ("eager", "graph") if device == "cuda" else ("wall",)
                with torch.no_grad():
                    fns = providers(case, torch, latent_attention, kernel, fused)
                    ms = {timing: {} for timing in timings}
                    for provider, fn in fns.items():
                        try:
                            fn()  # compile / autotune outside the timing
                            if device == "cuda":
                                torch.cuda.synchronize()
                                ms["eager"][provider] = triton.testing.do_bench(fn, return_mode="median")
                                try:
                                    ms["graph"][provider] = device_ms(fn, flush_bytes=L2_FLUSH_BYTES)
                                except torch.cuda.OutOfMemoryError:
                                    raise
                                except RuntimeError as exc:  # a capture that fails: that cell stays empty
                                    print(f"  {provider}: no CUDA-graph timing: {exc}"[:300], flush=True)
                            else:
                                ms["wall"][provider] = wall_clock_ms(fn, 1 if args.smoke else 5)
                        except torch.cuda.OutOfMemoryError:
                            torch.cuda.empty_cache()
                    err = max_error(fns)
                failures += not (err <= tolerance and math.isfinite(err))
                for timing in timings:
                    line = table_row(name, batch, context, case, timing, ms[timing], err, torch.finfo(dtype).bits // 8)
                    lines.append(line)
                    print(line, flush=True)
                del case, fns
                if args.out:  # kept if the run is cut short
                    write_lines(args.out, lines + ["", f"Partial: the run stopped here ({failures} case(s) outside "
                                                       "the tolerance so far)."])
    lines += ["", f"{failures} case(s) outside the tolerance."]
    return lines, failures


def main(argv=None):
    args = parse_args(argv)
    if not args.smoke and args.device == "cuda" and cuda_missing("latent_attention_bench"):
        return 2
    lines, failures = run(args)
    if args.out:
        write_lines(args.out, lines)
        print(f"wrote {args.out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
