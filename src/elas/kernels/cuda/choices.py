"""Kernel choices made by timing, kept on disk so that every process on this machine makes the same one.

Several kernels are picked per shape by timing the candidates once: cuSPARSELt's algorithm id (gemm.py), the
CUTLASS library's tile configuration and whether a fused epilogue or the separate kernels run (cutlass_relu2.py).
Candidates that are close in time can swap places between processes, and their outputs differ in the last bits
(a different summation order). Kept in memory alone, a run resumed in a new process could then run other kernels
than the run it resumes, and its losses would no longer equal the uninterrupted run's bit for bit; the ranks of
one job could differ likewise. So each choice is written to a JSON file under the cache folder (ELAS_CACHE_DIR,
default ~/.cache/elas), keyed by what decides it (GPU name, library and torch versions, shape); the first
process to store a key decides it for every later one (and for the other ranks timing beside it), and a later
process skips the timing. Deleting the file makes the next process time afresh.
"""
from __future__ import annotations

import json
import logging
import os
import socket
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("elas.kernels")
MISSING = object()  # what get() returns for a key never chosen (None is a choice: "the separate kernels")


def cache_dir() -> Path:
    return Path(os.environ.get("ELAS_CACHE_DIR", Path.home() / ".cache" / "elas"))


class Choices:
    """One JSON file of choices, key (str) -> a JSON value. Reads see the file as it is now; `put` stores a key
    under an exclusive lock (a lock file beside it), so that processes timing the same shape at once agree on the
    first one's value, and replaces the file atomically (rename), so a reader never sees half a file. A damaged
    file reads as empty (its choices are timed again); an unwritable cache folder costs a warning, not the run."""

    def __init__(self, filename: str):
        self.filename = filename

    @property
    def path(self) -> Path:
        return cache_dir() / self.filename

    def load(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):  # (ValueError: bad JSON, bad UTF-8)
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, key: str, default=MISSING):
        return self.load().get(key, default)

    def put(self, key: str, value, rejected=MISSING):
        """Store value under key unless the file holds another value there than `rejected` (the value the caller
        read and found unusable here, or MISSING: none): then another process chose first, and its value stands.
        Returns the value the file holds for key afterwards: the one every process is to run (a compare and
        swap, so that processes replacing the same unusable value agree too)."""
        path = self.path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with _locked(path.with_name(path.name + ".lock")):
                data = self.load()
                if data.get(key, MISSING) is not MISSING and data[key] != rejected:
                    return data[key]
                data[key] = value
                # (host and pid: a cache folder on a shared file system may be written from several machines)
                tmp = path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
                tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
                os.replace(tmp, path)
        except OSError as e:  # a read-only home must not stop training
            log.warning("could not write the kernel choice cache %s: %s", path, e)
        return value


@contextmanager
def _locked(lock_path: Path):
    try:
        import fcntl
    except ImportError:  # (not POSIX: no lock; a lost race costs a second timing, never a wrong value)
        yield
        return
    try:
        f = open(lock_path, "a")
        fcntl.flock(f, fcntl.LOCK_EX)
    except OSError as e:  # a file system without locks (NFS mounted nolock), a lock file of another user's
        log.debug("no lock on %s (%s): writing without it", lock_path, e)
        yield
        return
    try:
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


__all__ = ["Choices", "MISSING", "cache_dir"]
