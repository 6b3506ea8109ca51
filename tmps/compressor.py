"""``tmps.compress``: calibrated, sequential, transactional compression of every attention block.

Two passes over the calibration data, one decoder layer at a time, keeping only the current
layer's hidden states and one ``(d+1)²`` second moment at a time (no stored activations beyond that):

1. dense pass, one layer at a time: each attention input's second moment becomes that layer's
   planning summary at once (spectra, and with the Fisher metric the loss cost of each direction,
   from a forward/backward pass over the first ``fisher_tokens`` tokens run before it; with a
   greedy ``ratio`` a second such pass measures the cost of each direction of the bases just
   found: kv mode's K/V bases, weights mode's shared input directions); a global
   ``ratio`` is then spent where the loss (or the calibration error) drops most;
2. sequential pass: layer l is decomposed from the inputs that the *already compressed* layers
   0..l-1 produce, swapped in, and run to make layer l+1's inputs; the attention output error on
   the calibration data is measured on the way.

With the Fisher metric both passes weight each of the Fisher pass's tokens in their moments by its
gradient energy (kv mode's K/V output moments, weights mode's input moment; the other tokens count
as average ones): what an error costs depends on the token (:func:`_token_weights`).

If anything fails (bad option, NaN, out of memory, KeyboardInterrupt) every swapped layer is put
back: the model is left exactly as it was.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibration import (
    augmented_moment,
    calibration_batches,
    capture_layer_inputs,
    head_norm_moments,
    output_moments,
    run_layer,
    sample_from_model,
)
from .config import FISHER_METHODS, CompressionConfig
from .models.base import AttentionShape, architecture_of, detach_rotary, new_like, offloaded_by_dispatch
from .models.rope import rotary_state_kept
from .pretrained import record_compression
from .sensitivity import direction_costs, has_language_model_head, loss_statistics, pack_layers, unpacked
from .solvers import (
    DenseAttentionWeights,
    LayerSolver,
    LayerSummary,
    allocate_by_cost,
    allocate_by_threshold,
    aligned_rank,
    ranks_by_energy,
)

__all__ = ["compress", "is_compressed"]


def is_compressed(model: nn.Module) -> bool:
    return getattr(model, "tmps_info", None) is not None


def _check_weights(model: nn.Module) -> None:
    offloaded = offloaded_by_dispatch(model)
    if offloaded is not None:
        raise ValueError(f"{offloaded} has its weights offloaded by accelerate (device_map offload to 'cpu' or 'disk', "
                         "or cpu_offload); tmps reads and replaces every layer's attention weights: load the model "
                         "onto devices that hold all of it (a device_map without offload, or none)")
    for name, p in model.named_parameters():
        if p.is_meta:
            raise ValueError(f"the model's weight {name} is on the meta device (not loaded); load the model with "
                             "its weights before compressing it")
        if not torch.isfinite(p).all():
            raise ValueError(f"the model's weight {name} has NaN/Inf entries; tmps cannot compress a broken model "
                             "(reload it from its checkpoint)")


def _check_projections(arch, layers) -> None:
    """Every attention's Q/K/V/output projection must be a plain floating-point linear map: tmps reads
    its weight. A quantized layer's weight holds packed integers, and a LoRA layer's leaves its
    adapters out, so either would be compressed wrongly without a word."""
    for index, layer in enumerate(layers):
        for name, projection in zip(("q", "k", "v", "o"), arch.projections(arch.attention_of(layer))):
            where = f"layer {index}: the {name} projection ({type(projection).__name__})"
            if hasattr(projection, "base_layer") or hasattr(projection, "lora_A"):
                raise ValueError(f"{where} carries adapters (PEFT/LoRA); merge them into the weights first "
                                 "(peft's merge_and_unload()) and compress the merged model")
            weight = getattr(projection, "weight", None)
            if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.dim() != 2:
                kind = "no weight" if not isinstance(weight, torch.Tensor) else f"a {weight.dtype} weight"
                raise ValueError(f"{where} has {kind}: tmps compresses floating-point linear projections, not "
                                 "quantized ones (bitsandbytes, GPTQ, AWQ...); load the model in float32, float16 "
                                 "or bfloat16")


@torch.no_grad()
def compress(model: nn.Module, calibration=None, *, mode: str = "kv", method: str = "tucker-mps",
             ratio: float | None = None, mps_eps: float | None = None, hooi_ranks=None,
             error_budget: float | None = None, allocation: str = "greedy", metric: str = "auto",
             q_ratio: float = 1.0, k_share: float = 0.35, rank_multiple: int = 8, fisher_tokens: int = 8192,
             batch_size: int = 8,
             calibration_samples: int = 16, calibration_seq_len: int = 128, seed: int = 0,
             progress: bool = True, damping: float = 1e-6) -> nn.Module:
    """Replace the attention of ``model`` (in place) by compressed attention and return it.

    Parameters
    ----------
    model : an OPT, Llama, Mistral, Mixtral, Qwen2(-MoE), Qwen3(-MoE), Gemma 3 (text), Phi-3, SmolLM3 or Granite
        ``*ForCausalLM`` / ``*Model`` (:func:`tmps.models.supported_model_types`).
    calibration : LongTensor ``(n, seq)``, an iterable of such batches or of tokenizer outputs, or
        None to sample ``calibration_samples × calibration_seq_len`` tokens from the model (seeded).
    mode, method, ratio, mps_eps, hooi_ranks, error_budget, allocation, metric, q_ratio, k_share,
        rank_multiple : see
        :class:`CompressionConfig` (``metric="auto"`` is resolved here and recorded in ``tmps_info``).
    fisher_tokens : with ``metric="fisher"``, the calibration tokens (the first ones) of the
        forward/backward pass that measures the loss sensitivity; the decompositions themselves
        always use all the calibration data.
    batch_size : calibration sequences per forward.
    progress : show progress bars.

    Returns the same model object, with ``model.tmps_info`` describing every layer (see
    :func:`tmps.report`), recorded in ``model.config.quantization_config`` too, so that
    ``model.save_pretrained`` writes a folder ``from_pretrained`` rebuilds (:mod:`tmps.pretrained`). A ``torch.compile``d model is compressed through its original module,
    eagerly (tracing every calibration pass with its hooks recompiled the model again and again);
    the returned wrapper recompiles at its next call.
    """
    wrapper, model = model, unwrap_compiled(model)
    config = CompressionConfig(mode=mode, method=method, ratio=ratio, mps_eps=mps_eps, hooi_ranks=hooi_ranks,
                               error_budget=error_budget, allocation=allocation, metric=metric, q_ratio=q_ratio, k_share=k_share,
                               rank_multiple=rank_multiple, damping=damping)
    arch = architecture_of(model)
    if is_compressed(model):
        raise ValueError("this model is already compressed by tmps; compress the dense model again "
                         "(recompressing stored factors would compound their error)")
    _check_weights(model)
    _check_projections(arch, arch.decoder_layers(model))
    if isinstance(fisher_tokens, bool) or not isinstance(fisher_tokens, int) or fisher_tokens < 1:
        raise ValueError(f"fisher_tokens={fisher_tokens!r} must be a positive number of tokens, e.g. 8192")
    has_lm_head = has_language_model_head(model)
    if config.metric == "auto":
        config.metric = "fisher" if has_lm_head and config.method in FISHER_METHODS else "analytic"
    if config.metric == "fisher" and not has_lm_head:
        raise ValueError(f"metric='fisher' needs the language-model loss, which a bare {type(model).__name__} "
                         "has not: pass the *ForCausalLM, or use metric='analytic'")
    if config.metric == "fisher" and _flex_attention_on_cpu(model):
        raise ValueError("metric='fisher' runs the loss backward through attention, and flex_attention has no "
                         "backward on the CPU: call model.set_attn_implementation('sdpa') (or load the model "
                         "with attn_implementation='sdpa') before compressing, or use metric='analytic'")
    with rotary_state_kept(model):  # dynamic NTK RoPE remembers the longest forward
        if calibration is None:
            calibration = sample_from_model(model, calibration_samples, calibration_seq_len, seed, batch_size)
        batches = calibration_batches(calibration, model, batch_size)

        layers = arch.decoder_layers(model)
        swapped: list[tuple[int, nn.Module]] = []
        was_training = model.training
        model.eval()
        try:
            info = _compress_layers(model, arch, layers, batches, config, swapped, progress, fisher_tokens)
        except BaseException:
            for index, original in reversed(swapped):
                layers[index] = original
            raise
        finally:
            model.train(was_training)
    model.tmps_info = {"config": config.to_dict(), "layers": info}
    record_compression(model)  # for save_pretrained / from_pretrained (tmps.pretrained)
    return wrapper


def _flex_attention_on_cpu(model: nn.Module) -> bool:
    """Whether ``model`` attends with flex_attention on the CPU, where torch has no backward for it."""
    if getattr(model.config, "_attn_implementation", None) != "flex_attention":
        return False
    return any(p.device.type == "cpu" for p in model.parameters())


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper (``OptimizedModule``) compiles, or ``model`` itself."""
    return model._orig_mod if isinstance(model, torch._dynamo.eval_frame.OptimizedModule) else model


def _planning_summaries(arch, layers, inputs, masks, config, fisher, energies, progress: bool) -> list[LayerSummary]:
    """Dense pass, one layer at a time: each layer's input moment, turned into its planning summary at once.

    Only the current layer's moment and solver are alive (for OPT-1.3B a solver holds ~300 MB of
    float64 weights and bases, a moment 34 MB): what planning keeps of a layer is its small
    :class:`LayerSummary`.
    """
    hidden = [h for h, _ in inputs]
    summaries = []
    for index, layer in enumerate(tqdm(layers, desc="tmps: calibration statistics", disable=not progress, leave=False)):
        moments = _run_with_moment(arch, index, layer, hidden, inputs, masks, _normed_keys(arch, config),
                                   _token_weights(config, energies[index] if energies else None, masks))
        solver = _solver(arch, arch.attention_of(layer), config, moments, fisher[index] if fisher else None)
        summaries.append(solver.summary())
        if not _costs_needed(config):
            summaries[-1].bases = None
        del solver, moments
    return summaries


def _costs_needed(config) -> bool:
    """Whether rank planning spends a ``ratio`` budget by the directions' loss costs (with the Fisher metric)."""
    return config.ratio is not None and config.allocation == "greedy"


def _normed_keys(arch, config) -> bool:
    """Whether kv mode caches latents of normalised keys (Qwen3, Gemma 3: per-head q/k norms)."""
    return config.mode == "kv" and arch.compressed_attention_class.head_norms


def _run_over_batches(index, layer, hidden, inputs, masks, module, hook, after: bool = False) -> None:
    """Run ``layer`` (decoder layer ``index``) over every batch, updating ``hidden`` in place, with ``hook`` on ``module``.

    ``hook(batch, args, kwargs)`` runs before ``module``'s forward (``after=False``) or
    ``hook(batch, args, kwargs, output)`` after it; ``batch`` is the batch's index (its token mask
    is ``masks[batch]``).
    """
    current = {}
    if after:
        handle = module.register_forward_hook(lambda m, a, k, o: hook(current["batch"], a, k, o), with_kwargs=True)
    else:
        handle = module.register_forward_pre_hook(lambda m, a, k: hook(current["batch"], a, k), with_kwargs=True)
    try:
        for i, (_, kwargs) in enumerate(inputs):
            current["batch"] = i
            hidden[i] = run_layer(layer, hidden[i], kwargs[index])
    finally:
        handle.remove()


def _run_with_moment(arch, index, layer, hidden, inputs, masks, normed_keys: bool = False, weights=None
                     ) -> _LayerMoments:
    """Run ``layer`` over every batch (updating ``hidden`` in place); return its attention's calibration
    moments (:class:`_LayerMoments`, ``weights`` as there)."""
    moments = _LayerMoments(arch, arch.attention_of(layer), masks, normed_keys, weights)
    _run_over_batches(index, layer, hidden, inputs, masks, moments.attention,
                      lambda batch, args, kwargs: moments.add(batch, args[0] if args else kwargs["hidden_states"]))
    return moments.means()


class _LayerMoments:
    """One attention block's calibration moments, summed batch by batch, then taken as means over the tokens.

    * ``moment``: the augmented input moment ``E[x̃ x̃ᵀ]`` ``(d+1, d+1)`` (weights mode with the
      Fisher metric: each token weighted by ``weights["x"]``);
    * ``normed``: with ``normed_keys``, the moments of the normalised queries and keys (else None);
    * ``weighted``: kv mode with the Fisher metric, ``{name: C_g}`` of the K/V outputs, each token
      weighted by ``weights[name]`` (:func:`tmps.sensitivity.loss_statistics`); else None.

    ``weights``: :func:`_token_weights`, ``{name: per batch (n_b,) float64}``; they sum to the
    token count, so every moment stays a mean.
    """

    def __init__(self, arch, attention, masks, normed_keys: bool = False, weights: dict | None = None):
        self.arch, self.attention, self.masks = arch, attention, masks
        self.normed_keys, self.weights = normed_keys, weights or {}
        self.moment = self.normed = self.weighted = None
        self.count = 0

    def add(self, batch: int, x: torch.Tensor) -> None:
        """Add batch ``batch``'s attention input ``x: (b, s, d)``."""
        mask = self.masks[batch]
        weights = {name: w[batch] for name, w in self.weights.items()}
        self.moment = augmented_moment(x, mask, out=self.moment, weights=weights.get("x"))
        if self.normed_keys:
            self.normed = head_norm_moments(self.attention, self.arch, x, mask, out=self.normed)
        kv = tuple(name for name in ("k", "v") if name in weights)
        if kv:
            self.weighted = output_moments(self.attention, self.arch, x, mask, kv, weights, self.normed_keys,
                                           out=self.weighted)
        self.count += int(mask.sum())

    def means(self) -> _LayerMoments:
        """Divide every sum by the token count, in place (once, when every batch is in); returns ``self``."""
        count = max(self.count, 1)
        self.moment.div_(count)
        for sums in (self.normed, self.weighted):
            for m in (sums or {}).values():
                m.div_(count)
        return self


def _token_weights(config, energies: dict[str, list[torch.Tensor]] | None, masks) -> dict[str, list[torch.Tensor]]:
    """One layer's token weights per moment (:class:`_LayerMoments`) from its Fisher-pass token energies.

    kv mode: K's and V's output moments, each by its own gradient energy (``C_g``); weights mode:
    the input moment by the energy summed over Q/K/V (the error ``ΔW_p x_t`` costs
    ``(g_{p,t}ᵀ ΔW_p x_t)²``). A moment whose layer got no gradient stays plain (no entry).
    """
    if not energies:
        return {}
    if config.mode == "kv":
        groups = {name: energies[name] for name in ("k", "v")}
    else:
        groups = {"x": [sum(parts) for parts in zip(*energies.values())]}
    weights = {name: _moment_weights(e, masks) for name, e in groups.items()}
    return {name: w for name, w in weights.items() if w is not None}


def _moment_weights(energies: list[torch.Tensor] | None, masks) -> list[torch.Tensor] | None:
    """Per calibration batch, ``(n_b,)`` float64: each unmasked token's weight in a calibration moment.

    The Fisher pass's tokens weigh their gradient energy relative to its mean, ``e_t / mean(e)``
    (:func:`tmps.sensitivity.loss_statistics`): what loss-sensitive tokens need counts more. The
    other tokens, whose gradients were not measured, weigh 1 (an average token), and the weights
    still sum to the token count, so the moment stays a mean. Weights mode at 0.5, default options:
    SmolLM2-135M ×1.407 → ×1.352 of dense perplexity, Gemma 3 270M ×2.06 → ×1.59 (README,
    "Measured quality").

    The Fisher pass ran over a row-prefix of each leading batch (:func:`_first_tokens`), so
    ``energies[b]`` are the first unmasked tokens of batch ``b``.
    """
    if energies is None:
        return None
    mean = torch.cat(energies).double().mean()
    if not mean > 0:  # no gradient reached the layer: nothing to weight by
        return None
    weights = []
    for b, mask in enumerate(masks):
        w = torch.ones(int(mask.sum()), dtype=torch.float64)
        if b < len(energies):
            w[:energies[b].numel()] = energies[b].double() / mean
        weights.append(w)
    return weights


def _solver(arch, attention, config, moments: _LayerMoments, fisher=None) -> LayerSolver:
    """One layer's solver from its calibration moments; ``fisher`` is that layer's packed Fisher (:func:`pack_layers`)."""
    q, k, v, o = arch.projections(attention)
    weights = DenseAttentionWeights.from_linears(q, k, v, o)
    return LayerSolver(config.method, config.mode, arch.shape(attention), weights, moments.moment,
                       arch.layer_uses_rope(attention), config.damping, unpacked(fisher), moments.normed,
                       moments.weighted, arch.rotary_dim(attention))


def _plan_ranks(config: CompressionConfig, summaries: list[LayerSummary]) -> list[dict]:
    """Per-layer ranks from the rank rule; kv: {'k': [...], 'v': [...]}, weights: {'r_in', ...}.

    The tucker family's planned ranks are multiples of ``config.rank_multiple`` (or a full width);
    explicit ``hooi_ranks`` and the baselines' published rules are kept as they are.
    """
    plans = []
    multiple = _rank_multiple(config)
    fisher = summaries[0].kv_gains is not None or summaries[0].input_costs is not None
    if config.mode == "kv":
        if fisher and _costs_needed(config):
            return _plan_kv_fisher(config, summaries)
        spectra = [s.kv_spectra for s in summaries]
        if config.ratio is not None and config.method == "eigen" and config.allocation == "greedy":
            # EigenAttention: one energy threshold for every head of every layer, fitted to the budget.
            flat, index = [], []
            for l, sp in enumerate(spectra):
                for name in ("k", "v"):
                    for h, lam in enumerate(sp[name]):
                        flat.append(lam), index.append((l, name, h))
            ranks = _uniform_threshold(flat, config.ratio * sum(lam.numel() for lam in flat))
            plans = [{n: [0] * len(sp[n]) for n in ("k", "v")} for sp in spectra]
            for (l, name, h), r in zip(index, ranks):
                plans[l][name][h] = r
            return plans
        if config.ratio is not None and config.method != "svd" and config.method != "eigen":
            return _plan_kv_split(config, spectra)
        else:
            for sp in spectra:
                plan = {}
                for j, name in enumerate(("k", "v")):
                    if config.ratio is not None:
                        plan[name] = [max(1, round(config.ratio * lam.numel())) for lam in sp[name]]
                    elif config.hooi_ranks is not None:
                        total = sum(lam.numel() for lam in sp[name])
                        if config.hooi_ranks[j] > total:
                            raise ValueError(f"hooi_ranks[{j}]={config.hooi_ranks[j]} exceeds the {name.upper()} "
                                             f"width {total}; use a rank <= {total}")
                        plan[name] = _split_rank(config.hooi_ranks[j], [lam.numel() for lam in sp[name]])
                    else:  # at least the energy asked for: round up
                        eps = config.mps_eps if config.mps_eps is not None else 1.0 - config.error_budget
                        plan[name] = [aligned_rank(ranks_by_energy(lam, eps), multiple, lam.numel(), up=True)
                                      for lam in sp[name]]
                plans.append(plan)
        return plans

    # weights mode
    if config.method == "svd":
        for s in summaries:
            sp = s.projection_spectra
            d = s.shape.hidden_size
            if config.ratio is not None:  # SVD-LLM's uniform rule: rank r costs r (d + out) numbers
                ranks = [max(1, math.floor(config.ratio * d * out / (out + d)))
                         for out in (s.shape.q_width, s.shape.kv_width, s.shape.kv_width)]
            elif config.hooi_ranks is not None:
                ranks = [min(config.hooi_ranks[0], lam.numel()) for lam in sp]
            else:
                eps = config.mps_eps if config.mps_eps is not None else 1.0 - config.error_budget
                ranks = [ranks_by_energy(lam, eps) for lam in sp]
            plans.append({"svd_ranks": ranks})
        return plans

    heads_out = [s.shape.q_width + 2 * s.shape.kv_width for s in summaries]
    spectra = [s.weight_spectrum for s in summaries]
    if config.hooi_ranks is not None:
        r = list(config.hooi_ranks)
        for s in summaries:
            shape = s.tensor_shape
            dims = shape if len(r) == 3 else (shape[0], shape[2])
            for value, dim in zip(r if len(r) > 1 else r[:1], dims):
                if value > dim:
                    raise ValueError(f"hooi_ranks={r} exceeds the tensor dims {shape} (input, heads, head_dim)")
        for _ in summaries:
            plan = {"r_in": r[0], "mps_eps": config.mps_eps}
            if len(r) == 2:
                plan["r_out"] = r[1]
            if len(r) == 3:
                plan["r_head"], plan["r_out"] = r[1], r[2]
            plans.append(plan)
        return plans
    if config.ratio is not None:
        costs = [s.shape.hidden_size + out for s, out in zip(summaries, heads_out)]
        dense = [s.shape.hidden_size * out for s, out in zip(summaries, heads_out)]
        if fisher and config.allocation == "greedy":
            gains = [s.input_costs for s in summaries]
            r_in = allocate_by_cost(gains, config.ratio * sum(dense), costs, multiple=multiple)
        elif config.allocation == "greedy":
            r_in = allocate_by_threshold(spectra, costs, config.ratio * sum(dense), multiple=multiple)
        else:
            r_in = [aligned_rank(math.floor(config.ratio * dn / c), multiple, lam.numel())
                    for dn, c, lam in zip(dense, costs, spectra)]
        return [{"r_in": min(r, lam.numel())} for r, lam in zip(r_in, spectra)]
    eps = config.mps_eps if config.mps_eps is not None else 1.0 - config.error_budget
    return [{"r_in": ranks_by_energy(lam, eps), "mps_eps": eps} for lam in spectra]


def _plan_kv_split(config: CompressionConfig, spectra: list[dict]) -> list[dict]:
    """Split the KV budget between K and V by ``k_share``, then across layers within each."""
    widths = {n: [sp[n][0].numel() for sp in spectra] for n in ("k", "v")}
    budget = config.ratio * (sum(widths["k"]) + sum(widths["v"]))
    v_budget = min((1 - config.k_share) * budget, sum(widths["v"]))
    k_budget = min(budget - v_budget, sum(widths["k"]))
    ranks, multiple = {}, _rank_multiple(config)
    for name, share in (("k", k_budget), ("v", v_budget)):
        if config.allocation == "greedy":
            ranks[name] = allocate_by_threshold([sp[name][0] for sp in spectra], [1] * len(spectra), share,
                                                multiple=multiple)
        else:
            ranks[name] = [aligned_rank(round(share * w / sum(widths[name])), multiple, w) for w in widths[name]]
    return [{"k": [rk], "v": [rv]} for rk, rv in zip(ranks["k"], ranks["v"])]


def _plan_kv_fisher(config: CompressionConfig, summaries: list[LayerSummary]) -> list[dict]:
    """Keep the K/V directions of all layers that cost the most loss (:func:`direction_costs`) within the budget.

    With ``q_ratio < 1`` Q's shared output basis is planned the same way, on its own budget of
    ``q_ratio`` of head_dim on average over the layers (SmolLM2-135M at kv 0.5, ``q_ratio=0.5``:
    ×1.304 of dense perplexity with the same rank in every layer, ×1.233 by cost).
    """
    gains, widths = [], 0
    for summary in summaries:
        for name in ("k", "v"):
            gains.append(summary.kv_gains[name])
            widths += summary.kv_gains[name].numel()
    ranks = allocate_by_cost(gains, config.ratio * widths, multiple=_rank_multiple(config))
    plans = [{"k": [rk], "v": [rv]} for rk, rv in zip(ranks[0::2], ranks[1::2])]
    if "q" in summaries[0].kv_gains:  # q_ratio < 1: Q's head_dim kept, on average over the layers
        q_gains = [summary.kv_gains["q"] for summary in summaries]
        q_budget = config.q_ratio * sum(g.numel() for g in q_gains)
        for plan, rq in zip(plans, allocate_by_cost(q_gains, q_budget, multiple=_rank_multiple(config))):
            plan["q"] = rq
    return plans


def _rank_multiple(config: CompressionConfig) -> int:
    """The step of the planned ranks: ``rank_multiple`` for the tucker family, 1 for the baselines' own rules."""
    return config.rank_multiple if config.method in FISHER_METHODS else 1


def _split_rank(total: int, widths: list[int]) -> list[int]:
    share = [max(1, round(total * w / sum(widths))) for w in widths]
    return share


def _uniform_threshold(spectra: list[torch.Tensor], budget: float) -> list[int]:
    """EigenAttention's rule: one energy threshold for all, found by bisection to fit ``budget``."""
    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        if sum(ranks_by_energy(lam, mid) for lam in spectra) > budget:
            hi = mid
        else:
            lo = mid
    return [ranks_by_energy(lam, lo) if lo > 0 else 1 for lam in spectra]


def _first_tokens(batches, max_tokens: int):
    """The leading calibration batches (rows cut at the end) holding at most ``max_tokens`` tokens, at least one row."""
    out, total = [], 0
    for ids, mask in batches:
        rows = min(ids.shape[0], max(0, (max_tokens - total) // ids.shape[1]))
        if rows == 0:
            break
        out.append((ids[:rows], mask[:rows]))
        total += rows * ids.shape[1]
    return out or [(batches[0][0][:1], batches[0][1][:1])]


def _compress_layers(model, arch, layers, batches, config, swapped, progress, fisher_tokens):
    dtype = next(model.parameters()).dtype

    # Pass 1: per-layer planning summaries from the dense model. With the Fisher metric, the loss
    # sensitivity comes first from one forward/backward pass over the first ``fisher_tokens``
    # calibration tokens, and the moments that go with it from the same tokens.
    fisher = energies = None
    if config.metric == "fisher":
        names = ("k", "v") if config.mode == "kv" and config.q_ratio == 1.0 else ("q", "k", "v")
        fisher_batches = _first_tokens(batches, fisher_tokens)
        # Each token's gradient energy (same pass) weights the moments of both passes (_token_weights):
        # kv mode's K/V output moments, weights mode's input moment.
        # Q's Fisher (and weights mode's K's and V's) is read per head only: its diagonal blocks suffice.
        head_blocks = tuple(n for n in names if n == "q" or config.mode == "weights")
        fisher, energies = loss_statistics(model, arch, fisher_batches, names, progress,
                                           key_norms=_normed_keys(arch, config),
                                           token_energies=("k", "v") if config.mode == "kv" else ("q", "k", "v"),
                                           head_blocks=head_blocks,
                                           head_dim=arch.shape(arch.attention_of(layers[0])).head_dim)
        pack_layers(fisher)  # kept as upper triangles until each layer is compressed: half the memory (symmetric)
        summaries = _planning_summaries(arch, layers, capture_layer_inputs(model, layers, fisher_batches),
                                        [mask for _, mask in fisher_batches], config, fisher, energies, progress)
        if summaries[0].bases is not None:
            costs = direction_costs(model, arch, fisher_batches, [s.bases for s in summaries], progress,
                                    key_norms=_normed_keys(arch, config))
            for summary, layer_costs in zip(summaries, costs):
                if config.mode == "kv":
                    summary.kv_gains = layer_costs
                else:
                    summary.input_costs = layer_costs["x"]
                summary.bases = None
    inputs = capture_layer_inputs(model, layers, batches)
    masks = [mask for _, mask in batches]
    if fisher is None:
        summaries = _planning_summaries(arch, layers, inputs, masks, config, None, None, progress)
    plans = _plan_ranks(config, summaries)

    # Pass 2: sequential compression, each layer calibrated on the compressed prefix's outputs.
    hidden = [h for h, _ in inputs]
    info = []
    rotary = arch.rotary_embedding(model)
    for index in tqdm(range(len(layers)), desc=f"tmps: compressing ({config.mode}, {config.method})",
                      disable=not progress):
        layer = layers[index]
        dense_attention = arch.attention_of(layer)
        moments = _moment_only(arch, index, layer, hidden, inputs, masks, _normed_keys(arch, config),
                               _token_weights(config, energies[index] if energies else None, masks))
        solver = _solver(arch, dense_attention, config, moments, fisher[index] if fisher else None)
        compressed = build_compressed_attention(arch, dense_attention, solver, plans[index], config, rotary, dtype)
        swapped.append((index, layer))
        arch.set_attention(layers, index, compressed)
        error = _run_and_measure(index, layers[index], compressed, dense_attention, hidden, inputs, masks)
        if not math.isfinite(error):
            raise FloatingPointError(f"layer {index}: the compressed attention produced NaN/Inf on the calibration "
                                     "data; try a larger ratio or damping")
        info.append(layer_info(compressed, arch.shape(dense_attention), error, plans[index]))
        del solver, moments
        if fisher:
            fisher[index] = None  # served: free it while later layers grow
        if energies:
            energies[index] = None
    return info


def _moment_only(arch, index, layer, hidden, inputs, masks, normed_keys: bool = False, weights=None
                 ) -> _LayerMoments:
    """The moments of :func:`_run_with_moment` without running the layer past its attention's input."""
    moments = _LayerMoments(arch, arch.attention_of(layer), masks, normed_keys, weights)

    def hook(module, args, kwargs):
        raise _Captured(args[0] if args else kwargs["hidden_states"])

    for i, (_, kwargs) in enumerate(inputs):
        handle = moments.attention.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            run_layer(layer, hidden[i], kwargs[index])
        except _Captured as cap:
            moments.add(i, cap.x)
        finally:
            handle.remove()
    return moments.means()


class _Captured(Exception):
    def __init__(self, x):
        self.x = x


def _run_and_measure(index, layer, compressed, dense_attention, hidden, inputs, masks) -> float:
    """Run the (compressed) layer over every batch and return the relative attention output error."""
    sums = {"err": 0.0, "ref": 0.0}

    def hook(batch, args, kwargs, output):
        ref = dense_attention(*args, **kwargs)[0]
        mask = masks[batch].unsqueeze(-1).to(ref.dtype)
        sums["err"] += float((((output[0] - ref) * mask).double() ** 2).sum())
        sums["ref"] += float(((ref * mask).double() ** 2).sum())

    _run_over_batches(index, layer, hidden, inputs, masks, compressed, hook, after=True)
    return math.sqrt(sums["err"] / max(sums["ref"], 1e-300))


def build_compressed_attention(arch, dense_attention, solver: LayerSolver, plan: dict, config, rotary, dtype):
    """The compressed attention for one block, its factors cast to the model's dtype and device."""
    if config.mode == "kv":
        q_rank = plan.get("q", max(1, round(config.q_ratio * solver.shape.head_dim)))
        qkv, k_up, v_up, k_down = solver.build_kv(plan, q_rank)
    else:
        qkv = solver.build_weights(plan.get("r_in"), plan.get("r_head"), plan.get("r_out"), plan.get("mps_eps"),
                                   plan.get("svd_ranks"))
        k_up = v_up = k_down = None
    return assemble_attention(arch, dense_attention, config.mode, qkv, k_up, v_up, rotary, dtype, k_down)


def assemble_attention(arch, dense_attention, mode, qkv, k_up, v_up, rotary, dtype, k_down=None):
    """Wrap factors into ``arch.compressed_attention_class`` sharing the dense block's attributes and its
    children other than the Q/K/V projections (o_proj; Qwen3's and Gemma 3's q_norm and k_norm).
    ``k_down: (r_k, d_kv)``, kv mode on those two only: the key basis applied after the key norm."""
    device = arch.projections(dense_attention)[3].weight.device
    # the factors are parameters, trainable where the dense projections were (a frozen model stays frozen)
    trainable = any(arch.projection_output(dense_attention, name)[0].weight.requires_grad for name in "qkv")
    module = new_like(arch.compressed_attention_class, dense_attention)
    module.mode = mode
    for name, child in dense_attention.named_children():
        if name not in (arch.q_name, arch.k_name, arch.v_name):
            module.add_module(name, child)
    module.add_module("qkv", qkv.to(device=device, dtype=dtype).requires_grad_(trainable))
    for name, basis in (("k_up", k_up), ("v_up", v_up), ("k_down", k_down)):
        module.register_parameter(name, None if basis is None else
                                  nn.Parameter(basis.to(device=device, dtype=dtype), requires_grad=trainable))
    if rotary is not None:
        detach_rotary(module, rotary)
    return module


def layer_info(attention, shape: AttentionShape, error: float, plan: dict) -> dict:
    """What ``tmps.report`` shows for one layer."""
    qkv = attention.qkv
    params = qkv.num_parameters()
    if attention.k_up is not None:
        params += attention.k_up.numel() + attention.v_up.numel()
    if attention.k_down is not None:
        params += attention.k_down.numel()
    bias = 1 if qkv.bias_0 is not None else 0
    dense = (shape.q_width + 2 * shape.kv_width) * (shape.hidden_size + bias)
    if attention.mode == "kv":
        kv_kept = (attention.k_up.shape[1] + attention.v_up.shape[1]) / (2 * shape.kv_width)
        ranks = {"k": attention.k_up.shape[1], "v": attention.v_up.shape[1]}
        if qkv.group(0)[1] is not None:
            ranks["q"] = qkv.group(0)[0].shape[1]
    else:
        kv_kept = 1.0
        ranks = {"r_in": qkv.in_factor.shape[1]} if qkv.in_factor is not None else \
            {"q/k/v": [qkv.group(g)[0].shape[1] for g in range(3)]}
    flops = qkv.flops_per_token()
    return {"ranks": ranks, "qkv_parameters": params, "dense_qkv_parameters": dense,
            "kv_cache_kept": kv_kept, "calibration_error": error, "qkv_flops_per_token": flops,
            "dense_qkv_flops_per_token": 2 * (shape.q_width + 2 * shape.kv_width) * shape.hidden_size}
