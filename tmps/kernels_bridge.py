"""The one place the library touches the Triton kernels, so that a machine without triton still imports tmps."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .tuning_cache import TunedChoices


_AVAILABLE: dict = {}  # device type -> whether the kernels run there


def triton_path_available(device: torch.device) -> bool:
    """True when the Triton kernels can run on ``device`` (CUDA with triton, or the interpreter when asked).

    Cached per device type: asked at every projection call, and neither Triton's import nor the
    interpreter flag (read when Triton is imported) changes within a process."""
    kind = torch.device(device).type
    if kind not in _AVAILABLE:
        _AVAILABLE[kind] = _kernels_run_on(kind)
    return _AVAILABLE[kind]


@torch.compiler.assume_constant_result  # traced code asks it too: a constant, not an import to trace
def _kernels_run_on(device_type: str) -> bool:
    try:
        from tmps.kernels.fused_projection import triton_available
    except Exception:  # triton missing or broken: the torch path serves
        return False
    return triton_available(device_type)


def fused_projection_launcher(in_factor, cores, out_factors, biases, like: torch.Tensor):
    """A :class:`tmps.kernels.fused_projection.FusedProjection` over these factors, checked against ``like``."""
    from tmps.kernels.fused_projection import FusedProjection

    return FusedProjection(in_factor, cores, out_factors, biases, like=like)


def run_fused_projection(launcher, x: torch.Tensor) -> list:
    """One fused projection call: ``launcher(x)`` (the per-call entry that counting tests patch)."""
    return launcher(x)


def kernel_preferred_on(device: torch.device) -> bool:
    """Whether ``backend="auto"`` considers the kernel at all: CUDA with Triton (the interpreter is for tests)."""
    return device.type == "cuda" and triton_path_available(device)


def token_bucket(m: int) -> int:
    """The kernel autotuner's bucket for ``m`` rows: decode sizes share one, then powers of two."""
    from tmps.kernels.fused_projection import _m_bucket

    return _m_bucket(m)


@dataclass(frozen=True)
class PathChoice:
    """The faster of ``"triton"`` and ``"torch"`` for one projection shape, timed two ways.

    eager: calls launched one by one from Python (``do_bench``: host launch overhead included).
    graphed: device time alone, what a CUDA-graph replay pays.  On the H200 they disagree at decode
    sizes: the kernel's Python launch path made it lose eagerly (0.10-0.24 ms per call against the
    chain's 0.12 ms) while its device time won (20 us against 38 us).
    """

    eager: str
    graphed: str


_FASTER = TunedChoices("faster_path", PathChoice)  # key -> PathChoice; on disk too where TMPS_TUNING_CACHE asks
_graphed_everywhere = False  # set by graphed_choices()


@contextlib.contextmanager
def graphed_choices():
    """Within it, eager calls take the choices a CUDA-graph capture takes (the device-time winners):
    to run, eagerly and under a profiler, the step a captured graph replays."""
    global _graphed_everywhere
    before, _graphed_everywhere = _graphed_everywhere, True
    try:
        yield
    finally:
        _graphed_everywhere = before


def faster_path(key, run_kernel, run_torch, bench=None, device_bench=None, device=None) -> str:
    """``"triton"`` or ``"torch"``: whichever runs this projection faster, timed once per ``key``.

    ``backend="auto"`` asks this on CUDA so that it is never slower than the unfused torch chain where
    the kernel loses, e.g. where cuBLAS's GEMMs beat the fused tile loop.  Both paths are timed eagerly
    (``bench(fn) -> ms``, default ``triton.testing.do_bench``'s median) and in device time
    (``device_bench``, default :func:`device_ms` with L2 flushed, CUDA graphs); a call made while a CUDA graph is
    being captured (or made within :func:`graphed_choices`) gets the device-time choice, any other call
    the eager one.  Nothing can be timed
    during a capture: an untimed key then takes the kernel, without caching.  ``device``: the CUDA
    device the paths run on (the graphs are captured there; default the current one).
    """
    capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    choice = _FASTER.get(key)
    if choice is not None:
        return choice.graphed if capturing or _graphed_everywhere else choice.eager
    if capturing:
        return "triton"
    bench = bench or _median_ms
    device_bench = device_bench or _flushed_device_ms
    with torch.no_grad():
        run_kernel(), run_torch()  # the kernel's own autotuning happens here, outside the timing
        eager = "triton" if bench(run_kernel) <= bench(run_torch) else "torch"
        try:
            on_gpu = device is not None and torch.device(device).type == "cuda"
            with torch.cuda.device(device) if on_gpu else contextlib.nullcontext():
                graphed = "triton" if device_bench(run_kernel) <= device_bench(run_torch) else "torch"
        except RuntimeError:  # no capture possible here (kernels._common warns once): the eager timing decides both
            graphed = eager
    _FASTER[key] = PathChoice(eager, graphed)
    return graphed if _graphed_everywhere else eager


def _median_ms(fn) -> float:
    from tmps.kernels._common import eager_ms

    return eager_ms(fn)


def _flushed_device_ms(fn) -> float:
    """Device time with L2 flushed before each call, as ``do_bench`` (the eager timing) and the kernels'
    decode tuners flush it: a model's step reads each layer's factors from HBM, while one projection
    timed alone on a hot L2 would be served from it (OPT-1.3B's weights-mode layer at 0.5, ~12 MB,
    fits the H200's 50 MB L2), which favours whichever path issues fewer launches over the one that
    moves fewer bytes."""
    from tmps.kernels._common import L2_FLUSH_BYTES

    return device_ms(fn, flush_bytes=L2_FLUSH_BYTES)


def device_ms(fn, reps: int = 20, rounds: int = 5, flush_bytes: int = 0) -> float:
    """:func:`tmps.kernels._common.device_ms`: device time of one ``fn()`` in ms, CUDA graphs
    (imported when called: tmps imports without Triton)."""
    from tmps.kernels._common import device_ms as measure

    return measure(fn, reps, rounds, flush_bytes)


def kernel_considered(device: torch.device, backend: str) -> bool:
    """Whether a Triton kernel is a candidate under ``backend``: never for "torch", on CUDA with
    Triton for "auto", always for "triton" -- which raises a RuntimeError where Triton cannot run."""
    if backend == "torch":
        return False
    if backend == "auto":
        return kernel_preferred_on(device)  # which implies triton_path_available
    if not triton_path_available(device):
        raise RuntimeError("backend='triton' needs a CUDA device (or TRITON_INTERPRET=1) and triton installed")
    return True


def kernels_serve_gradients(backend: str, *tensors) -> bool:
    """False where a call on ``tensors`` records gradients (grad mode on, one of them requiring grad):
    the Triton kernels have no backward, so their outputs would cut the graph and every gradient
    through Q/K/V (fine-tuning after compression, LoRA on other layers, attributions) would be
    silently lost. Such calls take the torch chain under ``"auto"``; ``"triton"`` raises instead.
    Under ``torch.no_grad()`` / ``inference_mode()`` (``generate``) it costs one ``is_grad_enabled()``."""
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in tensors):
        return True
    if backend == "triton":
        raise RuntimeError("backend='triton': the Triton kernels have no backward pass, and this call records "
                           "gradients; use backend='auto' (the torch chain wherever gradients flow) or 'torch', "
                           "or run under torch.no_grad()")
    return False


def latent_rope_scores_for(device: torch.device, backend: str = "auto", rows: int = 1):
    """The fused RoPE key-score kernel for kv mode's latent attention, or None for the torch chain.

    backend: "auto" (the kernel on CUDA when Triton runs there and the ``rows`` query rows per key
    head fit it), "torch" or "triton" (the kernel, or a RuntimeError saying why it cannot run) -- the
    same switch as ``FactoredProjection.backend``. In traced code, see :func:`_traced`.
    """
    if not kernel_considered(device, backend):
        return None
    from tmps.kernels.latent_scores import MAX_ROWS, latent_rope_scores

    return _traced(latent_rope_scores if backend == "triton" or rows <= MAX_ROWS else None,
                   latent_rope_scores_op, backend)


def latent_decode_for(device: torch.device, backend: str = "auto", rows: int = 1, q_len: int = 1,
                      has_mask: bool = True, need_probs: bool = False):
    """The fused latent decode kernel (softmax, values, U_v) for kv mode, or None for the torch chain.

    It never forms the probabilities, so it serves only where they are not returned (sdpa, not
    eager attention: ``need_probs``), decode row counts (``rows = heads·q_len``), and a missing mask
    only for one new token. backend: "auto" (a candidate on CUDA with Triton; the caller times it
    against the chain), "torch", or "triton" (forced where it can serve; a RuntimeError without
    Triton on the device). In traced code, see :func:`_traced`.
    """
    if not kernel_considered(device, backend):
        return None
    from tmps.kernels.latent_decode import MAX_ROWS, latent_decode_attention

    if need_probs or rows > MAX_ROWS or (not has_mask and q_len != 1):
        return None
    return _traced(latent_decode_attention, latent_decode_op, backend)


def _traced(kernel, op, backend: str):
    """What a ``*_for`` chooser returns: ``kernel`` itself, except while ``torch.compile`` traces:
    then its custom op under ``backend="triton"``, and None (the torch chain, for the compiler to
    fuse) under ``"auto"``, since nothing can be timed while tracing."""
    if kernel is None or not torch.compiler.is_compiling():
        return kernel
    return op if backend == "triton" else None


# --------------------------------------------------------------------------------------------
# torch.compile: the kernels as opaque custom ops
# --------------------------------------------------------------------------------------------
# Dynamo cannot trace the launchers (autotuning, config caches, Triton's interpreter on a CPU), and
# tracing them failed (a compressed model compiled with backend="triton" raised inside Triton's
# interpreter). Registered as custom ops, each kernel is one node of the graph with a shape-only
# fake; its launcher runs when the graph does. Only compiled code calls them: in eager mode a
# custom op's dispatch would add host time to every call (see benchmarks/host_overhead.py).


@torch.library.custom_op("tmps::fused_projection", mutates_args=())
def fused_projection_op(x: torch.Tensor, in_factor: Optional[torch.Tensor], cores: Sequence[torch.Tensor],
                        out_factors: Sequence[Optional[torch.Tensor]],
                        biases: Sequence[Optional[torch.Tensor]]) -> list[torch.Tensor]:
    """:func:`tmps.kernels.fused_projection.fused_factored_projection` as one graph node.

    An op has nowhere to keep a launcher, so it builds one per call; the factor checks it would
    repeat are kept per shapes, dtypes and devices (``fused_projection._signature``)."""
    launcher = fused_projection_launcher(in_factor, list(cores), list(out_factors), list(biases), like=x)
    return run_fused_projection(launcher, x)


@fused_projection_op.register_fake
def _(x, in_factor, cores, out_factors, biases):
    lead = tuple(x.shape[:-1])
    return [x.new_empty(lead + (core.shape[0] * (core.shape[1] if out is None else out.shape[0]),))
            for core, out in zip(cores, out_factors)]


@torch.library.custom_op("tmps::latent_rope_scores", mutates_args=())
def latent_rope_scores_op(q: torch.Tensor, c_k: torch.Tensor, k_up: torch.Tensor, cos: torch.Tensor,
                          sin: torch.Tensor) -> torch.Tensor:
    """:func:`tmps.kernels.latent_scores.latent_rope_scores` as one graph node: (b, kv_heads, m, T) fp32."""
    from tmps.kernels import latent_scores

    return latent_scores.latent_rope_scores(q, c_k, k_up, cos, sin)


@latent_rope_scores_op.register_fake
def _(q, c_k, k_up, cos, sin):
    return q.new_empty((q.shape[0], q.shape[1], q.shape[2], c_k.shape[1]), dtype=torch.float32)


@torch.library.custom_op("tmps::latent_decode", mutates_args=())
def latent_decode_op(q_latent: Optional[torch.Tensor], scores: Optional[torch.Tensor], c_k: Optional[torch.Tensor],
                     c_v: torch.Tensor, v_up: torch.Tensor, mask: Optional[torch.Tensor], scaling: float,
                     heads: int, q_len: int, head_dim: int) -> torch.Tensor:
    """:func:`tmps.kernels.latent_decode.latent_decode_attention` as one graph node (same signature)."""
    from tmps.kernels import latent_decode

    return latent_decode.latent_decode_attention(q_latent, scores, c_k, c_v, v_up, mask, scaling, heads, q_len,
                                                 head_dim)


@latent_decode_op.register_fake
def _(q_latent, scores, c_k, c_v, v_up, mask, scaling, heads, q_len, head_dim):
    return c_v.new_empty((c_v.shape[0], q_len, heads, head_dim))


def compiled_kernel(device: torch.device, backend: str) -> bool:
    """Whether code being compiled takes the projection kernel (as its custom op): only under
    ``backend="triton"``, as :func:`_traced` decides for the latent kernels. Nothing can be timed while
    tracing, so ``"auto"`` leaves the torch chain to the compiler, which fuses it itself (the
    ``torch_compile`` provider of the microbenchmark)."""
    return backend == "triton" and kernel_considered(device, backend)
