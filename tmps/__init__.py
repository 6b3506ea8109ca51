"""tmps: calibrated Tucker / MPS compression of transformer attention, with fused Triton kernels.

    import tmps
    model = tmps.compress(model)                 # kv mode, tucker-mps, half the KV cache
    print(tmps.report(model))
    tmps.save(model, "out/"); model = tmps.load("out/")
"""
from .compress import compress, is_compressed
from .config import CompressionConfig
from .decompose import combined_mps_hooi_compression, hooi, tt_svd, tucker_mps

__version__ = "0.1.0"

__all__ = ["compress", "is_compressed", "CompressionConfig", "hooi", "tt_svd", "tucker_mps",
           "combined_mps_hooi_compression", "__version__"]
