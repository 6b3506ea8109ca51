"""Hugging Face's ``save_pretrained`` / ``from_pretrained`` for compressed models.

``tmps.compress`` records the compression in ``model.config.quantization_config`` (``quant_method:
"tmps"``: the mode, the per-layer report and the factors' shapes), so ``model.save_pretrained(folder)``
writes a checkpoint that describes itself, and after ``import tmps``,
``AutoModelForCausalLM.from_pretrained(folder)`` rebuilds the compressed attention through the
quantizer registered here before the factors load: the same logits, with ``push_to_hub``, sharding,
``device_map`` and ``dtype`` handled by transformers. Without ``import tmps`` transformers only warns
("Unknown quantization type, got tmps") and loads a dense model whose Q/K/V weights are missing
(randomly initialised, listed as MISSING in its load report), as it did for every such folder
before the compression was recorded: import tmps first.

transformers calls this mechanism quantization; nothing here quantizes: the factors keep the dtype
they were saved in (or the ``dtype`` asked of ``from_pretrained``).
"""
from __future__ import annotations

from transformers.quantizers.auto import register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

QUANT_METHOD = "tmps"


@register_quantization_config(QUANT_METHOD)
class TmpsCompressionConfig(QuantizationConfigMixin):
    """What a saved checkpoint needs to rebuild its compressed attention.

    compression: :meth:`tmps.CompressionConfig.to_dict`; layers: the per-layer report
    (``model.tmps_info["layers"]``); structure: per layer, the mode and the shapes of the factors
    (:func:`tmps.io.structure_of`)."""

    def __init__(self, compression: dict | None = None, layers: list | None = None, structure: list | None = None,
                 **kwargs):
        self.quant_method = QUANT_METHOD
        self.compression, self.layers, self.structure = compression, layers, structure

    def post_init(self):
        if not isinstance(self.structure, list) or not self.structure:
            raise ValueError("a tmps quantization_config needs the compressed layers' structure; the checkpoint's "
                             "config.json is not one tmps wrote")


@register_quantizer(QUANT_METHOD)
class TmpsCompressedLoader(HfQuantizer):
    """Rebuilds the compressed attention of a checkpoint written by ``save_pretrained`` on the dense
    skeleton transformers builds, before it loads the tensors into it."""

    requires_calibration = True  # from_pretrained cannot compress on the fly: that is tmps.compress

    def validate_environment(self, *args, **kwargs):
        self.quantization_config.post_init()

    def _process_model_before_weight_loading(self, model, **kwargs):
        from .io import build_compressed_skeleton
        from .models.base import architecture_of

        arch = architecture_of(model)
        first = arch.attention_of(arch.decoder_layers(model)[0])
        dtype = arch.projections(first)[3].weight.dtype  # o_proj: the dtype asked of loading
        build_compressed_skeleton(model, self.quantization_config.structure, dtype, "the checkpoint's config.json")

    def _process_model_after_weight_loading(self, model, **kwargs):
        model.tmps_info = {"config": self.quantization_config.compression, "layers": self.quantization_config.layers}
        # the factors are ordinary floating-point parameters: let .half() / .float() cast them and the
        # Trainer fine-tune them, which transformers refuses for a model it marks quantized
        model.is_quantized = False
        return model

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True


def record_compression(model) -> None:
    """Set ``model.config.quantization_config`` from ``model.tmps_info`` (after :func:`tmps.compress`)."""
    from .io import structure_of

    model.config.quantization_config = TmpsCompressionConfig(
        compression=model.tmps_info["config"], layers=model.tmps_info["layers"], structure=structure_of(model))
    loader = getattr(model, "hf_quantizer", None)
    if loader is not None and getattr(loader.quantization_config, "quant_method", None) == "gguf":
        # transformers dequantized the GGUF file's weights on load and keeps its loader, which refuses
        # save_pretrained (and .half()); the compressed model holds floating-point tensors only
        model.hf_quantizer, model.is_quantized = None, False
