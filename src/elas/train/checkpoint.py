"""Atomic, verifiable checkpoints.

Layout of a run directory:
    checkpoints/step-00000200/model.safetensors   weights (safetensors)
    checkpoints/step-00000200/optimizer.pt        optimizer state and RNG states (torch.save of tensors)
    checkpoints/step-00000200/trainer.json        step, tokens seen, data position, metrics summary
    checkpoints/step-00000200/manifest.json       written last: size and xxh3-64 hash of each file above
    checkpoints/latest                            name of the newest complete checkpoint (for people and tools)
A checkpoint is written to `step-N.tmp`, fsynced, renamed, and only then named in `latest` (itself replaced
atomically), so a kill or a full disk at any moment leaves the previous checkpoints whole. A resume does not
trust `latest`: `resume_checkpoint` takes the newest checkpoint whose manifest verifies, and moves the newer
ones that do not (truncated, zeroed, NaN-filled, half-deleted) aside as `step-N.corrupt`, saying why.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Callable

import xxhash

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


class CheckpointError(Exception):
    pass


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


MANIFEST = "manifest.json"
_CHUNK = 64 << 20


def _file_hash(path: Path) -> str:
    h = xxhash.xxh3_64()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _write_manifest(ckdir: Path) -> None:
    files = {f.name: {"bytes": f.stat().st_size, "xxh3_64": _file_hash(f)}
             for f in sorted(ckdir.iterdir()) if f.name != MANIFEST}
    with open(ckdir / MANIFEST, "w") as fh:
        json.dump({"version": 1, "files": files}, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())


def verify_checkpoint(ckpt: Path) -> str | None:
    """None when every file of the checkpoint matches its manifest; otherwise why not (one phrase)."""
    try:
        files = json.loads((ckpt / MANIFEST).read_text())["files"]
    except FileNotFoundError:  # written by an elas before manifests (always whole: it was renamed into place)
        missing = [n for n in ("model.safetensors", "optimizer.pt", "trainer.json") if not (ckpt / n).is_file()]
        return f"{missing[0]} is missing" if missing else None
    except (OSError, ValueError, KeyError, TypeError):
        return "its manifest is unreadable"
    for name in ("model.safetensors", "optimizer.pt", "trainer.json"):
        if name not in files:
            return f"its manifest does not list {name}"
    for name, want in files.items():
        f = ckpt / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != want["bytes"]:
            return f"{name} has {f.stat().st_size} bytes, the manifest says {want['bytes']}"
        if _file_hash(f) != want["xxh3_64"]:
            return f"{name} does not match its hash (corrupted)"
    return None


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
    step-N.corrupt (kept for inspection, out of the run's way), one log line each."""
    for ckpt in checkpoints(run_dir):
        why = verify_checkpoint(ckpt)
        if why is None:
            return ckpt
        aside = ckpt.with_name(ckpt.name + ".corrupt")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(ckpt, aside)
        log(f"elas: skipping checkpoint {ckpt.name}: {why}; moved to {aside.name}")
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


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, optimizer, trainer_state: dict,
                    keep: int = 2, full: tuple[dict, dict] | None = None) -> Path:
    """full: (model, optimizer) state dicts already gathered whole from a sharded (FSDP2) model, the optimizer's
    keyed by parameter name (torch.distributed.checkpoint.state_dict); written in the same one-file format."""
    ckdir = run_dir / "checkpoints"
    name = f"step-{step:08d}"
    final, tmp = ckdir / name, ckdir / (name + ".tmp")
    try:
        ckdir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        weights = {k: v.detach().contiguous().cpu() for k, v in (full[0] if full else model.state_dict()).items()}
        save_file(weights, str(tmp / "model.safetensors"))
        if os.environ.get("ELAS_FAULT_IN_CHECKPOINT") == str(step):  # fault injection: a kill mid-write (tests)
            os.kill(os.getpid(), 9)
        optim = {"optimizer": full[1], "keyed_by": "name"} if full else {"optimizer": optimizer.state_dict()}
        torch.save({**optim, "rng": rng_state()}, tmp / "optimizer.pt")
        (tmp / "trainer.json").write_text(json.dumps(trainer_state, indent=2))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _write_manifest(tmp)  # last: a checkpoint whose manifest verifies was written whole
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(ckdir)
        _write_atomic(ckdir / "latest", name.encode())
    except Exception as e:  # noqa: BLE001 - whatever the writer raises (OSError, torch's RuntimeError,
        # SafetensorError on a full disk): one line, the partial checkpoint removed, the previous ones intact
        shutil.rmtree(tmp, ignore_errors=True)
        need = sum(t.numel() * t.element_size() for t in model.state_dict().values()) * 3  # weights + 2 moments
        try:
            free = f"{shutil.disk_usage(ckdir if ckdir.exists() else run_dir).free / 1e9:.2f} GB free"
        except OSError:
            free = "free space unknown"
        prev = newest_verified(run_dir)
        msg = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise CheckpointError(f"could not write the checkpoint of step {step} in {ckdir} ({msg}); it needs about "
                              f"{need / 1e9:.2f} GB ({free}); the newest complete checkpoint is "
                              f"{prev.name if prev else 'none'}") from None
    # prune: keep the newest `keep` of this run's checkpoints up to this step (its lineage), never this one
    done = [p for p in checkpoints(run_dir) if _step_of(p) <= step and p != final]
    for old in done[max(keep - 1, 0):]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    ptr = Path(run_dir) / "checkpoints" / "latest"
    if not ptr.is_file():
        return None
    path = ptr.parent / ptr.read_text().strip()
    return path if path.is_dir() else None


def load_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    f = Path(ckpt) / "model.safetensors"
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
    missing, unexpected = model.load_state_dict(weights, strict=False)
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


def load_optimizer(ckpt: Path, model: torch.nn.Module, optimizer) -> None:
    """Optimizer and RNG state of a checkpoint. A state keyed by parameter name (written by a sharded run) is
    scattered onto this run's parameters whatever their sharding (any process count, or one process); a state
    keyed by position (one process or DDP) loads as it was saved."""
    try:
        blob = torch.load(Path(ckpt) / "optimizer.pt", map_location="cpu", weights_only=False)
        if blob.get("keyed_by") == "name":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
            set_optimizer_state_dict(model, optimizer, blob["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(blob["optimizer"])
        set_rng_state(blob["rng"])
    except (OSError, RuntimeError, EOFError, KeyError, ValueError) as e:
        raise CheckpointError(f"checkpoint {ckpt} is corrupt or incomplete ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None
