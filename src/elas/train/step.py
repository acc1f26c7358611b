"""The gradient half of a training step, eager or replayed from a CUDA graph.

`StepGrads.run(micro_batches, mode)` zeroes the gradients, runs forward + backward on each of the `grad_accum`
micro-batches (gradients accumulate in place, or in the optimizer's fp32 sums), clips the global gradient norm
and steps the optimizer; it returns (mean loss, grad norm) as device tensors. A `capturable` optimizer
(MasterAdamW: everything it reads is in device memory) is stepped inside the graph; others after the replay
(torch's fused AdamW; LORO, whose exact step needs cuSOLVER and a host decision every K steps).

Why a graph: eagerly, one micro-batch of a 24-layer model issues thousands of kernel launches plus autograd and
Python bookkeeping (the packed 2:4 path adds an autograd Function, Triton launches and GEMM-plan lookups per FFN).
Small models and batches then wait on the host. Pre-training shapes are fixed, so the whole sequence above is
captured once into one graph and replayed: one launch per step, and the GPU never waits for Python.

Graph mode, in detail:
- inputs are static buffers x, y: [grad_accum, batch, seq] int64, refilled before each replay;
- gradients are created by the captured backward itself (they are None when the capture starts), so they live
  in the graph's memory pool and are allocated at the point eager backward would allocate them. Measured, a
  graph step peaks 0.3-2.4 GB above an eager one at the papers' batch sizes (5.3 GB for 1B SwiGLU at batch 32:
  the pool is carved once and cannot be re-split as freely as the eager cache). After the capture `p.grad` keeps pointing at them; every replay rewrites
  them and the eagerly run optimizer reads them. (Gradients allocated before the capture, outside the pool,
  cost their whole size on top of the activations' peak: 1B SwiGLU at batch 64 then ran out of memory.)
- `mode` names what the forward does (the trainer passes the sparsity methods' modes, sparsity.set_step): a new
  mode (the end of a dense warm-up) drops the old graph and captures a new one;
- the warm-up passes before a capture run on a side stream (as CUDA graphs require); they also compile the
  Triton kernels and tune the 2:4 GEMM algorithm of every shape, which must not happen inside a capture;
- a capture that fails (an op that is not graph-safe, or out of memory) is reported once and the run continues
  eagerly. Measured limits (H100 80 GB, torch 2.11): capturing needs more memory than an eager step (1B SwiGLU
  at batch 64 fits eagerly, not captured), and the memory a failed capture had taken is not all returned (~90 MB
  of a small model's step; 7.9 GB at 1B), so an eager step at the edge of memory can then run out: there, set
  cuda_graphs=false.
"""
from __future__ import annotations

import logging
from contextlib import nullcontext

import torch

from ..graphs import graph_capture
from ..kernels.cuda.gemm import capture_failure, reset_generator_capture_state

log = logging.getLogger("elas.train")


class StepGrads:
    def __init__(self, model: torch.nn.Module, fwd, autocast, grad_accum: int, grad_clip: float,
                 no_sync=None, graphs: bool = False, warmup: int = 2, clip_into=None, optimizer=None):
        """model: the module whose parameters get gradients; fwd: the callable that runs it (model, DDP or
        compiled); autocast: a context factory; no_sync: DDP's no_sync for all but the last micro-batch;
        optimizer: stepped by `run` after the gradients (inside the graph when it is `capturable`: MasterAdamW),
        or None (the caller steps); clip_into: the optimizer that applies the clipping (see _body), by default
        `optimizer`, used where it folds the clip into its kernel (fused torch Adam/AdamW, MasterAdamW); False:
        clip the gradients themselves (clip_grad_norm_)."""
        self.model, self.fwd, self.autocast = model, fwd, autocast
        self.optimizer = optimizer
        clip_into = optimizer if clip_into is None else clip_into
        folds = clip_into not in (None, False) and bool(clip_into.defaults.get("fused")
                                                        or getattr(clip_into, "capturable", False))
        self.clip_into = clip_into if folds else None
        self.grad_accum, self.grad_clip, self.no_sync = grad_accum, grad_clip, no_sync
        self.graphs, self.warmup = graphs, warmup
        # the optimizer's own fp32 accumulation (MasterAdamW: bf16 gradients are summed in fp32, not in .grad)
        self.accumulates = grad_accum > 1 and getattr(optimizer, "fp32_accumulation", False)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.mode = None
        self.x = self.y = None  # static inputs in graph mode: [grad_accum, batch, seq]
        self.out: tuple[torch.Tensor, torch.Tensor] | None = None
        self.captures = 0  # how many graphs were captured (the tests and the trainer's log read it)

    @property
    def step_in_graph(self) -> bool:
        """The optimizer's update is part of the captured graph (replayed with it)."""
        return self.graphs and getattr(self.optimizer, "capturable", False)

    # -- the work, shared by both modes ----------------------------------------------------------------------
    def _params(self) -> list[torch.Tensor]:
        return [p for p in self.model.parameters() if p.grad is not None]

    def _body(self, xs, ys, update: str = "none") -> tuple[torch.Tensor, torch.Tensor]:
        """xs, ys: sequences of grad_accum [batch, seq] tensors on the device. update: "none" (gradients only),
        "apply" (then the capturable optimizer's device-side update) or "dry" (its kernel without effect)."""
        grads = [p.grad for p in self._params()]
        if grads:
            torch._foreach_zero_(grads)
        loss_sum = None
        for k in range(self.grad_accum):
            last = k == self.grad_accum - 1
            sync = self.no_sync() if (self.no_sync is not None and not last) else nullcontext()
            with sync:
                with self.autocast():
                    loss = self.fwd(xs[k], ys[k])
                (loss / self.grad_accum).backward()
            if self.accumulates:
                self.optimizer.accumulate(first=k == 0)
            loss_sum = loss.detach().float() if loss_sum is None else loss_sum + loss.detach().float()
        params = self._params()
        own = getattr(self.optimizer, "has_masters", False)  # bf16 parameters: the optimizer says which gradients
        grads = self.optimizer.grads() if own else [p.grad for p in params]
        if self.grad_clip > 0 and self.clip_into is None:
            if own:  # the fp32 sums (or bf16 .grads), scaled as clip_grad_norm_ scales
                gnorm = self._norm(grads)
                torch._foreach_mul_(grads, torch.clamp(self.grad_clip / (gnorm + 1e-6), max=1.0))
            else:
                gnorm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        else:
            gnorm = self._norm(grads) if own else _total_norm(grads)
            if self.grad_clip > 0:
                # fused Adam/AdamW and MasterAdamW divide every gradient by `grad_scale` inside their one kernel
                # (the hook AMP's GradScaler uses): clipping by max(1, norm / clip) there saves a read and a write
                # of every gradient (~1 ms per step at 1B). The coefficient is clip_grad_norm_'s: clip / (norm + 1e-6).
                self.clip_into.grad_scale = torch.clamp((gnorm + 1e-6) / self.grad_clip, min=1.0)
        if hasattr(gnorm, "full_tensor"):  # FSDP2: a DTensor whose value is the global norm
            gnorm = gnorm.full_tensor()
        if update != "none":
            self.optimizer.apply(dry=update == "dry")
        return loss_sum / self.grad_accum, gnorm

    def _norm(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """The gradients' global norm: from the optimizer's own kernel where it has one (one launch over its
        table, fp32 throughout), else torch's (a launch per ~100 tensors), fp32 for bf16 gradients too."""
        norm = self.optimizer.grad_norm() if hasattr(self.optimizer, "grad_norm") else None
        if norm is not None:
            return norm
        if grads and any(g.dtype != torch.float32 for g in grads) and not any(hasattr(g, "full_tensor")
                                                                         for g in grads):  # (not DTensors)
            # bf16 gradients (the reference backend): per-tensor norms in fp32, as the kernel's; torch's norm of bf16
            # tensors is a bf16 number (the clip coefficient rounded to 8 bits, its + 1e-6 lost)
            return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)))
        return _total_norm(grads)

    # -- entry point ---------------------------------------------------------------------------------------------
    def run(self, micro_batches, mode=None) -> tuple[torch.Tensor, torch.Tensor]:
        """micro_batches: grad_accum (x, y) pairs of [batch, seq] int64 (any device); mode: what the forward
        does (the sparsity methods' modes): a new one drops the graph and captures another. Steps the optimizer
        (when one was given); returns (mean loss, gradient norm) as device tensors."""
        device = next(self.model.parameters()).device
        if not self.graphs:
            batches = [(x.to(device, non_blocking=True), y.to(device, non_blocking=True)) for x, y in micro_batches]
            out = self._body([b[0] for b in batches], [b[1] for b in batches])
            self._step_eagerly()
            return out
        xs, ys = zip(*micro_batches)
        if self.x is None or self.x.shape[1:] != xs[0].shape:
            self.x = torch.empty((self.grad_accum, *xs[0].shape), dtype=torch.long, device=device)
            self.y = torch.empty_like(self.x)
            self.graph = None
        for k in range(self.grad_accum):  # from pinned memory: a copy from pageable memory would first wait for
            self.x[k].copy_(_pinned(xs[k]), non_blocking=True)  # the previous step's replay to finish
            self.y[k].copy_(_pinned(ys[k]), non_blocking=True)
        if self.graph is None or mode != self.mode:
            if not self._capture(mode):
                out = self._body(self.x, self.y)
                self._step_eagerly()
                return out
        if self.step_in_graph:
            self.optimizer.prepare()  # host half: step count and lr into device memory, before the replay
        elif hasattr(self.optimizer, "sync_table"):
            # the captured norm kernel reads the optimizer's table of gradient addresses at each replay: after a
            # capture it must hold the graph's gradients, not the warm-up's freed ones (prepare() does this above)
            self.optimizer.sync_table()
        self.graph.replay()
        if self.optimizer is not None and not self.step_in_graph:
            self.optimizer.step()
        return self.out[0].clone(), self.out[1].clone()  # the next replay overwrites the graph's outputs

    def _step_eagerly(self) -> None:
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)  # free the gradients until the next backward

    def _capture(self, mode) -> bool:
        self.graph, self.out = None, None
        self._drop_grads()  # they lived in the previous graph's pool
        graph = out = failure = None
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            update = "dry" if self.step_in_graph else "none"  # the warm-up must not move the weights
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self._body(self.x, self.y, update)
            torch.cuda.current_stream().wait_stream(side)
            # the warm-up's gradients sit between its (freed) activations: dropping them lets every warm-up
            # segment go back to the driver, and the capture then allocates gradients where eager backward
            # would, so a graph step peaks at the memory of an eager one
            self._drop_grads()
            graph = torch.cuda.CUDAGraph()
            with graph_capture(graph):  # (a cuBLAS workspace of its own: elas/graphs.py)
                out = self._body(self.x, self.y, "apply" if self.step_in_graph else "none")
        except RuntimeError as e:  # includes torch.OutOfMemoryError
            failure = capture_failure(e, 200)
        if failure is not None:
            # cleaned up here, not in the except block: the exception's traceback holds the failed pass's tensors,
            # and the half-captured graph holds its memory pool; both must be gone before empty_cache, or the eager
            # steps that follow run short of memory
            graph = out = None
            self.graphs = False
            self._drop_grads()
            reset_generator_capture_state()
            log.warning("elas: CUDA-graph capture of the training step failed (%s); continuing with eager steps "
                        "(set cuda_graphs=false to skip the attempt)", failure)
            return False
        self.graph, self.out, self.mode = graph, out, mode
        self.captures += 1
        return True

    def _drop_grads(self) -> None:
        for p in self.model.parameters():
            p.grad = None
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The global L2 norm of grads (plain tensors or FSDP2's DTensor shards), with no host sync."""
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6: also reduces DTensor shards
        return torch.nn.utils.get_total_norm(grads)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def _pinned(t: torch.Tensor) -> torch.Tensor:
    return t.pin_memory() if t.device.type == "cpu" and not t.is_pinned() else t
