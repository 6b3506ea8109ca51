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
"""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

__all__ = ["has_language_model_head", "projection_fisher", "prefix_costs"]

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
    pairs, run ``TOKENS_PER_STEP`` tokens at a time. One forward and backward per step with the model's own weights frozen (no weight
    gradients are computed: zero tensors added to the hooked outputs are the only leaves that
    require grad), and leaves the model's parameters and ``requires_grad`` flags as they were.

    Memory: the sums ``Σ g gᵀ`` are accumulated in place (float32, one ``d_p²`` buffer per
    projection and layer) and each step's ``g gᵀ`` has the same size, so the allocator reuses it:
    for OPT-1.3B in kv mode that is 24 × 2 × 16 MB, plus one step's activations.
    """
    if not has_language_model_head(model):
        raise ValueError("Fisher-based allocation needs the language-model loss: pass a *ForCausalLM, "
                         "or use metric='analytic' for a bare *Model")
    layers = arch.decoder_layers(model)
    index = {"q": 0, "k": 1, "v": 2}
    sums = [{n: None for n in names} for _ in layers]
    current = {}
    handles = []

    def make_hook(layer_idx: int, name: str, heads_first: bool = False):
        def hook(module, args, output):
            # y + 0 with a zero leaf that requires grad: the graph after y is recorded (nothing else
            # requires grad), the paths through later layers' projections stay intact, and y's
            # gradient is the total derivative of the loss.
            tracked = output + torch.zeros_like(output, requires_grad=True)

            def accumulate(grad):  # (b, s, d_p), or (b, s, heads, head_dim) out of a head norm
                if heads_first:  # Gemma 3 normalises (b, heads, s, head_dim)
                    grad = grad.transpose(1, 2)
                g = grad.reshape(grad.shape[0] * grad.shape[1], -1)[current["mask"]].float()
                if sums[layer_idx][name] is None:
                    sums[layer_idx][name] = g.T @ g
                else:
                    sums[layer_idx][name] += g.T @ g
            tracked.register_hook(accumulate)
            return tracked
        return hook

    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        for li, layer in enumerate(layers):
            attention = arch.attention_of(layer)
            projections = arch.projections(attention)
            for name in names:
                if key_norms and name == "k":
                    hook = make_hook(li, name, heads_first=arch.head_norms_heads_first)
                    handles.append(attention.k_norm.register_forward_hook(hook))
                else:
                    handles.append(projections[index[name]].register_forward_hook(make_hook(li, name)))
        steps = []
        for ids, mask in batches:
            rows = max(1, TOKENS_PER_STEP // ids.shape[1])
            steps += list(zip(ids.split(rows), mask.split(rows)))
        count = 0
        with torch.enable_grad():
            for ids, mask in tqdm(steps, desc="tmps: loss sensitivity", disable=not progress, leave=False):
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
    fisher = []
    for li, per_layer in enumerate(sums):
        for name, s in per_layer.items():
            s /= max(count, 1)
            if not torch.isfinite(s).all():
                raise FloatingPointError(
                    f"layer {li}: the loss gradient of {name}_proj has NaN/Inf entries (overflow in a half-precision "
                    "backward?); compress in float32, or use metric='analytic'")
        fisher.append(per_layer)
    return fisher


def prefix_costs(evals: torch.Tensor, up: torch.Tensor, fisher: torch.Tensor) -> torch.Tensor:
    """Loss cost of each basis direction: ``c_i = λ_i · u_iᵀ F u_i``, shape ``(r,)``.

    For a basis with ``P C Pᵀ = diag(λ)`` (as :meth:`LayerSolver.kv_basis` returns) and up-projection
    columns ``u_i``, dropping the directions ``i > r`` costs ``tr(F E C Eᵀ) = Σ_{i>r} c_i`` with
    ``E = Σ_{i>r} u_i p_iᵀ``: the cross terms vanish because ``p_iᵀ C p_j = 0`` for ``i ≠ j``.
    """
    return evals * torch.einsum("ji,jk,ki->i", up, fisher, up)
