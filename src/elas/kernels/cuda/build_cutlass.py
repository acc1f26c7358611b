"""`elas build cutlass`: build one of the CUTLASS libraries (cutlass/build.sh) where its loader looks for it.

    build("relu2")  ->  <ELAS_CACHE_DIR>/cutlass/libelas_cutlass_relu2.so   (cutlass_relu2.library_path's default)

Needs no GPU: nvcc, the CUDA headers and CUTLASS's headers come from pip wheels into <ELAS_CACHE_DIR>/cuda_tools
(downloaded once, ~200 MB unpacked); the compile takes minutes (~6 on two cores). The library is built in a
temporary folder beside its destination and moved into place in one rename, so an interrupted or failed build
leaves the previous library as it was. The compiler's output goes to build-<lib>.log beside the library.
"""
from __future__ import annotations

import contextlib
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from .choices import cache_dir

SCRIPT = Path(__file__).parent / "cutlass" / "build.sh"
LIBS = {"relu2": "libelas_cutlass_relu2.so", "sp": "libelas_cutlass_sp.so"}  # the script's argument -> its output


def build(lib: str = "relu2", out: Path | None = None, progress: bool = True, script: Path | None = None) -> Path:
    """Build LIBS[lib] into `out` (default <cache>/cutlass) and return its path. Errors (a bad name, a machine the
    compiler wheels do not serve, a failed build) are one line, the last a pointer to the log."""
    if lib not in LIBS:
        raise ValueError(f"unknown CUTLASS library {lib!r}; expected one of {', '.join(LIBS)}")
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise RuntimeError(f"the CUTLASS libraries are built with the x86-64 Linux nvcc wheels; this machine is "
                           f"{platform.system()} {platform.machine()}: build on an x86-64 Linux machine and copy the "
                           f"library to {cache_dir() / 'cutlass'}")
    if shutil.which("bash") is None:
        raise RuntimeError("building the CUTLASS libraries needs bash (cutlass/build.sh)")
    out = Path(out) if out is not None else cache_dir() / "cutlass"
    blocker = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ValueError(f"--out {out}: {blocker} is a file, not a directory; give a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out}: cannot make the folder ({e.strerror or e}); give a writable one") from None
    log_path = out / f"build-{lib}.log"
    env = dict(os.environ, TOOLS=str(cache_dir() / "cuda_tools"))
    # a SIGTERM (a job scheduler's stop) ends the build as Ctrl-C does: the compiler stopped, the folder removed;
    # the handler is in place before the folder exists, so no stop can leave it behind
    with _sigterm_as_interrupt(), tempfile.TemporaryDirectory(dir=out, prefix=f".build-{lib}-") as tmp, \
            open(log_path, "w") as log:
        # (a session of its own: Ctrl-C stops nvcc with the script, before the temporary folder goes)
        proc = subprocess.Popen(["bash", str(script or SCRIPT), lib, tmp], stdout=log, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
        try:
            _wait(proc, f"building {LIBS[lib]}", progress)
        except KeyboardInterrupt:
            os.killpg(proc.pid, 9)  # the script and the compiler it runs
            proc.wait()
            raise
        built = Path(tmp) / LIBS[lib]
        if proc.returncode != 0 or not built.is_file():
            raise RuntimeError(f"the CUTLASS build failed (exit {proc.returncode}): {_why(log_path)[:200]}; the whole "
                               f"output is in {log_path}")
        os.replace(built, out / LIBS[lib])
    return out / LIBS[lib]


def _why(log_path: Path) -> str:
    """The line of a failed build's output that says why: the compiler's first `error:` (nvcc's summary "1 error
    detected ..." and the script's `time` lines come after it), else the last line naming an error, else the
    last line."""
    lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    first = [ln for ln in lines if "error:" in ln.lower()][:1]
    named = [ln for ln in lines if "error" in ln.lower()][-1:]
    return (first or named or lines or ["(no output)"])[0]


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """Within: SIGTERM raises KeyboardInterrupt, as Ctrl-C does (main thread only; elsewhere no handler can be
    set, and nothing changes)."""
    import signal
    import threading

    def stop(*_):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, stop) if threading.current_thread() is threading.main_thread() else None
    try:
        yield
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


def _wait(proc: subprocess.Popen, what: str, progress: bool) -> None:
    """Wait for the build, with an elapsed-time line on a terminal (nvcc says nothing of its progress)."""
    from tqdm import tqdm

    bar = tqdm(desc=what, bar_format="{desc}: {elapsed}", disable=not progress or None)
    try:
        while proc.poll() is None:
            time.sleep(0.5)
            bar.refresh()
    finally:
        bar.close()


__all__ = ["build", "LIBS", "SCRIPT"]
