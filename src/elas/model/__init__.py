"""Models: the LLaMA decoder (llama.py), FFNs (ffn.py), low-rank linears (lowrank.py), counting (stats.py)."""
from .ffn import ReLU2FFN, SwiGLU
from .llama import LLaMA, build_model
from .lowrank import LowRankLinear, make_linear

__all__ = ["LLaMA", "build_model", "ReLU2FFN", "SwiGLU", "LowRankLinear", "make_linear"]
