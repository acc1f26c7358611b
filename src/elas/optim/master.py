"""MasterAdamW: AdamW over bf16 model parameters with fp32 master weights, in one fused kernel per step.

Why: with fp32 parameters under bf16 autocast, every forward casts every weight to bf16 and every backward casts
every weight gradient back to fp32 (~2 ms per step of a 1B model on an H200, measured in `elas bench step`). Held
in bf16, the parameters are what the GEMMs read and the gradients arrive in bf16; the fp32 master copy, the Adam
moments and the update live here, and the update writes the rounded bf16 parameter as it goes. The numerics
are those of autocast over fp32 parameters: the forward used round(w) there too, and the weight gradients were
bf16 GEMM outputs before their cast.

    opt = MasterAdamW(groups, lr=..., betas=..., eps=..., weight_decay=...)   # parameters already bf16
    opt.step()                       # = prepare() (host: step count, lr) + apply() (device only)

- `apply()` is what a CUDA-graph step captures (train/step.py): it reads the lr, bias corrections and the clipping
  scale (`grad_scale`, a device tensor: max(1, norm / clip), set by the step) from device memory, so a replayed
  step needs no host decision. `prepare()` runs before every replay; `apply(dry=True)` runs the kernel without
  storing anything (the warm-up passes before a capture).
- Gradient accumulation: `accumulate(first)` after each micro-batch's backward adds the bf16 gradients into fp32
  buffers (and drops them); the update then reads those. A single micro-batch reads the bf16 gradients directly.
- On CUDA the update is the Triton kernel of master_triton.py (one launch for all tensors); elsewhere, and as its
  twin in the tests, `adamw_reference` (the same operations in plain torch).
- state_dict: per parameter "master" (fp32), "exp_avg", "exp_avg_sq" (fp32, or bf16 with moment_dtype: see
  master_triton.py) and per group "step": a checkpoint resumes exactly. (torch's Optimizer.load_state_dict
  would cast the state to the parameters' bf16; load_state_dict keeps the masters fp32 and the moments in
  moment_dtype.)
"""
from __future__ import annotations

import math

import torch

SCAL = 9  # fp32 scalars per parameter group that the update reads (see _init_fused)


_U32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """master_triton._mix32 in torch (int64 values in [0, 2^32); no product leaves int64)."""
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & _U32
    x = ((x ^ (x >> 15)) * 0x27D4EB2F) & _U32
    return x ^ (x >> 16)


def sr_bf16(x: torch.Tensor, t: int, seed: torch.Tensor, chunk: int = 1 << 22) -> torch.Tensor:
    """master_triton._sr_bf16 in torch: fp32 x (contiguous) rounded stochastically to bf16, the random bits a hash
    of (element index, tensor index t, seed: a 0-d int64 tensor, the step); bit for bit the kernel's rounding.
    `chunk` elements at a time (the int64 temporaries are 8 bytes an element)."""
    flat, out = x.reshape(-1), torch.empty(x.numel(), dtype=torch.bfloat16, device=x.device)
    salt = _mix32((t * 0x165667B1 + seed * 0x68E31DA5) & _U32)
    for s in range(0, flat.numel(), chunk):
        part = flat[s:s + chunk]
        idx = torch.arange(s, s + part.numel(), dtype=torch.int64, device=x.device)
        h = _mix32((idx + salt) & _U32)
        b = ((part.view(torch.int32).to(torch.int64) & _U32) + (h & 0xFFFF)) & 0xFFFF0000
        b = torch.where(b >= 2 ** 31, b - 2 ** 32, b)  # back to int32's two's complement
        out[s:s + chunk] = b.to(torch.int32).view(torch.float32)
    return out.view(x.shape)


def adamw_reference(p: torch.Tensor, g: torch.Tensor, w: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
                    scal: torch.Tensor, inv_scale, t: int = 0) -> None:
    """One tensor's update, in place (see master_triton.py for the formula). p bf16; g bf16/fp32; w fp32; m, v
    fp32, or bf16 (m rounded to nearest, v stochastically, and the update reads them so rounded); scal: the
    group's [SCAL] fp32 scalars; inv_scale: 1 / grad_scale (a number or a 0-d fp32 tensor); t: the tensor's
    index in the update (the stochastic rounding's hash reads it)."""
    decay, beta1, beta2, eps, step_size, vscale, one_m_b1, one_m_b2 = (scal[i] for i in range(8))
    gf = g.float() * inv_scale
    mf, vf = m.float(), v.float()
    m.copy_(mf + one_m_b1 * (gf - mf))
    vf = beta2 * vf + one_m_b2 * gf * gf
    v.copy_(sr_bf16(vf, t, scal[8].to(torch.int64)) if v.dtype == torch.bfloat16 else vf)
    w.copy_(w * decay - step_size * (m.float() / (torch.sqrt(v.float()) * vscale + eps)))
    p.copy_(w.to(torch.bfloat16))


def check_adam_settings(name: str, lr, betas, eps: float, weight_decay: float) -> None:
    """One line naming a bad setting, at construction (as torch.optim.AdamW does): a negative lr trains uphill
    without a word, a beta of 1 divides by zero at the first step."""
    if not torch.is_tensor(lr) and not lr >= 0:
        raise ValueError(f"{name}: invalid lr={lr}: expected >= 0")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"{name}: invalid betas={tuple(betas)}: expected two values (beta1, beta2), each in [0, 1)")
    if not eps >= 0:
        raise ValueError(f"{name}: invalid eps={eps}: expected >= 0")
    if not weight_decay >= 0:
        raise ValueError(f"{name}: invalid weight_decay={weight_decay}: expected >= 0")


class FP32Masters:
    """What an optimizer over bf16 parameters needs besides its update (mixed into MasterAdamW and LOROAdamW):
    fp32 master copies in the state ("master"), fp32 gradient sums across micro-batches (`accumulate`), the
    gradients to clip (`grads`), and a load_state_dict that keeps the state fp32. `has_masters` is False for an
    optimizer over fp32 parameters, which then behaves exactly as without the mixin."""

    has_masters = False  # set in _init_masters
    moment_dtype = torch.float32  # the Adam moments' dtype in the fused update (MasterAdamW's optim_state_dtype)

    def _init_masters(self) -> None:
        params = [p for g in self.param_groups for p in g["params"]]
        self.has_masters = bool(params) and all(p.dtype == torch.bfloat16 for p in params)
        self._acc: dict[torch.Tensor, torch.Tensor] = {}  # fp32 gradient sums of accumulated micro-batches
        if self.has_masters:
            for p in params:  # masters now, not at the first step: a checkpoint before it has them too
                self.master(p)

    def master(self, p: torch.Tensor) -> torch.Tensor:
        """The fp32 weight an update changes: p's master copy (p itself when the parameters are not bf16)."""
        if not self.has_masters:
            return p
        st = self.state[p]
        if "master" not in st:
            st["master"] = p.detach().float().contiguous()
        return st["master"]

    @torch.no_grad()
    def edit_(self, p: torch.Tensor, fn) -> None:
        """p <- fn(p) where the training changes a weight outside the update (a sparsity method's mode switch):
        applied to the fp32 master, then published to p, so the next update starts from the edited weight. On
        FSDP2's shards fn sees this process's rows (it must work row by row)."""
        local = (lambda t: t.to_local() if hasattr(t, "to_local") else t)
        m = local(self.master(p))
        m.copy_(fn(m))
        if self.has_masters:
            local(p).copy_(m)

    def publish(self, params: list[torch.Tensor]) -> None:
        """params <- their masters rounded to bf16 (after an update that wrote the masters)."""
        if self.has_masters and params:
            torch._foreach_copy_([p.data for p in params], [self.state[p]["master"] for p in params])

    # -- gradients ---------------------------------------------------------------------------------------------
    @property
    def fp32_accumulation(self) -> bool:
        """Whether micro-batch gradients should be summed here (bf16 .grad would sum in bf16)."""
        return self.has_masters

    @torch.no_grad()
    def accumulate(self, first: bool) -> None:
        """Add every parameter's bf16 gradient into its fp32 sum (first: overwrite) and drop the gradient."""
        ps = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not ps:
            return
        for p in ps:
            if p not in self._acc:
                self._acc[p] = torch.zeros_like(p, dtype=torch.float32)
        acc = [self._acc[p] for p in ps]
        grads = [p.grad for p in ps]
        if first:
            torch._foreach_copy_(acc, grads)
        else:
            torch._foreach_add_(acc, grads)
        for p in ps:
            p.grad = None

    def grad_of(self, p: torch.Tensor) -> torch.Tensor | None:
        """The gradient an update reads: the fp32 sum after `accumulate`, else `.grad`."""
        return self._acc.get(p) if self._acc else p.grad

    def grads(self) -> list[torch.Tensor]:
        """Every gradient the next update reads (what the step's clipping measures and scales)."""
        return [g for g in (self.grad_of(p) for grp in self.param_groups for p in grp["params"]) if g is not None]

    # -- the fused update (MasterAdamW's step; LORO's lazy steps) ---------------------------------------------
    def _init_fused(self, backend: str) -> None:
        """backend: auto (the Triton kernel on CUDA where Triton is installed, else the reference), reference or
        triton. Per group, SCAL fp32 scalars on the device: (decay, beta1, beta2, eps, step_size, vscale,
        1 - beta1, 1 - beta2, step) (master_triton.py)."""
        if backend not in ("auto", "reference", "triton"):
            raise ValueError(f"invalid {type(self).__name__} backend {backend!r}: expected auto, reference or triton")
        params = [p for g in self.param_groups for p in g["params"]]
        dev = params[0].device
        if backend == "auto":
            import importlib.util
            backend = "triton" if dev.type == "cuda" and importlib.util.find_spec("triton") else "reference"
        self.backend = backend
        self._scal = torch.zeros(self._scalar_rows(), SCAL, dtype=torch.float32, device=dev)
        self._tab = self._chunks = self._sumsq = None
        self._numels: list[int] = []
        self._align = 1  # master_triton.alignment of the stepped tensors (with the chunk table)
        self._tab_key: tuple | None = None
        self._staging = _PinnedRing(self._scal.shape) if dev.type == "cuda" else None

    def _adam_state(self, p: torch.Tensor) -> dict:
        st = self.state[p]
        if "exp_avg" not in st:
            self.master(p)
            st["exp_avg"] = torch.zeros_like(st["master"], dtype=self.moment_dtype)
            st["exp_avg_sq"] = torch.zeros_like(st["master"], dtype=self.moment_dtype)
        return st

    def _scalar_rows(self) -> int:
        """Rows of scalars the update reads: one per group (an optimizer may add rows: _row_of)."""
        return len(self.param_groups)

    def _row_of(self, gi: int, p: torch.Tensor) -> int:
        """The row of scalars parameter p of group gi steps with."""
        return gi

    def _stepping(self) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """(scalar row, parameter, gradient) of every parameter that has a gradient."""
        out = []
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                g = self.grad_of(p)
                if g is not None:
                    out.append((self._row_of(gi, p), p, g))
        return out

    def _write_scalars(self, rows: list[list[float]]) -> None:
        """Each group's scalars into device memory, stream-ordered (no host stall)."""
        if self._scal.is_cuda:
            self._staging.put(self._scal, rows)
        else:
            self._scal.copy_(torch.tensor(rows, dtype=torch.float32))
        if self.backend == "triton":
            self._refresh_table()

    @torch.no_grad()
    def _fused_update(self, grad_scale: torch.Tensor | None = None, dry: bool = False) -> None:
        """w <- w decay - step_size m / (sqrt(v) vscale + eps), moments and bf16 parameter with it, for every
        parameter with a gradient, from the scalars of its group (master_triton.py). Capturable."""
        items = self._stepping()
        if not items:
            return
        if self.backend == "reference":
            if dry:
                return
            inv = 1.0 if grad_scale is None else 1.0 / grad_scale.float()
            for t, (gi, p, g) in enumerate(items):  # t: the kernel's row of the tensor
                st = self._adam_state(p)
                adamw_reference(p.data, g, st["master"], st["exp_avg"], st["exp_avg_sq"], self._scal[gi], inv, t)
            return
        from . import master_triton
        capturing = self._scal.is_cuda and torch.cuda.is_current_stream_capturing()
        if not capturing:  # a capture reads the table that the prepare() after it writes
            self._refresh_table()
        master_triton.adamw_step(self._tab, self._chunks, self._scal, grad_scale, grad_fp32=bool(self._acc),
                                 moments_bf16=self.moment_dtype == torch.bfloat16, dry=dry, align=self._align)

    def grad_norm(self) -> torch.Tensor | None:
        """The global L2 norm (0-d fp32) of the gradients the next update reads, in one kernel over the update's
        table: each chunk's sum of squares, then their sum (deterministic). None where the Triton update does
        not run (the caller measures the norm itself). Capturable, as the update."""
        if self.backend != "triton" or not self._stepping():
            return None
        from . import master_triton
        if not (self._scal.is_cuda and torch.cuda.is_current_stream_capturing()):
            self._refresh_table()
        master_triton.grad_sumsq(self._tab, self._chunks, self._sumsq, grad_fp32=bool(self._acc), align=self._align)
        return self._sumsq.sum().sqrt()

    def sync_table(self) -> None:
        """Before a graph replay whose captured kernels (the norm) read the table but whose update runs outside
        the graph: the table holds the current gradients' addresses (a host check when nothing changed)."""
        if self.backend == "triton" and self._stepping():
            self._refresh_table()

    def _refresh_table(self) -> None:
        """The table of addresses the kernel reads; rebuilt only when an address changed (a new gradient buffer,
        a loaded state). Inside a graph capture nothing may be copied from the host: the captured kernel reads
        the table at each replay, and the prepare() before the first replay writes the captured addresses."""
        items = self._stepping()
        key = tuple(g.data_ptr() for _, _, g in items)  # the other addresses change only in load_state_dict
        if key == self._tab_key:
            return
        rows = []
        for gi, p, g in items:
            st = self._adam_state(p)
            ts = (p, g, st["master"], st["exp_avg"], st["exp_avg_sq"])
            if not all(t.is_contiguous() for t in ts) or any(t.data_ptr() % 16 for t in ts):
                raise RuntimeError(f"{type(self).__name__}: a parameter of shape {tuple(p.shape)} or its gradient/"
                                   f"state is not a contiguous 16-byte-aligned tensor; use backend='reference'")
            rows.append([t.data_ptr() for t in ts] + [p.numel(), gi, 0])
        from .master_triton import alignment, chunk_table
        dev = items[0][1].device
        numels = [p.numel() for _, p, _ in items]
        if self._tab is None or self._tab.shape[0] != len(rows):
            self._tab = torch.empty(len(rows), 8, dtype=torch.int64, device=dev)
        # the chunks follow the sizes of the tensors that have gradients, not just their count (another set of the
        # same count would otherwise step with the first set's chunks)
        if numels != self._numels:
            self._numels = numels
            self._chunks = chunk_table(numels, dev)
            self._align = alignment(numels)
            self._sumsq = torch.empty(self._chunks.shape[0], dtype=torch.float32, device=dev)  # grad_norm's
        host = torch.tensor(rows, dtype=torch.int64)
        self._tab.copy_(host.pin_memory() if dev.type == "cuda" else host, non_blocking=True)
        self._tab_key = key

    # -- checkpoints -------------------------------------------------------------------------------------------
    def _load_keeping_fp32(self, state_dict: dict) -> None:
        """torch's Optimizer.load_state_dict casts floating state to the parameters' dtype (bf16 here): the
        masters are put back in fp32, the moments in `moment_dtype` (a state saved with the other one is cast:
        optim_state_dtype may change on resume)."""
        raw = state_dict["state"]
        if self.has_masters and any("master" not in st for st in raw.values()):
            raise ValueError("this optimizer state has no fp32 master weights (it was written by an optimizer over "
                             "fp32 parameters): resume it with param_dtype=fp32")
        torch.optim.Optimizer.load_state_dict(self, state_dict)
        if not self.has_masters:
            return
        params = [p for g in self.param_groups for p in g["params"]]
        for i, st in raw.items():
            p = params[int(i)]
            for k, v in st.items():
                if torch.is_tensor(v) and v.is_floating_point():
                    dt = self.moment_dtype if k in ("exp_avg", "exp_avg_sq") else torch.float32
                    self.state[p][k] = v.to(device=p.device, dtype=dt, copy=True).contiguous()


class MasterAdamW(FP32Masters, torch.optim.Optimizer):
    """AdamW (decoupled weight decay, torch's formula) for bf16 parameters with fp32 master weights. See module
    docs. `backend`: auto (the Triton kernel on CUDA tensors where Triton is installed, else the reference),
    reference, or triton."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 backend: str = "auto", moment_dtype: torch.dtype = torch.float32):
        if moment_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"MasterAdamW keeps its moments in float32 or bfloat16, got {moment_dtype}")
        check_adam_settings("MasterAdamW", lr, betas, eps, weight_decay)
        self.moment_dtype = moment_dtype
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        for g in self.param_groups:
            g.setdefault("step", 0)
            for p in g["params"]:
                if p.dtype != torch.bfloat16:
                    raise ValueError(f"MasterAdamW updates bf16 parameters (with fp32 masters), got a {p.dtype} "
                                     f"parameter of shape {tuple(p.shape)}")
        params_all = [p for g in self.param_groups for p in g["params"]]
        if not params_all:
            raise ValueError("MasterAdamW got no parameters")
        self._init_fused(backend)
        self.grad_scale: torch.Tensor | None = None  # set by the training step: max(1, norm / clip)
        self._init_masters()
        for p in params_all:
            self._adam_state(p)

    capturable = True  # apply() reads everything from device memory: a CUDA graph may capture it

    # -- the step ----------------------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Host half of a step: count it and write each group's scalars to the device (stream-ordered)."""
        rows = []
        for group in self.param_groups:
            group["step"] += 1
            k, (b1, b2) = group["step"], group["betas"]
            lr, wd = float(group["lr"]), float(group["weight_decay"])
            rows.append([1.0 - lr * wd, b1, b2, group["eps"], lr / (1.0 - b1 ** k), 1.0 / math.sqrt(1.0 - b2 ** k),
                         1.0 - b1, 1.0 - b2, float(k % 2 ** 24)])  # (the seed: exact in fp32)
        self._write_scalars(rows)

    def apply(self, dry: bool = False) -> None:
        """Device half of a step: the update of every parameter from the scalars `prepare` wrote. Capturable."""
        self._fused_update(self.grad_scale, dry)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:  # (torch's contract: the closure computes the loss and its gradients)
            with torch.enable_grad():
                loss = closure()
        self.prepare()
        self.apply()
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        if any("step" not in g for g in state_dict["param_groups"]):
            raise ValueError("this optimizer state was not written by MasterAdamW (its groups have no step count): "
                             "resume it with param_dtype=fp32")
        self._load_keeping_fp32(state_dict)
        self._tab_key = None


class _PinnedRing:
    """Per-step host -> device copies of a few numbers without a host stall: a fresh pinned tensor per step can
    make the caching host allocator call cudaHostAlloc, which waits for the GPU (measured: the replayed 1B step
    then idled ~4 ms per step). Slots are reused in turn; a slot is rewritten only once its last copy ran."""

    def __init__(self, shape, slots: int = 8):
        self.bufs = [torch.empty(shape, dtype=torch.float32).pin_memory() for _ in range(slots)]
        self.events: list = [None] * slots
        self.i = 0

    def put(self, dst: torch.Tensor, rows) -> None:
        i, self.i = self.i, (self.i + 1) % len(self.bufs)
        if self.events[i] is not None:
            self.events[i].synchronize()  # the copy from `slots` steps ago; done unless the host ran far ahead
        self.bufs[i].copy_(torch.tensor(rows, dtype=torch.float32))
        dst.copy_(self.bufs[i], non_blocking=True)
        self.events[i] = torch.cuda.Event()
        self.events[i].record()
