"""Per-layer decompositions: from calibration statistics and dense weights to factored projections.

Notation for one attention block: inputs ``x: (d,)``, augmented ``x̃ = [x; 1]``, the calibration
second moment ``C = E[x̃ x̃ᵀ]: (d+1, d+1)``, weights with their bias column ``W̃_p = [W_p | b_p]``.
Output second moments follow without storing activations: ``E[y_p y_pᵀ] = W̃_p C W̃_pᵀ``.

kv mode, per K and V: a latent basis ``(P: (r, d_kv), U: (d_kv, r))`` with ``U P ≈ I`` on the data.
  * weighted (tucker family): minimise ``E‖S (k − U P k)‖²`` for an output metric ``S² = M``.
    K is weighted by the queries (``M`` = the query second moment of each KV group, averaged over
    RoPE rotation pairs), V by the output projection (``M = Σ_h W_o,hᵀ W_o,h``): the errors the
    attention output sees. Solution: eigenvectors ``V`` of ``S E[kkᵀ] S``; ``P = Vᵀ S``, ``U = S⁻¹ V``.
    With ``metric="fisher"`` the weighting is instead the empirical Fisher of the projection's
    outputs (``M = E[g gᵀ]``, ``g = ∂loss/∂k``; :mod:`tmps.sensitivity`): the loss itself, through
    the softmax, the attention pattern and every later layer, and in units comparable across layers;
    half of it is the analytic metric scaled to the same energy (:func:`fisher_blend`). The moment
    is then the gradient-weighted ``C_g = Σ_t w_t k_t k_tᵀ / Σ_t w_t`` (``weighted``), ``w_t = ‖g_t‖²``
    for the Fisher pass's tokens, which keeps what the loss-sensitive tokens need
    (:func:`tmps.sensitivity.loss_statistics`; the compressor sums it over the calibration tokens
    that reach the layer, :class:`tmps.compressor._LayerMoments`).
  * svd: the same with ``S = I`` (per-projection output PCA = activation-aware SVD, Palu-like).
  * eigen (EigenAttention): one basis per head; K's from the K and Q activations of its group.
  Models that normalise each query and key head (Qwen3, Gemma 3) hand the solver the second moments
  of the normalised queries and keys (``normed``), which stand for ``W̃ C W̃ᵀ`` of q and k: the key
  latents are then taken after the norm (``k_down``, see :meth:`LayerSolver.build_kv`).
weights mode: the whitened stacked weights ``T = [W_q; W_k; W_v] L`` (``L Lᵀ = E[xxᵀ]``) as a
  3-way tensor ``(d, heads, head_dim)``, decomposed by HOOI / TT-SVD / Tucker-MPS into a shared
  input factor, per-head cores and an optional output factor; ``svd`` factors each projection alone.
  With ``metric="fisher"`` each head's ``M_h`` is the diagonal block of its projection's Fisher,
  and the compressor hands the solver the input moment with each token weighted by its gradient
  energy at Q/K/V (``Σ_t w_t x̃_t x̃_tᵀ / Σ_t w_t``, :func:`tmps.compressor._moment_weights`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .decompose import hooi, input_metric, tt_svd, tucker_mps_tensor
from .decompose.tt import energy_rank
from .models.base import AttentionShape
from .models.rope import rope_average
from .projection import FactoredProjection
from .sensitivity import DirectionBasis


@dataclass
class DenseAttentionWeights:
    """Float64 copies of one block's projections (biases are zeros when absent, ``has_bias`` says which)."""

    wq: torch.Tensor
    bq: torch.Tensor
    wk: torch.Tensor
    bk: torch.Tensor
    wv: torch.Tensor
    bv: torch.Tensor
    wo: torch.Tensor
    has_bias: bool

    @classmethod
    def from_linears(cls, q, k, v, o) -> "DenseAttentionWeights":
        def bias(lin):
            return lin.bias.detach().double() if lin.bias is not None else torch.zeros(lin.out_features, dtype=torch.float64, device=lin.weight.device)
        return cls(q.weight.detach().double(), bias(q), k.weight.detach().double(), bias(k),
                   v.weight.detach().double(), bias(v), o.weight.detach().double(), q.bias is not None)

    def augmented(self, name: str) -> torch.Tensor:
        w, b = getattr(self, "w" + name), getattr(self, "b" + name)
        return torch.cat([w, b[:, None]], dim=1)


def head_block(m: torch.Tensor, i: int, size: int) -> torch.Tensor:
    """The ``i``-th ``size × size`` diagonal block of ``m`` (one head's block of a projection-wide matrix)."""
    return m[i * size:(i + 1) * size, i * size:(i + 1) * size]


def psd_sqrt(m: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric square root of a PSD matrix and its inverse; eigenvalues floored at ``damping·mean``."""
    evals, evecs = torch.linalg.eigh((m + m.T) / 2)
    floor = damping * evals.clamp_min(0).mean().clamp_min(1e-300)
    root = evals.clamp_min(floor).sqrt()
    return (evecs * root) @ evecs.T, (evecs / root) @ evecs.T


# Weight of the analytic metric in the Fisher blends: kv mode's bases (:func:`fisher_blend`) and
# weights mode's per-head metrics (:meth:`LayerSolver.blended_head_metrics`).
ANALYTIC_WEIGHT = 0.5


def fisher_blend(fisher: torch.Tensor, analytic: torch.Tensor, moment: torch.Tensor) -> torch.Tensor:
    """``(1 − a) F + a · M (tr(F C) / tr(M C))``: the Fisher, regularised by the analytic metric.

    The empirical Fisher comes from a few thousand tokens, a handful of which carry most of the
    gradient: its small directions are noisy, and a basis that trusts them drops directions the
    loss does need once the budget reaches them. Mixing in the analytic metric ``M`` scaled to the
    same weighted energy (``C = E[y yᵀ]``) keeps the result in the Fisher's loss units. On
    SmolLM2-135M, kv mode: ×1.056 → ×1.030 of dense perplexity at ratio 0.75, ×1.203 → ×1.202 at 0.5.
    """
    scale = torch.trace(fisher @ moment) / torch.trace(analytic @ moment).clamp_min(1e-300)
    return (1 - ANALYTIC_WEIGHT) * fisher + ANALYTIC_WEIGHT * scale * analytic


@dataclass
class LayerSummary:
    """What rank planning needs from one layer, small enough to keep for every layer at once.

    ``kv_spectra``: K/V spectra (one per basis); ``kv_gains``: with the Fisher metric, the loss cost
    of each K/V basis direction; ``weight_spectrum`` / ``input_costs`` / ``tensor_shape``: the shared
    input factor's spectrum, its directions' loss costs and the (input, heads, head_dim) shape;
    ``bases``: with the Fisher metric, the ``(P, U)`` pairs (:class:`tmps.sensitivity.DirectionBasis`)
    whose directions the costs are of
    (kv: "k" and "v", and "q" with ``q_ratio < 1``; weights: "x", the shared input), until
    :func:`tmps.sensitivity.direction_costs` has turned them into ``kv_gains`` / ``input_costs``;
    ``projection_spectra``: the svd baseline's per-projection spectra.
    """

    shape: AttentionShape
    kv_spectra: dict | None = None
    bases: dict | None = None
    kv_gains: dict | None = None
    weight_spectrum: torch.Tensor | None = None
    input_costs: torch.Tensor | None = None
    tensor_shape: tuple | None = None
    projection_spectra: list | None = None


class LayerSolver:
    """Everything one attention block needs: its spectra (for rank allocation) and its factors."""

    def __init__(self, method: str, mode: str, shape: AttentionShape, weights: DenseAttentionWeights,
                 second_moment: torch.Tensor, uses_rope: bool, damping: float = 1e-6,
                 fisher: dict[str, torch.Tensor] | None = None, normed: dict[str, torch.Tensor] | None = None,
                 weighted: dict[str, torch.Tensor | None] | None = None, rotary_dim: int | None = None):
        self.method, self.mode, self.shape, self.w = method, mode, shape, weights
        self.fisher = fisher
        # kv mode with the Fisher metric: the gradient-weighted moments C_g of the K/V outputs
        # (:class:`tmps.compressor._LayerMoments`), which the bases diagonalise in place of E[y yᵀ].
        self.weighted = weighted
        self.c = second_moment
        # kv mode on models with per-head q/k norms: the second moments of the normalised queries
        # and keys (:func:`tmps.calibration.head_norm_moments`), which the input moment cannot give.
        self.normed = normed
        self.uses_rope, self.damping = uses_rope, damping
        # features of a head that RoPE rotates: all of them but under partial RoPE (Phi-4-mini)
        self.rotary_dim = shape.head_dim if rotary_dim is None else rotary_dim
        self._cache: dict = {}

    def summary(self) -> LayerSummary:
        """The planning data of this layer (see :class:`LayerSummary`); the solver can then be dropped."""
        out = LayerSummary(self.shape)
        if self.mode == "kv":
            out.kv_spectra = self.kv_spectra()
            if self.fisher is not None and self.method != "eigen":
                out.bases = {name: DirectionBasis(*self.kv_basis(name)[1:]) for name in ("k", "v")}
                if "q" in self.fisher:  # q_ratio < 1: Q's ranks are planned by cost too
                    out.bases["q"] = DirectionBasis(*self.query_basis())
        elif self.method == "svd":
            out.projection_spectra = self.projection_spectra()
        else:
            out.weight_spectrum = self.weight_spectrum()
            out.tensor_shape = tuple(self.whitened_tensor()[0].shape)
            if self.fisher is not None:
                out.bases = {"x": DirectionBasis(*self.input_direction_basis())}
        return out

    # ------------------------------------------------------------------ kv mode
    def output_moment(self, name: str) -> torch.Tensor:
        """``E[y yᵀ]`` of projection ``name``'s outputs; of the normalised heads for q and k where the model
        normalises them (``normed``), since the key latents and the key metric are taken after the norm."""
        if self.normed is not None and name in self.normed:
            return self.normed[name]
        w = self.w.augmented(name)
        return w @ self.c @ w.T

    def _query_metric(self) -> torch.Tensor:
        s, hd = self.shape, self.shape.head_dim
        cq = self.output_moment("q")
        blocks = []
        for j in range(s.num_kv_heads):
            m = sum(head_block(cq, h, hd) for h in range(j * s.group_size, (j + 1) * s.group_size))
            if self.uses_rope:  # average over rotation angles: each rotated pair becomes (tr/2)·I
                m = rope_average(m, hd, self.rotary_dim)
            blocks.append(m)
        return torch.block_diag(*blocks)

    def _output_metric(self) -> torch.Tensor:
        s, hd = self.shape, self.shape.head_dim
        blocks = []
        for j in range(s.num_kv_heads):
            cols = [self.w.wo[:, h * hd:(h + 1) * hd] for h in range(j * s.group_size, (j + 1) * s.group_size)]
            blocks.append(sum(c.T @ c for c in cols))
        return torch.block_diag(*blocks)

    def kv_basis(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Spectrum ``(d_kv,)`` descending, and the full-rank ``P: (d_kv, d_kv)``, ``U: (d_kv, d_kv)`` (rows/cols ordered by it)."""
        key = ("kv", name)
        if key not in self._cache:
            moment = self.output_moment(name)
            if self.method == "svd":
                evals, evecs = torch.linalg.eigh(moment)
                evals, evecs = evals.flip(0), evecs.flip(1)
                self._cache[key] = (evals.clamp_min(0), evecs.T, evecs)
            else:
                metric = self._query_metric() if name == "k" else self._output_metric()
                if self.fisher is not None:
                    metric = fisher_blend(self.fisher[name].double(), metric, moment)
                    if self.weighted is not None and self.weighted.get(name) is not None:
                        moment = self.weighted[name].double()
                root, inv_root = psd_sqrt(metric, self.damping)
                evals, evecs = torch.linalg.eigh(root @ moment @ root)
                evals, evecs = evals.flip(0), evecs.flip(1)
                self._cache[key] = (evals.clamp_min(0), evecs.T @ root, inv_root @ evecs)
        return self._cache[key]

    def head_bases(self, name: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """EigenAttention: per KV head, (spectrum desc, orthonormal basis ``(hd, hd)``)."""
        key = ("heads", name)
        if key not in self._cache:
            s, hd = self.shape, self.shape.head_dim
            moment = self.output_moment(name)
            cq = self.output_moment("q") if name == "k" else None
            bases = []
            for j in range(s.num_kv_heads):
                m = head_block(moment, j, hd)
                if cq is not None:  # K shares its basis with the queries that attend to it
                    m = m + sum(head_block(cq, h, hd)
                                for h in range(j * s.group_size, (j + 1) * s.group_size))
                evals, evecs = torch.linalg.eigh(m)
                bases.append((evals.flip(0).clamp_min(0), evecs.flip(1)))
            self._cache[key] = bases
        return self._cache[key]

    def kv_spectra(self) -> dict[str, list[torch.Tensor]]:
        """Spectra to allocate over: one per K/V (global basis) or one per head (eigen)."""
        if self.method == "eigen":
            return {n: [e for e, _ in self.head_bases(n)] for n in ("k", "v")}
        return {n: [self.kv_basis(n)[0]] for n in ("k", "v")}

    def build_kv(self, ranks: dict[str, list[int]], q_rank: int | None = None
                 ) -> tuple[FactoredProjection, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Factored projection (q, k/v latents), the up-projections ``k_up (d_kv, r_k)``, ``v_up``, and ``k_down``.

        Q is dense unless ``q_rank < head_dim`` (see :meth:`query_factors`). ``k_down`` is None, the
        key basis folded into the projection (``c_k = (P_k W_k) x``), unless the model normalises its
        key heads (``normed``): then ``c_k = P_k k̂`` with ``k̂ = norm(W_k x)``, not linear in ``x``, so
        the projection outputs full keys and ``k_down = P_k: (r_k, d_kv)`` follows the norm."""
        ups, latents, downs = {}, {}, {}
        for name in ("k", "v"):
            if self.method == "eigen":
                down_blocks, up_blocks = [], []
                for (evals, basis), r in zip(self.head_bases(name), ranks[name]):
                    down_blocks.append(basis[:, :r].T)
                    up_blocks.append(basis[:, :r])
                down, up = torch.block_diag(*down_blocks), torch.block_diag(*up_blocks)
            else:
                _, down_full, up_full = self.kv_basis(name)
                r = ranks[name][0]
                down, up = down_full[:r], up_full[:, :r]
            w = self.w.augmented(name)
            latents[name] = down @ w  # (r, d+1): weight and bias of the latent projection
            ups[name], downs[name] = up, down
        q_core, q_out = self.query_factors(q_rank)
        cores = [q_core, latents["k"][None, :, :-1], latents["v"][None, :, :-1]]
        biases = [self.w.bq, latents["k"][:, -1], latents["v"][:, -1]] if self.w.has_bias else [None] * 3
        k_down = None
        if self.normed is not None:  # full keys out of the projection; the basis after the norm
            s = self.shape
            cores[1], biases[1] = self.w.wk.reshape(s.num_kv_heads, s.head_dim, -1), self.w.bk if self.w.has_bias else None
            k_down = downs["k"]
        return FactoredProjection(None, cores, [q_out, None, None], biases), ups["k"], ups["v"], k_down

    def query_factors(self, rank: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Q in kv mode: per-head cores ``(H, s, d)`` and a shared output factor ``A (head_dim, s)``.

        ``q_h ≈ A G_h x + b_h`` truncates Q's head_dim mode to ``s = rank`` (a Tucker factor shared by
        all heads), so that kv mode can hold fewer parameters than a dense Q. The basis minimises
        ``Σ_h E‖S(W_h x − A G_h x)‖²`` for one metric ``S² = M̄`` shared by the heads (their mean
        Fisher block, or with the analytic metric their mean key second moment, RoPE-averaged):
        eigenvectors ``V`` of ``S (Σ_h W_h C W_hᵀ) S``, ``A = S⁻¹ V_s``, ``G_h = V_sᵀ S W_h``.
        ``rank`` None or ``head_dim`` keeps Q dense: ``(H, head_dim, d)`` and no output factor.
        """
        s, hd, d = self.shape, self.shape.head_dim, self.shape.hidden_size
        w = self.w.wq.reshape(s.num_heads, hd, d)
        if rank is None or rank >= hd:
            return w, None
        basis, root, inv_root = self._query_eigenbasis()
        basis = basis[:, :rank]                                # (hd, s)
        return torch.einsum("os,op,hpd->hsd", basis, root, w), inv_root @ basis

    def query_basis(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P, U)``, both ``(head_dim, head_dim)`` with ``U P = I``: :meth:`query_factors`' whole basis,
        shared by the heads (``P = Vᵀ S``, ``U = S⁻¹ V``), for :func:`tmps.sensitivity.direction_costs`."""
        basis, root, inv_root = self._query_eigenbasis()
        return basis.T @ root, inv_root @ basis

    def _query_eigenbasis(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(V, S, S⁻¹)``: the eigenvectors of :meth:`query_factors`' moment, largest first, and the metric's roots."""
        s, hd, d = self.shape, self.shape.head_dim, self.shape.hidden_size
        w = self.w.wq.reshape(s.num_heads, hd, d)
        if self.fisher is not None and "q" in self.fisher:
            fq = self.fisher["q"].double()
            blocks = [head_block(fq, h, hd) for h in range(s.num_heads)]
        else:
            ck = self._rope_average(self.output_moment("k")) if self.uses_rope else self.output_moment("k")
            blocks = [head_block(ck, h // s.group_size, hd) for h in range(s.num_heads)]
        root, inv_root = psd_sqrt(sum(blocks) / len(blocks), self.damping)
        c = self.c[:d, :d]
        moment = sum(root @ w[h] @ c @ w[h].T @ root for h in range(s.num_heads))
        _, evecs = torch.linalg.eigh((moment + moment.T) / 2)
        return evecs.flip(1), root, inv_root

    # ------------------------------------------------------------------ weights mode
    def head_output_metrics(self) -> list[torch.Tensor]:
        """Per output head (q heads, then k, then v) the metric ``M_h`` of what attention sees of its error.

        A query head's error reaches the scores through its keys (``M = E[k kᵀ]`` of its KV head), a
        key head's through its queries (the query metric), a value head's through ``o_proj``. Each
        projection's metrics are scaled so that its weighted energy is 1: the three relative errors
        count alike.
        """
        s, hd = self.shape, self.shape.head_dim
        ck = self.output_moment("k")
        if self.uses_rope:  # as for K in kv mode: average over rotation angles within each pair
            ck = self._rope_average(ck)
        k_blocks = [head_block(ck, j, hd) for j in range(s.num_kv_heads)]
        q_metric, v_metric = self._query_metric(), self._output_metric()
        metrics = {
            "q": [k_blocks[h // s.group_size] for h in range(s.num_heads)],
            "k": [head_block(q_metric, j, hd) for j in range(s.num_kv_heads)],
            "v": [head_block(v_metric, j, hd) for j in range(s.num_kv_heads)],
        }
        out = []
        for name in ("q", "k", "v"):
            energy = self._weighted_energy(name, metrics[name])
            out += [m / energy.clamp_min(1e-300) for m in metrics[name]]
        return out

    def _weighted_energy(self, name: str, metrics: list[torch.Tensor]) -> torch.Tensor:
        """``Σ_h tr(M_h W_h C W_hᵀ)`` over the heads of projection ``name`` ("q", "k", "v"), ``C = E[xxᵀ]``."""
        w = getattr(self.w, "w" + name).reshape(len(metrics), self.shape.head_dim, -1)
        return sum(torch.einsum("ij,jk,ik->", m @ w[h], self.c[:-1, :-1], w[h]) for h, m in enumerate(metrics))

    def fisher_head_metrics(self) -> list[torch.Tensor]:
        """Per output head (q heads, then k, then v) the diagonal block of its projection's Fisher."""
        hd = self.shape.head_dim
        return [head_block(self.fisher[n], h, hd).double()
                for n in "qkv" for h in range(self.fisher[n].shape[0] // hd)]

    def blended_head_metrics(self) -> list[torch.Tensor]:
        """Per output head, ``(1 − a) F_h + a · e_p M_h`` with ``a = ANALYTIC_WEIGHT``: the kv blend, per head.

        ``F_h`` is the head's Fisher block (:meth:`fisher_head_metrics`), ``M_h`` the analytic metric
        (:meth:`head_output_metrics`, normalised to unit weighted energy per projection) and ``e_p =
        Σ_h tr(F_h W_h C W_hᵀ)`` the Fisher's weighted energy of the head's projection, so the mix
        stays in the Fisher's loss units (as :func:`fisher_blend` does for one basis) and each
        projection keeps its Fisher energy. Why: 8192 tokens of Fisher are noisy in its small
        directions. On SmolLM2-135M, weights mode 0.5: pure Fisher ×1.536 of dense perplexity
        (×1.476 with 16384 Fisher tokens), the blend ×1.424.
        """
        a = ANALYTIC_WEIGHT
        fisher, analytic = self.fisher_head_metrics(), self.head_output_metrics()
        out, start = [], 0
        for name in ("q", "k", "v"):
            heads = slice(start, start + self.fisher[name].shape[0] // self.shape.head_dim)
            energy = self._weighted_energy(name, fisher[heads])
            out += [(1 - a) * f + a * energy * m for f, m in zip(fisher[heads], analytic[heads])]
            start = heads.stop
        return out

    def _rope_average(self, m: torch.Tensor) -> torch.Tensor:
        """``m`` averaged over RoPE's rotation angles, head by head (:func:`tmps.models.rope.rope_average`)."""
        return rope_average(m, self.shape.head_dim, self.rotary_dim)

    def whitened_tensor(self, output_weighted: bool = True) -> tuple[torch.Tensor, object]:
        """``T = S [W_q; W_k; W_v] L`` as ``(d, heads, head_dim)`` and the input metric.

        ``L Lᵀ = E[xxᵀ]`` whitens the inputs; ``S`` = block-diag of per-head ``M_h^{1/2}`` (see
        :meth:`head_output_metrics`) weights each head's outputs by what attention sees of them.
        Without ``output_weighted`` (needed when an output factor is shared by all heads), ``S = I``.
        """
        key = ("T", output_weighted)
        if key not in self._cache:
            d, hd = self.shape.hidden_size, self.shape.head_dim
            metric = input_metric(self.c[:d, :d], self.damping)
            stacked = torch.cat([self.w.wq, self.w.wk, self.w.wv]) @ metric.sqrt
            heads = stacked.shape[0] // hd
            t = stacked.reshape(heads, hd, d)
            if output_weighted:
                metrics = self.head_output_metrics() if self.fisher is None else self.blended_head_metrics()
                roots = [psd_sqrt(m, self.damping) for m in metrics]
                t = torch.stack([r @ t[h] for h, (r, _) in enumerate(roots)])
                self._cache["head_inv_roots"] = torch.stack([inv for _, inv in roots])
            self._cache[key] = (t.permute(2, 0, 1).contiguous(), metric)
        return self._cache[key]

    def weight_basis(self) -> tuple[torch.Tensor, torch.Tensor]:
        """T's input-mode unfolding: squared singular values ``(d,)`` descending and left vectors ``(d, d)``."""
        if "input_basis" not in self._cache:
            t, _ = self.whitened_tensor()
            flat = t.reshape(t.shape[0], -1)
            evals, evecs = torch.linalg.eigh(flat @ flat.T)
            self._cache["input_basis"] = (evals.flip(0).clamp_min(0), evecs.flip(1))
        return self._cache["input_basis"]

    def weight_spectrum(self) -> torch.Tensor:
        """Squared singular values of T's input-mode unfolding (the shared input factor's spectrum)."""
        return self.weight_basis()[0]

    def input_direction_basis(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The shared input factor's directions as ``(P, U)``, both ``(d, d)`` float64, ``U P = I``.

        Row ``i`` of ``P = Vᵀ L⁻¹`` reads direction ``i`` of an input ``x`` (``v_iᵀ L⁻¹ x``, with ``V``
        from :meth:`weight_basis` and ``L Lᵀ = E[xxᵀ]``); column ``i`` of ``U = L V`` maps it back.
        Dropping it from every projection changes them by ``−W_p u_i (p_iᵀ x)``: for the loss, an
        input change ``−u_i (p_iᵀ x)`` (the attention input feeds only Q, K and V).
        """
        _, metric = self.whitened_tensor(output_weighted=False)
        _, vectors = self.weight_basis()
        return vectors.T @ metric.inv_sqrt, metric.sqrt @ vectors

    def projection_spectra(self) -> list[torch.Tensor]:
        """svd baseline: the whitened spectrum of each projection."""
        _, metric = self.whitened_tensor(output_weighted=False)
        return [torch.linalg.svdvals(metric.whiten(w)).pow(2) for w in (self.w.wq, self.w.wk, self.w.wv)]

    def build_weights(self, r_in: int, r_head: int | None = None, r_out: int | None = None,
                      mps_eps: float | None = None, svd_ranks: list[int] | None = None) -> FactoredProjection:
        s = self.shape
        weighted = self.method != "svd" and (r_out is None or r_out == s.head_dim)
        t, metric = self.whitened_tensor(output_weighted=weighted)
        d, heads, hd = t.shape
        biases = [self.w.bq, self.w.bk, self.w.bv] if self.w.has_bias else [None] * 3
        if self.method == "svd":
            cores, outs = [], []
            for w, r in zip((self.w.wq, self.w.wk, self.w.wv), svd_ranks):
                u, sv, vh = torch.linalg.svd(metric.whiten(w), full_matrices=False)
                cores.append(metric.input_factor(vh[:r].T).T[None])  # (1, r, d)
                outs.append(u[:, :r] * sv[:r])                      # (d_p, r)
            return FactoredProjection(None, cores, outs, biases)

        r_head = r_head or heads
        r_out = r_out or hd
        if self.method == "mps":
            c1, c2, c3 = tt_svd(t, eps=mps_eps, max_rank=[r_in, r_out]).cores
            in_white, head_cores, out_factor = c1[0], c2.permute(1, 2, 0), c3[:, :, 0].T  # (H, s2, s1)
        else:
            if self.method == "tucker-mps":
                # without mps_eps the ranks alone decide: eps 1.0's noise rule would drop whitened
                # directions the calibration barely reached (fewer tokens than d), which inputs still use
                tucker, _ = tucker_mps_tensor(t, mps_eps, [r_in, r_head, r_out])
            else:
                tucker = hooi(t, [r_in, r_head, r_out])
            u_in, u_head, u_out = tucker.factors
            # Per-head cores (H, r_out, r_in): G_h = Σ_j U_head[h, j] core[:, j, :], transposed.
            head_cores = torch.einsum("hj,ijo->hoi", u_head, tucker.core)
            in_white, out_factor = u_in, u_out
        in_factor = metric.input_factor(in_white)                     # (d, r_in), acts on raw x
        if out_factor.shape[0] == out_factor.shape[1]:                 # square output factor: fold it in
            head_cores, out_factor = torch.einsum("os,hsi->hoi", out_factor, head_cores), None
        if weighted:                                                   # undo the per-head output weighting
            if out_factor is not None:
                head_cores = torch.einsum("os,hsi->hoi", out_factor, head_cores)
                out_factor = None
            head_cores = torch.einsum("hpo,hoi->hpi", self._cache["head_inv_roots"], head_cores)
        splits = [s.num_heads, s.num_kv_heads, s.num_kv_heads]
        cores = list(torch.split(head_cores, splits, dim=0))
        return FactoredProjection(in_factor, cores, [out_factor] * 3, biases)


def allocate_by_threshold(spectra: list[torch.Tensor], costs: list[int], budget: float,
                          minimum: int = 1, multiple: int = 1) -> list[int]:
    """Ranks that keep the largest normalised eigenvalues ``λ_i / Σλ`` across all spectra within ``budget``.

    Equalises the marginal relative error across layers (a global threshold on normalised
    energy), at ``costs[j]`` per rank unit of spectrum j. Every spectrum keeps at least ``minimum``;
    ranks grow in steps of ``multiple`` (see :func:`grow_prefixes`).
    """
    values = [lam / lam.sum().clamp_min(1e-300) for lam in spectra]
    return grow_prefixes(values, [float(c) for c in costs], budget, minimum, multiple)


def non_increasing(gains: torch.Tensor) -> torch.Tensor:
    """The non-increasing sequence closest to ``gains`` in least squares (pool adjacent violators).

    Rank allocation takes prefixes of each basis: when a later direction gains more than an earlier
    one, the pair is worth its mean per rank unit, so the greedy threshold sees them together.
    """
    sums, counts = [], []
    for g in gains.tolist():
        sums.append(g), counts.append(1)
        while len(sums) > 1 and sums[-2] / counts[-2] < sums[-1] / counts[-1]:
            s, c = sums.pop(), counts.pop()
            sums[-1] += s
            counts[-1] += c
    return torch.cat([torch.full((c,), s / c, dtype=torch.float64) for s, c in zip(sums, counts)])


def allocate_by_cost(gains: list[torch.Tensor], budget: float, unit_costs: list[float] | None = None,
                     minimum: int = 1, multiple: int = 1) -> list[int]:
    """Prefix lengths that keep the largest gains (in common units) across all lists within ``budget``.

    ``gains[j][i]`` is what keeping direction ``i`` of basis ``j`` saves (e.g. loss from
    :func:`tmps.sensitivity.direction_costs`); each rank unit of basis ``j`` costs ``unit_costs[j]``
    (default 1) of the budget. Every basis keeps ``minimum``; ranks grow in steps of ``multiple``.
    Gains are made non-increasing per basis first (:func:`non_increasing`), so that a global
    threshold on gain per cost picks prefixes.
    """
    unit_costs = unit_costs or [1.0] * len(gains)
    return grow_prefixes([non_increasing(g.double()) for g in gains], unit_costs, budget, minimum, multiple)


def aligned_rank(rank: int, multiple: int, width: int, up: bool = False) -> int:
    """``rank`` rounded to a multiple of ``multiple`` (down, or ``up``), at least one multiple, at most ``width``.

    The full ``width`` is always allowed (it need not be a multiple). Rounding up serves the
    error-budget rules (keep at least what the rule asks for), rounding down the size budgets.
    """
    if multiple <= 1:
        return max(1, min(rank, width))
    steps = -(-rank // multiple) if up else rank // multiple
    return min(width, max(multiple, steps * multiple))


def grow_prefixes(values: list[torch.Tensor], unit_costs: list[float], budget: float, minimum: int = 1,
                  multiple: int = 1) -> list[int]:
    """Greedy prefix lengths of several non-increasing ``values`` lists within ``budget``, in chunks.

    List ``j`` starts at ``min(width_j, minimum rounded up to multiple)`` and grows by chunks of
    ``multiple`` directions (its last chunk may be shorter: the full width is always a valid rank).
    A chunk is worth its mean value per unit cost ``unit_costs[j]``; chunks are taken best first
    while they fit, and a list whose next chunk does not fit stops there (so ranks stay prefixes
    whose lengths are multiples of ``multiple`` or the full width). With ``multiple=1`` this is the
    plain greedy over single directions.

    Why chunks: a latent row of ``r`` fp16 numbers is 16-byte aligned only when ``r`` is a multiple
    of 8, which cuBLAS's fastest half-precision kernels and Hopper's bulk (TMA) copies need.
    """
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"multiple={multiple!r} must be a positive integer, e.g. 8")
    start = [min(v.numel(), aligned_rank(minimum, multiple, v.numel(), up=True)) for v in values]
    spent = sum(r * c for r, c in zip(start, unit_costs))
    scores, owners, sizes = [], [], []
    for j, (v, r0, c) in enumerate(zip(values, start, unit_costs)):
        bounds = list(range(r0, v.numel(), multiple)) + [v.numel()]
        tail = v[r0:]
        if multiple == 1 or r0 == v.numel():  # one direction a chunk: its own value
            chunk_means = tail
        else:
            chunk_means = torch.stack([tail[a - r0:b - r0].mean() for a, b in zip(bounds, bounds[1:])])
            # means of a non-increasing list do not increase, up to rounding: keep them so exactly,
            # so that a list's chunks are taken in order (ties go to the earlier chunk)
            chunk_means = torch.cummin(chunk_means, 0).values
        scores.append(chunk_means / c)
        owners.extend([j] * chunk_means.numel())
        sizes.extend(b - a for a, b in zip(bounds, bounds[1:]))
    ranks, closed = list(start), set()
    if owners:
        for i in torch.argsort(torch.cat(scores), descending=True, stable=True).tolist():
            j = owners[i]
            if j in closed:
                continue
            cost = sizes[i] * unit_costs[j]
            if spent + cost > budget + 1e-9:
                closed.add(j)
                continue
            ranks[j] += sizes[i]
            spent += cost
    return ranks


def ranks_by_energy(spectrum: torch.Tensor, eps: float) -> int:
    """The TT-SVD rule on an eigenvalue spectrum (``λ = σ²``)."""
    return energy_rank(spectrum.clamp_min(0).sqrt(), eps)
