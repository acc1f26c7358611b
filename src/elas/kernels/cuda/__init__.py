"""Hopper (sm_90) kernels: the Triton sparsifier and backward kernel (sparsify.py) and the cuSPARSELt GEMM
extension (gemm.py). Reached through the operators of elas.kernels.ops; import only where Triton exists."""
