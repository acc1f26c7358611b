"""Atomic checkpoints.

Layout of a run directory:
    checkpoints/step-00000200/model.safetensors   weights (safetensors)
    checkpoints/step-00000200/optimizer.pt        optimizer state and RNG states (torch.save of tensors)
    checkpoints/step-00000200/trainer.json        step, tokens seen, data position, metrics summary
    checkpoints/latest                            name of the newest complete checkpoint
A checkpoint is written to `step-N.tmp`, fsynced, renamed, and only then named in `latest` (itself replaced
atomically), so a kill or a full disk at any moment leaves `latest` pointing at a complete checkpoint.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

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
                    keep: int = 2) -> Path:
    ckdir = run_dir / "checkpoints"
    ckdir.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    final, tmp = ckdir / name, ckdir / (name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(weights, str(tmp / "model.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "rng": rng_state()}, tmp / "optimizer.pt")
        (tmp / "trainer.json").write_text(json.dumps(trainer_state, indent=2))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(ckdir)
        _write_atomic(ckdir / "latest", name.encode())
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        prev = latest_checkpoint(run_dir)
        raise CheckpointError(f"could not write the checkpoint of step {step} ({e.strerror or e}); the latest "
                              f"complete checkpoint is {prev.name if prev else 'none'}") from None
    # prune older complete checkpoints, never the newest `keep`
    done = sorted(p for p in ckdir.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep]:
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
    """Loads weights (and optimizer + RNG state if an optimizer is given); returns the trainer state."""
    weights = load_weights(ckpt)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {ckpt} does not fit this model (missing {list(missing)[:3]}, "
                              f"unexpected {list(unexpected)[:3]}): was it trained with another config?")
    try:
        state = json.loads((Path(ckpt) / "trainer.json").read_text())
        if optimizer is not None:
            blob = torch.load(Path(ckpt) / "optimizer.pt", map_location="cpu", weights_only=False)
            optimizer.load_state_dict(blob["optimizer"])
            set_rng_state(blob["rng"])
    except (OSError, json.JSONDecodeError, RuntimeError, EOFError, KeyError, ValueError) as e:
        raise CheckpointError(f"checkpoint {ckpt} is corrupt or incomplete ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None
    return state
