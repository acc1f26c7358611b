"""torchrun integration: `torchrun --nproc_per_node N -m elas train ...` runs DDP (NCCL on GPU, gloo on CPU)."""
from __future__ import annotations

import gc
import os
import sys
import threading
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> Dist:
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist()
    d = Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return d


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def agree(d: Dist, error: str | None, settings: dict) -> str | None:
    """Every process's start-up, compared before the work that needs them alike: one process's error (its
    message), or the settings in which processes differ (each key with its value per rank), as the message every
    process stops with; None when all agree. settings: flat {key: value} of what must be equal (the resolved
    config, the data's fingerprint). Without this, one failing process leaves the others in a collective (a
    traceback from gloo, or a hang under FSDP2), and ranks with other settings train wrongly without a word."""
    if not d.enabled:
        return error
    got: list = [None] * d.world
    dist.all_gather_object(got, (error, settings))
    for r, (e, _) in enumerate(got):
        if e:
            return e if r == d.rank else f"rank {r}: {e}"
    ref = got[0][1]
    diff = []
    for k in sorted(set().union(*(s for _, s in got))):
        vals = [s.get(k) for _, s in got]
        if any(v != ref.get(k) for v in vals):
            diff.append(f"{k}: " + ", ".join(f"rank {r} {v!r}" for r, v in enumerate(vals)))
    if diff:
        return (f"the processes were started with different settings ({'; '.join(diff[:4])}"
                f"{f'; and {len(diff) - 4} more' if len(diff) > 4 else ''}): give every process the same command")
    return None


def agree_stop(d: Dist, signum: int | None, device: torch.device) -> int | None:
    """The stop signal any process got (the largest number), or None: every process decides alike whether to go
    on (the grid's next run) or stop. A collective, so it also waits for every process, as a barrier would."""
    if not d.enabled:
        return signum
    t = torch.full((1,), float(signum or 0), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item()) or None


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


TEARDOWN_TIMEOUT_S = 60.0


def shutdown(d: Dist, wait: bool = False, timeout_s: float = TEARDOWN_TIMEOUT_S) -> bool:
    """Tear down the process group; wait: first a barrier (only where every process got here the same way).

    True once it is down. False when `destroy_process_group` has not returned within timeout_s (a rare hang at
    teardown, seen on gloo with 4 processes on 2 cores; pytorch#75097): the stacks of this process's threads go to
    stderr and the caller, whose work is saved by then, may leave without a full interpreter exit."""
    if not (d.enabled and dist.is_initialized()):
        return True
    if wait:
        dist.barrier()
    # what still refers to the group's last works (the caller has dropped DDP's reducer) is freed now, while the
    # interpreter is whole: freed at interpreter exit, their tensors are released from the backend's threads
    gc.collect()
    done, error = threading.Event(), []

    def destroy():
        try:
            dist.destroy_process_group()
        except BaseException as e:  # noqa: BLE001 - raised below, in the caller's thread
            error.append(e)
        finally:
            done.set()
    threading.Thread(target=destroy, name="elas-teardown", daemon=True).start()
    if done.wait(timeout_s):
        if error:
            raise error[0]
        return True
    names = {t.ident: t.name for t in threading.enumerate()}
    stacks = "".join(f"thread {names.get(i, i)}:\n" + "".join(traceback.format_stack(f))
                     for i, f in sys._current_frames().items())
    print(f"elas: rank {d.rank}: the process group did not come down within {timeout_s:g} s (the run itself is "
          f"complete); where this process's threads are:\n{stacks}", file=sys.stderr, flush=True)
    return False
