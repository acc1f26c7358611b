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
