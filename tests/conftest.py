import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

# Triton kernels run in the interpreter on machines without a GPU (set before anything imports triton)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# kernel choices go to a folder of the test session's own, not the user's cache (unless one is named); a CUTLASS
# library that `elas build cutlass` put in the user's cache is still the one the GPU tests run
if "ELAS_CACHE_DIR" not in os.environ:
    _built = Path.home() / ".cache" / "elas" / "cutlass" / "libelas_cutlass_relu2.so"
    if "ELAS_CUTLASS_RELU2" not in os.environ and _built.is_file():
        os.environ["ELAS_CUTLASS_RELU2"] = str(_built)
    os.environ["ELAS_CACHE_DIR"] = tempfile.mkdtemp(prefix="elas-tests-cache-")

from elas.data import prepare

# A model small enough that a CPU training step takes milliseconds.
TINY = ["--set", "model.n_layers=2", "--set", "model.d_model=64", "--set", "model.n_heads=2",
        "--set", "model.intermediate=96", "--set", "model.vocab_size=512", "--set", "seq_len=32",
        "--set", "batch_size=4", "--set", "eval_tokens=2048", "--set", "warmup_steps=2"]


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    """A small BPE dataset (vocab 512) from a slice of the built-in corpus."""
    d = tmp_path_factory.mktemp("data") / "ds"
    prepare(d, source="builtin", vocab_size=512, max_mb=1.5, val_frac=0.05, log=lambda *a: None)
    return d


@pytest.fixture(autouse=True)
def _keep_cublas_setting():
    """`elas.cli.main` sets CUBLAS_WORKSPACE_CONFIG for its whole process (kernels/cublas.py): a test that calls it
    in process must not hand the setting on to later tests and their subprocesses."""
    before = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    yield
    if before is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = before


@pytest.fixture(autouse=True)
def _fresh_compiler_caches(request):
    """Each GPU test compiles its models from scratch: Dynamo keeps at most 8 compilations per code object (e.g.
    Block.forward), and an entry of an earlier test's model whose address a new module reuses counts against the
    new one, so a full GPU run (not a test alone) could hit the limit. Earlier tests' compiled models are
    collected first: compile_regions leaves each in reference cycles, with its parameters and gradients on the
    GPU, until a full collection."""
    if request.node.get_closest_marker("gpu") is not None:
        torch._dynamo.reset()
        import gc
        gc.collect()
        torch.cuda.empty_cache()
    yield


def run_cli(*args: str, env: dict | None = None, cwd=None):
    import subprocess
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "elas", *args], capture_output=True, text=True, env=e, cwd=cwd,
                          timeout=600)


def hold_run_lock(run):
    """A process holding `run`'s lock (as a training process does), once it holds it: kill() it to let go."""
    import subprocess
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from elas.train.trainer import lock_run_dir; lock_run_dir(Path(sys.argv[1])); "
                               "print('locked', flush=True); time.sleep(300)", str(run)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def wait_for_metrics_then_signal(proc, run, sig, timeout: float = 240.0):
    """Send `sig` to proc once `run` has logged a step (and a moment more); its (stdout, stderr) after it ends."""
    import time
    deadline = time.time() + timeout
    while time.time() < deadline and not (run / "metrics.jsonl").exists():
        time.sleep(0.2)
    time.sleep(2.0)
    proc.send_signal(sig)
    return proc.communicate(timeout=timeout)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def preset(name: str, dense_warmup_steps: int | None = None, **over):
    """model_preset(name, **over) with the act24 method's dense warm-up set (when given)."""
    from elas.config import model_preset
    cfg = model_preset(name, **over)
    if dense_warmup_steps is not None:
        cfg.method("act24")["dense_warmup_steps"] = dense_warmup_steps
    return cfg


def replay_matches_warm_step(step, model) -> None:
    """A training step (`step()` -> loss: forward and backward) of a compiled CUDA model, captured into a CUDA graph
    and replayed: its loss equals the eager warm-up step's. The warm-up runs twice on a side stream (compilation,
    kernel choices), as torch's docs ask; the model's gradients are dropped and no loss keeps an autograd graph
    alive across streams, whose AccumulateGrad nodes would tie the capture to the legacy stream."""
    model.zero_grad(set_to_none=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            want = step().detach()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        loss = step().detach()
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(loss, want)
