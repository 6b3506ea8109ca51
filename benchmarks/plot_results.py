"""Plots of a GPU run's speed results: the kernel microbenchmark and the end-to-end table as pictures.

    python benchmarks/plot_results.py --kernels results/kernels.json --e2e results/e2e.json --out-dir results

Reads the JSON twins that ``kernel_microbench.py --out`` and ``e2e.py --out`` write (either may be
left out) and writes, beside them or in ``--out-dir``:

* ``kernels.png``: one panel per (layout, hidden size); x the token count (log scale), y our kernel's
  speed-up over each baseline, ``t_baseline / t_ours`` (dense cuBLAS QKV, the unfused torch chain,
  ``torch.compile`` of it), one line per baseline and rank ratio. Device time (CUDA-graph replay,
  ``ms_graph``) where the run measured it, else do_bench's host-timed median (``--timing`` chooses).
  Points above the line y = 1 are cases where ours is faster.
* ``e2e.png``: per model and compressed variant, the speed-up over dense of every case (prefill
  latency, eager decode, decode under CUDA graphs) as bars, with the bound that the saved bytes or
  flops allow drawn as a tick on each bar.

Needs matplotlib (``pip install matplotlib``; the demo extra has it). Exit status 2 when neither
file is given or a file holds no rows.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from targets import e2e_speedups, kernel_speedup  # benchmarks/ is sys.path[0] when run as a script

BASELINES = {"torch_dense": "dense cuBLAS", "torch_factored": "torch chain", "torch_compile": "torch.compile chain"}
E2E_KINDS = {"prefill": "prefill", "decode": "decode", "graph": "decode, CUDA graph"}


def kernel_series(data: dict, timing: str = "auto") -> dict:
    """``{(layout, hidden): {(baseline, ratio): [(tokens, speed-up), ...] sorted by tokens}}``.

    ``timing``: ``"graph"`` (``ms_graph``), ``"eager"`` (``ms``) or ``"auto"`` (``ms_graph`` where a
    row has it). A baseline a row did not time (or timed as failed) is left out of that row."""
    series: dict = {}
    for row in data.get("rows", []):
        graph = row.get("ms_graph") or {}
        ms = graph if timing == "graph" or (timing == "auto" and graph.get("triton")) else row.get("ms", {})
        if not ms.get("triton"):
            continue
        panel = series.setdefault((row["layout"], row["hidden"]), {})
        for baseline in BASELINES:
            speedup = kernel_speedup(ms, baseline)
            if speedup is not None:
                panel.setdefault((baseline, row["ratio"]), []).append((row["tokens"], speedup))
    for panel in series.values():
        for points in panel.values():
            points.sort()
    return series


def e2e_bars(data: dict) -> dict:
    """``{(shape, variant): [(case label, speed-up over dense, bound or None), ...]}`` for kv and weights,
    the speed-ups that benchmarks/targets.py checks (:func:`targets.e2e_speedups`)."""
    bars: dict = {}
    for shape, variant, kind, case, speedup, bound in e2e_speedups(data):
        label = E2E_KINDS.get(kind, kind)
        name = f"{label} {case}" if kind == "prefill" else f"{label} b={case}"
        bars.setdefault((shape, variant), []).append((name, speedup, bound))
    return bars


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        sys.exit("plot_results: needs matplotlib: pip install matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_kernels(series: dict, path: Path, title: str) -> None:
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter

    layouts = sorted({layout for layout, _ in series})
    hiddens = sorted({hidden for _, hidden in series})
    fig, axes = plt.subplots(len(layouts), len(hiddens), figsize=(max(4.2 * len(hiddens), 8.0), 3.4 * len(layouts)),
                             squeeze=False, sharey=True)
    colors = dict(zip(BASELINES, ("tab:red", "tab:blue", "tab:green")))
    ratios = sorted({ratio for panel in series.values() for _, ratio in panel})
    styles = dict(zip(ratios, ("-", "--", ":", "-.")))
    for i, layout in enumerate(layouts):
        for j, hidden in enumerate(hiddens):
            ax = axes[i][j]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log", base=2)
            ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}x"))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
            ax.axhline(1.0, color="black", linewidth=0.8)
            for (baseline, ratio), points in sorted(series.get((layout, hidden), {}).items()):
                tokens, speedups = zip(*points)
                ax.plot(tokens, speedups, styles.get(ratio, "-"), marker="o", markersize=3, color=colors[baseline],
                        label=f"vs {BASELINES[baseline]}, ratio {ratio}")
            ax.set_title(f"{layout}, hidden {hidden}", fontsize=9)
            if i == len(layouts) - 1:
                ax.set_xlabel("tokens")
            if j == 0:
                ax.set_ylabel("speed-up of ours (x)")
            ax.grid(True, which="both", linewidth=0.3)
    handles = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=3, fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.04 + 0.025 * math.ceil(len(handles) / 3), 1, 0.93))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_e2e(bars: dict, path: Path, title: str) -> None:
    plt = _pyplot()
    groups = sorted(bars)
    fig, axes = plt.subplots(1, len(groups), figsize=(4.6 * len(groups), 3.8), squeeze=False, sharey=True)
    for ax, group in zip(axes[0], groups):
        cases = bars[group]
        xs = range(len(cases))
        speedups = [speedup for _, speedup, _ in cases]
        ax.bar(xs, speedups, color=["tab:green" if s >= 1 else "tab:red" for s in speedups])
        for x, (_, _, bound) in zip(xs, cases):
            if bound:
                ax.hlines(bound, x - 0.4, x + 0.4, color="black", linewidth=2)
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_xticks(list(xs), [name for name, _, _ in cases], rotation=35, ha="right", fontsize=8)
        ax.set_title(f"{group[0]}, {group[1]} mode", fontsize=9)
        ax.grid(True, axis="y", linewidth=0.3)
    axes[0][0].set_ylabel("speed-up over dense (x); tick: bound")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kernels", type=Path, help="kernel_microbench.py's JSON")
    p.add_argument("--e2e", type=Path, help="e2e.py's JSON")
    p.add_argument("--out-dir", type=Path, help="where the PNGs go (default: beside each JSON)")
    p.add_argument("--timing", choices=("auto", "graph", "eager"), default="auto",
                   help="kernel times: CUDA-graph device time where measured (auto), only that, or do_bench's")
    args = p.parse_args(argv)
    if not args.kernels and not args.e2e:
        print("plot_results: give --kernels and/or --e2e", file=sys.stderr)
        return 2
    if args.kernels:
        data = json.loads(args.kernels.read_text())
        series = kernel_series(data, args.timing)
        if not series:
            print(f"plot_results: {args.kernels} holds no timed kernel rows", file=sys.stderr)
            return 2
        meta = data.get("meta", {})
        timing = {"auto": "CUDA-graph device time where measured", "graph": "CUDA-graph device time",
                  "eager": "do_bench, host launch included"}[args.timing]
        out = (args.out_dir or args.kernels.parent) / "kernels.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        plot_kernels(series, out, f"Fused Q/K/V projection, {meta.get('device', '?')}, {meta.get('dtype', '?')}\n"
                                  f"speed-up of ours over each baseline ({timing})")
        print(f"wrote {out}")
    if args.e2e:
        data = json.loads(args.e2e.read_text())
        bars = e2e_bars(data)
        if not bars:
            print(f"plot_results: {args.e2e} holds no kv / weights rows beside a dense one", file=sys.stderr)
            return 2
        env = data.get("env", {})
        out = (args.out_dir or args.e2e.parent) / "e2e.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        plot_e2e(bars, out, f"End to end, {env.get('device', '?')}, {env.get('dtype', '?')}, random weights: "
                            "compressed against dense")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
