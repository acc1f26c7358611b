"""LORO-AdamW (Mo et al., ICLR 2025): AdamW with a Riemannian update of low-rank factor pairs.

Each LowRankLinear holds W = M N^T (M = weight_out [m, r], N = weight_in [n, r]). Every parameter gets Adam
moments m, v; with D = m / (sqrt(v) + eps) written as the Adam direction (the raw moments: the bias correction is
in the step size) and eta_t = lr_t sqrt(1-b2^k)/(1-b1^k):

- dense parameters (embeddings, LM head, norms): p -= eta_t D (plus decoupled weight decay), every step;
- factors, most steps ("lazy"): M -= eta_t (r/d) D_M, N -= eta_t (r/d) D_N, with r/d = rank / d_model;
- factors, every K-th step ("exact"): the rank-r retraction of W - eta_t P_T(G), where P_T projects the full
  gradient G onto the tangent space of rank-r matrices at W. G is never formed: G V and U^T G follow from the
  Adam directions of the factors (D_M ~ G N, D_N ~ G^T M), see `exact_update`. Cost per layer: two tall QRs,
  two r x r triangular solves, two more tall QRs and one 2r x 2r SVD, in fp32.
- after an exact step every Adam moment is reset (k restarts at 0) and the lr is re-warmed linearly over
  `rewarm_steps` steps, as the official recipe's restarts do.
Gradient clipping happens before `step` on all parameters, factors included (the trainer clips them all).
Over bf16 parameters (param_dtype=bf16) every update is made on fp32 master copies (optim/master.py's
FP32Masters: also the fp32 accumulation of micro-batch gradients), which are then rounded into the parameters.
"""
from __future__ import annotations

import logging
import math

import torch

from ..model.lowrank import LowRankLinear
from .master import FP32Masters, check_adam_settings, sr_bf16


SOLVERS = ("svd", "gesvdj", "gesvda", "eigh")
QR_METHODS = ("auto", "householder", "cholesky")
log = logging.getLogger("elas.optim")
SVD_CHUNK_ELEMENTS = 2 ** 26  # the most matrix elements one batched cuSOLVER SVD call gets (see _svd_2r)
EXACT_CHUNK_ELEMENTS = 2 ** 26  # the most elements of the tallest stacked factor one batched exact step gets


def _cholesky_qr(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One CholeskyQR pass in float64: R = chol(X^T X) (upper), Q = X R^-1. X [..., m, r] float64. Returns
    Q, R and the factorisation's info [...] (non-zero: the Gram matrix was not positive definite)."""
    R, info = torch.linalg.cholesky_ex(X.mT @ X, upper=True)  # [.., r, r]
    return torch.linalg.solve_triangular(R, X, upper=True, left=False), R, info


def _gram_eigh_qr(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """X = Q K for a possibly rank-deficient X [..., m, r] (float64): from eigh(X^T X) = V diag(s^2) V^T,
    Q = X V diag(1/s) on the columns with s above rounding (the others zero) and K = diag(s) V^T, twice (the
    second pass on Q restores orthogonality, as in CholeskyQR2). Q's columns are orthonormal or zero; K [.., r, r]
    is not triangular. Batched GEMMs and eigh: no matrix-at-a-time geqrf."""
    def one_pass(A: torch.Tensor, rel_floor: float):
        lam, V = torch.linalg.eigh(A.mT @ A)  # ascending
        s = lam.clamp(min=0).sqrt()  # [.., r]
        keep = s > s.amax(-1, keepdim=True) * rel_floor
        inv = torch.where(keep, 1.0 / s.clamp(min=torch.finfo(s.dtype).tiny), torch.zeros_like(s))
        return (A @ V) * inv[..., None, :], (s * keep)[..., :, None] * V.mT

    # eigh of the Gram matrix resolves s only down to ~sqrt(eps) of the largest: below that (1e-7 here, about
    # float32's own rounding of the data) a column is noise, and is dropped, not divided
    Q1, K1 = one_pass(X, 1e-7)
    Q, K2 = one_pass(Q1, 0.5)  # Q1's columns have s near 1 or 0
    return Q, K2 @ K1


def _thin_qr(X: torch.Tensor, method: str = "auto", triangular: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Thin QR of X [..., m, r]: Q [..., m, r] with orthonormal columns and R [..., r, r] upper triangular,
    X = Q R. householder: torch.linalg.qr (cuSOLVER's geqrf runs one matrix at a time: 2.9-5.1 ms per 2048 or
    8192 x 512 factor on an H200, 80% of the exact step). cholesky: CholeskyQR2 (two passes of R = chol(X^T X),
    Q = X R^-1), GEMMs and a batched r x r Cholesky, in float64 so that the Gram matrix keeps the small singular
    values of a float32 X (fp64 holds cond(X) up to ~1e7, past float32's own precision); the second pass
    restores orthogonality to rounding. 30x faster than geqrf at those shapes. Where a Gram matrix is singular
    (X rank-deficient, or m < r) the whole batch falls back to householder (one host sync per call: the exact
    step runs every K steps, outside the captured step). triangular=False: the caller needs only X = Q K with
    orthonormal (or zero) columns, not R's shape, and such a batch falls back to `_gram_eigh_qr` instead (the
    exact step's Y1 and Y2 are rank-deficient when the gradient's rank is below r: with a rank-32 gradient the
    Householder fallback took the 1B exact step from 622 ms to 1.8 s, H200). auto: cholesky on CUDA,
    householder elsewhere."""
    if method not in QR_METHODS:
        raise ValueError(f"unknown qr method {method!r}; expected one of {QR_METHODS}")
    if method == "auto":
        method = "cholesky" if X.is_cuda else "householder"
    if method == "cholesky" and X.shape[-2] >= X.shape[-1]:
        Q1, R1, info1 = _cholesky_qr(X.double())
        Q, R2, info2 = _cholesky_qr(Q1)
        if not bool((info1 != 0).any() | (info2 != 0).any()):
            return Q.to(X.dtype), (R2 @ R1).to(X.dtype)
        if not triangular:
            Q, K = _gram_eigh_qr(X.double())
            return Q.to(X.dtype), K.to(X.dtype)
    return torch.linalg.qr(X)


_WARNED: set[tuple[int, int]] = set()


def _svd_or_fallback(S: torch.Tensor, driver: str | None):
    """torch.linalg.svd(S, driver=driver); where gesvda does not converge, the SVD from eigh(S^T S) on S's device
    (`_svd_2r`'s eigh); where that fails too, the SVD in float64 on the CPU (LAPACK). Results in S's dtype.

    Why: gesvda (an approximate driver) gives up on the 7B model's 2048 x 2048 cores (their lower-right r x r
    block is zero and a trained layer's gradient is nearly low-rank): "failed to converge" (error 2024) for
    every chunk of the first exact step on an H200, which stopped the run. Measured there on 16 such cores:
    gesvdj 2.49 s (error of the top-r singular values 1.3e-4 of the largest), eigh 0.47 s in float32 (6.9e-7);
    the exact step with gesvdj as the fallback took ~50 s. eigh squares the condition number, which costs the
    small singular values; the step uses only the top r, and those measured accurate to 6.9e-7 above."""
    if driver == "gesvda":
        try:
            return torch.linalg.svd(S, driver=driver)
        except torch.linalg.LinAlgError as e:
            if tuple(S.shape[-2:]) not in _WARNED:  # once per core shape: a 7B step has dozens of chunks
                _WARNED.add(tuple(S.shape[-2:]))
                log.warning("elas: LORO's exact step: the gesvda SVD of %s cores of %s did not converge (%s); "
                            "using eigh for such chunks", S.shape[0] if S.dim() > 2 else 1,
                            "x".join(map(str, S.shape[-2:])), str(e).splitlines()[0][:60])
        return _eigh_or_cpu(S)
    return torch.linalg.svd(S, driver=driver)


def _eigh_or_cpu(S: torch.Tensor):
    """The SVD of S by `_svd_2r`'s eigh; where eigh fails, in float64 on the CPU (LAPACK), returned in S's dtype."""
    try:
        return _svd_2r(S, "eigh")
    except torch.linalg.LinAlgError as e:
        log.warning("elas: LORO's exact step: eigh failed (%s); SVD in float64 on the CPU",
                    str(e).splitlines()[0][:60])
    return tuple(t.to(S) for t in torch.linalg.svd(S.detach().to("cpu", torch.float64)))


EIGH_FROM = 1024  # cores of at least this size (2r: rank 512 and up) take eigh under solver="auto" on CUDA


def auto_solver(core: int, cuda: bool) -> str:
    """The SVD solver `auto` picks for 2r x 2r cores (docs/loro.md has the measurements). CUDA: gesvda below
    EIGH_FROM (60M-350M: the fastest there, 2-2.4x eigh on the H100, and 200x more accurate); eigh from it on (at
    1B as fast as gesvda on random factors, 3.7 vs 3.8 s on the H100, and 1.3x faster with directions of a rank-32
    gradient, 1.80 vs 2.38 s batched on the H200, where gesvda failed on one chunk and redid it with eigh; at 7B
    gesvda fails on trained cores). Elsewhere torch's default driver."""
    if not cuda:
        return "svd"
    return "eigh" if core >= EIGH_FROM else "gesvda"


def _svd_2r(S: torch.Tensor, solver: str):
    """SVD of the small 2r x 2r core(s) S [..., 2r, 2r]. svd: torch's default driver; gesvdj / gesvda: cuSOLVER
    drivers (CUDA); eigh: eigenvectors of S^T S (squares the condition number; only the top r are used). auto:
    `auto_solver`."""
    if solver == "auto":
        solver = auto_solver(S.shape[-1], S.is_cuda)
        if solver == "eigh":  # with gesvda's last resort: float64 LAPACK on the CPU if eigh fails
            return _eigh_or_cpu(S)
    if solver == "svd":
        return torch.linalg.svd(S)
    if solver in ("gesvdj", "gesvda"):
        driver = solver if S.is_cuda else None
        if S.dim() < 3:
            return _svd_or_fallback(S, driver)
        # cuSOLVER's strided-batched drivers reject large batches (gesvda: CUSOLVER_STATUS_INVALID_VALUE from its
        # workspace query for 128 cores of 2048 x 2048, the 7B model's attention layers; 96 of 1024 x 1024 run):
        # call them on chunks of at most SVD_CHUNK_ELEMENTS elements
        flat = S.reshape(-1, *S.shape[-2:])
        step = max(1, SVD_CHUNK_ELEMENTS // (S.shape[-1] * S.shape[-2]))
        parts = [_svd_or_fallback(flat[i:i + step], driver) for i in range(0, flat.shape[0], step)]
        return tuple(torch.cat(t).reshape(*S.shape[:-2], *t[0].shape[1:]) for t in zip(*parts))
    if solver == "eigh":
        evals, V = torch.linalg.eigh(S.mT @ S)  # ascending
        evals, V = evals.flip(-1).clamp(min=0), V.flip(-1)
        sig = evals.sqrt()
        # U = S V / sig; where sig is at rounding level (eigh of S^T S resolves sig only down to ~sqrt(eps) of the
        # largest) S v is rounding noise, and dividing it by a clamp could overflow: such columns are left zero
        # (the step scales U's columns by sqrt(sig), so they contribute nothing either way)
        floor = sig[..., :1] * (S.shape[-1] * torch.finfo(S.dtype).eps)
        inv = torch.where(sig > floor, 1.0 / sig.clamp(min=torch.finfo(S.dtype).tiny), torch.zeros_like(sig))
        U = (S @ V) * inv[..., None, :]
        return U, sig, V.mT
    raise ValueError(f"unknown solver {solver!r}; expected one of {SOLVERS}")


def exact_update(M: torch.Tensor, N: torch.Tensor, DM: torch.Tensor, DN: torch.Tensor, eta,
                 solver: str = "auto", qr: str = "auto"):
    """One exact LORO step of the factors, in the factors' own precision (call with fp32 or fp64).

    M [..., m, r], N [..., n, r]: W = M N^T, optionally a batch of pairs of one shape (leading dims). DM [..., m, r],
    DN [..., n, r]: the factor directions; if they are the raw gradients (DM = G N, DN = G^T M) the result is
    exactly the rank-r truncated SVD of W - eta P_T(G), balanced so that M'^T M' = N'^T N' = Sigma_r. eta: a
    number, or a tensor [...] of one step size per pair. solver: the 2r x 2r SVD's (`_svd_2r`); qr: the four tall
    QRs' (`_thin_qr`). Returns (M', N').
    """
    r = M.shape[-1]
    if isinstance(eta, torch.Tensor):
        eta = eta.to(M.dtype)[..., None, None]  # [..., 1, 1]
    U, RM = _thin_qr(M, qr)  # [.., m, r], [.., r, r]
    V, RN = _thin_qr(N, qr)  # [.., n, r], [.., r, r]
    GV = torch.linalg.solve_triangular(RN, DM, upper=True, left=False)  # D_M R_N^-1 = G V    [.., m, r]
    UtG = torch.linalg.solve_triangular(RM.mT, DN.mT, upper=False)  # R_M^-T D_N^T = U^T G      [.., r, n]
    K0 = UtG @ V  # U^T G V  [.., r, r]
    Y1 = (UtG - K0 @ V.mT).mT  # (I - V V^T) G^T U  [.., n, r]
    Y2 = GV - U @ (U.mT @ GV)  # (I - U U^T) G V    [.., m, r]
    Q1, K1 = _thin_qr(Y1, qr, triangular=False)  # K1, K2 enter S as blocks: any Y = Q K will do
    Q2, K2 = _thin_qr(Y2, qr, triangular=False)
    S = torch.cat([torch.cat([RM @ RN.mT - eta * K0, -eta * K1.mT], -1),
                   torch.cat([-eta * K2, torch.zeros_like(K2)], -1)], -2)  # [.., 2r, 2r]
    Us, sig, Vsh = _svd_2r(S, solver)
    root = sig[..., None, :r].sqrt()  # [.., 1, r]
    M_new = torch.cat([U, Q2], -1) @ (Us[..., :, :r] * root)
    N_new = torch.cat([V, Q1], -1) @ (Vsh[..., :r, :].mT * root)
    return M_new, N_new


def exact_update_batched(pairs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]],
                         solver: str = "auto", qr: str = "auto") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """exact_update of many pairs (M, N, DM, DN, eta), one batched call per distinct (shape, dtype, device):
    a 1B model's 144 pairs have 3 shapes, so 3 sequences of batched QR / solve / SVD kernels replace 144
    sequences of small ones. Returns the new (M, N) of each pair, in order."""
    by_shape: dict[tuple, list[int]] = {}
    for i, (M, N, *_) in enumerate(pairs):
        by_shape.setdefault((M.shape, N.shape, M.dtype, M.device), []).append(i)
    out: list = [None] * len(pairs)
    for same in by_shape.values():
        # at most EXACT_CHUNK_ELEMENTS factor elements per batched call: the step's float64 temporaries (~10
        # tensors the size of the stacked factors) took the 7B model's step from 65.6 to 103.9 GB peak in one call
        M0, N0 = pairs[same[0]][0], pairs[same[0]][1]
        per_call = max(1, EXACT_CHUNK_ELEMENTS // (max(M0.shape[-2], N0.shape[-2]) * M0.shape[-1]))
        for c in range(0, len(same), per_call):
            idx = same[c:c + per_call]
            stack = [torch.stack([pairs[i][j] for i in idx]) for j in range(4)]  # [B, m, r], [B, n, r], ...
            eta = torch.tensor([float(pairs[i][4]) for i in idx], dtype=stack[0].dtype, device=stack[0].device)
            Mb, Nb = exact_update(*stack, eta, solver, qr)
            for b, i in enumerate(idx):
                out[i] = (Mb[b], Nb[b])
    return out


def _whole(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 shard (a DTensor: all-gathered; every process gets the same), else t.
    The exact step needs whole factors (QR, SVD); it runs every K steps, so the gather is rare."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _copy_whole(p: torch.Tensor, full: torch.Tensor) -> None:
    """p <- full (a whole tensor every process holds), into p's own shard when p is a DTensor."""
    if hasattr(p, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor
        p.copy_(distribute_tensor(full.to(p.dtype), p.device_mesh, p.placements))
    else:
        p.copy_(full.to(p.dtype))


def exact_update_sharded(pairs: list[tuple], solver: str = "auto") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """exact_update_batched, split over the processes of a torch.distributed group (every rank holds the same whole
    factors and directions: DDP replicas, or FSDP2 shards gathered by `_whole`): rank k computes the k-th, (k+world)-th, ... pair of each shape (so every rank gets a
    share of every shape), then each rank's results go to all as one flat broadcast. One process: no split."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return exact_update_batched(pairs, solver)
    world, rank = dist.get_world_size(), dist.get_rank()
    owner, count = [], {}
    for M, N, *_ in pairs:
        key = (M.shape, N.shape)
        owner.append(count.get(key, 0) % world)
        count[key] = count.get(key, 0) + 1
    mine = [i for i, o in enumerate(owner) if o == rank]
    done = dict(zip(mine, exact_update_batched([pairs[i] for i in mine], solver)))
    out: list = [None] * len(pairs)
    for src in range(world):
        idx = [i for i, o in enumerate(owner) if o == src]
        if not idx:
            continue
        M0 = pairs[idx[0]][0]
        if src == rank:  # [sum of M and N sizes], the owner's results back to back
            flat = torch.cat([t.reshape(-1) for i in idx for t in done[i]])
        else:
            flat = torch.empty(sum(pairs[i][0].numel() + pairs[i][1].numel() for i in idx), dtype=M0.dtype,
                               device=M0.device)
        dist.broadcast(flat, src)
        off = 0
        for i in idx:
            M, N = pairs[i][0], pairs[i][1]
            out[i] = (flat[off:off + M.numel()].view_as(M), flat[off + M.numel():off + M.numel() + N.numel()].view_as(N))
            off += M.numel() + N.numel()
    return out


class LOROAdamW(FP32Masters, torch.optim.Optimizer):
    def __init__(self, model: torch.nn.Module, lr: float = 0.01, betas=(0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, exact_every: int = 500, rewarm_steps: int = 5,
                 lr_scaler: float | None = None, d_model: int | None = None, backend: str = "auto",
                 moment_dtype: torch.dtype = torch.float32):
        """backend (bf16 parameters only): auto / triton: the lazy steps as MasterAdamW's one fused kernel (on CUDA
        where Triton is installed; `triton` also in the CPU interpreter); reference: multi-tensor (foreach) ops.
        Exact steps, and every step over fp32 parameters, use the foreach ops. moment_dtype: bfloat16 keeps the
        moments in bf16 as MasterAdamW does (bf16 parameters only; master_triton.py)."""
        if moment_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"LOROAdamW keeps its moments in float32 or bfloat16, got {moment_dtype}")
        self.moment_dtype = moment_dtype
        check_adam_settings("LOROAdamW", lr, betas, eps, weight_decay)
        if rewarm_steps < 0:
            raise ValueError(f"LOROAdamW: invalid rewarm_steps={rewarm_steps}: expected >= 0")
        if d_model is not None and d_model < 1:
            raise ValueError(f"LOROAdamW: invalid d_model={d_model}: expected the model width, >= 1")
        if exact_every < 1:
            raise ValueError(f"exact_every must be >= 1, got {exact_every}")
        if exact_every <= rewarm_steps:  # the next reset would come before the lr is back on its schedule
            raise ValueError(f"exact_every={exact_every} must exceed rewarm_steps={rewarm_steps}")
        pairs = [m for m in model.modules() if isinstance(m, LowRankLinear)]
        if not pairs:
            raise ValueError("loro_adamw needs a low-rank model (set a rank, e.g. --rank 128)")
        factor_ids = {id(p) for m in pairs for p in (m.weight_in, m.weight_out)}
        dense = [p for p in model.parameters() if p.requires_grad and id(p) not in factor_ids]
        if lr_scaler is None:
            if d_model is None:
                raise ValueError("LOROAdamW needs d_model (or lr_scaler) for the r/d scale of the lazy step")
        groups = [{"params": dense, "kind": "dense"}]
        for m in pairs:
            scaler = lr_scaler if lr_scaler is not None else m.rank / d_model
            groups.append({"params": [m.weight_out, m.weight_in], "kind": "pair", "scaler": scaler})
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        super().__init__(groups, defaults)
        self.exact_every, self.rewarm_steps = exact_every, rewarm_steps
        for g in self.param_groups:
            g.setdefault("t", 0)  # global step count, saved in state_dict with the groups
        self._init_masters()
        if moment_dtype == torch.bfloat16 and not self.has_masters:
            raise ValueError("LOROAdamW keeps bf16 moments only over bf16 parameters (param_dtype=bf16)")
        self._init_fused(backend if self.has_masters else "reference")

    def load_state_dict(self, state_dict: dict) -> None:
        self._load_keeping_fp32(state_dict)
        self._tab_key = None  # the fused kernel's table holds the replaced tensors' addresses

    @property
    def t(self) -> int:
        return self.param_groups[0]["t"]

    def _directions(self, params: list[torch.Tensor], beta1: float, beta2: float, eps: float):
        """Adam directions D (fp32) of `params` and their bias-correction factors, all moments updated with a few
        multi-tensor (foreach) kernels: per-parameter ops would launch ~10 kernels for each of a 1B model's ~300
        factors and norms every step, which the host cannot issue as fast as a CUDA-graph step runs."""
        for p in params:
            st = self.state[p]
            st.setdefault("k", 0)
            if "exp_avg" not in st:  # (a master copy may be there already)
                st["exp_avg"] = torch.zeros_like(p, dtype=self.moment_dtype)
                st["exp_avg_sq"] = torch.zeros_like(p, dtype=self.moment_dtype)
            st["k"] += 1
        ks = [self.state[p]["k"] for p in params]
        corrections = [math.sqrt(1 - beta2 ** k) / (1 - beta1 ** k) for k in ks]
        if self.moment_dtype == torch.bfloat16:
            return self._directions_bf16(params, beta1, beta2, eps), corrections
        grads = [self.grad_of(p).float() for p in params]
        m = [self.state[p]["exp_avg"] for p in params]
        v = [self.state[p]["exp_avg_sq"] for p in params]
        torch._foreach_mul_(m, beta1)
        torch._foreach_add_(m, grads, alpha=1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
        denom = torch._foreach_sqrt(v)
        torch._foreach_add_(denom, eps)
        return torch._foreach_div(m, denom), corrections

    def _directions_bf16(self, params: list[torch.Tensor], beta1: float, beta2: float, eps: float):
        """_directions over bf16 moments, tensor by tensor: fp32 arithmetic, the moments stored as the fused kernel
        stores them (m to nearest, v stochastically; the i-th tensor's hash index is its row in the kernel's table
        when every parameter steps) and the direction read from them so rounded. One tensor's fp32 copies at a
        time: the foreach form would hold fp32 copies of every moment, more memory than fp32 moments."""
        seed = torch.tensor(self.t % 2 ** 24)
        out = []
        for i, p in enumerate(params):
            st, g = self.state[p], self.grad_of(p).float()
            m = st["exp_avg"].float().mul_(beta1).add_(g, alpha=1 - beta1)
            v = st["exp_avg_sq"].float().mul_(beta2).addcmul_(g, g, value=1 - beta2)
            st["exp_avg"].copy_(m)
            st["exp_avg_sq"].copy_(sr_bf16(v, i, seed))
            m.copy_(st["exp_avg"])
            v.copy_(st["exp_avg_sq"])
            out.append(m.div_(v.sqrt_().add_(eps)))
        return out

    def _lazy_step_fused(self, warm: float) -> None:
        """A lazy step as one kernel over all parameters (bf16 parameters, fp32 masters): per group the Adam
        update p <- p (1 - lr wd) - lr scale c m / (sqrt(v) + eps), c = sqrt(1 - b2^k) / (1 - b1^k), scale = r/d
        for factor pairs and 1 for the dense parameters: the foreach path's arithmetic (up to rounding) in one
        read and write of each tensor instead of ~10 (~92 bytes per parameter down to 28)."""
        rows = []
        for group in self.param_groups:  # (then the no-decay row of the dense group's vectors: _row_of)
            b1, b2 = group["betas"]
            stepping = [p for p in group["params"] if self.grad_of(p) is not None]
            k = 1
            for p in stepping:
                st = self._adam_state(p)
                st["k"] = st.get("k", 0) + 1
                k = st["k"]
            lr = float(group["lr"]) * warm
            scale = group["scaler"] if group["kind"] == "pair" else 1.0
            c = math.sqrt(1 - b2 ** k) / (1 - b1 ** k)
            rows.append([1.0 - lr * group["weight_decay"], b1, b2, group["eps"], lr * c * scale, 1.0, 1.0 - b1,
                         1.0 - b2, float(self.t % 2 ** 24)])  # (the seed of bf16 moments' rounding)
        rows.append([1.0, *rows[0][1:]])  # the dense group's, without decay
        self._write_scalars(rows)
        self._fused_update()
        for group in self.param_groups:
            group["t"] += 1

    def _scalar_rows(self) -> int:
        return len(self.param_groups) + 1  # the last: the dense group's vectors, which take no weight decay

    def _row_of(self, gi: int, p: torch.Tensor) -> int:
        return len(self.param_groups) if gi == 0 and p.dim() < 2 else gi

    def _rewarm(self) -> float:
        """lr multiplier: after a reset (k small), ramp over rewarm_steps; 1 before the first exact step."""
        k = self.t % self.exact_every
        if self.t >= self.exact_every and k < self.rewarm_steps:
            return (k + 1) / (self.rewarm_steps + 1)
        return 1.0

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:  # (torch's contract: the closure computes the loss and its gradients)
            with torch.enable_grad():
                loss = closure()
        exact = (self.t + 1) % self.exact_every == 0
        warm = self._rewarm()
        if self.has_masters and self.backend == "triton" and not exact:
            self._lazy_step_fused(warm)
            return loss
        # which parameters step, and the Adam directions of all of them, batched per (betas, eps)
        stepping = []  # (group, [params]) in group order
        for group in self.param_groups:
            params = [p for p in group["params"] if self.grad_of(p) is not None]
            if group["kind"] == "pair" and len(params) != 2:
                continue
            stepping.append((group, params))
        direction: dict[int, tuple[torch.Tensor, float]] = {}
        by_hyper: dict[tuple, list[torch.Tensor]] = {}
        for group, params in stepping:
            by_hyper.setdefault((*group["betas"], group["eps"]), []).extend(params)
        for (beta1, beta2, eps), params in by_hyper.items():
            for p, d, c in zip(params, *self._directions(params, beta1, beta2, eps)):
                direction[id(p)] = (d, c)
        # p <- p (1 - lr wd) - lr scale corr D, for every dense parameter and (lazy steps) factor, batched
        decay_p, decay_f, upd_p, upd_d, upd_alpha = [], [], [], [], []
        exact_pairs, exact_args = [], []
        for group, params in stepping:
            lr, wd = group["lr"] * warm, group["weight_decay"]
            if group["kind"] == "pair" and exact:  # Riemannian step at the bias-corrected lr, no r/d, no decay
                M, N = group["params"]
                (dM, cM), (dN, _) = direction[id(M)], direction[id(N)]
                exact_pairs.append((M, N))
                exact_args.append((_whole(self.master(M)).float(), _whole(self.master(N)).float(), _whole(dM),
                                   _whole(dN), lr * cM))
                continue
            scale = group["scaler"] if group["kind"] == "pair" else 1.0
            for p in params:
                d, c = direction[id(p)]
                w = self.master(p)  # the fp32 weight the update changes (p itself over fp32 parameters)
                if wd and p.dim() >= 2:  # (norm gains and other vectors: no decay, as build_optimizer's AdamW)
                    decay_p.append(w)
                    decay_f.append(1 - lr * wd)
                upd_p.append(w)
                upd_d.append(d if d.dtype == w.dtype else d.to(w.dtype))
                upd_alpha.append(-lr * c * scale)
        if decay_p:
            torch._foreach_mul_(decay_p, decay_f)
        # one foreach add per distinct step size (usually two: dense parameters and factors); add with alpha,
        # not a multiply then an add, so the result is bit-identical to the per-parameter p.add_(d, alpha)
        by_alpha: dict[float, tuple[list, list]] = {}
        for p, d, a in zip(upd_p, upd_d, upd_alpha):
            by_alpha.setdefault(a, ([], []))
            by_alpha[a][0].append(p)
            by_alpha[a][1].append(d)
        for a, (ps, ds) in by_alpha.items():
            torch._foreach_add_(ps, ds, alpha=a)
        for (M, N), (Mn, Nn) in zip(exact_pairs, exact_update_sharded(exact_args)):
            _copy_whole(self.master(M), Mn)
            _copy_whole(self.master(N), Nn)
        self.publish([p for _, params in stepping for p in params])
        for group in self.param_groups:
            group["t"] += 1
        if exact:  # Adam-state refresh of every parameter: moments average the K steps since the last one
            for st in self.state.values():
                if "exp_avg" not in st:
                    continue
                st["k"] = 0
                st["exp_avg"].zero_()
                st["exp_avg_sq"].zero_()
        return loss
