"""Microbenchmark: fused factored QKV projection (Triton) against torch, with a roofline.

    python benchmarks/kernel_microbench.py --out results/kernels.md     # CUDA: full sweep
    python benchmarks/kernel_microbench.py --smoke                      # CPU: one tiny interpreted shape

Shapes follow OPT-like attention: hidden h in {768, 2048, 4096}, n = h / 64 heads of head_dim 64,
three groups (q, k, v).  Rank ratio rho in {0.5, 0.25, 0.125} defines the shared rank
``r = rho * h``; the per-head core width is ``s = head_dim = 64``.  Three layouts:

* ``out_factor``: the whole factor-core-factor chain: every group has a per-head out factor
  (64, 64) and a bias (OPT's q/k/v biases), output (M, h) per group. ``tmps.compress`` keeps an out
  factor only where ``hooi_ranks`` asks for ``r_out < head_dim`` (a square one is folded into the
  cores), so this is the kernel's full path rather than a default model's; run 2 called it ``weights``;
* ``weights_model``: what ``tmps.compress``'s weights mode runs on OPT: the in factor ``(h, r)``,
  per-head cores ``(n, 64, r)`` with the square out factor folded in, no out factor, OPT's biases,
  output (M, h) per group (run 2's ``kv_latent`` rows were this without the biases);
* ``kv_model``: what ``tmps.compress``'s kv mode runs: no in factor (``z = x``), a dense per-head Q
  (n, 64, h) with its bias, and the K / V latent projections (1, r_k, h), (1, r_v, h), biased too,
  with ``r_k + r_v = 2 rho h`` (the KV cache kept is rho), split 0.35 / 0.65 and rounded down to
  multiples of 8 as ``rank_multiple`` does.  Three GEMMs on one input: the kernel runs them as one
  launch over all their columns, the chain as three ``addmm``.  No factor chain to fuse, so
  ``benchmarks/targets.py`` leaves these rows out of the factor-core-factor targets.

Providers (fp16, timed with ``triton.testing.do_bench``, median of its repetitions):

* ``torch_dense``: ``F.linear`` with the concatenated dense (3h, h) QKV weight;
* ``torch_factored``: the unfused chain, ``fused_factored_projection_ref``;
* ``torch_compile``: ``torch.compile`` of that chain;
* ``triton``: the kernel as the compressed modules call it, a ``FusedProjection`` launcher built once
  per case (factors checked once, then only x; autotuned, its first call per shape tunes).

Two timings per provider and shape.  ``do_bench`` times each call from the host, launch overhead
included: a decode-sized call is over in microseconds, so there the host's Python and launch
path can be the whole number (on the H200 VM the kernel's eager call was 0.50 ms at 1 and at 16
tokens alike).  The CUDA-graph timing captures ``reps`` calls, each after the same 256 MiB L2
flush do_bench uses, into one graph, and subtracts a graph of the flushes alone: device time,
what a decode step under CUDA graphs pays.  Both land in the tables and the JSON twin.

The same run measures the ceilings: an fp16 8192^3 matmul (TFLOP/s) and a 1 GiB device copy
(GB/s, read + write).  For Triton it reports achieved TFLOP/s (factorised flops
``2M(d_in r + sum_g n_g s_g r + sum_g n_g s_g o_g)``), GB/s over the fewest bytes (read x and the
factors once, write the outputs) and % of roofline ``max(flops / peak_flops, bytes / peak_bw) /
time``, plus speedups ``provider_ms / triton_ms``.  The GPU's name heads the output.
"""

import argparse
import copy
import json
import os
import sys
import time

from _bench_common import cuda_missing, write_lines  # benchmarks/ is sys.path[0] when run as a script

HIDDEN = (768, 2048, 4096)
TOKENS = (1, 16, 512, 4096, 16384)
RATIOS = (0.5, 0.25, 0.125)
LAYOUTS = ("out_factor", "weights_model", "kv_model")
K_SHARE = 0.35  # kv_model: the share of the latent width given to K (tmps.compress's k_share)
HEAD_DIM = 64
DECODE_MAX_TOKENS = 16
PROVIDERS = ("torch_dense", "torch_factored", "torch_compile", "triton")
DEVICE = "cuda"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="also write the markdown tables to this file")
    p.add_argument("--smoke", action="store_true", help="one tiny shape on CPU under TRITON_INTERPRET=1")
    p.add_argument("--hidden", type=int, nargs="+", default=list(HIDDEN))
    p.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    p.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS))
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    p.add_argument("--no-compile", action="store_true", help="skip the torch_compile provider")
    p.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph (device time) timing")
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS),
                   help="time only these (e.g. torch_compile alone, to merge into an earlier run)")
    p.add_argument("--merge", action="store_true",
                   help="fold this run into --out's existing JSON (same cases gain these timings) and append "
                        "its tables to the markdown, instead of overwriting both")
    args = p.parse_args(argv)
    if args.merge and not args.out:
        p.error("--merge needs --out (the run to merge into)")
    return args


def make_case(hidden, tokens, ratio, layout, dtype, device, torch):
    """Inputs of one shape plus the dense QKV weight of the same output width."""
    n = hidden // HEAD_DIM
    r = max(1, int(round(ratio * hidden)))
    s = HEAD_DIM
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    x = rand(tokens, hidden)
    if layout == "kv_model":
        from e2e import uniform_kv_ranks  # the end-to-end benchmark's kv ranks at this ratio

        r_k, r_v = uniform_kv_ranks(hidden, ratio, K_SHARE)
        cores = [rand(n, s, hidden, scale=hidden**-0.5), rand(1, r_k, hidden, scale=hidden**-0.5),
                 rand(1, r_v, hidden, scale=hidden**-0.5)]
        biases = [rand(c.shape[0] * c.shape[1], scale=0.1) for c in cores]
        widths = [hidden, r_k, r_v]
        dense_weight = rand(3 * hidden, hidden, scale=hidden**-0.5)  # the dense model's q, k, v
        return dict(x=x, in_factor=None, cores=cores, out_factors=[None] * 3, biases=biases, r=r_k + r_v,
                    n=n, s=s, widths=widths, dense_weight=dense_weight,
                    dense_bias=rand(3 * hidden, scale=0.1))
    in_factor = rand(hidden, r, scale=hidden**-0.5)
    cores = [rand(n, s, r, scale=r**-0.5) for _ in range(3)]
    out_factors = [rand(HEAD_DIM, s, scale=s**-0.5) if layout == "out_factor" else None for _ in range(3)]
    biases = [rand(n * HEAD_DIM, scale=0.1) for _ in range(3)]  # OPT's q/k/v biases
    widths = [n * (s if a is None else a.shape[0]) for a in out_factors]
    dense_weight = rand(sum(widths), hidden, scale=hidden**-0.5)
    dense_bias = torch.cat(biases)
    return dict(x=x, in_factor=in_factor, cores=cores, out_factors=out_factors, biases=biases, r=r, n=n, s=s,
                widths=widths, dense_weight=dense_weight, dense_bias=dense_bias)


def work(case, elt):
    """(factorised flops, fewest bytes) of one call."""
    m, d_in = case["x"].shape
    has_in = case["in_factor"] is not None
    flops = d_in * case["r"] if has_in else 0
    nbytes = m * d_in + (d_in * case["r"] if has_in else 0)
    for core, a, b, w in zip(case["cores"], case["out_factors"], case["biases"], case["widths"]):
        flops += core.numel() + (0 if a is None else core.shape[0] * core.shape[1] * a.shape[0])
        nbytes += core.numel() + (0 if a is None else a.numel()) + (0 if b is None else b.numel()) + m * w
    return 2 * m * flops, elt * nbytes


def providers(case, compiled_chain, torch, fp):
    args = (case["x"], case["in_factor"], case["cores"], case["out_factors"], case["biases"])
    launcher = fp.FusedProjection(*args[1:], like=case["x"])
    fns = {
        "torch_dense": lambda: torch.nn.functional.linear(case["x"], case["dense_weight"], case["dense_bias"]),
        "torch_factored": lambda: fp.fused_factored_projection_ref(*args),
        "triton": lambda: launcher(case["x"]),
    }
    if compiled_chain is not None:
        fns["torch_compile"] = lambda: compiled_chain(*args)
    return fns


def graph_ms(fn):
    """Device time of one ``fn()`` in ms: CUDA-graph replays of (256 MiB L2 flush, fn) minus the
    flushes alone (the flush is do_bench's, so the weights come from HBM as in an eager do_bench)."""
    from tmps.kernels_bridge import device_ms

    return device_ms(fn, reps=20, rounds=7, flush_bytes=256 << 20)


def ceilings(torch, triton):
    """(fp16 matmul TFLOP/s, copy GB/s) of this GPU."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    ms = triton.testing.do_bench(lambda: a @ b, return_mode="median")
    tflops = 2 * 8192**3 / (ms * 1e-3) / 1e12
    del a, b
    src = torch.empty(1 << 29, device="cuda", dtype=torch.float16)  # 1 GiB
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    gbps = 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9
    del src, dst
    torch.cuda.empty_cache()
    return tflops, gbps


def fmt(value, spec=".3f"):
    return "n/a" if value is None else format(value, spec)


HEADER = ("| hidden | layout | r | tokens | " + " | ".join(f"{p} ms" for p in PROVIDERS)
          + " | triton TFLOP/s | triton GB/s | % roofline | vs dense | vs factored | vs compile | config |")
MAX_REL_ERR = 1e-2  # fp16 kernel vs fp16 chain, max |diff| / max |chain|: measured ~5e-4 at model sizes


def rel_err_vs_chain(case, fp):
    """Max over groups of max|triton - chain| / max|chain|: the timed kernel computes the right thing."""
    args = (case["x"], case["in_factor"], case["cores"], case["out_factors"], case["biases"])
    ys, refs = fp.fused_factored_projection(*args), fp.fused_factored_projection_ref(*args)
    return max(((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item() for y, ref in zip(ys, refs))


def row(hidden, layout, r, tokens, ms, tflops, gbps, roof, config):
    speed = [None if ms.get(p) is None or ms.get("triton") is None else ms[p] / ms["triton"]
             for p in ("torch_dense", "torch_factored", "torch_compile")]
    cells = [str(hidden), layout, str(r), str(tokens)] + [fmt(ms.get(p), ".4f") for p in PROVIDERS]
    cells += [fmt(tflops, ".2f"), fmt(gbps, ".0f"), fmt(roof, ".1f")]
    cells += [fmt(v, ".2f") + ("x" if v else "") for v in speed]
    cells.append(config)
    return "| " + " | ".join(cells) + " |"


def config_str(cfg):
    if cfg is None:
        return "n/a"
    return (f"m{cfg.block_m} t{cfg.block_t} cs{cfg.col_splits} k{cfg.block_k} r{cfg.block_r} "
            f"w{cfg.num_warps} st{cfg.num_stages}" + (" z-pass" if cfg.z_pass else ""))


def record(hidden, layout, ratio, r, tokens, ms, tflops, gbps, roof, config, graph=None) -> dict:
    """One measured case as the JSON twin of the tables stores it (benchmarks/targets.py reads it).

    graph: None or (ms, tflops, gbps, roof) of the CUDA-graph timing, stored as ``ms_graph`` etc."""
    out = dict(hidden=hidden, layout=layout, ratio=ratio, r=r, tokens=tokens, ms=ms, triton_tflops=tflops,
               triton_gbps=gbps, roofline_pct=roof, config=config)
    if graph is not None:
        out.update(ms_graph=graph[0], triton_tflops_graph=graph[1], triton_gbps_graph=graph[2],
                   roofline_pct_graph=graph[3])
    return out


def triton_rates(ms, flops, nbytes, peak_tflops, peak_gbps):
    """(TFLOP/s, GB/s, % of roofline) of the Triton provider's time in ``ms`` (Nones without it)."""
    t = ms.get("triton")
    if t is None:
        return None, None, None
    roof_ms = max(flops / (peak_tflops * 1e12), nbytes / (peak_gbps * 1e9)) * 1e3
    return flops / (t * 1e-3) / 1e12, nbytes / (t * 1e-3) / 1e9, 100 * roof_ms / t


def run_cuda(args, progress=None):
    """(markdown lines, JSON data) of the sweep; ``progress(lines, data)``, if given, gets the tables
    as they stand after every row (so a run cut short keeps what it measured)."""
    import torch
    import triton
    import triton.testing

    from tmps.kernels import fused_projection as fp

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    wanted = [p for p in args.providers if not (args.no_compile and p == "torch_compile")]
    compiled_chain = torch.compile(fp.fused_factored_projection_ref) if "torch_compile" in wanted else None
    device_name = torch.cuda.get_device_name()
    peak_tflops, peak_gbps = ceilings(torch, triton)
    lines = [
        f"# Fused factored QKV projection on {device_name}",
        "",
        f"torch {torch.__version__}, triton {triton.__version__}, fp16, times in ms (do_bench median). "
        f"Ceilings measured in this run: fp16 8192^3 matmul {peak_tflops:.1f} TFLOP/s, 1 GiB copy "
        f"{peak_gbps:.0f} GB/s. r = ratio * hidden, s = head_dim = {HEAD_DIM}, 3 groups of hidden/64 heads.",
    ]
    records, mismatches, done = [], [], []  # done: the finished regimes' table lines
    regimes = (("Decode", [t for t in args.tokens if t <= DECODE_MAX_TOKENS]),
               ("Prefill", [t for t in args.tokens if t > DECODE_MAX_TOKENS]))
    rule = "|" + "---|" * (HEADER.count("|") - 1)

    def tables(regime, eager_rows, graph_rows):
        out = ["", f"## {regime} ({device_name}): do_bench, host launch included", "", HEADER, rule] + eager_rows
        if graph_rows:
            out += ["", f"## {regime} ({device_name}): CUDA graph replay, device time", "", HEADER, rule]
            out += graph_rows
        return out

    def result(partial_tables=()):
        body = lines + done + list(partial_tables)
        body += ["", f"Every row's kernel output was checked against the unfused chain's (fp16): "
                 f"{len(mismatches)} of {len(records)} beyond max|diff|/max|chain| = {MAX_REL_ERR:g}."]
        body += [f"- MISMATCH {m}" for m in mismatches]
        if partial_tables:
            body += ["", "Partial: the run stopped before its last row."]
        meta = dict(device=device_name, torch=torch.__version__, triton=triton.__version__, dtype="float16",
                    peak_tflops=peak_tflops, peak_gbps=peak_gbps, mismatches=list(mismatches), providers=wanted)
        return body, dict(meta=meta, rows=list(records))

    for regime, tokens_list in regimes:
        if not tokens_list:
            continue
        eager_rows, graph_rows = [], []
        for hidden in args.hidden:
            for layout in args.layouts:
                for ratio in args.ratios:
                    for tokens in tokens_list:
                        case = make_case(hidden, tokens, ratio, layout, torch.float16, DEVICE, torch)
                        ms, ms_graph = {}, {}
                        for name, fn in providers(case, compiled_chain, torch, fp).items():
                            if name not in wanted:
                                continue
                            try:
                                fn()  # compile / autotune outside the timing
                                torch.cuda.synchronize()
                                ms[name] = triton.testing.do_bench(fn, return_mode="median")
                                if not args.no_graph:
                                    try:
                                        ms_graph[name] = graph_ms(fn)
                                    except RuntimeError as exc:  # e.g. a compiled chain that does not capture
                                        ms_graph[name] = None
                                        print(f"  {name}: no CUDA-graph timing: {exc}"[:300], flush=True)
                            except torch.cuda.OutOfMemoryError:
                                ms.setdefault(name, None)
                                ms_graph[name] = None
                                torch.cuda.empty_cache()
                        flops, nbytes = work(case, 2)
                        rates = triton_rates(ms, flops, nbytes, peak_tflops, peak_gbps)
                        _, r, groups = fp._validate(case["x"], case["in_factor"], case["cores"],
                                                    case["out_factors"], case["biases"])
                        cfg = config_str(fp._TUNED.get(fp._tune_key(case["x"].device, torch.float16, tokens, hidden,
                                                                    r, groups, case["in_factor"] is None)))
                        err = rel_err_vs_chain(case, fp) if "triton" in wanted else None
                        if err is not None and not err <= MAX_REL_ERR:
                            mismatches.append(f"hidden {hidden} {layout} r {r} tokens {tokens}: {err:.2e}")
                            cfg += f" MISMATCH {err:.1e}"
                        line = row(hidden, layout, case["r"], tokens, ms, *rates, cfg)
                        eager_rows.append(line)
                        print(line, flush=True)
                        graph = None
                        if ms_graph:
                            graph = (ms_graph,) + triton_rates(ms_graph, flops, nbytes, peak_tflops, peak_gbps)
                            graph_rows.append(row(hidden, layout, case["r"], tokens, *graph, cfg))
                            print(graph_rows[-1] + " (CUDA graph)", flush=True)
                        records.append(record(hidden, layout, ratio, case["r"], tokens, ms, *rates, cfg, graph=graph))
                        records[-1]["rel_err_vs_chain"] = err
                        del case
                        if progress is not None:
                            progress(*result(tables(regime, eager_rows, graph_rows)))
        done.extend(tables(regime, eager_rows, graph_rows))
    return result()


def run_smoke(args):
    os.environ["TRITON_INTERPRET"] = "1"  # before Triton and the kernels are imported
    import torch

    from tmps.kernels import fused_projection as fp

    if not fp._interpreted():
        raise SystemExit("--smoke: the kernel module was imported before TRITON_INTERPRET=1 could take effect")
    table, rows, notes = [], [], []
    for layout in LAYOUTS:
        case = make_case(128, 3, 0.25, layout, torch.float32, "cpu", torch)
        args_ = (case["x"], case["in_factor"], case["cores"], case["out_factors"], case["biases"])
        got = fp.fused_factored_projection(*args_)
        want = fp.fused_factored_projection_ref(*args_)
        for g, (y, ref) in enumerate(zip(got, want)):
            err = (y - ref).abs().max().item() / ref.abs().max().item()
            if not err < 1e-4:
                raise SystemExit(f"--smoke: {layout} group {g} differs from the reference by {err:.3g} (relative to max)")
        ms = {}
        for name, fn in providers(case, None, torch, fp).items():
            fn()
            start = time.perf_counter()
            fn()
            ms[name] = (time.perf_counter() - start) * 1e3
        flops, nbytes = work(case, 4)
        config = config_str(fp._pick_config(case["x"], case["in_factor"], None, None, None, None, None, None))
        table.append(row(128, layout, case["r"], 3, ms, None, None, None, config))
        rows.append(record(128, layout, 0.25, case["r"], 3, ms, None, None, None, config))
        notes.append(f"{layout}: flops {flops}, fewest bytes {nbytes}")
    lines = [
        "# Fused factored QKV projection: smoke run (CPU, Triton interpreter, fp32)",
        "",
        "Wall-clock of one call, not a benchmark: only proves the script and kernel run. torch_compile skipped.",
        "",
        HEADER,
        "|" + "---|" * (HEADER.count("|") - 1),
        *table,
        "",
        "; ".join(notes) + f"; triton matches the reference in all {len(LAYOUTS)} layouts.",
    ]
    print("\n".join(lines))
    meta = dict(device="cpu (smoke: Triton interpreter, wall clock of one call)", torch=torch.__version__,
                dtype="float32", peak_tflops=None, peak_gbps=None)
    return lines, dict(meta=meta, rows=rows)


def merge_runs(old: dict, new: dict) -> dict:
    """``new``'s rows folded into ``old`` (returned): a case both measured keeps old's timings and gains
    (or replaces) those new measured; a case only new measured is appended.  Cases match on
    (hidden, layout, ratio, tokens); meta records which providers each merged run timed."""
    def key(row):
        return row["hidden"], row["layout"], row["ratio"], row["tokens"]

    rows = {key(row): row for row in old.setdefault("rows", [])}
    for row in new.get("rows", []):
        mine = rows.get(key(row))
        if mine is None:
            old["rows"].append(row)
            rows[key(row)] = row
            continue
        for field in ("ms", "ms_graph"):
            measured = {p: v for p, v in row.get(field, {}).items() if v is not None}
            if measured:
                mine.setdefault(field, {}).update(measured)
    meta, new_meta = old.setdefault("meta", {}), new.get("meta", {})
    meta["merged_providers"] = meta.get("merged_providers", []) + [new_meta.get("providers")]
    meta["mismatches"] = meta.get("mismatches", []) + new_meta.get("mismatches", [])
    return old


def writer(args):
    """``save(lines, data)`` writing ``--out`` and its JSON twin (None without ``--out``).  With
    ``--merge`` the earlier run is read once, here, and every save folds into a fresh copy of it."""
    if not args.out:
        return None
    json_path = os.path.splitext(args.out)[0] + ".json"
    earlier = None
    if args.merge and os.path.exists(json_path):
        with open(json_path) as f:
            earlier = json.load(f)
        with open(args.out) as f:
            earlier_lines = f.read().rstrip("\n").split("\n")

    def save(lines, data):
        if earlier is not None:
            data = merge_runs(copy.deepcopy(earlier), data)
            lines = earlier_lines + ["", f"## Merged run: {', '.join(args.providers)}"] + lines[1:]
        write_lines(args.out, lines)
        with open(json_path, "w") as f:
            json.dump(data, f, indent=1)
        return data

    return save


def main(argv=None):
    args = parse_args(argv)
    save = writer(args)
    if args.smoke:
        lines, data = run_smoke(args)
    elif cuda_missing("kernel_microbench"):
        return 2
    else:
        lines, data = run_cuda(args, progress=save)
    if save is not None:
        save(lines, data)
        print(f"wrote {args.out} and its .json twin" + (" (merged)" if args.merge else ""))
    if data["meta"].get("mismatches"):  # this run's (a merged file also lists the earlier run's)
        print("kernel_microbench: the kernel disagreed with the chain:", *data["meta"]["mismatches"], sep="\n  ",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
