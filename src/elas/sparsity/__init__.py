"""The method: 2:4 activation sparsity (masks live in elas.kernels.reference, the numerical definition)."""
from .act24 import (Act24Config, collect_stats, relu2_stats, set_sparsity_step, set_track_stats, sparsify_,
                    token_permutation)
from .autograd import WgradSplit, relu2_sparse24, split_linear
from .packed_ffn import packed_ffn_core

__all__ = ["Act24Config", "sparsify_", "set_sparsity_step", "set_track_stats", "collect_stats", "relu2_stats",
           "token_permutation", "relu2_sparse24", "split_linear", "WgradSplit", "packed_ffn_core"]
