"""2:4 activation sparsity on ReLU^2 FFNs (ELAS; Haziza et al.): config, handler, core, statistics.

    sparsify_(model, Act24Config(grad_mode="ste", dense_warmup_steps=1000))

replaces the core of every ReLU^2 FFN (`ReLU2FFN.core`) by an `Act24Core`. In mode "dense" (the warm-up) the
core computes the dense ReLU^2 FFN; in mode "sparse" y2 = relu(y1)^2 is made 2:4 along d_ff per token (the 2
largest magnitudes of every 4 features kept) on one of two paths, chosen when the method is applied:
- packed (Hopper): the operator elas::act24_ffn (kernels/ops.py): Triton sparsifier into cuSPARSELt's SM90
  layout and 2:4 GEMMs on sparse tensor cores, forward and backward;
- masked (elsewhere): sparsity/masked.py, masked dense GEMMs (emulated).
Options: the gradient through the mask (`ste`: ELAS's straight-through; `mask`: Haziza's, dy1 2:4 too), a fixed
token permutation around the FFN, Haziza's 95/5 weight-gradient split (`wgrad_dense_frac`), and (packed path)
the 2:4 pointwise work fused into the d_ff-wide GEMMs' epilogues (`fused`: Triton GEMMs; `cutlass`: CUTLASS GEMMs
where they time faster).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from .. import kernels
from ..config import ACT24_GRAD_MODES
from ..kernels import ops as kernel_ops
from ..kernels import reference as ref
from ..model.ffn import DenseReLU2, FusedReLU2, ReLU2FFN, ffn_operands, relu2
from ..model.lowrank import LowRankLinear
from .api import Applied, SparsityMethod, register_method, relu2_ffns
from .masked import masked_act24_ffn

log = logging.getLogger("elas.sparsity")
_warned: set[str] = set()

GRAD_MODES = ACT24_GRAD_MODES
PATHS = ("auto", "masked", "packed")
PERM_TABLE = 4096  # longest sequence the token permutation covers (positions are permuted within a sequence)


@dataclass
class Act24Config(SparsityMethod):
    name: ClassVar[str] = "act24"
    version: ClassVar[int] = 2  # 2: cutlass's default became auto (a version-1 config without the key ran false)
    stat_names: ClassVar[tuple[str, ...]] = ("y2_zero_frac", "dropped_nnz_frac")
    kernel_fields: ClassVar[tuple[str, ...]] = ("backend", "path", "fused", "cutlass")

    grad_mode: str = "ste"  # ste (ELAS) | mask (Haziza)
    dense_warmup_steps: int = 1000  # dense before this step (both papers: 1000)
    permute_tokens: bool = False  # fixed permutation of sequence positions around the FFN (Haziza)
    wgrad_dense_frac: float | None = None  # 0.05 = Haziza's 95/5 split; None = exact dense weight gradients
    backend: str = "auto"  # kernel backend: auto | reference | cuda (elas.kernels.resolve_backend)
    path: str = "auto"  # auto: packed where the backend is cuda, masked otherwise | masked | packed
    # packed path: the d_ff-wide GEMMs with their 2:4 pointwise work in the epilogue (kernels/cuda/epilogue.py):
    # up-projection + sparsifier, and (ste without the split) dy2 GEMM + backward pointwise; off until
    # `elas bench epilogue` has measured them faster than cuBLAS + the separate kernels
    fused: bool = False
    # packed path without the split: the up-projection with the sparsifier, and the backward's dy2 GEMM with its
    # pointwise work, as CUTLASS GEMMs with that work in their epilogues, each where it times faster at the shape
    # than cuBLAS + the separate Triton kernels (kernels/cuda/cutlass_relu2.py; needs the CUTLASS library, built
    # off the GPU machine). In mask mode it saves y2s dense for the backward (as the dense twin saves y2) instead
    # of the packed buffer and mask bits: the speed of two fused GEMMs for the FFN activation memory of the twin.
    # auto (resolve_cutlass): true in ste mode (no split, not fused) on the accelerated path where the library
    # runs, as model.relu2_kernel=auto gives the dense twin its CUTLASS GEMMs; false otherwise (mask mode: the
    # memory trade above is the user's to make)
    cutlass: bool | str = "auto"

    @classmethod
    def upgrade(cls, fields: dict, version: int) -> dict:
        return {"cutlass": False, **fields} if version < 2 else fields

    def __post_init__(self) -> None:
        self._check_types()
        if self.grad_mode not in GRAD_MODES:
            raise ValueError(f"invalid act24.grad_mode {self.grad_mode!r}: expected one of {', '.join(GRAD_MODES)}")
        if self.dense_warmup_steps < 0:
            raise ValueError(f"invalid act24.dense_warmup_steps {self.dense_warmup_steps}: expected >= 0")
        if self.wgrad_dense_frac is not None and (isinstance(self.wgrad_dense_frac, bool) or not isinstance(
                self.wgrad_dense_frac, (int, float)) or not 0.0 <= self.wgrad_dense_frac <= 1.0):
            raise ValueError(f"invalid act24.wgrad_dense_frac {self.wgrad_dense_frac!r}: expected a fraction in "
                             f"[0, 1] or none")
        if self.path not in PATHS:
            raise ValueError(f"invalid act24.path {self.path!r}: expected one of {', '.join(PATHS)}")
        c = self.cutlass.strip().lower() if isinstance(self.cutlass, str) else self.cutlass
        if type(c) is int and c in (0, 1):  # (`--set ...=1` on a preset without the key parses as an int)
            c = bool(c)
        if c in ("true", "1", "yes", "on") or c in ("false", "0", "no", "off"):
            c = c in ("true", "1", "yes", "on")
        if c != "auto" and not isinstance(c, bool):
            raise ValueError(f"invalid act24.cutlass={self.cutlass!r}: expected true, false or auto")
        self.cutlass = c
        if self.cutlass is True and (self.wgrad_dense_frac is not None or self.fused):
            raise ValueError(f"act24.cutlass=true covers the 2:4 FFN without the weight-gradient split or "
                             f"act24.fused; got wgrad_dense_frac={self.wgrad_dense_frac}, fused={self.fused} (set "
                             f"act24.cutlass=auto or false with them)")
        if self.backend not in kernels.BACKENDS:
            raise ValueError(f"invalid act24.backend {self.backend!r}: expected one of {', '.join(kernels.BACKENDS)}")

    def mode_at(self, step: int, max_steps: int) -> str:
        return "sparse" if step >= self.dense_warmup_steps else "dense"

    def operands(self) -> tuple[str, ...]:
        ops = ("y2",)  # forward: y2s . W_down
        if self.grad_mode == "mask":
            ops += ("dy1",)  # backward: dy1 . W_up (dy1 has the forward's 2:4 pattern)
        if self.wgrad_dense_frac is not None:
            ops += ("y2^T", "dy1^T")  # weight gradients: pruned 2:4 along tokens
        return ops


def weight_operands(up: nn.Module, down: nn.Module, packed: bool):
    """What a weight method (S-STE) gives the core besides its weights, in the core's [d_ff, q] convention, each
    None where the linear has none (low-rank factors, dense phases, input_grad=exact, the emulated backend):
    wu_p, wu packed 2:4 along q (the up-projection as a weight-sparse GEMM; packed core only); wdt_p, the matrix
    of the backward's dy2 = dh2 wdt^T packed [d_ff, q'] 2:4 along q' (a weight-sparse GEMM; packed core only);
    wdt, the same matrix dense, where it differs from wd and is not packed."""
    pack_up, pack_down = getattr(up, "weight_pack", None), getattr(down, "weight_pack", None)
    wu_p = pack_up() if packed and pack_up is not None else None
    wdt_p = pack_down(transpose=True) if packed and pack_down is not None else None
    dense = getattr(down, "input_grad_weight", None)
    wdt = dense() if dense is not None and wdt_p is None else None  # [d_model, d_ff]: dx = dy @ wdt
    return wu_p, wdt_p, (None if wdt is None else wdt.t())


def resolve_cutlass(cfg: Act24Config, device) -> tuple[bool, str]:
    """(whether the packed core runs act24.cutlass's CUTLASS forms for parameters on `device`, why). true/false are
    themselves; auto is true where it is a pure speed choice measured to win: ste mode (ELAS 1.018x the step without
    it on an H200, 2.2 ms less a 1B step on an H100; mask mode would trade the FFN's activation memory), no split,
    not `fused`, the accelerated path, and the CUTLASS library running on this GPU (cutlass_relu2.available, as
    model.relu2_kernel=auto asks). Each form still runs only where it times faster at the shape. (With a weight
    method's packed operands, S-STE's, the weight-sparse branches of the core take precedence over these forms.)"""
    if cfg.cutlass is not True and cfg.cutlass is not False:  # auto
        if cfg.grad_mode != "ste" or cfg.wgrad_dense_frac is not None or cfg.fused or cfg.path == "masked":
            return False, "auto: ste mode without the split, act24.fused or the masked path only"
        if kernels.target_type(device) != "cuda" or kernels.backend_for(device, cfg.backend) != "cuda":
            return False, "auto: not the accelerated path"
        from ..kernels.cuda import cutlass_relu2
        dev = torch.device(device)
        ok, why = cutlass_relu2.available(torch.device("cuda") if dev.type == "meta" else dev)
        return ok, ("auto: " + why)
    return cfg.cutlass, "set"


def _check_linears(fqn: str, ffn: ReLU2FFN) -> None:
    """The cores read the factors of up/down (at each call, so a linear replaced later is seen): refuse modules
    whose weights they would bypass. A subclass of nn.Linear must say what it multiplies by (effective_weight)."""
    for part in ("up", "down"):
        lin = getattr(ffn, part)
        known = type(lin) in (nn.Linear, LowRankLinear) or (isinstance(lin, nn.Linear)
                                                             and hasattr(lin, "effective_weight"))
        if not known or getattr(lin, "bias", None) is not None:
            raise TypeError(f"act24: {fqn}.{part} is a {type(lin).__name__}; the 2:4 cores support bias-free "
                            f"nn.Linear (or a subclass with effective_weight()) and LowRankLinear")


def relu2_stats(y1: torch.Tensor, mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """y2_zero_frac: fraction of zeros of y2 = relu(y1)^2; dropped_nnz_frac: fraction of y2's non-zeros that the
    2:4 mask removes (computed with the mask 2:4 would use even while dense, to show what sparsity would cost)."""
    r = torch.relu(y1)
    y2 = r * r
    nz = y2 != 0
    if mask is None:
        mask = ref.mask24(y2)
    nnz = nz.sum()
    return {"y2_zero_frac": 1.0 - nnz / nz.numel(), "dropped_nnz_frac": (nz & ~mask).sum() / nnz.clamp(min=1)}


def permutation_keys(n: int = PERM_TABLE) -> torch.Tensor:
    """Random sort keys of sequence positions (seed 0): the permutation of a sequence of length s is
    argsort(keys[:s]). Haziza et al.: features are correlated across neighbouring tokens, so grouping 4
    consecutive tokens for the weight-gradient 2:4 would prune clustered non-zeros; a fixed shuffle decorrelates."""
    return torch.rand(n, generator=torch.Generator().manual_seed(0))


def token_permutation(keys: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(perm, inv) [seq_len] int64 from the keys: static shapes, so it traces and captures."""
    if seq_len > keys.numel():
        raise ValueError(f"act24: sequence length {seq_len} exceeds the token permutation's table ({keys.numel()})")
    perm = torch.argsort(keys[:seq_len])
    return perm, torch.argsort(perm)


class _PermuteTokens(torch.autograd.Function):
    """x [batch, seq, ...] -> x[:, perm], whose gradient is the gather by the inverse permutation. Autograd's
    gradient of indexing is a scatter-add into zeros (index_put with accumulate), which a permutation does not
    need: in a profiled 1B relu2-24 step it took ~1.9 ms, twice the forward's gathers."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, perm: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inv)
        return x[:, perm]

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (inv,) = ctx.saved_tensors
        return g[:, inv], None, None


class Act24Core(nn.Module):
    """The FFN core of a 2:4-activation-sparse ReLU^2 FFN: core(x, up, down) with x [batch, seq, d_model]."""

    def __init__(self, cfg: Act24Config, packed: bool, description: str, dense: nn.Module | None = None,
                 max_seq_len: int = PERM_TABLE, cutlass: bool = False):
        super().__init__()
        self.cfg, self.packed, self.description = cfg, packed, description
        self.cutlass = cutlass  # act24.cutlass resolved (resolve_cutlass) for the parameters' device
        # the dense phase (warm-up) runs the core the FFN had: DenseReLU2, or FusedReLU2 where model.relu2_kernel
        # put the ReLU^2 into the GEMMs (so ELAS's warm-up steps are as fast as its dense twin's); no parameters
        self.dense = dense if isinstance(dense, (DenseReLU2, FusedReLU2)) else DenseReLU2()
        self.mask_grad = cfg.grad_mode == "mask"
        self.active = False  # mode "sparse"; set by the method (set_step), read here: the model is not involved
        self.stats_sink: list | None = None  # set by sparsity.collect_stats for a probe forward
        if cfg.permute_tokens:  # made once, moves with the model; not in checkpoints (a function of the seed)
            # (a longer table: the same keys for the first PERM_TABLE positions, so their permutations stay)
            self.register_buffer("perm_keys", permutation_keys(max(PERM_TABLE, max_seq_len)), persistent=False)

    def set_mode(self, mode: str) -> None:
        self.active = mode == "sparse"

    def init_buffers(self) -> None:
        """After a meta-device build (LLaMA.init_weights): the permutation keys are a function of nothing."""
        if self.cfg.permute_tokens:
            self.perm_keys.copy_(permutation_keys(self.perm_keys.numel()).to(self.perm_keys.device))

    def extra_repr(self) -> str:
        return f"grad_mode={self.cfg.grad_mode}, {'packed' if self.packed else 'masked'}, active={self.active}"

    def forward(self, x: torch.Tensor, up: nn.Module, down: nn.Module) -> torch.Tensor:
        if self.stats_sink is not None:
            return self._probe(x, up, down)
        if not self.active:
            return self.dense(x, up, down)
        bsz, seq, d = x.shape
        if self.cfg.permute_tokens:
            perm, inv = token_permutation(self.perm_keys, seq)
            x = _PermuteTokens.apply(x, perm, inv)
        xt = x.reshape(bsz * seq, d)  # [T, d_model]
        h1, wu, wd, post = ffn_operands(up, down, xt)
        packed = self.packed and xt.shape[0] % 64 == 0
        if self.packed and not packed and not torch.compiler.is_compiling():
            msg = f"act24: {xt.shape[0]} tokens is not a multiple of 64; the masked reference path runs this call"
            if msg not in _warned:
                _warned.add(msg)
                log.warning(msg)
        dev = x.device.type
        dtype = torch.bfloat16 if packed else (torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev)
                                               else wu.dtype)
        with torch.autocast(dev, enabled=False):
            h1, wu, wd = h1.to(dtype), wu.to(dtype), wd.to(dtype)
            if packed:
                wu_p, wdt_p, wdt = weight_operands(up, down, packed=True)
                h2 = kernel_ops.act24_ffn(h1, wu, wd, self.mask_grad, self.cfg.wgrad_dense_frac, self.cfg.fused,
                                          wu_p, wdt_p, None if wdt is None else wdt.to(dtype), self.cutlass)
            else:
                wdt = weight_operands(up, down, packed=False)[2]
                h2 = masked_act24_ffn(h1, wu, wd, self.mask_grad, self.cfg.wgrad_dense_frac,
                                      None if wdt is None else wdt.to(dtype))  # [T, q']
        y = post(h2)
        y = y.to(x.dtype) if packed else y
        y = y.reshape(bsz, seq, -1)
        return _PermuteTokens.apply(y, inv, perm) if self.cfg.permute_tokens else y

    @torch.no_grad()
    def _probe(self, x, up, down):
        """A statistics probe (no grad): y1 once, its statistics into the sink, then the output by the masked
        reference (the same selection; statistics do not depend on the token order)."""
        y1 = up(x)
        y2s, mask = ref.relu2_sparsify24(y1) if self.active else (None, None)
        self.stats_sink.append(relu2_stats(y1.reshape(-1, y1.shape[-1]), None if mask is None
                                           else mask.reshape(-1, mask.shape[-1])))
        return down(y2s if self.active else relu2(y1))


def _describe_path(packed: bool, backend: str) -> str:
    if packed and backend == "cuda":
        return "accelerated path (Triton sparsifier + cuSPARSELt 2:4 GEMMs on sparse tensor cores)"
    if packed:
        return "packed path on the reference kernels (emulated, not accelerated)"
    return "reference path (masked dense GEMMs: emulated, not accelerated)"


@register_method(Act24Config)
def _apply_act24(model: nn.Module, cfg: Act24Config, filter_fn) -> Applied:
    ffns = relu2_ffns(model, filter_fn, "act24 (2:4 activation sparsity)")
    for n, f in ffns:
        _check_linears(n, f)
    backend = kernels.backend_for(next(model.parameters()).device, cfg.backend)
    packed_default = cfg.path == "packed" or (cfg.path == "auto" and backend == "cuda")
    if cfg.cutlass is True and cfg.path != "masked" and kernels.target_type(
            next(model.parameters()).device) == "cuda":
        from ..kernels.cuda import cutlass_relu2
        cutlass_relu2.library()  # a missing library: one line here, before any step (on a CPU machine too)
    cutlass = resolve_cutlass(cfg, next(model.parameters()).device)[0]
    max_seq_len = getattr(getattr(model, "cfg", None), "max_seq_len", PERM_TABLE)  # (a bare FFN: the default)
    targets, old = [], []
    for n, f in ffns:
        packed = packed_default
        if packed and f.d_ff % 64:
            msg = f"act24: {n} has d_ff {f.d_ff}, not a multiple of 64: it runs the masked reference path"
            if msg not in _warned:
                _warned.add(msg)
                log.warning(msg)
            packed = False
        core = Act24Core(cfg, packed, _describe_path(packed, backend), f.core, max_seq_len, cutlass and packed)
        core = core.to(next(f.parameters()).device)
        old.append((f, f.core))
        f.core = core
        targets.append((n, core))

    def detach() -> None:
        for f, c in old:
            f.core = c

    paths = sorted({c.description for _, c in targets})
    desc = (f"2:4 activation sparsity ({cfg.grad_mode} gradient"
            + (", token permutation" if cfg.permute_tokens else "")
            + (f", {1 - cfg.wgrad_dense_frac:.0%}/{cfg.wgrad_dense_frac:.0%} weight-gradient split"
               if cfg.wgrad_dense_frac is not None else "")
            + (", 2:4 pointwise work fused into the GEMM epilogues" if cfg.fused else "")
            + (", CUTLASS GEMMs with the 2:4 work in their epilogues where faster" if cutlass and packed_default
               else "")
            + f") on {len(targets)} FFNs after {cfg.dense_warmup_steps} dense steps; " + "; ".join(paths))
    claims = {(n, op) for n, _ in targets for op in cfg.operands()}
    return Applied(cfg, targets, claims, detach, desc)


__all__ = ["Act24Config", "Act24Core", "GRAD_MODES", "PATHS", "ffn_operands", "relu2_stats", "resolve_cutlass",
           "token_permutation", "permutation_keys"]
