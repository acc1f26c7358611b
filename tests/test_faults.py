"""Checkpoints a user can trust (CPU): damaged or dangling checkpoints, a real full disk, --resume semantics.

Every case compares the resumed run's logged losses with an uninterrupted run, step by step, bit for bit."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from elas.train import latest_checkpoint, verify_checkpoint

from conftest import hold_run_lock, run_cli
from test_train import losses, train_args

COMMON = ["--max-steps", "8", "--set", "save_every=2", "--set", "eval_every=100", "--set", "keep_checkpoints=3"]


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory):
    """An uninterrupted run, and a copy-source run stopped (SIGKILL) after its checkpoints of steps 2, 4, 6."""
    root = tmp_path_factory.mktemp("faults")
    ref = run_cli(*train_args(dataset, root / "ref", *COMMON))
    assert ref.returncode == 0, ref.stderr
    killed = run_cli(*train_args(dataset, root / "killed", *COMMON), env={"ELAS_FAULT_AT_STEP": "6"})
    assert killed.returncode < 0
    assert latest_checkpoint(root / "killed").name == "step-00000006"
    return root


def _damage(path, how):
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "zero":  # same size, a run of zero bytes in the middle (a bad sector, a sparse file)
        mid = len(data) // 2
        data[mid: mid + min(4096, len(data) - mid)] = bytes(min(4096, len(data) - mid))
        path.write_bytes(bytes(data))
    elif how == "nan":  # same size, float bytes turned into NaNs
        mid = len(data) // 2
        n = min(4096, len(data) - mid) // 4 * 4
        data[mid: mid + n] = b"\x00\x00\xc0\x7f" * (n // 4)
        path.write_bytes(bytes(data))


def _resume_and_compare(dataset, run, ref):
    r = run_cli(*train_args(dataset, run, *COMMON, "--resume"))
    assert r.returncode == 0, r.stderr
    a, b = losses(ref), losses(run)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 9))  # cut exactly at the resumed step
    assert all(a[s] == b[s] for s in a), [(s, a[s], b[s]) for s in a if a[s] != b[s]]
    return r


@pytest.mark.parametrize("how", ["truncate", "zero", "nan"])
@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt", "trainer.json", "manifest.json"])
def test_a_damaged_newest_checkpoint_resumes_from_the_one_before(dataset, reference, tmp_path, name, how):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(reference / "killed", run)
    newest = run / "checkpoints" / "step-00000006"
    _damage(newest / name, how)
    assert verify_checkpoint(newest) is not None
    r = _resume_and_compare(dataset, run, reference / "ref")
    assert "skipping checkpoint step-00000006" in r.stdout and "resumed from" in r.stdout
    assert "step-00000004" in r.stdout.split("resumed from")[1].splitlines()[0]
    assert (run / "checkpoints" / "step-00000006.corrupt").is_dir()  # kept for inspection, out of the way
    assert latest_checkpoint(run).name == "step-00000008"
    assert verify_checkpoint(run / "checkpoints" / "step-00000008") is None


def test_resume_auto_with_every_checkpoint_damaged_keeps_the_lost_runs_metrics(dataset, reference, tmp_path):
    """--resume auto starts again when no checkpoint verifies; the metrics of the steps it lost are moved aside,
    not truncated away, and the fresh run's losses equal the uninterrupted run's."""
    import shutil
    run = tmp_path / "run"
    shutil.copytree(reference / "killed", run)
    before = (run / "metrics.jsonl").read_text()
    assert before
    for c in (run / "checkpoints").glob("step-*"):
        _damage(c / "model.safetensors", "truncate")
    r = run_cli(*train_args(dataset, run, *COMMON, "--resume", "auto"))
    assert r.returncode == 0, r.stderr
    assert "starts again at step 0 (no checkpoint of it verifies)" in r.stdout
    kept = list(run.glob("metrics.before-restart-*.jsonl"))
    assert len(kept) == 1 and kept[0].read_text() == before
    a, b = losses(reference / "ref"), losses(run)
    assert sorted(b) == list(range(1, 9)) and all(a[s] == b[s] for s in a)


def test_a_run_that_stopped_before_its_first_checkpoint_keeps_its_metrics(dataset, tmp_path):
    """A run killed before its first checkpoint logged steps; started again there (--resume auto, or without
    --resume), its metrics.jsonl is moved aside, not truncated away."""
    import shutil
    first = tmp_path / "first"
    assert run_cli(*train_args(dataset, first, "--max-steps", "2", "--set", "eval_every=100",
                                "--set", "log_every=1")).returncode == 0
    for resume in (["--resume", "auto"], []):
        run = tmp_path / f"run{len(resume)}"
        run.mkdir()
        shutil.copy(first / "config.json", run)
        shutil.copy(first / "metrics.jsonl", run)  # its log, without a checkpoint
        before = (run / "metrics.jsonl").read_text()
        r = run_cli(*train_args(dataset, run, "--max-steps", "1", "--set", "eval_every=100", *resume))
        assert r.returncode == 0, r.stderr
        assert "starts again at step 0 (it holds no checkpoint)" in r.stdout
        kept = list(run.glob("metrics.before-restart-*.jsonl"))
        assert len(kept) == 1 and kept[0].read_text() == before


@pytest.mark.parametrize("pointer", ["deleted", "dangling"])
def test_a_missing_or_dangling_latest_does_not_restart_the_run(dataset, reference, tmp_path, pointer):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(reference / "killed", run)
    ptr = run / "checkpoints" / "latest"
    if pointer == "deleted":
        ptr.unlink()
    else:
        ptr.write_text("step-00000099")
    r = _resume_and_compare(dataset, run, reference / "ref")
    assert "step-00000006" in r.stdout.split("resumed from")[1].splitlines()[0]
    steps = sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir())
    assert steps == ["step-00000004", "step-00000006", "step-00000008"]  # pruning kept this lineage's newest


def test_a_metrics_line_torn_by_a_kill_is_dropped_on_resume(dataset, reference, tmp_path):
    """A kill while metrics.jsonl's last line is being appended leaves half a line: the resume drops it and
    continues the same losses; a bad line anywhere else is an error that names it."""
    import shutil

    from elas.train.trainer import read_metrics
    run = tmp_path / "run"
    shutil.copytree(reference / "killed", run)
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 7, "loss": 5.1')  # torn: no closing brace, no newline
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")][-1] <= 7
    _resume_and_compare(dataset, run, reference / "ref")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1}\n{"step": 2, \n{"step": 3}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        read_metrics(bad)


def test_resume_needs_a_checkpoint_unless_auto(dataset, tmp_path):
    r = run_cli(*train_args(dataset, tmp_path / "empty", *COMMON, "--resume"))
    assert r.returncode == 2 and "holds no checkpoint" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = run_cli(*train_args(dataset, tmp_path / "auto", "--max-steps", "2", "--set", "eval_every=100",
                            "--resume", "auto"))
    assert r.returncode == 0, r.stderr
    assert latest_checkpoint(tmp_path / "auto").name == "step-00000002"



def test_a_lost_or_damaged_config_json_is_recovered_from_the_newest_checkpoint(dataset, reference, tmp_path):
    """config.json deleted, or cut short (a full disk while an older version rewrote it): --resume with no other
    flag takes the copy in the newest checkpoint, writes it back, says so, and continues the same losses (with
    the default preset's config instead, the tiny run's weights would not even fit)."""
    import shutil
    for damage in ("delete", "truncate", "not an object"):
        run = tmp_path / damage
        shutil.copytree(reference / "killed", run)
        want = json.loads((run / "config.json").read_text())
        if damage == "delete":
            (run / "config.json").unlink()
        elif damage == "truncate":
            (run / "config.json").write_text((run / "config.json").read_text()[:1024])
        else:  # valid JSON, not a config (an edit gone wrong)
            (run / "config.json").write_text("[]")
        r = run_cli("train", "--out", str(run), "--no-progress", "--resume")
        assert r.returncode == 0, r.stderr
        assert "recovered from checkpoint step-00000006 and written back" in r.stderr
        assert json.loads((run / "config.json").read_text())["model"] == want["model"]
        a, b = losses(reference / "ref"), losses(run)
        assert sorted(b) == list(range(1, 9)) and all(a[s] == b[s] for s in a)
    empty = tmp_path / "nothing"
    empty.mkdir()
    from elas.train.trainer import TrainError, load_run_config
    with pytest.raises(TrainError, match="is not a run directory"):
        load_run_config(empty)


def test_resume_applies_a_toml_like_set_and_refuses_its_contradictions(dataset, reference, tmp_path):
    """--config FILE on --resume (the same command line for a start and a requeued resume): its settings apply on
    top of the run's, as --set does, and a model key that differs from the run's is a one-line error."""
    import shutil
    run = tmp_path / "run"
    shutil.copytree(reference / "killed", run)
    ok, bad = tmp_path / "ok.toml", tmp_path / "bad.toml"
    ok.write_text("max_steps = 9\n")
    bad.write_text("[model]\nrank = 16\n")
    r = run_cli("train", "--out", str(run), "--resume", "--config", str(ok), "--dry-run")
    assert r.returncode == 0 and "9 steps" in r.stdout, r.stdout + r.stderr
    assert "changed settings" not in r.stderr  # (max_steps: the trainer's own warning says what it changes)
    r = run_cli("train", "--out", str(run), "--resume", "--set", "lr=0.0123", "--set", "grad_clip=0.5", "--dry-run")
    assert r.returncode == 0 and "resuming with changed settings (lr " in r.stderr, r.stderr
    assert "-> 0.0123; grad_clip 1.0 -> 0.5)" in r.stderr
    r = run_cli("train", "--out", str(run), "--resume", "--set", "batch_size=8", "--set", "grad_accum=1", "--dry-run")
    assert r.returncode == 0 and "the same run where batch_size x grad_accum x processes is what it was" in r.stderr
    r = run_cli("train", "--out", str(run), "--resume", "--config", str(bad), "--dry-run")
    assert r.returncode == 2 and "contradict the run being resumed (model.rank" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    # a kernel key is not the model: a resume may change it, with a warning (its losses may differ in the last bits)
    r = run_cli("train", "--out", str(run), "--resume", "--set", "model.relu2_kernel=fused", "--dry-run")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "warning: resuming with other kernels (model.relu2_kernel: 'torch' -> 'fused')" in r.stderr
    # a method's kernel fields likewise (what check_kernels tells a resume on a machine without the library to set)
    r = run_cli("train", "--out", str(run), "--resume", "--set", "model.act24.backend=reference", "--dry-run")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "warning: resuming with other kernels (model.act24.backend: 'auto' -> 'reference')" in r.stderr
    r = run_cli("train", "--out", str(run), "--resume", "--set", "model.act24.backend=reference", "--set",
                "model.act24.grad_mode=mask", "--dry-run")  # with a field that is the model's: refused
    assert r.returncode == 2 and "contradict the run being resumed (model.act24.grad_mode: 'ste' -> 'mask'; " \
        "model.act24.backend: 'auto' -> 'reference')" in r.stderr, r.stderr  # the fields, not the whole method lists
    r = run_cli("train", "--out", str(run), "--resume", "--act-sparsity", "none", "--dry-run")
    assert r.returncode == 2 and "(model.methods: act24 -> none)" in r.stderr, r.stderr


def test_a_resume_that_changes_settings_keeps_the_old_values(dataset, reference, tmp_path):
    """config.json holds a run's latest plan; a resume that changes it (lr, seed) says so, naming the seed's effect on
    the data order, and appends the keys it changed, old and new, to resumes.jsonl. A resume that changes nothing
    appends nothing, and neither do keys a resume only reads differently (an older config.json's absent keys)."""
    same, changed = tmp_path / "same", tmp_path / "changed"
    shutil.copytree(reference / "killed", same)
    shutil.copytree(reference / "killed", changed)
    _resume_and_compare(dataset, same, reference / "ref")
    assert not (same / "resumes.jsonl").exists()
    old = json.loads((changed / "config.json").read_text())
    r = run_cli(*train_args(dataset, changed, *COMMON, "--resume", "--set", "lr=0.0123", "--set", "seed=5"))
    assert r.returncode == 0, r.stderr
    said = r.stdout + r.stderr
    assert "from the resumed step on the run differs from an uninterrupted one (a new seed also reorders the data)" \
        in said and "resumes.jsonl keeps what this resume changed (lr, seed), config.json the new plan" in said, said
    lines = (changed / "resumes.jsonl").read_text().splitlines()
    assert [json.loads(ln) for ln in lines] == [{"step": 6, "changed": {"lr": [old["lr"], 0.0123],
                                                                         "seed": [old["seed"], 5]}}]
    assert json.loads((changed / "config.json").read_text())["lr"] == 0.0123
    from elas.train.trainer import config_changes, record_resume
    new = json.loads((changed / "config.json").read_text())
    older = {k: v for k, v in new.items() if k not in ("optim_state_dtype", "config_version")}  # as version 1 wrote
    older["model"] = {k: v for k, v in new["model"].items() if k not in ("ce_kernel", "residual_dtype")}
    assert config_changes(older, new) == {}
    assert config_changes(older, {**new, "out_dir": "moved", "grad_clip": 0.5}) == {"grad_clip": [1.0, 0.5]}
    # a resume whose config.json write failed, resumed again with the same change, records it once
    (changed / "config.json").write_text(json.dumps(old))
    assert record_resume(changed, 6, new) == {"lr": [old["lr"], 0.0123], "seed": [old["seed"], 5]}
    assert (changed / "resumes.jsonl").read_text().splitlines() == lines


def test_a_run_directory_trains_in_one_process_at_a_time(dataset, reference, tmp_path):
    """A second process (a requeued job while the first still runs) stops with a one-line error naming the holder;
    once the holder is gone (killed: the lock goes with it) the resume goes on."""
    import shutil
    run = tmp_path / "run"
    shutil.copytree(reference / "killed", run)
    holder = hold_run_lock(run)
    try:
        r = run_cli(*train_args(dataset, run, *COMMON, "--resume"))
        assert r.returncode == 2 and f"is in use by another elas process (pid {holder.pid})" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    finally:
        holder.kill()
        holder.wait()
    _resume_and_compare(dataset, run, reference / "ref")


def test_a_file_system_without_flock_warns_instead_of_refusing(tmp_path, monkeypatch, capsys):
    """flock failing for another reason than a holder (ENOLCK on NFS without a lock daemon, ENOSYS) is not "in use
    by another process": the run goes on without a lock, with a warning saying so; a holder still refuses."""
    import errno
    import fcntl

    from elas.train.trainer import TrainError, lock_run_dir, unlock_run_dir

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(fcntl, "flock", no_locks)
    lock_run_dir(tmp_path)
    assert "cannot be locked on this file system (No locks available)" in capsys.readouterr().err
    unlock_run_dir(tmp_path)

    def held(fd, op):
        raise BlockingIOError(errno.EWOULDBLOCK, "held")
    monkeypatch.setattr(fcntl, "flock", held)
    with pytest.raises(TrainError, match="in use by another elas process"):
        lock_run_dir(tmp_path)


def test_a_damaged_metrics_line_does_not_stop_a_resume(dataset, reference, tmp_path):
    """A bad line in the middle of metrics.jsonl (an edit, a disk error) is moved to metrics.jsonl.bad with a log
    line, and the run resumes with the same losses."""
    import shutil
    run = tmp_path / "run"
    shutil.copytree(reference / "killed", run)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines.insert(2, "#### not json")
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    r = _resume_and_compare(dataset, run, reference / "ref")
    assert "1 unreadable line(s) of metrics.jsonl moved to metrics.jsonl.bad (line 3 first)" in r.stdout + r.stderr
    assert (run / "metrics.jsonl.bad").read_text() == "#### not json\n"


def test_a_checkpoint_of_another_shape_is_a_one_line_error(tmp_path):
    import torch
    from elas.build import build_model
    from elas.config import model_preset
    from elas.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
    a = build_model(model_preset("llama-tiny-elas", n_layers=1, vocab_size=256))
    save_checkpoint(tmp_path, 1, a, torch.optim.AdamW(a.parameters()), {"step": 1})
    b = build_model(model_preset("llama-tiny-elas", n_layers=1, vocab_size=256, rank=16))
    with pytest.raises(CheckpointError, match=r"does not fit this model \(size mismatch for .*: was it trained with"):
        load_checkpoint(latest_checkpoint(tmp_path), b)


def test_a_resume_on_other_data_is_refused(dataset, reference, tmp_path):
    """--resume --data OTHER (another tokenizer, or the same directory rebuilt) is refused before the model is built:
    the checkpoint records the training split's SHA-1 and the vocabulary."""
    import shutil
    from elas.data import prepare
    run = tmp_path / "run"
    shutil.copytree(reference / "killed", run)
    texts, other = tmp_path / "texts", tmp_path / "other"
    texts.mkdir()
    for i in range(40):
        (texts / f"t{i}.txt").write_text(f"other text number {i} " * 200)
    prepare(other, source="files", files=[str(texts)], vocab_size=300, val_frac=0.2, log=lambda *a: None)
    r = run_cli(*train_args(other, run, *COMMON, "--resume"))
    assert r.returncode == 2 and "is not the data checkpoint step-00000006 was trained on (train_sha1 " in r.stderr
    assert "; vocab_size " in r.stderr and " -> 300)" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert "--init-from" not in r.stderr  # a low-rank run's weights cannot start another run: not suggested

FULL_DISK = r"""
import resource, signal, sys, json
from pathlib import Path
import torch
from elas.build import build_model
from elas.config import model_preset
from elas.train.checkpoint import CheckpointError, save_checkpoint, latest_checkpoint
run = Path(sys.argv[1])
model = build_model(model_preset("llama-tiny-elas", n_layers=1, vocab_size=256))
opt = torch.optim.AdamW(model.parameters())
model(torch.randint(0, 256, (1, 8)), torch.randint(0, 256, (1, 8))).backward(); opt.step()
save_checkpoint(run, 1, model, opt, {"step": 1})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
try:
    save_checkpoint(run, 2, model, opt, {"step": 2})
except CheckpointError as e:
    print("ERROR", e)
"""


def test_a_real_write_failure_is_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    """Not a monkeypatched writer: the file-size limit makes the real safetensors/torch writes fail."""
    r = subprocess.run([sys.executable, "-c", FULL_DISK, str(tmp_path / "run")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    (line,) = [ln for ln in r.stdout.splitlines() if ln.startswith("ERROR")]
    assert "could not write the checkpoint of step 2" in line and "GB free" in line
    assert "the newest complete checkpoint is step-00000001" in line
    ck = tmp_path / "run" / "checkpoints"
    assert not list(ck.glob("*.tmp"))
    assert latest_checkpoint(tmp_path / "run").name == "step-00000001"
    assert verify_checkpoint(ck / "step-00000001") is None
    files = json.loads((ck / "step-00000001" / "manifest.json").read_text())["files"]
    assert set(files) == {"model.safetensors", "optimizer.pt", "trainer.json"}


def test_a_kill_during_a_checkpoint_write_resumes_from_the_one_before(dataset, reference, tmp_path):
    run = tmp_path / "run"
    killed = run_cli(*train_args(dataset, run, *COMMON), env={"ELAS_FAULT_IN_CHECKPOINT": "4"})
    assert killed.returncode < 0
    assert (run / "checkpoints" / "step-00000004.tmp").is_dir()  # the half-written one, never renamed in place
    # a stop-save's leftover (SIGTERM at step 3, SIGKILL mid-write): no later save rewrites step 3, so nothing but
    # the resume's clean-up frees its disk
    (run / "checkpoints" / "step-00000003.tmp").mkdir()
    r = _resume_and_compare(dataset, run, reference / "ref")
    assert "step-00000002" in r.stdout.split("resumed from")[1].splitlines()[0]
    assert not list((run / "checkpoints").glob("*.tmp"))
    for name in ("step-00000003.tmp", "step-00000004.tmp"):
        assert f"removed checkpoints/{name}, a save killed mid-write" in r.stdout


def test_a_process_group_stuck_at_teardown_is_reported_and_left(monkeypatch, capsys):
    """`destroy_process_group` that never returns (a rare gloo hang after a complete run): shutdown gives up after
    its timeout with a line and the threads' stacks on stderr, and says so, so that the CLI can leave the process;
    an error of the teardown itself is raised in the caller's thread."""
    import threading
    import time

    import torch.distributed as dist

    from elas.train.distributed import Dist, shutdown
    stuck = threading.Event()
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "destroy_process_group", lambda: stuck.wait(30))
    t0 = time.perf_counter()
    assert shutdown(Dist(rank=1, world=2), timeout_s=0.3) is False
    assert time.perf_counter() - t0 < 10
    err = capsys.readouterr().err
    assert "rank 1: the process group did not come down within 0.3 s" in err and "elas-teardown" in err
    stuck.set()

    def broken():
        raise RuntimeError("backend gone")
    monkeypatch.setattr(dist, "destroy_process_group", broken)
    with pytest.raises(RuntimeError, match="backend gone"):
        shutdown(Dist(rank=0, world=2), timeout_s=5)
    monkeypatch.setattr(dist, "destroy_process_group", lambda: None)
    assert shutdown(Dist(rank=0, world=2), timeout_s=5) is True
    assert shutdown(Dist(), timeout_s=5) is True  # one process: nothing to tear down


def _small_grid(monkeypatch):
    """The quality grid's runs with a short evaluation (its schedules as the grid sets them)."""
    from elas.train import experiment
    real = experiment.variant_config

    def small(*a, **kw):
        cfg = real(*a, **kw)
        cfg.eval_tokens = 2048
        return cfg
    monkeypatch.setattr(experiment, "variant_config", small)
    return experiment


def test_a_grid_killed_at_a_runs_summary_resumes_it_and_refuses_other_settings(dataset, tmp_path, monkeypatch):
    """A kill while a finished run's summary.json is written, or just before, loses nothing: the next invocation
    takes the run's last evaluation, and never reads half a file. A run directory holding a run of other settings
    (--steps changed) is refused before any run, not skipped as done or resumed into a mixed run."""
    import builtins
    import io
    experiment = _small_grid(monkeypatch)
    grid = dict(batch_size=2, grad_accum=1, log=lambda *a: None)
    real_open = builtins.open

    def killed_open(file, mode="r", *a, **kw):  # the process dies halfway through writing a summary.json
        fh = real_open(file, mode, *a, **kw)
        if "summary.json" in str(file) and "w" in mode:
            def write(data, _write=fh.write):
                _write(data[: len(data) // 2])
                fh.flush()
                raise KeyboardInterrupt
            fh.write = write
        return fh
    with monkeypatch.context() as m:
        m.setattr(builtins, "open", killed_open)
        m.setattr(io, "open", killed_open)
        with pytest.raises(KeyboardInterrupt):
            experiment.run_grid("llama-tiny", ["relu2"], 2, str(dataset), tmp_path, **grid)
    run = tmp_path / "relu2"
    final = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if "val_loss" in ln][-1]
    assert final["step"] == 2
    (row,) = experiment.run_grid("llama-tiny", ["relu2"], 2, str(dataset), tmp_path, **grid)
    assert row["val_loss"] == final["val_loss"] and row["steps"] == 2
    assert json.loads((run / "summary.json").read_text())["val_loss"] == final["val_loss"]
    (run / "summary.json").unlink()  # killed after the run ended, before its summary.json
    (row,) = experiment.run_grid("llama-tiny", ["relu2"], 2, str(dataset), tmp_path, **grid)
    assert row["val_loss"] == final["val_loss"] and row["val_ppl"] == final["val_ppl"]
    with pytest.raises(ValueError, match="max_steps 2 -> 4"):
        experiment.run_grid("llama-tiny", ["relu2"], 4, str(dataset), tmp_path, **grid)
    with pytest.raises(ValueError, match="batch_size 2 -> 3"):
        experiment.run_grid("llama-tiny", ["relu2"], 2, str(dataset), tmp_path, batch_size=3, grad_accum=1)
    assert json.loads((run / "config.json").read_text())["max_steps"] == 2  # the run was left alone
    (run / "config.json").unlink()  # lost: the checkpoints' copy still says what the run was
    with pytest.raises(ValueError, match="batch_size 2 -> 3"):
        experiment.run_grid("llama-tiny", ["relu2"], 2, str(dataset), tmp_path, batch_size=3, grad_accum=1)


def test_a_final_evaluation_that_failed_after_its_checkpoint_is_run_by_the_resume(dataset, tmp_path, monkeypatch):
    """The last step's evaluation fails (an out-of-memory, say) after the step's checkpoint was written for it
    (`_save_before_failing`): the run is then complete without its final validation loss. The grid's next
    invocation (or `elas train --resume`) evaluates it then, rather than failing on the missing record every time."""
    import elas.train.trainer as trainer
    experiment = _small_grid(monkeypatch)
    grid = dict(batch_size=2, grad_accum=1, log=lambda *a: None)
    real = trainer.evaluate
    with monkeypatch.context() as m:
        def oom(*a, **k):
            raise RuntimeError("CUDA out of memory (simulated)")
        m.setattr(trainer, "evaluate", oom)
        with pytest.raises(RuntimeError, match="out of memory"):
            experiment.run_grid("llama-tiny", ["relu2"], 1, str(dataset), tmp_path, **grid)
    run = tmp_path / "relu2"
    assert latest_checkpoint(run).name == "step-00000001" and not (run / "summary.json").exists()
    assert trainer.evaluate is real
    (row,) = experiment.run_grid("llama-tiny", ["relu2"], 1, str(dataset), tmp_path, **grid)
    final = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if "val_loss" in ln]
    assert [r["step"] for r in final] == [1] and row["val_loss"] == final[0]["val_loss"]


def test_a_grid_goes_on_past_a_run_another_process_trains(dataset, tmp_path, monkeypatch):
    """Two grid processes given overlapping variants: the second finds a run locked by the first (its trainer
    holds the run's lock) and goes on with its other runs, one line for the run left to the other process and a
    closing one, rather than stopping the whole grid at that run; once the lock is gone the run is trained."""
    experiment = _small_grid(monkeypatch)
    logs = []
    grid = dict(batch_size=2, grad_accum=1, log=logs.append)
    (tmp_path / "relu2").mkdir()
    holder = hold_run_lock(tmp_path / "relu2")
    try:
        rows = experiment.run_grid("llama-tiny", ["relu2", "swiglu"], 1, str(dataset), tmp_path, **grid)
    finally:
        holder.kill()
        holder.wait()
    assert [r["run"] for r in rows] == ["swiglu"]
    assert any(line.startswith("relu2: skipped: another elas process trains it") for line in logs), logs
    assert logs[-1] == "1 run(s) left to the other elas process(es) training them: relu2"
    assert not (tmp_path / "relu2" / "checkpoints").exists()
    rows = experiment.run_grid("llama-tiny", ["relu2", "swiglu"], 1, str(dataset), tmp_path, **grid)
    assert [r["run"] for r in rows] == ["relu2", "swiglu"] and rows[0]["val_loss"] > 0


def test_a_grid_refuses_a_partial_run_of_other_data_before_any_run(dataset, tmp_path, monkeypatch):
    """A run kept with checkpoints (not finished) was trained on other data than the grid's --data now: the
    trainer would refuse to resume it at its turn, after the runs before it had trained on the new data; the
    grid refuses it before any run, as it does another --steps."""
    from elas.data import prepare
    experiment = _small_grid(monkeypatch)
    grid = dict(batch_size=2, grad_accum=1, log=lambda *a: None)
    experiment.run_grid("llama-tiny", ["relu2"], 2, str(dataset), tmp_path / "g", **grid)
    (tmp_path / "g" / "relu2" / "summary.json").unlink()  # complete, killed before its summary: kept, not finished
    other = prepare(tmp_path / "other", tokenizer=str(dataset), source="builtin", max_mb=1.0, val_frac=0.05,
                    log=lambda *a: None)
    assert other["train_sha1"] != json.loads((dataset / "meta.json").read_text())["train_sha1"]
    with pytest.raises(ValueError, match=r"relu2 holds a run with other settings \(data train_sha1 "):
        experiment.run_grid("llama-tiny", ["swiglu", "relu2"], 2, str(tmp_path / "other"), tmp_path / "g", **grid)
    assert not (tmp_path / "g" / "swiglu").exists()
    (row,) = experiment.run_grid("llama-tiny", ["relu2"], 2, str(dataset), tmp_path / "g", **grid)  # its own data
    assert row["steps"] == 2


def test_transfer_data_for_a_finished_run_without_checkpoints_goes_on(dataset, tmp_path, monkeypatch):
    """--transfer-data given to a grid whose finished runs kept no checkpoint (a copied folder of results,
    archived without checkpoints): such a run cannot be evaluated on it; it is said in one line and kept as done,
    without a transfer loss, and the grid goes on (it stopped with an error naming `--resume`, a flag of
    `elas train`)."""
    from elas.data import prepare
    experiment = _small_grid(monkeypatch)
    logs = []
    grid = dict(batch_size=2, grad_accum=1, log=logs.append)
    experiment.run_grid("llama-tiny", ["relu2"], 1, str(dataset), tmp_path / "g", **grid)
    import shutil
    shutil.rmtree(tmp_path / "g" / "relu2" / "checkpoints")
    prepare(tmp_path / "same", tokenizer=str(dataset), source="site-packages", max_mb=0.3, val_frac=0.2,
            log=lambda *a: None)
    rows = experiment.run_grid("llama-tiny", ["relu2", "swiglu"], 1, str(dataset), tmp_path / "g",
                               transfer=str(tmp_path / "same"), **grid)
    assert [r["run"] for r in rows] == ["relu2", "swiglu"]
    assert "transfer_loss" not in rows[0] and rows[1]["transfer_loss"] > 0
    assert any(line.startswith("relu2: done before, skipped; no checkpoint kept to evaluate on the transfer data")
               for line in logs), logs
    _, md = experiment.summarize(tmp_path / "g")
    assert "| relu2 |" in md and "| swiglu |" in md


def test_resuming_a_complete_run_or_another_length_is_said(dataset, reference, tmp_path):
    """A resume of a finished run says it is complete; one with a --max-steps at or below its step trains
    nothing and leaves config.json as it was; one with a longer --max-steps warns that the schedule changes from
    the resumed step on."""
    import shutil
    run = tmp_path / "run"
    shutil.copytree(reference / "ref", run)
    r = run_cli("train", "--out", str(run), "--no-progress", "--resume")
    assert r.returncode == 0 and "the run is complete (step 8 of max_steps=8)" in r.stdout + r.stderr
    before = (run / "config.json").read_bytes()
    r = run_cli("train", "--out", str(run), "--no-progress", "--resume", "--max-steps", "2")  # trains nothing
    assert r.returncode == 0 and "keeps max_steps=8" in r.stdout + r.stderr
    assert (run / "config.json").read_bytes() == before  # the run's plan is not rewritten by a resume that did nothing
    r = run_cli("train", "--out", str(run), "--no-progress", "--resume", "--max-steps", "10")
    assert r.returncode == 0, r.stderr
    assert "max_steps 8 -> 10: the learning-rate schedule" in r.stdout + r.stderr


def test_consolidating_a_damaged_sharded_checkpoint_refuses_and_leaves_its_manifest(dataset, tmp_path):
    """eval/generate/export of a sharded checkpoint consolidate its shards first: a damaged shard is refused
    (rewriting the manifest over it would make it verify, and a resume take it), and a whole one gets its
    model.safetensors added to the manifest without the other files' hashes being taken again."""
    from elas.train.checkpoint import CheckpointError, consolidate, load_weights
    run = tmp_path / "run"
    r = run_cli(*train_args(dataset, run, "--max-steps", "2", "--set", "save_every=2", "--set", "eval_every=100",
                            "--set", "parallel=fsdp"))  # one process: DCP checkpoints all the same
    assert r.returncode == 0, r.stderr
    # said once at the start, not as torch's warning at every save ("torch.distributed is disabled ...")
    said = r.stdout + r.stderr
    assert "parallel=fsdp in one process: nothing is sharded" in said and "torch.distributed" not in said, said
    ck = run / "checkpoints" / "step-00000002"
    before = json.loads((ck / "manifest.json").read_text())["files"]
    damaged = tmp_path / "damaged"
    import shutil
    shutil.copytree(ck, damaged)
    shard = next((damaged / "dcp").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="is damaged .*does not match its hash.*not consolidated"):
        load_weights(damaged)
    assert verify_checkpoint(damaged) is not None and not (damaged / "model.safetensors").exists()
    (damaged / "manifest.json").unlink()  # a lost manifest: trainer.json says it had one, so nothing vouches
    with pytest.raises(CheckpointError, match="its manifest is missing.*not consolidated"):
        consolidate(damaged)
    consolidate(ck)
    after = json.loads((ck / "manifest.json").read_text())["files"]
    assert set(after) == set(before) | {"model.safetensors"}
    assert all(after[k] == v for k, v in before.items()) and verify_checkpoint(ck) is None
    assert "lm_head.weight" in load_weights(ck)


def test_a_failing_evaluation_writes_its_steps_checkpoint_first(dataset, tmp_path, monkeypatch, capsys):
    """An evaluation that raises (a CUDA out-of-memory compiling its no-grad graphs, say) between two checkpoints:
    the steps since the last one are saved before the error is reported, and a resume continues from them."""
    import elas.train.trainer as trainer
    from elas.cli import main
    run = tmp_path / "run"

    def oom(*a, **k):
        raise RuntimeError("CUDA out of memory (simulated)")
    monkeypatch.setattr(trainer, "evaluate", oom)
    with pytest.raises(RuntimeError, match="out of memory"):
        main(train_args(dataset, run, "--max-steps", "8", "--set", "save_every=100", "--set", "eval_every=3"))
    assert "the evaluation at step 3 failed; the checkpoint of step 3 was written first" in capsys.readouterr().out
    assert latest_checkpoint(run).name == "step-00000003" and verify_checkpoint(latest_checkpoint(run)) is None
    monkeypatch.undo()
    assert main(train_args(dataset, run, "--max-steps", "8", "--set", "save_every=100", "--set", "eval_every=3",
                           "--resume")) == 0
    assert sorted(losses(run)) == list(range(1, 9))


def test_a_resume_with_other_parameter_dtype_says_so(dataset, tmp_path, capsys):
    """A checkpoint of bf16 parameters (fp32 masters) resumed where they would be fp32 (param_dtype=auto under
    torchrun or on a CPU; here set explicitly) is one line naming both and where it can resume, not a "corrupt
    checkpoint" from deep in the optimizer's loading."""
    from elas.cli import main
    run = tmp_path / "run"
    common = ["--max-steps", "4", "--set", "save_every=2", "--set", "eval_every=100"]
    assert main(train_args(dataset, run, *common, "--set", "param_dtype=bf16", "--max-steps", "2")) == 0
    assert json.loads((latest_checkpoint(run) / "trainer.json").read_text())["param_dtype"] == "bf16"
    capsys.readouterr()
    assert main(train_args(dataset, run, *common, "--set", "param_dtype=fp32", "--resume")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("elas: error: checkpoint step-00000002 holds the optimizer state of bf16 parameters, "
                              "but this run would hold them in fp32"), err
    assert "resume it on one GPU (param_dtype auto or bf16)" in err[-1]
    assert main(train_args(dataset, run, *common, "--set", "param_dtype=bf16", "--resume")) == 0
    assert sorted(losses(run)) == [1, 2, 3, 4]


def test_a_longer_resume_names_the_sparse_phase_that_moves(dataset, tmp_path, capsys):
    """A method whose sparse phase ends at a fraction of the run (sparse_until 0.3) moves with --max-steps: the
    resume's warning names it beside the learning-rate schedule."""
    from conftest import TINY
    from elas.cli import main
    args = ["train", "--preset", "llama-tiny-relu2-vnm-fast", "--data", str(dataset), "--out", str(tmp_path / "r"),
            "--no-progress", *TINY, "--set", "save_every=2", "--set", "eval_every=100",
            "--set", "model.vnm.dense_warmup_steps=0"]
    assert main([*args, "--max-steps", "10"]) == 0
    capsys.readouterr()
    assert main([*args, "--max-steps", "20", "--resume"]) == 0
    assert ("max_steps 10 -> 20: the learning-rate schedule (warm-up, then cosine to step 20) and the end of the "
            "sparse phase of vnm (sparse_until a fraction of the run) change from step 10 on") in capsys.readouterr().out


def _saved_tiny(run, steps):
    """A one-layer model after one AdamW step, saved at each of `steps` (none pruned)."""
    import torch
    from elas.build import build_model
    from elas.config import model_preset
    from elas.train.checkpoint import save_checkpoint
    torch.manual_seed(0)
    model = build_model(model_preset("llama-tiny-elas", n_layers=1, vocab_size=256))
    opt = torch.optim.AdamW(model.parameters())
    idx = torch.randint(0, 256, (1, 8))
    model(idx, idx).backward()
    opt.step()
    for s in steps:
        save_checkpoint(run, s, model, opt, {"step": s}, keep=5)
    return model, opt


def test_a_failed_latest_update_leaves_the_complete_checkpoint_saved(tmp_path, monkeypatch, capsys):
    """`latest` is written after the checkpoint is renamed into place: where that write fails (a full disk),
    the save has succeeded (a resume takes the newest complete checkpoint whatever `latest` says), with a warning,
    not a CheckpointError that says a complete checkpoint was not written."""
    import errno
    from elas.train import checkpoint as ck
    run = tmp_path / "run"
    model, opt = _saved_tiny(run, [1])
    real = ck.write_atomic

    def full_disk_for_latest(path, data):
        if path.name == "latest":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)
    monkeypatch.setattr(ck, "write_atomic", full_disk_for_latest)
    capsys.readouterr()
    final = ck.save_checkpoint(run, 2, model, opt, {"step": 2})
    assert final.name == "step-00000002" and verify_checkpoint(final) is None
    err = capsys.readouterr().err
    assert "step-00000002 is complete" in err and "No space left on device" in err
    assert latest_checkpoint(run).name == "step-00000001"
    assert ck.resume_checkpoint(run, log=lambda m: None).name == "step-00000002"


def test_room_is_made_from_a_damaged_checkpoint_not_the_complete_ones_behind_it(tmp_path, monkeypatch):
    """_make_room keeps the newest checkpoint that verifies, not the newest with a manifest, and removes first
    the damaged ones newer than it (a resume could not use them), before any complete older one."""
    from collections import namedtuple
    from elas.train import checkpoint as ck
    run = tmp_path / "run"
    model, opt = _saved_tiny(run, [1, 2, 3])
    damaged = run / "checkpoints" / "step-00000003" / "model.safetensors"
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes: only the hash tells
    damaged.write_bytes(bytes(data))
    assert verify_checkpoint(damaged.parent) == "model.safetensors does not match its hash (corrupted)"
    ck._VOUCHED.clear()  # as in a later process (a resume), which did not write them
    need = ck._nbytes(ck.snapshot(model, opt))
    usage = namedtuple("usage", "total used free")
    capacity = ck._dir_bytes(run / "checkpoints") + need // 2  # half a checkpoint free: one must go

    def fake_usage(path):
        used = ck._dir_bytes(Path(path))
        return usage(capacity, used, max(capacity - used, 0))
    monkeypatch.setattr(ck.shutil, "disk_usage", fake_usage)
    ck.save_checkpoint(run, 4, model, opt, {"step": 4}, keep=5)
    assert [p.name for p in ck.checkpoints(run)] == ["step-00000004", "step-00000002", "step-00000001"]
    assert verify_checkpoint(run / "checkpoints" / "step-00000002") is None


def test_checkpoints_this_process_wrote_are_not_hashed_again_to_make_room(tmp_path, monkeypatch):
    """The checkpoints a process wrote (their manifest hashed the bytes as written) or verified are known whole
    to it: making room does not read them again (at 7B tens of GB, while a sharded save's other ranks wait)."""
    from collections import namedtuple
    from elas.train import checkpoint as ck
    run = tmp_path / "run"
    model, opt = _saved_tiny(run, [1, 2])
    hashed = []
    real = ck._file_hash
    monkeypatch.setattr(ck, "_file_hash", lambda f: hashed.append(f.name) or real(f))
    need = ck._nbytes(ck.snapshot(model, opt))
    usage = namedtuple("usage", "total used free")
    capacity = ck._dir_bytes(run / "checkpoints") + need // 2
    monkeypatch.setattr(ck.shutil, "disk_usage", lambda path: usage(capacity, 0, need // 2))
    ck.save_checkpoint(run, 3, model, opt, {"step": 3}, keep=5)
    # (the new checkpoint's small trainer.json is hashed as it is written; nothing of the older ones is read)
    assert hashed == ["trainer.json"] and [p.name for p in ck.checkpoints(run)] == ["step-00000003", "step-00000002"]


def test_a_sharded_save_makes_room_as_a_one_file_save(tmp_path, monkeypatch):
    """save_sharded_checkpoint (one process, no process group: it writes every shard) removes older checkpoints
    for room as save_checkpoint does, and where even that would not do, fails before writing: one
    CheckpointError, nothing partial left, the complete checkpoints kept."""
    from collections import namedtuple
    from elas.train import checkpoint as ck
    run = tmp_path / "run"
    model, opt = _saved_tiny(run, [1, 2])
    usage = namedtuple("usage", "total used free")
    size = ck._dir_bytes(run / "checkpoints" / "step-00000001")
    capacity = {"bytes": ck._dir_bytes(run / "checkpoints") + size // 4}

    def fake_usage(path):
        used = ck._dir_bytes(Path(path))
        return usage(capacity["bytes"], used, max(capacity["bytes"] - used, 0))
    monkeypatch.setattr(ck.shutil, "disk_usage", fake_usage)
    ck.save_sharded_checkpoint(run, 3, model, opt, {"step": 3}, keep=5)  # step 1 made room
    assert [p.name for p in ck.checkpoints(run)] == ["step-00000003", "step-00000002"]
    assert verify_checkpoint(run / "checkpoints" / "step-00000003") is None
    capacity["bytes"] = ck._dir_bytes(run / "checkpoints")  # full: removing step 2 would not make room
    with pytest.raises(ck.CheckpointError, match="not enough free space"):
        ck.save_sharded_checkpoint(run, 4, model, opt, {"step": 4}, keep=5)
    assert [p.name for p in ck.checkpoints(run)] == ["step-00000003", "step-00000002"]
    assert not list((run / "checkpoints").glob("*.tmp"))


def test_write_atomic_leaves_no_temporary_file_when_the_write_fails(tmp_path, monkeypatch):
    """A write that fails (a full disk at fsync) keeps the file's old contents and leaves no `.tmp` beside it."""
    import errno
    from elas.train import checkpoint as ck
    target = tmp_path / "latest"
    ck.write_atomic(target, b"step-00000001")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(ck.os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        ck.write_atomic(target, b"step-00000002")
    assert target.read_bytes() == b"step-00000001" and [p.name for p in tmp_path.iterdir()] == ["latest"]


def _durability_log(monkeypatch):
    """The fsyncs (by path) and renames (source, destination) that follow, in order (Linux: /proc/self/fd)."""
    from elas.train import checkpoint as ck
    events, fsync, replace = [], ck.os.fsync, ck.os.replace

    def logged_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return fsync(fd)

    def logged_replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        return replace(src, dst)
    monkeypatch.setattr(ck.os, "fsync", logged_fsync)
    monkeypatch.setattr(ck.os, "replace", logged_replace)
    return events


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names fsynced descriptors through /proc")
def test_a_checkpoints_directory_entries_are_fsynced_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    """The files of step-N.tmp are fsynced, and so must be the directory's entries naming them (a new file's
    entry is not made durable by fsyncing the file): otherwise a machine crash after the rename, and after the
    prune that follows it removed the older checkpoints, can leave a step-N whose files are gone."""
    from elas.train import checkpoint as ck
    run = tmp_path / "run"
    model, opt = _saved_tiny(run, [1])
    events = _durability_log(monkeypatch)
    ck.save_checkpoint(run, 2, model, opt, {"step": 2}, keep=5)
    tmp = str(run.resolve() / "checkpoints" / "step-00000002.tmp")
    renamed = events.index(("replace", str(run / "checkpoints" / "step-00000002.tmp"),
                            str(run / "checkpoints" / "step-00000002")))
    manifest = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2].endswith("manifest.json"))
    assert ("fsync", tmp) in events[manifest:renamed], events


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names fsynced descriptors through /proc")
def test_consolidated_weights_are_fsynced_before_the_manifest_vouches_for_them(tmp_path, monkeypatch):
    """consolidate renames model.safetensors into a checkpoint and lists its hash in the manifest: a machine
    crash that left it empty (its data never written back) would make the whole checkpoint, its shards intact,
    fail to verify, and a resume move it aside."""
    from elas.train import checkpoint as ck
    run = tmp_path / "run"
    model, opt = _saved_tiny(run, [])
    ckpt = ck.save_sharded_checkpoint(run, 1, model, opt, {"step": 1}, keep=5)
    events = _durability_log(monkeypatch)
    ck.consolidate(ckpt)
    assert verify_checkpoint(ckpt) is None
    moved = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2].endswith("model.safetensors"))
    assert ("fsync", str((ckpt / "model.tmp").resolve())) in events[:moved], events


def test_a_diverging_run_is_recorded_and_the_grid_goes_on(dataset, tmp_path, monkeypatch, capsys):
    """A variant whose loss becomes NaN/inf is a result, not the end of the grid: its directory records where it
    diverged, the other runs train, a later call skips it (resumed, it would diverge again), the plan and the
    summary name it, and `elas experiment` exits 1."""
    experiment = _small_grid(monkeypatch)
    logs = []
    grid = dict(batch_size=2, grad_accum=1, log=logs.append)
    bad = "relu2+init_std=1e20"  # logits of ~1e40: inf in fp32, the loss NaN from the first step
    rows = experiment.run_grid("llama-tiny", [bad, "swiglu"], 2, str(dataset), tmp_path, **grid)
    assert [r["run"] for r in rows] == ["swiglu"]
    rec = json.loads((tmp_path / bad / "diverged.json").read_text())
    assert rec["step"] == 1 and rec["settings"]["max_steps"] == 2 and not (tmp_path / bad / "summary.json").exists()
    assert any(line.startswith(f"{bad}: diverged: loss or weights NaN/inf by step 1") for line in logs), logs
    assert logs[-1] == f"1 run(s) diverged, without a summary row: {bad}"
    logs.clear()
    rows = experiment.run_grid("llama-tiny", [bad, "swiglu"], 2, str(dataset), tmp_path, **grid)
    assert [r["run"] for r in rows] == ["swiglu"]
    assert any(line.startswith(f"{bad}: skipped: it diverged before") for line in logs), logs
    (state,) = [r["state"] for r in experiment.grid_plan([bad], [0], tmp_path, 2) if r["variant"] == bad]
    assert state == "diverged"
    _, text = experiment.summarize(tmp_path)
    assert f"**{bad} diverged** at step 1" in text
    logs.clear()  # a record made with other settings (here --steps) does not stop a run of these: trained again
    experiment.run_grid("llama-tiny", [bad], 3, str(dataset), tmp_path, **grid)
    assert not any("skipped" in line for line in logs) and any(line.startswith(f"{bad}: diverged: loss or weights "
                                                                               f"NaN/inf by step 1") for line in logs)
    assert json.loads((tmp_path / bad / "diverged.json").read_text())["settings"]["max_steps"] == 3
    from elas.cli import main
    assert main(["experiment", "--size", "llama-tiny", "--out", str(tmp_path), "--summarize-only"]) == 1
    assert f"**{bad} diverged**" in capsys.readouterr().out


def test_a_sharded_save_or_load_that_fails_in_the_checkpoint_library_is_one_error(tmp_path, monkeypatch):
    """torch.distributed.checkpoint reports a process's failure (a full disk writing its shard, a shard that cannot
    be read) as CheckpointException, a BaseException: it went past `except Exception` as a traceback on every
    process, leaving the partial checkpoint. Now one CheckpointError, nothing partial left, the older kept."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception
    from elas.train import checkpoint as ck
    run = tmp_path / "run"
    model, opt = _saved_tiny(run, [1])
    good = ck.save_sharded_checkpoint(run, 2, model, opt, {"step": 2}, keep=5)

    def failing(*a, **k):
        raise CheckpointException("failed", {1: _wrap_exception(OSError(28, "No space left on device"))})
    monkeypatch.setattr(dcp, "save", failing)
    with pytest.raises(ck.CheckpointError, match=r"could not write the checkpoint of step 3 in .* \(process 1: "
                                                 r"OSError: \[Errno 28\] No space left on device\)"):
        ck.save_sharded_checkpoint(run, 3, model, opt, {"step": 3}, keep=5)
    assert [p.name for p in ck.checkpoints(run)] == ["step-00000002", "step-00000001"]
    assert not list((run / "checkpoints").glob("*.tmp"))
    monkeypatch.setattr(dcp, "load", failing)
    with pytest.raises(ck.CheckpointError, match=r"is corrupt, incomplete or of another model \(CheckpointException: "
                                                 r"process 1: OSError"):
        ck.load_sharded_checkpoint(good, model, opt)


def _grid_row(run_dir, **kw):
    """A finished grid run's summary.json (a results folder copied without the run's config and checkpoints)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    row = {"model": "llama-tiny", "variant": "relu2", "seed": 0, "steps": 2, "tokens": 2 * 2 * 256, "val_loss": 7.0,
           "val_ppl": 1000.0, "optimizer": "adamw", "epochs": 0.1, "wall_s": 300.0, **kw}
    (run_dir / "summary.json").write_text(json.dumps(row))


def test_time_left_scales_a_done_run_of_another_budget(dataset, tmp_path, monkeypatch):
    """relu2 (seed 0) finished here at --steps 2 in 300 GPU-s: a 4-step seed 1 needs ~600 s, not 300 (it started
    with 400 s left), and --plan says so."""
    experiment = _small_grid(monkeypatch)
    out = tmp_path / "g"
    _grid_row(out / "relu2")
    (plan,) = experiment.grid_plan(["relu2"], [1], out, 4, size="llama-tiny", tokens=4 * 2 * 256)
    assert plan["gpu_s_left"] == pytest.approx(600.0)
    logs = []
    assert experiment.run_grid("llama-tiny", ["relu2"], 4, str(dataset), out, batch_size=2, grad_accum=1,
                               seeds=(1,), time_left=400.0, log=logs.append) == []
    assert any(line.startswith("relu2.seed1: not started: needs ~600 s") for line in logs), logs


def test_the_summary_table_does_not_average_seeds_of_different_budgets(tmp_path):
    from elas.train import experiment
    _grid_row(tmp_path / "relu2", steps=2, tokens=1024, val_loss=2.0)
    _grid_row(tmp_path / "relu2.seed1", seed=1, steps=4, tokens=2048, val_loss=1.0)
    _, md = experiment.summarize(tmp_path)
    assert "1.5000 (1.0000-2.0000)" not in md
    assert "| relu2 | adamw | 0 | 2 | 1,024 |" in md and "| relu2 | adamw | 1 | 4 | 2,048 |" in md


def test_time_left_counts_the_data_preparation_of_the_same_call(dataset, tmp_path, monkeypatch):
    """--time-left 4 with the built-in data prepared in the call (3 s here): 1 s is left when the grid looks at a
    run estimated at 2.5 s, which must not start."""
    import shutil
    import time
    import elas.data
    from elas import cli
    _small_grid(monkeypatch)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(elas.data, "prepare", lambda d, **kw: (time.sleep(3), shutil.copytree(dataset, d)))
    _grid_row(tmp_path / "g" / "relu2", wall_s=2.5)
    cli.main(["experiment", "--size", "llama-tiny", "--steps", "2", "--batch-size", "2", "--grad-accum", "1",
              "--data", "data/builtin-8k", "--out", "g", "--seeds", "1", "--variants", "relu2", "--time-left", "4"])
    assert not (tmp_path / "g" / "relu2.seed1" / "summary.json").exists()


def test_a_lone_summary_of_another_budget_is_not_counted_done(dataset, tmp_path, monkeypatch):
    experiment = _small_grid(monkeypatch)
    _grid_row(tmp_path / "relu2", steps=2)
    with pytest.raises(ValueError, match="steps 2 -> 4"):
        experiment.run_grid("llama-tiny", ["relu2"], 4, str(dataset), tmp_path, batch_size=2, grad_accum=1,
                            log=lambda *a: None)


def test_bad_grid_folders_are_one_line_errors_before_any_run(dataset, tmp_path, capsys, monkeypatch):
    from elas.cli import main
    experiment = _small_grid(monkeypatch)
    grid = tmp_path / "runs" / "quality"
    _grid_row(grid / "relu2")
    assert main(["experiment", "--summarize-only", "--out", str(grid)]) == 0  # a grid: its summary.json is a list
    capsys.readouterr()
    assert main(["experiment", "--summarize-only", "--out", str(tmp_path / "runs")]) == 2  # its parent
    err = capsys.readouterr().err
    assert err.startswith("elas: error:") and err.count("\n") == 1 and "--out" in err, err
    monkeypatch.setattr(experiment, "run_grid", lambda *a, **kw: pytest.fail("a run started"))
    assert main(["experiment", "--size", "llama-tiny", "--steps", "1", "--batch-size", "2", "--grad-accum", "1",
                 "--data", str(dataset), "--out", str(tmp_path / "runs"), "--variants", "relu2"]) == 2
    (tmp_path / "afile").write_text("x")
    for out in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        capsys.readouterr()
        assert main(["experiment", "--size", "llama-tiny", "--steps", "1", "--batch-size", "2", "--grad-accum", "1",
                     "--data", str(dataset), "--out", str(out), "--variants", "relu2"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("elas: error:") and err.count("\n") == 1, err


def test_the_summary_shows_the_transfer_perplexity(tmp_path):
    """The quality issue asks for perplexity on the transfer text: exp of each seed's transfer loss, mean and
    min-max as the losses'."""
    import math
    from elas.train import experiment
    _grid_row(tmp_path / "relu2", transfer_loss=2.0)
    _grid_row(tmp_path / "relu2.seed1", seed=1, transfer_loss=3.0)
    _, md = experiment.summarize(tmp_path)
    assert "| transfer loss | transfer ppl |" in md
    assert f"| 2.5000 (2.0000-3.0000) | {(math.e ** 2 + math.e ** 3) / 2:.2f} ({math.e ** 2:.2f}-{math.e ** 3:.2f}) |" in md



def test_a_damaged_checkpoint_without_its_manifest_is_not_taken(dataset, reference, tmp_path):
    """A checkpoint whose manifest.json is gone (deleted, lost by fsck, a copy that skipped it) is trusted on the
    existence of its files alone: a zeroed block in model.safetensors then loads silently."""
    run = tmp_path / "run"
    shutil.copytree(reference / "killed", run)
    ck = run / "checkpoints" / "step-00000006"
    (ck / "manifest.json").unlink()
    _damage(ck / "model.safetensors", "zero")
    assert verify_checkpoint(ck) is not None  # (it was taken as a pre-manifest checkpoint)


def test_the_final_evaluation_taken_by_a_resume_uses_the_last_steps_forward(dataset, tmp_path, monkeypatch):
    import elas.train.trainer as trainer
    from elas.cli import main
    common = ["--max-steps", "6", "--set", "save_every=100", "--set", "eval_every=100",
              "--set", "model.act24.dense_warmup_steps=2"]  # sparse from step 3 to the end
    assert main(train_args(dataset, tmp_path / "ref", *common)) == 0
    with monkeypatch.context() as m:
        m.setattr(trainer, "evaluate", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("out of memory")))
        with pytest.raises(RuntimeError):
            main(train_args(dataset, tmp_path / "run", *common))
    assert main(train_args(dataset, tmp_path / "run", *common, "--resume")) == 0
    val = {r: [json.loads(ln)["val_loss"] for ln in (tmp_path / r / "metrics.jsonl").read_text().splitlines()
               if "val_loss" in ln] for r in ("ref", "run")}
    assert val["run"] == val["ref"]  # (the resume evaluated the dense forward)


def test_a_save_before_failing_does_not_write_non_finite_weights(dataset, tmp_path, monkeypatch):
    import torch

    import elas.train.trainer as trainer
    from elas.cli import main
    from elas.train.checkpoint import checkpoints
    from safetensors.torch import load_file
    run = tmp_path / "run"
    base = ["--set", "save_every=2", "--set", "keep_checkpoints=1"]
    assert main(train_args(dataset, run, "--max-steps", "2", "--set", "eval_every=100", *base)) == 0
    real = trainer.Trainer.train_step

    def overflowing(self, step, track_stats=False):  # step 3's update leaves inf weights (its loss was finite)
        out = real(self, step, track_stats)
        if step == 2:
            with torch.no_grad():
                next(self.model.parameters()).fill_(float("inf"))
        return out
    monkeypatch.setattr(trainer.Trainer, "train_step", overflowing)
    monkeypatch.setattr(trainer, "evaluate", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("out of memory")))
    with pytest.raises(RuntimeError):
        main(train_args(dataset, run, "--max-steps", "6", "--set", "eval_every=3", *base, "--resume"))
    for c in checkpoints(run):  # (step 3's held inf, and step 2's was pruned for it)
        assert all(torch.isfinite(t).all() for t in load_file(str(c / "model.safetensors")).values()), c.name


def test_a_full_disk_while_recovering_config_json_is_one_line(dataset, tmp_path, monkeypatch, capsys):
    import elas.train.trainer as trainer
    from elas.cli import main
    run = tmp_path / "run"
    common = ["--max-steps", "4", "--set", "save_every=2", "--set", "eval_every=100"]
    assert main(train_args(dataset, run, *common)) == 0
    (run / "config.json").unlink()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(trainer, "write_atomic", full)
    capsys.readouterr()
    assert main(train_args(dataset, run, "--max-steps", "6", "--set", "save_every=2", "--set", "eval_every=100",
                           "--resume")) == 2  # (an OSError traceback)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert err[-1].startswith("elas: error:") and "No space left on device" in err[-1]


def test_resuming_with_other_logging_settings_is_not_said_to_change_the_run(dataset, tmp_path):
    common = ["--max-steps", "8", "--set", "save_every=4", "--set", "eval_every=100"]
    assert run_cli(*train_args(dataset, tmp_path / "ref", *common)).returncode == 0
    run_cli(*train_args(dataset, tmp_path / "run", *common), env={"ELAS_FAULT_AT_STEP": "5"})
    r = run_cli(*train_args(dataset, tmp_path / "run", *common, "--set", "log_every=2", "--set", "eval_every=3",
                            "--set", "keep_checkpoints=5", "--resume"))
    assert r.returncode == 0
    a, b = losses(tmp_path / "ref"), losses(tmp_path / "run")
    assert all(a[s] == b[s] for s in b)  # bit for bit: these keys do not touch the training
    assert "differs from an uninterrupted one" not in r.stderr  # (it was said)


def test_a_bad_resume_value_is_a_clear_line(dataset, tmp_path, capsys):
    from elas.cli import main
    with pytest.raises(SystemExit):
        main(train_args(dataset, tmp_path / "run", "--resume", "True"))
    err = capsys.readouterr().err.splitlines()[-1]
    assert "choose from True" not in err and "expected no value or 'auto'" in err


def test_a_resume_past_a_damaged_checkpoint_points_latest_at_the_one_it_takes(reference, tmp_path):
    """`latest` named the checkpoint moved aside as .corrupt until the next save (for people and tools reading it)."""
    from elas.train.checkpoint import resume_checkpoint
    run = tmp_path / "run"
    shutil.copytree(reference / "killed", run)
    _damage(run / "checkpoints" / "step-00000006" / "model.safetensors", "zero")
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000006"
    taken = resume_checkpoint(run, log=lambda *a: None)
    assert taken.name == "step-00000004" and latest_checkpoint(run) == taken


_SIGNAL_AT = r'''
import os, signal, sys
from elas import cli
from elas.train import trainer as T
where, n, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
def kill():
    os.kill(os.getpid(), signal.SIGTERM)
if where == "last_step":  # during the last training step (read by the loop after it, as any step's)
    real_step = T.Trainer.train_step
    def train_step(self, step, **k):
        out = real_step(self, step, **k)
        if step == n - 1:
            kill()
        return out
    T.Trainer.train_step = train_step
    if os.environ.get("KILL_IN_EVAL"):  # then a launcher's SIGKILL during the final evaluation (its grace ended)
        def evaluate(*a, **k):
            os.kill(os.getpid(), signal.SIGKILL)
        T.evaluate = evaluate
elif where == "final_save":  # as the last step's checkpoint is written (after the loop read its signal)
    real_save = T.Trainer.save
    def save(self):
        if self.step == n:
            kill()
        real_save(self)
    T.Trainer.save = save
else:  # once fit has returned: in close, as a complete run waits for the other processes (torchrun)
    real_shutdown = T.shutdown
    def shutdown(dist, wait):
        kill()
        return real_shutdown(dist, wait=wait)
    T.shutdown = shutdown
before = signal.getsignal(signal.SIGTERM)
real_fit = T.Trainer.fit
def fit(self, *a, **k):  # fit gives the handlers back as it returns (a notebook's Ctrl-C after fit is its own)
    out = real_fit(self, *a, **k)
    assert signal.getsignal(signal.SIGTERM) is before and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    return out
T.Trainer.fit = fit
rc = cli.main(args)
assert signal.getsignal(signal.SIGTERM) is before, "the trainer left its handler behind"
sys.exit(rc)
'''


@pytest.mark.parametrize("where", ["last_step", "final_save", "close"])
def test_a_stop_signal_once_the_last_step_is_trained_leaves_a_complete_run(dataset, tmp_path, where):
    """A scheduler's SIGTERM that comes with the last step, during its save or after fit returned has nothing left
    to stop: the run is trained, evaluated and saved, so `elas train` exits 0 (saying so), not 143 as a stopped
    run (whose --resume would find nothing to train); the handlers are the process's own again after close."""
    import elas
    out = tmp_path / "r"
    args = train_args(dataset, out, "--max-steps", "3", "--set", "eval_every=100")
    env = dict(os.environ, PYTHONPATH=str(Path(elas.__file__).parents[1]))
    p = subprocess.run([sys.executable, "-c", _SIGNAL_AT, where, "3", *args], capture_output=True, text=True,
                       env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"signal {int(signal.SIGTERM)} came" in p.stderr and "stopped by signal" not in p.stderr
    assert "elas: done at step 3" in p.stdout
    assert latest_checkpoint(out).name == "step-00000003" and verify_checkpoint(latest_checkpoint(out)) is None
    final = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if "val_loss" in ln]
    assert [r["step"] for r in final] == [3]


def test_a_signal_in_the_last_step_saves_it_before_the_final_evaluation(dataset, tmp_path):
    """A SIGTERM during the last step, then the launcher's SIGKILL during the final evaluation (minutes on a CPU):
    the last step's checkpoint was written first, so the kill costs the evaluation only, which --resume takes
    (it used to evaluate first: the kill lost every step since the previous save)."""
    import elas
    out = tmp_path / "r"
    args = train_args(dataset, out, "--max-steps", "3", "--set", "eval_every=100", "--set", "save_every=100")
    env = dict(os.environ, PYTHONPATH=str(Path(elas.__file__).parents[1]), KILL_IN_EVAL="1")
    p = subprocess.run([sys.executable, "-c", _SIGNAL_AT, "last_step", "3", *args], capture_output=True, text=True,
                       env=env, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert "saving the checkpoint of the last step (3) before the final evaluation" in p.stderr + p.stdout
    assert latest_checkpoint(out).name == "step-00000003" and verify_checkpoint(latest_checkpoint(out)) is None
    r = run_cli(*train_args(dataset, out, "--max-steps", "3", "--resume"))  # the evaluation, nothing trained
    assert r.returncode == 0, r.stderr[-2000:]
    final = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if "val_loss" in ln]
    assert [r["step"] for r in final] == [3]


def test_a_stop_signal_at_a_grid_runs_last_step_keeps_its_row_and_starts_no_other(dataset, tmp_path, monkeypatch):
    """In `elas experiment` the same signal finishes the run it came in (its summary.json written) and stops the
    grid before the next run, with 128 + the signal as a run stopped mid-way; the same call continues the grid."""
    import elas.train.trainer as trainer
    from elas.train.trainer import TrainStopped
    experiment = _small_grid(monkeypatch)
    grid = dict(batch_size=2, grad_accum=1, log=lambda *a: None)
    real_step = trainer.Trainer.train_step

    def train_step(self, step, **k):
        out = real_step(self, step, **k)
        if step == self.cfg.max_steps - 1:
            self._on_signal(signal.SIGTERM, None)  # as the handler records a SIGTERM
        return out
    with monkeypatch.context() as m:
        m.setattr(trainer.Trainer, "train_step", train_step)
        with pytest.raises(TrainStopped) as e:
            experiment.run_grid("llama-tiny", ["relu2", "swiglu"], 1, str(dataset), tmp_path, **grid)
    assert e.value.signum == signal.SIGTERM and e.value.complete  # (the CLI: the grid stopped between runs)
    assert (tmp_path / "relu2" / "summary.json").exists() and not (tmp_path / "swiglu").exists()
    rows = experiment.run_grid("llama-tiny", ["relu2", "swiglu"], 1, str(dataset), tmp_path, **grid)
    assert [r["run"] for r in rows] == ["relu2", "swiglu"]


def test_a_grid_refuses_a_kept_run_of_another_global_batch(dataset, tmp_path, monkeypatch):
    """batch_size and grad_accum are the grid's keys, but the global batch is also the process count (torchrun's
    WORLD_SIZE, in no config key): a run kept from a grid with another number of processes, finished or not, is
    refused before any run, not counted or resumed as this grid's (other tokens per step and in all)."""
    experiment = _small_grid(monkeypatch)
    grid = dict(batch_size=2, grad_accum=1, log=lambda *a: None)
    experiment.run_grid("llama-tiny", ["relu2"], 1, str(dataset), tmp_path, **grid)
    cfg = experiment.variant_config("llama-tiny", "relu2", 1, str(dataset), tmp_path, 2, 1)
    run = tmp_path / "relu2"
    for finished in (True, False):
        if not finished:
            (run / "summary.json").unlink()  # its checkpoint says it (step x global batch)
        monkeypatch.setenv("WORLD_SIZE", "1")
        experiment.check_same_runs([cfg])  # the same run
        monkeypatch.setenv("WORLD_SIZE", "2")
        with pytest.raises(ValueError, match="global batch 2 -> 4, which is batch_size x grad_accum x processes"):
            experiment.check_same_runs([cfg])
