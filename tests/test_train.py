"""The trainer end to end on CPU: kill/resume equality, DDP equivalence, checkpoints, bad input, eval/generate."""
import json
from pathlib import Path
import shutil
import signal

import pytest
import torch

from elas.cli import main
from elas.train import latest_checkpoint

from conftest import TINY, hold_run_lock, run_cli, wait_for_metrics_then_signal


def losses(run):
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def train_args(dataset, out, *extra):
    return ["train", "--preset", "llama-tiny-elas", "--data", str(dataset), "--out", str(out), "--no-progress",
            *TINY, "--set", "log_every=1", "--set", "model.act24.dense_warmup_steps=4", *extra]


def test_kill_and_resume_reproduces_losses_exactly(dataset, tmp_path):
    common = ["--max-steps", "10", "--set", "save_every=4", "--set", "eval_every=100"]
    ref = run_cli(*train_args(dataset, tmp_path / "ref", *common))
    assert ref.returncode == 0, ref.stderr
    # SIGKILL after step 6 (checkpoint at 4): the resumed run repeats 5..6 and crosses the dense->2:4 switch
    killed = run_cli(*train_args(dataset, tmp_path / "run", *common), env={"ELAS_FAULT_AT_STEP": "5"})
    assert killed.returncode == -signal.SIGKILL
    assert latest_checkpoint(tmp_path / "run").name == "step-00000004"
    resumed = run_cli(*train_args(dataset, tmp_path / "run", *common, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    a, b = losses(tmp_path / "ref"), losses(tmp_path / "run")
    assert sorted(a) == sorted(b) == list(range(1, 11))
    assert all(a[s] == b[s] for s in a), [(s, a[s], b[s]) for s in a if a[s] != b[s]]
    assert a[10] < a[1]


def test_ddp_two_processes_matches_single_process(dataset, tmp_path):
    steps = ["--max-steps", "3", "--set", "eval_every=3", "--set", "save_every=3"]
    single = run_cli(*train_args(dataset, tmp_path / "one", *steps))
    assert single.returncode == 0, single.stderr
    import subprocess
    import sys
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "elas", *train_args(dataset, tmp_path / "two", *steps, "--set", "batch_size=2")],
                         capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for s in a:  # same global batch of 4 sequences, split 2 + 2: same losses up to reduction order
        assert abs(a[s] - b[s]) < 1e-4, (s, a[s], b[s])
    assert "x2 (DDP)" in ddp.stdout


def test_evaluation_time_is_logged_and_left_out_of_tokens_per_s(dataset, tmp_path, capsys, monkeypatch):
    """An evaluation's seconds go to metrics.jsonl and the log, not into the next window's tokens/s; one that
    costs more than a quarter of the training time since the previous one gets a one-line hint (at 7B, 1M eval
    tokens run eagerly took about twice the 200 steps between evaluations)."""
    import time

    import elas.train.trainer as tr
    real = tr.evaluate

    def slow_evaluate(*a, **kw):
        time.sleep(3.0)
        return real(*a, **kw)

    monkeypatch.setattr(tr, "evaluate", slow_evaluate)
    out = tmp_path / "run"
    assert main(train_args(dataset, out, "--max-steps", "6", "--set", "eval_every=3", "--set", "save_every=6")) == 0
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in recs if "val_loss" in r]
    assert [r["step"] for r in evals] == [3, 6] and all(r["eval_s"] >= 3.0 for r in evals)
    by = {r["step"]: r for r in recs if "tokens_per_s" in r}
    # step 4's window began before the 3 s evaluation: the seconds its tokens/s implies are a step's, not 3 s more
    # (an absolute bound, with room for a step on a busy 2-core machine: 1.06 s was seen against a bound of 1 s)
    window_s = (by[4]["tokens"] - by[3]["tokens"]) / by[4]["tokens_per_s"]
    assert window_s < 2.5, (window_s, {s: r["tokens_per_s"] for s, r in by.items()})
    cap = capsys.readouterr()
    text = cap.out + cap.err
    assert "tokens, 3." in text and text.count("that evaluation took") == 1
    assert "lower eval_tokens (now 2048) or raise eval_every (now 3): `--set eval_tokens=...` in `elas train`" in text


def test_grad_accum_equals_bigger_batch(dataset, tmp_path):
    base = train_args(dataset, tmp_path / "a", "--max-steps", "3", "--set", "eval_every=3", "--set", "save_every=3")
    assert main(base) == 0
    acc = train_args(dataset, tmp_path / "b", "--max-steps", "3", "--set", "eval_every=3", "--set", "save_every=3",
                     "--set", "batch_size=2", "--set", "grad_accum=2")
    assert main(acc) == 0
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert all(abs(a[s] - b[s]) < 1e-5 for s in a)


def test_run_dir_contents_eval_generate(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(dataset, out, "--max-steps", "6", "--set", "eval_every=3", "--set", "save_every=3")) == 0
    text = capsys.readouterr().out
    assert "validation perplexity" in text and "unigram baseline" in text
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"]["methods"][0]["method"] == "act24" and cfg["max_steps"] == 6 and cfg["seq_len"] == 32
    assert cfg["model"]["methods"][0]["version"] == 2 and cfg["config_version"] == 3
    assert cfg["model"]["methods"][0]["cutlass"] is False  # act24.cutlass=auto recorded as resolved (CPU: false)
    import torch
    # attn_backend "auto" recorded likewise (torch's SDPA order without CUDA)
    assert cfg["model"]["attn_backend"] == "torch" if not torch.cuda.is_available() else \
        cfg["model"]["attn_backend"] in ("torch", "triton")
    # "auto" recorded as what it resolved to (torch without CUDA; cutlass where the library runs)
    assert cfg["model"]["relu2_kernel"] == "torch" if not torch.cuda.is_available() else \
        cfg["model"]["relu2_kernel"] in ("torch", "cutlass")
    assert cfg["model"]["norm_kernel"] == ("fused" if torch.cuda.is_available() else "torch")
    assert cfg["model"]["ce_kernel"] == ("triton" if torch.cuda.is_available() else "torch")
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "tokens", "tokens_per_s"} <= set(recs[0])
    assert [r["step"] for r in recs if "val_loss" in r] == [3, 6]
    assert recs[0]["sparse"] is False and [r for r in recs if r.get("step") == 6][0]["sparse"] is True
    assert 0 < recs[0]["y2_zero_frac/mean"] < 1
    # keep_checkpoints=2 keeps steps 3 and 6
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-00000003", "step-00000006"]
    assert main(["eval", "--run", str(out), "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    final = [r for r in recs if "val_loss" in r][-1]
    assert ev["val_loss"] == pytest.approx(final["val_loss"], rel=1e-5)
    assert main(["generate", "--run", str(out), "--max-new-tokens", "8", "--prompt", "import "]) == 0
    whole = capsys.readouterr().out
    assert whole.startswith("import ")
    # on a terminal the text comes token by token; what it adds up to is the same
    import sys
    shown = []
    real_write = sys.stdout.write
    monkey = pytest.MonkeyPatch()
    monkey.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    monkey.setattr(sys.stdout, "write", lambda t: shown.append(t) or real_write(t), raising=False)
    try:
        assert main(["generate", "--run", str(out), "--max-new-tokens", "8", "--prompt", "import "]) == 0
    finally:
        monkey.undo()
    assert capsys.readouterr().out == whole
    assert len(shown) > 3  # the prompt, then pieces as they came, then the end
    ctx = cfg["model"]["max_seq_len"]  # past the context each token re-runs the window: said before it starts
    assert main(["generate", "--run", str(out), "--max-new-tokens", str(ctx), "--prompt", "import "]) == 0
    assert f"new tokens exceed the model's context ({ctx})" in capsys.readouterr().err
    from elas.cli import _count  # the dry run's token budget, readable at every size
    assert (_count(2.5e9), _count(1234567), _count(65536), _count(999)) == ("2.50B", "1.23M", "65.54K", "999")


def test_bad_inputs_are_one_line_errors(dataset, tmp_path, capsys):
    def err(args):
        assert main(args) == 2
        e = capsys.readouterr().err.strip()
        assert e.startswith("elas: error:") and "\n" not in e, e
        return e

    out = tmp_path / "r"
    assert "does not exist" in err(train_args(tmp_path / "nodata", out, "--max-steps", "1"))
    (tmp_path / "empty").mkdir()
    assert "not a prepared dataset" in err(train_args(tmp_path / "empty", out, "--max-steps", "1"))
    assert "vocab_size is 256" in err(train_args(dataset, out, "--set", "model.vocab_size=256"))
    assert "fewer than seq_len+1" in err(train_args(dataset, out, "--set", "seq_len=100000",
                                                    "--set", "model.max_seq_len=100000"))
    assert "unknown preset" in err(["train", "--preset", "llama-60", "--data", str(dataset)])
    assert "did you mean 'lr'" in err(train_args(dataset, out, "--set", "lrr=1"))
    assert "did you mean 'model.rank'" in err(train_args(dataset, out, "--set", "model.rnak=1"))
    assert "expected an integer" in err(train_args(dataset, out, "--set", "max_steps=ten"))
    (tmp_path / "afile").write_text("x")
    assert f"{tmp_path / 'afile'} is a file, not a directory" in err(train_args(dataset, tmp_path / "afile" / "run"))
    (tmp_path / "bad.toml").write_text("lr = = 1")
    assert "not valid TOML" in err(train_args(dataset, out, "--config", str(tmp_path / "bad.toml")))

    # an existing run is never overwritten without --resume
    assert main(train_args(dataset, out, "--max-steps", "2", "--set", "save_every=2", "--set", "eval_every=2")) == 0
    capsys.readouterr()
    assert "--resume" in err(train_args(dataset, out, "--max-steps", "4"))
    # a truncated (only) checkpoint is a clear error, not a traceback, and it is moved aside, not deleted
    ck = latest_checkpoint(out)
    data = (ck / "model.safetensors").read_bytes()
    (ck / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert "holds no checkpoint that verifies" in err(train_args(dataset, out, "--max-steps", "4", "--resume"))
    assert (out / "checkpoints" / (ck.name + ".corrupt") / "model.safetensors").is_file()
    assert "has no checkpoint that verifies" in err(["eval", "--run", str(out)])
    corrupt = out / "checkpoints" / (ck.name + ".corrupt")
    assert "corrupt or truncated" in err(["eval", "--run", str(out), "--checkpoint", str(corrupt)])


def test_toml_config_and_precedence(dataset, tmp_path):
    from elas.cli import build_parser, resolve_train_config
    (tmp_path / "c.toml").write_text('preset = "llama-tiny-relu2"\nlr = 0.01\nmax_steps = 7\n[model]\nrank = 8\n')
    args = build_parser().parse_args(["train", "--config", str(tmp_path / "c.toml"), "--set", "lr=0.02",
                                      "--max-steps", "9", "--data", str(dataset)])
    cfg = resolve_train_config(args)
    assert (cfg.preset, cfg.model.ffn, cfg.model.rank, cfg.lr, cfg.max_steps) == ("llama-tiny-relu2", "relu2", 8,
                                                                                  0.02, 9)
    assert cfg.out_dir == "runs/llama-tiny-relu2"


def test_nan_guard_keeps_last_good_checkpoint(dataset, tmp_path, capsys):
    # lr 1e30: weights of ~1e30 after one update overflow fp32 in attention's q.k whatever the corpus; at 1e6 a run
    # on some corpora ends with every ReLU^2 dead and a finite, uniform loss, and nothing to guard against
    out = tmp_path / "r"
    args = train_args(dataset, out, "--max-steps", "40", "--set", "save_every=2", "--set", "eval_every=100",
                      "--set", "lr=1e30", "--set", "grad_clip=0", "--set", "warmup_steps=0")
    assert main(args) == 2
    assert "NaN/inf" in capsys.readouterr().err
    ck = latest_checkpoint(out)
    if ck is not None:
        from safetensors.torch import load_file
        assert all(torch.isfinite(t).all() for t in load_file(str(ck / "model.safetensors")).values())


def test_signal_saves_a_checkpoint(dataset, tmp_path):
    import os
    import subprocess
    import sys
    out = tmp_path / "r"
    p = subprocess.Popen([sys.executable, "-m", "elas", *train_args(dataset, out, "--max-steps", "100000",
                          "--set", "save_every=100000", "--set", "eval_every=100000")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    outtxt, errtxt = wait_for_metrics_then_signal(p, out, signal.SIGTERM)
    # not an error: 128 + SIGTERM, as a process killed by it, and the command that continues the run
    assert p.returncode == 128 + signal.SIGTERM and f"stopped by signal {int(signal.SIGTERM)}" in errtxt
    assert f"continue with `elas train --out {out} --resume`" in errtxt and "error" not in errtxt.splitlines()[-1]
    ck = latest_checkpoint(out)
    step = json.loads((ck / "trainer.json").read_text())["step"] if ck is not None else 0
    assert step > 0
    # said before the save (a launcher that kills during a long save leaves this line as the last)
    assert f"elas: signal {int(signal.SIGTERM)}: saving the checkpoint of step {step} before stopping" in outtxt
    # a CPU run uses no cuBLAS: its checkpoint records no workspace setting, so a resume checks none
    assert "cublas_workspace_config" not in json.loads((ck / "trainer.json").read_text())
    shutil.rmtree(out)
    assert os.path.exists(tmp_path)


def test_full_disk_keeps_the_last_complete_checkpoint(dataset, tmp_path, capsys, monkeypatch):
    """A failing checkpoint write (ENOSPC) stops the run with one line; `latest` still names a complete checkpoint
    and no partial directory is left behind."""
    import errno

    from elas.train import checkpoint as ck
    real = ck.save_tensors
    calls = []

    def flaky(tensors):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors)

    monkeypatch.setattr(ck, "save_tensors", flaky)
    out = tmp_path / "r"
    assert main(train_args(dataset, out, "--max-steps", "6", "--set", "save_every=2", "--set", "eval_every=100")) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "step-00000002" in err
    assert latest_checkpoint(out).name == "step-00000002"
    assert not list((out / "checkpoints").glob("*.tmp"))
    monkeypatch.setattr(ck, "save_tensors", real)
    assert main(train_args(dataset, out, "--max-steps", "6", "--set", "save_every=2", "--set", "eval_every=100",
                           "--resume")) == 0
    assert latest_checkpoint(out).name == "step-00000006"


def test_full_disk_at_a_metrics_line_saves_the_steps_and_is_one_line(dataset, tmp_path, capsys, monkeypatch):
    """A full disk hit by a metrics.jsonl line (a few hundred bytes: often the first write to fail) or by the run's
    files at a resume's start is one line naming the file, not a traceback; the steps since the last checkpoint
    are saved first where the checkpoint still fits, and a resume continues from them."""
    import builtins
    import errno

    import elas.train.trainer as trainer
    real_open, appends = builtins.open, []

    def full_at_step_5(path, mode="r", *a, **k):
        if str(path).endswith("metrics.jsonl") and "a" in mode:
            appends.append(path)
            if len(appends) == 5:  # the loss line of step 5 (log_every=1, no evaluation before it)
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *a, **k)
    monkeypatch.setattr(trainer, "open", full_at_step_5, raising=False)
    out = tmp_path / "r"
    common = ["--max-steps", "8", "--set", "save_every=4", "--set", "eval_every=100"]
    assert main(train_args(dataset, out, *common)) == 2
    cap = capsys.readouterr()
    (line,) = [ln for ln in cap.err.splitlines() if ln.strip()]
    assert line.startswith("elas: error: could not write") and "metrics.jsonl" in line
    assert "No space left on device" in line and "--resume" in line
    assert "the checkpoint of step 5 was written first" in cap.out
    assert latest_checkpoint(out).name == "step-00000005"
    monkeypatch.undo()
    # a full disk when a resume rewrites the run's files (config.json, metrics.jsonl) at its start: one line too
    monkeypatch.setattr(trainer, "write_atomic", lambda *a: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left on device")))
    assert main(train_args(dataset, out, *common, "--resume")) == 2
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert line.startswith("elas: error: could not write") and "No space left on device" in line
    monkeypatch.undo()
    assert main(train_args(dataset, out, *common, "--resume")) == 0
    assert sorted(losses(out)) == [1, 2, 3, 4, 6, 7, 8]  # (step 5's line was the one the disk refused)


def test_tensorboard_logs_what_metrics_jsonl_logs(dataset, tmp_path):
    """tensorboard=true writes the same numbers as metrics.jsonl (train loss per log step, validation loss,
    sparsity statistics) into RUN/tensorboard."""
    pytest.importorskip("tensorboard")  # in the test extra; elas[tensorboard] for users
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "run"
    assert main(train_args(dataset, out, "--max-steps", "4", "--set", "eval_every=4", "--set", "save_every=4",
                           "--set", "tensorboard=true")) == 0
    ev = EventAccumulator(str(out / "tensorboard"))
    ev.Reload()
    tags = ev.Tags()["scalars"]
    assert {"train/loss", "train/lr", "train/tokens_per_s", "val/val_loss", "train/y2_zero_frac/mean"} <= set(tags)
    assert any(t.startswith("stats/") for t in tags)
    want = losses(out)
    got = {e.step: e.value for e in ev.Scalars("train/loss")}
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    assert all(abs(got[s] - want[s]) < 1e-6 * max(1.0, abs(want[s])) for s in want)
    val = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if "val_loss" in ln]
    assert [(e.step, round(e.value, 5)) for e in ev.Scalars("val/val_loss")] == \
        [(r["step"], round(r["val_loss"], 5)) for r in val]


def _torchrun(n, *args, env=None):
    import os
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                           "-m", "elas", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def test_fsdp_matches_single_process_and_resumes_on_another_process_count(dataset, tmp_path, capsys):
    """FSDP2 on 2 gloo processes logs the single process's losses (same global batch of 4). Its checkpoints are
    sharded (torch.distributed.checkpoint, one shard file per process) and resume on 1, 2 and 4 processes,
    continuing those losses; `elas checkpoint consolidate` writes the whole weights, which eval reads."""
    from safetensors.torch import load_file

    from elas.train.checkpoint import verify_checkpoint
    steps = ["--max-steps", "4", "--set", "eval_every=100", "--set", "save_every=2", "--set", "keep_checkpoints=3",
             "--set", "parallel=fsdp"]  # also on one process: built on meta, initialised by name, DCP checkpoints
    single = run_cli(*train_args(dataset, tmp_path / "one", *steps))
    assert single.returncode == 0, single.stderr
    fsdp = _torchrun(2, *train_args(dataset, tmp_path / "fsdp", *steps, "--set", "batch_size=2"))
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    assert "x2 (FSDP)" in fsdp.stdout
    a, b = losses(tmp_path / "one"), losses(tmp_path / "fsdp")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for s in a:  # the same sequences, reduced in another order
        assert abs(a[s] - b[s]) < 1e-4, (s, a[s], b[s])
    ck = tmp_path / "fsdp" / "checkpoints" / "step-00000002"
    assert (ck / "dcp" / ".metadata").is_file() and len(list((ck / "dcp").glob("*.distcp"))) == 2
    assert not (ck / "model.safetensors").exists() and verify_checkpoint(ck) is None
    for procs in (1, 2, 4):
        run = tmp_path / f"resume{procs}"
        shutil.copytree(tmp_path / "fsdp", run)
        shutil.rmtree(run / "checkpoints" / "step-00000004")  # back to the checkpoint of step 2
        (run / "checkpoints" / "latest").unlink()
        args = train_args(dataset, run, *steps, "--resume", "--set", f"batch_size={4 // procs}")
        r = run_cli(*args) if procs == 1 else _torchrun(procs, *args)
        assert r.returncode == 0, r.stderr[-3000:]
        c = losses(run)
        assert sorted(c) == [1, 2, 3, 4] and c[1] == b[1] and c[2] == b[2]
        for s in (3, 4):  # step 4 also checks the optimizer state came back (moments steer update 3)
            assert abs(c[s] - a[s]) < 1e-4, (procs, s, c[s], a[s])
    # consolidate: one file of whole weights, listed by the manifest; eval reads it
    assert main(["checkpoint", "consolidate", str(tmp_path / "fsdp")]) == 0
    final = tmp_path / "fsdp" / "checkpoints" / "step-00000004"
    weights = load_file(str(final / "model.safetensors"))
    assert "lm_head.weight" in weights and weights["embed.weight"].shape == (512, 64)
    assert verify_checkpoint(final) is None
    assert main(["eval", "--run", str(tmp_path / "fsdp"), "--tokens", "2048", "--json"]) == 0
    ddp = tmp_path / "ddp"
    assert main(train_args(dataset, ddp, "--max-steps", "2", "--set", "eval_every=100", "--set", "save_every=2")) == 0
    capsys.readouterr()
    assert main(["checkpoint", "consolidate", str(ddp)]) == 2  # a one-file checkpoint: nothing to do
    assert "not a sharded checkpoint" in capsys.readouterr().err
    # a damaged shard is caught by the manifest: the resume skips that checkpoint
    shard = next((ck / "dcp").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-8])
    assert "does not match" in verify_checkpoint(ck) or "bytes" in verify_checkpoint(ck)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_four_processes_match_single_process(dataset, tmp_path, parallel):
    """DDP and FSDP2 on 4 gloo processes, one sequence each, log the losses of one process with the same global
    batch of 4, across the dense -> 2:4 switch (step 4 here) and with LORO's exact step (every 2 steps)."""
    steps = ["--max-steps", "5", "--set", "eval_every=100", "--set", "save_every=5", "--set", "model.rank=16",
             "--optimizer", "loro_adamw", "--set", "loro_exact_every=2", "--set", "loro_rewarm_steps=1",
             "--set", f"parallel={parallel}"]
    single = run_cli(*train_args(dataset, tmp_path / "one", *steps))
    assert single.returncode == 0, single.stderr
    four = _torchrun(4, *train_args(dataset, tmp_path / "four", *steps, "--set", "batch_size=1"))
    assert four.returncode == 0, four.stderr[-3000:]
    assert f"x4 ({parallel.upper()})" in four.stdout
    a, b = losses(tmp_path / "one"), losses(tmp_path / "four")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    for s in a:  # the same sequences, reduced in another order
        assert abs(a[s] - b[s]) < 1e-4, (s, a[s], b[s])


def test_a_resume_on_another_process_count_that_changes_the_global_batch_says_so(dataset, tmp_path):
    """A DDP run resumed on another number of processes with the same batch_size has another global batch: the
    data of a step is a function of the step and the global batch, so the resumed run re-reads (or skips) samples
    and is another run. No config key changed (the process count is not one): the trainer says it, from the
    checkpoint's data position, with the batch that continues the run exactly."""
    steps = ["--set", "eval_every=100", "--set", "save_every=2", "--set", "batch_size=2"]
    two = _torchrun(2, *train_args(dataset, tmp_path / "run", "--max-steps", "2", *steps))
    assert two.returncode == 0, two.stderr[-3000:]
    one = run_cli(*train_args(dataset, tmp_path / "run", "--max-steps", "4", *steps, "--resume"))
    assert one.returncode == 0, one.stderr
    out = one.stdout + one.stderr
    assert "warning: the global batch is 2 sequences (batch_size x grad_accum x processes), checkpoint " \
           "step-00000002's was 4" in out, out
    again = run_cli(*train_args(dataset, tmp_path / "run", "--max-steps", "6", *steps, "--resume"))
    assert again.returncode == 0 and "global batch is" not in again.stdout + again.stderr  # (its own batch now)


def test_fsdp_with_the_deferred_residual_matches_the_plain_single_process(dataset, tmp_path):
    """model.defer_residual: blocks take and return (x, pending FFN output); FSDP2's per-block hooks take the pair
    and its losses are the plain single process's (the same adds in the same order)."""
    steps = ["--max-steps", "2", "--set", "eval_every=100", "--set", "save_every=100", "--set", "parallel=fsdp"]
    single = run_cli(*train_args(dataset, tmp_path / "one", *steps))
    assert single.returncode == 0, single.stderr
    fsdp = _torchrun(2, *train_args(dataset, tmp_path / "fsdp", *steps, "--set", "batch_size=2",
                                    "--set", "model.defer_residual=true"))
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    assert "x2 (FSDP)" in fsdp.stdout
    assert json.loads((tmp_path / "fsdp" / "config.json").read_text())["model"]["defer_residual"] is True
    a, b = losses(tmp_path / "one"), losses(tmp_path / "fsdp")
    assert sorted(a) == sorted(b) == [1, 2]
    for s in a:
        assert abs(a[s] - b[s]) < 1e-4, (s, a[s], b[s])


def test_fsdp_with_loro_matches_single_process(dataset, tmp_path):
    """LORO-AdamW on FSDP2 shards: the lazy steps act on each shard, the exact step (every 2 steps here) gathers
    whole factors, splits the pairs over the processes and writes each process's shard back; the losses equal
    one process's, and a sharded checkpoint resumes on one process."""
    steps = ["--max-steps", "5", "--set", "eval_every=100", "--set", "save_every=3", "--set", "model.rank=16",
             "--optimizer", "loro_adamw", "--set", "loro_exact_every=2", "--set", "loro_rewarm_steps=1",
             "--set", "parallel=fsdp"]
    single = run_cli(*train_args(dataset, tmp_path / "one", *steps))
    assert single.returncode == 0, single.stderr
    fsdp = _torchrun(2, *train_args(dataset, tmp_path / "fsdp", *steps, "--set", "batch_size=2"))
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "fsdp")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    for s in a:  # exact steps after steps 2 and 4
        assert abs(a[s] - b[s]) < 1e-4, (s, a[s], b[s])
    run = tmp_path / "resume"
    shutil.copytree(tmp_path / "fsdp", run)
    shutil.rmtree(run / "checkpoints" / "step-00000005")
    (run / "checkpoints" / "latest").unlink()
    r = run_cli(*train_args(dataset, run, *steps, "--resume", "--set", "batch_size=4"))
    assert r.returncode == 0, r.stderr[-3000:]
    c = losses(run)
    for s in (4, 5):  # the exact step after step 4 runs on the resumed state
        assert abs(c[s] - a[s]) < 1e-4, (s, c[s], a[s])


def test_kill_of_one_rank_resumes_exactly(dataset, tmp_path):
    """kill -9 of one of two FSDP2 processes (after its checkpoint of step 2, before the one of step 4): torchrun
    stops the job; the newest checkpoint verifies, and a resumed run logs the uninterrupted run's losses bit for
    bit (the same two processes: the same reduction order)."""
    steps = ["--max-steps", "5", "--set", "eval_every=100", "--set", "save_every=2", "--set", "batch_size=2",
             "--set", "parallel=fsdp"]
    ref = _torchrun(2, *train_args(dataset, tmp_path / "ref", *steps))
    assert ref.returncode == 0, ref.stderr[-3000:]
    killed = _torchrun(2, *train_args(dataset, tmp_path / "run", *steps),
                       env={"ELAS_FAULT_AT_STEP": "2", "ELAS_FAULT_RANK": "1"})
    assert killed.returncode != 0
    assert "Signals.SIGKILL" in killed.stderr or "SIGKILL" in killed.stderr, killed.stderr[-3000:]
    assert latest_checkpoint(tmp_path / "run").name == "step-00000002"
    resumed = _torchrun(2, *train_args(dataset, tmp_path / "run", *steps, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = losses(tmp_path / "ref"), losses(tmp_path / "run")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    assert all(a[s] == b[s] for s in a), [(s, a[s], b[s]) for s in a if a[s] != b[s]]


def test_background_checkpoint_holds_the_state_of_its_step(dataset, tmp_path, monkeypatch):
    """async_save (the default): a checkpoint is copied to host memory at its step and written by a thread while
    training goes on (here each file write is slowed by 0.25 s, so steps run during it); what lands on disk is bit for
    bit what a synchronous save of that step writes, and the last checkpoint is complete when the run returns."""
    import time

    from safetensors.torch import load_file

    from elas.train import checkpoint as ck
    real = ck._write_hashed

    overlapped = []

    def slow(path, write):  # also notes whether training logged steps while this write was held back
        run = Path(path).parents[2].name
        metrics = Path(path).parents[2] / "metrics.jsonl"
        before = len(metrics.read_text().splitlines())
        # the background run's write waits until a step is logged (up to 2 s: a loaded machine's steps can take
        # longer than any fixed sleep); the synchronous run's waits 0.25 s, in which no step may be logged
        deadline, grew = time.monotonic() + (2.0 if run == "bg" else 0.25), False
        while time.monotonic() < deadline and not (grew and run == "bg"):
            time.sleep(0.02)
            grew = grew or len(metrics.read_text().splitlines()) > before
        overlapped.append((run, grew))
        return real(path, write)

    monkeypatch.setattr(ck, "_write_hashed", slow)
    steps = ["--max-steps", "6", "--set", "save_every=2", "--set", "eval_every=100", "--set", "keep_checkpoints=3"]
    assert main(train_args(dataset, tmp_path / "bg", *steps)) == 0
    assert main(train_args(dataset, tmp_path / "sync", *steps, "--set", "async_save=false")) == 0
    for step in (2, 4, 6):
        a, b = (tmp_path / run / "checkpoints" / f"step-{step:08d}" for run in ("bg", "sync"))
        assert ck.verify_checkpoint(a) is None
        wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
        oa, ob = (torch.load(p / "optimizer.pt", weights_only=False)["optimizer"]["state"] for p in (a, b))
        assert oa.keys() == ob.keys()
        for i in oa:
            assert all(torch.equal(oa[i][k], ob[i][k]) if torch.is_tensor(oa[i][k]) else oa[i][k] == ob[i][k]
                       for k in oa[i])
    assert latest_checkpoint(tmp_path / "bg").name == "step-00000006"
    assert any(o for run, o in overlapped if run == "bg") and not any(o for run, o in overlapped if run == "sync")


def test_short_disk_removes_older_checkpoints_first_and_fails_early(dataset, tmp_path, monkeypatch, capsys):
    """Where the disk cannot hold another checkpoint beside the kept ones, the older ones go first (never the
    newest complete one), so the run goes on; where even removing them would not make room, nothing is removed
    and the save fails before writing, in one line."""
    from collections import namedtuple

    from elas.train import checkpoint as ck
    usage = namedtuple("usage", "total used free")
    capacity = {}

    def fake_usage(path):  # a disk of `capacity` bytes holding only this run's checkpoints
        used = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
        return usage(capacity["bytes"], used, max(capacity["bytes"] - used, 0))

    steps = ["--max-steps", "6", "--set", "save_every=2", "--set", "eval_every=100", "--set", "keep_checkpoints=3"]
    assert main(train_args(dataset, tmp_path / "probe", "--max-steps", "2", "--set", "eval_every=100")) == 0
    size = ck._dir_bytes(tmp_path / "probe" / "checkpoints" / "step-00000002")
    monkeypatch.setattr(ck.shutil, "disk_usage", fake_usage)
    capacity["bytes"] = int(2.6 * size)  # two checkpoints and most of a third
    out = tmp_path / "run"
    assert main(train_args(dataset, out, *steps)) == 0
    assert [p.name for p in ck.checkpoints(out)] == ["step-00000006", "step-00000004"]  # step 2 made room
    capacity["bytes"] = int(2.2 * size)  # two checkpoints, not three
    assert main(train_args(dataset, out, "--max-steps", "8", "--set", "save_every=2", "--set", "eval_every=100",
                           "--resume")) == 0  # step 4 removed first, step 6 kept while step 8 was written
    assert [p.name for p in ck.checkpoints(out)] == ["step-00000008", "step-00000006"]
    capacity["bytes"] = int(1.5 * size)  # the newest complete checkpoint (step 8) is never removed for room
    capsys.readouterr()
    assert main(train_args(dataset, out, "--max-steps", "10", "--set", "save_every=2", "--set", "eval_every=100",
                           "--resume")) == 2
    err = capsys.readouterr().err
    assert "not enough free space" in err and "newest complete checkpoint is step-00000008" in err
    assert [p.name for p in ck.checkpoints(out)] == ["step-00000008", "step-00000006"]  # nothing removed in vain
    assert latest_checkpoint(out).name == "step-00000008" and not list((out / "checkpoints").glob("*.tmp"))


def test_run_time_adds_up_over_resumes(dataset, tmp_path):
    """A run cut off and resumed reports the wall time of all its processes (what the quality grid's GPU-time line
    sums): the checkpoint carries the time so far, the resumed trainer starts from it."""
    from elas.cli import main
    from elas.config import apply_overrides, train_config
    from elas.train import Trainer
    run = tmp_path / "run"
    assert main(["train", "--preset", "llama-tiny-relu2", "--out", str(run), "--data", str(dataset), "--no-progress",
                 *TINY, "--max-steps", "2", "--set", "eval_every=100"]) == 0
    saved = [json.loads(p.read_text())["elapsed_s"] for p in sorted(run.glob("**/trainer.json"))]
    assert saved and saved[-1] > 0
    cfg = train_config("llama-tiny-relu2")
    apply_overrides(cfg, {**dict(kv.split("=", 1) for kv in TINY[1::2]), "data_dir": str(dataset),
                          "out_dir": str(run), "max_steps": 4, "eval_every": 100})
    tr = Trainer(cfg, resume=True, progress=False, log=lambda *a: None)
    try:
        assert tr.step == 2 and tr.elapsed_before == saved[-1]
        tr.fit()
        assert tr.elapsed_s() > saved[-1]
    finally:
        tr.close()
    newest = max(run.glob("**/trainer.json"), key=lambda p: json.loads(p.read_text())["step"])
    assert json.loads(newest.read_text())["elapsed_s"] > saved[-1]


def test_a_dense_warm_up_that_covers_the_run_is_said(dataset, tmp_path):
    """act24 with dense_warmup_steps >= max_steps trains dense throughout: allowed (a smoke test), but the
    start-up says so, where the method's line alone would promise sparsity "after N dense steps"; an lr warm-up
    as long as the run likewise (the peak lr is never reached)."""
    r = run_cli(*train_args(dataset, tmp_path / "run", "--max-steps", "3", "--set", "eval_every=100"))
    assert r.returncode == 0, r.stderr
    assert ("act24 stays dense for the whole run: its dense warm-up (dense_warmup_steps=4) is not shorter than "
            "max_steps=3") in r.stdout + r.stderr
    assert "the learning rate never reaches" not in r.stdout + r.stderr  # warmup_steps=2 < 3
    r = run_cli(*train_args(dataset, tmp_path / "run2", "--max-steps", "3", "--set", "eval_every=100", "--set",
                            "warmup_steps=4"))  # the learning rate's warm-up likewise
    assert r.returncode == 0 and "its linear warm-up (warmup_steps=4) is longer than max_steps=3" in r.stdout


def test_a_failed_background_checkpoint_stops_the_run_within_a_step(dataset, tmp_path, monkeypatch, capsys):
    """async_save: a write that fails (here the first checkpoint's, at step 4) stops the run at the first step
    after the write ended, in one line, not at the next save (step 8)."""
    from elas.train import checkpoint as ck
    real = ck._write_hashed

    def failing(path, write):
        if "step-00000004" in str(path):
            raise OSError(28, "No space left on device")
        return real(path, write)

    monkeypatch.setattr(ck, "_write_hashed", failing)
    rc = main(train_args(dataset, tmp_path / "run", "--max-steps", "40", "--set", "save_every=4",
                         "--set", "eval_every=100"))
    err = capsys.readouterr().err
    assert rc == 2 and "No space left on device" in err, err
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) < 8, steps  # stopped before the next save (step 8) would have reported it


def test_a_run_keeps_its_tokenizer_when_its_dataset_moves(dataset, tmp_path, capsys):
    """The run directory holds a copy of its dataset's tokenizer.json: after the dataset is moved away, generate
    decodes with it and export writes it beside the weights (it wrote none, silently)."""
    import shutil
    data, out = tmp_path / "data", tmp_path / "run"
    shutil.copytree(dataset, data)
    assert main(train_args(data, out, "--max-steps", "2", "--set", "eval_every=100")) == 0
    assert (out / "tokenizer.json").read_bytes() == (data / "tokenizer.json").read_bytes()
    shutil.move(data, tmp_path / "moved")
    capsys.readouterr()
    assert main(["generate", "--run", str(out), "--max-new-tokens", "4", "--prompt", "import "]) == 0
    assert capsys.readouterr().out.startswith("import ")
    pytest.importorskip("transformers")
    assert main(["export", "--run", str(out), "--to", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == (out / "tokenizer.json").read_bytes()


# a torchrun worker that appends per-rank arguments: ELAS_RANK<r>_ARGS="--set lr=0.01" (tests of processes
# started with different commands)
_PER_RANK = """import os, shlex, sys
from elas.cli import main
sys.exit(main(sys.argv[1:] + shlex.split(os.environ.get("ELAS_RANK%s_ARGS" % os.environ["RANK"], ""))))
"""


def _torchrun_per_rank(tmp_path, args, env=None, timeout=300, popen=False):
    import os
    import subprocess
    import sys
    worker = tmp_path / "per_rank.py"
    worker.write_text(_PER_RANK)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker), *args]
    e = dict(os.environ, **(env or {}))
    if popen:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=e)


def test_processes_started_differently_stop_with_one_line(dataset, tmp_path):
    """Two processes of one run given different settings (here the learning rate and the depth) or run
    directories that are not one directory: every process stops before training, rank 0 says why in one line
    naming the keys (or the ranks), and nothing hangs in a collective or trains wrongly."""
    steps = ["--max-steps", "3", "--set", "eval_every=3", "--set", "save_every=3", "--set", "batch_size=2"]
    r = _torchrun_per_rank(tmp_path, train_args(dataset, tmp_path / "a", *steps),
                  env={"ELAS_RANK1_ARGS": "--set lr=0.01 --set model.n_layers=3"})
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("elas: error:")]
    assert r.returncode != 0 and len(err) == 1, r.stderr[-2000:]
    assert "the processes were started with different settings (" in err[0]
    assert "lr: rank 0 0.003, rank 1 0.01" in err[0] and "model.n_layers: rank 0 2, rank 1 3" in err[0], err[0]
    assert not (tmp_path / "a").exists()  # stopped before the run directory was made
    # each node its own --out (a run directory that is not shared): refused before any checkpoint is written
    r = _torchrun_per_rank(tmp_path, train_args(dataset, tmp_path / "b0", *steps),
                           env={"ELAS_RANK1_ARGS": "--out " + str(tmp_path / "b1")})
    assert r.returncode != 0 and "the processes were started with different settings (out_dir: " in r.stderr


def test_a_stop_signal_under_torchrun_saves_every_process_at_one_step(dataset, tmp_path):
    """SIGTERM to torchrun (a scheduler's preemption) reaches every process: they agree on the step to stop at,
    save one checkpoint there together and leave with 128 + SIGTERM; --resume then continues the run."""
    out = tmp_path / "r"
    args = train_args(dataset, out, "--max-steps", "100000", "--set", "save_every=100000", "--set",
                      "eval_every=100000", "--set", "batch_size=2")
    p = _torchrun_per_rank(tmp_path, args, popen=True)
    _, err = wait_for_metrics_then_signal(p, out, signal.SIGTERM)
    assert p.returncode != 0 and err.count("stopped by signal 15 at step") == 1, err[-3000:]
    ck = latest_checkpoint(out)
    # (torchrun's own agent reports the signal with a traceback of its own; no process of the run fails)
    assert ck is not None and "/elas/" not in err and "gloo" not in err, err[-3000:]
    step = json.loads((ck / "trainer.json").read_text())["step"]
    assert f"stopped by signal 15 at step {step};" in err and step > 0
    # (not `elas train --resume` alone, which would continue in one process, with half the global batch)
    assert "continue with the same torchrun command with `--resume` (2 processes; on another number keep " \
        "batch_size x grad_accum x processes = 4, the global batch" in err, err[-3000:]
    r = _torchrun_per_rank(tmp_path, [*train_args(dataset, out, "--set", "batch_size=2"), "--resume",
                                      "--max-steps", str(step + 2)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(losses(out))[-1] == step + 2


def test_a_locked_run_directory_stops_every_process_with_one_line(dataset, tmp_path):
    """A torchrun job resumed into a run directory another process trains in: rank 0 finds the lock, and every
    process stops there (one error line, no collective left waiting for rank 0)."""
    out = tmp_path / "run"
    args = train_args(dataset, out, "--max-steps", "2", "--set", "batch_size=2", "--set", "eval_every=100")
    assert run_cli(*args).returncode == 0
    holder = hold_run_lock(out)
    try:
        r = _torchrun_per_rank(tmp_path, [*args, "--resume", "--max-steps", "4"])
    finally:
        holder.kill()
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("elas: error:")]
    assert r.returncode != 0 and len(err) == 1 and f"is in use by another elas process (pid {holder.pid})" in err[0]
    assert "gloo" not in r.stderr, r.stderr[-2000:]


def test_pick_device_names_the_gpu_index(monkeypatch):
    """'cuda' and 'auto' become cuda:<current> (torch.cuda.set_device refuses a device without an index); an index
    past the machine's GPUs is a one-line error naming the valid ones."""
    from elas.train.trainer import TrainError, pick_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("auto") == torch.device("cuda", 1)
    assert pick_device("cuda") == torch.device("cuda", 1)
    assert pick_device("cuda:0") == torch.device("cuda", 0)
    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(TrainError, match=r"cuda:2.*2 GPU\(s\): cuda:0 to cuda:1"):
        pick_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")
    with pytest.raises(TrainError, match="CUDA is not available"):
        pick_device("cuda")


def test_log_lines_reach_a_pipe_as_they_come(dataset, tmp_path):
    """A run's log lines are flushed one by one: through a pipe (a log file, `| tee`) its start-up lines are
    there while the run still trains, not held back in a buffer until the process ends."""
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    proc = subprocess.Popen([sys.executable, "-m", "elas", *train_args(dataset, tmp_path / "run", "--max-steps",
                                                                       "100000", "--set", "eval_every=100000")],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        import select
        ready, _, _ = select.select([proc.stdout], [], [], 120)  # (held back, it would come only at the exit)
        assert ready, "no log line within 120 s of the start"
        line = proc.stdout.readline()
        assert line.startswith("elas: llama-tiny-elas"), line
        assert proc.poll() is None  # still training: the line came while the run went on
    finally:
        proc.kill()
        proc.wait()


def test_every_process_runs_as_many_evaluation_forwards(monkeypatch):
    """Under FSDP each forward is a collective (and DDP broadcasts buffers): processes given unequal numbers of
    validation windows must still run the same number of forwards, or the one with more waits forever. A process
    out of windows runs one that it does not count; the totals over processes are one process's."""
    from contextlib import nullcontext

    import elas.train.trainer as tr
    from elas.train.distributed import Dist

    class Windows:
        seq_len = 4

        def __init__(self, n):
            self.n = n

        def get(self, idx):
            x = torch.as_tensor(idx, dtype=torch.long)[:, None].repeat(1, 4)
            return x, x

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def forward(self, x, y):
            self.calls += 1
            return x.double().mean()  # a loss that depends on which windows were given

    monkeypatch.setattr(tr, "all_reduce_sum", lambda t, d: t)  # (each process's own total, summed below)
    for n, world, batch in ((7, 3, 2), (1, 2, 4), (9, 4, 1), (8, 2, 4)):
        totals, calls = [], []
        for rank in range(world):
            m = Model()
            loss, tokens = tr.evaluate(m, Windows(n), n * 4, batch, "cpu", nullcontext, Dist(rank, world))
            totals.append((loss * tokens if tokens else 0.0, tokens))  # (0/0: a process that counted nothing)
            calls.append(m.calls)
        assert len(set(calls)) == 1, (n, world, calls)
        one = Model()
        want_loss, want_tokens = tr.evaluate(one, Windows(n), n * 4, batch, "cpu", nullcontext)
        assert sum(t for _, t in totals) == want_tokens == n * 4
        assert sum(s for s, _ in totals) == pytest.approx(want_loss * want_tokens)


def test_an_error_every_process_finds_is_said_once(dataset, tmp_path):
    """Errors that every process of a run finds alike (a --resume with no checkpoint; a loss that became NaN, whose
    check is all-reduced) and the start-up warnings are said by one process, not once per process."""
    empty = tmp_path / "empty"
    empty.mkdir()
    r = _torchrun_per_rank(tmp_path, [*train_args(dataset, empty, "--max-steps", "2", "--set", "batch_size=2"),
                                      "--resume"])
    lines = (r.stdout + r.stderr).splitlines()
    err = [ln for ln in lines if ln.startswith("elas: error:")]
    assert r.returncode != 0 and len(err) == 1 and "holds no checkpoint that verifies" in err[0], r.stderr[-3000:]
    assert sum("stays dense for the whole run" in ln for ln in lines) == 1, lines
    r = _torchrun_per_rank(tmp_path, train_args(dataset, tmp_path / "nan", "--max-steps", "3", "--set",
                                                "batch_size=2", "--set", "model.init_std=1e20"))
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("elas: error:")]
    assert r.returncode != 0 and len(err) == 1 and "loss became NaN/inf" in err[0], r.stderr[-3000:]


_FULL_DISK_ON_RANK0 = """import errno, os, sys
if os.environ["RANK"] == "0":  # the disk fills while rank 0 writes the checkpoint of step 4
    import elas.train.checkpoint as ck
    real = ck._write_hashed
    def full(path, write):
        if "step-00000004" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, write)
    ck._write_hashed = full
from elas.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("async_save,steps", [("true", "8"), ("false", "8"), ("true", "4"), ("false", "4")])
def test_a_checkpoint_rank0_cannot_write_stops_every_process_with_one_line(dataset, tmp_path, async_save, steps):
    """Under DDP rank 0 writes the checkpoints. One it cannot write (a full disk), in the background or not, stops
    every process with rank 0's one line: the others learn it from the step's vote (or the save's agreement)
    rather than from a collective their peer left, which was a traceback from the transport. Also where it is
    the run's last checkpoint (steps=4), whose failure comes after the loop's last vote."""
    import os
    import subprocess
    import sys
    worker = tmp_path / "full_disk.py"
    worker.write_text(_FULL_DISK_ON_RANK0)
    args = train_args(dataset, tmp_path / "r", "--max-steps", steps, "--set", "batch_size=2", "--set",
                      "save_every=2", "--set", "eval_every=100", "--set", f"async_save={async_save}")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(worker), *args], capture_output=True, text=True, timeout=300, env=dict(os.environ))
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("elas: error:")]
    assert r.returncode != 0 and len(err) == 1, r.stderr[-3000:]
    assert "could not write the checkpoint of step 4" in err[0] and "step-00000002" in err[0], err
    assert "Connection closed" not in r.stderr and "[rank1]" not in r.stderr, r.stderr[-3000:]


_METRICS_FULL_ON_RANK0 = """import builtins, errno, os, sys
if os.environ["RANK"] == "0":  # the disk fills at the 6th metrics line rank 0 writes
    import elas.train.trainer as tr
    lines = []
    def fake_open(path, mode="r", *a, **k):
        if str(path).endswith("metrics.jsonl") and "a" in mode:
            lines.append(path)
            if len(lines) >= 6:
                raise OSError(errno.ENOSPC, "No space left on device")
        return builtins.open(path, mode, *a, **k)
    tr.open = fake_open
from elas.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_metrics_line_rank0_cannot_write_saves_the_steps_and_stops_every_process(dataset, tmp_path):
    """Under DDP rank 0 writes metrics.jsonl. A line it cannot write (a full disk) reaches every process through the
    next step's vote: they save the steps since the last checkpoint together, where it still fits, and stop with
    rank 0's one line naming that checkpoint, not with a transport error on the others and the steps lost."""
    import os
    import subprocess
    import sys
    worker = tmp_path / "metrics_full.py"
    worker.write_text(_METRICS_FULL_ON_RANK0)
    out = tmp_path / "r"
    args = train_args(dataset, out, "--max-steps", "30", "--set", "batch_size=2", "--set", "save_every=1000",
                      "--set", "eval_every=1000", "--set", "log_every=1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(worker), *args], capture_output=True, text=True, timeout=300, env=dict(os.environ))
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("elas: error:")]
    ck = latest_checkpoint(out)
    assert r.returncode != 0 and len(err) == 1 and ck is not None, r.stderr[-3000:]
    assert "could not write" in err[0] and f"the newest complete checkpoint is {ck.name}" in err[0], err
    assert "Connection closed" not in r.stderr and "[rank1]" not in r.stderr, r.stderr[-3000:]
    step = json.loads((ck / "trainer.json").read_text())["step"]
    assert 6 <= step < 30
    # the checkpoint holds as many updates as its step says (it held one more: a resume took that update twice)
    state = torch.load(ck / "optimizer.pt", weights_only=False)["optimizer"]["state"]
    assert {int(st["step"]) for st in state.values()} == {step}


def test_the_grid_under_torchrun_summarises_once(dataset, tmp_path):
    """`elas experiment` on 2 processes: rank 0 alone writes the summary and its plots and prints them (every
    process used to, each file written by two writers at once)."""
    r = _torchrun(2, "experiment", "--size", "llama-tiny", "--variants", "relu2", "--steps", "2", "--batch-size",
                  "2", "--grad-accum", "1", "--data", str(dataset), "--out", str(tmp_path / "grid"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("| relu2 |") == 1 and (tmp_path / "grid" / "summary.md").is_file()
    # the row counts every process's tokens (2 processes x batch 2 x 256 a step), as metrics.jsonl does
    row = json.loads((tmp_path / "grid" / "relu2" / "summary.json").read_text())
    metrics = [json.loads(ln) for ln in (tmp_path / "grid" / "relu2" / "metrics.jsonl").read_text().splitlines()]
    assert row["tokens"] == max(m.get("tokens", 0) for m in metrics) == 2 * 2 * 2 * 256


_EVAL_FAILS_ON_RANK1 = """import os, sys
if os.environ["RANK"] == "1":  # rank 1's first evaluation fails (an out-of-memory, say); rank 0's runs to its end
    import elas.data.loader as ld
    real = ld.TokenWindows.__init__
    def init(self, data_dir, split, seq_len):
        real(self, data_dir, split, seq_len)
        if split == "val":
            def fail(idx):
                raise RuntimeError("CUDA out of memory (injected on rank 1)")
            self.get = fail
    ld.TokenWindows.__init__ = init
from elas.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_an_evaluation_failing_on_one_process_saves_and_stops_every_process(dataset, tmp_path):
    """Under DDP an evaluation that fails on one process (rank 1 here) reaches the others through the evaluation's
    own all-reduce: every process saves the steps since the last checkpoint together and stops; the failing process
    says why, the others stay quiet, and none is left in a collective (a transport traceback before)."""
    import os
    import subprocess
    import sys
    worker = tmp_path / "eval_fails.py"
    worker.write_text(_EVAL_FAILS_ON_RANK1)
    run = tmp_path / "r"
    args = train_args(dataset, run, "--max-steps", "6", "--set", "batch_size=2", "--set", "save_every=100",
                      "--set", "eval_every=3")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(worker), *args], capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert r.returncode != 0, r.stderr[-3000:]
    assert "CUDA out of memory (injected on rank 1)" in r.stderr, r.stderr[-3000:]
    assert "Connection closed" not in r.stderr and "elas: error:" not in r.stderr, r.stderr[-3000:]
    assert "the evaluation at step 3 failed; the checkpoint of step 3 was written first" in r.stderr + r.stdout
    assert (run / "checkpoints" / "step-00000003").is_dir()


def _torchrun_bounded(worker, args, env=None, timeout=120):
    """torchrun of 2 processes running `worker` ((path, a script's text)), stopped where it runs past `timeout`:
    then None (a hang), which the caller fails on. SIGTERM to torchrun: its agent stops the workers, which run in
    sessions of their own (a kill of torchrun alone would leave them hanging, the pipes open)."""
    import os
    import subprocess
    import sys
    path = Path(worker[0])
    path.write_text(worker[1])
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(path), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, **(env or {})))
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        proc.communicate(timeout=120)
        return None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_processes_given_other_relu2_kernels_stop_with_one_line(dataset, tmp_path):
    """model.relu2_kernel=auto is agreed by the processes in a collective (cutlass only where every one can run it).
    That collective came before the start-ups were compared, so a process started with relu2_kernel=torch (which
    skips it) beside one with the default left both waiting in different collectives forever. It is one line now,
    as any other key that differs."""
    steps = ["--max-steps", "2", "--set", "eval_every=2", "--set", "save_every=2", "--set", "batch_size=2"]
    r = _torchrun_bounded((tmp_path / "per_rank.py", _PER_RANK), train_args(dataset, tmp_path / "a", *steps),
                          env={"ELAS_RANK1_ARGS": "--set model.relu2_kernel=torch"})
    assert r is not None, "the processes hung at start-up"
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("elas: error:")]
    assert r.returncode != 0 and len(err) == 1, r.stderr[-2000:]
    assert "model.relu2_kernel: rank 0 'auto', rank 1 'torch'" in err[0], err[0]
    # the same command on both: auto is resolved together and recorded (torch on a CPU)
    r = _torchrun_bounded((tmp_path / "per_rank.py", _PER_RANK), train_args(dataset, tmp_path / "b", *steps))
    assert r is not None and r.returncode == 0, None if r is None else r.stderr[-2000:]
    assert json.loads((tmp_path / "b" / "config.json").read_text())["model"]["relu2_kernel"] == "torch"


_METRICS_FULL_AT_LINE = """import builtins, errno, os, sys
if os.environ["RANK"] == "0":  # the disk fills at rank 0's metrics line number FULL_AT
    import elas.train.trainer as tr
    lines = []
    def fake_open(path, mode="r", *a, **k):
        if str(path).endswith("metrics.jsonl") and "a" in mode:
            lines.append(path)
            if len(lines) >= int(os.environ["FULL_AT"]):
                raise OSError(errno.ENOSPC, "No space left on device")
        return builtins.open(path, mode, *a, **k)
    tr.open = fake_open
from elas.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("line", [3, 4, 5])
def test_a_metrics_line_rank0_cannot_write_at_the_runs_end_stops_every_process(dataset, tmp_path, line):
    """Under DDP rank 0's failed write reaches the others through a step's vote, read one step later. A line of
    the last two steps (3, 4: the loss of step 3 and 4 of 4) or the final evaluation's (5) had no vote left to
    read: the run ended as finished (exit 0, "run saved") with its log missing those lines. Every process now
    stops with rank 0's one line, the last checkpoint written."""
    out = tmp_path / "r"
    args = train_args(dataset, out, "--max-steps", "4", "--set", "batch_size=2", "--set", "save_every=1000",
                      "--set", "eval_every=1000", "--set", "log_every=1")
    r = _torchrun_bounded((tmp_path / "metrics_full.py", _METRICS_FULL_AT_LINE), args, env={"FULL_AT": str(line)})
    assert r is not None, "the processes hung"
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("elas: error:")]
    assert r.returncode != 0 and len(err) == 1, (r.returncode, r.stdout[-1000:], r.stderr[-3000:])
    assert "could not write" in err[0] and "the newest complete checkpoint is step-00000004" in err[0], err
    assert "Connection closed" not in r.stderr and "[rank1]" not in r.stderr, r.stderr[-3000:]
    assert "run saved" not in r.stdout


# each process on a "node" of its own: a relative --out is then a directory on that node's own disk
_ON_ITS_NODE = """import os, sys
os.chdir(os.environ["NODE_DIR" + os.environ["RANK"]])
from elas.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_resume_into_a_run_directory_one_process_cannot_see_stops_with_one_line(dataset, tmp_path):
    """--resume claims the run directory (lock, shared-directory token) only where it exists, and each process
    asked its own disk: a run continued on two nodes with a node-local --out (node 0 holds the run, node 1
    nothing) had rank 0 in the claim's broadcast and rank 1 in the barrier after it, both waiting forever.
    The processes decide together now, and the claim says the directory is not shared."""
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for n in nodes:
        n.mkdir()
    # (kernel keys as the run records them, so that rank 1's fresh config is rank 0's resumed one but for the run
    # directory; the data's path is absolute)
    args = train_args(dataset, "r", "--set", "model.relu2_kernel=torch", "--set", "model.act24.cutlass=false",
                      "--set", "eval_every=100", "--set", "save_every=2")
    assert run_cli(*args, "--max-steps", "2", cwd=nodes[0]).returncode == 0
    r = _torchrun_bounded((tmp_path / "on_node.py", _ON_ITS_NODE), [*args, "--max-steps", "4", "--set", "batch_size=2",
                                                                    "--resume"],
                          env={"NODE_DIR0": str(nodes[0]), "NODE_DIR1": str(nodes[1])})
    assert r is not None, "the processes hung"
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("elas: error:")]
    assert r.returncode != 0 and len(err) == 1, r.stderr[-3000:]
    assert "r is not one directory shared by every process (rank(s) 1" in err[0], err[0]
    assert "Connection closed" not in r.stderr, r.stderr[-3000:]


def test_start_up_warnings_are_said_by_rank_0_only(monkeypatch):
    """The start-up warnings (here: an lr warm-up as long as the run) come once per run, from rank 0, not once per
    process of a torchrun launch (RANK is read before the process group exists, so no data is needed)."""
    from elas.config import apply_overrides, train_config
    from elas.train.trainer import TrainError, Trainer
    for rank, says in (("0", True), ("1", False)):
        monkeypatch.setenv("RANK", rank)
        cfg = train_config("llama-tiny")
        apply_overrides(cfg, {"data_dir": "/nonexistent/elas-data", "max_steps": 3, "warmup_steps": 4})
        said = []
        with pytest.raises(TrainError, match="does not exist"):  # (the warnings come before any data is read)
            Trainer(cfg, progress=False, log=said.append)
        assert any("the learning rate never reaches" in s for s in said) == says, (rank, said)


def test_a_warm_up_as_long_as_the_run_reaches_the_peak_lr_and_is_not_warned():
    """warmup_cosine's warm-up gives step s the multiplier (s + 1) / warmup_steps: with warmup_steps = max_steps the
    last step trains at the peak lr, so the start-up does not say it is never reached; one step more does."""
    from elas.config import apply_overrides, train_config
    from elas.optim import warmup_cosine
    from elas.train.trainer import TrainError, Trainer
    assert warmup_cosine(2, 3, 3, 0.1) == 1.0  # the last of 3 steps, warm-up 3: the peak
    for warmup, says in ((3, False), (4, True)):
        cfg = train_config("llama-tiny")
        apply_overrides(cfg, {"data_dir": "/nonexistent/elas-data", "max_steps": 3, "warmup_steps": warmup})
        said = []
        with pytest.raises(TrainError, match="does not exist"):
            Trainer(cfg, progress=False, log=said.append)
        assert any("the learning rate never reaches" in x for x in said) == says, (warmup, said)


def _stop_after_last_step_worker(rank, world, port, data, out, signalled, results):
    import os
    import signal as sig
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from elas.config import apply_overrides, train_config
    from elas.train.trainer import Trainer
    cfg = train_config("llama-tiny")
    apply_overrides(cfg, {"data_dir": data, "out_dir": out, "max_steps": 1, "eval_every": 100, "batch_size": 2,
                          "model.n_layers": 1, "model.d_model": 64, "model.n_heads": 2, "model.intermediate": 96,
                          "seq_len": 32, "eval_tokens": 1024, "warmup_steps": 0, "device": "cpu"})
    tr = Trainer(cfg, progress=False, log=lambda *a: None)
    tr.fit()
    if rank in signalled:  # a stop signal that reached this process only, after its last step
        tr._on_signal(sig.SIGTERM, None)
    tr.close()
    Path(results, str(rank)).write_text(str(tr.stop_signal))


@pytest.mark.parametrize("signalled", [(1,), ()])
def test_a_stop_signal_one_process_got_after_the_last_step_stops_every_process(dataset, tmp_path, signalled):
    """Under torchrun a stop signal that reached one process only once the run was complete (the grid asks
    stop_signal before its next run): every process agrees on it in close(), so all stop, or none does;
    otherwise one rank went on to the next run alone and waited there forever."""
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = tmp_path / "results"
    results.mkdir()
    mp.spawn(_stop_after_last_step_worker, args=(2, port, str(dataset), str(tmp_path / "run"), signalled,
                                                 str(results)), nprocs=2, join=True)
    want = str(int(signal.SIGTERM)) if signalled else "None"
    assert [(results / str(r)).read_text() for r in range(2)] == [want, want]


def test_a_stop_signal_that_comes_during_close_s_vote_is_not_dropped(monkeypatch):
    """A signal that reaches a process while it waits in close()'s vote (the collective has its contribution: no
    signal) is not in the vote's result; it must not be lost either: it reaches the caller's handler (its default
    action), as one after the vote does."""
    import signal as sig

    import elas.train.trainer as T
    from elas.train.distributed import Dist
    tr = T.Trainer.__new__(T.Trainer)
    tr.tb, tr.dist, tr.device, tr.run_dir = None, Dist(rank=1, world=2), torch.device("cpu"), Path(".")
    tr._finished, tr._stop_signal, tr._old_handlers = True, None, {}

    def vote(d, signum, device):  # the others voted no signal; this one got SIGTERM while it waited
        tr._on_signal(sig.SIGTERM, None)
        return signum
    monkeypatch.setattr(T, "agree_stop", vote)
    monkeypatch.setattr(T, "shutdown", lambda d, wait=False: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    got = []
    old = sig.signal(sig.SIGTERM, lambda s, f: got.append(s))
    try:
        tr.close()
    finally:
        sig.signal(sig.SIGTERM, old)
    assert got == [sig.SIGTERM] and tr.stop_signal is None


def test_a_global_batch_larger_than_the_training_split_is_said(tmp_path):
    """More sequences a step than the training split holds: every step reads some twice (the stream runs on into
    the next epoch's order), so the run says so at its start."""
    from elas.data.prepare import prepare
    d = tmp_path / "small"
    prepare(d, source="builtin", vocab_size=512, max_mb=0.05, val_frac=0.05, log=lambda *a: None)
    n = json.loads((d / "meta.json").read_text())["train_tokens"] // 32  # windows of seq_len 32 (TINY)
    args = train_args(d, tmp_path / "run", "--max-steps", "1", "--set", "eval_every=100", "--set", "eval_tokens=256")
    r = run_cli(*args, "--set", f"batch_size={n + 8}")
    assert r.returncode == 0, r.stderr
    assert f"the global batch ({n + 8} sequences) is larger than the training split ({n} sequences of 32 tokens)" \
        in r.stdout + r.stderr, r.stdout + r.stderr
    r = run_cli(*train_args(d, tmp_path / "run2", "--max-steps", "1", "--set", "eval_every=100",
                            "--set", "eval_tokens=256"))
    assert r.returncode == 0 and "larger than the training split" not in r.stdout + r.stderr, r.stderr


def test_ctrl_c_while_elas_starts_is_one_line():
    """SIGINT while elas still imports torch (its first second or two) ends it with one line and status 130, as
    a Ctrl-C later does (cli.main), not with a traceback from inside torch's imports."""
    import signal
    import subprocess
    import sys
    import time
    p = subprocess.Popen([sys.executable, "-m", "elas", "model", "--preset", "llama-60m"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and err == "elas: interrupted\n", (p.returncode, err[-500:])


def test_dry_run_prints_the_methods_as_the_run_records_them(capsys):
    """--dry-run's method lines are what config.json would record: every field parsed ("yes" is true) and given,
    with the method's version."""
    assert main(["train", "--preset", "llama-tiny-elas", "--set", "model.act24.permute_tokens=yes", "--dry-run"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("method ")]
    m = json.loads(lines[0][len("method "):])
    assert len(lines) == 1 and m["permute_tokens"] is True and m["version"] == 2 and m["grad_mode"] == "ste"
