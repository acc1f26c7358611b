"""`elas experiment`: a named grid of training runs with one harness, one data order, one token budget.

The quality grid reproduces the papers' comparisons at a budget one GPU session can afford. Every variant uses the
same data, seed, sequence length, batch and steps; schedules that the papers tie to the run length (lr warm-up,
dense 2:4 warm-up, LORO's exact-step period) are scaled with it, so that a 10k-step recipe keeps its shape.
Runs are resumable: a variant whose run directory holds a finished run is skipped, an interrupted one resumed.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from ..build import resolve_methods
from ..config import LORO_DEFAULTS, VARIANTS, apply_overrides, model_preset, preset_name, size_of, train_config
from ..sparsity import method_to_dict
from .trainer import Trainer

QUALITY_VARIANTS = tuple(VARIANTS)  # every named variant (config.VARIANTS), with its recipe's optimizer
PAPER_STEPS = 10_000  # the 60M recipe the schedules are written for (dense warm-up 1000 = 10%, LORO K = 500 = 5%)


def variant_config(size: str, variant: str, steps: int, data_dir: str, out: Path, batch_size: int, grad_accum: int,
                   seq_len: int = 256, full_rank_lr: float = 1e-3):
    optimizer = VARIANTS[variant].optimizer
    cfg = train_config(preset_name(size, variant))
    over = {"data_dir": data_dir, "out_dir": str(out / variant), "max_steps": steps, "seq_len": seq_len,
            "batch_size": batch_size, "grad_accum": grad_accum, "warmup_steps": max(1, steps // 10),
            "optimizer": optimizer, "lr": full_rank_lr, "eval_every": max(1, steps // 10),
            "save_every": max(1, steps // 4), "log_every": max(1, steps // 100), "model.max_seq_len": seq_len}
    if optimizer == "loro_adamw":
        over.update(LORO_DEFAULTS[size_of(size)])
        over["loro_exact_every"] = max(2, round(steps * 500 / PAPER_STEPS))
    apply_overrides(cfg, over)
    # the methods' step schedules (the dense warm-up) keep their share of the paper's run length: scaled from
    # the variant's recipe (the model preset), not from a size's training defaults
    recipe = model_preset(preset_name(size, variant))
    cfg.model.methods = [method_to_dict(m.scaled(steps / PAPER_STEPS)) for m in resolve_methods(recipe)]
    return cfg


def run_grid(size: str, variants: list[str], steps: int, data_dir: str, out: Path, batch_size: int = 256,
             grad_accum: int = 2, log=print) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for v in variants:
        if v not in QUALITY_VARIANTS:
            raise ValueError(f"unknown variant {v!r}; known: {', '.join(QUALITY_VARIANTS)}")
        cfg = variant_config(size, v, steps, data_dir, out, batch_size, grad_accum)
        run = Path(cfg.out_dir)
        done = run / "summary.json"
        if done.exists():
            rows.append(json.loads(done.read_text()))
            log(f"{v}: done before, skipped")
            continue
        t0 = time.time()
        trainer = Trainer(cfg, resume="auto", progress=False, log=log)
        try:
            res = trainer.fit()
        finally:
            trainer.close()
        metrics = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
        last = [m for m in metrics if "y2_zero_frac/mean" in m]
        row = {"model": size, "variant": v, "steps": cfg.max_steps,
               "tokens": cfg.max_steps * cfg.batch_size * cfg.grad_accum * cfg.seq_len,
               "val_loss": res["val_loss"], "val_ppl": res["val_ppl"], "wall_s": round(time.time() - t0, 1),
               "optimizer": cfg.optimizer, "lr": cfg.lr, "methods": cfg.model.methods,
               "y2_zero_frac": last[-1]["y2_zero_frac/mean"] if last else None,
               "dropped_nnz_frac": last[-1]["dropped_nnz_frac/mean"] if last else None}
        done.write_text(json.dumps(row, indent=1))
        rows.append(row)
        log(f"{v}: val loss {row['val_loss']:.4f} (ppl {row['val_ppl']:.2f}) in {row['wall_s']:.0f} s")
    return rows


def summarize(out: Path) -> tuple[list[dict], str]:
    """Collect every finished variant under `out` into summary.json and summary.md; returns (rows, markdown)."""
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("*/summary.json"))]
    order = list(QUALITY_VARIANTS)
    rows.sort(key=lambda r: order.index(r["variant"]) if r["variant"] in order else 99)
    by = {r["variant"]: r for r in rows}
    md = ["| variant | optimizer | steps | tokens | val loss | val ppl | y2 zeros | non-zeros dropped by 2:4 | wall s |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        z = f"{r['y2_zero_frac']:.3f}" if r.get("y2_zero_frac") is not None else "-"
        dr = f"{r['dropped_nnz_frac']:.4f}" if r.get("dropped_nnz_frac") is not None else "-"
        md.append(f"| {r['variant']} | {r['optimizer']} | {r['steps']} | {r['tokens']:,} | {r['val_loss']:.4f} | "
                  f"{r['val_ppl']:.2f} | {z} | {dr} | {r['wall_s']:.0f} |")
    ratios = []
    for a, b in (("elas", "lowrank-relu2"), ("relu2-24", "relu2"), ("elas-mask", "lowrank-relu2"),
                 ("elas-nowarmup", "lowrank-relu2"), ("relu2", "swiglu")):
        if a in by and b in by:
            ratios.append(f"- {a} / {b}: val loss ratio {by[a]['val_loss'] / by[b]['val_loss']:.4f}, "
                          f"ppl ratio {math.exp(by[a]['val_loss'] - by[b]['val_loss']):.4f}")
    text = "\n".join(md + [""] + ratios) + "\n"
    (out / "summary.json").write_text(json.dumps(rows, indent=1))
    (out / "summary.md").write_text(text)
    return rows, text


def plot_curves(out: Path, png: Path) -> bool:
    """Every run under `out` (the quality grid) into one PNG; False without matplotlib."""
    return plot_runs(sorted(p for p in out.iterdir() if (p / "metrics.jsonl").exists()), png)


def plot_runs(runs: list[Path], png: Path) -> bool:
    """Training loss, validation loss, tokens/s and the sparsity statistics (means over layers) of one or more
    runs, one PNG, each run labelled by its directory name and preset. False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(2, 2, figsize=(13, 8))
    (ax_loss, ax_val), (ax_tps, ax_sp) = axes
    for run in runs:
        ms = [json.loads(ln) for ln in (Path(run) / "metrics.jsonl").read_text().splitlines() if ln.strip()]
        try:
            preset = json.loads((Path(run) / "config.json").read_text()).get("preset", "")
        except (OSError, ValueError):
            preset = ""
        label = f"{Path(run).name} ({preset})" if preset and preset != Path(run).name else Path(run).name
        series = {
            ax_loss: [(m["step"], m["loss"]) for m in ms if "loss" in m],
            ax_val: [(m["step"], m["val_loss"]) for m in ms if "val_loss" in m],
            ax_tps: [(m["step"], m["tokens_per_s"]) for m in ms if m.get("tokens_per_s")],
        }
        for ax, pts in series.items():
            if pts:
                ax.plot(*zip(*pts), label=label, lw=1, marker="o" if ax is ax_val else None)
        for key in sorted({k for m in ms for k in m if k.endswith("/mean")}):
            pts = [(m["step"], m[key]) for m in ms if key in m]
            ax_sp.plot(*zip(*pts), label=f"{label}: {key.removesuffix('/mean')}", lw=1)
    for ax, title in ((ax_loss, "training loss"), (ax_val, "validation loss"), (ax_tps, "tokens/s"),
                      (ax_sp, "sparsity statistics (mean over layers)")):
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.has_data():
            ax.legend(fontsize=7)
    if ax_loss.has_data():
        ax_loss.set_ylim(top=min(8.0, ax_loss.get_ylim()[1]))
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return True
