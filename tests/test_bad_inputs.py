"""Every bad input is one line on stderr naming the value, exit code 2, no traceback, in well under 3 s, before
any data preparation or model build, and leaves no run directory behind (the CLI in process, on CPU)."""
import json
import shutil
import time

import numpy as np
import pytest

from elas.cli import main

from conftest import TINY

# (extra train arguments, a substring the one-line error must contain)
TRAIN_CASES = [
    (["--set", "model.act24.backend=cuda2"], "expected one of auto, reference, cuda"),
    (["--set", "model.act24.backend=cuda"], "or 'reference'"),  # a message ending in a quote keeps it
    (["--set", "lr=none"], "'none' for lr"),
    (["--set", "lr=inf"], "lr=inf (> 0 and finite)"),
    (["--set", "batch_size=none"], "'none' for batch_size"),
    # (a floor of 8 x 10^12 bytes (2 x 64 x 32 x 10^9 x 2), more than any machine this runs on: the OS would kill
    # the run without a word)
    (["--set", "batch_size=1000000000"], "batch_size=1000000000 x seq_len=32 cannot fit: one micro-batch's "
                                         "activations need at least"),
    (["--set", "lr=abc"], "'abc' for lr"),
    (["--set", "lr=0"], "lr=0"),
    (["--set", "max_steps=2.5"], "'2.5' for max_steps"),
    (["--set", "model.rank=2.5"], "'2.5' for model.rank"),
    (["--set", "seq_len=0"], "seq_len=0"),
    (["--set", "seq_len=100000"], "seq_len=100000"),
    (["--set", "batch_size=0"], "batch_size=0"),
    (["--set", "grad_accum=-2"], "grad_accum=-2"),
    (["--set", "log_every=0"], "log_every=0"),
    (["--set", "keep_checkpoints=0"], "keep_checkpoints=0"),
    (["--set", "eval_tokens=-5"], "eval_tokens=-5"),
    (["--set", "warmup_steps=-1"], "warmup_steps=-1"),
    (["--set", "min_lr_ratio=2"], "min_lr_ratio=2"),
    (["--set", "beta1=1.5"], "1.5"),
    (["--set", "grad_clip=-1"], "grad_clip=-1"),
    (["--set", "weight_decay=-0.1"], "weight_decay=-0.1"),
    (["--set", "weight_decay=inf"], "weight_decay=inf: expected a finite number"),
    (["--optimizer", "loro_adamw", "--set", "loro_exact_every=5"],
     "loro_exact_every=5 must exceed loro_rewarm_steps=5"),
    (["--set", "precision=fp16"], "precision='fp16'"),
    (["--set", "optimizer=sgd"], "optimizer='sgd'"),
    (["--set", "compile=maybe"], "'maybe' for compile"),
    (["--set", "cuda_graphs=2"], "'2' for cuda_graphs"),
    (["--set", "nope=1"], "'nope'"),
    (["--set", "model.rnak=4"], "did you mean 'model.rank'"),
    (["--set", "model.attn_backend=fa3"], "model.attn_backend='fa3'"),
    (["--set", "act24.dense_warmup_steps=4"], "did you mean 'model.act24.dense_warmup_steps'"),
    (["--set", "model=4"], "'model' is a section"),
    (["--set", "lr"], "key=value"),
    (["--set", "model.ffn=gelu"], "model.ffn='gelu'"),
    (["--set", "model.n_heads=3"], "model.n_heads=3"),
    (["--set", "model.vocab_size=0"], "model.vocab_size=0"),
    (["--set", "model.d_model=-64"], "model.d_model=-64"),
    (["--set", "model.lowrank_scope=some"], "model.lowrank_scope='some'"),
    (["--set", "model.methods=x"], "model.methods='x'"),
    (["--d-ff", "-4"], "model.d_ff=-4"),
    (["--d-ff", "0"], "model.d_ff=0"),
    (["--d-ff", "66"], "multiple of 4"),
    (["--rank", "1000"], "model.rank=1000"),
    (["--rank", "-1"], "model.rank=-1"),
    (["--set", "model.grad_mode=mask"], "model.act24.grad_mode"),
    (["--set", "model.act_sparsity=2:4"], "act24"),
    (["--set", "model.dense_warmup_steps=3"], "model.act24.dense_warmup_steps"),
    (["--set", "model.act24.grad_mode=sign"], "act24.grad_mode 'sign'"),
    (["--set", "model.act24.grad=x"], "act24.grad "),
    (["--set", "model.act24.dense_warmup_steps=-1"], "act24.dense_warmup_steps -1"),
    (["--set", "model.act24.dense_warmup_steps=2.5"], "'2.5' for model.act24.dense_warmup_steps"),
    (["--set", "model.act24.wgrad_dense_frac=2"], "act24.wgrad_dense_frac 2"),
    (["--set", "model.act24.permute_tokens=maybe"], "act24.permute_tokens='maybe'"),
    (["--set", "model.act24.backend=tpu"], "act24.backend 'tpu'"),
    (["--set", "model.act24.backend=cuda"], "kernel backend 'cuda'"),
    (["--set", "model.act24.path=fast"], "act24.path 'fast'"),
    (["--set", "model.act24.x.y=1"], "model.act24.x.y"),
    (["--preset", "llama-tiny", "--set", "model.act24.grad_mode=mask"], "does not apply"),
    (["--preset", "llama-tiny", "--grad-mode", "mask"], "--act-sparsity 2:4"),
    (["--preset", "llama-tiny", "--act-sparsity", "2:4", "--ffn", "swiglu"], "needs ffn='relu2'"),
    (["--preset", "llama-61m"], "unknown preset 'llama-61m'"),
    (["--device", "tpu"], "device='tpu'"),
    (["--set", "model.residual_dtype=fp16"], "model.residual_dtype='fp16'"),
    (["--set", "model.lm_loss=fused"], "model.lm_loss='fused'"),
    (["--set", "parallel=tp"], "parallel='tp'"),
    (["--set", "model.vnm.m=8"], "does not apply"),
    (["--device", "cuda:x"], "device='cuda:x'"),
    (["--device", "cuda"], "CUDA is not available"),
    (["--resume"], "holds no checkpoint"),
    (["--set", "seed=-1"], "seed=-1"),
    (["--set", "grad_clip=nan"], "grad_clip=nan"),
    (["--set", "weight_decay=nan"], "weight_decay=nan"),
    (["--set", "model.norm_eps=0"], "model.norm_eps=0.0"),
    (["--set", "model.rope_theta=-5"], "model.rope_theta=-5.0"),
    (["--set", "model.init_std=nan"], "model.init_std=nan"),
    (["--preset", "llama-tiny-relu2", "--optimizer", "loro_adamw"], "loro_adamw needs a low-rank model"),
]


def _fail(args, capsys, want):
    t0 = time.time()
    assert main(args) == 2, args
    err = capsys.readouterr().err.strip()
    assert time.time() - t0 < 3.0, (args, time.time() - t0)
    assert err.startswith("elas: error:") and "\n" not in err and "Traceback" not in err, (args, err)
    assert want in err, (args, err)
    return err


@pytest.mark.parametrize("extra,want", TRAIN_CASES, ids=[" ".join(a) for a, _ in TRAIN_CASES])
def test_bad_train_input(dataset, tmp_path, capsys, extra, want):
    import torch
    if ("CUDA is not available" in want or "backend=cuda" in " ".join(extra)) and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "run"
    args = ["train", "--preset", "llama-tiny-elas", "--data", str(dataset), "--out", str(out), "--no-progress",
            *TINY, "--max-steps", "2"]
    if extra[0] == "--preset":  # the preset given last wins
        args[2] = extra[1]
        extra = extra[2:]
    _fail(args + extra, capsys, want)
    assert not out.exists()


def test_an_out_that_is_a_file_is_named_as_one(dataset, tmp_path, capsys):
    """--out naming a file: train and plot say that it is a file (as data prepare and export do), not "File
    exists", and the file is left as it was."""
    f = tmp_path / "afile"
    f.write_text("x")
    _fail(["train", "--preset", "llama-tiny-elas", "--data", str(dataset), "--out", str(f), "--no-progress", *TINY,
           "--max-steps", "2"], capsys, f"--out {f}: {f} is a file, not a directory")
    _fail(["train", "--preset", "llama-tiny-elas", "--data", str(dataset), "--out", str(f / "sub"), "--no-progress",
           *TINY, "--max-steps", "2"], capsys, f"--out {f / 'sub'}: {f} is a file, not a directory")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    _fail(["plot", str(run), "--out", str(f / "x.png")], capsys, f"--out {f / 'x.png'}: {f} is a file, not a directory")
    assert f.read_text() == "x"


def _broken(dataset, tmp_path, how):
    d = tmp_path / "data"
    shutil.copytree(dataset, d)
    meta = json.loads((d / "meta.json").read_text())
    if how == "empty meta":
        (d / "meta.json").write_text("{}")
    elif how == "corrupt meta":
        (d / "meta.json").write_text("{not json")
    elif how == "odd train.bin":
        with open(d / "train.bin", "ab") as fh:
            fh.write(b"\x01")
    elif how == "empty train.bin":
        (d / "train.bin").write_bytes(b"")
    elif how == "no val.bin":
        (d / "val.bin").unlink()
    elif how == "token out of range":  # an id past the vocabulary; a dataset from before max_token_id was kept
        tokens = np.memmap(d / "train.bin", dtype=np.dtype(meta["dtype"]), mode="r+")
        tokens[7] = meta["vocab_size"] + 3
        tokens.flush()
        del tokens
        meta.pop("max_token_id", None)
        (d / "meta.json").write_text(json.dumps(meta))
    elif how == "unknown dtype":
        meta["dtype"] = "int3"
        (d / "meta.json").write_text(json.dumps(meta))
    return d


DATA_CASES = [("empty meta", "lacks vocab_size"), ("corrupt meta", "corrupt"), ("odd train.bin", "train.bin has"),
              ("empty train.bin", "has 0 bytes"), ("no val.bin", "missing val.bin"),
              ("token out of range", "holds token id 515"), ("unknown dtype", "'int3'")]


@pytest.mark.parametrize("how,want", DATA_CASES, ids=[h for h, _ in DATA_CASES])
def test_bad_dataset(dataset, tmp_path, capsys, how, want):
    d = _broken(dataset, tmp_path, how)
    out = tmp_path / "run"
    _fail(["train", "--preset", "llama-tiny-elas", "--data", str(d), "--out", str(out), "--no-progress", *TINY,
           "--max-steps", "2"], capsys, want)
    assert not out.exists()


def test_bad_config_files(dataset, tmp_path, capsys):
    base = ["train", "--data", str(dataset), "--out", str(tmp_path / "run"), "--no-progress", *TINY]
    _fail(base + ["--config", str(tmp_path)], capsys, "cannot be read")
    _fail(base + ["--config", str(tmp_path / "missing.toml")], capsys, "does not exist")
    (tmp_path / "bad.toml").write_text("max_steps = [")
    _fail(base + ["--config", str(tmp_path / "bad.toml")], capsys, "not valid TOML")
    (tmp_path / "float.toml").write_text("max_steps = 2.5\n")
    _fail(base + ["--config", str(tmp_path / "float.toml")], capsys, "2.5 for max_steps")
    (tmp_path / "key.toml").write_text("[model]\nrnak = 4\n")
    _fail(base + ["--config", str(tmp_path / "key.toml")], capsys, "model.rnak")
    assert not (tmp_path / "run").exists()


def test_bad_eval_and_generate_arguments(tmp_path, capsys):
    _fail(["eval", "--run", str(tmp_path / "nope")], capsys, "not a run directory")
    _fail(["export", "--run", str(tmp_path / "nope"), "--to", str(tmp_path / "hf")], capsys, "not a run directory")
    _fail(["eval", "--run", str(tmp_path), "--tokens", "-1"], capsys, "--tokens -1")
    # benchmark arguments are checked before the GPU is looked for
    _fail(["bench", "step", "--modes", "fast"], capsys, "--modes value 'fast'")
    _fail(["bench", "step", "--variants", "elas,dense"], capsys, "--variants value 'dense'")
    _fail(["bench", "step", "--batches", "0"], capsys, "--batches '0'")
    _fail(["bench", "step", "--batch-scale", "2"], capsys, "--batch-scale 2 applies to bench ffn, compile, not step")
    _fail(["bench", "gemm", "--batch-scale", "0.5"], capsys, "not gemm")
    _fail(["bench", "report", "--batch-scale", "2"], capsys, "not report")
    _fail(["bench", "compile", "--batch-scale", "0.02"], capsys, "leaves bench compile's batch of 32 no sequence")
    _fail(["bench", "ffn", "--batch-scale", "0.001"], capsys, "leaves bench ffn's batch of 64 no sequence")
    _fail(["bench", "infer", "--sizes", "llama-61m"], capsys, "--sizes value 'llama-61m'")
    _fail(["bench", "ffn", "--sizes", "llama-7b"], capsys, "--sizes value 'llama-7b'")
    _fail(["bench", "compile", "--sizes", "llama-60m,llama-1b"], capsys, "--sizes 'llama-60m,llama-1b'")
    _fail(["bench", "compile", "--variants", "elas,dense"], capsys, "--variants value 'dense'")
    _fail(["bench", "loro", "--solvers", "qr"], capsys, "--solvers value 'qr'")
    _fail(["bench", "loro", "--grad-rank", "0"], capsys, "--grad-rank 0")
    _fail(["bench", "gemm", "--m", "-5"], capsys, "--m -5")
    _fail(["bench", "ffn", "--batch-scale", "0"], capsys, "--batch-scale 0")
    _fail(["eval", "--run", str(tmp_path), "--device", "tpu"], capsys, "--device 'tpu'")
    _fail(["generate", "--run", str(tmp_path), "--device", "tpu"], capsys, "--device 'tpu'")
    _fail(["generate", "--run", str(tmp_path), "--temperature", "nan"], capsys, "--temperature nan")
    (tmp_path / "afile").write_text("")
    _fail(["export", "--run", str(tmp_path), "--to", str(tmp_path / "afile")], capsys, "is not a directory")
    _fail(["export", "--run", str(tmp_path), "--to", str(tmp_path / "hf"), "--force"], capsys,
          "inside the run directory")  # (--force there would overwrite the run's own config.json)
    _fail(["generate", "--run", str(tmp_path), "--temperature", "-1"], capsys, "--temperature -1")
    _fail(["generate", "--run", str(tmp_path), "--max-new-tokens", "-3"], capsys, "--max-new-tokens -3")
    _fail(["generate", "--run", str(tmp_path), "--top-k", "-2"], capsys, "--top-k -2")
    _fail(["generate", "--run", str(tmp_path), "--temperature", "1e-40"], capsys, "--temperature 1e-40 is invalid")
    _fail(["generate", "--run", str(tmp_path), "--temperature", "inf"], capsys, "--temperature inf is invalid")
    _fail(["generate", "--run", str(tmp_path), "--seed", str(2 ** 70)], capsys, "in [-2^63, 2^64)")
    _fail(["model", "--preset", "llama-tiny", "--rank", "1000"], capsys, "model.rank=1000")
    _fail(["model", "--preset", "llama-tiny", "--seq-len", "-5"], capsys, "--seq-len -5 is invalid")
    _fail(["model", "--preset", "llama-60m", "--seq-len", "100000"], capsys, "exceeds the model's max_seq_len 1024")
    _fail(["model", "--preset", "llama-60m", "--grad-mode", "mask"], capsys, "--act-sparsity 2:4")
    # --list with a flag that describes one model (silently ignored before), and an empty preset (was llama-60m)
    _fail(["model", "--list", "--preset", "llama-1b"], capsys, "--list lists the presets and takes no --preset")
    _fail(["model", "--preset", ""], capsys, "invalid --preset ''")
    assert main(["model", "--list", "--json"]) == 0
    names = json.loads(capsys.readouterr().out)
    assert "llama-60m" in names and "llama-1b-elas" in names
    # the quality grid's arguments, before any data is prepared
    grid = ["experiment", "--size", "llama-tiny", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "q")]
    _fail([*grid, "--seeds", "0,x"], capsys, "--seeds '0,x'")
    _fail([*grid, "--variants", "elas+act24.nope=1"], capsys, "variant 'elas+act24.nope=1'")
    _fail([*grid, "--variants", "dense"], capsys, "unknown variant 'dense'")
    _fail([*grid, "--variants", "relu2,elas,relu2"], capsys, "--variants names relu2 more than once")
    _fail([*grid, "--steps", "0"], capsys, "invalid --steps 0: expected a positive integer")
    _fail([*grid, "--batch-size", "-4"], capsys, "invalid --batch-size -4")
    _fail([*grid, "--grad-accum", "0"], capsys, "invalid --grad-accum 0")
    _fail([*grid, "--plan", "--steps", "0"], capsys, "invalid --steps 0")  # (a division by zero before)
    _fail([*grid, "--plan", "--summarize-only"], capsys, "--plan and --summarize-only exclude each other")
    _fail([*grid, "--variants", ","], capsys, "--variants ',' has an empty name")
    _fail(["experiment", "--size", "llama-tiny-elas", "--out", str(tmp_path / "q")], capsys,
          "unknown --size 'llama-tiny-elas' (did you mean 'llama-tiny'?)")
    assert not (tmp_path / "data").exists() and not (tmp_path / "q").exists()


def test_bad_grid_data_and_transfer_sets(dataset, tmp_path, capsys, monkeypatch):
    """The quality grid's data and transfer set, checked before the built-in corpus is prepared and before any
    run: a transfer set that is no dataset, one whose validation split is missing, training data that is missing
    while a transfer set is given, and a grid to summarize that does not exist."""
    monkeypatch.chdir(tmp_path)
    grid = ["experiment", "--size", "llama-tiny", "--steps", "2", "--batch-size", "2", "--grad-accum", "1",
            "--variants", "relu2", "--out", "q"]
    _fail([*grid, "--data", "data/builtin-8k", "--transfer-data", "nothere"], capsys, "transfer data nothere holds")
    assert not (tmp_path / "data").exists()
    _fail([*grid, "--data", str(dataset), "--transfer-data", str(_broken(dataset, tmp_path, "no val.bin"))], capsys,
          "missing val.bin")
    _fail([*grid, "--data", "nodata", "--transfer-data", str(dataset)], capsys, "nodata does not exist")
    assert not (tmp_path / "q").exists()
    _fail(["experiment", "--summarize-only", "--out", "q"], capsys, "--out q holds no grid")
    (tmp_path / "q").mkdir()
    _fail(["experiment", "--summarize-only", "--out", "q"], capsys, "--out q holds no finished run")
    assert not any((tmp_path / "q").iterdir())  # no empty table or plot written


def test_bad_data_prepare_arguments(tmp_path, capsys):
    """Caps and the tokenizer are checked before any text is read (the built-in corpus: ~30 s to read)."""
    src = tmp_path / "src"
    src.mkdir()
    for k in range(40):
        (src / f"{k}.txt").write_text(f"def f{k}(x):\n    return x + {k}\n" * 20)
    files = ["--source", "files", "--files", str(src), "--vocab-size", "300", "--val-frac", "0.3"]
    _fail(["data", "prepare", "--out", str(tmp_path / "d"), *files, "--max-tokens", "0"], capsys, "max_tokens=0")
    _fail(["data", "prepare", "--out", str(tmp_path / "d"), *files, "--max-tokens", "-1"], capsys, "max_tokens=-1")
    _fail(["data", "prepare", "--out", str(tmp_path / "d"), *files, "--max-mb", "-1"], capsys, "max_mb=-1")
    _fail(["data", "prepare", "--out", str(tmp_path / "d"), "--vocab-size", "0"], capsys, "vocab_size=0")
    _fail(["data", "prepare", "--out", str(tmp_path / "d"), *files, "--max-mb", "nan"], capsys, "--max-mb nan")
    _fail(["data", "prepare", "--out", str(tmp_path / "d"), *files, "--max-mb", "inf"], capsys, "--max-mb inf")
    _fail(["data", "prepare", "--out", str(tmp_path / "d"), "--tokenizer", str(tmp_path)], capsys,
          "holds no tokenizer.json")
    # another source's options would be ignored and the built-in corpus tokenized in their place
    _fail(["data", "prepare", "--out", str(tmp_path / "d"), "--files", str(src)], capsys,
          "--files is for --source files, not --source builtin")
    _fail(["data", "prepare", "--out", str(tmp_path / "d"), "--source", "stdlib", "--hf", "allenai/c4"], capsys,
          "--hf/--hf-config are for --source hf, not --source stdlib")
    assert not (tmp_path / "d").exists()


def test_eval_refuses_data_of_another_tokenizer(dataset, tmp_path, capsys):
    """Another dataset's perplexity means something only under the run's tokenizer (two `elas data prepare
    --tokenizer bpe` of the same vocab size train two different ones)."""
    from elas.data import prepare
    out = tmp_path / "run"
    assert main(["train", "--preset", "llama-tiny-elas", "--data", str(dataset), "--out", str(out), "--no-progress",
                 *TINY, "--max-steps", "1", "--set", "eval_every=100"]) == 0
    quiet = dict(source="site-packages", max_mb=0.3, val_frac=0.2, log=lambda *a: None)
    prepare(tmp_path / "other", vocab_size=512, **quiet)
    prepare(tmp_path / "same", tokenizer=str(dataset), **quiet)
    capsys.readouterr()
    _fail(["eval", "--run", str(out), "--data", str(tmp_path / "other")], capsys, "another tokenizer")
    assert main(["eval", "--run", str(out), "--data", str(tmp_path / "same"), "--tokens", "512"]) == 0
    # --checkpoint: a directory, or the name of one of the run's checkpoints (from any working directory)
    name = next((out / "checkpoints").glob("step-*")).name
    assert main(["eval", "--run", str(out), "--checkpoint", name, "--tokens", "512"]) == 0
    _fail(["eval", "--run", str(out), "--checkpoint", "step-00000099"], capsys,
          f"--checkpoint step-00000099: no such directory, nor a checkpoint of {out} ({name})")


def test_resume_refuses_flags_that_contradict_the_run(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", "--preset", "llama-tiny-elas", "--data", str(dataset), "--out", str(out), "--no-progress",
            *TINY, "--set", "eval_every=100"]
    assert main(base + ["--max-steps", "2"]) == 0
    capsys.readouterr()
    _fail(base + ["--max-steps", "4", "--resume", "--rank", "8"], capsys, "model.rank: 32 -> 8")
    _fail(base + ["--max-steps", "4", "--resume", "--set", "model.act24.grad_mode=mask"], capsys, "contradict")
    args = list(base)
    args[2] = "llama-tiny"
    _fail(args + ["--max-steps", "4", "--resume"], capsys, "--preset llama-tiny contradicts")
    assert main(base + ["--max-steps", "4", "--resume"]) == 0  # the same flags: it continues
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["data_dir"] == str(dataset.resolve())  # absolute: eval/generate work from anywhere


def test_a_closed_pipe_is_not_a_traceback():
    import subprocess
    import sys
    r = subprocess.run(f"{sys.executable} -m elas model --list | head -1", shell=True, capture_output=True, text=True,
                       timeout=120)
    assert r.stdout.strip() == "llama-tiny" and "Traceback" not in r.stderr and "Broken pipe" not in r.stderr


def test_grid_on_a_builtin_corpus_of_another_vocabulary_fails_before_preparing_it(tmp_path, capsys, monkeypatch):
    """`elas experiment --size llama-tiny` with the default --data (the 32k-token built-in corpus, ~2 min to
    prepare) names the 8k one, before anything is prepared (it failed after the preparation, naming a --set flag
    that experiment does not have)."""
    monkeypatch.chdir(tmp_path)
    _fail(["experiment", "--size", "llama-tiny", "--steps", "10", "--out", str(tmp_path / "g")], capsys,
          "--size llama-tiny has vocab_size 8192, but --data data/builtin would be prepared with a 32000-token "
          "vocabulary: use --data data/builtin-8k")
    assert not (tmp_path / "data").exists()


def test_train_on_a_builtin_corpus_of_another_vocabulary_fails_before_preparing_it(tmp_path, capsys, monkeypatch):
    """As the grid: a model whose vocabulary is smaller than the built-in corpus's would fail on its data only after
    the corpus is prepared (minutes)."""
    monkeypatch.chdir(tmp_path)
    _fail(["train", "--preset", "llama-tiny-elas", "--data", "data/builtin", "--dry-run"], capsys,
          "model.vocab_size=8192 is smaller than the 32000-token vocabulary data/builtin would be prepared with: use "
          "--data data/builtin-8k")
    _fail(["train", "--preset", "llama-tiny-elas", "--set", "model.vocab_size=512"], capsys,
          "prepare a dataset with a smaller --vocab-size")
    assert not (tmp_path / "data").exists() and not (tmp_path / "runs").exists()


def test_plot_to_an_unknown_image_format(dataset, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--preset", "llama-tiny-elas", "--data", str(dataset), "--out", str(run), "--no-progress",
                 *TINY, "--max-steps", "1", "--set", "eval_every=100"]) == 0
    capsys.readouterr()
    _fail(["plot", str(run), "--out", str(tmp_path / "curves.txt")], capsys, "Format 'txt' is not supported")


def test_a_float_key_given_as_an_integer_stays_a_number():
    """`lr = 1` in a TOML file is the number 1.0: recorded as an integer, a resumed run's `--set lr=0.5` was refused
    as not an integer."""
    from elas.config import apply_overrides, train_config
    cfg = train_config("llama-tiny")
    apply_overrides(cfg, {"lr": 1, "weight_decay": 0, "model.norm_eps": 1})
    assert (type(cfg.lr), type(cfg.weight_decay), type(cfg.model.norm_eps)) == (float, float, float)
    cfg.min_lr_ratio = 0  # as a config.json written before recorded such a value
    apply_overrides(cfg, {"min_lr_ratio": "0.5"})
    assert cfg.min_lr_ratio == 0.5


def test_bad_cublas_workspace_choice(capsys, monkeypatch):
    monkeypatch.setenv("ELAS_CUBLAS_WORKSPACE", "off")
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)  # (conftest puts back what was there)
    _fail(["model", "--preset", "llama-60m"], capsys, "ELAS_CUBLAS_WORKSPACE='off': expected one of torch, none")
    _fail(["experiment", "--plan", "--size", "llama-tiny", "--out", "q"], capsys, "ELAS_CUBLAS_WORKSPACE='off'")


def test_a_sparse_phase_that_ends_before_its_warm_up_is_refused_by_the_cli_and_its_dry_run(tmp_path, capsys):
    """The CLI refuses it before any data is prepared, and --dry-run (which trains nothing) says it too."""
    for dry in ([], ["--dry-run"]):
        _fail(["train", "--preset", "llama-tiny-relu2-vnm-fast", "--data", str(tmp_path / "none"), "--out",
               str(tmp_path / "run"), "--set", "model.vnm.dense_warmup_steps=200", *dry], capsys,
              "vnm would never be sparse")
        assert not (tmp_path / "none").exists() and not (tmp_path / "run").exists()


def test_a_config_of_a_newer_version_is_refused():
    """A config.json written by a newer elas may mean something else by a default (as version 3 changed
    attn_backend's): refused in one line, not read with this version's meaning."""
    from elas.config import CONFIG_VERSION, TrainConfig, from_dict, to_dict
    d = to_dict(TrainConfig())
    assert from_dict(TrainConfig, d) == TrainConfig()
    d["config_version"] = CONFIG_VERSION + 1
    with pytest.raises(ValueError, match=f"config of version {CONFIG_VERSION + 1} is newer than this elas"):
        from_dict(TrainConfig, d)


def test_consolidate_of_a_folder_that_is_not_there(tmp_path, capsys):
    """elas checkpoint consolidate RUN names a missing folder as one, not as a run without a checkpoint."""
    _fail(["checkpoint", "consolidate", str(tmp_path / "nope")], capsys,
          f"{tmp_path / 'nope'} is not a run directory (no such folder)")
    (tmp_path / "empty").mkdir()
    _fail(["checkpoint", "consolidate", str(tmp_path / "empty")], capsys, "holds no checkpoint that verifies")


def test_a_model_whose_weights_and_optimizer_state_cannot_fit_is_refused_before_any_data(tmp_path, capsys,
                                                                                          monkeypatch):
    """trainer.check_fits' second floor: the weights, gradients, AdamW moments (and bf16 weights' fp32 masters) at
    16 bytes a fp32 parameter (12 for bf16 weights with bf16 moments), over the processes where FSDP shards
    them. Here a machine of 64 MiB: llama-tiny fits it, a 60M model (fp32 on a CPU: ~0.9 GiB of state) does not,
    and is refused in one line before its data is prepared (the OS killed such a run without a word)."""
    import os

    import dataclasses

    import torch

    from elas import cli
    from elas.config import train_config
    from elas.train import TrainError
    from elas.train.trainer import check_fits

    def cfg_of(preset, **keys):
        return dataclasses.replace(train_config(preset), batch_size=2, seq_len=32, **keys)
    pages = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 64 * 2**20 // 4096}
    monkeypatch.setattr(os, "sysconf", lambda name: pages[name])
    cpu = torch.device("cpu")
    check_fits(cfg_of("llama-tiny"), cpu, "fp32")
    cfg = cfg_of("llama-60m")
    with pytest.raises(TrainError, match=r"a model of 0\.\d\dB parameters cannot train here: its weights, gradients "
                                         r"and optimizer state need [\d.]+ GiB \(16 bytes a fp32 parameter\), "
                                         r"more than this machine's 0.1 GiB; choose a smaller model, or train it on"):
        check_fits(cfg, cpu, "fp32")
    with pytest.raises(TrainError, match=r"\(12 bytes a bf16 parameter\)"):
        check_fits(cfg, cpu, "bf16")  # (optim_state_dtype auto: bf16 moments over bf16 weights)
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(TrainError, match=r"\(16 bytes a fp32 parameter, over 4 FSDP processes\)"):
        check_fits(cfg_of("llama-60m", parallel="fsdp"), cpu, "fp32")
    monkeypatch.delenv("WORLD_SIZE")
    # a model that fits but not with this micro-batch beside it: the batch is named, not the model
    with pytest.raises(TrainError, match=r"batch_size=128 x seq_len=256 cannot fit beside the model: its weights, "
                                         r"gradients and optimizer state need [\d.]+ GiB \(16 bytes a fp32 parameter\) "
                                         r"and one micro-batch's activations at least [\d.]+ GiB more"):
        check_fits(dataclasses.replace(cfg_of("llama-tiny"), batch_size=128, seq_len=256), cpu, "fp32")
    data = tmp_path / "data"
    assert cli.main(["train", "--preset", "llama-60m", "--data", str(data), "--out", str(tmp_path / "run"),
                     "--set", "batch_size=2", "--set", "seq_len=32", "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "cannot train here" in err and len(err.strip().splitlines()) == 1, err
    assert not data.exists()
    # a dry run plans a run for another machine, often: it says so and prints the plan
    assert cli.main(["train", "--preset", "llama-60m", "--data", str(data), "--out", str(tmp_path / "run"),
                     "--set", "batch_size=2", "--set", "seq_len=32", "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert "elas: warning: on this machine (cpu) a model of" in err and "cannot train here" in err
    assert "config {" in out and not data.exists()


def test_the_command_line_answers_help_without_importing_torch():
    """`elas --help`, `elas train --help` and a flag's bad choice parse without importing torch (4-5 s on a CPU
    machine): the parser and its choices come from elas.config and the standard library only."""
    import subprocess
    import sys
    code = ("import sys; from elas import cli; p = cli.build_parser()\n"
            "for argv in (['--help'], ['train', '--help'], ['train', '--grad-mode', 'sideways']):\n"
            "    try:\n        p.parse_args(argv)\n    except SystemExit:\n        pass\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "False", out.stdout + out.stderr
    assert "invalid choice: 'sideways'" in out.stderr and "mask" in out.stderr, out.stderr


def test_bench_checks_where_it_writes_before_timing_anything(tmp_path, capsys, monkeypatch):
    """`elas bench`'s results folder: a --gpu-name that is not a folder name is refused (it joined the path:
    '../..' left benchmarks/results), and a --out that cannot be written is one line before any timing (it was
    found at the first row's write, a traceback after minutes of work). An existing file is said to be
    replaced. (The GPU is faked: nothing here is timed.)"""
    import torch

    import importlib
    importlib.import_module("elas.train.trainer")  # (imported once here: _fail times the check, not the import)
    from elas.bench import kernels as kb
    for name in ("../..", "", "a/b"):
        _fail(["bench", "gemm", "--gpu-name", name], capsys, f"invalid --gpu-name {name!r}: a folder name")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(kb, "environment", lambda: {"gpu": "NVIDIA H100 80GB HBM3"})
    timed = []
    monkeypatch.setattr(kb, "bench_gemm", lambda m, on_row: timed.append(m) or [{"m": m}])
    monkeypatch.setattr(kb, "bench_host_overhead", lambda: {})
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    _fail(["bench", "gemm", "--out", str(blocker / "sub")], capsys, f"{blocker} is a file, not a directory")
    assert timed == []
    out = tmp_path / "res"
    assert main(["bench", "gemm", "--out", str(out), "--m", "128"]) == 0 and timed == [128]
    assert json.loads((out / "gemm.json").read_text())["rows"] == [{"m": 128}]
    assert "replaces it" not in capsys.readouterr().err
    assert main(["bench", "gemm", "--out", str(out), "--m", "256"]) == 0
    assert f"elas: {out / 'gemm.json'} exists: this run replaces it" in capsys.readouterr().err
