"""Models: the LLaMA decoder (llama.py), FFNs (ffn.py), low-rank linears (lowrank.py). No method code lives here:
elas.build.build_model constructs a model and applies the configured methods from outside."""
from .ffn import DenseReLU2, FusedReLU2, ReLU2FFN, SwiGLU
from .llama import LLaMA
from .lowrank import LowRankLinear, make_linear

__all__ = ["LLaMA", "ReLU2FFN", "DenseReLU2", "FusedReLU2", "SwiGLU", "LowRankLinear", "make_linear"]
