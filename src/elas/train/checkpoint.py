"""Atomic, verifiable checkpoints.

Layout of a run directory:
    checkpoints/step-00000200/model.safetensors   weights (safetensors)
    checkpoints/step-00000200/optimizer.pt        optimizer state and RNG states (torch.save of tensors)
    checkpoints/step-00000200/trainer.json        step, tokens seen, data position, metrics summary
    checkpoints/step-00000200/manifest.json       written last: size and xxh3-64 hash of each file above
    checkpoints/latest                            name of the newest complete checkpoint (for people and tools)
A sharded (FSDP2) run writes, instead of model.safetensors and optimizer.pt, `dcp/` (torch.distributed.checkpoint:
one file of shards per process plus `.metadata`; model and optimizer state by name, loadable on any number of
processes, one included) and `rng.pt`; `consolidate` adds the whole weights as model.safetensors.
A checkpoint is written to `step-N.tmp`, fsynced, renamed, and only then named in `latest` (itself replaced
atomically), so a kill or a full disk at any moment leaves the previous checkpoints whole. A resume does not
trust `latest`: `resume_checkpoint` takes the newest checkpoint whose manifest verifies, and moves the newer
ones that do not (truncated, zeroed, NaN-filled, half-deleted, without the manifest their trainer.json says they
were written with) aside as `step-N.corrupt`, saying why.
"""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
import sys
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import xxhash

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save as save_tensors, save_file

from ..data.prepare import fsync_dir


class CheckpointError(Exception):
    pass


def write_atomic(path: Path, data: bytes) -> None:
    """path holds data whole or keeps what it held: written beside it, fsynced, renamed over it."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # (two processes may write one file: the grid's summary)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk: no partial temporary file left beside it
        tmp.unlink(missing_ok=True)
        raise


MANIFEST = "manifest.json"
SINGLE_FILES = ("model.safetensors", "optimizer.pt", "trainer.json")
SHARDED_FILES = ("dcp/.metadata", "rng.pt", "trainer.json")
_CHUNK = 64 << 20


def _file_hash(path: Path) -> str:
    h = xxhash.xxh3_64()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _write_manifest(ckdir: Path, known: dict[str, str] | None = None) -> None:
    """manifest.json: every file's size and xxh3 hash; `known` hashes (by relative path, computed while the file
    was written) are not read back."""
    known = known or {}
    files = {str(f.relative_to(ckdir)): {"bytes": f.stat().st_size,
                                         "xxh3_64": known.get(str(f.relative_to(ckdir))) or _file_hash(f)}
             for f in sorted(ckdir.rglob("*")) if f.is_file() and f.name != MANIFEST}
    write_atomic(ckdir / MANIFEST, json.dumps({"version": 1, "files": files}, indent=1).encode())


def verify_checkpoint(ckpt: Path) -> str | None:
    """None when every file of the checkpoint matches its manifest; otherwise why not (one phrase)."""
    try:
        files = json.loads((ckpt / MANIFEST).read_text())["files"]
    except FileNotFoundError:  # written by an elas before manifests (always whole: it was renamed into place)
        names = SHARDED_FILES if (ckpt / "dcp").is_dir() else SINGLE_FILES
        missing = [n for n in names if not (ckpt / n).is_file()]
        if missing:
            return f"{missing[0]} is missing"
        try:  # a checkpoint that had one (its trainer.json says so) lost it: nothing vouches for its files
            marked = "manifest" in json.loads((ckpt / "trainer.json").read_text())
        except (OSError, ValueError, TypeError):
            return "its trainer.json is unreadable"
        return "its manifest is missing" if marked else None
    except (OSError, ValueError, KeyError, TypeError):
        return "its manifest is unreadable"
    for name in (SHARDED_FILES if "dcp/.metadata" in files else SINGLE_FILES):
        if name not in files:
            return f"its manifest does not list {name}"
    for name, want in files.items():
        f = ckpt / name
        if not f.is_file():
            return f"{name} is missing"
        try:
            if f.stat().st_size != want["bytes"]:
                return f"{name} has {f.stat().st_size} bytes, the manifest says {want['bytes']}"
            if _file_hash(f) != want["xxh3_64"]:
                return f"{name} does not match its hash (corrupted)"
        except OSError as e:  # (an I/O error reading it: as damaged as a wrong hash)
            return f"{name} cannot be read ({os.strerror(e.errno) if e.errno else e})"
    _vouch(ckpt)
    return None


# checkpoints known whole in this process (written by it, or verified by it), by path, with their manifest's
# modification time: _make_room then need not hash them again (at 7B ~84 GB, while a sharded save's other ranks
# wait in a collective)
_VOUCHED: dict[str, int] = {}


def _manifest_mtime(ckpt: Path) -> int | None:
    try:
        return (ckpt / MANIFEST).stat().st_mtime_ns
    except OSError:
        return None


def _vouch(ckpt: Path) -> None:
    mtime = _manifest_mtime(ckpt)
    if mtime is not None:
        _VOUCHED[str(ckpt)] = mtime


def _complete(ckpt: Path) -> bool:
    """Known whole in this process (and not rewritten since), else verified now."""
    mtime = _manifest_mtime(ckpt)
    return (mtime is not None and _VOUCHED.get(str(ckpt)) == mtime) or verify_checkpoint(ckpt) is None


def _step_of(p: Path) -> int | None:
    tail = p.name.removeprefix("step-")
    return int(tail) if p.name.startswith("step-") and tail.isdigit() else None


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint directories (step-N, not .tmp or .corrupt), newest step first."""
    ckdir = Path(run_dir) / "checkpoints"
    if not ckdir.is_dir():
        return []
    found = [p for p in ckdir.iterdir() if p.is_dir() and _step_of(p) is not None]
    return sorted(found, key=_step_of, reverse=True)


def resume_checkpoint(run_dir: Path, log: Callable[[str], None] = print) -> Path | None:
    """The newest checkpoint that verifies, whatever `latest` says; newer ones that do not are renamed
    step-N.corrupt (kept for inspection, out of the run's way), one log line each; `latest` then names the one
    taken (it named one moved aside until the next save)."""
    moved = False
    for ckpt in checkpoints(run_dir):
        why = verify_checkpoint(ckpt)
        if why is None:
            if moved:
                try:
                    write_atomic(ckpt.parent / "latest", ckpt.name.encode())
                except OSError:  # (a resume takes the newest that verifies whatever `latest` says)
                    pass
            return ckpt
        aside = ckpt.with_name(ckpt.name + ".corrupt")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(ckpt, aside)
        log(f"elas: skipping checkpoint {ckpt.name}: {why}; moved to {aside.name}")
        moved = True
    return None


def newest_verified(run_dir: Path) -> Path | None:
    """The newest checkpoint that verifies (read-only: nothing is moved)."""
    return next((c for c in checkpoints(run_dir) if verify_checkpoint(c) is None), None)


def rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _to_cpu(obj):
    """obj (nested dicts, lists, tuples of tensors and plain values) with every tensor copied to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def snapshot(model: torch.nn.Module, optimizer) -> dict:
    """CPU copies of what a one-file checkpoint holds, taken now: the weights, the optimizer's state and the RNG
    states. Training may go on while a `save_checkpoint(..., snap=)` writes them (the trainer's BackgroundSaver);
    the copies cost host memory of the checkpoint's size."""
    return {"weights": {k: v.detach().contiguous().to("cpu", copy=True) for k, v in model.state_dict().items()},
            "optimizer": _to_cpu(optimizer.state_dict()), "rng": rng_state()}


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, optimizer, trainer_state: dict,
                    keep: int = 2, snap: dict | None = None) -> Path:
    """One-file checkpoint of step `step` (the state now, or `snap` from `snapshot`), written to a temporary
    directory and renamed; `latest` then names it and older ones beyond `keep` are removed."""
    ckdir = run_dir / "checkpoints"
    name = f"step-{step:08d}"
    final, tmp = ckdir / name, ckdir / (name + ".tmp")
    try:
        snap = snap if snap is not None else snapshot(model, optimizer)
        ckdir.mkdir(parents=True, exist_ok=True)
        _make_room(run_dir, step, _nbytes(snap))
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        hashes = {"model.safetensors": _write_hashed(tmp / "model.safetensors",
                                                     lambda fh: fh.write(save_tensors(snap["weights"])))}
        if os.environ.get("ELAS_FAULT_IN_CHECKPOINT") == str(step):  # fault injection: a kill mid-write (tests)
            os.kill(os.getpid(), 9)
        hashes["optimizer.pt"] = _write_hashed(
            tmp / "optimizer.pt", lambda fh: torch.save({"optimizer": snap["optimizer"], "rng": snap["rng"]}, fh))
        _finish(tmp, final, trainer_state, hashes)
    except Exception as e:  # noqa: BLE001 - whatever the writer raises (OSError, torch's RuntimeError,
        # SafetensorError on a full disk): one line, the partial checkpoint removed, the previous ones intact
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(run_dir, step, model, e) from None
    _prune(run_dir, step, final, keep)
    return final


class _Hashing:
    """A write-only file that hashes what passes through it (torch.save and safetensors write sequentially)."""

    def __init__(self, fh):
        self.fh, self.h = fh, xxhash.xxh3_64()

    def write(self, data) -> int:
        self.h.update(data)
        return self.fh.write(data)

    def flush(self) -> None:
        self.fh.flush()


def _write_hashed(path: Path, write: Callable) -> str:
    """write(file) into path; returns the xxh3 hash of the bytes written, so the manifest need not read the file
    back (at 7B that re-read of 36 GB took ~30 s of the ~85 s a checkpoint took)."""
    with open(path, "wb") as fh:
        hashing = _Hashing(fh)
        write(hashing)
    return hashing.h.hexdigest()


def _finish(tmp: Path, final: Path, trainer_state: dict, hashes: dict[str, str] | None = None) -> None:
    """trainer.json, fsync every file, the manifest last, rename into place, then point `latest` at it."""
    # "manifest": this checkpoint was written with one (one without it then is damaged, not from an older elas)
    (tmp / "trainer.json").write_text(json.dumps({**trainer_state, "manifest": 1}, indent=2))
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _write_manifest(tmp, hashes)  # last: a checkpoint whose manifest verifies was written whole
    # the directories too: a new file's name is durable only once the directory holding it is fsynced (without it a
    # machine crash after the rename, and after the prune of the older checkpoints, could leave step-N empty)
    for d in [*(p for p in tmp.rglob("*") if p.is_dir()), tmp]:
        fsync_dir(d)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    _vouch(final)  # (its manifest's hashes were taken from the bytes written)
    try:
        write_atomic(final.parent / "latest", final.name.encode())
    except OSError as e:  # the checkpoint is whole and in place: a resume takes it whatever `latest` says, so this
        # save succeeded (a failed save here would report a complete checkpoint as not written)
        print(f"elas: warning: checkpoint {final.name} is complete, but checkpoints/latest could not be updated "
              f"({os.strerror(e.errno) if e.errno else e}); a resume takes the newest complete checkpoint "
              f"regardless", file=sys.stderr)


class BackgroundSaver:
    """Writes one checkpoint at a time on a thread while training goes on: `submit(write)` waits for the previous
    write, then starts this one. A write's error is raised by the next `check` (each step), `submit` or `wait`. At 7B a one-file
    checkpoint (36 GB) took ~85 s to write, longer than the 200 steps between two saves."""

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, write: Callable[[], object]) -> None:
        self.wait()

        def run():
            try:
                write()
            except BaseException as e:  # noqa: BLE001 - handed to the training thread by wait()
                self._error = e
        self._thread = threading.Thread(target=run, name="elas-checkpoint")
        self._thread.start()

    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def check(self) -> None:
        """Raise the error of a write that has already finished (without waiting for one in flight): the trainer asks
        every step, so a failed checkpoint stops the run within a step, not a save interval later."""
        if self._thread is not None and not self._thread.is_alive():
            self.wait()

    def wait(self) -> None:
        """Block until the write in flight (if any) has finished; raise its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            e, self._error = self._error, None
            raise e


def _estimate_bytes(model: torch.nn.Module) -> int:
    """A checkpoint's size from the model alone: weights and two Adam moments in the weights' dtype (a sharded
    model's state_dict holds DTensors, whose numel is the whole tensor's: the size of all shards together)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values()) * 3


def _why(e: BaseException) -> str:
    """One line saying why: a sharded save's or load's CheckpointException names the first failing process and
    its error (its own first line is only "CheckpointException ranks:..."), any other error its first line."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, pair = next(iter(failures.items()))
        inner = pair[0] if isinstance(pair, tuple) else pair
        return f"process {rank}: {type(inner).__name__}: {str(inner).splitlines()[0] if str(inner) else ''}"
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _write_error(run_dir: Path, step: int, model: torch.nn.Module, e: BaseException) -> CheckpointError:
    ckdir = run_dir / "checkpoints"
    need = _estimate_bytes(model)
    try:
        free = f"{_size(shutil.disk_usage(ckdir if ckdir.exists() else run_dir).free)} free"
    except OSError:
        free = "free space unknown"
    prev = newest_verified(run_dir)
    msg = _why(e)[:120]
    return CheckpointError(f"could not write the checkpoint of step {step} in {ckdir} ({msg}); it needs about "
                           f"{_size(need)} ({free}); the newest complete checkpoint is "
                           f"{prev.name if prev else 'none'}")


def _size(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _nbytes(obj) -> int:
    """Bytes of the tensors in obj (nested dicts, lists, tuples)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def clear_partial(run_dir: Path) -> list[str]:
    """Remove the step-N.tmp directories that a killed save left behind (a SIGKILL mid-write: never renamed, so
    never loaded, but holding up to a whole checkpoint of disk that a later save of another step would not free).
    Called with the run's lock held, before any save: no other process writes there. Returns their names."""
    ckdir = Path(run_dir) / "checkpoints"
    gone = sorted(p.name for p in ckdir.glob("step-*.tmp") if p.is_dir()) if ckdir.is_dir() else []
    for name in gone:
        shutil.rmtree(ckdir / name, ignore_errors=True)
    return gone


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _make_room(run_dir: Path, step: int, need: int) -> None:
    """Before a checkpoint of `need` bytes is written: where the disk has less free space (5% margin), remove this
    run's older checkpoints, oldest first, but never the newest complete one (the newest that verifies), until it
    fits; keep_checkpoints is a ceiling. Where removing all of them would not make room, remove nothing and
    fail now (ENOSPC) rather than after a partial write. A 7B checkpoint is 36 GB: two of them and a third being
    written fill a 100 GB disk."""
    ckdir = Path(run_dir) / "checkpoints"
    free = shutil.disk_usage(ckdir).free
    if free >= need * 1.05:
        return
    older = [p for p in checkpoints(run_dir) if _step_of(p) < step]  # newest first
    # whole, not only a manifest present: a damaged newer one must not make the complete one behind it
    # removable. The ones newer than it are damaged (a resume could not use them): they go first, then the
    # older ones, oldest first
    at = next((i for i, p in enumerate(older) if _complete(p)), len(older))
    removable = older[:at] + older[at + 1:][::-1]
    sizes = [_dir_bytes(p) for p in removable]
    if free + sum(sizes) < need * 1.05:  # removing them all would not do: remove nothing
        raise OSError(errno.ENOSPC, f"not enough free space for the checkpoint ({_size(need)} needed, "
                                    f"{_size(free)} free, {_size(sum(sizes))} in older checkpoints)")
    for old, size in zip(removable, sizes):
        if free >= need * 1.05:
            break
        shutil.rmtree(old, ignore_errors=True)
        free += size


def _prune(run_dir: Path, step: int, final: Path, keep: int) -> None:
    """Keep the newest `keep` of this run's checkpoints up to this step (its lineage), never this one."""
    done = [p for p in checkpoints(run_dir) if _step_of(p) <= step and p != final]
    for old in done[max(keep - 1, 0):]:
        shutil.rmtree(old, ignore_errors=True)


def _dist_state(model: torch.nn.Module, optimizer) -> dict:
    """{"model", "optim"} state dicts by parameter name, of this process's shards (plain tensors unsharded).
    A fresh optimizer's states are materialised by torch (a zero step) so that a load has somewhere to go."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}


def any_failed(failed: bool) -> bool:
    """True on every process if it is True on any (one all-reduce; False without a process group)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return failed
    flag = torch.tensor([float(failed)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(flag)
    return bool(flag.item())


@contextmanager
def _one_process_dcp():
    """torch.distributed.checkpoint in a process without a process group (parallel=fsdp run by one process) warns
    that it assumes one process on every save and load: that is this case, said once at start-up instead."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


def save_sharded_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, optimizer, trainer_state: dict,
                            keep: int = 2) -> Path:
    """Every process writes its shards with torch.distributed.checkpoint into step-N.tmp/dcp; rank 0 then adds
    rng.pt and trainer.json, writes the manifest and renames, as for one process. Collective: call on every rank
    (or in a process without a process group: it then writes every shard).
    A failure on any rank is one CheckpointError on every rank, the partial checkpoint removed."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    ckdir = run_dir / "checkpoints"
    name = f"step-{step:08d}"
    final, tmp = ckdir / name, ckdir / (name + ".tmp")
    error: Exception | None = None
    try:
        if rank == 0:
            ckdir.mkdir(parents=True, exist_ok=True)
            _make_room(run_dir, step, _estimate_bytes(model))  # (every rank's shards: one disk on one host)
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "dcp").mkdir(parents=True)
    except Exception as e:  # noqa: BLE001
        error = e
    if not any_failed(error is not None):
        try:
            with _one_process_dcp():
                dcp.save(_dist_state(model, optimizer), checkpoint_id=str(tmp / "dcp"))
        except DCP_ERRORS as e:  # noqa: BLE001
            error = e
    if not any_failed(error is not None) and rank == 0:
        try:
            torch.save({"rng": rng_state()}, tmp / "rng.pt")
            _finish(tmp, final, trainer_state)
        except Exception as e:  # noqa: BLE001
            error = e
    if any_failed(error is not None):
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(run_dir, step, model, error or RuntimeError("another process failed")) from None
    if rank == 0:
        _prune(run_dir, step, final, keep)
    return final


def _dcp_errors() -> tuple:
    """What a sharded save or load raises: torch.distributed.checkpoint's CheckpointException derives from
    BaseException, not Exception, so `except Exception` lets it through as a traceback on every process."""
    try:
        from torch.distributed.checkpoint.api import CheckpointException
    except ImportError:  # (a torch without it)
        return (Exception,)
    return (Exception, CheckpointException)


DCP_ERRORS = _dcp_errors()


def is_sharded_checkpoint(ckpt: Path) -> bool:
    return (Path(ckpt) / "dcp").is_dir()


def load_sharded_checkpoint(ckpt: Path, model: torch.nn.Module, optimizer) -> dict:
    """Model, optimizer and RNG state of a sharded checkpoint into this run's model and optimizer, whatever
    their sharding now (DCP reshards: any number of processes, or one without a process group). Returns the
    trainer state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
    try:
        state = _dist_state(model, optimizer)
        with _one_process_dcp():
            dcp.load(state, checkpoint_id=str(Path(ckpt) / "dcp"))
        set_model_state_dict(model, state["model"])
        _keeping_group_settings(optimizer, lambda: set_optimizer_state_dict(model, optimizer, state["optim"]))
        set_rng_state(torch.load(Path(ckpt) / "rng.pt", map_location="cpu", weights_only=False)["rng"])
        return json.loads((Path(ckpt) / "trainer.json").read_text())
    except (OSError, RuntimeError, EOFError, KeyError, ValueError, json.JSONDecodeError, *DCP_ERRORS) as e:
        raise CheckpointError(f"checkpoint {ckpt} is corrupt, incomplete or of another model "
                              f"({type(e).__name__}: {_why(e)[:160]})") from None


def consolidate(ckpt: Path) -> Path:
    """Write the whole weights of a sharded checkpoint as its model.safetensors (atomically; the manifest is
    rewritten to list it). Runs in one process. Returns the file."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    ckpt = Path(ckpt)
    out = ckpt / "model.safetensors"
    if not is_sharded_checkpoint(ckpt):
        raise CheckpointError(f"{ckpt} is not a sharded checkpoint (it has no dcp/); its weights are {out}")
    manifest = (ckpt / MANIFEST).is_file()
    why = verify_checkpoint(ckpt)  # (without a manifest: refused where trainer.json says it had one)
    if why:  # (a manifest rewritten over damaged shards would make them verify, and a resume take them)
        raise CheckpointError(f"checkpoint {ckpt} is damaged ({why}): not consolidated")
    blob = ckpt / "consolidate.tmp.pt"
    try:
        dcp_to_torch_save(str(ckpt / "dcp"), str(blob))
        weights = torch.load(blob, map_location="cpu", weights_only=False)["model"]
        save_file({k: v.contiguous() for k, v in weights.items()}, str(out.with_suffix(".tmp")))
        with open(out.with_suffix(".tmp"), "rb") as fh:  # on disk before the manifest vouches for it: a crash
            os.fsync(fh.fileno())  # must not leave an empty file that fails the whole checkpoint's verification
        os.replace(out.with_suffix(".tmp"), out)
    except (OSError, RuntimeError, KeyError, ValueError, *DCP_ERRORS) as e:
        raise CheckpointError(f"could not consolidate {ckpt} ({_why(e)[:160]})") from None
    finally:
        blob.unlink(missing_ok=True)
    if manifest:  # only the new file's entry added: the other files' hashes stay the ones taken when written
        files = json.loads((ckpt / MANIFEST).read_text())["files"]
        files[out.name] = {"bytes": out.stat().st_size, "xxh3_64": _file_hash(out)}
        write_atomic(ckpt / MANIFEST, json.dumps({"version": 1, "files": files}, indent=1).encode())
    else:  # a checkpoint from before manifests
        _write_manifest(ckpt)
    fsync_dir(ckpt)  # (the new file's name)
    return out


def latest_checkpoint(run_dir: Path) -> Path | None:
    ptr = Path(run_dir) / "checkpoints" / "latest"
    if not ptr.is_file():
        return None
    path = ptr.parent / ptr.read_text().strip()
    return path if path.is_dir() else None


def load_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    f = Path(ckpt) / "model.safetensors"
    if not f.is_file() and is_sharded_checkpoint(ckpt):  # eval / generate / export of a sharded run
        consolidate(ckpt)
    try:
        return load_file(str(f))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {ckpt} has no model.safetensors") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {f} is corrupt or truncated ({str(e).splitlines()[0][:120]})") from None


def load_checkpoint(ckpt: Path, model: torch.nn.Module, optimizer=None) -> dict:
    """Loads weights (and optimizer + RNG state if an optimizer is given); returns the trainer state. The
    model must not be sharded yet (the trainer loads the weights first, then shards, then `load_optimizer`)."""
    weights = load_weights(ckpt)
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # shapes differ: name the first tensor, in one line
        first = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e).splitlines()[0])
        raise CheckpointError(f"checkpoint {ckpt} does not fit this model ({first[:200]}): was it trained with "
                              f"another config?") from None
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {ckpt} does not fit this model (missing {list(missing)[:3]}, "
                              f"unexpected {list(unexpected)[:3]}): was it trained with another config?")
    try:
        state = json.loads((Path(ckpt) / "trainer.json").read_text())
        if optimizer is not None:
            load_optimizer(ckpt, model, optimizer)
    except (OSError, json.JSONDecodeError, RuntimeError, EOFError, KeyError, ValueError) as e:
        raise CheckpointError(f"checkpoint {ckpt} is corrupt or incomplete ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None
    return state


# a group's settings that come from this run's config, not from the checkpoint: torch's load_state_dict takes the
# saved groups' whole, so a resume with another weight_decay or betas (said, and written to config.json) would
# keep the old ones (lr is set every step by the schedule), and a run on CUDA resuming a CPU run's checkpoint would
# keep torch AdamW's CPU implementation (foreach/fused off), which rejects the clip folded into grad_scale
GROUP_SETTINGS = ("weight_decay", "betas", "eps", "foreach", "fused", "capturable")


def _keeping_group_settings(optimizer, load) -> None:
    keep = [{k: g[k] for k in GROUP_SETTINGS if k in g} for g in optimizer.param_groups]
    load()
    for g, k in zip(optimizer.param_groups, keep):
        g.update(k)
        if g.get("fused") or g.get("capturable"):  # (their step counts live on the parameter's device)
            for p in g["params"]:
                st = optimizer.state.get(p, {})
                if torch.is_tensor(st.get("step")) and st["step"].device != p.device:
                    st["step"] = st["step"].to(p.device, torch.float32)


def load_optimizer(ckpt: Path, model: torch.nn.Module, optimizer) -> None:
    """Optimizer and RNG state of a one-file checkpoint (the groups' settings stay this run's: GROUP_SETTINGS)."""
    try:
        blob = torch.load(Path(ckpt) / "optimizer.pt", map_location="cpu", weights_only=False)
        _keeping_group_settings(optimizer, lambda: optimizer.load_state_dict(blob["optimizer"]))
        set_rng_state(blob["rng"])
    except (OSError, RuntimeError, EOFError, KeyError, ValueError) as e:
        raise CheckpointError(f"checkpoint {ckpt} is corrupt or incomplete ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None
