"""V:N:M activation sparsity on ReLU^2 FFNs (Madhyastha et al., part 2): config, handler, core. Emulated by default
(masked dense GEMMs); own mode runs for real with `path=grouped`.

    sparsify_(model, VNMConfig(v=64, m=8, grad_mode="ste", dense_warmup_steps=1000))

replaces the core of every ReLU^2 FFN by a `VNMCore`. Dense for `dense_warmup_steps`, sparse until `sparse_until`
(a fraction of the run or a step; the third paper's sparse -> dense schedule, as sste24's), then dense to the end
("dense-final"). In mode "sparse" y2 = relu(y1)^2 [T, d_ff] is made V:N:M
(reference.vnm_mask: in each block of v tokens x m features, 4 features shared by the block's tokens, 2 of
them kept per token: density 2/m, 75% sparse at m=8), so that, with a sparse-tensor-core kernel, the down
projection could skip the block's other m-4 features and run 2:4 on the 4. Gradients as for 2:4: `ste`
(straight through) or `mask` (the forward's mask on dy2).

Tokens share features only if they are grouped. Without the router (router=false) the v tokens of a block are
consecutive in the batch and the block's 4 columns are chosen by exhaustive search of the kept magnitude: the
baseline. With it (router=true, sparsity/router.py: the paper's neuron-level router) the neurons are clustered,
each token is routed to one cluster, and the blocks are made of one cluster's tokens (router_mode "group"; "own"
restricts each token to its cluster's features instead); the clustering is redone every `recluster_steps` steps (each period is a mode of the method,
and the clustering is in the model's buffers, so checkpoints keep it). The choices the paper leaves open, made
here: v=64 (a 64-row band of the SM90 layout; Venom uses 64 or 128), m=8 (75% sparsity, inside the 84-98%
zeros of long runs); the router's are in router.py. The default path is masked dense arithmetic: it measures
quality, it accelerates nothing. `path=grouped` (own mode only; vnm_grouped.py) computes own mode for real: tokens
laid out by cluster, each multiplied by its cluster's neurons only (torch's grouped GEMM: 4/m of the dense FFN's
work in all six GEMMs, 2:4 inside not exploited), equal to the masked path up to summation order
(S-STE weights: with `sste24.input_grad=exact`; `transposed` is refused with this path).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from ..kernels import reference as ref
from ..model.ffn import ffn_operands, relu2
from ..model.lowrank import LowRankLinear
from . import router as rt
from .act24 import GRAD_MODES, relu2_stats
from .api import Applied, SparsityMethod, check_sparse_until, register_method, relu2_ffns, sparse_end, whole
from .vnm_grouped import grouped_core


@dataclass
class VNMConfig(SparsityMethod):
    name: ClassVar[str] = "vnm"
    version: ClassVar[int] = 1
    periods: ClassVar[tuple[str, ...]] = ("recluster_steps",)
    stat_names: ClassVar[tuple[str, ...]] = ("y2_zero_frac", "dropped_nnz_frac", "y2_mass_kept",
                                             "route_largest_frac", "route_pad_frac")

    v: int = 64  # tokens per block (they share the block's 4 features)
    m: int = 8  # features per block; each token keeps 2 of them
    grad_mode: str = "ste"  # ste | mask
    dense_warmup_steps: int = 1000
    # end of the sparse phase, then dense to the end (the third paper's sparse -> dense schedule, as sste24's):
    # a fraction of max_steps (float) or a step (int); 1.0: sparse to the end
    sparse_until: float | int = 0.5
    router: bool = False  # the neuron-level router (sparsity/router.py); false: blocks of consecutive tokens
    router_mode: str = "group"  # group (blocks of one cluster's tokens, columns by search) | own (router.py)
    groups: int = 16  # clusters of neurons in group mode (own mode: m / 4)
    route_metric: str = "dot"  # dot | cosine | l2 (router.py says why dot)
    # own mode: clusters per token. k > 1: k*m/4 smaller clusters, each token takes its k best (the same density
    # 2/m and work; finer choice of a token's neurons, as top-k routing over fine-grained experts; router.py)
    topk: int = 1
    clustering: str = "kmeans"  # kmeans (balanced k-means of W_up's rows) | contiguous (consecutive neurons; router.py)
    recluster_steps: int = 1000  # the neurons are re-clustered every this many sparse steps
    kmeans_iters: int = 10
    # masked: dense GEMMs on masked y2 (emulated) | grouped: own mode as a grouped GEMM over the clusters (each
    # token multiplies only its cluster's neurons: the work of the FFN's six GEMMs shrinks to 4/m of dense)
    path: str = "masked"

    def __post_init__(self) -> None:
        self._check_types()
        if self.v < 1:
            raise ValueError(f"invalid vnm.v {self.v}: expected a positive number of tokens per block")
        if not 4 <= self.m <= 16:
            raise ValueError(f"invalid vnm.m {self.m}: expected 4..16 features per block (the exhaustive choice "
                             f"of 4 of m)")
        if self.grad_mode not in GRAD_MODES:
            raise ValueError(f"invalid vnm.grad_mode {self.grad_mode!r}: expected one of {', '.join(GRAD_MODES)}")
        if self.dense_warmup_steps < 0:
            raise ValueError(f"invalid vnm.dense_warmup_steps {self.dense_warmup_steps}: expected >= 0")
        check_sparse_until(self.name, self.sparse_until)
        if self.router_mode not in ("group", "own"):
            raise ValueError(f"invalid vnm.router_mode {self.router_mode!r}: expected group or own")
        if self.router and self.router_mode == "own" and self.m % 4:
            raise ValueError(f"invalid vnm.m {self.m} with router_mode own: expected a multiple of 4 (m/4 clusters "
                             f"of neurons, each owning 4 of every m features)")
        if self.topk < 1 or (self.topk > 1 and self.router_mode != "own"):
            raise ValueError(f"invalid vnm.topk {self.topk}: expected 1, or more clusters per token in router_mode "
                             f"own")
        if not self.router and (self.router_mode != "group" or self.topk != 1):  # would be silently ignored
            raise ValueError(f"vnm.router_mode={self.router_mode} and vnm.topk={self.topk} choose how the router routes, "
                             f"but vnm.router is false; set vnm.router=true or leave them at group and 1")
        if self.groups < 1:
            raise ValueError(f"invalid vnm.groups {self.groups}: expected >= 1")
        if self.route_metric not in rt.METRICS:
            raise ValueError(f"invalid vnm.route_metric {self.route_metric!r}: expected one of {', '.join(rt.METRICS)}")
        if self.clustering not in ("kmeans", "contiguous"):
            raise ValueError(f"invalid vnm.clustering {self.clustering!r}: expected kmeans or contiguous")
        if self.path not in ("masked", "grouped"):
            raise ValueError(f"invalid vnm.path {self.path!r}: expected masked or grouped")
        if self.path == "grouped" and not (self.router and self.router_mode == "own"):
            raise ValueError("vnm.path=grouped needs the router in own mode (vnm.router=true, vnm.router_mode=own): "
                             "only then does every token of a cluster use the same features")
        if self.recluster_steps < 1 or self.kmeans_iters < 1:
            raise ValueError(f"invalid vnm.recluster_steps {self.recluster_steps} / kmeans_iters {self.kmeans_iters}: "
                             f"expected >= 1")

    @property
    def causal(self) -> bool:
        # blocks of v consecutive tokens (no router) or of one cluster's tokens from the whole batch (group mode)
        # share the 4 of m features they keep, chosen from all their magnitudes: later tokens (and, in group mode,
        # other sequences) change a token's mask. Own mode keeps each token's features by its own cluster only
        return self.router and self.router_mode == "own"

    def check_run(self, max_steps: int, tokens: int) -> None:
        super().check_run(max_steps, tokens)
        if self.v > tokens:  # each block (and each router cluster) is padded to v rows: memory grows with v
            raise ValueError(f"invalid vnm.v {self.v}: a block of v tokens must fit in a micro-batch of {tokens} "
                             f"tokens (batch_size x seq_len); lower model.vnm.v (default 64)")

    def check_with(self, methods: list) -> None:
        # the grouped path multiplies the FFN's S(W) itself: autograd gives S(W)'s input gradient, whatever S-STE's
        # input_grad asks (training only: the forward is the same, so a run made so evaluates and generates)
        if self.path == "grouped" and any(getattr(m, "input_grad", None) == "transposed" for m in methods):
            raise ValueError("vnm.path=grouped multiplies the FFN's weights itself, so its input gradient is S(W)'s "
                             "(sste24.input_grad=exact), not sste24.input_grad=transposed: use vnm.path=masked or "
                             "sste24.input_grad=exact")

    @property
    def density(self) -> float:
        """Kept fraction of y2 (2 of every m features per token): the work a V:N:M kernel would do."""
        return 2 / self.m

    @property
    def clusters(self) -> int:
        """Clusters of neurons the router makes: topk * m / 4 in own mode (each owns 4 of every topk * m features;
        a token takes topk of them), else groups."""
        return self.topk * self.m // 4 if self.router_mode == "own" else self.groups

    def mode_at(self, step: int, max_steps: int) -> str:
        if step < self.dense_warmup_steps:
            return "dense"
        if step >= sparse_end(self.sparse_until, max_steps):
            return "dense-final"
        if not self.router:
            return "sparse"
        return f"sparse/{(step - self.dense_warmup_steps) // self.recluster_steps}"  # clustering period

    def operands(self) -> tuple[str, ...]:
        return ("y2",)

    def forward_work(self) -> dict[str, float]:
        # the grouped path multiplies each token by its clusters' 4/m of the neurons, densely, in the up and the
        # down projection (2:4 inside them not exploited); the masked path's is what a V:N:M kernel would do
        return {"up": 4 / self.m, "down": 4 / self.m} if self.path == "grouped" else {"down": self.density}


class _ReLU2Masked(torch.autograd.Function):
    """y1 [T, K], mask bool [T, K] (a V:N:M selection of y2) -> y2s = relu(y1)^2 * mask; backward 2 relu(y1) dy2,
    with dy2 masked by the selection in `mask` mode (mask_grad), by `own` where given in `ste` mode (own mode: the
    token's own features), else straight through (`ste`)."""

    @staticmethod
    def forward(ctx, y1, mask, own, mask_grad: bool):
        r = torch.relu(y1)
        y2 = r * r
        ctx.save_for_backward(r, mask if mask_grad else own)
        # (where, not y2 * mask, here and in the backward: a dropped entry is 0 whatever y1 is, as the 2:4 twins
        # (masked.py, the packed kernels) write it; relu(NaN) * 0 was NaN, which the down projection spread)
        return torch.where(mask, y2, 0.0)

    @staticmethod
    def backward(ctx, dy2):
        r, grad_mask = ctx.saved_tensors
        if grad_mask is not None:
            dy2 = torch.where(grad_mask, dy2, 0.0)
        return torch.where(r > 0, 2 * r * dy2, 0.0), None, None, None


def up_rows(up: nn.Module) -> torch.Tensor:
    """The up-projection's weight rows [d_ff, d_model] (the neurons the router clusters), low-rank or not; whole
    where FSDP2 shards them (read between steps, when a clustering period starts)."""
    if isinstance(up, LowRankLinear):
        return whole(up.weight_out).detach().float() @ whole(up.weight_in).detach().float().T
    return whole(up.effective_weight() if hasattr(up, "effective_weight") else up.weight).detach().float()


class VNMCore(nn.Module):
    """core(x, up, down) with x [batch, seq, d_model]: dense ReLU^2 in mode "dense", V:N:M in a sparse mode.
    With the router: buffers centroids [C, d_model] fp32, features [C, d_ff/C] int64 (router.py) and the
    clustering period they were made in (`period`, -1: none yet); they are in the model's state dict."""

    def __init__(self, cfg: VNMConfig, ffn: nn.Module, d_model: int, d_ff: int):
        super().__init__()
        self.cfg = cfg
        self.active = False
        self.stats_sink: list | None = None
        # the FFN, whose up-projection is read when re-clustering: looked up then, not kept, since a method applied
        # after this one may replace it (sste24 -> S(W_up); FSDP2 re-registers parameters). A tuple: no submodule
        self._ffn = (ffn,)
        self._clustered = False  # host-side copy of period >= 0 (the forward must not read a tensor's value)
        self._mode = "dense"
        if cfg.router:
            c = cfg.clusters
            self.register_buffer("centroids", torch.zeros(c, d_model))
            self.register_buffer("features", torch.arange(d_ff).view(c, d_ff // c))
            self.register_buffer("period", torch.tensor(-1))

    def init_buffers(self) -> None:
        """After a meta-device build: no clustering yet (made when the first sparse mode starts)."""
        if self.cfg.router:
            c, n = self.features.shape
            self.centroids.zero_()
            self.features.copy_(torch.arange(c * n, device=self.features.device).view(c, n))
            self.period.fill_(-1)

    def set_mode(self, mode: str) -> None:
        self.active = mode.startswith("sparse")
        self._mode = mode

    def modes_set(self) -> None:
        """Once every method is in its mode for the step (api.set_step): a new clustering period clusters the
        up-projection as the forward will use it (S(W_up) where S-STE's sparse phase has started)."""
        if self.active and self.cfg.router:
            period = int(self._mode.split("/")[1])
            if int(self.period) != period:  # a resumed run loads the period's clustering and keeps it
                self.recluster(period)
        if self.cfg.router:
            self._clustered = int(self.period) >= 0

    @torch.no_grad()
    def recluster(self, period: int) -> None:
        """Cluster the neurons from the up-projection's current weights (seeded by the period)."""
        if self.cfg.clustering == "contiguous":
            assign, mu = rt.contiguous_clusters(up_rows(self._ffn[0].up), self.cfg.clusters, self.cfg.route_metric)
        else:
            assign, mu = rt.cluster_neurons(up_rows(self._ffn[0].up), self.cfg.clusters, self.cfg.route_metric,
                                            self.cfg.kmeans_iters, seed=period)
        self.features.copy_(rt.cluster_features(assign, self.cfg.clusters))
        self.centroids.copy_(mu)
        self.period.fill_(period)

    @property
    def description(self) -> str:
        """Which path runs the sparse mode (benchmark rows print it)."""
        if self.cfg.path == "grouped":
            where = ", weights in place" if self.cfg.clustering == "contiguous" else ""
            top = f", {self.cfg.topk} per token" if self.cfg.topk > 1 else ""
            return f"grouped GEMM over {self.cfg.clusters} clusters{top} (V:N:M own mode{where})"
        return "emulated (masked dense GEMMs)"

    def extra_repr(self) -> str:
        top = f", {self.cfg.topk} per token" if self.cfg.topk > 1 else ""
        router = f", router ({self.cfg.clusters} clusters{top}, {self.cfg.route_metric})" if self.cfg.router else ""
        return (f"v={self.cfg.v}, m={self.cfg.m}, grad_mode={self.cfg.grad_mode}{router}, {self.cfg.path}, "
                f"active={self.active}")

    @torch.no_grad()
    def _mask(self, y2: torch.Tensor, cid: torch.Tensor | None) -> torch.Tensor:
        """The V:N:M selection of y2 [T, d_ff]: by blocks of consecutive tokens (no router, or no clustering
        yet), by blocks of one cluster's tokens (group mode), or by the clusters' own features (own mode)."""
        cfg = self.cfg
        if cid is None:
            return ref.vnm_mask(y2, cfg.v, cfg.m)
        if cfg.router_mode == "own":
            return ref.routed_vnm_mask(y2, cid, self.features)
        return rt.grouped_vnm_mask(y2, cid, cfg.clusters, cfg.v, cfg.m)

    def forward(self, x: torch.Tensor, up: nn.Module, down: nn.Module) -> torch.Tensor:
        cid = None
        if self.cfg.router and self._clustered and (self.active or self.stats_sink is not None):
            # the cluster of each token: int64 [T] (a dense step routes only for the statistics probe)
            # [T], or [T, topk]
            cid = rt.route_tokens(x.reshape(-1, x.shape[-1]), self.centroids, self.cfg.route_metric, self.cfg.topk)
        mask_grad = self.cfg.grad_mode == "mask"
        if self.active and self.cfg.path == "grouped" and cid is not None and self.stats_sink is None:
            return self._grouped(x, up, down, cid, mask_grad)  # y1 over all of d_ff is never computed
        y1 = up(x)  # [batch, seq, d_ff]
        flat = y1.reshape(-1, y1.shape[-1])  # [T, d_ff]
        if self.stats_sink is not None:  # a probe (no grad): the mask V:N:M uses, or would use while dense
            self.stats_sink.append(self._stats(flat, cid))
        if not self.active:
            return down(relu2(y1))
        r = torch.relu(flat.detach())
        mask = self._mask(r * r, cid)
        own = None
        if cid is not None and self.cfg.router_mode == "own" and not mask_grad:
            # ste in own mode passes only through the token's own features: a token never reaches another
            # cluster's neurons (the grouped path does not compute them)
            own = torch.zeros_like(mask).scatter(1, self.features[cid].reshape(flat.shape[0], -1), True)
        y2s = _ReLU2Masked.apply(flat, mask, own, mask_grad)
        return down(y2s.reshape(y1.shape))

    def _grouped(self, x, up, down, cid, mask_grad: bool) -> torch.Tensor:
        bsz, seq, d = x.shape
        h1, wu, wd, post = ffn_operands(up, down, x.reshape(bsz * seq, d))
        dev = x.device.type
        # torch's grouped GEMM runs bf16 on CUDA: the compute dtype there, as autocast's GEMMs would
        dtype = torch.bfloat16 if dev == "cuda" else (torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev)
                                                      else wu.dtype)
        with torch.autocast(dev, enabled=False):
            h2 = grouped_core(h1.to(dtype), wu.to(dtype), wd.to(dtype), cid, self.features, mask_grad,
                               in_place=self.cfg.clustering == "contiguous")
        return post(h2).reshape(bsz, seq, -1)

    def _stats(self, y1: torch.Tensor, cid) -> dict:
        r = torch.relu(y1.float())
        y2 = r * r
        if self.cfg.router and self.cfg.router_mode == "own" and cid is None:
            # own mode before its first clustering (the dense warm-up): no mask of its own yet, and the blocks'
            # exhaustive search in its place measured another selection at C(16, 4) = 1820 candidates per block
            # (~10 s per probe at 60M, m=16: 6x the warm-up's step time at a probe every 20 steps)
            return {"y2_zero_frac": (y2 == 0).float().mean()}
        mask = self._mask(y2, cid)
        out = relu2_stats(y1, mask)
        out["y2_mass_kept"] = (y2 * mask).sum() / y2.sum().clamp(min=1e-30)
        if cid is not None:
            perm, _, counts = rt.route_permutation(cid.reshape(-1), self.cfg.clusters, self.cfg.v)
            out["route_largest_frac"] = counts.max() / counts.sum()
            out["route_pad_frac"] = (perm < 0).sum() / perm.numel()
        return out


@register_method(VNMConfig)
def _apply_vnm(model: nn.Module, cfg: VNMConfig, filter_fn) -> Applied:
    ffns = relu2_ffns(model, filter_fn, "vnm (V:N:M activations)")
    for n, f in ffns:
        if f.d_ff % cfg.m:
            raise ValueError(f"vnm: {n} has d_ff={f.d_ff}, not a multiple of m={cfg.m}")
        if cfg.router and cfg.router_mode == "own" and f.d_ff % (cfg.topk * cfg.m):
            raise ValueError(f"vnm: {n} has d_ff={f.d_ff}, not a multiple of topk * m = {cfg.topk * cfg.m} (own mode: "
                             f"{cfg.clusters} clusters whose features form whole 2:4 groups)")
        if cfg.router and f.d_ff % cfg.clusters:
            raise ValueError(f"vnm: {n} has d_ff={f.d_ff}, not a multiple of the router's {cfg.clusters} clusters "
                             f"(vnm.groups)")
        if cfg.path == "grouped":
            # torch's grouped GEMM (bf16: always on CUDA, under autocast elsewhere) needs 16-byte strides: each
            # cluster's neurons and the widths around d_ff (d_model, or the factors' ranks) multiples of 8
            dims = {"neurons per cluster (d_ff / clusters)": f.d_ff // cfg.clusters,
                    "up input width": getattr(f.up, "rank", f.up.in_features),
                    "down output width": getattr(f.down, "rank", f.down.out_features)}
            bad = {k: v for k, v in dims.items() if v % 8}
            if bad:
                raise ValueError(f"vnm.path=grouped: {n} has " + ", ".join(f"{k} {v}" for k, v in bad.items())
                                 + ", not a multiple of 8 (torch's grouped GEMM needs 16-byte strides); change "
                                 "d_ff, d_model, rank or vnm.m / vnm.topk, or use vnm.path=masked")
    old = [(f, f.core) for _, f in ffns]
    targets = []
    for n, f in ffns:
        f.core = VNMCore(cfg, f, f.up.in_features, f.d_ff).to(next(f.parameters()).device)
        targets.append((n, f.core))

    def detach() -> None:
        for f, core in old:
            f.core = core

    how = (f"neuron router ({cfg.router_mode} mode): {cfg.clusters} clusters"
           f"{f' of consecutive neurons' if cfg.clustering == 'contiguous' else ' (k-means)'}"
           f"{f' ({cfg.topk} per token)' if cfg.topk > 1 else ''}, {cfg.route_metric} routing, "
           f"re-clustered every {cfg.recluster_steps} steps" if cfg.router else "no router: blocks of consecutive tokens")
    path = "a grouped GEMM over the clusters" if cfg.path == "grouped" else "emulated (masked dense GEMMs)"
    desc = (f"V:N:M activation sparsity (v={cfg.v}, m={cfg.m}: {200 / cfg.m:g}% dense, {cfg.grad_mode} gradient) "
            f"on {len(ffns)} FFNs after {cfg.dense_warmup_steps} dense steps, sparse until {cfg.sparse_until!r} (of "
            f"max_steps when a fraction), then dense; {path}; {how}")
    return Applied(cfg, targets, {(n, "y2") for n, _ in ffns}, detach, desc)


__all__ = ["VNMConfig", "VNMCore"]
