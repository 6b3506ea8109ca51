"""The compression configuration: one dataclass, validated on construction."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

MODES = ("kv", "weights")
METHODS = ("tucker-mps", "tucker", "mps", "svd", "eigen")
ALLOCATIONS = ("greedy", "uniform")
METRICS = ("auto", "fisher", "analytic")
# Methods whose bases and ranks may follow the loss (the baselines keep their published rules).
FISHER_METHODS = ("tucker-mps", "tucker", "mps")


@dataclass
class CompressionConfig:
    """How to compress every attention block.

    mode : "kv" (latent K/V cache) or "weights" (factored Q/K/V, cache unchanged).
    method : "tucker-mps" (default), "tucker", "mps", or the baselines "svd" (activation-aware
        per-projection low rank; in kv mode: per-projection output PCA, Palu-like) and "eigen"
        (EigenAttention: per-head bases of calibration activations, K sharing Q's basis).
    ratio : fraction kept, in (0, 1]: of the KV cache in kv mode, of the Q/K/V parameters in
        weights mode. Allocated across layers (and K/V) by ``allocation``.
    mps_eps : energy kept, in (0, 1]: picks ranks per layer by the TT-SVD rule instead of ``ratio``.
    hooi_ranks : explicit ranks for every layer. weights mode: ``[r_in]``, ``[r_in, r_out]`` or
        ``[r_in, r_head, r_out]`` over the (input, head, head_dim) modes; kv mode: ``[r_k, r_v]``.
    error_budget : per-layer relative error allowed (EigenAttention's rule): keep the fewest
        components whose dropped (weighted) energy is at most this fraction.
    allocation : "greedy" spends a global ``ratio`` where the (metric-weighted) error drops most;
        "uniform" cuts every layer alike.
    metric : what the decompositions minimise. "fisher": the language-model loss, through the
        empirical Fisher of each Q/K/V projection's outputs (:mod:`tmps.sensitivity`; needs a
        ``*ForCausalLM``): bases weighted by it, the calibration moments by each token's gradient
        energy (kv mode: each key / value by its gradient's squared norm; weights mode: each input
        by its gradients' at Q/K/V), and ``greedy`` ranks spent over K, V and all layers
        in loss units (``k_share`` unused). "analytic": what attention sees, computed from the weights
        (K weighted by its queries, V by ``o_proj``, normalised per layer). "auto" (default): "fisher"
        for the tucker-mps / tucker / mps methods on a ``*ForCausalLM``, else "analytic". The
        baselines svd and eigen always use their own published rules.
    q_ratio : kv mode, fraction of Q's head_dim kept (tucker family only): below 1, Q is held as
        per-head cores and one output factor shared by the heads (fewer Q parameters and FLOPs;
        the KV cache is unaffected). With the Fisher metric and a ``ratio`` spent greedily (the
        defaults) it is the mean over the layers, each layer's rank spent by its directions' loss
        costs as K's and V's are; otherwise every layer keeps that fraction. Default 1.0: Q stays
        dense. On SmolLM2-135M at half the cache, q_ratio 1.0 / 0.75 / 0.5 gave ×1.111 / ×1.128 /
        ×1.233 of dense perplexity, and 0.5 / 0.25 at kv 0.75 ×1.098 / ×1.615 (README, "Measured
        quality").
    k_share : kv mode, share of the KV budget given to K (the rest to V, at most its full width).
        K tolerates compression far better than V: on SmolLM2-135M at half the cache (16×512
        calibration, 4×1024 evaluation tokens) an energy-greedy split over K and V together gave
        ppl ×1.68 of dense; K shares 0.20 / 0.25 / 0.35 gave ×1.41 (uniform) / ×1.37 / ×1.34.
    rank_multiple : the ranks that ``ratio``, ``mps_eps`` (kv mode) and ``error_budget`` plan for the
        tucker family are multiples of this (or a full width): size budgets round down, energy rules
        round up. Default 8: a row of ``r`` fp16/bf16 numbers (a latent in the KV cache, a row of a
        factor) is then a multiple of 16 bytes, which cuBLAS's fastest half-precision kernels and
        Hopper's bulk tensor copies need; uniform ranks of 717 / 1331 are not. 1 turns it off.
        Explicit ``hooi_ranks``, the ranks TT-SVD picks itself (weights mode with ``mps_eps``) and
        the baselines' published rules are kept as they are.
    """

    mode: str = "kv"
    method: str = "tucker-mps"
    ratio: float | None = None
    mps_eps: float | None = None
    hooi_ranks: Sequence[int] | None = None
    error_budget: float | None = None
    allocation: str = "greedy"
    metric: str = "auto"
    q_ratio: float = 1.0
    k_share: float = 0.35
    rank_multiple: int = 8
    damping: float = 1e-6

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} is not supported; use one of {list(MODES)}")
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is not supported; use one of {list(METHODS)}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation={self.allocation!r} is not supported; use one of {list(ALLOCATIONS)}")
        chosen = [k for k in ("ratio", "mps_eps", "hooi_ranks", "error_budget") if getattr(self, k) is not None]
        if len(chosen) > 1 and not (set(chosen) == {"mps_eps", "hooi_ranks"}):
            raise ValueError(f"give one rank rule, not {chosen}: ratio, error_budget, or mps_eps/hooi_ranks")
        if not chosen:
            self.ratio = 0.5
        for name in ("ratio", "mps_eps"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not 0.0 < float(value) <= 1.0):
                raise ValueError(f"{name}={value!r} is outside (0, 1]; it is the fraction kept, e.g. 0.5")
        if isinstance(self.k_share, bool) or not isinstance(self.k_share, (int, float)) or not 0.0 < self.k_share < 1.0:
            raise ValueError(f"k_share={self.k_share!r} must be in (0, 1): the share of the KV budget given to K")
        if isinstance(self.rank_multiple, bool) or not isinstance(self.rank_multiple, int) or self.rank_multiple < 1:
            raise ValueError(f"rank_multiple={self.rank_multiple!r} must be a positive integer: 8 keeps fp16 rows "
                             "16-byte aligned, 1 turns the rounding off")
        if self.error_budget is not None:
            if isinstance(self.error_budget, bool) or not isinstance(self.error_budget, (int, float)) \
                    or not 0.0 <= float(self.error_budget) < 1.0:
                raise ValueError(f"error_budget={self.error_budget!r} must be in [0, 1), e.g. 0.02")
        if self.hooi_ranks is not None:
            ranks = list(self.hooi_ranks)
            allowed = (2,) if self.mode == "kv" else (1, 2, 3)
            if len(ranks) not in allowed or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in ranks):
                raise ValueError(
                    f"hooi_ranks={self.hooi_ranks!r}: {self.mode} mode needs {' or '.join(map(str, allowed))} "
                    "positive integers (weights: [r_in, r_head, r_out]; kv: [r_k, r_v])")
            self.hooi_ranks = ranks
        if isinstance(self.q_ratio, bool) or not isinstance(self.q_ratio, (int, float)) \
                or not 0.0 < float(self.q_ratio) <= 1.0:
            raise ValueError(f"q_ratio={self.q_ratio!r} is outside (0, 1]; it is the fraction of Q's head_dim kept")
        if self.q_ratio < 1.0 and (self.mode != "kv" or self.method not in FISHER_METHODS):
            raise ValueError(f"q_ratio={self.q_ratio} compresses Q in kv mode for the methods {list(FISHER_METHODS)}; "
                             "in weights mode Q is compressed by ratio already, and the baselines keep a dense Q")
        if self.metric not in METRICS:
            raise ValueError(f"metric={self.metric!r} is not supported; use one of {list(METRICS)}")
        if self.metric == "fisher" and self.method not in FISHER_METHODS:
            raise ValueError(f"metric='fisher' is for the methods {list(FISHER_METHODS)}; the baseline "
                             f"{self.method!r} keeps its published rule: use metric='auto' or 'analytic'")
        if self.method == "eigen" and self.mode != "kv":
            raise ValueError("method='eigen' (EigenAttention) compresses the KV cache: use mode='kv'")

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}
