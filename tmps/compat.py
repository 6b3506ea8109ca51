"""What differs between the transformers releases tmps supports (5.17, the GPU image's, to the newest).

transformers 5.24 renamed the forward's ``past_key_values`` argument to ``cache``; the old name still
works there with a FutureWarning and goes in 5.40, and 5.17 knows only the old name. A decode loop
that must run on both asks :func:`cache_keyword` which name to pass. (tmps's own attention modules
accept both.)

Continuous batching (``model.generate_batch``) keeps keys and values in a paged cache. transformers
5.17 hands it to the attention function as its ``cache`` keyword (the paged attention functions update
it themselves); 5.25 passes it as the layer's own cache, which the attention updates with the
batch's indices (``cache.update(k, v, layer, kwargs=kwargs)``). See :func:`attention_cache_keyword`
and :func:`is_paged_cache`.
"""
from __future__ import annotations

import functools
import inspect

from torch import nn


def cache_keyword(model: nn.Module) -> str:
    """The name under which ``model``'s forward takes the KV cache: ``"cache"`` from transformers 5.24,
    ``"past_key_values"`` before. Use as ``model(ids, **{cache_keyword(model): cache}, use_cache=True)``.

    A ``torch.compile`` wrapper is asked about the model it wraps (its own forward takes ``*args``).
    Ask once per model, not per step: it inspects the signature."""
    model = getattr(model, "_orig_mod", model)
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


@functools.cache
def attention_cache_keyword(attention_class: type) -> str:
    """The name under which HF's attention class ``attention_class`` takes the layer's KV cache:
    ``"cache"`` from transformers 5.24, ``"past_key_values"`` before (then a ``cache`` keyword is the
    paged attention functions', see the module docstring). Asked once per class."""
    return "cache" if "cache" in inspect.signature(attention_class.forward).parameters else "past_key_values"


@functools.cache
def _paged_cache_class() -> type | None:
    try:
        from transformers.generation.continuous_batching.cache import PagedAttentionCache
    except ImportError:  # pragma: no cover - a release without continuous batching
        return None
    return PagedAttentionCache


def is_paged_cache(cache) -> bool:
    """Whether ``cache`` is the paged KV cache of transformers' continuous batching (``generate_batch``)."""
    paged = _paged_cache_class()
    return paged is not None and isinstance(cache, paged)
