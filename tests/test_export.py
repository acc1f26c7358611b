"""`elas export` round-trips through transformers: the exported model's logits equal elas's (CPU, fp32)."""
import json

import pytest
import torch

from elas.cli import main

from conftest import TINY

transformers = pytest.importorskip("transformers")

CASES = {  # preset -> extra train flags
    "llama-tiny": [],  # SwiGLU -> LlamaForCausalLM
    "llama-tiny-elas": [],  # low-rank merged; 2 steps < its dense warm-up: dense activations, as exported
    "llama-tiny-relu2-w24": ["--set", "model.sste24.dense_warmup_steps=0",  # in its sparse phase: S(W) exported
                             "--set", "model.sste24.sparse_until=1.0"],
}


@pytest.mark.parametrize("preset", list(CASES))
def test_export_round_trips_through_transformers(dataset, tmp_path, capsys, preset):
    from elas.cli import _load_run
    run, out = tmp_path / "run", tmp_path / "hf"
    assert main(["train", "--preset", preset, "--data", str(dataset), "--out", str(run), "--no-progress", *TINY,
                 "--max-steps", "2", "--set", "eval_every=100", *CASES[preset]]) == 0
    assert main(["export", "--run", str(run), "--to", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    want_arch = "LlamaForCausalLM" if preset == "llama-tiny" else "ArceeForCausalLM"
    assert type(hf).__name__ == want_arch
    args = type("A", (), {"run": str(run), "checkpoint": None, "device": "cpu"})()
    _, model, _, _ = _load_run(args)
    idx = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(idx).float()
        theirs = hf(input_ids=idx).logits.float()
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tok.decode(tok("def main():").input_ids) == "def main():"
    assert main(["export", "--run", str(run), "--to", str(out)]) == 2  # no silent overwrite
    assert "--force" in capsys.readouterr().err


def test_init_from_a_hugging_face_checkpoint(dataset, tmp_path, capsys):
    """The inverse: a new full-rank run starts from an exported (or any matching Llama/Arcee) checkpoint."""
    from safetensors.torch import load_file

    from elas.config import apply_overrides, train_config
    from elas.export import hf_state_dict
    from elas.train import Trainer
    src, hf = tmp_path / "src", tmp_path / "hf"
    base = ["--data", str(dataset), "--no-progress", *TINY, "--max-steps", "2", "--set", "eval_every=100"]
    assert main(["train", "--preset", "llama-tiny-relu2", "--out", str(src), *base]) == 0
    assert main(["export", "--run", str(src), "--to", str(hf)]) == 0
    cfg = train_config("llama-tiny-relu2")
    over = dict(kv.split("=", 1) for kv in TINY[1::2])
    apply_overrides(cfg, {**over, "data_dir": str(dataset), "out_dir": str(tmp_path / "new"), "init_from": str(hf)})
    tr = Trainer(cfg, progress=False, log=lambda *a: None)
    want = load_file(str(hf / "model.safetensors"))
    got = hf_state_dict(tr.model)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert main(["train", "--preset", "llama-tiny-relu2", "--out", str(tmp_path / "cli"), *base,
                 "--init-from", str(hf)]) == 0
    capsys.readouterr()
    for preset, match in (("llama-tiny-elas", "low-rank"), ("llama-tiny", "LlamaForCausalLM")):
        assert main(["train", "--preset", preset, "--out", str(tmp_path / preset), *base, "--init-from", str(hf)]) == 2
        assert match in capsys.readouterr().err
        assert not (tmp_path / preset).exists()  # checked before anything is read or written
    assert main(["train", "--preset", "llama-tiny-relu2", "--out", str(tmp_path / "w"), *base, "--init-from", str(hf),
                 "--set", "model.d_model=128", "--set", "model.n_heads=4"]) == 2
    assert "hidden_size 64 (model: 128)" in capsys.readouterr().err
    assert main(["train", "--preset", "llama-tiny-relu2", "--out", str(tmp_path / "x"), *base,
                 "--init-from", str(tmp_path / "nothing")]) == 2
    assert "no readable config.json" in capsys.readouterr().err
    # weights of another tokenizer: the same shapes, but token ids that mean other text
    tok = json.loads((hf / "tokenizer.json").read_text())
    first = next(iter(tok["model"]["vocab"]))
    tok["model"]["vocab"][first + "_other"] = tok["model"]["vocab"].pop(first)
    (hf / "tokenizer.json").write_text(json.dumps(tok))
    assert main(["train", "--preset", "llama-tiny-relu2", "--out", str(tmp_path / "t"), *base,
                 "--init-from", str(hf)]) == 2
    assert "was trained with another tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("sets", [
    # sparse to the end with dense_init=master: step 4's mode is the final dense phase, which no step trained
    ["--set", "model.sste24.dense_warmup_steps=0", "--set", "model.sste24.sparse_until=1.0",
     "--set", "model.sste24.dense_init=master"],
    # dense for the whole run (warm-up = max_steps): step 4's mode would be the first sparse one
    ["--set", "model.act24.dense_warmup_steps=4"]], ids=["sste24-master", "act24-dense-throughout"])
def test_eval_and_export_see_the_forward_the_run_trained_last(dataset, tmp_path, capsys, sets):
    """A checkpoint at step N holds what step N-1 trained: `elas eval` reproduces the run's own validation loss
    there and says which forward it ran; the export is that forward's weights."""
    from safetensors.torch import load_file
    preset = "llama-tiny-relu2-w24" if "sste24" in sets[1] else "llama-tiny-relu2-24"
    run, out = tmp_path / "run", tmp_path / "hf"
    assert main(["train", "--preset", preset, "--data", str(dataset), "--out", str(run), "--no-progress", *TINY,
                 "--max-steps", "4", "--set", "eval_every=100", *sets]) == 0
    want = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "val_loss" in line][-1]
    capsys.readouterr()
    assert main(["eval", "--run", str(run), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["val_loss"] == pytest.approx(want["val_loss"], abs=1e-7)
    assert got["modes"] == ({"sste24": "sparse"} if "sste24" in sets[1] else {"act24": "dense"})
    assert main(["export", "--run", str(run), "--to", str(out)]) == 0
    assert "cannot express" not in capsys.readouterr().out
    if "sste24" in sets[1]:  # S(W): at most 2 of every 4 weights along d_in
        w = load_file(str(out / "model.safetensors"))["model.layers.0.mlp.up_proj.weight"]
        assert ((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all()


def test_a_checkpoint_keeps_its_modes_after_a_resume_changed_max_steps(dataset, tmp_path, capsys):
    """A run of 4 steps (S-STE sparse to half of it: dense from step 2, W <- beta S(W)) resumed to 8 steps rewrites
    config.json with max_steps=8, where half of the run ends at step 4. Its step-4 checkpoint still holds what
    step 3 trained in the dense phase: eval and export read it in that mode, not in the sparse mode step 3 has in
    the 8-step schedule (beta S_soft of the baked weights: another model)."""
    from safetensors.torch import load_file
    run = tmp_path / "run"
    sets = ["--set", "model.sste24.dense_warmup_steps=1", "--set", "eval_every=100", "--set", "save_every=4"]
    assert main(["train", "--preset", "llama-tiny-relu2-w24", "--data", str(dataset), "--out", str(run),
                 "--no-progress", *TINY, "--max-steps", "4", *sets]) == 0
    want = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "val_loss" in line][-1]
    assert want["step"] == 4
    capsys.readouterr()
    assert main(["export", "--run", str(run), "--checkpoint", "step-00000004", "--to", str(tmp_path / "a")]) == 0
    assert main(["train", "--preset", "llama-tiny-relu2-w24", "--data", str(dataset), "--out", str(run),
                 "--no-progress", *TINY, "--max-steps", "8", "--resume", *sets]) == 0
    assert json.loads((run / "config.json").read_text())["max_steps"] == 8
    capsys.readouterr()
    assert main(["eval", "--run", str(run), "--checkpoint", "step-00000004", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["modes"] == {"sste24": "dense-final"}
    assert got["val_loss"] == pytest.approx(want["val_loss"], abs=1e-7)
    assert main(["export", "--run", str(run), "--checkpoint", "step-00000004", "--to", str(tmp_path / "b")]) == 0
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_export_warns_of_sparse_activations_only_when_the_forward_has_them(tmp_path):
    from elas.build import build_model
    from elas.export import export_hf
    from elas.sparsity import set_step

    from conftest import preset
    for name, step, warns in (("llama-tiny-relu2-24", 0, False), ("llama-tiny-relu2-24", 5_000, True),
                              ("llama-tiny-relu2-vnm-blocks", 5_000, True)):
        cfg = preset(name, n_layers=1, d_model=64, n_heads=2, intermediate=96, vocab_size=128)
        model = build_model(cfg)
        set_step(model, step, 20_000)
        said = []
        export_hf(model, cfg, None, tmp_path / f"{name}-{step}", log=said.append)
        assert any("cannot express" in s for s in said) == warns, (name, step, said)


def test_export_falls_back_past_a_damaged_checkpoint_and_force_keeps_the_old_export_on_failure(
        dataset, tmp_path, capsys, monkeypatch):
    import elas.export
    run, out = tmp_path / "run", tmp_path / "hf"
    assert main(["train", "--preset", "llama-tiny", "--data", str(dataset), "--out", str(run), "--no-progress", *TINY,
                 "--max-steps", "2", "--set", "eval_every=100", "--set", "save_every=1"]) == 0
    model_file = run / "checkpoints" / "step-00000002" / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:-8])  # the newest checkpoint is damaged
    capsys.readouterr()
    assert main(["export", "--run", str(run), "--to", str(out)]) == 0
    err = capsys.readouterr().err
    assert "step-00000002" in err and "using step-00000001" in err
    (out / "config.json").write_text((out / "config.json").read_text().replace("{", '{"earlier": true,', 1))
    old = {f.name: f.read_bytes() for f in out.iterdir()}

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(elas.export, "save_file", full_disk)
    assert main(["export", "--run", str(run), "--to", str(out), "--force"]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert {f.name: f.read_bytes() for f in out.iterdir()} == old  # the earlier export, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "run"]  # nothing left behind


def test_an_export_over_an_earlier_one_leaves_none_of_its_files_stale(dataset, tmp_path):
    """--force over an export with a tokenizer, by one without: the earlier tokenizer files go (they would describe
    another model's vocabulary); files the export does not write stay."""
    from elas.build import build_model
    from elas.export import export_hf

    from conftest import preset
    cfg = preset("llama-tiny", n_layers=1, d_model=64, n_heads=2, intermediate=96, vocab_size=512)
    out = tmp_path / "hf"
    export_hf(build_model(cfg), cfg, dataset / "tokenizer.json", out, log=lambda *a: None)
    assert {"tokenizer.json", "tokenizer_config.json"} <= {f.name for f in out.iterdir()}
    (out / "README.md").write_text("the user's notes")
    export_hf(build_model(cfg), cfg, None, out, log=lambda *a: None)
    assert sorted(f.name for f in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]


@pytest.mark.parametrize("edit", [
    lambda c: (c.get("rope_parameters") or c).update(rope_theta=500000.0),
    lambda c: c.update(rms_norm_eps=1e-2), lambda c: c.update(attention_bias=True),
    lambda c: c.update(hidden_act="gelu"), lambda c: c.update(tie_word_embeddings=True)])
def test_init_from_refuses_a_checkpoint_that_computes_another_function(tmp_path, edit):
    """Same shapes, other settings (rope theta, norm eps, biases, activation, tied embeddings): the weights would
    load into a model that computes something else (logits 0.5-0.7 apart), silently."""
    from elas.build import build_model
    from elas.export import check_init_from, export_hf

    from conftest import preset
    cfg = preset("llama-tiny-relu2", n_layers=1, d_model=64, n_heads=2, intermediate=96, vocab_size=128)
    out = tmp_path / "hf"
    export_hf(build_model(cfg), cfg, None, out, log=lambda *a: None)
    check_init_from(build_model(cfg), cfg, out)  # (its own export is accepted)
    conf = json.loads((out / "config.json").read_text())
    edit(conf)
    (out / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ValueError, match="computes another function"):
        check_init_from(build_model(cfg), cfg, out)


def test_a_run_started_again_on_other_data_keeps_that_datas_tokenizer(dataset, tmp_path):
    """A run directory started again at step 0 (its first start stopped before its first checkpoint) on another
    dataset: its tokenizer copy is the new data's, which eval, generate and export read (the first start's would
    decode its tokens into other text, ship with the export, and refuse its own data in eval)."""
    import shutil

    from elas.data import prepare
    other = tmp_path / "other"
    prepare(other, source="stdlib", vocab_size=400, max_mb=0.5, val_frac=0.1, log=lambda *a: None)
    run = tmp_path / "run"
    base = ["--preset", "llama-tiny", "--out", str(run), "--no-progress", *TINY, "--max-steps", "2",
            "--set", "eval_every=100"]
    assert main(["train", "--data", str(dataset), *base]) == 0
    shutil.rmtree(run / "checkpoints")  # (the first start stopped before its first checkpoint)
    assert main(["train", "--data", str(other), *base]) == 0
    assert (run / "tokenizer.json").read_bytes() == (other / "tokenizer.json").read_bytes()
    assert main(["eval", "--run", str(run), "--device", "cpu"]) == 0
    assert main(["export", "--run", str(run), "--to", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == (other / "tokenizer.json").read_bytes()


def test_eval_and_generate_check_data_and_tokenizer_before_loading_the_checkpoint(dataset, tmp_path, capsys,
                                                                                  monkeypatch):
    """A bad --data (eval) or an unreadable tokenizer (generate) is one line before the checkpoint is verified and
    loaded (minutes for a large model)."""
    import elas.cli
    run = tmp_path / "run"
    assert main(["train", "--preset", "llama-tiny", "--data", str(dataset), "--out", str(run), "--no-progress",
                 *TINY, "--max-steps", "1", "--set", "eval_every=100"]) == 0
    loaded, real = [], elas.cli._load_run
    monkeypatch.setattr(elas.cli, "_load_run", lambda args: (loaded.append(args), real(args))[1])
    capsys.readouterr()
    assert main(["eval", "--run", str(run), "--data", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (run / "tokenizer.json").write_text("{")
    assert main(["generate", "--run", str(run), "--device", "cpu"]) == 2
    assert "not a valid tokenizer.json" in capsys.readouterr().err
    assert not loaded


def test_export_writes_its_files_durably_before_they_take_their_names(tmp_path, monkeypatch):
    """Every exported file is fsynced before it is renamed into --to, and --to after: a machine crash after an
    export over an earlier one never leaves an empty model.safetensors where the earlier one was."""
    import os

    from elas.build import build_model
    from elas.export import export_hf

    from conftest import preset
    cfg = preset("llama-tiny", n_layers=1, d_model=64, n_heads=2, intermediate=96, vocab_size=512)
    events, real_fsync, real_replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.fstat(fd).st_ino)), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", os.stat(a).st_ino)),
                                                     real_replace(a, b))[1])
    out = tmp_path / "hf"
    export_hf(build_model(cfg), cfg, None, out, log=lambda *a: None)
    for i, (kind, ino) in enumerate(events):
        if kind == "replace":
            assert ("fsync", ino) in events[:i]
    assert ("fsync", out.stat().st_ino) in events and {f.name for f in out.iterdir()} == {"config.json",
                                                                                         "model.safetensors"}
