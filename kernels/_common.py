"""What the Triton kernels share: the optional Triton import, dtypes, the dot helper, padding,
alignment hints, device timing (CUDA graphs) and autotuning (candidates compiled at once).

Each kernel file keeps its own config space, launcher and reference; the launchers start their
kernels through :func:`launch`, which the tuners can turn into compiles.
"""

from __future__ import annotations  # Triton reads the string annotations; lets this import without Triton

import contextvars
import os
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton ships for Linux only; the torch references still work.
    triton = None
    tl = None

# Without Triton the kernels stay plain (never called) functions so the modules still import.
jit = triton.jit if triton is not None else (lambda fn: fn)

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# fp32 dots: "tf32x3" (three TF32 tensor-core products, error near fp32's) rather than "ieee", which
# lowers to FMA loops that spilled and took minutes in ptxas; plain "tf32" would lose 13 mantissa bits.
FP32_DOT_PRECISION = "tf32x3"


@jit
def dot(a, b, acc, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    # acc + a @ b.  DOT_UPCAST: Triton 3.9's interpreter multiplies bf16 operands as their uint16
    # bit patterns, so under the interpreter bf16 operands go through fp32 (exact products, fp32
    # accumulate: what the GPU's bf16 MMA computes).
    if DOT_UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@jit
def aligned(n, ALIGN: tl.constexpr):
    # n itself, stated to be a multiple of ALIGN (its launcher checked): Triton specializes integer
    # arguments on divisibility by 16 only, so a row stride of 8 x odd elements (a rank rounded to a
    # multiple of 8, e.g. kv mode's r_k = 712) left every access to those rows 2 bytes wide, without
    # cp.async (`compile_check.py --no-align-hints`: 48 in the latent decode partials at r_k = 712,
    # 96-480 in the projection at r = 1224; 0 with the hint). (n // ALIGN) * ALIGN is n, and the
    # compiler can see the factor.
    if ALIGN > 1:
        return (n // ALIGN) * ALIGN
    else:
        return n


def alignment(*sizes) -> int:
    """The ``ALIGN`` for :func:`aligned` of row strides ``sizes`` (in elements): 8 where all are
    multiples of 8 and some is not of 16 (Triton already specializes those), else 1.

    The low four bits of the sizes' OR say both at once (launchers ask at every call)."""
    bits = 0
    for n in sizes:
        bits |= n
    return 8 if bits & 15 == 8 else 1


def interpreted() -> bool:
    """Whether the kernels were built by Triton's CPU interpreter (TRITON_INTERPRET=1 when Triton was imported)."""
    return triton is not None and type(dot).__name__ == "InterpretedFunction"


def triton_available(device) -> bool:
    """True when the kernels can run on ``device``: Triton imports and the device is CUDA, or the
    kernels run in Triton's interpreter (``TRITON_INTERPRET=1`` set before import)."""
    return triton is not None and (torch.device(device).type == "cuda" or interpreted())


def check_tile_sizes(config, names) -> None:
    """ValueError unless each named field of a kernel config is a power of two >= 16 (tl.dot's smallest size)."""
    for name in names:
        value = getattr(config, name)
        if value < 16 or value & (value - 1):
            raise ValueError(f"{type(config).__name__}.{name} must be a power of two >= 16, got {value}")


def require_runnable(device, kernel: str, reference: str, argument: str) -> None:
    """RuntimeError without Triton, ValueError off CUDA outside the interpreter, each naming the torch
    reference to use instead; ``argument`` names the tensor whose device was checked."""
    if triton is None:
        raise RuntimeError(f"{kernel} needs Triton; use {reference} instead")
    if torch.device(device).type != "cuda" and not interpreted():
        raise ValueError(f"{argument} is on {device}: the Triton kernel needs a CUDA device, or TRITON_INTERPRET=1 "
                         f"set before Triton is imported; use {reference} on CPU")


def unit_last(t):
    """``t`` itself when its last dim has unit stride (or size 1; None passes), else a contiguous copy."""
    return t if t is None or t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def cdiv(a: int, b: int) -> int:
    """Ceiling division of host integers. (Triton 3.9's ``triton.cdiv`` is a ConstexprFunction: each
    host call unwraps its arguments as constexprs, many times the cost of ``//``; launchers call it
    on every launch.)"""
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def eager_ms(fn) -> float:
    """``do_bench``'s median in ms (5 ms warm-up, 25 ms of repetitions, L2 flushed before each call):
    each call is launched from the host, so its launch time is in the number wherever it exceeds
    the device time (decode sizes)."""
    return triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median")


# Why CUDA-graph timing is off in this process (a capture failed), or None.  A failed capture is not
# retried: torch.cuda.graph's exit skips restoring the caller's stream when capture_end raises, and
# on torch < 2.12 capture_end's error also skips ending the allocator's capture (pytorch#180395), so
# a later empty_cache() -- every capture begins with one -- can abort the process on an assertion.
_graph_timing_off = None


def graph_capture_failed():
    """Why a capture of :func:`capture_graph` failed in this process (device timing is off since), or None."""
    return _graph_timing_off


def capture_graph(body, reps: int):
    """A CUDA graph of ``reps`` calls of ``body`` (recorded, not run), after one eager call on a side
    stream (compiles, cuBLAS workspaces, allocations: an error there is ``body``'s own and
    propagates as it is).  A failed capture raises RuntimeError, with the caller's stream current
    again, and turns graph timing off for the rest of the process (:func:`graph_capture_failed`)."""
    global _graph_timing_off
    caller = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    side.wait_stream(caller)
    with torch.cuda.stream(side):  # warm-up off the capture stream (cuBLAS workspaces, allocator)
        body()
    caller.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for _ in range(reps):
                body()
    except Exception as exc:
        _graph_timing_off = f"{type(exc).__name__}: {exc}"[:300]
        warnings.warn(f"a CUDA-graph capture for timing failed; device timings fall back to eager ones for the "
                      f"rest of this process: {_graph_timing_off}", RuntimeWarning, stacklevel=3)
        raise RuntimeError(f"CUDA-graph capture failed: {_graph_timing_off}") from exc
    finally:
        torch.cuda.set_stream(caller)  # the graph's exit leaves its capture stream current when it raises
    return graph


def device_ms(fn, reps: int = 20, rounds: int = 5, flush_bytes: int = 0) -> float:
    """Device time of one ``fn()`` in ms, host overhead excluded: ``reps`` calls captured in one
    CUDA graph, the median of ``rounds`` replays divided by ``reps``.

    flush_bytes > 0 zeroes a buffer of that size before every call (``do_bench`` flushes L2 with
    256 MiB) and subtracts a graph of the flushes alone, so the operands come from HBM.  ``fn`` must
    be capturable: no host syncs, no CPU tensors read on the device.  Its first call runs eagerly on
    a side stream (compiles, cuBLAS workspaces, allocations), so an error there is ``fn``'s own.
    RuntimeError where the capture fails, and from then on in this process (see :func:`capture_graph`).
    """
    if _graph_timing_off is not None:
        raise RuntimeError(f"CUDA-graph timing is off in this process since a capture failed ({_graph_timing_off})")
    flush = torch.empty(flush_bytes // 4, dtype=torch.int32, device="cuda") if flush_bytes else None

    def replay_ms(graph):
        graph.replay()
        times = []
        for _ in range(rounds):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[len(times) // 2]

    if flush is None:
        return replay_ms(capture_graph(fn, reps)) / reps
    both = replay_ms(capture_graph(lambda: (flush.zero_(), fn()), reps))
    flushes = replay_ms(capture_graph(flush.zero_, reps))
    return max((both - flushes) / reps, 1e-6)


# do_bench's L2 flush: the tuners time weights read from HBM, as a model's step reads them
L2_FLUSH_BYTES = 256 << 20


def decode_bench(fn) -> float:
    """How the tuners time a decode-size candidate: device time (:func:`device_ms`, L2 flushed).

    At these sizes ``do_bench``'s per-call events time mostly the host's launch: on the H200 (run 2)
    the projection took 0.10-0.24 ms a call that way for 0.02 ms on the device, so configs were
    ranked by launch-time noise, and a two-launch (z-pass) config paid for its extra launch. Device
    time is also what a CUDA-graph replay of the step pays. Where no graph can be captured
    (a RuntimeError from the capture) the eager median stands in.
    """
    try:
        return device_ms(fn, flush_bytes=L2_FLUSH_BYTES)
    except RuntimeError:
        return eager_ms(fn)


# Set by precompile(): launch() then compiles its kernel (Triton's warmup) instead of running it.
_compile_only = contextvars.ContextVar("tmps_compile_only", default=False)
# Threads compiling the tuners' candidates at once. Triton holds the GIL for little of a compile
# (its MLIR passes release it, ptxas is a subprocess): `compile_check.py --threads 2` on this
# project's 2-core CPU compiles in about half the serial time.
COMPILE_THREADS = max(1, min(8, os.cpu_count() or 1))


def launch(kernel, grid, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)``, the way every launcher here starts its kernels; within
    :func:`precompile` the kernel is only compiled (``kernel.warmup``), concurrently with others."""
    if _compile_only.get():
        return kernel.warmup(*args, grid=grid, **kwargs)
    return kernel[grid](*args, **kwargs)


def precompile(candidates, run) -> None:
    """Compile the kernels of every ``run(candidate)`` at once, on :data:`COMPILE_THREADS` threads.

    A launch compiles its kernel the first time it meets a new specialization, about a second each
    for these kernels at sm_90, and a tuner tries 5-17 candidates per shape one after another: in a
    model's first decode step (or a GPU check's tuning) that was most of the time. Here each
    candidate's launcher runs with its launches turned into compiles (:func:`launch`) inside
    ``triton.AsyncCompileMode``, which queues them on a thread pool and, at its exit, waits and puts
    each compiled kernel in its JIT cache, where the timed runs then find it. A candidate that
    fails here is left to its timed run, which raises what it raised before (shared memory that does
    not fit is found when a kernel is first loaded, there too). Without ``AsyncCompileMode``
    (Triton < 3.6), or inside one already active, the timed runs compile as they go.
    """
    candidates = list(candidates)
    if len(candidates) < 2 or COMPILE_THREADS < 2 or not hasattr(triton, "AsyncCompileMode"):
        return
    token = _compile_only.set(True)
    try:
        with ThreadPoolExecutor(COMPILE_THREADS, thread_name_prefix="tmps-compile") as pool:
            try:
                mode = triton.AsyncCompileMode(pool, ignore_errors=True)
                mode.__enter__()
            except RuntimeError:  # another AsyncCompileMode is active (the caller's): compile as we go
                return
            try:
                for candidate in candidates:
                    try:
                        run(candidate)
                    except Exception:  # noqa: BLE001 -- its timed run repeats it and raises what it raises
                        pass
            finally:
                mode.__exit__(None, None, None)  # waits for every compile, fills the JIT caches
    finally:
        _compile_only.reset(token)


def autotune(candidates, run, bench):
    """The candidate whose ``run(config)`` ``bench`` times fastest, skipping those that do not fit
    the GPU (the compile raises OutOfResources, e.g. for shared memory); None if none fits. The
    candidates' kernels are compiled first, all at once (:func:`precompile`)."""
    candidates = list(candidates)
    precompile(candidates, run)
    best, best_ms = None, float("inf")
    for candidate in candidates:
        try:
            ms = bench(lambda: run(candidate))
        except triton.runtime.errors.OutOfResources:
            continue
        if ms < best_ms:
            best, best_ms = candidate, ms
    return best
