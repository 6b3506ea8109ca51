"""Per-architecture adapters and the compressed attention modules."""
from .base import architecture_of, supported_model_types
from .gemma3 import Gemma3TuckerMPSAttention
from .granite import GraniteTuckerMPSAttention
from .llama import LlamaTuckerMPSAttention
from .mistral import MistralTuckerMPSAttention
from .mixtral import MixtralTuckerMPSAttention
from .opt import OPTTuckerMPSAttention, OPTTuckerMPSDecoderLayer
from .phi3 import Phi3TuckerMPSAttention
from .qwen2 import Qwen2TuckerMPSAttention
from .qwen2_moe import Qwen2MoeTuckerMPSAttention
from .qwen3 import Qwen3TuckerMPSAttention
from .qwen3_moe import Qwen3MoeTuckerMPSAttention
from .smollm3 import SmolLM3TuckerMPSAttention

__all__ = ["architecture_of", "supported_model_types", "OPTTuckerMPSAttention", "OPTTuckerMPSDecoderLayer",
           "LlamaTuckerMPSAttention", "MistralTuckerMPSAttention", "Qwen2TuckerMPSAttention",
           "Qwen3TuckerMPSAttention", "Gemma3TuckerMPSAttention", "Phi3TuckerMPSAttention",
           "SmolLM3TuckerMPSAttention", "GraniteTuckerMPSAttention", "MixtralTuckerMPSAttention",
           "Qwen2MoeTuckerMPSAttention", "Qwen3MoeTuckerMPSAttention"]
