"""Tensor decompositions in pure torch: HOOI (Tucker), TT-SVD (MPS), Tucker-MPS, activation-aware low rank.

Every routine takes and returns torch tensors on any device and float dtype, is deterministic
(fixed sign convention), and raises ``ValueError`` on bad input.
"""
from .tt import TTTensor, energy_rank, tt_error_bound, tt_svd, tt_to_tensor
from .tucker import TuckerTensor, hooi, tucker_to_tensor
from .tucker_mps import (
    TuckerMPS,
    combined_mps_hooi_compression,
    compression_ratio,
    default_tensor_shape,
    tucker_mps,
    tucker_mps_tensor,
)
from .weighted import InputMetric, input_metric, relative_output_error, weighted_svd

__all__ = [
    "TTTensor", "tt_svd", "tt_to_tensor", "energy_rank", "tt_error_bound",
    "TuckerTensor", "hooi", "tucker_to_tensor",
    "TuckerMPS", "tucker_mps", "tucker_mps_tensor", "combined_mps_hooi_compression",
    "default_tensor_shape", "compression_ratio",
    "InputMetric", "input_metric", "weighted_svd", "relative_output_error",
]
