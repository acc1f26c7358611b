"""Low-rank linear layers: W = A.B stored as two factors, never materialised in the forward pass.

Naming follows LORO: `weight_in` N [d_in, r] and `weight_out` M [d_out, r]; y = x @ N @ M^T, so W = M N^T
([d_out, d_in], the nn.Linear convention). Each factor is Xavier-normal initialised (LORO/ELAS `--loro_init
xavier`), which gives W entries of std ~ 2 sqrt(r) / (d + r).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class LowRankLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int, device=None, dtype=None):
        super().__init__()
        if not 0 < rank:
            raise ValueError(f"rank must be positive, got {rank}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        kw = {"device": device, "dtype": dtype}
        self.weight_in = nn.Parameter(torch.empty(in_features, rank, **kw))  # N: [d_in, r]
        self.weight_out = nn.Parameter(torch.empty(out_features, rank, **kw))  # M: [d_out, r]
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight_in.device.type == "meta":
            return
        nn.init.xavier_normal_(self.weight_in)
        nn.init.xavier_normal_(self.weight_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x @ self.weight_in, self.weight_out)  # [.., d_in] -> [.., r] -> [.., d_out]

    def merged_weight(self) -> torch.Tensor:
        """W = M N^T: [d_out, d_in]. For export and tests only (large)."""
        return self.weight_out @ self.weight_in.T

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def make_linear(in_features: int, out_features: int, rank: int, init_std: float) -> nn.Module:
    """nn.Linear (no bias, N(0, init_std)) when rank == 0 or rank makes no saving, else LowRankLinear."""
    if rank > 0 and rank * (in_features + out_features) < in_features * out_features:
        return LowRankLinear(in_features, out_features, rank)
    lin = nn.Linear(in_features, out_features, bias=False)
    if lin.weight.device.type != "meta":
        nn.init.normal_(lin.weight, std=init_std)
    return lin
