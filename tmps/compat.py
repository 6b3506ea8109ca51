"""What differs between the transformers releases tmps supports (5.17, the GPU image's, to the newest).

transformers 5.24 renamed the forward's ``past_key_values`` argument to ``cache``; the old name still
works there with a FutureWarning and goes in 5.40, and 5.17 knows only the old name. A decode loop
that must run on both asks :func:`cache_keyword` which name to pass. (tmps's own attention modules
accept both.)
"""
from __future__ import annotations

import inspect

from torch import nn


def cache_keyword(model: nn.Module) -> str:
    """The name under which ``model``'s forward takes the KV cache: ``"cache"`` from transformers 5.24,
    ``"past_key_values"`` before. Use as ``model(ids, **{cache_keyword(model): cache}, use_cache=True)``.

    A ``torch.compile`` wrapper is asked about the model it wraps (its own forward takes ``*args``).
    Ask once per model, not per step: it inspects the signature."""
    model = getattr(model, "_orig_mod", model)
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
