"""2:4 weight sparsity by soft-thresholding (S-STE; Madhyastha et al. part 1): config, handler, linear.

    sparsify_(model, SSTE24Config(dense_warmup_steps=1000, sparse_until=0.5))

replaces the two linears of every full-rank ReLU^2 FFN by `SSTELinear`s (same parameter, same state-dict key
`weight`, plus the frozen scale `beta`). Schedule: dense for `dense_warmup_steps`, then sparse until
`sparse_until` (a fraction of max_steps when a float in [0, 1], a step when an int), then dense to the end
(the paper: 1B 30k sparse + 30k dense). The dense phase starts from beta S_soft(W) (`dense_init=sparse`, the
default: W and its fp32 master are set to it at the switch, so the function trained in the sparse phase goes on;
edit_weights) or from the master W as trained (`dense_init=master`). In the sparse phase the forward uses

    S(W) = beta * S_soft(W),   S_soft = kernels.reference.soft_threshold24 along d_in (groups of 4 weights)

with beta = <W, S_soft(W)> / ||S_soft(W)||^2 per tensor, computed when the sparse phase first starts and then
frozen (recomputing it every step is documented to blow up); the gradient reaches the dense master weight
straight through (beta not applied in backward). The input gradient (`input_grad`) uses S(W) itself (`exact`,
the gradient of the sparse forward) or S(W^T), W^T thresholded along d_out (`transposed`, the paper's choice
as the notes read it, unconfirmed): only the latter is 2:4 along the reduction of dY S and can run on sparse tensor cores.

By default this path EMULATES 2:4 weights (masked dense GEMMs). `backend=cuda` (or `auto`), with
input_grad=transposed, runs both products as 2:4 GEMMs: S(W) and S(W^T) packed each step by
kernels/cuda/sste.py (bit-identical to its reference twin in Triton's interpreter), multiplied by the
cuSPARSELt operator, whose output is written column-major ([tokens, d_out], no transposing copy); the weight
gradient dY^T X stays dense. Measured at 1B (H200, docs/performance.md): the FFN 1.11x the dense ReLU^2 FFN, the
step 0.96x (before the column-major outputs); opt-in until a step measures faster than dense and a quality run
is in.

With 2:4 activations (`relu2-w24-a24`) the act24 core multiplies the weights itself. It reads effective_weight()
(the forward's S(W), dense), and from these linears `weight_pack()` and `input_grad_weight()`: with
backend=cuda its packed path runs the up-projection x S(W_up)^T and, with input_grad=transposed, the backward's
dy2 = dh2 S(W_down^T) as weight-sparse GEMMs (the paper's rule: where an activation can be sparse, the
activation wins; those two products have a dense activation); otherwise it multiplies dy2 by the same
S(W_down^T) as a dense matrix, as the masked path does.
The up-projection's input gradient there is dy1 S(W_up): the core multiplies the (2:4 in mask mode) dy1 itself.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels import backend_for, ops
from ..kernels import reference as ref
from ..kernels.packed import check_shape
from .api import Applied, SparsityMethod, check_sparse_until, register_method, relu2_ffns, sparse_end, whole

log = logging.getLogger("elas.sparsity")


@dataclass
class SSTE24Config(SparsityMethod):
    name: ClassVar[str] = "sste24"
    version: ClassVar[int] = 2  # 2: dense_init's default became sparse (configs of version 1 meant master)
    stat_names: ClassVar[tuple[str, ...]] = ("flip_rate",)
    kernel_fields: ClassVar[tuple[str, ...]] = ("backend",)

    dense_warmup_steps: int = 1000  # dense before this step
    sparse_until: float | int = 0.5  # end of the sparse phase: fraction of max_steps (float) or a step (int)
    # the input gradient dX = dY S: exact (S(W) itself, dense) | transposed (S(W^T) thresholded along d_out: 2:4
    # along the reduction of dY S, so it can run on sparse tensor cores; the paper's choice per the notes)
    input_grad: str = "exact"
    # reference (masked dense, emulated) | auto | cuda: both products on sparse tensor cores (S(W), S(W^T) packed
    # each step by kernels/cuda/sste.py; needs input_grad=transposed; not yet validated on a GPU, so opt-in)
    backend: str = "reference"
    # what the dense phase after the sparse one starts from: sparse (W <- beta S_soft(W) at the switch, masters
    # included: the function the sparse phase trained goes on) | master (W as trained, which brings back the
    # pruned half and the threshold's shift at once: a 60M run's training loss jumped 1.90 -> 2.07 at that switch,
    # and on two tiny seeds the loss ratio to dense ReLU^2 ended at 1.0114 against sparse's 1.0023, docs/results.md)
    dense_init: str = "sparse"

    @classmethod
    def upgrade(cls, fields: dict, version: int) -> dict:
        return {"dense_init": "master", **fields} if version < 2 else fields

    def __post_init__(self) -> None:
        self._check_types()
        if self.dense_init not in ("master", "sparse"):
            raise ValueError(f"invalid sste24.dense_init {self.dense_init!r}: expected master (the dense phase "
                             f"starts from W) or sparse (from beta S(W), the sparse phase's function)")
        if self.input_grad not in ("exact", "transposed"):
            raise ValueError(f"invalid sste24.input_grad {self.input_grad!r}: expected exact or transposed")
        from ..kernels import BACKENDS
        if self.backend not in BACKENDS:
            raise ValueError(f"invalid sste24.backend {self.backend!r}: expected one of {', '.join(BACKENDS)}")
        if self.backend != "reference" and self.input_grad != "transposed":
            raise ValueError(f"sste24.backend={self.backend} runs the input gradient on sparse tensor cores, which "
                             f"needs sste24.input_grad=transposed")
        if self.dense_warmup_steps < 0:
            raise ValueError(f"invalid sste24.dense_warmup_steps {self.dense_warmup_steps}: expected >= 0")
        check_sparse_until(self.name, self.sparse_until)

    def mode_at(self, step: int, max_steps: int) -> str:
        if step < self.dense_warmup_steps:
            return "dense"
        return "sparse" if step < sparse_end(self.sparse_until, max_steps) else "dense-final"

    def operands(self) -> tuple[str, ...]:
        return ("up.weight", "down.weight")


class _SoftThreshold24(torch.autograd.Function):
    """S(W) forward, identity backward (straight-through to the dense master weight)."""

    @staticmethod
    def forward(ctx, w, beta):
        # in float32, one rounding to w's dtype: the values the packing kernel (ops.sste_pack24) writes; one
        # Triton pass on CUDA (the torch formula's ~20 launches took ~1.9 ms per 1B FFN weight in a graph replay)
        return ops.sste_dense24(w, beta)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _SSTELinearFn(torch.autograd.Function):
    """y = x S(W)^T whose input gradient goes through S(W^T) (thresholded along d_out) and whose weight gradient
    dY^T x goes straight through to the dense master W. packed: both products are 2:4 GEMMs (S(W) and S(W^T)
    packed by ops.sste_pack24, multiplied by ops.sparse_mm, bf16); otherwise the same math on dense matrices.
    x [.., d_in], w [d_out, d_in] fp32 master, beta []."""

    @staticmethod
    def forward(ctx, x, w, beta, packed: bool):
        x2 = x.reshape(-1, x.shape[-1])  # [T, d_in]
        if packed:
            x2 = x2.to(torch.bfloat16)
            # (S(W) [d_out, d_in] @ x^T)^T, written column-major by the GEMM: [T, d_out] contiguous (a transposed
            # view here cost the 1B step ~8 ms of transposing copies in the kernels around it)
            y = ops.sparse_mm(ops.sste_pack24(w, beta), x2.t(), out_t=True)
        else:
            y = x2 @ (beta * ref.soft_threshold24(w.float())[0]).to(x2.dtype).t()
        ctx.save_for_backward(x2, w, beta)
        ctx.packed, ctx.x_dtype = packed, x.dtype
        return y.reshape(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, gy):
        x2, w, beta = ctx.saved_tensors
        g2 = gy.reshape(-1, gy.shape[-1])  # [T, d_out]
        if ctx.packed:  # (S(W^T) [d_in, d_out] @ dY^T)^T: [T, d_in]
            dx = ops.sparse_mm(ops.sste_pack24(w, beta, transpose=True), g2.to(torch.bfloat16).t(), out_t=True)
        else:  # S(W^T) dense: one Triton pass on CUDA (the torch formula's ~1.9 ms per 1B weight), the formula on CPU
            dx = g2 @ ops.sste_dense24(w.float().t().contiguous(), beta).t().to(g2.dtype)
        dw = (g2.t().to(x2.dtype) @ x2).to(w.dtype)  # [d_out, d_in], straight through to the master
        return dx.to(ctx.x_dtype).reshape(*gy.shape[:-1], x2.shape[-1]), dw, None, None


class SSTELinear(nn.Linear):
    """A bias-free linear whose forward uses S(W) in the sparse phase (see module docs). `weight` stays the
    dense master; `beta` [] fp32 is 0 until the sparse phase first starts, then frozen (saved in checkpoints, so
    a resumed run keeps it)."""

    def __init__(self, lin: nn.Linear, transposed_grad: bool = False, packed: bool = False,
                 dense_from_sparse: bool = False):
        super().__init__(lin.in_features, lin.out_features, bias=False, device="meta")
        self.weight = lin.weight
        self.register_buffer("beta", torch.zeros((), device=lin.weight.device))
        # 1 once W was set to beta S(W) at the switch to the dense phase (dense_init=sparse): checkpointed, so a
        # run resumed after the switch does not threshold again, and one resumed right at it still does
        self.register_buffer("baked", torch.zeros((), device=lin.weight.device))
        self.transposed_grad, self.packed = transposed_grad, packed  # input_grad=transposed; backend resolved cuda
        self.dense_from_sparse = dense_from_sparse
        self._bake_due = False
        self.active = False
        self.stats_sink: list | None = None
        self._last_mask: torch.Tensor | None = None  # of the previous statistics probe (for the flip rate)

    def init_buffers(self) -> None:
        """After a meta-device build (LLaMA.init_weights): beta is 0 until the sparse phase starts."""
        self.beta.zero_()
        self.baked.zero_()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints written before `baked` existed never baked: load them as such
        state_dict.setdefault(prefix + "baked", torch.zeros((), device=self.baked.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def set_mode(self, mode: str) -> None:
        self.active = mode == "sparse"
        # the dense phase after a sparse one (beta set), not yet thresholded into W: edit_weights does it
        self._bake_due = (self.dense_from_sparse and mode == "dense-final" and float(self.beta) != 0.0
                          and not bool(self.baked))
        if self.active and float(self.beta) == 0.0:  # first sparse step of the run (a resumed run loads beta)
            with torch.no_grad():
                w = whole(self.weight).float()  # [d_out, d_in]: FSDP2's shards gathered (beta is one scale)
                s = ref.soft_threshold24(w)[0]
                self.beta.fill_((w * s).sum() / (s * s).sum().clamp(min=1e-30))

    def edit_weights(self, edit) -> None:
        """At the switch to the dense phase with dense_init=sparse: W <- beta S_soft(W), through `edit(param, fn)`
        (sparsity.api.set_step), which applies fn to the weight's fp32 master too. fn works row by row (groups of
        4 along d_in), so FSDP2's row shards can apply it to their rows alone."""
        if not self._bake_due:
            return
        beta = self.beta
        edit(self.weight, lambda w: (beta * ref.soft_threshold24(w.float())[0]).to(w.dtype))
        self.baked.fill_(1.0)
        self._bake_due = False

    def effective_weight(self) -> torch.Tensor:
        """The weight the forward uses: S(W) in the sparse phase, W otherwise (read by FFN cores too)."""
        if not self.active:
            return self.weight
        # whole outside FSDP2's forward too (the router clusters S(W_up) when its period starts)
        return _SoftThreshold24.apply(whole(self.weight), self.beta)

    def weight_pack(self, transpose: bool = False):
        """For an FFN core that multiplies by this weight itself (act24's packed core): S(W) [d_out, d_in] packed
        2:4 along d_in (the forward), or (transpose) S(W^T) [d_in, d_out] packed along d_out (the input gradient
        of input_grad=transposed), to run those products on sparse tensor cores; None where this linear does
        not run on them (the emulated backend, dense phases; transpose with input_grad=exact)."""
        if not (self.active and self.packed) or (transpose and not self.transposed_grad):
            return None
        # a constant of the step: the core's weight gradient reaches W through effective_weight()
        return ops.sste_pack24(self.weight.detach(), self.beta, transpose=transpose)

    def input_grad_weight(self) -> torch.Tensor | None:
        """The matrix [d_out, d_in] the input gradient multiplies by where it is not effective_weight(): S(W^T)^T
        (input_grad=transposed, sparse phase), a constant of the step (the weight gradient goes straight through
        effective_weight()); else None."""
        if not (self.active and self.transposed_grad):
            return None
        with torch.no_grad():  # as the emulated backward computes it (_SSTELinearFn)
            return ops.sste_dense24(self.weight.float().t().contiguous(), self.beta).t().to(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stats_sink is not None:
            self._record_flips()
        if self.active and self.transposed_grad:
            return _SSTELinearFn.apply(x, self.weight, self.beta, self.packed)
        return F.linear(x, self.effective_weight())

    @torch.no_grad()
    def _record_flips(self) -> None:
        """flip_rate: the fraction of the 2:4 mask's entries that changed since the previous probe (a log step)."""
        mask = ref.soft_threshold24(self.weight)[1]
        prev, self._last_mask = self._last_mask, mask
        if prev is None:  # the first probe of this process (a run's first, or the first after a resume: the
            return        # previous mask is not checkpointed): no rate yet, rather than a false 0
        # on the weight's device: collect_stats stacks every method's statistics into one tensor (one host sync)
        self.stats_sink.append({"flip_rate": (mask != prev).float().mean()})

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, S-STE 2:4 weights, active={self.active}"


@register_method(SSTE24Config)
def _apply_sste24(model: nn.Module, cfg: SSTE24Config, filter_fn) -> Applied:
    ffns = relu2_ffns(model, filter_fn, "sste24 (2:4 weights)")
    for n, f in ffns:
        for part in ("up", "down"):
            lin = getattr(f, part)
            if isinstance(lin, SSTELinear):
                raise ValueError(f"sste24 is already applied to {n}.{part}: both would make operand "
                                 f"'{part}.weight' sparse")
            if type(lin) is not nn.Linear or lin.bias is not None:
                raise TypeError(f"sste24: {n}.{part} is a {type(lin).__name__}; S-STE 2:4 weights apply to "
                                f"bias-free full-rank nn.Linear (the paper's setting), not to low-rank factors")
            if lin.in_features % 4:
                raise ValueError(f"sste24: {n}.{part} has {lin.in_features} inputs, not a multiple of 4")
    packed = backend_for(next(model.parameters()).device, cfg.backend) == "cuda"
    if packed:
        for n, f in ffns:
            for part in ("up", "down"):
                check_shape(*getattr(f, part).weight.shape)  # S(W) and S(W^T) in the SM90 layout
    targets, old = [], []
    for n, f in ffns:
        for part in ("up", "down"):
            lin = getattr(f, part)
            new = SSTELinear(lin, cfg.input_grad == "transposed", packed, cfg.dense_init == "sparse")
            old.append((f, part, lin))
            setattr(f, part, new)
            targets.append((f"{n}.{part}", new))

    def detach() -> None:
        for f, part, lin in old:
            setattr(f, part, lin)

    desc = (f"2:4 weights by soft-thresholding (S-STE) on {len(ffns)} FFNs: dense for {cfg.dense_warmup_steps} "
            f"steps, sparse until {cfg.sparse_until!r} (of max_steps when a fraction), then dense from "
            f"{'beta S(W)' if cfg.dense_init == 'sparse' else 'W'}; input gradient "
            f"{cfg.input_grad}; " + ("2:4 GEMMs on sparse tensor cores" if packed
                                     else "emulated (masked dense GEMMs, not accelerated)"))
    claims = {(n, op) for n, _ in ffns for op in cfg.operands()}
    return Applied(cfg, targets, claims, detach, desc)


__all__ = ["SSTE24Config", "SSTELinear"]
