"""Hopper (sm_90) backend: the Triton sparsifier (sparsify.py) and the cuSPARSELt GEMM (gemm.py).

It exposes the full kernel interface of elas.kernels: the packed-format functions are accelerated; the
dense-mask functions (mask24, relu2_sparsify24, ...) are the reference code, which runs on the GPU as it is.
Import only where Triton and CUDA exist; `elas.kernels.get_backend` decides.
"""
from ..reference import (dense_feature_split, dense_features_from_counts, mask24, relu2_sparsify24, sparsify24,
                         wgrad_split_operand)
from .gemm import sparse_mm
from .sparsify import relu2_sparse24_backward, relu2_sparsify24_packed

__all__ = ["relu2_sparsify24_packed", "relu2_sparse24_backward", "sparse_mm", "mask24", "sparsify24", "relu2_sparsify24",
           "dense_feature_split", "dense_features_from_counts", "wgrad_split_operand"]
