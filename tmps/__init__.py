"""tmps: calibrated Tucker / MPS compression of transformer attention, with fused Triton kernels.

    import tmps
    model = tmps.compress(model)                 # kv mode, tucker-mps, half the KV cache
    print(tmps.report(model))
    tmps.save(model, "out/"); model = tmps.load("out/")
"""
from .compressor import compress, is_compressed
from .config import CompressionConfig
from .io import load, save
from .paths import set_paths
from . import pretrained  # registers the from_pretrained loader of compressed checkpoints  # noqa: F401
from .report import report, summary
from .decompose import combined_mps_hooi_compression, hooi, tt_svd, tucker_mps

__version__ = "0.1.0"

__all__ = ["compress", "report", "summary", "save", "load", "is_compressed", "set_paths", "CompressionConfig", "hooi", "tt_svd", "tucker_mps",
           "combined_mps_hooi_compression", "__version__"]
