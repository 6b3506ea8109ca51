"""Calibration data: validation, batching, sampling from the model itself, and capturing layer inputs."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .models.rope import is_dynamic_ntk


class _StopForward(Exception):
    pass


def sample_from_model(model: nn.Module, num_sequences: int = 16, seq_len: int = 128, seed: int = 0,
                      batch_size: int = 8) -> torch.Tensor:
    """Calibration without a dataset: ``(num_sequences, seq_len)`` token ids sampled from the model.

    Starts each sequence at the BOS token and samples with temperature 1 under a fixed seed
    (``torch.random.fork_rng`` leaves the caller's RNG untouched). Needs a ``*ForCausalLM``.
    """
    if not hasattr(model, "generate"):
        raise ValueError("calibration=None samples text from the model, which needs a *ForCausalLM; "
                         "pass calibration token ids for a bare *Model")
    device = next(model.parameters()).device
    bos = getattr(model.config, "bos_token_id", None)
    bos = 0 if bos is None else bos
    out = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in range(0, num_sequences, batch_size):
            n = min(batch_size, num_sequences - start)
            prompt = torch.full((n, 1), bos, dtype=torch.long, device=device)
            ids = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_k=0, top_p=1.0,
                                 temperature=1.0, max_new_tokens=seq_len - 1, min_new_tokens=seq_len - 1,
                                 pad_token_id=bos)
            out.append(ids[:, :seq_len])
    return torch.cat(out)


def position_limit(model: nn.Module) -> int | None:
    """The longest sequence ``model`` is meant to take: ``config.max_position_embeddings``, or None
    (no limit) where that is not a limit. Past it, a table of learned positions (OPT) has no row and
    plain RoPE meets angles it was never trained on; dynamic NTK RoPE (``rope_type="dynamic"``)
    rescales its frequencies past it by design, so there it is the original context, not a limit."""
    for module in model.modules():  # HF's rotary embeddings name their kind (a dict per layer kind: Gemma 3)
        kinds = getattr(module, "rope_type", None)
        if any(isinstance(kind, str) and is_dynamic_ntk(kind)
               for kind in (kinds.values() if isinstance(kinds, dict) else [kinds])):
            return None
    limit = getattr(model.config, "max_position_embeddings", None)
    return limit if isinstance(limit, int) else None


def calibration_batches(calibration, model: nn.Module, batch_size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Normalise ``calibration`` into ``[(input_ids (b, s), attention_mask (b, s))]`` after checking it.

    Accepts a LongTensor ``(n, seq)``, or an iterable of such tensors or of tokenizer outputs
    (mappings with ``input_ids`` and optionally ``attention_mask``).
    """
    if isinstance(calibration, torch.Tensor):
        items = list(calibration.split(batch_size)) if calibration.ndim == 2 else [calibration]
    elif isinstance(calibration, Iterable) and not isinstance(calibration, (str, bytes)):
        items = list(calibration)
    else:
        raise TypeError(f"calibration must be a LongTensor (n, seq) or an iterable of batches, got {type(calibration).__name__}")
    device = next(model.parameters()).device
    vocab = getattr(model.config, "vocab_size", None)
    max_pos = position_limit(model)
    batches = []
    for item in items:
        mask = None
        if isinstance(item, dict) or hasattr(item, "keys"):
            if "input_ids" not in item:
                raise ValueError("a calibration batch given as a mapping needs an 'input_ids' entry")
            ids, mask = item["input_ids"], item.get("attention_mask")
        else:
            ids = item
        if not isinstance(ids, torch.Tensor):
            ids = torch.as_tensor(ids)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2:
            raise ValueError(f"calibration token ids must be 2-D (batch, seq), got shape {tuple(ids.shape)}")
        if ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"calibration must hold integer token ids, got dtype {ids.dtype}; tokenize the text first")
        if ids.device != device:
            raise ValueError(f"calibration is on {ids.device} but the model is on {device}; move it with .to({str(device)!r})")
        if ids.numel() == 0:
            continue
        if vocab is not None and (ids.min() < 0 or ids.max() >= vocab):
            raise ValueError(f"calibration token ids must lie in [0, {vocab}) (the model's vocabulary); "
                             f"got values in [{ids.min().item()}, {ids.max().item()}]")
        if max_pos is not None and ids.shape[1] > max_pos:
            raise ValueError(f"calibration sequences have {ids.shape[1]} tokens, more than the model's "
                             f"max_position_embeddings={max_pos}; cut them shorter")
        mask = torch.ones_like(ids) if mask is None else mask.to(ids.device)
        batches.append((ids.long(), mask.long()))
    if not batches:
        raise ValueError("calibration data is empty: give at least one sequence of token ids (or calibration=None "
                         "to sample from the model)")
    return batches


def layer_kinds(model: nn.Module, num_layers: int) -> list:
    """Each decoder layer's attention kind: ``config.layer_types`` where the model has one (Gemma 3's and
    Qwen2's ``"sliding_attention"`` / ``"full_attention"``), else one kind (None) for every layer.

    HF hands every layer of one kind the same keyword arguments (mask, rotary tables), picked by
    ``config.layer_types[i]``."""
    types = getattr(getattr(model, "config", None), "layer_types", None)
    return list(types) if types is not None and len(types) == num_layers else [None] * num_layers


def capture_layer_inputs(model: nn.Module, layers: nn.ModuleList, batches) -> list[tuple[torch.Tensor, list[dict]]]:
    """What the decoder layers receive for each batch: ``(hidden entering layer 0, [kwargs of layer i])``.

    Layers of one kind (:func:`layer_kinds`) share one kwargs dict, recorded at the first layer of
    that kind: the forward runs only as far as the last such layer (layer 0 when all are alike;
    layer 5 of Gemma 3 270M's 18, its first full-attention layer). Caches are dropped and
    ``use_cache`` set False, so the layers can be rerun one by one on these inputs.
    """
    kinds = layer_kinds(model, len(layers))
    first = {}
    for index, kind in enumerate(kinds):
        first.setdefault(kind, index)
    last = max(first.values())
    entering, by_kind = [], {}  # this batch's hidden states entering layer 0, and kwargs per kind

    def make_hook(index: int):
        def hook(module, args, kwargs):
            kwargs = dict(kwargs)
            hidden = args[0] if args else kwargs.pop("hidden_states")
            for key in ("cache", "past_key_values"):
                kwargs.pop(key, None)
            kwargs["use_cache"] = False
            if index == 0:
                entering.append(hidden.detach())
            by_kind[kinds[index]] = kwargs
            if index == last:
                raise _StopForward
        return hook

    handles = [layers[index].register_forward_pre_hook(make_hook(index), with_kwargs=True)
               for index in sorted(first.values())]
    captured = []
    try:
        for ids, mask in batches:
            entering.clear()
            by_kind.clear()
            try:
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            except _StopForward:
                pass
            captured.append((entering[0], [by_kind[kind] for kind in kinds]))
    finally:
        for handle in handles:
            handle.remove()
    return captured


def run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def augmented_moment(x: torch.Tensor, token_mask: torch.Tensor, out: torch.Tensor | None = None,
                     weights: torch.Tensor | None = None) -> torch.Tensor:
    """``Σ x̃ x̃ᵀ`` over unmasked tokens, ``x̃ = [x; 1]``: ``(d+1, d+1)`` float64.

    With ``weights: (n,)``, one per unmasked token in row-major order (``w_t ≥ 0``), ``Σ w_t x̃_t x̃_tᵀ``.
    With ``out`` (a running sum from earlier batches), the sum is added to it in place and ``out``
    returned: accumulating out of place fragments the heap with a fresh ``(d+1)²`` matrix per batch.
    """
    flat = x.reshape(-1, x.shape[-1])[token_mask.reshape(-1).bool()].double()
    flat = torch.cat([flat, torch.ones(flat.shape[0], 1, dtype=flat.dtype, device=flat.device)], dim=1)
    return _add_gram(_scale_rows(flat, weights), out)


def _scale_rows(flat: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """``flat`` (a fresh copy, ``(n, d)``) with row t scaled by ``√w_t`` in place, so that ``flatᵀ flat = Σ w_t f_t f_tᵀ``:
    no second ``(n, d)`` float64 copy (67 MB for 8×512 tokens at OPT-1.3B's width)."""
    return flat if weights is None else flat.mul_(weights.to(flat).sqrt()[:, None])


def _add_gram(flat: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """``flatᵀ flat``, or added to ``out`` in place (out-of-place sums of large matrices fragment the heap)."""
    return flat.T @ flat if out is None else out.addmm_(flat.T, flat)


def output_moments(attention: nn.Module, arch, x: torch.Tensor, token_mask: torch.Tensor,
                   names: tuple[str, ...] = ("k", "v"), weights: dict[str, torch.Tensor] | None = None,
                   head_norms: bool = False, out: dict | None = None) -> dict[str, torch.Tensor]:
    """``{name: Σ_t w_t y_t y_tᵀ (d_p, d_p)}`` float64 of the dense projections' outputs over the unmasked tokens of ``x``.

    ``y_t = W_p x_t + b_p`` for ``name`` in "q", "k", "v" (heads concatenated), computed from the
    attention's input ``x: (b, s, d)`` with the dense modules themselves, so the attention need not
    run. With ``head_norms`` (Qwen3, Gemma 3) q and k are taken after the attention's per-head
    q_norm / k_norm, before RoPE: what kv mode caches latents of (keys) and weights its key basis by
    (queries). ``weights``: ``{name: (n,)}``, one weight per unmasked token in row-major order (a
    name without weights: 1). ``out`` accumulates in place.
    """
    projections = dict(zip("qkv", arch.projections(attention)[:3]))
    keep = token_mask.reshape(-1).bool()
    sums = {} if out is None else out
    with torch.no_grad():
        for name in names:
            y = projections[name](x)
            if head_norms and name in ("q", "k"):
                y = getattr(attention, f"{name}_norm")(y.view(*x.shape[:-1], -1, attention.head_dim)).flatten(-2)
            flat = _scale_rows(y.reshape(-1, y.shape[-1])[keep].double(), (weights or {}).get(name))
            sums[name] = _add_gram(flat, sums.get(name))
    return sums


def head_norm_moments(attention: nn.Module, arch, x: torch.Tensor, token_mask: torch.Tensor,
                      out: dict | None = None) -> dict[str, torch.Tensor]:
    """``{"q": Σ q̂ q̂ᵀ (d_q, d_q), "k": Σ k̂ k̂ᵀ (d_kv, d_kv)}`` float64, over the unmasked tokens of ``x``:
    :func:`output_moments` of the queries and keys after the per-head norms (Qwen3's and Gemma 3's)."""
    return output_moments(attention, arch, x, token_mask, ("q", "k"), head_norms=True, out=out)
