"""Generation with a KV cache: the same logits and the same tokens as re-running the whole context each step."""
import pytest
import torch

from elas.build import build_model
from elas.model.generate import sample
from elas.model.llama import KVCache
from elas.sparsity import set_step

from conftest import preset


def _model(variant: str, max_seq_len: int = 24):
    name = "llama-tiny" if variant == "swiglu" else f"llama-tiny-{variant}"
    cfg = preset(name, n_layers=2, vocab_size=200, max_seq_len=max_seq_len)
    for m in cfg.methods:
        if m["method"] == "act24":
            m["dense_warmup_steps"] = 0
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    set_step(model, 5, 10)  # 2:4 variants in their sparse mode
    return model


@pytest.mark.parametrize("variant", ["swiglu", "lowrank-relu2", "elas", "relu2-24"])
def test_cached_decode_logits_equal_the_full_forward(variant):
    model = _model(variant)
    idx = torch.randint(0, 200, (2, 20))
    with torch.no_grad():
        full = model(idx)  # [2, 20, vocab]
        cache = KVCache(len(model.blocks), 24)
        steps = [model(idx[:, :7], cache=cache)]  # prefill
        for t in range(7, 20):
            steps.append(model(idx[:, t:t + 1], cache=cache))
    assert cache.pos == 20
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["swiglu", "elas"])
def test_greedy_sampling_with_and_without_the_cache_agree(variant):
    """Past max_seq_len (24) the context slides: 10 prompt + 30 new tokens cross it."""
    model = _model(variant)
    prompt = torch.randint(0, 200, (1, 10))
    a = sample(model, prompt, 30, temperature=0, use_cache=True)
    b = sample(model, prompt, 30, temperature=0, use_cache=False)
    c = sample(model, prompt, 30, temperature=0, use_cache=True, static_cache=True)  # what the graph replays
    assert a.shape == (1, 40) and torch.equal(a, b) and torch.equal(a, c)


def test_static_cache_logits_equal_the_dynamic_cache_and_trace_as_one_graph():
    """The static cache (whole buffers + a mask, positions on the device) gives the dynamic cache's logits at
    every step, and a decode step over it is one graph with no break (what a compiled, captured decode needs)."""
    model = _model("lowrank-relu2")
    idx = torch.randint(0, 200, (1, 12))
    with torch.no_grad():
        dyn, sta = KVCache(len(model.blocks), 24), KVCache(len(model.blocks), 24, static=True)
        for cache in (dyn, sta):
            out = [model(idx[:, :7], cache=cache)]
            for t in range(7, 12):
                out.append(model(idx[:, t:t + 1], cache=cache))
            cache.logits = torch.cat(out, 1)
        torch.testing.assert_close(sta.logits, dyn.logits, rtol=1e-5, atol=1e-5)
        assert sta.pos == 12 and int(sta.pos_t) == 12
        import torch._dynamo as dynamo
        dynamo.reset()
        ex = dynamo.explain(lambda t: model(t, cache=sta))(idx[:, 11:12])
        assert (ex.graph_count, ex.graph_break_count) == (1, 0), ex.break_reasons


def test_cache_misuse_is_a_clear_error():
    model = _model("swiglu")
    cache = KVCache(len(model.blocks), 24)
    model(torch.randint(0, 200, (1, 4)), cache=cache)
    with pytest.raises(ValueError, match="one token per forward"):
        model(torch.randint(0, 200, (1, 2)), cache=cache)
    with pytest.raises(ValueError, match="exceeds model.max_seq_len"):
        model(torch.randint(0, 200, (1, 21)), cache=cache)


def test_infer_ratios_table_and_bad_variant():
    """elas bench infer's ratios against the dense twin and its table (the measurement itself needs a GPU); a bad
    variant name is one line before anything runs."""
    from elas.bench.infer import with_twin_ratios
    from elas.bench.report import infer_table
    from elas.cli import main
    base = {"model": "llama-1b", "batch": 8, "prompt": 512, "decode_path": "dense"}
    rows = with_twin_ratios([
        {**base, "variant": "lowrank-relu2", "prefill_ms": 20.0, "prefill_tokens_per_s": 2e5,
         "decode_ms_per_token": 4.0},
        {**base, "variant": "elas", "prefill_ms": 16.0, "prefill_tokens_per_s": 2.5e5, "decode_ms_per_token": 5.0,
         "decode_path": "masked reference (1 token)"},
        {"model": "llama-1b", "variant": "relu2", "error": "out of memory: x"}])
    assert rows[1]["prefill_vs_twin"] == 1.25 and rows[1]["decode_vs_twin"] == 0.8 and "prefill_vs_twin" not in rows[0]
    text = infer_table({"env": {"gpu": "NVIDIA H200", "torch": "2.11", "date": "d"}, "command": "c", "rows": rows})
    assert "**1.25x**" in text and "0.80x" in text and "out of memory" in text
    assert main(["bench", "infer", "--variants", "elas,nope"]) != 0


@pytest.mark.parametrize("variant", ["lowrank-relu2", "elas"])
def test_compiled_decode_step_is_one_graph_for_every_position_and_cache(variant):
    """decode_step(compile=True) over a static cache: the logits of eager decoding at every position, and one
    compilation for all positions and for caches of other prompt lengths (the graph reads no host position;
    the caller advances `pos`, as GraphDecoder.step does)."""
    from torch._dynamo.utils import counters

    from elas.model.generate import decode_step
    torch._dynamo.reset()
    counters.clear()
    model = _model(variant)
    idx = torch.randint(0, 200, (1, 14))
    with torch.no_grad():
        for prompt in (6, 8):
            cache, ref = (KVCache(len(model.blocks), 24, static=True) for _ in range(2))
            for c in (cache, ref):
                model(idx[:, :prompt], cache=c)
            step = decode_step(model, cache, compile=True)
            for t in range(prompt, prompt + 4):
                got = step(idx[:, t:t + 1])
                cache.pos += 1
                torch.testing.assert_close(got, model(idx[:, t:t + 1], cache=ref)[:, -1, :].float(), rtol=1e-5,
                                           atol=1e-5)
            assert cache.pos == ref.pos and int(cache.pos_t) == int(ref.pos_t) == prompt + 4
    assert counters["stats"]["unique_graphs"] == 1
    with pytest.raises(ValueError, match="graph=True"):
        sample(model, idx[:, :4], 2, compile_decode=True)


@pytest.mark.gpu
@pytest.mark.parametrize("compile_decode", [False, True])
def test_gpu_graph_decode_equals_eager_decode(compile_decode):
    """The captured decode step (GraphDecoder over a static cache; compiled first or not) samples the tokens
    eager decoding does."""
    torch.manual_seed(0)
    model = _model("lowrank-relu2").cuda()
    prompt = torch.randint(0, 200, (1, 10), device="cuda")
    a = sample(model, prompt, 30, temperature=0, graph=False)
    b = sample(model, prompt, 30, temperature=0, graph=True, compile_decode=compile_decode)
    assert torch.equal(a, b)


def test_sampling_never_picks_ids_past_the_tokenizers_vocabulary():
    """A model's vocabulary may be larger than its tokenizer's (rows never trained as targets): with vocab_limit
    no id at or past it is sampled, whatever the temperature; a temperature so small that logits / T overflow,
    or infinite, is refused."""
    model = _model("swiglu")
    prompt = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        model.lm_head.weight[150:] *= 50.0  # the untrained rows would win most draws
    free = sample(model, prompt, 20, temperature=1.0, top_k=0, generator=torch.Generator().manual_seed(0))
    assert (free[0, 3:] >= 150).any()  # (the check below could fail without the limit)
    for t in (0, 1.0, 5.0):
        out = sample(model, prompt, 20, temperature=t, top_k=0, generator=torch.Generator().manual_seed(0),
                     vocab_limit=150)
        assert out.shape[1] == 23 and (out[0, 3:] < 150).all(), (t, out)
    for t in (1e-40, float("inf")):
        with pytest.raises(ValueError, match="temperature must be 0"):
            sample(model, prompt, 2, temperature=t)


@pytest.mark.parametrize("kw, match", [(dict(idx=torch.zeros(2, 5, dtype=torch.long), stop_token=0), "idx"),
                                       (dict(idx=torch.zeros(1, 0, dtype=torch.long)), "idx"),
                                       (dict(top_k=-1), "top_k"), (dict(top_k=2.5), "top_k")])
def test_sample_refuses_bad_arguments_before_the_prefill(kw, match, monkeypatch):
    model = _model("swiglu")
    idx = kw.pop("idx", torch.zeros(1, 5, dtype=torch.long))
    monkeypatch.setattr(model, "forward", lambda *a, **k: pytest.fail("the model ran"))
    with pytest.raises(ValueError, match=match):
        sample(model, idx, 3, **kw)


def test_export_without_transformers_fails_before_loading_the_checkpoint(dataset, tmp_path, monkeypatch, capsys):
    import sys
    import elas.cli
    from elas.cli import main
    from conftest import TINY
    run = tmp_path / "run"
    assert main(["train", "--preset", "llama-tiny", "--data", str(dataset), "--out", str(run), "--no-progress",
                 *TINY, "--max-steps", "1", "--set", "eval_every=100"]) == 0
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.setattr(elas.cli, "_load_run", lambda *a, **k: pytest.fail("checkpoint loaded first"))
    assert main(["export", "--run", str(run), "--to", str(tmp_path / "hf")]) == 2
    assert "needs transformers" in capsys.readouterr().err
