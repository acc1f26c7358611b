"""`elas export` round-trips through transformers: the exported model's logits equal elas's (CPU, fp32)."""
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
