"""`elas experiment`: a named grid of training runs with one harness, one data order, one token budget.

The quality grid reproduces the papers' comparisons at a budget one GPU session can afford. Every variant uses the
same data, seed, sequence length, batch and steps; schedules that the papers tie to the run length (lr warm-up,
dense 2:4 warm-up, LORO's exact-step period) are scaled with it, so that a 10k-step recipe keeps its shape.
A variant may set method keys (`elas+act24.dense_warmup_steps=100`: absolute, not scaled), and every variant
runs once per seed (run directories `VARIANT` for seed 0, `VARIANT.seedK` for the others). With transfer data (a
dataset of other text, tokenized with the training data's tokenizer) each finished run is also evaluated on it.
Runs are resumable: a variant whose run directory holds a finished run is skipped, an interrupted one resumed (a
run directory holding a run of other settings, another --steps or --size, or an unfinished run of other data, is
refused before any run), and a run another grid process trains (its directory locked) is left to it.
"""
from __future__ import annotations

import gc
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from ..build import resolve_methods
from ..config import (LORO_DEFAULTS, VARIANTS, apply_overrides, model_preset, preset_name, size_of, split_variant,
                      to_dict, train_config, train_keys)
from ..sparsity import method_to_dict
from ..sparsity.api import sparse_end
from .checkpoint import checkpoints, write_atomic
from .trainer import (Diverged, TrainError, Trainer, TrainStopped, load_run_config, lock_run_dir, log_line,
                      read_metrics, unlock_run_dir)

QUALITY_VARIANTS = tuple(VARIANTS)  # every named variant (config.VARIANTS), with its recipe's optimizer
def grid_variants(steps: int) -> list[str]:
    """`elas experiment`'s default grid: the papers' comparisons, the third paper's variants in the configurations
    that run accelerated, and ELAS's warm-up ablation (none: elas-nowarmup; 1% of the run, as 100 steps of a 10k
    run, the middle of the quality issue's 0 / 100 / 1000; elas itself: 10%, the paper's 1000 of 10k)."""
    return ["swiglu", "relu2", "relu2-24", "relu2-24-split", "lowrank-relu2", "elas", "elas-nowarmup", "elas-mask", "relu2-w24",
            "relu2-vnm-fast", "relu2-w24-vnm-fast", f"elas+act24.dense_warmup_steps={max(1, steps // 100)}"]
PAPER_STEPS = 10_000  # the 60M recipe the schedules are written for (dense warm-up 1000 = 10%, LORO K = 500 = 5%)


def gpu_shared_by() -> int:
    """How many grid processes share this run's GPU ($ELAS_GRID_SHARED, set by benchmarks/run_gpu.sh's grid
    stage when it runs several at a time; 1 otherwise): the summary counts a shared run's wall time at that share."""
    try:
        return max(1, int(os.environ.get("ELAS_GRID_SHARED", "1")))
    except ValueError:
        return 1


def run_name(variant: str, seed: int = 0) -> str:
    return variant if seed == 0 else f"{variant}.seed{seed}"


def variant_config(size: str, variant: str, steps: int, data_dir: str, out: Path, batch_size: int, grad_accum: int,
                   seq_len: int = 256, full_rank_lr: float = 1e-3, seed: int = 0):
    model_variant, train = train_keys(variant)  # the optimizer's numerics (optim_state_dtype), set on the run
    name, sets = split_variant(model_variant)
    if name not in QUALITY_VARIANTS:
        raise ValueError(f"unknown variant {name!r}; known: {', '.join(QUALITY_VARIANTS)}")
    optimizer = VARIANTS[name].optimizer
    cfg = train_config(preset_name(size, name))
    over = {"data_dir": data_dir, "out_dir": str(out / run_name(variant, seed)), "max_steps": steps,
            "seq_len": seq_len, "batch_size": batch_size, "grad_accum": grad_accum, "seed": seed,
            "warmup_steps": max(1, steps // 10), "optimizer": optimizer, "lr": full_rank_lr,
            "eval_every": max(1, steps // 10), "save_every": max(1, steps // 4), "log_every": max(1, steps // 100),
            "model.max_seq_len": seq_len,
            # the torch ReLU^2, norm, attention and loss kernels and three q, k, v GEMMs on every machine, as the
            # grid's first runs ran them: "auto" would take the CUTLASS GEMMs where a library is found (the fused
            # norm backward, elas's attention and loss kernel on any GPU; fuse_qkv became the default later), and
            # two seeds of one variant would then differ in kernels
            "model.relu2_kernel": "torch", "model.norm_kernel": "torch", "model.attn_backend": "torch",
            "model.fuse_qkv": False, "model.ce_kernel": "torch",
            # fp32 Adam moments, as the grids' first runs had them (optim_state_dtype=auto, bf16 moments over bf16
            # parameters, became the default later); a variant's own "+optim_state_dtype=bf16" sets them
            "optim_state_dtype": "fp32", **train}
    if optimizer == "loro_adamw":
        over.update(LORO_DEFAULTS[size_of(size)])
        # (at least one step longer than the re-warm after each exact step, so the lr returns to its schedule)
        over["loro_exact_every"] = max(cfg.loro_rewarm_steps + 1, round(steps * 500 / PAPER_STEPS))
    apply_overrides(cfg, over)
    # the methods' step schedules (the dense warm-up) keep their share of the paper's run length: scaled from
    # the variant's recipe (the model preset), not from a size's training defaults
    recipe = model_preset(preset_name(size, name))
    cfg.model.methods = [method_to_dict(m.scaled(steps / PAPER_STEPS)) for m in resolve_methods(recipe)]
    if sets:  # the variant's own keys, as given (after the scaling)
        try:
            apply_overrides(cfg.model, sets)
            resolve_methods(cfg.model)
        except (KeyError, ValueError) as e:
            raise ValueError(f"variant {variant!r}: {e.args[0]}") from None
    return cfg


def _same_tokenizer(a: str, b: str) -> bool:
    ta, tb = Path(a) / "tokenizer.json", Path(b) / "tokenizer.json"
    if ta.exists() and tb.exists():
        return ta.read_bytes() == tb.read_bytes()
    return json.loads((Path(a) / "meta.json").read_text()).get("tokenizer") == \
        json.loads((Path(b) / "meta.json").read_text()).get("tokenizer")


def check_transfer_data(data_dir: str, transfer: str, seq_len: int | None = None) -> None:
    """Before any run: the transfer set must exist, share the training data's tokenizer (once the training data is
    prepared) and hold a validation window of seq_len (when given)."""
    from ..data import TokenWindows
    if not (Path(transfer) / "meta.json").exists():
        raise ValueError(f"transfer data {transfer} holds no prepared dataset (elas data prepare --out {transfer} "
                         f"--tokenizer {data_dir} ...)")
    if (Path(data_dir) / "meta.json").exists() and not _same_tokenizer(data_dir, transfer):
        raise ValueError(f"transfer data {transfer} was tokenized with another tokenizer than {data_dir}; prepare "
                         f"it with --tokenizer {data_dir}")
    if seq_len is not None:
        TokenWindows(transfer, "val", seq_len)  # its files whole and long enough, not found so after a run


# what a grid's arguments (--size, --steps, --batch-size, --grad-accum) set in a run: a run directory holding another
# run of the same name is not resumed or counted as this one
GRID_KEYS = ("preset", "max_steps", "seq_len", "batch_size", "grad_accum", "seed")


def run_tokens(cfg, world: int | None = None) -> int:
    """Training tokens of a grid run: every process's batches (torchrun: WORLD_SIZE of them take the batch each)."""
    world = world or int(os.environ.get("WORLD_SIZE", "1"))
    return cfg.max_steps * cfg.batch_size * cfg.grad_accum * cfg.seq_len * world


def other_settings(cfg, data_sha1: str | None = None) -> list[str]:
    """How the run kept in cfg.out_dir differs from cfg in the grid's settings and the model ([] where it has
    none kept, or the same): each difference as "KEY saved -> now". data_sha1 (the grid's training split): an
    unfinished run kept on other data differs too (its resume would be refused at its turn; a finished run
    counts as it is, and the summary flags runs of several datasets)."""
    run = Path(cfg.out_dir)
    kept = checkpoints(run)
    if not ((run / "summary.json").exists() or kept):
        return []  # nothing of it kept: the run starts again
    if not ((run / "config.json").is_file() or kept):  # a summary alone (results copied without the run): its row
        try:  # says the budget and seed it ran, which the grid would count as done
            row = json.loads((run / "summary.json").read_text())
            have = {"steps": row["steps"], "tokens": row["tokens"], "seed": row.get("seed", 0)}
        except (OSError, ValueError, KeyError, TypeError):
            return []
        want = {"steps": cfg.max_steps, "tokens": run_tokens(cfg), "seed": cfg.seed}
        return [f"{k} {have[k]!r} -> {want[k]!r}" for k in want if have[k] != want[k]]
    try:
        saved = load_run_config(run)  # (config.json, or where it was lost the copy in the newest checkpoint)
    except TrainError:  # no config.json and no checkpoint holding a copy: nothing to compare with
        return []
    diff = [f"{k} {getattr(saved, k)!r} -> {getattr(cfg, k)!r}" for k in GRID_KEYS
            if getattr(saved, k) != getattr(cfg, k)]
    # the global batch too: the process count (torchrun's) is in no config key, and a run of another global batch
    # trained other tokens per step and in all (the summary compares runs at equal tokens)
    was, now = _kept_global_batch(run, saved, kept), run_tokens(cfg) // (cfg.max_steps * cfg.seq_len)
    if was is not None and was != now:
        diff.append(f"global batch {was} -> {now}, which is batch_size x grad_accum x processes")
    # the model as built: a method config of an older version reads with the meaning it had (a changed default
    # makes the same variant name another model)
    old, new = _resolved_model(saved), _resolved_model(cfg)
    diff += [f"model.{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
             if old.get(k) != new.get(k) and not (k in ("relu2_kernel", "norm_kernel", "attn_backend", "ce_kernel",
                                                       "act24.cutlass")
                                                  and new.get(k) == "auto")]  # (auto: what the run resolved it to)
    if data_sha1 and kept and not (run / "summary.json").exists():
        try:  # (the data a checkpoint was trained on, as the trainer's resume checks it)
            was = json.loads((kept[0] / "trainer.json").read_text())["data"]["train_sha1"]
        except (OSError, ValueError, KeyError, TypeError):
            was = None
        if was and was != data_sha1:
            diff.append(f"data train_sha1 {was[:12]} -> {data_sha1[:12]}")
    return diff


def _kept_global_batch(run: Path, saved, kept: list[Path]) -> int | None:
    """The global batch (sequences per step) of the run kept in `run`: from its summary row's tokens (a finished
    run), else its newest checkpoint's data position (step x global batch); None where neither says it."""
    try:
        row = json.loads((run / "summary.json").read_text())
        return row["tokens"] // (row["steps"] * saved.seq_len)
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        pass
    try:
        state = json.loads((kept[0] / "trainer.json").read_text())
        return state["data_position"] // state["step"]
    except (IndexError, OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return None


def check_same_runs(cfgs: list, data_sha1: str | None = None) -> None:
    """Before any run: every run directory that already holds a run (config.json) holds it with this grid's
    settings (and an unfinished one on this grid's data, `other_settings`); otherwise the grid would skip or
    resume it as its own and mix it into the summary, or stop at it after the runs before it."""
    for cfg in cfgs:
        diff = other_settings(cfg, data_sha1)
        if diff:
            raise ValueError(f"{cfg.out_dir} holds a run with other settings ({'; '.join(diff)}); give the grid "
                             f"another --out, or the settings it was run with")


def _resolved_model(cfg) -> dict:
    """cfg.model as flat keys, each method's fields as METHOD.FIELD after its config's version upgrade."""
    flat = {k: v for k, v in to_dict(cfg.model).items() if k != "methods"}
    for m in resolve_methods(cfg.model):
        flat.update({f"{m.name}.{k}": v for k, v in method_to_dict(m).items() if k not in ("method", "version")})
    return flat


def _write_json(path: Path, obj) -> None:
    """Whole or not at all: a kill while writing leaves the previous file (or none), never half of one."""
    write_atomic(path, json.dumps(obj, indent=1).encode())


def transfer_loss(trainer: Trainer, transfer: str) -> tuple[float, int]:
    """The trained model's mean loss on the transfer set's validation split, as the trainer evaluates its own."""
    from ..data import TokenWindows
    from .parallelize import eager_regions
    from .trainer import evaluate
    cfg = trainer.cfg
    with eager_regions():
        return evaluate(trainer.fwd, TokenWindows(transfer, "val", cfg.seq_len), cfg.eval_tokens, cfg.batch_size,
                        trainer.device, trainer.autocast)


def transfer_row(trainer: Trainer, transfer: str) -> dict:
    """A summary row's transfer fields: the loss, its tokens, and the SHA-1 of the split it was taken on (rows
    from several machines or sessions are comparable only on the same text)."""
    loss, tokens = transfer_loss(trainer, transfer)
    return {"transfer_loss": loss, "transfer_tokens": tokens,
            "transfer_sha1": json.loads((Path(transfer) / "meta.json").read_text()).get("val_sha1")}


def check_param_dtypes(cfgs) -> None:
    """A variant's bf16 moments (optim_state_dtype=bf16) need bf16 parameters, which this machine may not give
    (CPU, fp32 precision): refused here, before the first run, not when that variant's turn comes."""
    from .trainer import computes_in_bf16, pick_device, resolve_param_dtype
    for cfg in cfgs:
        if cfg.optim_state_dtype != "bf16":
            continue
        device = pick_device(cfg.device)
        try:
            resolve_param_dtype(cfg, device, False, computes_in_bf16(cfg, device))
        except TrainError:
            raise ValueError(f"{Path(cfg.out_dir).name}: optim_state_dtype=bf16 needs bf16 parameters, which a grid "
                             f"run holds only on a GPU with bf16 precision (this one: {device.type}, precision "
                             f"{cfg.precision}); leave the variant out here") from None


def run_grid(size: str, variants: list[str], steps: int, data_dir: str, out: Path, batch_size: int = 256,
             grad_accum: int = 2, seeds=(0,), transfer: str | None = None, log=log_line,
             time_left: float | None = None, estimates: dict[str, float] | None = None) -> list[dict]:
    """Every variant x seed (seed-major: each seed's grid completes before the next starts).
    time_left: seconds this process may still run (a GPU machine lent for a limited call, whose checkpoints are
    lost with it): a run is started only where its estimate (the grid's own done runs, as `--plan`; times the
    processes sharing the GPU) fits in what is left; the others are left for a later call, one log line each
    and a closing line. A partial run resumes regardless, and a run with no estimate (nothing done yet) starts.
    estimates: GPU seconds by seed-0 run name for variants not done here (`scaled_estimates` of another grid),
    calibrated on the runs done here (`with_estimates`)."""
    from ..data import load_meta
    deadline = None if time_left is None else time.monotonic() + time_left
    later = []  # the runs left for a later call
    diverged = []  # the runs whose loss became NaN/inf (DIVERGED in their directory)
    busy = []  # the runs another process trains (their run directory locked): left to it
    cfgs = [(seed, v, variant_config(size, v, steps, data_dir, out, batch_size, grad_accum, seed=seed))
            for seed in seeds for v in variants]  # every bad variant or key fails here, before any run
    check_param_dtypes([cfg for _, _, cfg in cfgs])
    meta = load_meta(data_dir)
    if transfer:
        check_transfer_data(data_dir, transfer, cfgs[0][2].seq_len)
    check_same_runs([cfg for _, _, cfg in cfgs], meta.get("train_sha1"))
    out.mkdir(parents=True, exist_ok=True)
    train_tokens = meta.get("train_tokens")
    rows = []
    for seed, v, cfg in cfgs:
        run = Path(cfg.out_dir)
        done = run / "summary.json"
        name = run_name(v, seed)
        if done.exists():
            row = json.loads(done.read_text())
            note = ""
            if transfer and "transfer_loss" not in row:  # finished before transfer data was given
                if checkpoints(run):
                    trainer = Trainer(cfg, resume=True, progress=False, log=log)
                    try:
                        row.update(transfer_row(trainer, transfer))
                    finally:
                        trainer.close()
                    _write_json(done, row)
                else:  # (a folder of results copied without its checkpoints): counted without a transfer loss
                    note = "; no checkpoint kept to evaluate on the transfer data: its row has no transfer loss"
            rows.append(row)
            log(f"{name}: done before, skipped{note}")
            continue
        if diverged_before(cfg, meta.get("train_sha1")):  # resumed, it would diverge again from its checkpoint
            log(f"{name}: skipped: it diverged before ({run / DIVERGED}); a resume would diverge again from its "
                f"last checkpoint: delete {run} to train it from the start")
            diverged.append(name)
            continue
        (run / DIVERGED).unlink(missing_ok=True)  # (a record of other settings: this run starts again)
        if deadline is not None and not _checkpoint_step(run):  # (a partial run resumes: its checkpoints are at
            # risk whether it runs or not, and it gets further)
            need = _gpu_seconds_left(with_estimates(_gpu_seconds_done(out, size, run_tokens(cfg)), estimates), v, 0,
                                     steps)
            left = deadline - time.monotonic()
            if need is not None and need * gpu_shared_by() > left:
                log(f"{name}: not started: needs ~{need * gpu_shared_by():.0f} s, {max(left, 0):.0f} s left "
                    f"(--time-left); a later call runs it")
                later.append(name)
                continue
        if not _claim(run):
            log(f"{name}: skipped: another elas process trains it (its run directory is locked); the grid goes on")
            busy.append(name)
            continue
        # the previous run's model sits in reference cycles (compile_regions stores each block's compiled forward on
        # the block), with its parameters and gradients on the GPU, until a full collection: freed here
        gc.collect()
        # each run compiles its own model: dynamo's cache of the previous runs' graphs would only count towards
        # the recompile limit of the shared code objects (a hard failure under fullgraph after ~8 entries)
        torch._dynamo.reset()
        # a step bar per run where a person watches (a terminal); logs and CI get the log lines alone
        try:
            trainer = Trainer(cfg, resume="auto", progress=sys.stderr.isatty(), log=log)
        except BaseException:
            unlock_run_dir(run)
            raise
        log(f"{name}: run {len(rows) + 1} of {len(cfgs)}")
        try:
            res = trainer.fit()
            extra = {}
            if transfer:
                extra = transfer_row(trainer, transfer)
            wall = trainer.elapsed_s()  # over every process of a run cut off and resumed
        except Diverged as e:  # one variant's divergence is a result of the grid, not the end of it
            _write_json(run / DIVERGED, {"run": name, "variant": v, "seed": seed, "step": e.step,
                                         "settings": _grid_settings(cfg), "data_sha1": meta.get("train_sha1")})
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # (a process group made again for the next run in the
                raise  # same processes is not reliable under gloo: the grid stops; the next call skips this run)
            log(f"{name}: diverged: loss or weights NaN/inf by step {e.step}, nothing saved after its last "
                f"checkpoint (recorded in {run / DIVERGED}); the grid goes on")
            diverged.append(name)
            continue
        finally:
            trainer.close()
        stopped = trainer.stop_signal  # a stop signal once this run was complete: its row first, then no next run
        metrics = read_metrics(run / "metrics.jsonl")
        if "val_loss" not in res:  # finished in a process stopped before its summary.json: its last evaluation
            res = [m for m in metrics if "val_loss" in m and m["step"] == cfg.max_steps][-1]
        last = [m for m in metrics if "y2_zero_frac/mean" in m]
        tokens = cfg.max_steps * trainer.global_batch * cfg.seq_len  # (every process's: torchrun's too)
        row = {"model": size, "variant": v, "seed": seed, "run": name, "steps": cfg.max_steps, "tokens": tokens,
               "epochs": tokens / train_tokens if train_tokens else None,
               "val_loss": res["val_loss"], "val_ppl": res["val_ppl"], "wall_s": round(wall, 1),
               "gpu_shared_by": gpu_shared_by(), "device": trainer.device.type,
               "optimizer": cfg.optimizer, "lr": cfg.lr, "methods": cfg.model.methods,
               "y2_zero_frac": last[-1]["y2_zero_frac/mean"] if last else None,
               "dropped_nnz_frac": last[-1].get("dropped_nnz_frac/mean") if last else None,
               "data_sha1": meta.get("train_sha1"), "sparse_end_step": sparse_phase_end(cfg.model.methods, cfg.max_steps),
               "val_curve": {str(m["step"]): m["val_loss"] for m in metrics if "val_loss" in m}, **extra}
        _write_json(done, row)
        rows.append(row)
        log(f"{name}: val loss {row['val_loss']:.4f} (ppl {row['val_ppl']:.2f}) in {row['wall_s']:.0f} s" +
            (f", transfer loss {row['transfer_loss']:.4f}" if transfer else ""))
        if stopped is not None and cfg is not cfgs[-1][2]:  # (the signal asked the grid to stop: the same command
            # continues it, as after a run stopped mid-way)
            raise TrainStopped(stopped, cfg.max_steps, run, quiet=trainer.dist.enabled and not trainer.dist.main,
                              complete=True)
    if diverged:
        log(f"{len(diverged)} run(s) diverged, without a summary row: {', '.join(diverged)}")
    if later:
        log(f"{len(later)} run(s) not started, left for a later call (--time-left): {', '.join(later)}")
    if busy:
        log(f"{len(busy)} run(s) left to the other elas process(es) training them: {', '.join(busy)}")
    return rows


def _claim(run: Path) -> bool:
    """Lock a run's directory before its trainer is built (the trainer holds the lock as its own and releases it
    when closed); False where another process holds it: a second grid given the same run, which leaves it to
    that process rather than stopping there."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # (several processes per run: the trainer claims it for all
        return True  # of them at once, and stops all of them where it is in use)
    try:
        run.mkdir(parents=True, exist_ok=True)
        lock_run_dir(run)
    except TrainError:
        return False
    except OSError:  # (a directory it cannot write: the trainer says so, in one line)
        pass
    return True


DIVERGED = "diverged.json"  # in a run's directory: the step and settings of a run whose loss became NaN/inf


def _grid_settings(cfg) -> dict:
    return {k: getattr(cfg, k) for k in GRID_KEYS}


def diverged_runs(out: Path) -> list[dict]:
    """The records of the runs under `out` that diverged and were not trained to the end since."""
    return [json.loads(p.read_text()) for p in sorted(Path(out).glob(f"*/{DIVERGED}"))
            if not (p.parent / "summary.json").exists()]


def diverged_before(cfg, data_sha1: str | None = None) -> dict | None:
    """The record of the run in cfg.out_dir diverging (DIVERGED), where it was made with cfg's grid settings and
    data; None otherwise (a record of other settings does not stop a new run of these)."""
    try:
        d = json.loads((Path(cfg.out_dir) / DIVERGED).read_text())
    except (OSError, ValueError):
        return None
    if d.get("settings") != _grid_settings(cfg) or (data_sha1 and d.get("data_sha1") not in (None, data_sha1)):
        return None
    return d


def grid_plan(variants: list[str], seeds, out: Path, steps: int, cfg_of=None,
              estimates: dict[str, float] | None = None, size: str | None = None,
              tokens: int | None = None) -> list[dict]:
    """What a grid still has to run in `out`, without running it: per (seed, variant) its state ("done": a
    summary.json; "partial": checkpoints up to a step; "todo"; "other settings": a run kept there that the grid
    would refuse, with `differs`; "diverged": its loss became NaN/inf, recorded in DIVERGED, skipped) and the GPU seconds it is estimated to need: its own seed-0 run's GPU time where
    done (wall time over the processes that shared the GPU), else the median of the done runs', scaled by the
    steps left. cfg_of(variant, seed): the run's config as the grid would build it (for the settings check; None:
    not checked). estimates: as run_grid's, for the runs not done here. For planning calls of a time-limited GPU
    machine. size, tokens: this grid's (a run's tokens): the done runs' times are scaled to them
    (`_gpu_seconds_done`)."""
    done = _gpu_seconds_done(out)
    known = with_estimates(_gpu_seconds_done(out, size, tokens) if tokens else done, estimates)
    rows = []
    for seed in seeds:
        for v in variants:
            name = run_name(v, seed)
            run = Path(out) / name
            step = _checkpoint_step(run)
            state = "done" if name in done else "diverged" if (
                (run / DIVERGED).exists() if cfg_of is None else diverged_before(cfg_of(v, seed))) else (
                "partial" if step else "todo")
            differs = other_settings(cfg_of(v, seed)) if cfg_of is not None and state != "todo" else []
            if differs:
                state, step = "other settings", 0
            left = None if state in ("done", "diverged") else _gpu_seconds_left(known, v, step, steps)
            rows.append({"run": name, "variant": v, "seed": seed, "state": state, "step": step,
                         "gpu_s_left": left, **({"differs": differs} if differs else {})})
    return rows


def _gpu_seconds_done(out: Path, size: str | None = None, tokens: int | None = None) -> dict[str, float]:
    """GPU seconds of each finished run in `out` (its wall time over the processes that shared the GPU). With
    `tokens` (a run's of the grid asking): as estimates for that grid, each scaled by its tokens to these (a folder
    re-used with another --steps holds runs of other budgets), and runs of another `size` left out."""
    done = {}
    for p in sorted(Path(out).glob("*/summary.json")):
        try:
            r = json.loads(p.read_text())
            gpu = r["wall_s"] / (r.get("gpu_shared_by") or 1)
            if tokens is not None:
                if size is not None and r.get("model", size) != size:
                    continue
                gpu *= tokens / r["tokens"] if r.get("tokens") else 1.0
            done[p.parent.name] = gpu
        except (OSError, ValueError, KeyError, TypeError, AttributeError, ZeroDivisionError):
            continue
    return done


def done_devices(folder, size: str | None = None) -> set[str]:
    """The device types ("cuda", "cpu") the finished runs in `folder` trained on: what their times, and the
    estimates made from them, are the time of. size: only its runs, as `_gpu_seconds_done` takes them for a grid
    of that size. A summary from before "device" was recorded counts as a GPU run's."""
    kinds = set()
    for p in sorted(Path(folder).glob("*/summary.json")) if folder else ():
        try:
            d = json.loads(p.read_text())
            if not isinstance(d, dict) or not isinstance(d.get("wall_s"), (int, float)):
                continue  # (a summary the estimates skip)
            if size is not None and d.get("model", size) != size:
                continue
            kinds.add(str(d.get("device") or "cuda"))
        except (OSError, ValueError):
            continue
    return kinds


def _checkpoint_step(run: Path) -> int:
    """The step of the run's newest checkpoint (0: none)."""
    ckpts = checkpoints(run) if run.is_dir() else []
    return int(ckpts[0].name.split("-")[-1]) if ckpts else 0


def _gpu_seconds_left(done: dict[str, float], variant: str, step: int, steps: int) -> float | None:
    """A run's estimated GPU seconds from `step` on: its variant's seed-0 run where done, else the median of the
    done runs, scaled by the steps left (None: no run done to go by)."""
    base = done.get(run_name(variant, 0), statistics.median(done.values()) if done else None)
    return None if base is None else base * (1 - min(step, steps) / steps)


def scaled_estimates(other: Path, size: str, steps: int, batch_size: int, grad_accum: int,
                     seq_len: int = 256) -> dict[str, float]:
    """GPU seconds per variant, from another grid's finished runs (a smaller size's, say), scaled to a run of this
    grid: each run's GPU time (`_gpu_seconds_done`) times the ratio of its variant's training FLOPs here to there
    (FLOPs per token at each size x the run's tokens); a variant's seeds there give their longest, keyed by its
    seed-0 run name (what `_gpu_seconds_left` looks up). Fixed costs (compilation, evaluation) scale with the rest,
    and a larger model uses the GPU better: for a larger size at as many tokens or more these err long, and
    `with_estimates` calibrates them on the runs done here. Runs whose summary does not name its size, variant and
    tokens, or whose variant no longer builds, are skipped."""
    from ..summary import model_summary
    flops: dict[tuple[str, str], float] = {}

    def per_token(at: str, variant: str) -> float:  # training FLOPs per token of a variant at a size
        if (at, variant) not in flops:
            cfg = variant_config(at, variant, steps, "data", Path("."), batch_size, grad_accum, seq_len)
            flops[at, variant] = model_summary(cfg.model, seq_len)["train_flops_per_token"]
        return flops[at, variant]

    tokens_here = steps * batch_size * grad_accum * seq_len
    out: dict[str, float] = {}
    for name, gpu_s in _gpu_seconds_done(other).items():
        try:
            row = json.loads((Path(other) / name / "summary.json").read_text())
            there, variant, tokens = row["model"], row["variant"], row["tokens"]
            if not (isinstance(there, str) and isinstance(variant, str) and tokens > 0 and gpu_s > 0):
                continue
            est = gpu_s * (per_token(size, variant) * tokens_here) / (per_token(there, variant) * tokens)
        except (OSError, ValueError, KeyError, TypeError, AttributeError, ZeroDivisionError):
            continue
        key = run_name(variant, 0)
        out[key] = max(out.get(key, 0.0), est)
    return out


def with_estimates(done: dict[str, float], estimates: dict[str, float] | None) -> dict[str, float]:
    """A grid's done runs' GPU seconds (`_gpu_seconds_done`) completed by estimates for the others. Where runs of
    both kinds share a name, the estimates are first scaled by the median ratio of done to estimated time over
    those (they came from another grid: its size, its machine); a done run's own time always stands."""
    if not estimates:
        return done
    shared = [k for k in done if k in estimates and estimates[k] > 0]
    factor = statistics.median(done[k] / estimates[k] for k in shared) if shared else 1.0
    return {**{k: v * factor for k, v in estimates.items()}, **done}


def sparse_phase_end(methods: list[dict], max_steps: int) -> int | None:
    """The first step of the final dense phase of a run whose methods end their sparse phase before the run does
    (the third paper's sparse -> dense schedule, `sparse_until`); None if none does."""
    ends = [sparse_end(m["sparse_until"], max_steps) for m in methods if "sparse_until" in m]
    ends = [e for e in ends if e < max_steps]
    return min(ends) if ends else None


def _with_curve(row: dict, run: Path) -> dict:
    """A row written before rows carried their validation curve and sparse-phase end: both from the run's files."""
    if "val_curve" not in row and (run / "metrics.jsonl").exists():
        ms = read_metrics(run / "metrics.jsonl")
        row["val_curve"] = {str(m["step"]): m["val_loss"] for m in ms if "val_loss" in m}
    if "sparse_end_step" not in row and "methods" in row:
        row["sparse_end_step"] = sparse_phase_end(row["methods"], row["steps"])
    return row


def _at_or_before(curve: dict, step: int) -> tuple[int, float] | None:
    """(step, val loss) of the last validation at or before `step` in a row's val_curve."""
    done = [int(k) for k in curve if int(k) <= step]
    return (max(done), curve[str(max(done))]) if done else None


RATIOS = (("elas", "lowrank-relu2"), ("relu2-24", "relu2"), ("relu2-24-split", "relu2"),
          ("elas-mask", "lowrank-relu2"), ("elas-nowarmup", "lowrank-relu2"), ("relu2", "swiglu"),
          ("relu2-24-split", "relu2-24"), ("elas-nowarmup", "elas"))  # the papers' comparisons (a / b); the last two: the split's cost, the warm-up


def _ratio_pairs(by: dict) -> list[tuple[str, str]]:
    """The papers' comparisons, then every other variant run (keys included) against its dense twin
    (config.VARIANTS' `twin`, e.g. relu2 for the third paper's variants), and a variant with keys against its
    variant without them when that ran too (the keys' own effect: elas+act24.dense_warmup_steps=20 / elas); each
    pair once."""
    pairs = list(RATIOS)
    for v in by:
        base, sets = split_variant(v)
        twin = VARIANTS[base].twin if base in VARIANTS else None
        for other in ([twin] if twin else []) + ([base] if sets and base in by else []):
            if (v, other) not in pairs:
                pairs.append((v, other))
    return pairs


def _budget(row: dict) -> tuple:
    """A run's size, steps and tokens: the summary pairs only runs that agree on them (a grid folder re-used with
    another --steps holds runs of several budgets)."""
    return row.get("model"), row.get("steps"), row.get("tokens")


def _spread(values: list[float], fmt: str = ".4f") -> str:
    """mean, and (min-max) when there is more than one value."""
    mean = sum(values) / len(values)
    return f"{mean:{fmt}}" + (f" ({min(values):{fmt}}-{max(values):{fmt}})" if len(values) > 1 else "")


ROW_KEYS = ("variant", "steps", "tokens", "val_loss", "wall_s", "optimizer")


def grid_rows(out: Path, keys: tuple[str, ...] = ROW_KEYS) -> list[tuple[Path, dict]]:
    """(run directory, summary row) of every finished run under `out`; ValueError naming the first summary.json
    that is not a run's (a grid's own summary one level down: --out names the grid's parent, say), or lacks one
    of `keys` (what the caller reads)."""
    rows = []
    for p in sorted(Path(out).glob("*/summary.json")):
        try:
            row = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{p} cannot be read as a run's summary ({type(e).__name__}); remove it or choose "
                             f"another --out") from None
        if not isinstance(row, dict) or any(k not in row for k in keys):
            what = "a grid's summary (a list of runs)" if isinstance(row, list) else "not a run's summary"
            hint = f" (--out {p.parent}?)" if isinstance(row, list) else ""
            raise ValueError(f"{p} is {what}{hint}: --out {out} must be the folder of one grid's runs")
        rows.append((p.parent, row))
    return rows


def summarize(out: Path) -> tuple[list[dict], str]:
    """Collect every finished run under `out` into summary.json and summary.md (one line per variant: the mean
    over its seeds, with min-max); returns (rows, markdown). A ratio a / b is taken seed by seed (the same seed's
    data order and initial draw) where both have that seed at the same budget (`_budget`), its mean and min-max
    shown beside the seed spread."""
    rows = [_with_curve(row, run) for run, row in grid_rows(out)]
    order = list(QUALITY_VARIANTS)
    rank = {v: i for i, v in enumerate(order)}
    rows.sort(key=lambda r: (rank.get(split_variant(r["variant"])[0], 99), r["variant"], r.get("seed", 0)))
    by: dict[str, dict[int, dict]] = {}
    for r in rows:
        by.setdefault(r["variant"], {})[r.get("seed", 0)] = r
    has_transfer = any("transfer_loss" in r for r in rows)
    md = ["| variant | optimizer | seeds | steps | tokens | epochs | val loss | val ppl | " +
          ("transfer loss | transfer ppl | " if has_transfer else "") + "y2 zeros | non-zeros dropped by 2:4 | wall s |",
          "|---|---|---|---|---|---|---|---|" + ("---|---|" if has_transfer else "") + "---|---|---|"]
    table: dict[tuple, list[dict]] = {}  # (variant, budget) -> its rows: seeds of another budget are another row
    for v, seeds in by.items():
        for r in seeds.values():
            table.setdefault((v, _budget(r)), []).append(r)
    for (v, _), rs in table.items():
        first = rs[0]
        stat = lambda k, fmt=".3f", f=float: _spread([f(r[k]) for r in rs], fmt) \
            if all(r.get(k) is not None for r in rs) else "-"  # noqa: E731
        md.append(f"| {v} | {first['optimizer']} | {','.join(str(r.get('seed', 0)) for r in rs)} | {first['steps']} | "
                  f"{first['tokens']:,} | {stat('epochs', '.2f')} | {stat('val_loss', '.4f')} | "
                  f"{stat('val_ppl', '.2f')} | " + (f"{stat('transfer_loss', '.4f')} | "
                                                    f"{stat('transfer_loss', '.2f', math.exp)} | " if has_transfer
                                                    else "") +
                  f"{stat('y2_zero_frac')} | {stat('dropped_nnz_frac', '.4f')} | "
                  f"{sum(r['wall_s'] for r in rs):.0f} |")
    lines = []
    for a, b in _ratio_pairs(by):
        common = sorted(k for k in set(by.get(a, {})) & set(by.get(b, {})) if _budget(by[a][k]) == _budget(by[b][k]))
        if not common:
            continue
        for key, label in (("val_loss", "val loss"), ("transfer_loss", "transfer loss")):
            if not all(key in by[x][k] for x in (a, b) for k in common):
                continue
            ratios = [by[a][k][key] / by[b][k][key] for k in common]
            spread = [max(by[x][k][key] for k in common) - min(by[x][k][key] for k in common) for x in (a, b)]
            lines.append(f"- {a} / {b}: {label} ratio {_spread(ratios)} over seeds {common}" +
                         (f"; seed spread of the {label}: {a} {spread[0]:.4f}, {b} {spread[1]:.4f}"
                          if len(common) > 1 else ""))
        # where a sparse phase ended before the run did: the ratio then, against what the dense phase recovered
        end = by[a][common[0]].get("sparse_end_step")
        pts = [(_at_or_before(by[a][k].get("val_curve", {}), end), _at_or_before(by[b][k].get("val_curve", {}), end))
               for k in common] if end else []
        if pts and all(x and y and x[0] == y[0] for x, y in pts):
            lines.append(f"- {a} / {b} at the end of its sparse phase (validation at step {pts[0][0][0]}): val loss "
                         f"ratio {_spread([x[1] / y[1] for x, y in pts])} over seeds {common}")
    for d in diverged_runs(out):  # no row: their loss became NaN/inf
        lines.append(f"- **{d['run']} diverged** at step {d['step']} (loss or weights NaN/inf): no row above")
    prints = sorted({r["data_sha1"] for r in rows if r.get("data_sha1")})
    others = sorted({r["transfer_sha1"] for r in rows if r.get("transfer_sha1")})
    if len(others) > 1:
        lines.append(f"- **the transfer losses were taken on {len(others)} different transfer sets** (val.bin SHA-1 "
                     + ", ".join(p[:12] for p in others) + "): transfer ratios across them compare different text")
    if len(prints) > 1:  # runs gathered from several machines or sessions: comparable only on the same tokens
        lines.append(f"- **the runs trained on {len(prints)} different datasets** (train.bin SHA-1 " +
                     ", ".join(p[:12] for p in prints) + "): ratios across them compare different data")
    budgets = sorted({_budget(r) for r in rows}, key=lambda b: (str(b[0]), b[1] or 0, b[2] or 0))
    if len(budgets) > 1:  # runs of several grid invocations in one folder: --steps (or --size, batch) changed
        lines.append(f"- **the runs have {len(budgets)} different budgets** (" + "; ".join(
            (f"{m}: " if m else "") + f"{s} steps, {t or 0:,} tokens" for m, s, t in budgets) +
            "): ratios pair only runs of the same budget")
    total = sum(r["wall_s"] for r in rows)
    what = "CPU" if any(r.get("device") == "cpu" for r in rows) else "GPU"  # (rows before "device": GPU runs)
    shared = [r for r in rows if (r.get("gpu_shared_by") or 1) > 1]
    if shared:  # runs made n at a time on one GPU: their walls overlap, so their sum overstates the GPU time
        gpu = sum(r["wall_s"] / (r.get("gpu_shared_by") or 1) for r in rows)
        lines.append(f"- the grid's {what} time: ~{gpu / 60:.1f} min over {len(rows)} runs ({len(shared)} of them shared "
                     f"the GPU with other runs, each counted at its wall time over the number sharing; the walls sum "
                     f"to {total / 60:.1f} min; compilation and evaluation included)")
    else:
        lines.append(f"- the grid's {what} time: {total / 60:.1f} min over {len(rows)} runs (wall time of each run, "
                     f"compilation and evaluation included)")
    text = "\n".join(md + [""] + lines) + "\n"
    _write_json(out / "summary.json", rows)
    write_atomic(out / "summary.md", text.encode())
    return rows, text


def grid_curves(out: Path) -> dict[str, dict]:
    """The validation curves of a grid's finished runs (those `summarize` counts: a summary.json, which names the
    run's variant and seed) by variant: {variant: {"seeds": [seed], "mean": {step: loss}, "base": variant or None,
    "base_seeds": [seed], "ratio": {step: ratio}}}. A variant's mean is taken at the steps every seed of it
    validated at. Its base is the first variant the summary compares it with (`_ratio_pairs`: the papers' pairs,
    then the dense twin, then for a variant with keys the variant without them) among those that share a seed and
    a validation step with it; the ratio, like the summary's, pairs runs of the same seed and budget: the mean over
    the shared seeds of loss / base's loss, at the steps all those runs validated at."""
    runs: dict[str, dict[int, dict[int, float]]] = {}  # variant -> seed -> step -> val loss
    budgets: dict[str, dict[int, tuple]] = {}  # variant -> seed -> its budget (paired only within one)
    for run, row in grid_rows(out, ("variant",)):
        row = _with_curve(row, run)
        curve = {int(k): v for k, v in (row.get("val_curve") or {}).items()}
        if curve:
            runs.setdefault(row["variant"], {})[row.get("seed", 0)] = curve
            budgets.setdefault(row["variant"], {})[row.get("seed", 0)] = _budget(row)

    def common(curves: list[dict[int, float]]) -> list[int]:
        return sorted(set.intersection(*(set(c) for c in curves)))

    def paired(a: str, b: str) -> tuple[list[int], list[int]]:  # (shared seeds, steps all their runs have)
        seeds = sorted(k for k in set(runs[a]) & set(runs[b]) if budgets[a][k] == budgets[b][k])
        return seeds, common([runs[v][k] for k in seeds for v in (a, b)]) if seeds else []

    by = {v: {"seeds": sorted(seeds), "base": None, "base_seeds": [], "ratio": {},
              "mean": {s: sum(c[s] for c in seeds.values()) / len(seeds) for s in common(list(seeds.values()))}}
          for v, seeds in runs.items()}
    for variant, row in by.items():
        for a, base in _ratio_pairs(by):
            if a != variant or base not in by:
                continue
            seeds, steps = paired(variant, base)
            if steps:
                row.update(base=base, base_seeds=seeds, ratio={
                    s: sum(runs[variant][k][s] / runs[base][k][s] for k in seeds) / len(seeds) for s in steps})
                break
    return by


def plot_curves(out: Path, png: Path) -> bool:
    """The grid's validation curves, legible at twenty-odd runs: one colour per variant (seed means), the loss
    where the variants part (past the first quarter of the run) and each variant's loss over its comparison
    base's (`grid_curves`), where a sparse phase's cost and its recovery show. False without matplotlib or without
    a run that validated."""
    by = grid_curves(out)
    if not by:
        return False
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax_val, ax_ratio) = plt.subplots(1, 2, figsize=(15, 5.5))
    cmap = plt.get_cmap("tab20")
    last = max(max(r["mean"], default=0) for r in by.values())
    late = [v for r in by.values() for s, v in r["mean"].items() if s >= last / 4]
    for c, (variant, row) in enumerate(sorted(by.items())):
        colour, style = cmap(c % 20), "-" if c < 20 else "--"
        label = f"{variant} ({len(row['seeds'])} seed{'s' if len(row['seeds']) > 1 else ''})"
        ax_val.plot(*zip(*sorted(row["mean"].items())), color=colour, ls=style, lw=1.2, marker=".", label=label)
        if row["ratio"]:
            seeds = ("seeds " if len(row["base_seeds"]) > 1 else "seed ") + ",".join(map(str, row["base_seeds"]))
            ax_ratio.plot(*zip(*sorted(row["ratio"].items())), color=colour, ls=style, lw=1.2, marker=".",
                          label=f"{variant} / {row['base']} ({seeds})")
    if late:
        ax_val.set_ylim(min(late) - 0.01, max(late) + 0.01)
    ax_val.set_xlim(last / 4 * 0.9, last * 1.02)
    ax_val.set_title("validation loss (mean over seeds)")
    ratios = [v for r in by.values() for s, v in r["ratio"].items() if s >= last / 4]
    if ratios:  # (the first quarter left out: a sparse phase's first steps would flatten the rest)
        ax_ratio.set_ylim(min(0.99, min(ratios) - 0.002), max(1.01, max(ratios) + 0.002))
    ax_ratio.axhline(1.0, color="black", lw=0.8)
    ax_ratio.set_title("validation loss / its base's, seed by seed (mean over seeds)")
    for ax in (ax_val, ax_ratio):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # (the ratio panel's line at 1.0 has no label)
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return True


STAT_PANELS = (("y2_zero_frac/mean", "zeros of y2 = relu(x W_up)^2"),
               ("dropped_nnz_frac/mean", "non-zeros of y2 the method's mask drops (2:4 or V:N:M)\n"
                                         "(in dense phases: would drop)"))


def plot_stats(out: Path, png: Path) -> bool:
    """The activation statistics of a grid over training, one line per run (seeds of a variant share a colour):
    y2's zeros and the non-zeros the method's mask drops (the probe computes that mask while dense too, so the
    dense phases show what sparsity would cost). False without matplotlib or without a run that logged them."""
    runs = sorted(p for p in out.iterdir() if (p / "metrics.jsonl").exists())
    series: dict[str, list[tuple[str, dict[str, list]]]] = {}  # variant -> [(run, {key: [(step, value)]})]
    for run in runs:
        ms = read_metrics(run / "metrics.jsonl")
        pts = {k: [(m["step"], m[k]) for m in ms if k in m] for k, _ in STAT_PANELS}
        if any(pts.values()):
            series.setdefault(run.name.split(".seed")[0], []).append((run.name, pts))
    if not series:
        return False
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(STAT_PANELS), figsize=(13, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for c, (variant, seeds) in enumerate(sorted(series.items())):
        for j, (_, pts) in enumerate(seeds):
            for ax, (key, _) in zip(axes, STAT_PANELS):
                if pts[key]:
                    ax.plot(*zip(*pts[key]), color=colours[c % len(colours)], lw=1, alpha=1.0 if j == 0 else 0.5,
                            label=variant if j == 0 else None)
    for ax, (_, title) in zip(axes, STAT_PANELS):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylim(0, 1)
        if ax.has_data():
            ax.legend(fontsize=7)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return True


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
        ms = read_metrics(Path(run) / "metrics.jsonl")
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
    # the first steps' losses cut off at 8, so that the rest shows, where every run has losses below 8 (a run whose
    # losses all lie above would vanish from the panel while the legend still named it)
    lows = [min(y for _, y in line.get_xydata()) for line in ax_loss.get_lines() if len(line.get_xydata())]
    if lows and max(lows) < 8.0:
        ax_loss.set_ylim(top=min(8.0, ax_loss.get_ylim()[1]))
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return True
