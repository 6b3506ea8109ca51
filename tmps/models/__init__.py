"""Per-architecture adapters and the compressed attention modules."""
from .base import architecture_of, supported_model_types
from .llama import LlamaTuckerMPSAttention
from .opt import OPTTuckerMPSAttention, OPTTuckerMPSDecoderLayer

__all__ = ["architecture_of", "supported_model_types", "OPTTuckerMPSAttention", "OPTTuckerMPSDecoderLayer",
           "LlamaTuckerMPSAttention"]
