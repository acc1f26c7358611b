"""Sparsity methods, applied to a built model from outside (api.py: the seam; one file per method).

    act24.py   2:4 activation sparsity of ReLU^2 FFNs (ELAS, Haziza et al.): masked (masked.py) and packed cores
    sste.py    2:4 weights by soft-thresholding, with a dense -> sparse -> dense schedule (Madhyastha et al.;
               emulated by default; sparse-tensor-core products opt-in)
    vnm.py     V:N:M activation sparsity of ReLU^2 FFNs (Madhyastha et al.): emulated, or in own mode through the
               neuron router (router.py) as grouped GEMMs over clusters (vnm_grouped.py)
"""
from .act24 import Act24Config, Act24Core, relu2_stats, token_permutation
from .api import (METHODS, Applied, SparsityMethod, applied_methods, collect_stats, describe, kernel_field_changes,
                  method_changes, method_from_dict, method_to_dict, non_causal, register_method, run_modes, set_step, sparsify_,
                  edit_in_place)
from .masked import masked_act24_ffn
from .sste import SSTE24Config, SSTELinear
from .vnm import VNMConfig, VNMCore

__all__ = ["SparsityMethod", "Applied", "register_method", "sparsify_", "set_step", "run_modes", "edit_in_place", "collect_stats",
           "describe", "applied_methods", "method_to_dict", "method_from_dict", "kernel_field_changes", "method_changes", "non_causal",
           "METHODS", "Act24Config", "Act24Core", "relu2_stats", "token_permutation", "masked_act24_ffn", "SSTE24Config", "SSTELinear", "VNMConfig", "VNMCore"]
