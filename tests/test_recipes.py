"""The papers' named runs: every recipe resolves and validates (--dry-run), and a run records its recipe."""
import json

import pytest

from elas.cli import main
from elas.config import load_recipe, recipe_names

from conftest import TINY


def test_the_recipes_are_listed(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    names = recipe_names()
    assert {"elas-60m", "elas-1b", "loro-350m", "galore-130m", "haziza-1b", "madhyastha-1b"} <= set(names)
    assert all(n in out for n in names)


@pytest.mark.parametrize("name", recipe_names())
def test_every_recipe_resolves_in_a_dry_run(name, capsys):
    assert main(["train", "--recipe", name, "--dry-run"]) == 0
    out = capsys.readouterr().out
    r = load_recipe(name)
    cfg = json.loads(next(ln for ln in out.splitlines() if ln.startswith("config "))[7:])
    assert cfg["recipe"] == f"{name}@{r['version']}" and cfg["preset"] == r["preset"]
    assert cfg["optimizer"] == r["optimizer"] and cfg["lr"] == r["lr"] and cfg["max_steps"] == r["max_steps"]
    assert cfg["batch_size"] * cfg["grad_accum"] == 512  # the papers' 512 x 256 tokens per step
    tokens = 512 * 256 * r["max_steps"] / 1e9
    assert f"{tokens:.2f}B tokens" in out and f"optimizer {r['optimizer']}, lr {r['lr']:g}" in out
    if name.startswith(("elas", "haziza")):
        assert cfg["model"]["methods"][0]["method"] == "act24"
    if name.startswith("madhyastha"):  # the third paper: S-STE weights and V:N:M activations with the router
        assert [m["method"] for m in cfg["model"]["methods"]] == ["sste24", "vnm"]
        assert cfg["model"]["methods"][1]["router"] is True


def test_a_run_records_its_recipe_and_flags_still_apply(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--recipe", "elas-60m", "--data", str(dataset), "--out", str(out), "--no-progress",
                 *TINY, "--set", "model.rank=16", "--max-steps", "2", "--set", "eval_every=100"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["recipe"] == "elas-60m@1" and cfg["optimizer"] == "loro_adamw" and cfg["model"]["rank"] == 16
    assert main(["train", "--recipe", "elas-60m", "--preset", "llama-60m", "--dry-run"]) == 2
    assert "not both" in capsys.readouterr().err


def test_plot_draws_runs_into_one_png(dataset, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    runs = []
    for preset in ("llama-tiny-elas", "llama-tiny-relu2"):
        out = tmp_path / preset
        assert main(["train", "--preset", preset, "--data", str(dataset), "--out", str(out), "--no-progress", *TINY,
                     "--max-steps", "4", "--set", "log_every=1", "--set", "eval_every=2"]) == 0
        runs.append(str(out))
    png = tmp_path / "plot.png"
    assert main(["plot", *runs, "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    assert main(["plot", str(tmp_path / "nope"), "--out", str(png)]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_a_dry_run_says_when_its_data_is_not_prepared(tmp_path, capsys):
    """--dry-run reads no data, but says when --data holds no prepared dataset (the run would stop there), and
    that the built-in corpus would be prepared on first use."""
    assert main(["train", "--recipe", "elas-60m", "--data", str(tmp_path / "c4"), "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert f"{tmp_path / 'c4'} holds no prepared dataset yet" in err and "`elas data prepare`" in err
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len({ln.index(" v") for ln in lines}) == 1  # one column of versions, however long the names


def _dry(capsys, *argv):
    """(exit code, the resolved config, stderr) of `elas train ARGV --dry-run`."""
    rc = main(["train", *argv, "--dry-run"])
    cap = capsys.readouterr()
    cfg = next((json.loads(ln[7:]) for ln in cap.out.splitlines() if ln.startswith("config ")), None)
    return rc, cfg, cap.err


def test_a_recipe_run_resumes_with_its_recipe_named_again(tmp_path, capsys):
    """config.json records NAME@VERSION; the same command repeated with --resume auto (a job script) resumes."""
    from elas.config import recipe_config, to_dict
    run = tmp_path / "run"
    run.mkdir()
    cfg = recipe_config("elas-60m")
    cfg.out_dir = str(run)
    (run / "config.json").write_text(json.dumps(to_dict(cfg)))
    rc, got, err = _dry(capsys, "--recipe", "elas-60m", "--resume", "auto", "--out", str(run))
    assert rc == 0, err
    assert got["recipe"] == "elas-60m@1"
    rc, _, err = _dry(capsys, "--recipe", "haziza-60m", "--resume", "auto", "--out", str(run))
    assert rc == 2 and "--recipe haziza-60m contradicts the run being resumed" in err


def test_recipes_of_one_preset_default_to_their_own_run_dirs(capsys):
    """galore-60m (full rank) and loro-60m (rank 128) share the preset llama-60m: not their run directory."""
    _, g, _ = _dry(capsys, "--recipe", "galore-60m")
    _, lo, _ = _dry(capsys, "--recipe", "loro-60m")
    assert (g["out_dir"], lo["out_dir"]) == ("runs/galore-60m", "runs/loro-60m")
    _, p, _ = _dry(capsys, "--preset", "llama-tiny-relu2")
    assert p["out_dir"] == "runs/llama-tiny-relu2"


def test_a_resume_without_out_continues_the_default_run_with_its_config(tmp_path, monkeypatch, capsys):
    """--resume without --out resumes runs/<recipe or preset>, with the settings it was started with."""
    from elas.config import recipe_config, to_dict
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "haziza-60m"
    run.mkdir(parents=True)
    cfg = recipe_config("haziza-60m")
    cfg.lr, cfg.out_dir = 0.005, "runs/haziza-60m"
    (run / "config.json").write_text(json.dumps(to_dict(cfg)))
    rc, got, err = _dry(capsys, "--recipe", "haziza-60m", "--resume")
    assert rc == 0, err
    assert got["lr"] == 0.005 and got["out_dir"] == "runs/haziza-60m"


def test_a_recipe_keeps_its_global_batch_on_several_processes(monkeypatch, capsys):
    """Under torchrun (WORLD_SIZE) a new run splits its preset's or recipe's batch over the processes; a batch the
    user gives is per process."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "8")
    rc, cfg, err = _dry(capsys, "--recipe", "elas-1b")
    assert rc == 0, err
    assert cfg["batch_size"] * cfg["grad_accum"] * 8 == 512 and cfg["batch_size"] == 64
    assert "split over 8 processes" in err
    rc, cfg, _ = _dry(capsys, "--recipe", "elas-1b", "--set", "batch_size=32")
    assert (cfg["batch_size"], cfg["grad_accum"]) == (32, 8)  # given: per process
    monkeypatch.setenv("WORLD_SIZE", "16")
    _, cfg, _ = _dry(capsys, "--recipe", "elas-60m")  # 256 x 2 over 16: 32 sequences each
    assert (cfg["batch_size"], cfg["grad_accum"]) == (32, 1)
    monkeypatch.setenv("WORLD_SIZE", "3")
    rc, _, err = _dry(capsys, "--recipe", "elas-1b")
    assert rc == 2 and "does not split over 3 processes" in err



def test_the_dry_run_says_a_global_batch_is_split_not_multiplied_by_torchrun(monkeypatch, capsys):
    """On one process --dry-run names a recipe's batch as the global one that torchrun splits (it said "x the
    number of processes", which holds only for a batch the user gives, per process); under torchrun it gives
    the per-process share and the processes' total."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)

    def batch_line(*argv):
        assert main(["train", *argv, "--dry-run"]) == 0
        return next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("batch "))
    line = batch_line("--recipe", "elas-60m")
    assert line.startswith("batch 512 x 256 tokens per step (256 x 2 accumulated), 10,000 steps: 1.31B tokens "
                           "(under torchrun this global batch is split over the processes") and "x the number" not in line
    line = batch_line("--recipe", "elas-60m", "--set", "batch_size=8")
    assert "per process (8 x 2 accumulated)" in line and line.endswith("tokens (x the number of processes)")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "8")
    line = batch_line("--recipe", "elas-60m")
    assert line == ("batch 64 x 256 tokens per step per process (64 x 1 accumulated), 10,000 steps x 8 processes: "
                    "1.31B tokens")


def test_a_recipe_may_nest_method_tables(monkeypatch):
    import elas.config as C
    real = C.load_recipe
    monkeypatch.setattr(C, "load_recipe", lambda name: {**real("elas-60m"),
                                                        "model": {"act24": {"dense_warmup_steps": 500}}})
    cfg = C.recipe_config("elas-60m")
    assert cfg.model.method("act24")["dense_warmup_steps"] == 500


def _dry_config(args, capsys):
    assert main(["train", "--dry-run", *args]) == 0
    out = capsys.readouterr().out
    return json.loads(next(ln for ln in out.splitlines() if ln.startswith("config "))[7:])


def test_tiny_nowarmup_preset_keeps_its_zero_warmup(capsys):
    """The size's defaults fill what a variant leaves unset, never what it sets (the tiny size's 200-step warm-up
    replaced -nowarmup's 0); a method --act-sparsity adds takes them too (it had the 1000 steps of a 10k run)."""
    from elas.config import train_config
    cfg = train_config("llama-tiny-elas-nowarmup")
    assert cfg.model.method("act24")["dense_warmup_steps"] == 0
    added = _dry_config(["--preset", "llama-tiny-relu2", "--act-sparsity", "2:4"], capsys)
    methods = added["model"]["methods"]  # (the dry run prints each method's fields in full, as config.json has them)
    assert [(m["method"], m["dense_warmup_steps"]) for m in methods] == [("act24", 200)], methods


@pytest.mark.parametrize("value,want", [("abc", "model.d_ff='abc'"), ("true", "model.d_ff=True"),
                                        ("2.5", "model.d_ff=2.5")])
def test_bad_d_ff_is_one_line_naming_it(dataset, tmp_path, capsys, value, want):
    out = tmp_path / "run"
    assert main(["train", "--preset", "llama-tiny", "--data", str(dataset), "--out", str(out), *TINY,
                 "--set", f"model.d_ff={value}", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("elas: error:") and want in err, err


def test_set_out_dir_resume_keeps_the_runs_config(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", "--preset", "llama-tiny-elas", "--data", str(dataset), "--no-progress", *TINY]
    assert main(base + ["--out", str(out), "--max-steps", "1"]) == 0
    capsys.readouterr()
    # as --out would: a model key that contradicts the run is refused
    assert main(base + ["--set", f"out_dir={out}", "--resume", "--max-steps", "2",
                        "--set", "model.act24.grad_mode=mask"]) == 2
    assert "contradict" in capsys.readouterr().err


def test_toml_preset_does_not_relabel_the_flags_model(tmp_path, capsys):
    toml = tmp_path / "run.toml"
    toml.write_text('preset = "llama-60m"\n')
    cfg = _dry_config(["--preset", "llama-tiny-elas", "--config", str(toml)], capsys)
    assert cfg["model"]["d_model"] == 128 and cfg["preset"] == "llama-tiny-elas"
    toml.write_text('recipe = "galore-60m"\n')
    cfg = _dry_config(["--recipe", "elas-60m", "--config", str(toml)], capsys)
    assert cfg["recipe"] == "elas-60m@1"


def test_set_preset_is_refused(capsys):
    assert main(["train", "--dry-run", "--set", "preset=llama-60m"]) == 2
    assert "preset" in capsys.readouterr().err


def test_seed_out_of_range_is_refused_before_the_run(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--preset", "llama-tiny-elas", "--data", str(dataset), "--out", str(out), *TINY,
                 "--no-progress", "--max-steps", "1", "--set", "seed=18446744073709551616"]) == 2
    assert "seed=18446744073709551616" in capsys.readouterr().err
    assert not out.exists()


def test_plot_of_a_run_above_loss_8_shows_its_training_loss(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from elas.train import experiment
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 9.0 - 0.01 * s}) + "\n"
                                               for s in range(1, 5)))
    seen = {}
    real = plt.Figure.savefig

    def grab(fig, *a, **k):
        ax = fig.axes[0]
        lo, hi = ax.get_ylim()
        seen["ok"] = lo < hi and lo <= 8.96 and hi >= 8.99
        return real(fig, *a, **k)
    monkeypatch.setattr(plt.Figure, "savefig", grab)
    assert experiment.plot_runs([run], tmp_path / "p.png")
    assert seen["ok"]
