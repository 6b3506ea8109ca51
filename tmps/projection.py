"""The factor-core-factor projection that replaces Q/K/V linears, in torch (the Triton kernel's twin).

Math, for inputs ``x: (..., d_in)``:

    z   = x B                          (..., r)       shared input factor B: (d_in, r), or z = x
    t_g = z ·_h core_gᵀ                 (..., n_g, s_g) one core per head: core_g: (n_g, s_g, r)
    y_g = t_g A_gᵀ + b_g               (..., n_g·o_g)  output factor A_g: (o_g, s_g), or y_g = t_g

Every compressed attention holds one of these: group order is (q, k, v). In ``weights`` mode the
groups output full heads; in ``kv`` mode the k and v groups output the cached latents.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import kernels_bridge as bridge


class FactoredProjection(nn.Module):
    """Computes several projections of one input through an optional shared input factor.

    Parameters
    ----------
    in_factor : Tensor (d_in, r) or None
    cores : list of Tensor (n_g, s_g, r)   (``r = d_in`` when ``in_factor`` is None)
    out_factors : list of Tensor (o_g, s_g) or None
    biases : list of Tensor (n_g · o_g,) or None

    The factors are the layer's parameters, as the linears' weights they replace were: counted by
    ``model.num_parameters()``, trained by an optimizer over ``model.parameters()`` (fine-tuning
    after compression), frozen by ``requires_grad_(False)`` (the compressor copies the dense
    projections' flag).
    """

    def __init__(self, in_factor, cores, out_factors, biases):
        super().__init__()
        if not (len(cores) == len(out_factors) == len(biases)):
            raise ValueError("cores, out_factors and biases must have one entry per group")
        self.num_groups = len(cores)
        self._register_factor("in_factor", in_factor)
        for g, (core, out, bias) in enumerate(zip(cores, out_factors, biases)):
            self._register_factor(f"core_{g}", core)
            self._register_factor(f"out_factor_{g}", out)
            self._register_factor(f"bias_{g}", bias)
        # "auto": on CUDA, the Triton kernel or the torch chain, whichever is faster for this shape
        # (timed once per token bucket, eagerly and in device time; calls inside a CUDA-graph capture
        # take the device-time winner, see kernels_bridge.faster_path); the torch chain elsewhere.
        # "torch" / "triton" force a path.
        self.backend = "auto"

    def _register_factor(self, name: str, tensor: torch.Tensor | None):
        self.register_parameter(name, None if tensor is None else nn.Parameter(tensor))

    def factors(self) -> tuple:
        """Every factor slot in registration order (None where a group has no out factor or bias)."""
        return tuple(self._parameters.values())

    @classmethod
    def empty(cls, shapes: dict, dtype: torch.dtype) -> "FactoredProjection":
        """A skeleton with uninitialised factors of the given shapes (``{name: shape or None}``), for loading."""
        def make(name):
            shape = shapes.get(name)
            return torch.empty(shape, dtype=dtype) if shape is not None else None
        groups = len([k for k in shapes if k.startswith("core_")])
        return cls(make("in_factor"), [make(f"core_{g}") for g in range(groups)],
                   [make(f"out_factor_{g}") for g in range(groups)], [make(f"bias_{g}") for g in range(groups)])

    def group(self, g: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        return getattr(self, f"core_{g}"), getattr(self, f"out_factor_{g}"), getattr(self, f"bias_{g}")

    @property
    def groups(self):
        return [self.group(g) for g in range(self.num_groups)]

    def output_widths(self) -> list[int]:
        return [core.shape[0] * (out.shape[0] if out is not None else core.shape[1]) for core, out, _ in self.groups]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> int:
        """Multiply-adds ×2 per input row (bias adds not counted)."""
        total = 2 * self.in_factor.numel() if self.in_factor is not None else 0
        for core, out, _ in self.groups:
            total += 2 * core.numel()
            if out is not None:
                total += 2 * core.shape[0] * out.numel()
        return total

    def kernel_fits(self) -> bool:
        """Whether the fused kernel's tiles suit these factors: it keeps one head's out factor ``(o, s)``
        on chip, so out factors must be head-sized (both sides at most 256). The svd baseline's
        whole-projection out factors ``(d_p, r)`` are not (``backend="auto"`` keeps the torch chain)."""
        return all(out is None or max(out.shape) <= 256 for _, out, _ in self.groups)

    # The kernel cache holds the factors it was built from: drop it when they are replaced, so that
    # ``model.to("cuda")`` or ``.half()`` does not keep the old copies alive until the next call.
    def _apply(self, fn, *args, **kwargs):
        self.__dict__.pop("_kernel_cache", None)
        return super()._apply(fn, *args, **kwargs)

    def __setattr__(self, name, value):
        self.__dict__.pop("_kernel_cache", None)
        super().__setattr__(name, value)

    def _kernel_state(self) -> "_KernelState":
        """What the kernel path derives from the factors alone, kept until one of them is replaced.

        At decode sizes a call is host-bound, and rebuilding this (nine factor lookups through
        ``nn.Module.__getattr__``, the shape key, the kernel's factor checks) took 128-185 us of host
        time a call on this project's CPU, the kernel ~20 us of device time on an H200. ``.to()`` /
        ``.half()`` go through ``_apply`` (which drops the cache), ``load_state_dict(assign=True)`` puts
        new tensors in ``_parameters``, so identity tells a stale state; in-place updates need no rebuild.
        """
        factors = self.factors()
        state = self.__dict__.get("_kernel_cache")
        stale = state is None or len(state.factors) != len(factors) or \
            any(a is not b for a, b in zip(state.factors, factors))
        if stale:
            shape_key = (None if self.in_factor is None else tuple(self.in_factor.shape),
                         tuple((tuple(c.shape), None if a is None else tuple(a.shape), b is not None)
                               for c, a, b in self.groups))
            state = _KernelState(factors, self.kernel_fits(), shape_key)
            self.__dict__["_kernel_cache"] = state
        return state

    def _refuse_unfit_factors(self):
        shapes = [tuple(out.shape) for _, out, _ in self.groups if out is not None]
        raise ValueError(f"backend='triton': out factors of shapes {shapes} are larger than the kernel's "
                         "per-head tiles (at most 256 a side; the svd baseline holds whole-projection "
                         "factors); use backend='auto' or 'torch' for this model")

    def _kernel_path(self, x: torch.Tensor) -> "_KernelState | None":
        """The kernel state when the kernel serves ``x`` (so the call does not look it up twice), else None."""
        if not bridge.kernel_considered(x.device, self.backend):
            return None
        if torch.is_grad_enabled() and not bridge.kernels_serve_gradients(self.backend, x, *self.factors()):
            return None
        state = self._kernel_state()
        if self.backend == "triton":
            if not state.fits:
                self._refuse_unfit_factors()
            return state
        if not state.fits:
            return None
        m = x.numel() // x.shape[-1]
        bucket = bridge.token_bucket(m)
        if self.in_factor is None and bucket > bridge.token_bucket(1):
            # Without an in factor the kernel is a plain grouped GEMM: at prefill sizes cuBLAS's GEMMs
            # won (H200 run 2: no-out-factor fused tiles at 0.80x the chain, 4096 tokens, z given), so
            # "auto" keeps the chain there without autotuning ten prefill configs per shape.
            return None
        # decode sizes are timed per row count: batch 16 reads the same factors as batch 1 but does 16x
        # the chain's GEMM work, so the two can pick differently (the kernel's tuner shares one bucket)
        key = (x.device, x.dtype, m if bucket == bridge.token_bucket(1) else bucket) + state.shape_key
        faster = bridge.faster_path(key, lambda: self._triton(x, state), lambda: self._torch(x), device=x.device)
        return state if faster == "triton" else None

    def _triton(self, x: torch.Tensor, state: "_KernelState") -> list[torch.Tensor]:
        launcher = state.launcher
        if launcher is None or launcher.dtype != x.dtype or launcher.device != x.device:
            cores, outs, biases = zip(*self.groups)
            launcher = bridge.fused_projection_launcher(self.in_factor, list(cores), list(outs), list(biases), like=x)
            if not launcher.copied:  # one holding copies of non-contiguous factors would miss in-place updates
                state.launcher = launcher
        return bridge.run_fused_projection(launcher, x)

    def _torch(self, x: torch.Tensor) -> list[torch.Tensor]:
        return factored_projection_torch(x, self.in_factor, self.groups)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if torch.compiler.is_compiling():
            return self._compiled(x)
        state = self._kernel_path(x)
        return self._triton(x, state) if state is not None else self._torch(x)

    def _compiled(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The path traced by ``torch.compile``: the kernel as one opaque op under ``backend="triton"``,
        else the torch chain for the compiler to fuse (nothing is timed or cached while tracing)."""
        if not bridge.compiled_kernel(x.device, self.backend) or \
                not bridge.kernels_serve_gradients(self.backend, x, *self.factors()):
            return self._torch(x)
        if not self.kernel_fits():
            self._refuse_unfit_factors()
        cores, outs, biases = zip(*self.groups)
        return bridge.fused_projection_op(x, self.in_factor, list(cores), list(outs), list(biases))


@dataclass
class _KernelState:
    """The kernel path's per-factors cache: see :meth:`FactoredProjection._kernel_state`."""

    factors: tuple  # the ``_parameters`` values it was built from (identity marks it stale)
    fits: bool  # kernel_fits()
    shape_key: tuple  # the factors' shapes, for the faster_path key
    launcher: Any = None  # a FusedProjection, built at the first kernel call


def factored_projection_torch(x, in_factor, groups) -> list[torch.Tensor]:
    """The unfused chain: one matmul for ``z``, then per group a matmul by the stacked cores and one by the out factor.

    A group without an out factor adds its bias inside the GEMM (``addmm``: one kernel, not two).
    """
    z = x @ in_factor if in_factor is not None else x
    outputs = []
    for core, out, bias in groups:
        n, s, r = core.shape
        if out is None and bias is not None:
            y = torch.addmm(bias, z.reshape(-1, r), core.reshape(n * s, r).T)
            outputs.append(y.view(*z.shape[:-1], n * s))
            continue
        t = z @ core.reshape(n * s, r).T
        if out is not None:
            t = (t.reshape(*t.shape[:-1], n, s) @ out.T).reshape(*t.shape[:-1], n * out.shape[0])
        outputs.append(t + bias if bias is not None else t)
    return outputs
