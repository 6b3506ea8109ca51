"""Where a step's device time goes: the kernels of one decode step (and one prefill) per variant.

    python benchmarks/profile_step.py --out results/profile.md       # CUDA: OPT-1.3B shape, b=16, context 1024
    python benchmarks/profile_step.py --smoke                        # CPU, tiny OPT: proves the script

e2e.py says how fast a variant runs; this says why.  Each variant (``dense``, ``kv``, ``weights``:
the e2e models, random weights and random factors of uniform ranks) decodes with the static-cache step
that e2e.py captures in a CUDA graph, run eagerly here under ``torch.profiler`` for ``--steps``
steps: per kernel, launches and device microseconds per step, summed over its calls.  The sum over
kernels is the device time a CUDA-graph replay of the step needs at least (a replay adds only the
gaps between kernels).  ``--prefill BxT`` adds one forward of that many tokens.  On the CPU
(``--smoke``) the rows are aten operators and their self CPU time.

The static step runs with the paths a CUDA-graph capture of it takes (``backend="auto"``'s
device-time choices, ``tmps.kernels_bridge.graphed_choices``), not the eager winners: on the H200
the two differed at decode sizes.  The summary also gives each step's eager wall time (host and
device together, no profiler), and on CUDA a second table per variant lists the host side: the
operators with the most self CPU time.  The file is rewritten after every variant.
``--cache dynamic`` profiles e2e.py's eager ``DynamicCache`` step instead (on the H200 its dense
decode ran at 18 tokens/s against the compressed variants' 54-66, a gap no byte count explains).
"""
from __future__ import annotations

import argparse
import sys

from _bench_common import cuda_missing, write_lines  # benchmarks/ is sys.path[0] when run as a script

import e2e  # noqa: E402  (the models, factors and static-cache step of the end-to-end benchmark)

VARIANTS = ("dense", "kv", "weights")
NAME_WIDTH = 90


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="also write the markdown here")
    p.add_argument("--shape", default="opt-1.3b", choices=list(e2e.SHAPES))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--steps", type=int, default=4, help="profiled decode steps (after 2 warm-up steps)")
    p.add_argument("--prefill", type=e2e._pair, default=None, metavar="BxT", help="also profile one prefill")
    p.add_argument("--top", type=int, default=12, help="kernels listed per variant")
    p.add_argument("--cache", choices=("static", "dynamic"), default="static",
                   help="static: the step e2e.py captures in a CUDA graph; dynamic: its eager DynamicCache step")
    p.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto",
                   help="FactoredProjection / latent-score path (tmps.set_paths)")
    p.add_argument("--align-ranks", type=int, default=8, metavar="N",
                   help="random factors' ranks rounded down to a multiple of N (e2e.py's option; 1: unaligned)")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny OPT, 2 steps: proves the script")
    args = p.parse_args(argv)
    for name in ("batch", "context", "steps", "top"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be positive")
    return args


def _device_us(event, cuda: bool) -> float:
    """Self time of a key_averages() row in microseconds: device time on CUDA, CPU time otherwise."""
    if not cuda:
        return event.self_cpu_time_total
    for name in ("self_device_time_total", "self_cuda_time_total"):  # renamed in torch 2.4+
        value = getattr(event, name, None)
        if value is not None:
            return value
    return 0.0


def kernel_rows(prof, cuda: bool, repeats: int, host: bool = False) -> list[tuple[str, float, float]]:
    """(name, launches per repeat, microseconds per repeat) of every kernel (CPU: operator), slowest first.

    host: on CUDA, the CPU-side operators and their self CPU time instead of the kernels."""
    import torch

    rows = []
    for event in prof.key_averages():
        on_device = getattr(event, "device_type", None) == torch.autograd.DeviceType.CUDA
        if cuda and on_device == host:
            continue
        us = _device_us(event, cuda and not host)
        if us > 0:
            rows.append((event.key, event.count / repeats, us / repeats))
    return sorted(rows, key=lambda row: -row[2])


def wall_ms(fn, repeats: int, cuda: bool) -> float:
    """Milliseconds per call of ``fn`` run ``repeats`` times eagerly, host and device together (e2e's clock)."""
    clock = e2e._Clock("cuda" if cuda else "cpu")
    clock.start()
    for _ in range(repeats):
        fn()
    return clock.stop() * 1e3 / repeats


def profiled(fn, repeats: int, cuda: bool):
    """Run ``fn`` ``repeats`` times under torch.profiler; the profile."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(repeats):
            fn()
        if cuda:
            torch.cuda.synchronize()
    return prof


def table(title: str, rows, top: int, unit: str) -> list[str]:
    total = sum(us for _, _, us in rows)
    lines = [f"### {title}", "", f"{sum(n for _, n, _ in rows):.0f} launches, {total:,.1f} {unit} in all", "",
             f"| kernel | launches | {unit} | share |", "|---|---|---|---|"]
    for name, count, us in rows[:top]:
        short = name if len(name) <= NAME_WIDTH else name[: NAME_WIDTH - 1] + "…"
        lines.append(f"| `{short}` | {count:g} | {us:,.1f} | {100 * us / total:.1f} % |")
    if len(rows) > top:
        rest = sum(us for _, _, us in rows[top:])
        lines.append(f"| ({len(rows) - top} more) | | {rest:,.1f} | {100 * rest / total:.1f} % |")
    return lines + [""]


def run(args, progress=None) -> list[str]:
    """The report's lines; ``progress(lines)``, if given, gets them as they stand after every variant."""
    import contextlib

    import torch
    import tmps
    import tmps.kernels_bridge as bridge

    cuda = not args.smoke
    device, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    shape = e2e.SMOKE_SHAPE["tiny"] if args.smoke else e2e.SHAPES[args.shape]
    if args.smoke:
        args.context, args.batch, args.steps = 16, 2, 2
    cfg = e2e.opt_config(shape, args.smoke)
    unit = "device µs per step" if cuda else "CPU µs per step"
    name = "tiny OPT (smoke, CPU)" if args.smoke else f"{args.shape} shape"
    lines = [f"# Where the time goes: {name}, batch {args.batch}, context {args.context}", "",
             f"{torch.cuda.get_device_name() if cuda else 'cpu'}; torch {torch.__version__}; "
             f"{str(dtype)[6:]}; random weights, ratio {e2e.RATIO}"
             f"{f', ranks rounded to multiples of {args.align_ranks}' if args.align_ranks > 1 else ''}; "
             f"backend {args.backend}. "
             + ("Static-cache decode step (the one e2e.py captures in a CUDA graph, on the paths its capture takes)" if args.cache == "static"
                else "DynamicCache decode step (e2e.py's eager decode)")
             + f", run eagerly {args.steps} times under torch.profiler after 2 warm-up steps.", ""]
    summary = ["## Summary", "", f"| variant | launches per step | {unit} | eager wall ms per step |",
               "|---|---|---|---|"]
    sections = []
    for variant in args.variants:
        model = e2e.build_model(cfg, dtype, device, seed=0)
        if variant != "dense":
            e2e.random_factors(model, variant, e2e.RATIO, align=args.align_ranks)
            tmps.set_paths(model, backend=args.backend)
        if args.cache == "static":
            step, _, cache = e2e.static_decoder(model, args.batch, args.context, 2 + 2 * args.steps, device, seed=0)
        else:
            step, cache = e2e.dynamic_decoder(model, args.batch, args.context, device, seed=0)
        # the static step as its CUDA graph would run it: backend="auto"'s device-time choices
        with bridge.graphed_choices() if args.cache == "static" else contextlib.nullcontext():
            for _ in range(2):  # Triton autotuning, backend="auto" timing, allocator warm-up
                step()
            wall = wall_ms(step, args.steps, cuda)
            prof = profiled(step, args.steps, cuda)
        rows = kernel_rows(prof, cuda, args.steps)
        summary.append(f"| {variant} | {sum(n for _, n, _ in rows):.0f} | {sum(us for _, _, us in rows):,.1f} | "
                       f"{wall:.2f} |")
        sections += table(f"{variant}: one decode step", rows, args.top, unit)
        if cuda:
            sections += table(f"{variant}: one decode step, host side", kernel_rows(prof, cuda, args.steps, host=True),
                              args.top, "CPU µs per step")
        del step, cache
        if args.prefill is not None:
            b, t = args.prefill
            ids = e2e._ids(b, t, cfg.vocab_size, device, seed=0)

            @torch.no_grad()
            def prefill():
                model(input_ids=ids, use_cache=False, logits_to_keep=1)

            prefill()
            rows = kernel_rows(profiled(prefill, 1, cuda), cuda, 1)
            sections += table(f"{variant}: prefill {b}x{t}", rows, args.top, unit.replace("per step", "per forward"))
        model = None  # free the variant's weights before the next is built
        if cuda:
            torch.cuda.empty_cache()
        print(summary[-1], flush=True)
        if progress is not None:
            progress(lines + summary + [""] + sections)
    return lines + summary + [""] + sections


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.smoke and cuda_missing("profile_step"):
        return 2
    lines = run(args, progress=(lambda partial: write_lines(args.out, partial)) if args.out else None)
    print("\n".join(lines))
    if args.out:
        write_lines(args.out, lines)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
