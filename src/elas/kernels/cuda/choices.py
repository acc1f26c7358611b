"""Kernel choices made by timing, kept on disk so that every process on this machine makes the same one.

Several kernels are picked per shape by timing the candidates once: cuSPARSELt's algorithm id (gemm.py), the
CUTLASS library's tile configuration and whether a fused epilogue or the separate kernels run (cutlass_relu2.py).
Candidates that are close in time can swap places between processes, and their outputs differ in the last bits
(a different summation order). Kept in memory alone, a run resumed in a new process could then run other kernels
than the run it resumes, and its losses would no longer equal the uninterrupted run's bit for bit. So each
choice is written to a JSON file under the cache folder (ELAS_CACHE_DIR, default ~/.cache/elas), keyed by what
decides it (GPU name, library and torch versions, shape), read back by every later process, and the timing is
skipped there. Deleting the file makes the next process time afresh.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger("elas.kernels")
MISSING = object()  # what get() returns for a key never chosen (None is a choice: "the separate kernels")


def cache_dir() -> Path:
    return Path(os.environ.get("ELAS_CACHE_DIR", Path.home() / ".cache" / "elas"))


class Choices:
    """One JSON file of choices, key (str) -> a JSON value. Reads see the file as it is now (another process may
    have added to it); a write merges its key into the file's current content and replaces the file atomically
    (rename), so a reader never sees half a file. Two processes writing at once may lose one of their keys,
    which that key's next user times again: never a wrong choice. An unwritable cache folder costs a warning,
    not the run."""

    def __init__(self, filename: str):
        self.filename = filename

    @property
    def path(self) -> Path:
        return cache_dir() / self.filename

    def load(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, key: str, default=MISSING):
        return self.load().get(key, default)

    def put(self, key: str, value) -> None:
        path = self.path
        try:
            data = self.load()
            data[key] = value
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            os.replace(tmp, path)
        except OSError as e:  # a read-only home must not stop training
            log.warning("could not write the kernel choice cache %s: %s", path, e)


__all__ = ["Choices", "MISSING", "cache_dir"]
