"""How much the language-model loss cares about each attention projection's outputs (empirical Fisher).

For a projection output ``y_t: (d_p,)`` at token t and the summed next-token loss ``L``, a small
perturbation ``δ_t`` changes the loss by about ``½ Σ_t δ_tᵀ F δ_t`` with the empirical Fisher

    F = (1/N) Σ_t g_t g_tᵀ,   g_t = ∂L/∂y_t     (d_p × d_p, over the N unmasked tokens).

If a compression replaces ``y`` by ``Π y`` (``Π = U P``, the latent round trip), then with ``δ`` and
``g`` taken as independent (the K-FAC approximation) the expected loss increase is proportional to
``tr(F (I − Π) C (I − Π)ᵀ)`` where ``C = E[y yᵀ]``: a cost in *loss units*, comparable across
layers and between K and V. That is what rank allocation needs and what per-layer energies
(normalised within each layer) cannot give: the same relative error costs far more in some layers
than in others.

``F`` weights the bases (:mod:`tmps.solvers`). Where a few tokens carry both the largest gradients
and atypical outputs, the independence assumption misprices them: kv mode's bases take the moment
with each token weighted by its gradient's squared norm instead of ``C``, weights mode's shared
input basis the input moment weighted by each token's gradient energy (:func:`loss_statistics`),
and the costs that rank allocation spends a budget by are measured token by token
(:func:`direction_costs`, for kv mode's K/V bases and weights mode's shared input directions).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm

__all__ = ["has_language_model_head", "projection_fisher", "loss_statistics", "LossStatistics", "direction_costs",
           "DirectionBasis"]

# Tokens per forward/backward step (at least one sequence): bounds the activations kept for the
# backward pass, which at OPT-1.3B's width are about 4 MB per token.
TOKENS_PER_STEP = 256


def has_language_model_head(model: nn.Module) -> bool:
    """Whether ``model`` computes next-token logits (a ``*ForCausalLM``), which the Fisher pass needs."""
    return getattr(model, "get_output_embeddings", lambda: None)() is not None


def projection_fisher(model: nn.Module, arch, batches, names: tuple[str, ...] = ("k", "v"),
                      progress: bool = True, key_norms: bool = False) -> list[dict[str, torch.Tensor]]:
    """Per decoder layer, ``{name: F (d_p, d_p) float32}`` for the projections in ``names`` ("q", "k", "v").

    With ``key_norms`` (kv mode on Qwen3 / Gemma 3) the "k" Fisher is taken at the key norm's output
    (the normalised key heads, concatenated), which is what kv mode caches latents of.

    ``model`` must be a ``*ForCausalLM`` (it needs the LM loss); ``batches`` are ``(input_ids, mask)``
    pairs, run ``TOKENS_PER_STEP`` tokens at a time (:func:`_gradient_pass`).

    Memory: the sums ``Σ g gᵀ`` are accumulated in place (float32, one ``d_p²`` buffer per
    projection and layer) and each step's ``g gᵀ`` has the same size, so the allocator reuses it:
    for OPT-1.3B in kv mode that is 24 × 2 × 16 MB, plus one step's activations.
    """
    return loss_statistics(model, arch, batches, names, progress, key_norms).fisher


class HeadBlocks:
    """A projection's Fisher held as its diagonal ``(head_dim, head_dim)`` blocks, one per head.

    Where only each head's block is read (weights mode's per-head metrics; Q's basis shared by the
    heads in kv mode), summing and keeping the whole ``d_p × d_p`` matrix for every layer costs
    ``heads`` times the memory and the arithmetic for nothing. ``full()`` gives the block-diagonal
    matrix, whose diagonal blocks are the Fisher's, for one layer's solver at a time.
    """

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks  # (heads, head_dim, head_dim)

    def full(self) -> torch.Tensor:
        return torch.block_diag(*self.blocks)


class LossStatistics(NamedTuple):
    """What :func:`loss_statistics` measures, per decoder layer."""
    fisher: list[dict[str, torch.Tensor | HeadBlocks]]         # {name: F (d_p, d_p) float32, or its HeadBlocks}
    token_energies: list[dict[str, list[torch.Tensor]]] | None  # {name: per batch, (n_b,) float32 ‖g_{p,t}‖²}


def loss_statistics(model: nn.Module, arch, batches, names: tuple[str, ...] = ("k", "v"), progress: bool = True,
                    key_norms: bool = False, token_energies: tuple[str, ...] = (),
                    head_blocks: tuple[str, ...] = (), head_dim: int | None = None) -> LossStatistics:
    """Per layer, the Fisher ``{name: F}`` of :func:`projection_fisher` and, for the projections in
    ``token_energies``, each token's gradient energy ``‖g_{p,t}‖²``, in one pass. The projections in
    ``head_blocks`` get only the diagonal ``head_dim``-wide blocks of their Fisher (:class:`HeadBlocks`).

    The energies are kept per batch of ``batches``, its unmasked tokens in order (row-major), 4
    bytes per token, projection and layer. They weight the calibration moments token by token
    (:func:`tmps.compressor._moment_weights`), because what an error ``e_t`` in ``y_t`` costs is
    ``(g_tᵀ e_t)²``, token by token. Taking each token's gradient direction as average but keeping
    its magnitude (``g_t g_tᵀ ≈ ‖g_t‖² F / tr F``; ``tr F = mean ‖g‖²``) turns the mean cost into
    ``tr(F E C_g Eᵀ)``, ``E`` the error map, with the gradient-weighted moment

        C_g = Σ_t ‖g_t‖² y_t y_tᵀ / Σ_t ‖g_t‖²

    in place of ``C = E[y yᵀ]`` (the K-FAC form, which takes the magnitude as independent of the
    output too): the outputs of the tokens the loss is most sensitive to (attention sinks and the
    like) count more. kv mode's bases diagonalise ``C_g`` of the K/V outputs (Gemma 3 270M, kv 0.5:
    ×2.71 of dense perplexity with ``C``, ×1.42 with ``C_g``); weights mode whitens by the input
    moment weighted by ``Σ_p ‖g_{p,t}‖²`` over Q/K/V, the input-side analogue (README, "Measured
    quality").
    """
    if not set(token_energies) <= set(names) or not set(head_blocks) <= set(names):
        raise ValueError(f"token_energies={token_energies} and head_blocks={head_blocks} must be among the measured "
                         f"projections names={names}")
    if head_blocks and not head_dim:
        raise ValueError("head_blocks needs the head_dim of the blocks")
    fisher = [{n: None for n in names} for _ in arch.decoder_layers(model)]
    # Allocated before the pass, filled in place: small tensors kept alive between the pass's large
    # ones pin the heap (per-step lists of them took weights mode's peak at OPT-1.3B's shape from
    # 8.39 to 8.83 GiB; allocated up front, 8.46 GiB: benchmarks/memory.py --mode weights).
    sizes = [int(mask.sum()) for _, mask in batches]
    energies = [{n: torch.zeros(sum(sizes)) for n in token_energies} for _ in fisher]
    filled = [{n: 0 for n in token_energies} for _ in fisher]  # tokens written so far, per projection

    def accumulate(layer: int, name: str, y: torch.Tensor, g: torch.Tensor) -> None:
        if name in head_blocks:
            heads = g.reshape(g.shape[0], -1, head_dim).transpose(0, 1)  # (heads, n, head_dim)
            _add(fisher[layer], name, heads.transpose(1, 2) @ heads)
        else:
            _add(fisher[layer], name, g.T @ g)
        if name in energies[layer]:
            start = filled[layer][name]
            energies[layer][name][start:start + g.shape[0]] = g.square().sum(1)
            filled[layer][name] = start + g.shape[0]

    count = _gradient_pass(model, arch, batches, names, accumulate, key_norms, "tmps: loss sensitivity", progress)
    # Each projection's hook fires once per step, in token order: cut the stream back into batches.
    per_batch = [{n: list(e.split(sizes)) for n, e in layer.items()} for layer in energies] if token_energies else None
    fisher = _token_means(fisher, count)
    for layer in fisher:
        for name in head_blocks:
            layer[name] = HeadBlocks(layer[name])
    return LossStatistics(fisher, per_batch)


def _add(sums: dict, name: str, value: torch.Tensor) -> None:
    """``sums[name] += value``, in place after the first (out-of-place sums of large matrices fragment the heap)."""
    if sums[name] is None:
        sums[name] = value
    else:
        sums[name] += value


class PackedSymmetric:
    """A symmetric ``(n, n)`` matrix held as its upper triangle (``n(n+1)/2`` values): half the memory.

    Every layer's Fisher stays alive from the Fisher pass until that layer is compressed (with kv
    mode's then stored gradient-weighted moments, full, they took OPT-1.3B's kv-mode peak to 1.97×
    the model).
    ``full()`` rebuilds the matrix exactly (same dtype), one layer at a time.
    """

    def __init__(self, matrix: torch.Tensor):
        self.size = matrix.shape[0]
        rows, cols = torch.triu_indices(self.size, self.size, device=matrix.device)
        self.values = matrix[rows, cols]

    def full(self) -> torch.Tensor:
        rows, cols = torch.triu_indices(self.size, self.size, device=self.values.device)
        out = self.values.new_empty(self.size, self.size)
        out[rows, cols] = self.values
        out[cols, rows] = self.values
        return out


def pack_layers(statistics: list[dict]) -> None:
    """Replace every full matrix in ``statistics[l][name]`` by its :class:`PackedSymmetric`, in place, one at a
    time (:class:`HeadBlocks` are kept as they are)."""
    for layer in statistics:
        for name, matrix in layer.items():
            if isinstance(matrix, torch.Tensor):
                layer[name] = PackedSymmetric(matrix)


def unpacked(layer: dict | None) -> dict | None:
    """One layer's ``{name: full matrix}`` (None stays None) for a solver."""
    if layer is None:
        return None
    return {name: None if m is None else m.full() for name, m in layer.items()}


class DirectionBasis:
    """A basis ``(P, U)`` (``U P = I``, both ``(d, d)``) held for :func:`direction_costs` at half the memory.

    Every layer's bases are alive at once during the cost pass, beside every layer's Fisher: in
    float32 they took OPT-1.3B's kv-mode peak from 1.58× to 1.93× the model. Stored as float16,
    each row of ``P`` and column of ``U`` scaled to a largest entry of 1 (the float16 range cannot
    hold a Fisher-weighted basis as it is), with the scales in float32: an entry keeps 11 bits, and
    a cost, which only ranks directions, moves by about 1e-3 of itself.
    """

    def __init__(self, down: torch.Tensor, up: torch.Tensor):
        self.down_scale = down.abs().amax(dim=1).clamp_min(1e-30).float()    # (d,) per row of P
        self.up_scale = up.abs().amax(dim=0).clamp_min(1e-30).float()        # (d,) per column of U
        self.down = (down / self.down_scale[:, None].to(down.dtype)).half()
        self.up = (up / self.up_scale[None, :].to(up.dtype)).half()

    def read(self, y: torch.Tensor) -> torch.Tensor:
        """``y Pᵀ``: each row's coordinates ``p_iᵀ y_t``, ``(n, d)`` float32."""
        return (y @ self.down.float().T) * self.down_scale

    def read_gradient(self, g: torch.Tensor) -> torch.Tensor:
        """``g U``: each row's ``g_tᵀ u_i``, ``(n, d)`` float32."""
        return (g @ self.up.float()) * self.up_scale


def direction_costs(model: nn.Module, arch, batches, bases: list[dict[str, DirectionBasis]],
                    progress: bool = True, key_norms: bool = False) -> list[dict[str, torch.Tensor]]:
    """Per layer, ``{name: c (d_p,) float64}``: the loss cost of dropping each direction of a latent basis.

    ``bases[l][name]`` holds ``(P, U)``, both ``(d_p, d_p)`` with ``U P = I`` (as
    :meth:`tmps.solvers.LayerSolver.kv_basis` returns them; :class:`DirectionBasis`): token t's output is
    ``y_t = Σ_i u_i (p_iᵀ y_t)``, and dropping direction i changes it by ``−u_i (p_iᵀ y_t)``. With the
    output gradient ``g_t`` that costs, to second order in the empirical Fisher,

        c_i = (1/N) Σ_t (g_tᵀ u_i)² (p_iᵀ y_t)²

    measured token by token. With ``F`` and ``C = E[y yᵀ]`` alone (K-FAC: a token's gradient and
    output taken as independent) it would be ``(u_iᵀ F u_i)(p_iᵀ C p_i)``; they are not independent
    where a few tokens carry both the largest gradients and atypical outputs. On Gemma 3 270M that
    estimate priced the V directions far from their measured costs: kv 0.75 ended at ×1.39 of
    dense perplexity against ×1.07 priced per token, weights 0.5 at ×2.66 against ×2.06 (README,
    Gemma 3 section). Cross terms between directions are left out, as in any per-direction allocation.

    Weights mode passes ``{"x": DirectionBasis(P, U)}`` per layer (:meth:`tmps.solvers.LayerSolver.input_direction_basis`):
    ``y`` is then the attention's input and ``g`` its gradient through Q, K and V.

    kv mode with ``q_ratio < 1`` also passes ``"q"``: a ``(head_dim, head_dim)`` basis shared by
    the query heads (:meth:`tmps.solvers.LayerSolver.query_basis`). Dropping its direction i changes
    every head's query, so the heads' terms add before the square:
    ``c_i = (1/N) Σ_t (Σ_h (g_h,tᵀ u_i)(p_iᵀ q_h,t))²``.

    One more forward/backward over ``batches`` (the Fisher pass's tokens); memory: the bases, as
    much as the Fisher itself in kv mode (:class:`DirectionBasis`), two ``(d, d)`` float16 matrices
    per layer in weights mode (whose Fisher is kept as head blocks, :class:`HeadBlocks`).
    """
    names = tuple(bases[0])
    sums = [{n: None for n in names} for _ in bases]

    def accumulate(layer: int, name: str, y: torch.Tensor, g: torch.Tensor) -> None:
        basis = bases[layer][name]
        # A basis narrower than the output (Q's, shared by its heads) drops a direction from every
        # head at once: the heads' changes add up before the square.
        n, width = y.shape[0], basis.down.shape[0]
        terms = basis.read(y.reshape(-1, width)) * basis.read_gradient(g.reshape(-1, width))
        per_token = terms.reshape(n, -1, width).sum(1).double().square().sum(0)
        _add(sums[layer], name, per_token)

    count = _gradient_pass(model, arch, batches, names, accumulate, key_norms, "tmps: direction costs", progress,
                           outputs=True)
    return _token_means(sums, count)


def _token_means(sums: list[dict], count: int) -> list[dict[str, torch.Tensor]]:
    """``sums / count``, checked for the NaN/Inf a half-precision backward can overflow into."""
    for li, per_layer in enumerate(sums):
        for name, s in per_layer.items():
            s /= max(count, 1)
            if not torch.isfinite(s).all():
                where = "the attention input" if name == "x" else f"{name}_proj"
                raise FloatingPointError(
                    f"layer {li}: the loss gradient of {where} has NaN/Inf entries (overflow in a half-precision "
                    "backward?); compress in float32, or use metric='analytic'")
    return sums


def _gradient_pass(model: nn.Module, arch, batches, names, accumulate, key_norms: bool, desc: str, progress: bool,
                   outputs: bool = False) -> int:
    """Run the summed next-token loss forward and backward; return the number of unmasked tokens.

    For every layer ``l`` and projection ``name`` in ``names``, calls ``accumulate(l, name, y, g)``
    with the unmasked tokens' gradients ``g = ∂L/∂y: (n, d_p)`` float32 and, with ``outputs``, their
    outputs ``y`` (else None). "k" is taken at the key norm's output with ``key_norms``; "x" is the
    attention's input (which feeds only the Q/K/V projections: its gradient is ``Σ_p W_pᵀ g_p``).

    One forward and backward per ``TOKENS_PER_STEP`` tokens with the model's own weights frozen (no
    weight gradients are computed: zero tensors added to the hooked outputs are the only leaves
    that require grad); leaves the model's parameters and ``requires_grad`` flags as they were.
    """
    if not has_language_model_head(model):
        raise ValueError("Fisher-based allocation needs the language-model loss: pass a *ForCausalLM, "
                         "or use metric='analytic' for a bare *Model")
    current = {}
    handles = []

    def rows(t: torch.Tensor, heads_first: bool) -> torch.Tensor:
        """(b, s, d_p), or (b, s, heads, head_dim) out of a head norm, as the unmasked tokens' (n, d_p)."""
        if heads_first:  # Gemma 3 normalises (b, heads, s, head_dim)
            t = t.transpose(1, 2)
        return t.reshape(t.shape[0] * t.shape[1], -1)[current["mask"]].float()

    def make_hook(layer_idx: int, name: str, heads_first: bool = False, columns: slice | None = None):
        """``columns``: the projection's outputs within a fused module's (Phi-3's qkv_proj)."""
        def part(t: torch.Tensor) -> torch.Tensor:
            return rows(t if columns is None else t[..., columns], heads_first)

        def hook(module, args, output):
            # y + 0 with a zero leaf that requires grad: the graph after y is recorded (nothing else
            # requires grad), the paths through later layers' projections stay intact, and y's
            # gradient is the total derivative of the loss. (Hooks of a fused module chain: each adds
            # its own zero, and every one sees the same gradient.)
            tracked = output + torch.zeros_like(output, requires_grad=True)
            y = part(output.detach()) if outputs else None
            tracked.register_hook(lambda grad: accumulate(layer_idx, name, y, part(grad)))
            return tracked
        return hook

    def input_hook(layer_idx: int):
        track = make_hook(layer_idx, "x")

        def hook(module, args, kwargs):
            if args:
                return (track(module, None, args[0]),) + tuple(args[1:]), kwargs
            return args, {**kwargs, "hidden_states": track(module, None, kwargs["hidden_states"])}
        return hook

    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        for li, layer in enumerate(arch.decoder_layers(model)):
            attention = arch.attention_of(layer)
            for name in names:
                if name == "x":
                    handles.append(attention.register_forward_pre_hook(input_hook(li), with_kwargs=True))
                elif key_norms and name == "k":
                    hook = make_hook(li, name, heads_first=arch.head_norms_heads_first)
                    handles.append(attention.k_norm.register_forward_hook(hook))
                else:
                    module, columns = arch.projection_output(attention, name)
                    handles.append(module.register_forward_hook(make_hook(li, name, columns=columns)))
        steps = []
        for ids, mask in batches:
            per_step = max(1, TOKENS_PER_STEP // ids.shape[1])
            steps += list(zip(ids.split(per_step), mask.split(per_step)))
        count = 0
        with torch.enable_grad():
            for ids, mask in tqdm(steps, desc=desc, disable=not progress, leave=False):
                current["mask"] = mask.reshape(-1).bool()
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                # Summed next-token loss over real tokens: gradients per token are O(1).
                targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
                loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                                                   ignore_index=-100, reduction="sum")
                del logits
                loss.backward()
                count += int(mask.sum())
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    return count

