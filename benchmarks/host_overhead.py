"""Host time of the kernel paths per call: our Python around each Triton launch, the launch stubbed.

    python benchmarks/host_overhead.py                 # this CPU (Triton's interpreter mode, stubbed)
    python benchmarks/host_overhead.py --json host.json

An eager decode step is host-bound: on the H200 (run 2) the fused projection took 0.10-0.24 ms a
call timed eagerly against ~0.02 ms of device time, so what the launcher does before it launches
decides whether the kernel wins outside CUDA graphs (HF's ``generate`` runs eagerly by default).
Here every Triton kernel of ``tmps.kernels`` is replaced by a no-op that counts its launches, so the
timing holds exactly our side: checks, config lookup, allocations, argument building, and the
modules' glue. Triton's own launch (argument binding, ``cuLaunchKernel``) is not in it: that needs
a GPU.

Two tables:

1. **Calls at real decode shapes** (OPT-1.3B, ratio 0.5, ranks aligned to 8; Llama-3-8B's RoPE
   layout for the key scores): µs per call of the projection kernel's function (a launcher built
   per call; its factor checks kept per shapes), of its custom op ``tmps::fused_projection`` (the
   same, plus torch's op dispatch: what a compiled graph calls), of its :class:`FusedProjection`
   launcher (built once), of the projection module (weights and kv layouts,
   ``backend="triton"``), the latent decode
   kernel and the RoPE key-score kernel, each the best of 7 rounds (on a shared machine other work
   only adds time).
2. **A whole decode step** of the 2-layer random OPT and Llama of ``decode_launches.py`` (one new
   token after a 9-token prefill, dynamic cache): dense and kv mode on the torch path run their ops
   for real at toy sizes (host dispatch plus negligible compute, which is what each op costs an
   eager GPU step too), kv mode with the kernels runs them stubbed. Same machine, same run; the
   variants take turns within each of 7 rounds and each keeps its fastest.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_launches import replaced_kernels, tiny_model  # noqa: E402  (kernel stand-ins, the toy models)


@contextlib.contextmanager
def stubbed_kernels():
    """Every Triton kernel of tmps.kernels becomes a no-op: ``kernel[grid](...)`` only counts.
    Yields the counter (``{"launches": n}``)."""
    counter = {"launches": 0}

    class NoLaunch:
        def __init__(self, kernel):
            pass

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                counter["launches"] += 1
            return launch

    with replaced_kernels(NoLaunch):
        yield counter


def best_us(fn, calls: int, rounds: int = 7) -> float:
    """The fastest of ``rounds`` rounds of mean µs per call over ``calls`` back-to-back calls (after a
    warm-up): the least disturbed round, since on a shared 2-core machine other work only adds time."""
    fn()
    per_round = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        per_round.append((time.perf_counter() - start) / calls * 1e6)
    return min(per_round)


def call_cases(torch):
    """``{name: (fn, launches per call)}`` at real decode shapes (fp16 tensors on the CPU; nothing is computed)."""
    from tmps import kernels_bridge as bridge
    from tmps.kernels.fused_projection import FusedProjection, fused_factored_projection
    from tmps.kernels.latent_decode import latent_decode_attention
    from tmps.kernels.latent_scores import latent_rope_scores
    from tmps.projection import FactoredProjection

    dt = torch.float16
    hidden, heads, head_dim, r_k, r_v, total = 2048, 32, 64, 712, 1328, 1024  # OPT-1.3B, kv 0.5, aligned

    def rand(*shape):
        return torch.randn(*shape, dtype=dt)

    weights = FactoredProjection(rand(hidden, 1024), [rand(heads, 32, 1024) for _ in range(3)],
                                 [rand(head_dim, 32) for _ in range(3)], [rand(hidden) for _ in range(3)])
    kv = FactoredProjection(None, [rand(heads, head_dim, hidden), rand(1, r_k, hidden), rand(1, r_v, hidden)],
                            [None] * 3, [rand(hidden), None, None])
    for module in (weights, kv):
        module.backend = "triton"
    x = rand(1, 1, hidden)
    factors = (weights.in_factor, *map(list, zip(*weights.groups)))
    launcher = FusedProjection(*factors, like=x)
    cases = {
        "fused_factored_projection, weights layout (a launcher per call)":
            (lambda: fused_factored_projection(x, *factors), 1),
        "tmps::fused_projection op, weights layout (a compiled graph's call)":
            (lambda: bridge.fused_projection_op(x, *factors), 1),
        "FusedProjection launcher, weights layout (built once)": (lambda: launcher(x), 1),
        "projection module, weights layout": (lambda: weights(x), 1),
        "projection module, kv layout": (lambda: kv(x), 1),
    }
    for b in (1, 16):
        q_latent, c_k, c_v = rand(b, heads, r_k), rand(b, total, r_k), rand(b, total, r_v)
        v_up = rand(hidden, r_v)
        mask = torch.ones(b, 1, 1, total, dtype=torch.bool)
        cases[f"latent decode, b={b}, no mask"] = (
            lambda q_latent=q_latent, c_k=c_k, c_v=c_v, v_up=v_up: latent_decode_attention(
                q_latent, None, c_k, c_v, v_up, None, 0.125, heads, 1, head_dim), 2)
        cases[f"latent decode, b={b}, bool mask"] = (
            lambda q_latent=q_latent, c_k=c_k, c_v=c_v, v_up=v_up, mask=mask: latent_decode_attention(
                q_latent, None, c_k, c_v, v_up, mask, 0.125, heads, 1, head_dim), 2)
    # Llama-3-8B's decode layout: 32 query heads over 8 key heads of 128, r_k 512
    kv_heads, llama_dim, llama_r = 8, 128, 512
    q = rand(1, kv_heads, 4, llama_dim)
    c_k, k_up = rand(1, total, llama_r), rand(kv_heads * llama_dim, llama_r)
    cos, sin = rand(total, llama_dim), rand(total, llama_dim)
    cases["RoPE key scores, b=1"] = (lambda: latent_rope_scores(q, c_k, k_up, cos, sin), 1)
    return cases


def step_cases(torch):
    """``{(arch, variant, backend): (select, step)}``: one cached decode step of the 2-layer models
    (prefill done once); ``select()`` puts the model on the variant's path before its steps run."""
    from transformers import DynamicCache

    import tmps
    from tmps.compat import cache_keyword

    cases = {}
    for arch in ("opt", "llama"):
        torch.manual_seed(0)
        dense = tiny_model(arch)
        kv = tmps.compress(copy.deepcopy(dense), torch.randint(0, 64, (4, 16)), mode="kv", ratio=0.5, progress=False)
        ids = torch.randint(0, 64, (2, 9))
        for variant, model, backend in (("dense", dense, None), ("kv, torch path", kv, "torch"),
                                        ("kv, kernels (stubbed)", kv, "triton")):
            def select(model=model, backend=backend):
                if backend is not None:
                    tmps.set_paths(model, backend=backend)

            select()
            cache = DynamicCache()
            kw = {cache_keyword(model): cache}
            with torch.no_grad():
                model(ids, **kw, use_cache=True)
            nxt = ids[:, -1:]

            # the new token is cropped off after each step so every call decodes at the same length
            def step(model=model, cache=cache, kw=kw, nxt=nxt):
                model(nxt, **kw, use_cache=True)
                cache.crop(-1)

            step()
            if cache.get_seq_length() != ids.shape[1]:  # crop's meaning changed across transformers 5.x once
                raise RuntimeError(f"the cache holds {cache.get_seq_length()} tokens after a cropped step")
            cases[(arch, variant, backend)] = (select, step)
    return cases


def interleaved_best_us(cases: dict, calls: int, rounds: int = 7) -> dict:
    """``best_us`` of every ``(select, fn)`` case, the cases taking turns within each round, so that
    a slow spell of the machine hits all of them rather than one."""
    best = dict.fromkeys(cases, float("inf"))
    for select, fn in cases.values():
        select()
        fn()
    for _ in range(rounds):
        for key, (select, fn) in cases.items():
            select()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            best[key] = min(best[key], (time.perf_counter() - start) / calls * 1e6)
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=1000, help="calls per timing round (7 rounds, the fastest)")
    p.add_argument("--json", type=Path, help="also write the numbers here")
    args = p.parse_args(argv)
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported: the launchers accept CPU tensors
    import torch

    torch.set_num_threads(1)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    print(f"torch {torch.__version__}; host time per call, {machine}; Triton kernels stubbed (no launch, no compute)")
    results = {"machine": machine, "torch": torch.__version__, "calls": {}, "steps": {}}
    print("\n| call (real decode shapes) | µs per call | stubbed launches |\n|---|---|---|")
    with torch.no_grad(), stubbed_kernels() as counter:  # inference (the factors are trainable parameters)
        for name, (fn, launches) in call_cases(torch).items():
            us = best_us(fn, args.calls)
            before = counter["launches"]
            fn()
            if counter["launches"] - before != launches:
                raise RuntimeError(f"{name}: {counter['launches'] - before} launches, expected {launches}")
            results["calls"][name] = us
            print(f"| {name} | {us:.1f} | {launches} |", flush=True)

    print("\n| model (2 layers, toy sizes) | variant | ms per decode step | Triton launches |\n|---|---|---|---|")
    with torch.no_grad(), stubbed_kernels() as counter:
        cases = step_cases(torch)
        launches = {}
        for (arch, variant, backend), (select, step) in cases.items():
            select()
            before = counter["launches"]
            step()
            launches[arch, variant] = counter["launches"] - before
            if (launches[arch, variant] > 0) != (backend == "triton"):
                raise RuntimeError(f"{arch} {variant}: {launches[arch, variant]} Triton launches")
        best = interleaved_best_us(cases, max(1, args.calls // 10))
        for (arch, variant, _), us in best.items():
            results["steps"][f"{arch}: {variant}"] = us / 1e3
            print(f"| {arch} | {variant} | {us / 1e3:.3f} | {launches[arch, variant]} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
