"""Packed token files -> fixed-length training windows, in an order that is a pure function of (seed, step).

Because the order is stateless, the data position of a run is just its step count: resume, gradient
accumulation and DDP sharding all fall out of index arithmetic, with no iterator state to save.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .prepare import DataError


def load_meta(data_dir: str | Path) -> dict:
    d = Path(data_dir)
    if not d.is_dir():
        raise DataError(f"dataset directory {d} does not exist: run `elas data prepare --out {d}` first")
    missing = [f for f in ("meta.json", "train.bin", "val.bin", "tokenizer.json") if not (d / f).is_file()]
    if missing:
        raise DataError(f"{d} is not a prepared dataset (missing {', '.join(missing)}): "
                        f"run `elas data prepare --out {d}`")
    try:
        meta = json.loads((d / "meta.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"{d / 'meta.json'} is corrupt: prepare the dataset again") from None
    need = [k for k in ("vocab_size", "dtype") if not isinstance(meta, dict) or k not in meta]
    if need:
        raise DataError(f"{d / 'meta.json'} lacks {', '.join(need)}: prepare the dataset again")
    try:
        item = np.dtype(meta["dtype"]).itemsize
    except TypeError:
        raise DataError(f"{d / 'meta.json'} names an unknown token dtype {meta['dtype']!r}: prepare it again") from None
    for split in ("train", "val"):
        size = (d / f"{split}.bin").stat().st_size
        if size == 0 or size % item:
            raise DataError(f"{d / f'{split}.bin'} has {size} bytes, not a positive multiple of the {item}-byte "
                            f"{meta['dtype']} tokens: the file is truncated or not this dataset's; prepare it again")
        # a copy cut short by a whole number of tokens passes the test above: the count meta.json recorded
        # (datasets of every version record it) is checked too, or a run trains on part of the data and records
        # meta's SHA-1 as if it were all of it
        n = meta.get(f"{split}_tokens")
        if isinstance(n, int) and size != n * item:
            raise DataError(f"{d / f'{split}.bin'} has {size} bytes, but meta.json says {n:,} {meta['dtype']} tokens "
                            f"({n * item} bytes): the file is truncated or not this dataset's; prepare it again")
    return meta


def check_token_range(data_dir: str | Path, meta: dict, vocab_size: int) -> None:
    """Token ids must be < the model's vocab_size: from meta's max_token_id (written at prepare time), or a scan
    of the token files for datasets prepared before it was recorded (memory-mapped; once, at start-up)."""
    top = meta.get("max_token_id")
    if top is None:
        d = Path(data_dir)
        top = max(int(np.memmap(d / f"{s}.bin", dtype=np.dtype(meta["dtype"]), mode="r").max()) for s in ("train", "val"))
    if top >= vocab_size:
        raise DataError(f"{data_dir} holds token id {top}, but the model's vocab_size is {vocab_size}: "
                        f"--set model.vocab_size={top + 1} or prepare the data with this model's tokenizer")


class TokenWindows:
    """Windows of seq_len+1 tokens of one split, seq_len apart (neighbours share one token) (inputs = w[:-1], targets = w[1:])."""

    def __init__(self, data_dir: str | Path, split: str, seq_len: int):
        meta = load_meta(data_dir)
        self.tokens = np.memmap(Path(data_dir) / f"{split}.bin", dtype=np.dtype(meta["dtype"]), mode="r")
        self.seq_len = seq_len
        self.n = (len(self.tokens) - 1) // seq_len
        if self.n < 1:
            raise DataError(f"the {split} split of {data_dir} has {len(self.tokens)} tokens, fewer than "
                            f"seq_len+1={seq_len + 1}: lower --set seq_len or prepare more data")

    def get(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """idx: [batch] window indices -> x, y: [batch, seq_len] int64."""
        s = self.seq_len
        rows = np.stack([np.asarray(self.tokens[i * s: i * s + s + 1], dtype=np.int64) for i in idx])
        t = torch.from_numpy(rows)
        return t[:, :-1], t[:, 1:]


class Batches:
    """The global batch of step `step` is samples [step*G, (step+1)*G) of an endless stream of windows, each epoch
    in its own seeded random order; rank r takes its contiguous slice, micro-batch k a slice of that."""

    def __init__(self, windows: TokenWindows, global_batch: int, seed: int, rank: int = 0, world: int = 1):
        if global_batch % world:
            raise ValueError(f"global batch {global_batch} is not divisible by the world size {world}")
        self.w, self.G, self.seed, self.rank, self.world = windows, global_batch, seed, rank, world
        self._perm: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            g = np.random.default_rng([self.seed, epoch])
            self._perm = (epoch, g.permutation(self.w.n))
        return self._perm[1]

    def indices(self, step: int) -> np.ndarray:
        per_rank = self.G // self.world
        start = step * self.G + self.rank * per_rank
        out = np.empty(per_rank, dtype=np.int64)
        for j in range(per_rank):
            epoch, pos = divmod(start + j, self.w.n)
            out[j] = self._order(epoch)[pos]
        return out

    def micro_batches(self, step: int, n_micro: int):
        idx = self.indices(step)
        if len(idx) % n_micro:
            raise ValueError(f"per-rank batch {len(idx)} is not divisible by grad_accum={n_micro}")
        for chunk in np.split(idx, n_micro):
            yield self.w.get(chunk)
