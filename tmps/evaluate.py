"""Language-model quality and speed: perplexity over token windows, prefill throughput.

Perplexity follows the standard fixed-window protocol: the evaluation text is cut into
non-overlapping windows of ``seq`` tokens (``tmps.assets.token_windows``), each window is scored
on its own with no context carried over, and

    ppl = exp( (1 / (n * (seq - 1))) * sum_{w, t >= 1} -log p(x[w, t] | x[w, :t]) ),

the mean negative log-likelihood over every predicted token (``seq - 1`` per window: the first
token of a window has no context and is not scored).
"""

from __future__ import annotations

import inspect
import math
import statistics
import time

import torch
import torch.nn.functional as F

try:
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover - tqdm is a dependency; keep evaluation usable without it
    tqdm = None


def validate_input_ids(input_ids) -> None:
    """Raise ``ValueError`` unless ``input_ids`` is an integer tensor ``(n, seq)``, n >= 1, seq >= 2."""
    if not isinstance(input_ids, torch.Tensor):
        raise ValueError(f"input_ids is a {type(input_ids).__name__}; expected a LongTensor (n, seq)")
    if input_ids.dim() != 2:
        raise ValueError(
            f"input_ids has shape {tuple(input_ids.shape)}; expected 2-D (n_windows, seq_len)"
        )
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids has dtype {input_ids.dtype}; expected an integer dtype (long)")
    n, seq = input_ids.shape
    if n < 1:
        raise ValueError(f"input_ids has shape {tuple(input_ids.shape)}; expected at least one window")
    if seq < 2:
        raise ValueError(
            f"input_ids has shape {tuple(input_ids.shape)}; expected seq_len >= 2 (one token of "
            f"context and one to predict)"
        )


def _validate_positive(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r}; expected a positive int")


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model with none)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _batches(n: int, batch_size: int, progress: bool, desc: str):
    starts = range(0, n, batch_size)
    if progress and tqdm is not None:
        return tqdm(starts, desc=desc, unit="batch", total=len(starts))
    return starts


def window_nll(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token negative log-likelihood of each window.

    Parameters
    ----------
    model : a causal LM whose forward takes ``input_ids`` and returns ``.logits`` ``(b, seq, vocab)``.
    input_ids : LongTensor ``(b, seq)`` on the model's device.

    Returns
    -------
    float64 tensor ``(b,)``: for window ``w``, ``sum_{t=1}^{seq-1} -log p(x[w, t] | x[w, :t])``.
    """
    logits = model(input_ids=input_ids, use_cache=False).logits
    # One row at a time: the fp32 log-softmax of a whole batch would double the logits' memory.
    return torch.stack([
        F.cross_entropy(logits[w, :-1].float(), input_ids[w, 1:], reduction="sum").double()
        for w in range(input_ids.shape[0])
    ])


@torch.no_grad()
def perplexity(model: torch.nn.Module, input_ids: torch.Tensor, batch_size: int = 8,
               progress: bool = True) -> float:
    """Perplexity of a causal LM over non-overlapping token windows.

    Parameters
    ----------
    model : a Hugging Face causal LM (anything whose forward takes ``input_ids`` and returns
        ``.logits``); run as is, on its own device, under ``torch.no_grad()``.
    input_ids : LongTensor ``(n_windows, seq_len)``, ``seq_len >= 2``; each row is scored
        independently (no context carried between windows).
    batch_size : windows per forward pass.
    progress : show a tqdm progress bar.

    Returns
    -------
    ``exp`` of the mean token NLL over all ``n_windows * (seq_len - 1)`` predicted tokens.
    """
    validate_input_ids(input_ids)
    _validate_positive("batch_size", batch_size)
    device = model_device(model)
    n, seq = input_ids.shape
    total = torch.zeros((), dtype=torch.float64)
    for start in _batches(n, batch_size, progress, "perplexity"):
        batch = input_ids[start:start + batch_size].to(device)
        total += window_nll(model, batch).sum().cpu()
    return math.exp(total.item() / (n * (seq - 1)))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prefill_kwargs(model: torch.nn.Module, logits_to_keep: int | None) -> dict:
    kwargs = {"use_cache": False}
    if logits_to_keep is not None and "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = logits_to_keep
    return kwargs


@torch.no_grad()
def tokens_per_second(model: torch.nn.Module, input_ids: torch.Tensor, batch_size: int | None = None,
                      n_repeats: int = 5, n_warmup: int = 1, logits_to_keep: int | None = 1) -> float:
    """Prefill throughput: tokens of ``input_ids`` processed per second, median over repeats.

    One measurement is a forward pass over every window of ``input_ids`` (in batches of
    ``batch_size``, all at once by default) with ``use_cache=False``; ``n_warmup`` untimed passes
    come first. As in generation's prefill, only the last ``logits_to_keep`` positions go through
    the LM head (when the model's forward accepts ``logits_to_keep``; None computes all logits).

    Parameters
    ----------
    model : a Hugging Face causal LM, on its own device.
    input_ids : LongTensor ``(n, seq)``.
    batch_size : windows per forward pass; None for all ``n`` in one pass.
    n_repeats : timed passes; the median is reported.
    n_warmup : untimed passes before timing.
    logits_to_keep : forwarded to the model if it accepts it.

    Returns
    -------
    ``n * seq / median_seconds``.
    """
    validate_input_ids(input_ids)
    n, seq = input_ids.shape
    batch_size = n if batch_size is None else batch_size
    _validate_positive("batch_size", batch_size)
    _validate_positive("n_repeats", n_repeats)
    if not isinstance(n_warmup, int) or n_warmup < 0:
        raise ValueError(f"n_warmup={n_warmup!r}; expected a non-negative int")
    device = model_device(model)
    input_ids = input_ids.to(device)
    kwargs = _prefill_kwargs(model, logits_to_keep)

    def one_pass() -> float:
        _sync(device)
        t0 = time.perf_counter()
        for start in range(0, n, batch_size):
            model(input_ids=input_ids[start:start + batch_size], **kwargs)
        _sync(device)
        return time.perf_counter() - t0

    for _ in range(n_warmup):
        one_pass()
    seconds = statistics.median(one_pass() for _ in range(n_repeats))
    return n * seq / seconds


def perplexity_of_text(model: torch.nn.Module, tokenizer, text: str, seq_len: int = 1024,
                       max_windows: int | None = None, batch_size: int = 8,
                       progress: bool = True) -> float:
    """Perplexity of ``text``: tokenized once (``tmps.assets.token_ids``), cut into windows of
    ``seq_len`` tokens, scored by ``perplexity``.

    Uses the first ``min(max_windows, windows that fit)`` windows (all that fit when ``max_windows``
    is None); the trailing partial window is dropped.
    """
    from tmps.assets import token_ids

    if max_windows is not None:
        _validate_positive("max_windows", max_windows)
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len={seq_len!r}; expected an int >= 2")
    ids = token_ids(tokenizer, text, max_tokens=None if max_windows is None else max_windows * seq_len)
    n_windows = len(ids) // seq_len if max_windows is None else min(len(ids) // seq_len, max_windows)
    if n_windows == 0:
        raise ValueError(f"text has {len(ids)} tokens; expected at least seq_len={seq_len}")
    windows = torch.tensor(ids[:n_windows * seq_len], dtype=torch.long).view(n_windows, seq_len)
    return perplexity(model, windows, batch_size=batch_size, progress=progress)
