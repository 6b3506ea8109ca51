"""End-to-end timing of tmps-compressed OPT-shaped models against dense (random weights, timing only).

    python benchmarks/e2e.py --out results/e2e.md [--shapes opt-1.3b opt-6.7b]   # CUDA
    python benchmarks/e2e.py --smoke                                              # CPU, tiny OPT, seconds

Models are built from ``OPTConfig`` with the shapes of OPT-1.3B (hidden 2048, 24 layers, 32 heads,
ffn 8192) and OPT-6.7B (4096, 32, 32, 16384), vocabulary 50272, random weights, fp16 on the GPU,
sdpa attention. Timings only depend on shapes, so no checkpoint is needed; quality numbers live in
``benchmarks/quality.py``. Each variant is built from scratch with the same seed:

* ``dense``: the model as built;
* ``kv``: ``tmps.compress(model, calib, mode="kv", ratio=0.5)``: the cache holds K/V latents;
* ``weights``: ``mode="weights", ratio=0.5``: factored Q/K/V, ``backend="auto"``: per token bucket
  the fused Triton kernel or the torch chain, whichever timed faster (the notes say which);
* ``weights-torch``: the same compressed model with ``FactoredProjection.backend = "torch"``;
* ``weights-triton``: the same with ``backend = "triton"``: the fused kernel at every size, whatever
  ``auto`` chose (auto picks per token bucket, eagerly and, inside CUDA-graph capture, by device time);
* ``kv-triton``: the kv model with ``backend = "triton"``: the Q/K/V kernel at every size and, at
  decode, the fused latent decode kernels (``tmps.kernels.latent_decode``), whatever ``auto`` chose;
* ``kv-rebuild``: the kv model with ``kv_attention = "rebuild"``: decode rebuilds full keys and
  values from the latents at every step instead of attending over the latents (what kv mode did
  before the latent path); its prefill is the kv variant's (prefill rebuilds in both), not re-timed;
* opt-in, ``--variants``: ``dense-compile``, ``weights-compile``, ``kv-compile`` (``torch.compile``
  of the model, ``--compile-backend``, inductor by default: the compressed ones hand their torch
  chain to the compiler) and ``weights-compile-triton``, ``kv-compile-triton`` (compiled with the
  Triton kernels as custom ops in the graph). Each new shape compiles in the untimed first call of
  its measurement (inductor takes minutes at these sizes, so they are not in the default run).

Calibration is ``--calib`` random token ids. ``--factors auto`` calibrates under a time limit
(``--calib-timeout``) and otherwise falls back to random factors of the ranks a uniform allocation
of the same ratio gives (identical modules and shapes, so the same timings up to the per-layer rank
spread); ``--factors random`` skips calibration, ``calibrated`` insists on it. Which one each
variant got is in the table.

Measured, per variant:

* prefill latency (ms) of one forward of ``(batch x seq)`` tokens, ``use_cache=False``,
  ``logits_to_keep=1``: median of ``triton.testing.do_bench``; timed again after the variant's
  decode cells, into the notes (first >> again points at set-up or run order, not the path);
* decode tokens/s at batch 1 and 16: prefill ``--context`` tokens into a ``DynamicCache``, two
  warm-up steps, then ``--steps`` greedy single-token steps timed with CUDA events;
  tokens/s = batch x steps / seconds; all of it twice, the second pass reported (the notes give
  both: a first pass over new cache lengths may pay per-shape costs the second does not);
* the same with CUDA graphs: a ``StaticCache``, one decode step (mask, positions, forward, argmax,
  position counter: all on the device) captured in a ``torch.cuda.CUDAGraph`` and replayed. kv mode
  keeps latents of a width no static cache layout of HF expects: "n/a (dynamic cache)" unless
  ``--kv-graphs``. The greedy tokens of the replays are compared with the eager decode's.

Bounds (per case, from shapes and ``tmps.summary(model.tmps_info)``; fp16 = 2 bytes):

* decode bound = dense bytes per step / compressed bytes per step, bytes = every weight read once
  (embeddings as the LM head; learned positions not counted) + the KV cache read at ``--context``
  (kv mode: the latents, ``kv_cache_kept`` of the dense cache);
* prefill bound = dense FLOPs / compressed FLOPs: Q/K/V projections (``qkv_flops_per_token``),
  out_proj, MLP, causal attention ``2·T²·heads·head_dim`` per sequence and layer, the LM head on one
  token per sequence; kv mode adds the rebuild of keys and values from the latents
  (``2·T·(r_k + r_v)·d_kv`` per sequence and layer).

The measured speedup is dense time / variant time (decode: variant tokens/s / dense tokens/s, graphs
against graphs) and "% of bound" = speedup / bound. Every cell is measured in its own try/except: a
failure writes "failed: <reason>" and the run goes on (the exit status is 1 when a cell failed). The
markdown (and a .json twin) is rewritten after every cell, and on SIGTERM (``timeout``'s signal), so
a run killed by a time limit leaves what it measured. ``--budget-s`` counts from the process's
start, imports included, as the ``timeout`` around it does.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import signal
import statistics
import sys
import time
import traceback

_PROCESS_T0 = time.perf_counter()  # --budget-s counts from here: torch's import and CUDA's start count too

SHAPES = {
    "opt-1.3b": dict(hidden=2048, layers=24, heads=32, ffn=8192),
    "opt-6.7b": dict(hidden=4096, layers=32, heads=32, ffn=16384),
}
SMOKE_SHAPE = {"tiny": dict(hidden=64, layers=2, heads=4, ffn=256)}
VOCAB = 50272
MAX_POSITIONS = 2048
# The products (kv, weights: what benchmarks/targets.py judges) before the diagnostics, kv-rebuild
# (slow: it rebuilds the whole cache every step) last, so that a time budget cuts diagnostics first.
VARIANTS = ("dense", "kv", "kv-triton", "weights", "weights-triton", "weights-torch", "kv-rebuild")
# variant -> (compression mode, FactoredProjection.backend, kv_attention, torch.compile); a variant
# that differs from the previous one only in the switches reuses its model.
VARIANT_SETTINGS = {
    "dense": ("dense", "auto", "auto", False),
    "kv": ("kv", "auto", "auto", False),
    "kv-triton": ("kv", "triton", "auto", False),
    "kv-rebuild": ("kv", "auto", "rebuild", False),
    "weights": ("weights", "auto", "auto", False),
    "weights-triton": ("weights", "triton", "auto", False),
    "weights-torch": ("weights", "torch", "auto", False),
    # compiled: "auto" hands the torch chain to the compiler, "triton" keeps the kernels as custom ops
    "dense-compile": ("dense", "auto", "auto", True),
    "weights-compile": ("weights", "auto", "auto", True),
    "weights-compile-triton": ("weights", "triton", "auto", True),
    "kv-compile": ("kv", "auto", "auto", True),
    "kv-compile-triton": ("kv", "triton", "auto", True),
}
# Opt-in (--variants): torch.compile of the model, the brief's "dense with torch.compile" peer and the
# compressed models beside it. Inductor compiles each new shape, which costs minutes at these sizes.
COMPILE_VARIANTS = tuple(v for v, (_, _, _, compiled) in VARIANT_SETTINGS.items() if compiled)
# the kernels forced: compiled for the GPU, no CPU run outside Triton's interpreter
GPU_ONLY_VARIANTS = tuple(v for v, (_, backend, _, _) in VARIANT_SETTINGS.items() if backend == "triton")
RATIO = 0.5
WARM_STEPS = 2
MIN_CELL_S = 8.0  # a cell is skipped when less than this is left of --budget-s
# CUDA errors after which the context is unusable: every later cell would fail the same way
STICKY_CUDA_ERRORS = ("illegal memory access", "unspecified launch failure", "device-side assert",
                      "misaligned address")


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------


def _pair(text: str) -> tuple[int, int]:
    try:
        a, b = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BATCHxSEQ such as 8x512, got {text!r}") from None
    if a < 1 or b < 1:
        raise argparse.ArgumentTypeError(f"batch and seq must be positive, got {text!r}")
    return a, b


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="write the markdown table here (and the raw numbers next to it as .json)")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--variants", nargs="+", default=None, choices=VARIANTS + COMPILE_VARIANTS,
                   help="default: all but the *-compile ones (--smoke: also without kv-triton and "
                        "weights-triton, which need a GPU)")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend of the *-compile variants (default inductor; --smoke: aot_eager)")
    p.add_argument("--prefill", nargs="+", type=_pair, default=[(1, 2048), (8, 512)], metavar="BxT")
    p.add_argument("--decode-batch", nargs="+", type=int, default=[1, 16])
    p.add_argument("--context", type=int, default=1024, help="decode context (prefilled tokens)")
    p.add_argument("--steps", type=int, default=32, help="timed decode steps")
    p.add_argument("--calib", type=_pair, default=(8, 256), metavar="NxT", help="random calibration token ids")
    p.add_argument("--factors", choices=("auto", "calibrated", "random"), default="auto",
                   help="auto: calibrate, and fall back to random factors past --calib-timeout or on failure")
    p.add_argument("--calib-timeout", type=float, default=120.0, help="seconds per tmps.compress call (auto)")
    p.add_argument("--budget-s", type=float, default=None, help="stop measuring (skip cells) after this many seconds")
    p.add_argument("--no-graphs", action="store_true", help="skip the CUDA graph decode")
    p.add_argument("--kv-graphs", action="store_true", help="also try CUDA graphs (static cache) in kv mode")
    p.add_argument("--align-ranks", type=int, default=8, metavar="N",
                   help="random factors: ranks rounded down to a multiple of N, as tmps.compress's default "
                        "rank_multiple=8 does (16-byte rows in fp16); 1 keeps the raw uniform ranks (717 / 1331)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny OPT (hidden 64, 2 layers), tiny shapes: proves the code")
    args = p.parse_args(argv)
    if args.variants is None:
        args.variants = [v for v in VARIANTS if not (args.smoke and v in GPU_ONLY_VARIANTS)]
    if args.compile_backend is None:
        args.compile_backend = "aot_eager" if args.smoke else "inductor"
    if args.smoke:
        args.shapes = list(SMOKE_SHAPE)
        args.prefill = [(1, 32), (2, 16)]
        args.decode_batch = [1, 2]
        args.context, args.steps, args.calib = 16, 4, (2, 16)
    for name in ("context", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be positive")
    if any(b < 1 for b in args.decode_batch):
        p.error("--decode-batch values must be positive")
    # the graph cells' static cache: the warm-up, one untimed replay and the timed steps (decode_static)
    longest = max([t for _, t in args.prefill] + [static_cache_length(args.context, WARM_STEPS + 1 + args.steps)])
    limit = 128 if args.smoke else MAX_POSITIONS
    if longest > limit:
        p.error(f"sequences up to {longest} tokens exceed OPT's {limit} learned positions")
    return args


# --------------------------------------------------------------------------------------------
# Models and variants
# --------------------------------------------------------------------------------------------


def opt_config(shape: dict, smoke: bool):
    from transformers import OPTConfig

    return OPTConfig(vocab_size=512 if smoke else VOCAB, hidden_size=shape["hidden"], ffn_dim=shape["ffn"],
                     num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                     max_position_embeddings=128 if smoke else MAX_POSITIONS, word_embed_proj_dim=shape["hidden"],
                     attn_implementation="sdpa")


def build_model(cfg, dtype, device, seed: int):
    """A random-weight ``OPTForCausalLM``, created directly on ``device`` in ``dtype``."""
    import torch
    from transformers import OPTForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = OPTForCausalLM._from_config(cfg, dtype=dtype)
    return model.eval()


class CalibrationTimeout(Exception):
    pass


def _alarm(seconds: float):
    """Raise CalibrationTimeout in the main thread after ``seconds`` (None or <= 0: no limit)."""
    if not seconds or seconds <= 0 or not hasattr(signal, "SIGALRM"):
        return lambda: None

    def handler(signum, frame):
        raise CalibrationTimeout(f"tmps.compress took longer than {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)

    def cancel():
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)

    return cancel


def uniform_kv_ranks(kv_width: int, ratio: float, k_share: float = 0.35, align: int = 8) -> tuple[int, int]:
    """``(r_k, r_v)`` of ``allocation="uniform"`` in kv mode: ``ratio`` of the K and V widths together,
    ``1 - k_share`` of it to V (at most its width), each rounded down to a multiple of ``align``
    (``tmps.compress``'s ``rank_multiple``). OPT-1.3B at 0.5: 717 / 1331 raw, 712 / 1328 aligned."""
    from tmps.solvers import aligned_rank

    budget = ratio * 2 * kv_width
    r_v = max(1, min(kv_width, round((1 - k_share) * budget)))
    r_k = max(1, min(kv_width, round(budget) - r_v))
    return aligned_rank(r_k, align, kv_width), aligned_rank(r_v, align, kv_width)


def random_factors(model, mode: str, ratio: float, k_share: float = 0.35, align: int = 8) -> None:
    """Replace every attention in place by compressed attention with random factors of uniform ranks.

    The ranks are those of ``allocation="uniform"`` at ``ratio``: kv mode keeps ``ratio`` of the K/V
    width per layer, V gets ``1 - k_share`` of it (at most its full width); weights mode gets the input
    rank ``r = ratio · d · out / (d + out)`` with ``out`` the stacked Q/K/V width. The modules, their
    shapes and code path are those of ``tmps.compress``; only the numbers differ (timing only).
    ``align`` rounds every rank down to a multiple of it, as ``tmps.compress``'s ``rank_multiple``
    does (default 8 both): uniform ranks at OPT-1.3B's shape are 717 / 1331 (kv), rows of 1434 /
    2662 bytes that are not 16-byte aligned, which cuBLAS's fastest fp16 kernels (and Hopper's TMA)
    need; aligned they are 712 / 1328. ``--align-ranks 1`` measures the unaligned ranks.
    """
    import torch

    from tmps.compressor import assemble_attention, layer_info
    from tmps.solvers import aligned_rank
    from tmps.models.base import architecture_of
    from tmps.projection import FactoredProjection

    arch = architecture_of(model)
    layers = arch.decoder_layers(model)
    rotary = arch.rotary_embedding(model)
    dtype = next(model.parameters()).dtype
    info = []
    for index in range(len(layers)):
        dense = arch.attention_of(layers[index])
        shape = arch.shape(dense)
        q, k, v, _ = arch.projections(dense)
        dev, d = q.weight.device, shape.hidden_size

        def rand(*size):
            return torch.randn(*size, device=dev, dtype=dtype) * size[-1] ** -0.5

        if mode == "kv":
            r_k, r_v = uniform_kv_ranks(shape.kv_width, ratio, k_share, align)
            q_core = q.weight.detach().reshape(shape.num_heads, shape.head_dim, d)
            cores = [q_core, rand(1, r_k, d), rand(1, r_v, d)]
            biases = ([q.bias.detach(), 0.02 * rand(r_k), 0.02 * rand(r_v)] if q.bias is not None else [None] * 3)
            qkv = FactoredProjection(None, cores, [None] * 3, biases)
            k_up, v_up = rand(shape.kv_width, r_k), rand(shape.kv_width, r_v)
            plan = {"k": [r_k], "v": [r_v]}
        elif mode == "weights":
            out = shape.q_width + 2 * shape.kv_width
            r = aligned_rank(math.floor(ratio * d * out / (d + out)), align, d)
            cores = [rand(shape.num_heads, shape.head_dim, r), rand(shape.num_kv_heads, shape.head_dim, r),
                     rand(shape.num_kv_heads, shape.head_dim, r)]
            biases = [p.bias.detach() if p.bias is not None else None for p in (q, k, v)]
            qkv = FactoredProjection(rand(d, r), cores, [None] * 3, biases)
            k_up = v_up = None
            plan = {"r_in": r}
        else:
            raise ValueError(f"mode={mode!r}: use 'kv' or 'weights'")
        compressed = assemble_attention(arch, dense, mode, qkv, k_up, v_up, rotary, dtype)
        arch.set_attention(layers, index, compressed)
        info.append(layer_info(compressed, shape, float("nan"), plan))
    model.tmps_info = {"config": {"mode": mode, "method": "random", "ratio": ratio, "k_share": k_share},
                       "layers": info}


def make_variant(cfg, mode: str, args, dtype, device, calib_history: dict, time_left: float = math.inf):
    """Build a fresh model and compress it; returns (model, note) where note says how.

    ``calib_history[mode]`` is ``(hidden, layers, seconds)`` of the last calibration that finished,
    or the reason one failed. With ``--factors auto`` a larger shape skips calibrating (random
    factors) when a smaller one failed, or when its time scaled by ``layers · hidden³`` exceeds
    ``--calib-timeout``. ``time_left``: seconds left of ``--budget-s``; ``--factors auto``'s
    calibration stops in time to leave the variant ``2 * MIN_CELL_S`` of it for its cells.
    """
    import torch

    import tmps

    t0 = time.perf_counter()
    model = build_model(cfg, dtype, device, args.seed)
    note = {"build_s": round(time.perf_counter() - t0, 2)}
    if mode == "dense":
        return model, note
    factors = args.factors
    past = calib_history.get(mode)
    if factors == "auto" and isinstance(past, str):
        note["why"] = f"calibration already failed on a smaller shape ({past})"
        factors = "random"
    elif factors == "auto" and past is not None and args.calib_timeout:
        # eigendecompositions of (d x d) matrices per layer dominate: time ~ layers * d^3
        hidden, layers, seconds = past
        predicted = seconds * (cfg.num_hidden_layers / layers) * (cfg.hidden_size / hidden) ** 3
        if predicted > args.calib_timeout:
            note["why"] = (f"calibration predicted to take {predicted:.0f} s > --calib-timeout "
                           f"(scaled from {seconds:.0f} s at hidden {hidden}, {layers} layers)")
            factors = "random"
    limit = min(args.calib_timeout or math.inf, time_left - 2 * MIN_CELL_S)  # the variant's cells need time too
    if factors == "auto" and limit <= 0:
        note["why"] = "no time left of --budget-s to calibrate"
        factors = "random"
    if factors in ("auto", "calibrated"):
        gen = torch.Generator(device="cpu").manual_seed(args.seed)
        n, t = args.calib
        calib = torch.randint(4, cfg.vocab_size, (n, t), generator=gen).to(device)
        t0 = time.perf_counter()
        cancel = _alarm(limit if factors == "auto" and math.isfinite(limit) else None)
        try:
            tmps.compress(model, calib, mode=mode, ratio=RATIO, progress=False)
            seconds = time.perf_counter() - t0
            calib_history[mode] = (cfg.hidden_size, cfg.num_hidden_layers, seconds)
            note.update(factors="calibrated", compress_s=round(seconds, 1))
            return model, note
        except Exception as exc:  # noqa: BLE001: any failure falls back (auto) or is reported (calibrated)
            reason = f"{type(exc).__name__}: {exc}"[:160]
            if factors == "calibrated":
                raise
            calib_history[mode] = reason
            note["why"] = f"calibration stopped after {time.perf_counter() - t0:.0f} s ({reason})"
        finally:
            cancel()
        model = None
        gc.collect()
        _empty_cache(device)
        model = build_model(cfg, dtype, device, args.seed)
    t0 = time.perf_counter()
    random_factors(model, mode, RATIO, align=args.align_ranks)
    note.update(factors="random", compress_s=round(time.perf_counter() - t0, 1))
    note["align_ranks"] = args.align_ranks
    return model, note


def auto_choices(before=()) -> str:
    """What ``backend="auto"`` picked (kernel or torch chain) since the keys ``before`` were timed: the
    projection per token bucket, kv mode's latent decode (fused kernels or the torch chain) per batch
    and cache-length bucket."""
    from tmps import kernels_bridge

    projection: dict = {}
    decode: dict = {}
    for key, choice in kernels_bridge._FASTER.items():
        if key in before:
            continue
        said = f"{choice.eager} eager, {choice.graphed} in CUDA graphs"
        if key[0] == "latent_decode":  # (tag, device, dtype, b, heads, q_len, head_dim, r_k, r_v, T bucket, ...)
            decode.setdefault((key[3], key[9]), set()).add(said)
        else:  # (device, dtype, token bucket, ...)
            projection.setdefault(key[2], set()).add(said)
    if not projection and not decode:
        return "nothing timed (no CUDA: the torch chain)"
    parts = [f"projection <= {bucket} rows: {' / '.join(sorted(c))}" for bucket, c in sorted(projection.items())]
    parts += [f"latent decode b={b}, T <= {t}: {' / '.join(sorted(c))}" for (b, t), c in sorted(decode.items())]
    return "; ".join(parts)


def _empty_cache(device):
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------


def _sync(device):
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def bench_ms(fn, device) -> float:
    """Median milliseconds of ``fn()``: ``triton.testing.do_bench`` on CUDA, wall-clock on CPU."""
    import torch

    if torch.device(device).type == "cuda":
        try:
            import triton.testing

            return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
        except ImportError:
            times = []
            for _ in range(10):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            return statistics.median(times)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


class _Clock:
    """Elapsed seconds between start() and stop(): CUDA events on the GPU, perf_counter on the CPU."""

    def __init__(self, device):
        import torch

        self.cuda = torch.device(device).type == "cuda"
        if self.cuda:
            self.events = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def start(self):
        _sync("cuda" if self.cuda else "cpu")
        if self.cuda:
            self.events[0].record()
        else:
            self.t0 = time.perf_counter()

    def stop(self) -> float:
        if self.cuda:
            self.events[1].record()
            self.events[1].synchronize()
            return self.events[0].elapsed_time(self.events[1]) / 1e3
        return time.perf_counter() - self.t0


def _ids(batch, seq, vocab, device, seed):
    import torch

    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randint(4, vocab, (batch, seq), generator=gen).to(device)


def prefill_ms(model, batch, seq, device, seed) -> float:
    import torch

    ids = _ids(batch, seq, model.config.vocab_size, device, seed)
    with torch.no_grad():
        def fn():
            return model(input_ids=ids, use_cache=False, logits_to_keep=1)

        fn()  # Triton autotuning and allocator warm-up stay out of the timing
        _sync(device)
        return bench_ms(fn, device)


def dynamic_decoder(model, batch, context, device, seed):
    """Prefill ``context`` random tokens into a ``DynamicCache`` and return ``(step, cache)``:
    ``step()`` decodes one greedy token eagerly and returns it, (batch, 1)."""
    import torch
    from transformers import DynamicCache

    from tmps.compat import cache_keyword

    ids = _ids(batch, context, model.config.vocab_size, device, seed)
    cache = DynamicCache()
    kw = cache_keyword(model)
    with torch.no_grad():
        out = model(input_ids=ids, **{kw: cache}, use_cache=True, logits_to_keep=1)
    state = {"next": out.logits[:, -1:].argmax(-1)}
    del out

    @torch.no_grad()
    def step():
        logits = model(input_ids=state["next"], **{kw: cache}, use_cache=True, logits_to_keep=1).logits
        state["next"] = logits[:, -1:].argmax(-1)
        return state["next"]

    return step, cache


def decode_dynamic(model, batch, context, steps, device, seed):
    """(tokens/s, greedy tokens (batch, WARM_STEPS + steps)) with a DynamicCache and eager steps."""
    import torch

    step, cache = dynamic_decoder(model, batch, context, device, seed)
    tokens = [step() for _ in range(WARM_STEPS)]
    clock = _Clock(device)
    clock.start()
    tokens += [step() for _ in range(steps)]
    seconds = clock.stop()
    del cache
    return batch * steps / seconds, torch.cat(tokens, dim=1).cpu()


def static_cache_length(context: int, total: int) -> int:
    """Slots of the ``StaticCache`` for ``context`` tokens and ``total`` decode steps: one more, rounded
    up to 16 (mask rows 16-element aligned for sdpa's kernels)."""
    return -(-(context + total + 1) // 16) * 16


def static_decoder(model, batch, context, total, device, seed):
    """Prefill ``context`` random tokens into a ``StaticCache`` and return ``(step, tokens, cache)``:
    ``step()`` decodes one greedy token with everything on the device (mask, positions, argmax, the
    position counter), so it can be captured in a CUDA graph; ``tokens`` (batch, total) collects the
    greedy tokens of the first ``total`` steps."""
    import torch
    from transformers import StaticCache

    from tmps.compat import cache_keyword

    dtype = next(model.parameters()).dtype
    length = static_cache_length(context, total)
    neg = torch.finfo(dtype).min
    ids = _ids(batch, context, model.config.vocab_size, device, seed)
    cache = StaticCache(config=model.config, max_cache_len=length)
    kw = cache_keyword(model)
    kpos = torch.arange(length, device=device)
    qpos = torch.arange(context, device=device)
    prefill_mask = torch.zeros(context, length, device=device, dtype=dtype)
    prefill_mask.masked_fill_(kpos[None, :] > qpos[:, None], neg)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=prefill_mask[None, None].expand(batch, 1, context, length),
                    position_ids=qpos[None].expand(batch, context), **{kw: cache}, use_cache=True,
                    logits_to_keep=1)
    nxt = out.logits[:, -1:].argmax(-1)  # (batch, 1): the step's static input and output
    del out, prefill_mask
    counter = torch.full((), context, dtype=torch.long, device=device)  # position of nxt
    tokens = torch.zeros(batch, total, dtype=torch.long, device=device)
    zeros = torch.zeros(length, device=device, dtype=dtype)

    @torch.no_grad()
    def step():
        mask = zeros.masked_fill(kpos > counter, neg).view(1, 1, 1, length).expand(batch, 1, 1, length)
        logits = model(input_ids=nxt, attention_mask=mask, position_ids=counter.view(1, 1).expand(batch, 1),
                       **{kw: cache}, use_cache=True, logits_to_keep=1).logits
        nxt.copy_(logits[:, -1:].argmax(-1))
        tokens.index_copy_(1, (counter - context).clamp(max=total - 1).view(1), nxt)
        counter.add_(1)

    return step, tokens, cache


def decode_static(model, batch, context, steps, device, seed, graph: bool):
    """(tokens/s, greedy tokens (batch, WARM_STEPS + steps)) with a StaticCache; the decode step is
    captured in a CUDA graph when ``graph`` (else run eagerly: the CPU smoke test checks this path's
    tokens). The graph's first replay (which uploads it) is not timed.

    The capture is ``tmps.kernels._common.capture_graph``'s: after a failed one (on torch 2.11 a
    later capture could abort the process, see there) no graph cell is tried again."""
    from tmps.kernels._common import capture_graph, graph_capture_failed

    untimed = 1 if graph else 0
    step, tokens, cache = static_decoder(model, batch, context, WARM_STEPS + untimed + steps, device, seed)
    if graph:
        failed = graph_capture_failed()
        if failed:
            raise RuntimeError(f"not captured: a CUDA-graph capture failed earlier ({failed})")
        for _ in range(WARM_STEPS - 1):  # eager: tunes Triton, fills the allocator, advances the cache
            step()
        cuda_graph = capture_graph(step, reps=1)  # the last warm-up step (side stream), then the capture
        cuda_graph.replay()
        run = cuda_graph.replay
    else:
        for _ in range(WARM_STEPS):
            step()
        run = step
    clock = _Clock(device)
    clock.start()
    for _ in range(steps):
        run()
    seconds = clock.stop()
    result = batch * steps / seconds, tokens[:, :WARM_STEPS + steps].cpu()
    if graph:
        del cuda_graph
    del cache
    return result


def agreement(a, b) -> str:
    """How many leading greedy steps two decodes share (all rows)."""
    if a is None or b is None or a.shape != b.shape:
        return "n/a"
    same = (a == b).all(dim=0).tolist()
    first = same.index(False) if False in same else len(same)
    return f"{first}/{len(same)}"


# --------------------------------------------------------------------------------------------
# Bounds
# --------------------------------------------------------------------------------------------


def cost_model(cfg, info):
    """Per-model quantities the bounds need; ``info`` is ``model.tmps_info`` or None for dense."""
    import tmps

    d, layers, ffn, vocab = cfg.hidden_size, cfg.num_hidden_layers, cfg.ffn_dim, cfg.vocab_size
    heads = cfg.num_attention_heads
    head_dim = d // heads
    kv_width = getattr(cfg, "num_key_value_heads", None) or heads
    kv_width *= head_dim
    dense_qkv_params = (d + 2 * kv_width) * (d + 1)  # OPT: biases on every projection
    per_layer = dense_qkv_params + d * (d + 1) + ffn * (d + 1) + d * (ffn + 1) + 4 * d  # + two layer norms
    weights = layers * per_layer + vocab * d + 2 * d  # embeddings read as the LM head, final layer norm
    m = dict(d=d, layers=layers, ffn=ffn, vocab=vocab, attn_width=heads * head_dim, kv_width=kv_width,
             weights_dense=weights, weights=weights, kv_kept=1.0,
             qkv_flops_dense=layers * 2 * (d + 2 * kv_width) * d, qkv_flops=None, rebuild_width=0)
    m["qkv_flops"] = m["qkv_flops_dense"]
    if info is not None:
        s = tmps.summary(info)
        m["weights"] = weights - s["dense_qkv_parameters"] + s["qkv_parameters"]
        m["kv_kept"] = s["kv_cache_kept"]
        m["qkv_flops"] = sum(layer["qkv_flops_per_token"] for layer in info["layers"])
        m["qkv_flops_dense"] = sum(layer["dense_qkv_flops_per_token"] for layer in info["layers"])
        m["summary"] = s
        if info["config"]["mode"] == "kv":  # keys and values are rebuilt from the latents
            m["rebuild_width"] = sum(layer["ranks"]["k"] + layer["ranks"]["v"] for layer in info["layers"])
    return m


def prefill_flops(m, batch, seq, dense: bool) -> float:
    tokens = batch * seq
    per_token = (m["qkv_flops_dense"] if dense else m["qkv_flops"]) + m["layers"] * (2 * m["d"] ** 2 + 4 * m["d"] * m["ffn"])
    attention = m["layers"] * batch * 2 * seq * seq * m["attn_width"]  # causal QKᵀ and PV
    rebuild = 0 if dense else 2 * tokens * m["rebuild_width"] * m["kv_width"]
    return tokens * per_token + attention + rebuild + 2 * batch * m["d"] * m["vocab"]


def decode_bytes(m, batch, context, dense: bool) -> float:
    kv = m["layers"] * 2 * context * m["kv_width"] * batch * (1.0 if dense else m["kv_kept"])
    return 2.0 * ((m["weights_dense"] if dense else m["weights"]) + kv)


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def _cell(value, spec):
    if value is None:
        return ""
    return format(value, spec) if isinstance(value, (int, float)) else str(value).replace("|", "/")


def case_names(args):
    cases = [(f"prefill {b}x{t} ms", "prefill", f"{b}x{t}") for b, t in args.prefill]
    cases += [(f"decode b={b} tok/s", "decode", str(b)) for b in args.decode_batch]
    if not args.no_graphs:
        cases += [(f"decode b={b} tok/s, CUDA graph", "graph", str(b)) for b in args.decode_batch]
    return cases


def render(args, env, results) -> list[str]:
    cases = case_names(args)
    graph_name = "static cache, eager (CPU)" if args.smoke else "CUDA graph"
    title = "tiny OPT on CPU (smoke run, not a benchmark)" if args.smoke else "OPT-shaped models"
    lines = [
        f"# End-to-end timing, {title}: random weights, timing only",
        "",
        f"{env['device']}; torch {env['torch']}, triton {env['triton']}, transformers {env['transformers']}, "
        f"tmps {env['tmps']}; {env['dtype']}, sdpa attention; ratio {RATIO}. Prefill: one forward, "
        f"use_cache=False, logits_to_keep=1, {'median of 3 wall-clock runs' if args.smoke else 'median of do_bench'}. Decode: {args.context} tokens of context, "
        f"{WARM_STEPS} warm-up + {args.steps} timed greedy steps (tokens/s = batch x steps / s); "
        f"graphs: StaticCache, one step captured and replayed ({graph_name}).",
        "",
        "## Measured",
        "",
        "| model | variant | factors | QKV params kept | KV kept | QKV FLOPs kept | "
        + " | ".join(name.replace("CUDA graph", graph_name) for name, _, _ in cases) + " |",
        "|" + "---|" * (6 + len(cases)),
    ]
    for r in results:
        s = r.get("summary") or {}
        cells = [r["shape"], r["variant"], r.get("factors", ""),
                 _cell(s.get("qkv_parameters_kept"), ".3f"), _cell(s.get("kv_cache_kept"), ".3f"),
                 _cell(s.get("qkv_flops_kept"), ".3f")]
        for _, kind, key in cases:
            value = r["cells"].get(kind, {}).get(key)
            cells.append(_cell(value, ".2f" if kind == "prefill" else ".1f"))
        lines.append("| " + " | ".join(cells) + " |")

    lines += ["", "## Against dense: measured speedup, bound, % of bound", "",
              "| model | variant | case | dense | variant | speedup | bound | % of bound |",
              "|---|---|---|---|---|---|---|---|"]
    dense = {r["shape"]: r for r in results if r["variant"] == "dense"}
    for r in results:
        if r["variant"] == "dense" or r["shape"] not in dense:
            continue
        for name, kind, key in cases:
            d_val = dense[r["shape"]]["cells"].get(kind, {}).get(key)
            v_val = r["cells"].get(kind, {}).get(key)
            if kind not in r["cells"]:  # not measured for this variant (kv-rebuild's prefill)
                continue
            bound = r.get("bounds", {}).get(kind, {}).get(key)
            speed = pct = None
            if isinstance(d_val, (int, float)) and isinstance(v_val, (int, float)) and v_val > 0:
                speed = d_val / v_val if kind == "prefill" else v_val / d_val
                pct = 100 * speed / bound if bound else None
            spec = ".2f" if kind == "prefill" else ".1f"
            lines.append("| " + " | ".join([
                r["shape"], r["variant"], name.replace("CUDA graph", graph_name), _cell(d_val, spec), _cell(v_val, spec),
                _cell(speed, ".2f") + ("x" if speed is not None else ""), _cell(bound, ".2f") + ("x" if bound else ""),
                _cell(pct, ".0f") + ("%" if pct is not None else "")]) + " |")

    notes = [f"- {r['shape']} {r['variant']}: {n}" for r in results for n in r.get("notes", [])]
    lines += ["", "Bounds: decode = dense bytes / compressed bytes per step (all weights once, LM head included, "
              f"+ KV cache at context {args.context}, fp16); prefill = dense FLOPs / compressed FLOPs (projections, "
              "out_proj, MLP, causal attention, LM head on one token; kv mode adds rebuilding K and V from the "
              "latents). kv mode's decode attends over the latents directly (the bound's traffic); kv-rebuild's "
              "decode also rebuilds the full keys and values of the whole context at every step (k = c_k U_kᵀ), "
              "work the bound does not count.",
              "", "Notes:", ""] + (notes or ["- none"])
    return lines


def write(args, env, results, started):
    lines = render(args, env, results)
    lines += ["", f"Wall time {time.perf_counter() - started:.0f} s; {env['host']}."]
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out + ".tmp", "w") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(args.out + ".tmp", args.out)
        base = os.path.splitext(args.out)[0]
        with open(base + ".json.tmp", "w") as f:
            json.dump({"env": env, "args": {k: v for k, v in vars(args).items()}, "results": results}, f,
                      indent=1, default=str)
        os.replace(base + ".json.tmp", base + ".json")
    return lines


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def environment(device, dtype):
    import torch
    import transformers

    import tmps

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    name = torch.cuda.get_device_name() if torch.device(device).type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return dict(device=name, torch=torch.__version__, triton=triton_version, transformers=transformers.__version__,
                tmps=tmps.__version__, dtype=str(dtype).replace("torch.", ""), host=platform.node())


def run(args) -> list[dict]:
    import torch

    import tmps

    started = _PROCESS_T0
    deadline = None if args.budget_s is None else started + args.budget_s
    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else torch.float16
    env = environment(device, dtype)
    print(f"e2e: {env['device']}, torch {env['torch']}, triton {env['triton']}, transformers {env['transformers']}",
          flush=True)
    shapes = SMOKE_SHAPE if args.smoke else SHAPES
    results, calib_history = [], {}

    def left():
        return float("inf") if deadline is None else deadline - time.perf_counter()

    def save():
        write(args, env, results, started)

    # timeout(1) stops a run with SIGTERM, which would kill Python at once: make it an exit, so the
    # finally below writes what was measured (the cell in progress is lost; the finished ones are not)
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        _run_shapes(args, env, shapes, results, calib_history, left, save, device, dtype)
    finally:
        signal.signal(signal.SIGTERM, previous)
        lines = write(args, env, results, started)
    print("\n".join(lines), flush=True)
    if args.out:
        print(f"wrote {args.out}")
    return results


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def _run_shapes(args, env, shapes, results, calib_history, left, save, device, dtype):
    """Build, set up and measure every (shape, variant), appending a record per variant to ``results``
    and saving after every cell."""
    import torch

    import tmps

    for shape_name in args.shapes:
        cfg = opt_config(shapes[shape_name], args.smoke)
        dense_cost = cost_model(cfg, None)
        model, model_mode, model_note = None, None, {}
        for variant in args.variants:
            mode, backend, kv_attention, compiled = VARIANT_SETTINGS[variant]
            record = {"shape": shape_name, "variant": variant, "cells": {}, "bounds": {}, "notes": []}
            results.append(record)
            if left() < MIN_CELL_S * 2:
                record["factors"] = "skipped: time budget"
                save()
                continue
            try:
                if mode != "dense" and model is not None and model_mode == mode:
                    note = {"factors": model_note.get("factors", ""), "reused": f"the {mode} variant's model"}
                else:
                    model = None
                    gc.collect()
                    _empty_cache(device)
                    model, note = make_variant(cfg, mode, args, dtype, device, calib_history, left())
                    model_mode, model_note = mode, note
                if mode != "dense":
                    tmps.set_paths(model, backend=backend, kv_attention=kv_attention)
            except Exception as exc:  # noqa: BLE001
                record["factors"] = f"failed: {type(exc).__name__}: {exc}"[:200]
                traceback.print_exc()
                model = None
                save()
                continue
            record["factors"] = note.get("factors", "dense" if mode == "dense" else "")
            record["notes"] += [f"{k} = {v}" for k, v in note.items() if k != "factors"]
            info = getattr(model, "tmps_info", None)
            cost = cost_model(cfg, info)
            if info is not None:
                record["summary"] = {k: float(v) for k, v in cost["summary"].items()}
            print(f"e2e: {shape_name} {variant} ({record['factors']}) {note}", flush=True)
            from tmps import kernels_bridge

            timed_before = set(kernels_bridge._FASTER)
            timed = model
            if compiled:  # each new shape compiles in the untimed first call of its measurement
                torch._dynamo.reset()
                # prefill shapes, batches, both caches: more recompiles than dynamo's default limit of
                # 8 allows, past which it would fall back to eager without saying so in the table
                limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
                setattr(torch._dynamo.config, limit, max(64, getattr(torch._dynamo.config, limit)))
                timed = torch.compile(model, backend=args.compile_backend)
                record["notes"].append(f"torch.compile(backend={args.compile_backend!r})")
            measure_variant(timed, mode, args, device, record, dense_cost, cost, left,
                            prefill=variant != "kv-rebuild", save=save)
            retime_prefill(timed, args, device, record, left)
            timed = None
            if compiled:  # dynamo's caches hold the compiled graphs, and with them the model's tensors
                torch._dynamo.reset()
            if mode != "dense" and backend == "auto":
                record["notes"].append(f"backend auto chose: {auto_choices(timed_before)}")
            save()
        model = None
        gc.collect()
        _empty_cache(device)


def _attempt(record, kind, key, left, fn, save=None):
    """Run one measurement; its value, or a 'failed: ...' / 'skipped: ...' string, goes into the record,
    which ``save()`` (if given) then writes out."""
    try:
        return _measure(record, kind, key, left, fn)
    finally:
        if save is not None:
            save()


def _measure(record, kind, key, left, fn, cells=None):
    """``_attempt``'s body; ``cells``: where the value or its reason goes (default the record's ``kind`` cells)."""
    import torch

    cells = record["cells"].setdefault(kind, {}) if cells is None else cells
    if left() < MIN_CELL_S:
        cells[key] = "skipped: time budget"
        return None
    try:
        value = fn()
    except torch.cuda.OutOfMemoryError:
        cells[key] = "failed: out of memory"
        gc.collect()
        torch.cuda.empty_cache()
        return None
    except Exception as exc:  # noqa: BLE001: one broken cell must not stop the run
        cells[key] = f"failed: {type(exc).__name__}: {exc}".splitlines()[0][:160]
        print(f"e2e: {record['shape']} {record['variant']} {kind} {key}:", flush=True)
        traceback.print_exc()
        if any(text in str(exc) for text in STICKY_CUDA_ERRORS):
            raise RuntimeError(f"e2e stopped: {kind} {key} of {record['variant']} left the CUDA context unusable "
                               f"({exc})".splitlines()[0]) from exc
        return None
    cells[key] = value
    print(f"e2e: {record['shape']} {record['variant']} {kind} {key}: {value:.3f}", flush=True)
    return value


def measure_variant(model, mode, args, device, record, dense_cost, cost, left, prefill=True, save=None):
    for b, t in args.prefill if prefill else ():
        key = f"{b}x{t}"
        record["bounds"].setdefault("prefill", {})[key] = (prefill_flops(dense_cost, b, t, True)
                                                           / prefill_flops(cost, b, t, mode == "dense"))
        _attempt(record, "prefill", key, left, lambda: prefill_ms(model, b, t, device, args.seed), save)
    eager_tokens = {}
    for b in args.decode_batch:
        bound = decode_bytes(dense_cost, b, args.context, True) / decode_bytes(cost, b, args.context, mode == "dense")
        record["bounds"].setdefault("decode", {})[str(b)] = bound
        record["bounds"].setdefault("graph", {})[str(b)] = bound

        def eager(b=b):
            # Two passes over the same positions, the second reported: in run 2 dense, timed first,
            # decoded eagerly at 18 tok/s and the compressed variants after it at 54-66, a gap no
            # byte count explains. A per-shape cost that only the first pass over these cache
            # lengths pays (a library's plan cache, say) would show as first pass << second here.
            first, _ = decode_dynamic(model, b, args.context, args.steps, device, args.seed)
            tps, tokens = decode_dynamic(model, b, args.context, args.steps, device, args.seed)
            record["notes"].append(f"b={b}: eager decode {first:.1f} tok/s on a first pass over these cache "
                                   f"lengths, {tps:.1f} on the second (reported)")
            eager_tokens[b] = tokens
            return tps

        _attempt(record, "decode", str(b), left, eager, save)
    if args.no_graphs:
        return
    for b in args.decode_batch:
        cells = record["cells"].setdefault("graph", {})
        if mode == "kv" and not args.kv_graphs:
            cells[str(b)] = "n/a (dynamic cache)"
            continue

        def static(b=b):
            tps, tokens = decode_static(model, b, args.context, args.steps, device, args.seed, graph=not args.smoke)
            same = agreement(tokens, eager_tokens.get(b))
            record["notes"].append(f"b={b}: static-cache greedy tokens equal the eager decode's for {same} steps")
            if args.smoke and same != f"{tokens.shape[1]}/{tokens.shape[1]}":
                raise RuntimeError(f"static-cache decode diverged from the eager decode ({same} steps agree)")
            return tps

        _attempt(record, "graph", str(b), left, static, save)
        _empty_cache(device)


def retime_prefill(model, args, device, record, left):
    """Time the variant's prefill cells once more, after its decode cells, into ``record["again"]``
    (for targets.py) and a note; the table keeps the first timing.

    In H200 run 2 ``weights`` (auto, which chose the torch chain at 2048 rows) took 18.69 ms at 1x2048
    and ``weights-torch``, the same path on the same model timed two variants later, 11.80 ms. A second
    timing of every variant tells a cost of the variant's own set-up or of the run's order (first
    >> again) from one of the path it runs (first ~ again).
    """
    first = {k: v for k, v in record["cells"].get("prefill", {}).items() if isinstance(v, float)}
    if not first:
        return
    again = record.setdefault("again", {}).setdefault("prefill", {})
    for b, t in args.prefill:
        key = f"{b}x{t}"
        if key in first:
            _measure(record, "prefill again", key, left, lambda: prefill_ms(model, b, t, device, args.seed), again)
    record["notes"].append("prefill timed again after the decode cells: " + ", ".join(
        f"{key} {ms:.2f} ms (first {first[key]:.2f})" if isinstance(ms, float) else f"{key} {ms}"
        for key, ms in again.items()))


def main(argv=None):
    args = parse_args(argv)
    if not args.smoke:
        import torch

        if not torch.cuda.is_available():
            print("e2e: no CUDA device; this benchmark times fp16 models on a GPU "
                  "(run with --smoke for a CPU check of the script)", file=sys.stderr)
            return 2
    results = run(args)
    failed = [f"{r['shape']} {r['variant']} {kind} {key}: {value}" for r in results
              for kind, cells in r["cells"].items() for key, value in cells.items()
              if isinstance(value, str) and value.startswith("failed")]
    failed += [f"{r['shape']} {r['variant']}: {r['factors']}" for r in results if r["factors"].startswith("failed")]
    if failed:  # the table has them too; a failed cell is a failed run (gpu_check's step says so)
        print("e2e: failed cells:\n  " + "\n  ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
