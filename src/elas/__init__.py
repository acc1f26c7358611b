"""elas: pre-training LLaMA-style models with low-rank weights and 2:4 activation sparsity."""
__version__ = "0.1.0"
