"""What the compressor needs to know about an architecture, and the registry from model type to it."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

from torch import nn


@dataclass
class AttentionShape:
    """Head layout of one attention block."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def q_width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass
class Architecture:
    """Per-architecture knowledge; one instance per supported ``model_type``."""

    model_type: str
    dense_attention_class: type
    compressed_attention_class: type
    q_name: str = "q_proj"
    k_name: str = "k_proj"
    v_name: str = "v_proj"
    o_name: str = "o_proj"
    uses_rope: bool = False
    aliases: tuple[str, ...] = field(default_factory=tuple)
    # Per-head q/k norms: whether the dense forward hands them (b, heads, s, head_dim) (Gemma 3) rather
    # than (b, s, heads, head_dim) (Qwen3). Their outputs are the same; hooks on them read the layout.
    head_norms_heads_first: bool = False

    def base_model(self, model: nn.Module) -> nn.Module:
        """The bare ``*Model`` inside a ``*ForCausalLM`` (or the model itself)."""
        return getattr(model, "model", model)

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        raise NotImplementedError

    def attention_of(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn

    def set_attention(self, layers: nn.ModuleList, index: int, attention: nn.Module) -> None:
        """Swap in a shallow copy of layer ``index`` whose ``self_attn`` is ``attention``.

        The dense layer object is left untouched (its own children, parameters and buffers), so
        putting it back into ``layers``, which is how :func:`tmps.compress` undoes a failed run,
        restores the model exactly. The copy shares the layer's other children and its hooks.
        """
        layer = copy.copy(layers[index])
        for table in ("_parameters", "_buffers", "_modules"):
            layer.__dict__[table] = dict(layer.__dict__[table])
        carry_dispatch_hook(layers[index], layer)
        layer.self_attn = attention
        layers[index] = layer

    def shape(self, attention: nn.Module) -> AttentionShape:
        cfg = attention.config
        heads = cfg.num_attention_heads
        return AttentionShape(
            hidden_size=cfg.hidden_size,
            num_heads=heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=attention.head_dim,
        )

    def projections(self, attention: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear]:
        """The dense Q, K, V and output projections (linear layers, or :class:`LinearRows` of a fused one)."""
        return tuple(getattr(attention, n) for n in (self.q_name, self.k_name, self.v_name, self.o_name))

    def projection_output(self, attention: nn.Module, name: str) -> tuple[nn.Module, slice | None]:
        """The module whose forward output holds projection ``name``'s ("q", "k", "v"), and its columns
        there (None: all of them): where the Fisher pass hooks the projection's outputs."""
        return getattr(attention, getattr(self, f"{name}_name")), None

    def layer_uses_rope(self, attention: nn.Module) -> bool:
        """Whether this layer rotates its queries and keys (SmolLM3 leaves every fourth layer without RoPE)."""
        return self.uses_rope

    def rotary_dim(self, attention: nn.Module) -> int:
        """Features of each head that RoPE rotates (head_dim; fewer under partial RoPE)."""
        return attention.head_dim

    def rotary_embedding(self, model: nn.Module):
        return getattr(self.base_model(model), "rotary_emb", None) if self.uses_rope else None

    def sliding_window(self, attention: nn.Module) -> int | None:
        """How many of the latest keys ``attention`` sees (HF's sliding-window attention), None for all of them."""
        return None


class LinearRows:
    """Output rows ``start:stop`` of a fused linear layer (Phi-3's ``qkv_proj``) seen as a linear layer
    of their own: ``weight (stop - start, in_features)`` and ``bias`` are views of the fused layer's,
    and calling it computes only those outputs. Not a module: nothing registers or saves it."""

    def __init__(self, linear: nn.Linear, start: int, stop: int):
        self.weight = linear.weight[start:stop]
        self.bias = None if linear.bias is None else linear.bias[start:stop]
        self.in_features, self.out_features = linear.in_features, stop - start

    def __call__(self, x):
        return nn.functional.linear(x, self.weight, self.bias)


REGISTRY: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    """Map ``arch``'s model types to it, and give its compressed attention class a handle on it
    (the forward asks it for the layer's sliding window)."""
    for name in (arch.model_type, *arch.aliases):
        REGISTRY[name] = arch
    arch.compressed_attention_class.architecture = arch
    return arch


def _registry() -> dict[str, Architecture]:
    """REGISTRY with every model file imported (each registers its architecture on import)."""
    from . import (gemma3, granite, llama, mistral, mixtral, opt, phi3, qwen2, qwen2_moe,  # noqa: F401
                   qwen3, qwen3_moe, smollm3)

    return REGISTRY


def supported_model_types() -> list[str]:
    return sorted(_registry())


def architecture_of(model: nn.Module) -> Architecture:
    """The registered architecture of ``model``, or a ValueError naming the supported ones."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in _registry():
        raise ValueError(
            f"unsupported model: {type(model).__name__} (model_type={model_type!r}); "
            f"tmps.compress supports model types {supported_model_types()} "
            "(their *ForCausalLM and bare *Model classes)"
        )
    return REGISTRY[model_type]


def new_like(cls: type, dense: nn.Module) -> nn.Module:
    """An instance of ``cls`` (a subclass of ``type(dense)``) sharing ``dense``'s attributes, without re-initialising."""
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    own = set(vars(module)) - {"training"}  # fresh parameter/buffer/hook dicts: never share them
    for key, value in vars(dense).items():
        if key not in own:
            module.__dict__[key] = value
    carry_dispatch_hook(dense, module)
    return module


# What accelerate's add_hook_to_module (device_map dispatch) sets on a module's instance: a forward
# bound to that module, the forward it wraps, and the hook.
_DISPATCH_ATTRIBUTES = ("forward", "_old_forward", "_hf_hook")


def carry_dispatch_hook(source: nn.Module, target: nn.Module) -> None:
    """Give ``target``, built from a copy of ``source``'s ``__dict__``, its own forward and ``source``'s hook.

    A model loaded with ``device_map`` has accelerate hooks on its blocks: ``forward`` in the
    instance ``__dict__`` is ``source``'s wrapped forward, bound to ``source``. Copied as it is, it
    would run the dense layer inside the compressed model (silently: the logits are dense's). So the
    copy drops it, and the same hook wraps ``target``'s own forward (moving inputs to the block's
    device and outputs back, as before). An instance ``forward`` without a hook is dropped too.
    """
    for key in _DISPATCH_ATTRIBUTES:
        target.__dict__.pop(key, None)
    hook = source.__dict__.get("_hf_hook")
    if hook is not None:
        from accelerate.hooks import add_hook_to_module  # present wherever a model carries its hooks

        add_hook_to_module(target, hook)


def offloaded_by_dispatch(model: nn.Module) -> str | None:
    """The name of a module whose weights accelerate offloads (``device_map`` with "cpu" / "disk"
    entries: loaded at each forward from elsewhere), or None."""
    for name, module in model.named_modules():
        hook = module.__dict__.get("_hf_hook")
        hooks = getattr(hook, "hooks", (hook,))  # a SequentialHook holds several
        if any(getattr(h, "offload", False) for h in hooks):
            return name or type(model).__name__
    return None


def detach_rotary(module: nn.Module, rotary) -> None:
    """Keep a handle on the model's rotary embedding without registering it as a submodule."""
    object.__setattr__(module, "_rotary_handle", (rotary,))
