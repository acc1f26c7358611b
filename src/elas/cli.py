"""`elas` command line: thin parsing around the library. User mistakes end in one line on stderr, exit 2."""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import sys
import time
from pathlib import Path

from .config import (ACT24_GRAD_MODES, COMPILE_VARIANTS, FFN_KINDS, VARIANTS, ModelConfig, act24, model_preset,
                     valid_device)


class UserError(Exception):
    """A mistake of the user's (bad value, missing file): printed as one line, no traceback."""


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=None, help="model preset, e.g. llama-60m, llama-1b-elas (see `elas model --list`)")
    p.add_argument("--ffn", choices=FFN_KINDS, default=None, help="FFN kind")
    p.add_argument("--rank", type=int, default=None, help="low-rank rank for attention/FFN linears (0 = full)")
    p.add_argument("--act-sparsity", default=None, choices=["none", "2:4"],
                   help="2:4 activation sparsity of ReLU^2 (shorthand: adds or removes the act24 method; a V:N:M "
                        "preset's vnm method stays). 2:4 on a SwiGLU preset also makes its FFN ReLU^2 (ungated, "
                        "at 1.5x the SwiGLU width rounded up to a multiple of 128, about as many parameters) unless "
                        "--ffn is given")
    p.add_argument("--grad-mode", default=None, choices=ACT24_GRAD_MODES,
                   help="gradient through the 2:4 mask (shorthand for --set model.act24.grad_mode=...)")
    p.add_argument("--d-ff", type=int, default=None, help="FFN width (default: derived from the preset)")


def apply_model_flags(cfg: ModelConfig, args: argparse.Namespace) -> None:
    """The model flags on a resolved ModelConfig, in place: --ffn/--rank/--d-ff set keys; --act-sparsity adds
    (with ffn relu2) or removes the act24 method; --grad-mode sets its gradient."""
    for key, value in (("ffn", args.ffn), ("rank", args.rank), ("d_ff", args.d_ff)):
        if value is not None:
            setattr(cfg, key, value)
    if args.act_sparsity == "none":
        cfg.methods = [m for m in cfg.methods if m["method"] != "act24"]
    elif args.act_sparsity is not None and cfg.method("act24") is None:
        cfg.methods.append(act24())
        if args.ffn is None:
            cfg.ffn = "relu2"
    if args.grad_mode is not None:
        if cfg.method("act24") is None:
            raise UserError("--grad-mode sets the gradient through 2:4 activations: add --act-sparsity 2:4 or use a "
                            "2:4 preset (e.g. llama-60m-elas)")
        cfg.method("act24")["grad_mode"] = args.grad_mode
    try:
        cfg.validate()
    except ValueError as e:
        raise UserError(str(e)) from None


def resolve_model(preset: str, args: argparse.Namespace) -> ModelConfig:
    try:
        cfg = model_preset(preset)
    except (ValueError, TypeError) as e:
        raise UserError(str(e)) from None
    apply_model_flags(cfg, args)
    return cfg


def cmd_model(args: argparse.Namespace) -> int:
    from .config import MODEL_PRESETS
    from .summary import model_summary

    if args.list:  # (the presets' names; --json as a JSON list. A flag that describes one model is refused)
        given = [f for f, v in (("--preset", args.preset), ("--ffn", args.ffn), ("--rank", args.rank),
                                ("--act-sparsity", args.act_sparsity), ("--grad-mode", args.grad_mode),
                                ("--d-ff", args.d_ff)) if v is not None]
        if given:
            raise UserError(f"--list lists the presets and takes no {', '.join(given)}: drop --list to describe "
                            f"one model")
        print(json.dumps(list(MODEL_PRESETS)) if args.json else "\n".join(MODEL_PRESETS))
        return 0
    if args.preset is not None and not args.preset.strip():
        raise UserError("invalid --preset '': give a preset name, e.g. llama-60m (all: elas model --list)")
    if args.seq_len <= 0:
        raise UserError(f"--seq-len {args.seq_len} is invalid: expected a positive number of tokens")
    cfg = resolve_model(args.preset or "llama-60m", args)
    if args.seq_len > cfg.max_seq_len:  # (its attention FLOPs would be of a length the model refuses to run)
        raise UserError(f"--seq-len {args.seq_len} exceeds the model's max_seq_len {cfg.max_seq_len}: the model "
                        f"runs no longer sequences; give at most {cfg.max_seq_len}")
    try:
        summary = model_summary(cfg, seq_len=args.seq_len)
    except (ValueError, TypeError) as e:  # a method that cannot apply to this model
        raise UserError(str(e)) from None
    info = {"preset": args.preset or "llama-60m", **summary, "config": vars(cfg)}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['preset']}: {info['params'] / 1e6:.2f}M parameters "
          f"({info['non_embedding_params'] / 1e6:.2f}M non-embedding)")
    for part, n in info["params_by_part"].items():
        print(f"  {part:<10} {n / 1e6:10.2f}M")
    methods = ", ".join(json.dumps(m) for m in cfg.methods) or "none"
    print(f"  ffn={cfg.ffn} d_ff={cfg.ffn_width} rank={cfg.rank or 'full'} methods: {methods}")
    print(f"  forward GFLOPs/token at seq {args.seq_len}: {info['fwd_flops_per_token'] / 1e9:.3f} "
          f"(on the methods' sparse paths: {info['fwd_flops_per_token_2to4'] / 1e9:.3f})")
    return 0


# ---- train ------------------------------------------------------------------------------------------------
BUILTIN_DATA = {"data/builtin-8k": (8192, 20.0), "data/builtin": (32000, 200.0)}  # dir: (vocab, MB of text)


def _load_toml(path: str) -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist") from None
    except OSError as e:  # a directory, no permission, ...
        raise UserError(f"config file {path} cannot be read ({e.strerror or e})") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"config file {path} is not valid TOML ({e})") from None


def _message(e: Exception) -> str:
    """An exception's message as one line for the user (a KeyError's str() quotes it; others' are as written)."""
    return str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)


def _resume_value(v: str) -> str:
    if v != "auto":
        raise argparse.ArgumentTypeError(f"{v!r}: expected no value or 'auto' (the run directory is --out)")
    return v


def _parse_sets(items: list[str]) -> dict:
    out = {}
    for it in items or []:
        key, eq, val = it.partition("=")
        if not eq or not key:
            raise UserError(f"--set expects key=value, got {it!r}")
        out[key.strip()] = val
    return out


def _split_global_batch(cfg, toml: dict, sets: dict) -> bool:
    """A new run on several processes (torchrun's WORLD_SIZE) keeps its preset's or recipe's global batch
    (batch_size x grad_accum sequences, the papers' 512 at full size): each process takes its share, with
    grad_accum lowered first. A batch_size or grad_accum the user gives is per process, as documented: untouched.
    -> whether the batch is a global one (none given), which torchrun would split so."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    given = {"batch_size", "grad_accum"} & (set(sets) | set(toml))
    if world <= 1 or given:
        return not given
    total = cfg.batch_size * cfg.grad_accum
    if total % world:
        raise UserError(f"the global batch of {total} sequences ({cfg.batch_size} x grad_accum {cfg.grad_accum}) "
                        f"does not split over {world} processes: give the per-process batch with --set "
                        f"batch_size=... (and grad_accum=...); the global batch is then their product x {world}")
    per = total // world
    bs = max(d for d in range(1, min(cfg.batch_size, per) + 1) if per % d == 0)
    if _rank0():
        print(f"elas: the global batch of {total} sequences split over {world} processes: batch_size {bs} x "
              f"grad_accum {per // bs} each (was {cfg.batch_size} x {cfg.grad_accum} on one)", file=sys.stderr)
    cfg.batch_size, cfg.grad_accum = bs, per // bs
    return True


def _rank0() -> bool:
    """Whether this process says what every process of a torchrun job would say alike (rank 0, or no torchrun)."""
    return os.environ.get("RANK", "0") == "0"


def resolve_train_config(args: argparse.Namespace):
    """defaults of the preset (or the recipe) < TOML file < model flags < --set < --out/--max-steps/--device/--data."""
    from .config import apply_overrides, flatten, train_config
    from .train import TrainError, load_run_config

    toml = _load_toml(args.config) if args.config else {}
    # the run directory, defaults included, before anything else: a resume must find the run it continues (a
    # recipe's runs go to runs/<recipe>: recipes of one preset, e.g. galore-60m and loro-60m, differ in the model)
    named = getattr(args, "recipe", None) or toml.get("recipe")
    sets = _parse_sets(args.set)
    for key in ("preset", "recipe"):  # (they choose the model: set after it is built they would only relabel it)
        if key in sets:
            raise UserError(f"--set {key}= cannot choose the model: use --{key} {sets[key] or 'NAME'}")
    out_dir = (args.out or sets.get("out_dir") or toml.get("out_dir") or
               f"runs/{named or args.preset or toml.get('preset') or 'llama-tiny-elas'}")
    saved = None
    try:
        from .train.checkpoint import checkpoints
        if args.resume and out_dir and ((Path(out_dir) / "config.json").is_file() or checkpoints(Path(out_dir))):
            # a resumed run keeps its own config and model (config.json, or a checkpoint's copy of it)
            cfg = load_run_config(out_dir, log=lambda m: print(m, file=sys.stderr))
            saved = copy.deepcopy(cfg.model)
            saved_train = {k: v for k, v in vars(cfg).items() if k != "model"}
            if (args.preset or toml.get("preset")) not in (None, cfg.preset):
                raise UserError(f"--preset {args.preset or toml.get('preset')} contradicts the run being resumed "
                                f"({cfg.preset}): a resumed run keeps its model; choose another --out for a new one")
            recipe = getattr(args, "recipe", None) or toml.get("recipe")
            # (a run started from a recipe resumes with it named again: config.json records NAME@VERSION)
            if recipe and recipe != (cfg.recipe or "").split("@")[0]:
                from .config import recipe_config
                if cfg.recipe or recipe_config(recipe).preset != cfg.preset:
                    raise UserError(f"--recipe {recipe} contradicts the run being resumed (recipe {cfg.recipe}, preset "
                                    f"{cfg.preset}): a resumed run keeps its config; choose another --out for a new one")
            # the TOML's settings apply on top of the run's, as --set does (its model keys must agree: below)
            apply_overrides(cfg, flatten({k: v for k, v in toml.items() if k not in ("preset", "recipe")}))
            apply_model_flags(cfg.model, args)
        else:
            # (popped whichever names the model: left in the TOML, a name the flags overrule would relabel the run)
            toml_recipe, toml_preset = toml.pop("recipe", None), toml.pop("preset", None)
            recipe = getattr(args, "recipe", None) or toml_recipe
            if recipe and (args.preset or toml_preset):
                raise UserError("--recipe names its own preset; give --recipe or --preset, not both")
            if recipe:
                from .config import recipe_config
                cfg = recipe_config(recipe)
            else:
                cfg = train_config(args.preset or toml_preset or "llama-tiny-elas")
            apply_overrides(cfg, flatten(toml))
            had = {m["method"] for m in cfg.model.methods}
            apply_model_flags(cfg.model, args)
            if {m["method"] for m in cfg.model.methods} - had:  # a method --act-sparsity added: its size's defaults
                from .config import TRAIN_DEFAULTS, size_of  # (llama-tiny's 200-step warm-up, not the 1000 of 10k)
                apply_overrides(cfg, {k: v for k, v in TRAIN_DEFAULTS.get(size_of(cfg.preset), {}).items()
                                      if k.startswith("model.") and k.count(".") == 2}, absent_methods_ok=True)
        if args.optimizer:  # the optimizer's published recipe for this size, before --set
            from .config import LORO_DEFAULTS, size_of
            apply_overrides(cfg, {"optimizer": args.optimizer})
            if args.optimizer == "loro_adamw":
                apply_overrides(cfg, dict(LORO_DEFAULTS.get(size_of(cfg.preset), {})))
        apply_overrides(cfg, _parse_sets(args.set))
        flags = {"out_dir": args.out, "max_steps": args.max_steps, "device": args.device, "data_dir": args.data,
                 "init_from": getattr(args, "init_from", None)}
        apply_overrides(cfg, {k: v for k, v in flags.items() if v is not None})
        if not cfg.out_dir:
            cfg.out_dir = out_dir
        # (a new run's batch, where no batch key is given, is the global one: --dry-run says how torchrun splits it)
        args.global_batch = saved is None and _split_global_batch(cfg, toml, _parse_sets(args.set))
        if saved is not None:  # training keys a resume changes (allowed): said, since the run is then not exact
            # (max_steps: the trainer says; parallel: ddp and fsdp resume each other's checkpoints exactly)
            # (and the bookkeeping keys: logging, evaluation's schedule and saving leave the training losses bit for
            # bit as they were; eval_tokens, what a validation loss measures, is said)
            quiet = ("out_dir", "data_dir", "device", "max_steps", "init_from", "parallel", "log_every", "eval_every",
                     "save_every", "keep_checkpoints", "async_save", "tensorboard")
            if saved_train.get("optimizer", cfg.optimizer) != cfg.optimizer:  # (the trainer refuses it too)
                raise UserError(f"{cfg.out_dir} was trained with optimizer={saved_train['optimizer']}, this run asks "
                                f"for {cfg.optimizer}: a resumed run keeps its optimizer; start a new run (another "
                                f"--out) for {cfg.optimizer}")
            moved = [f"{k} {saved_train[k]!r} -> {v!r}" for k, v in vars(cfg).items()
                     if k != "model" and k not in quiet and k in saved_train and saved_train[k] != v
                     and not (k == "optim_state_dtype" and v == "auto")]  # (auto keeps a checkpoint's moments)
            per_process = {"batch_size", "grad_accum"}
            if not _rank0():
                pass  # (torchrun: rank 0 says it once)
            elif moved and {m.split()[0] for m in moved} <= per_process:  # another split of the same global batch?
                print(f"elas: resuming with {'; '.join(moved)}: the same run where batch_size x grad_accum x "
                      f"processes is what it was (the losses then differ in the last bits), another run otherwise",
                      file=sys.stderr)
            elif moved:
                seed = " (a new seed also reorders the data)" if any(m.startswith("seed ") for m in moved) else ""
                print(f"elas: warning: resuming with changed settings ({'; '.join(moved)}): from the resumed step on "
                      f"the run differs from an uninterrupted one{seed}", file=sys.stderr)
        if saved is not None and cfg.model != saved:
            from .config import KERNEL_KEYS
            from .sparsity import kernel_field_changes, method_changes
            changed = [k for k in vars(saved) if getattr(saved, k) != getattr(cfg.model, k)]
            diff = [f"model.{k}: {getattr(saved, k)!r} -> {getattr(cfg.model, k)!r}" for k in changed
                    if k != "methods"]
            in_methods = kernel_field_changes(saved.methods, cfg.model.methods) if "methods" in changed else []
            if any(k not in KERNEL_KEYS and k != "methods" for k in changed) or in_methods is None:
                if in_methods is None:  # the fields that changed, not the whole lists
                    diff += [c for c, _ in method_changes(saved.methods, cfg.model.methods)]
                raise UserError(f"these flags contradict the run being resumed ({'; '.join(diff)}): a resumed run "
                                f"keeps its model; choose another --out for a new one")
            diff += in_methods
            if _rank0():
                print(f"elas: warning: resuming with other kernels ({'; '.join(diff)}): the model is the same, "
                      f"its losses may differ from an uninterrupted run's in the last bits", file=sys.stderr)
        cfg.validate()
        builtin = BUILTIN_DATA.get(os.path.normpath(os.path.relpath(Path(cfg.data_dir).absolute())))
        if builtin and not (Path(cfg.data_dir) / "meta.json").exists() and builtin[0] > cfg.model.vocab_size:
            fits = [k for k, (v, _) in BUILTIN_DATA.items() if v <= cfg.model.vocab_size]  # (as elas experiment)
            raise UserError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the {builtin[0]}-token "
                            f"vocabulary {cfg.data_dir} would be prepared with: " +
                            (f"use --data {fits[0]}" if fits else "prepare a dataset with a smaller --vocab-size"))
        # everything a run needs that costs nothing to check, before any data is prepared
        from .build import build_model
        from .train.trainer import check_fits, computes_in_bf16, pick_device, resolve_param_dtype
        device = pick_device(cfg.device)
        param_dtype = resolve_param_dtype(cfg, device, int(os.environ.get("WORLD_SIZE", "1")) > 1,
                                          computes_in_bf16(cfg, device), resume_from=cfg.out_dir if args.resume else None)
        try:
            check_fits(cfg, device, param_dtype)
        except TrainError as e:
            if not args.dry_run:
                raise
            # (a dry run plans a run, often on another machine than the one it will train on: said, not refused)
            print(f"elas: warning: on this machine ({device.type}) {e}", file=sys.stderr)
        meta_model = build_model(cfg.model, "meta")  # the methods' keys, and whether they apply to this model
        from .build import resolve_methods
        methods = resolve_methods(cfg.model)
        for m in methods:  # (as the trainer checks it, but before data is prepared, and in
            m.check_run(cfg.max_steps, cfg.batch_size * cfg.seq_len)  # --dry-run)
            m.check_with(methods)
        from .model.lowrank import LowRankLinear
        if cfg.optimizer == "loro_adamw" and not any(isinstance(m, LowRankLinear) for m in meta_model.modules()):
            raise UserError(f"optimizer=loro_adamw needs a low-rank model and this one has no low-rank linear "
                            f"(model.rank={cfg.model.rank}): set a rank, e.g. --rank 128, or --optimizer adamw")
        if cfg.init_from and not (saved is not None and args.resume):
            from .export import check_init_from
            check_init_from(meta_model, cfg.model, Path(cfg.init_from))
    except (KeyError, ValueError, TypeError, TrainError) as e:
        raise UserError(_message(e)) from None
    return cfg


def ensure_builtin_data(cfg) -> None:
    """The default datasets are prepared on first use (rank 0 prepares, other ranks wait for it)."""
    import os
    import time

    from .data import DataError, prepare
    d = Path(cfg.data_dir)
    # data/builtin-8k however it is spelled (./data/builtin-8k, its absolute path from here)
    key = os.path.normpath(os.path.relpath(d.absolute()))
    if key not in BUILTIN_DATA or (d / "meta.json").exists():
        return
    if int(os.environ.get("RANK", "0")) != 0:
        for _ in range(1200):
            if (d / "meta.json").exists():
                return
            time.sleep(0.5)
        raise UserError(f"timed out waiting for rank 0 to prepare {d}")
    vocab, mb = BUILTIN_DATA[key]
    print(f"elas: preparing the built-in corpus in {d} (one time) ...", flush=True)
    try:
        prepare(d, source="builtin", vocab_size=vocab, max_mb=mb)
    except DataError as e:
        raise UserError(str(e)) from None


def cmd_plot(args: argparse.Namespace) -> int:
    from .train.experiment import plot_runs
    runs = [Path(r) for r in args.runs]
    bad = [str(r) for r in runs if not (r / "metrics.jsonl").is_file()]
    if bad:
        raise UserError(f"not a run directory (no metrics.jsonl): {', '.join(bad)}")
    out = Path(args.out)
    blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:  # (matplotlib would say "[Errno 17] File exists")
        raise UserError(f"--out {args.out}: {blocker} is a file, not a directory")
    try:
        if not plot_runs(runs, out):
            raise UserError("elas plot needs matplotlib: pip install 'elas[plot]'")
    except (ValueError, OSError) as e:  # an image format matplotlib does not write, a folder it cannot
        raise UserError(f"--out {args.out}: {e}") from None
    print(f"wrote {args.out}")
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from .config import load_recipe, recipe_names
    recipes = [(name, load_recipe(name)) for name in recipe_names()]
    w = max(len(n) for n, _ in recipes)  # columns as wide as the longest name and preset
    wp = max(len(r["preset"]) for _, r in recipes)
    for name, r in recipes:
        print(f"{name:<{w}}  v{r['version']}  {r['preset']:<{wp}}  {r['about']}")
    return 0


def dry_run(cfg, global_batch: bool = False) -> None:
    """What a run would do: its model, optimizer, batch and token budget (no data, no model weights).
    global_batch: the batch is the preset's or recipe's global one (no batch key given), which torchrun splits
    over its processes instead of multiplying it."""
    from .summary import model_summary
    d = Path(cfg.data_dir)
    if not (d / "meta.json").is_file():
        builtin = os.path.normpath(os.path.relpath(d.absolute())) in BUILTIN_DATA  # (as ensure_builtin_data)
        print(f"elas: note: {cfg.data_dir} holds no prepared dataset yet (no meta.json); the run would " +
              ("prepare the built-in corpus there first" if builtin else
               "stop there: prepare it first with `elas data prepare`"), file=sys.stderr)
    info = model_summary(cfg.model, cfg.seq_len)
    batch = cfg.batch_size * cfg.grad_accum
    moments = cfg.optim_state_dtype
    if moments == "auto":  # as the trainer resolves it: bf16 over bf16 parameters (so: on this machine)
        from .train.trainer import computes_in_bf16, pick_device, resolve_param_dtype
        device = pick_device(cfg.device)
        moments = resolve_param_dtype(cfg, device, int(os.environ.get("WORLD_SIZE", "1")) > 1,
                                      computes_in_bf16(cfg, device))
        moments += f" Adam moments (optim_state_dtype=auto, as on this machine's {device.type})"
    else:
        moments += " Adam moments"
    print(f"recipe {cfg.recipe or '(none)'} | preset {cfg.preset} | {info['params'] / 1e6:.2f}M parameters")
    print(f"optimizer {cfg.optimizer}, lr {cfg.lr:g}, warm-up {cfg.warmup_steps} steps, cosine to "
          f"{cfg.min_lr_ratio:g} x lr, weight decay {cfg.weight_decay:g}, grad clip {cfg.grad_clip:g}, {moments}")
    world = int(os.environ.get("WORLD_SIZE", "1"))  # (torchrun's, where the dry run is started under it)
    tokens = _count(batch * cfg.seq_len * cfg.max_steps)
    if world > 1:
        print(f"batch {batch} x {cfg.seq_len} tokens per step per process ({cfg.batch_size} x {cfg.grad_accum} "
              f"accumulated), {cfg.max_steps:,} steps x {world} processes: "
              f"{_count(world * batch * cfg.seq_len * cfg.max_steps)} tokens")
    elif global_batch:
        print(f"batch {batch} x {cfg.seq_len} tokens per step ({cfg.batch_size} x {cfg.grad_accum} accumulated), "
              f"{cfg.max_steps:,} steps: {tokens} tokens (under torchrun this global batch is split over the "
              f"processes; --set batch_size=... makes it per process)")
    else:
        print(f"batch {batch} x {cfg.seq_len} tokens per step per process ({cfg.batch_size} x {cfg.grad_accum} "
              f"accumulated), {cfg.max_steps:,} steps: {tokens} tokens (x the number of processes)")
    from .build import resolve_methods
    from .config import to_dict
    from .sparsity import method_to_dict
    cfg = copy.deepcopy(cfg)  # every method field parsed and given, as the run's config.json records them
    cfg.model.methods = [method_to_dict(m) for m in resolve_methods(cfg.model)]
    for m in cfg.model.methods:
        print("method " + json.dumps(m))
    print("config " + json.dumps(to_dict(cfg)))


def cmd_train(args: argparse.Namespace) -> int:
    from .train import Trainer, TrainError
    from .train.trainer import TrainStopped
    cfg = resolve_train_config(args)
    if args.dry_run:
        dry_run(cfg, getattr(args, "global_batch", False))
        return 0
    ensure_builtin_data(cfg)
    try:
        trainer = Trainer(cfg, resume=args.resume, progress=not args.no_progress)
        clean = False
        try:
            res = trainer.fit()
        finally:
            clean = trainer.close()
    except TrainStopped as e:  # not an error: the run is saved and resumable
        if not e.quiet:
            print(f"elas: {e}", file=sys.stderr)
        return 128 + e.signum
    except TrainError as e:
        if getattr(e, "quiet", False):  # every process of the run stops with it; rank 0 says it
            return 2
        raise UserError(str(e)) from None
    if trainer.dist.main and trainer.stop_signal is not None:  # (the trainer's: a stop signal after the last step)
        print(f"elas: signal {trainer.stop_signal} came during or after the run's last step: the run is complete "
              f"and saved, nothing to stop or resume", file=sys.stderr)
    if trainer.dist.main and "val_ppl" in res:
        uni = trainer.meta.get("unigram_val_ppl")
        print(f"elas: done at step {res['step']}: validation perplexity {res['val_ppl']:.2f} "
              f"(loss {res['val_loss']:.4f})" + (f"; unigram baseline {uni:.2f}" if uni else "")
              + f"; run saved in {trainer.run_dir}")
    if trainer.dist.enabled or not clean:
        # a torchrun worker whose run is complete: every file is closed and the process group is down (or stuck, see
        # shutdown). The interpreter's exit has nothing left to save, and with gloo it has been seen to hang on the
        # backend's threads (after "run saved", in 1 of ~60 runs of 4 processes on 2 busy cores), so skip it
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


# ---- data / eval / generate ---------------------------------------------------------------------------------
def cmd_data_prepare(args: argparse.Namespace) -> int:
    from .data import DataError, prepare
    if args.max_mb is not None and not math.isfinite(args.max_mb):  # (a negative cap: prepare says; none given:
        # 200 MB, or with --max-tokens until they are written)
        raise UserError(f"--max-mb {args.max_mb} is invalid: expected a finite number of MB >= 0 (0: no cap)")
    # an option of another source would be ignored, and the wrong text tokenized (minutes of work)
    if args.hf_split is not None and args.source != "hf":
        raise UserError(f"--hf-split {args.hf_split} is for --source hf, not --source {args.source}: add --source hf "
                        f"or leave it out")
    if args.text_field is not None and args.source not in ("files", "hf"):
        raise UserError(f"--text-field {args.text_field} is for --source files (.jsonl) or hf, not --source "
                        f"{args.source}")
    try:
        prepare(args.out, source=args.source, files=args.files, hf=args.hf, hf_config=args.hf_config,
                hf_split="train" if args.hf_split is None else args.hf_split,
                text_field="text" if args.text_field is None else args.text_field, tokenizer=args.tokenizer,
                vocab_size=args.vocab_size, max_mb=args.max_mb, max_tokens=args.max_tokens,
                val_frac=args.val_frac, force=args.force)
    except (DataError, ValueError) as e:
        raise UserError(str(e)) from None
    return 0


def _checkpoint_arg(args: argparse.Namespace) -> Path | None:
    """--checkpoint as given (a directory), or a checkpoint's name in the run (`step-00000200`); None without it.
    A name that is neither is a one-line error listing the run's checkpoints."""
    if not args.checkpoint:
        return None
    given = Path(args.checkpoint)
    if given.is_dir():
        return given
    inrun = Path(args.run) / "checkpoints" / args.checkpoint
    if inrun.is_dir():
        return inrun
    have = sorted(p.name for p in (Path(args.run) / "checkpoints").glob("step-*") if p.is_dir())
    raise UserError(f"--checkpoint {args.checkpoint}: no such directory, nor a checkpoint of {args.run} ("
                    + (", ".join(have) if have else "it has none") + ")")


def _load_run(args: argparse.Namespace):
    """(config, model on device, checkpoint path) of a run directory."""
    import torch

    from .build import build_model, kernels_for_here
    from .train import CheckpointError, TrainError, load_checkpoint, load_run_config, newest_verified
    from .train.checkpoint import checkpoints
    from .train.trainer import pick_device
    if not valid_device(args.device):
        raise UserError(f"invalid --device {args.device!r}: expected auto, cpu, cuda or cuda:N")
    try:
        cfg = load_run_config(args.run)
        ckpt = _checkpoint_arg(args) or newest_verified(Path(args.run))
        if ckpt is None:
            damaged = sorted(p.name for p in (Path(args.run) / "checkpoints").glob("step-*") if p.is_dir())
            raise TrainError(f"{args.run} has no checkpoint that verifies" + (
                f" (damaged or incomplete: {', '.join(damaged)}; --checkpoint DIR loads one anyway)" if damaged
                else " yet"))
        if not args.checkpoint:  # newer checkpoints that do not verify were passed over: say so
            found = checkpoints(Path(args.run))
            skipped = [c.name for c in found[:found.index(ckpt)]] if ckpt in found else []
            if skipped:
                print(f"elas: warning: newer checkpoints of {args.run} do not verify (damaged or incomplete: "
                      f"{', '.join(skipped)}); using {ckpt.name}", file=sys.stderr)
        device = pick_device(args.device)
        torch.manual_seed(0)
        model = build_model(kernels_for_here(cfg.model, device), device)
        load_checkpoint(ckpt, model)
    except (TrainError, CheckpointError, ValueError, TypeError, OSError) as e:
        raise UserError(str(e)) from None
    from .sparsity import set_step
    state = json.loads((ckpt / "trainer.json").read_text())
    # the model as its last step trained it (and as the run evaluated it at that checkpoint): step N's weights
    # come from step N-1, whose modes may differ from step N's (the first sparse step, the final dense phase). Those
    # modes are of the run length the checkpoint was trained towards (its config copy): a resume that changed
    # max_steps rewrote config.json, and a sparse phase given as a fraction of the run moved with it
    saved = (state.get("config") or {}).get("max_steps")
    max_steps = saved if isinstance(saved, int) and not isinstance(saved, bool) and saved > 0 else cfg.max_steps
    set_step(model, max(state["step"] - 1, 0), max_steps)
    return cfg, model, ckpt, device


def cmd_eval(args: argparse.Namespace) -> int:
    from contextlib import nullcontext

    import torch

    from .data import DataError, TokenWindows, load_meta
    from .train import evaluate
    from .train import TrainError, load_run_config
    if args.tokens is not None and args.tokens <= 0:
        raise UserError(f"--tokens {args.tokens} is invalid: expected a positive number of validation tokens")
    if not valid_device(args.device):
        raise UserError(f"invalid --device {args.device!r}: expected auto, cpu, cuda or cuda:N")
    try:  # (the run's config alone: the data is checked before the checkpoint is verified and loaded)
        cfg = load_run_config(args.run)
    except (TrainError, OSError) as e:
        raise UserError(str(e)) from None
    data = args.data or cfg.data_dir
    try:
        meta = load_meta(data)
        if meta["vocab_size"] > cfg.model.vocab_size:
            raise UserError(f"dataset {data} has vocab {meta['vocab_size']} but the model has {cfg.model.vocab_size}")
        from .train.trainer import run_tokenizer
        own, other = run_tokenizer(args.run, cfg), Path(data) / "tokenizer.json"
        if own.is_file() and own.read_bytes() != other.read_bytes():  # its perplexity would mean nothing
            raise UserError(f"dataset {data} was tokenized with another tokenizer than the run's data "
                            f"{cfg.data_dir}; prepare it with --tokenizer {cfg.data_dir}")
        win = TokenWindows(data, "val", cfg.seq_len)
    except DataError as e:
        raise UserError(str(e)) from None
    cfg, model, ckpt, device = _load_run(args)
    bf16 = device.type == "cuda"
    ac = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else nullcontext
    loss, n = evaluate(model, win, args.tokens or cfg.eval_tokens, cfg.batch_size, device, ac)
    from .sparsity import applied_methods, non_causal
    for name in non_causal(model):
        print(f"elas: warning: {name} is in a sparse mode that is not causal: this loss depends on later tokens and "
              f"on the batch (batch_size={cfg.batch_size})", file=sys.stderr)
    modes = {a.config.name: str(a.mode) for a in applied_methods(model)}  # the forward evaluated: sparse or dense
    res = {"checkpoint": str(ckpt), "data": str(data), "val_loss": loss, "val_ppl": math.exp(loss), "tokens": n,
           "unigram_val_ppl": meta.get("unigram_val_ppl"), "modes": modes}
    print(json.dumps(res) if args.json else f"{ckpt}: validation loss {loss:.4f}, perplexity {math.exp(loss):.2f} "
          f"on {n:,} tokens of {data} (unigram baseline {meta.get('unigram_val_ppl', float('nan')):.2f})"
          + ("; forward: " + ", ".join(f"{k} {v}" for k, v in modes.items()) if modes else ""))
    return 0


def cmd_checkpoint_consolidate(args: argparse.Namespace) -> int:
    from .train import CheckpointError, newest_verified
    from .train.checkpoint import consolidate, verify_checkpoint
    if not args.checkpoint and not Path(args.run).is_dir():
        raise UserError(f"{args.run} is not a run directory (no such folder)")
    ckpt = _checkpoint_arg(args) or newest_verified(Path(args.run))
    if ckpt is None or not ckpt.is_dir():
        raise UserError(f"{args.checkpoint or args.run} holds no checkpoint that verifies")
    why = verify_checkpoint(ckpt)
    if why is not None:
        raise UserError(f"checkpoint {ckpt} is damaged: {why}")
    try:
        out = consolidate(ckpt)
    except CheckpointError as e:
        raise UserError(str(e)) from None
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_hf
    try:  # (before the checkpoint is loaded and its factors merged: minutes and tens of GB at 7B)
        __import__("transformers")
    except ImportError:
        raise UserError("elas export needs transformers: pip install 'elas[hf]'") from None
    out = Path(args.to)
    if out.exists() and not out.is_dir():
        raise UserError(f"--to {out} is not a directory; choose another --to")
    run = Path(args.run).resolve()
    if out.resolve() == run or run in out.resolve().parents:  # (--force there would overwrite the run's config.json)
        raise UserError(f"--to {out} is inside the run directory {args.run}: choose a folder outside it")
    if out.exists() and any(out.iterdir()) and not args.force:
        raise UserError(f"{out} exists and is not empty; pass --force to overwrite it or choose another --to")
    args.device = "cpu"
    cfg, model, _, _ = _load_run(args)
    try:
        from .train.trainer import run_tokenizer
        export_hf(model, cfg.model, run_tokenizer(args.run, cfg), out)
    except (RuntimeError, OSError) as e:
        raise UserError(str(e).splitlines()[0]) from None
    return 0


def _count(n: float) -> str:
    """1234567 -> '1.23M' (K, M, B: a token budget readable at every size)."""
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .data.tokenizer import eot_id, load_tokenizer
    from .model.generate import sample
    from .model.generate import MIN_TEMPERATURE
    for name, value, lo in (("--max-new-tokens", args.max_new_tokens, 0), ("--temperature", args.temperature, 0),
                            ("--top-k", args.top_k, 0)):
        if not value >= lo:  # (NaN too)
            raise UserError(f"{name} {value} is invalid: expected >= {lo}")
    if not (args.temperature == 0 or MIN_TEMPERATURE <= args.temperature < math.inf):
        raise UserError(f"--temperature {args.temperature} is invalid: expected 0 (greedy) or a finite value >= "
                        f"{MIN_TEMPERATURE:g}")
    if not -2 ** 63 <= args.seed < 2 ** 64:  # (torch.Generator's range)
        raise UserError(f"--seed {args.seed} is invalid: expected an integer in [-2^63, 2^64)")
    from .train import TrainError, load_run_config
    if not valid_device(args.device):
        raise UserError(f"invalid --device {args.device!r}: expected auto, cpu, cuda or cuda:N")
    try:  # the tokenizer before the checkpoint is verified and loaded (minutes for a large model)
        from .train.trainer import run_tokenizer
        tok = load_tokenizer(str(run_tokenizer(args.run, load_run_config(args.run))))
        eot_id(tok)
    except (TrainError, ValueError, OSError) as e:
        raise UserError(str(e)) from None
    cfg, model, _, device = _load_run(args)
    from .sparsity import non_causal
    for name in non_causal(model):
        print(f"elas: warning: {name} is in a sparse mode that is not causal: the model trained on blocks of tokens "
              f"sharing their kept features; generating a token at a time computes another function",
              file=sys.stderr)
    ids = tok.encode(args.prompt).ids
    if ids[-1:] == [eot_id(tok)] and len(ids) > 1:  # (a post-processor's appended end-of-text: the prompt goes on)
        ids = ids[:-1]
    ids = ids or [eot_id(tok)]
    ctx = cfg.model.max_seq_len
    if len(ids) + args.max_new_tokens > ctx:  # past it the KV cache cannot serve: each token re-runs the window
        print(f"elas: warning: {len(ids)} prompt + {args.max_new_tokens} new tokens exceed the model's context "
              f"({ctx}): each token past it re-runs the last {ctx} tokens without a cache, ~{ctx}x slower",
              file=sys.stderr)
    g = torch.Generator(device=device).manual_seed(args.seed)
    graph = device.type == "cuda" and args.decode != "eager"  # a token = one replay, not ~10 launches per layer
    # on a terminal the text is printed as it grows (each token's decoded suffix; held back while it ends inside a
    # multi-byte character), elsewhere once at the end
    stream = sys.stdout.isatty()
    shown, so_far = "", list(ids)

    def show(token: int) -> None:
        nonlocal shown
        so_far.append(token)
        text = tok.decode(so_far)
        if text.startswith(shown) and not text.endswith("\ufffd"):
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text

    if stream:
        show_prompt = tok.decode(ids)
        sys.stdout.write(show_prompt)
        sys.stdout.flush()
        shown = show_prompt
    out = sample(model, torch.tensor([ids], device=device), args.max_new_tokens, args.temperature, args.top_k,
                 stop_token=eot_id(tok), generator=g, graph=graph, compile_decode=graph and args.decode == "compiled",
                 on_token=show if stream else None, vocab_limit=tok.get_vocab_size())
    text = tok.decode(out[0].tolist())
    print(text[len(shown):] if text.startswith(shown) else "\n" + text)
    return 0


def _choices(text: str | None, valid: tuple, flag: str) -> list[str]:
    """A comma-separated subset of `valid` (all of it when text is empty)."""
    picked = text.split(",") if text else list(valid)
    bad = [v for v in picked if v not in valid]
    if bad:
        raise UserError(f"invalid {flag} value {bad[0]!r}: expected a comma-separated subset of {', '.join(valid)}")
    return picked


def _variant_names(variants: list[str]) -> str:
    """The variants' names, comma-separated ("elas+act24.fused=true" -> "elas"), for _choices; a malformed option
    (no KEY=VALUE, a key given twice) is a UserError naming the variant."""
    from .config import split_variant
    names = []
    for v in variants:
        try:
            names.append(split_variant(v)[0])
        except ValueError as e:
            raise UserError(f"invalid --variants value {v!r}: {e}") from None
    return ",".join(names)


# the options each `elas bench` reads (dest names); another one given would be ignored, and is refused
BENCH_OPTIONS = {
    "gemm": {"m"}, "sparsify": {"m"}, "epilogue": {"m"}, "sste": set(), "loss": set(),
    "infer": {"sizes", "variants"},
    "ffn": {"sizes", "variants", "batch_scale"}, "compile": {"sizes", "variants", "batch_scale"},
    "step": {"sizes", "variants", "batches", "optimizer", "modes", "no_profile", "activation_checkpointing"},
    "loro": {"sizes", "solvers", "grad_rank"},
    "report": {"doc", "results"},
}
BENCH_DEFAULTS = {"doc": "docs/performance.md", "results": "benchmarks/results", "optimizer": "adamw"}
# every GPU kind a result folder is named after (benchmarks/results/<gpu>/): the model's token in the device name
GPU_FOLDER = re.compile(r"\b([ABHL]\d{2,3}S?|GB?\d{3}|B\d{3})\b", re.IGNORECASE)


def gpu_folder(device_name: str) -> str:
    """The results folder of a GPU: "NVIDIA H100 80GB HBM3" -> "h100", "NVIDIA A100-SXM4-80GB" -> "a100"."""
    m = GPU_FOLDER.search(device_name)
    if m is None:
        raise UserError(f"cannot name a results folder after the GPU {device_name!r}: give one with --gpu-name "
                        f"(e.g. --gpu-name h100)")
    return m.group(1).lower()


def _bench_options(args: argparse.Namespace) -> None:
    """Refuse an option the chosen benchmark does not read (it would be silently ignored), then fill in the
    defaults of those it does."""
    for dest, flag in (("sizes", "--sizes"), ("variants", "--variants"), ("batches", "--batches"),
                       ("optimizer", "--optimizer"), ("modes", "--modes"), ("no_profile", "--no-profile"),
                       ("activation_checkpointing", "--activation-checkpointing"), ("solvers", "--solvers"),
                       ("grad_rank", "--grad-rank"), ("m", "--m"), ("doc", "--doc"), ("results", "--results"),
                       ("out", "--out"), ("gpu_name", "--gpu-name"), ("batch_scale", "--batch-scale")):
        value = getattr(args, dest)
        given = value != 1.0 if dest == "batch_scale" else value not in (None, False)
        used = BENCH_OPTIONS[args.what] | ({"out", "gpu_name"} if args.what != "report" else set())
        if given and dest not in used:
            users = [w for w in BENCH_OPTIONS if dest in BENCH_OPTIONS[w] or (dest in ("out", "gpu_name")
                                                                              and w != "report")]
            shown = f"{value:g}" if dest == "batch_scale" else "" if value is True else str(value)
            raise UserError(f"{flag}{' ' + shown if shown else ''} applies to bench {', '.join(users)}, not "
                            f"{args.what}" + (": give the batch with --batches" if dest == "batch_scale"
                                               and args.what == "step" else ""))
    for dest, default in BENCH_DEFAULTS.items():
        if getattr(args, dest) is None:
            setattr(args, dest, default)


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from .bench import kernels as kb
    _bench_options(args)
    if not (args.batch_scale > 0 and math.isfinite(args.batch_scale)):
        raise UserError(f"invalid --batch-scale {args.batch_scale:g}: expected a positive factor")
    if args.what == "compile" and int(32 * args.batch_scale) < 1:
        raise UserError(f"--batch-scale {args.batch_scale:g} leaves bench compile's batch of 32 no sequence")
    if args.what == "ffn":
        from .bench.ffn import BATCH
        if int(min(BATCH.values()) * args.batch_scale) < 1:
            raise UserError(f"--batch-scale {args.batch_scale:g} leaves bench ffn's batch of {min(BATCH.values())} "
                            f"no sequence")
    if args.what == "report":
        from .bench.report import update_doc
        try:
            changed = update_doc(Path(args.doc), Path(args.results))
        except (OSError, ValueError) as e:
            raise UserError(str(e)) from None
        print(f"updated {args.doc}" if changed else f"{args.doc} is up to date with {args.results}")
        return 0
    if args.what == "infer":  # names checked before anything runs
        from .bench.infer import INFER_VARIANTS
        infer_variants = _choices(args.variants, tuple(VARIANTS), "--variants") if args.variants \
            else list(INFER_VARIANTS)
    if args.what == "step":
        from .bench.step import MODES, STEP_VARIANTS
        step_variants = args.variants.split(",") if args.variants else list(STEP_VARIANTS)
        if args.optimizer == "loro_adamw" and not args.variants:  # LORO trains low-rank factors only
            from .bench.step import step_config
            step_variants = [v for v in step_variants if step_config("llama-60m", v, "elas", 256).rank]
        _choices(_variant_names(step_variants), (*VARIANTS, "swiglu-aligned"), "--variants")
        step_modes = _choices(args.modes, MODES, "--modes")
        try:
            batches = [int(b) for b in (args.batches or "32").split(",")]
            assert all(b > 0 for b in batches)
        except (ValueError, AssertionError):
            raise UserError(f"invalid --batches {args.batches!r}: expected positive integers, e.g. 32,64") from None
        from .bench.step import step_config
        from .config import MODEL_PRESETS
        sizes_known = tuple(n for n in MODEL_PRESETS if "-" not in n.removeprefix("llama-"))  # llama-60m, not -elas
        for size in _choices(args.sizes or "llama-1b", sizes_known, "--sizes"):  # and keys, before any GPU work
            for v in step_variants:
                try:
                    for mode in step_modes:
                        cfg = step_config(size, v, mode, 256)
                except (ValueError, KeyError) as e:
                    raise UserError(f"invalid --variants value {v!r} at {size}: {e}") from None
                if args.optimizer == "loro_adamw" and not cfg.rank:
                    raise UserError(f"--optimizer loro_adamw needs low-rank variants; {v} is full-rank: give "
                                    f"--variants among the low-rank ones (e.g. lowrank-relu2,elas,elas-mask)")
    if args.what == "ffn" and args.variants:
        from .bench.ffn import variant_config
        _choices(_variant_names(args.variants.split(",")), tuple(VARIANTS), "--variants")
        for v in args.variants.split(","):  # keys checked too, before anything runs
            try:
                variant_config("llama-60m", v)
            except ValueError as e:
                raise UserError(f"invalid --variants value {v!r}: {e}") from None
    if args.what in ("ffn", "infer", "loro", "compile") and args.sizes:  # (step: above)
        from .bench.ffn import BATCH
        from .config import SIZES
        picked = _choices(args.sizes, tuple(BATCH) if args.what == "ffn" else tuple(SIZES), "--sizes")
        if args.what == "compile" and len(picked) > 1:
            raise UserError(f"invalid --sizes {args.sizes!r}: bench compile measures one size, e.g. --sizes llama-1b")
    if args.what == "compile" and args.variants:
        _choices(args.variants, tuple(VARIANTS), "--variants")
    if args.what == "loro" and args.solvers:
        from .optim.loro import SOLVERS
        _choices(args.solvers, (*SOLVERS, "auto"), "--solvers")
    for flag, value in (("--m", args.m), ("--grad-rank", args.grad_rank)):
        if value is not None and value < 1:
            raise UserError(f"invalid {flag} {value}: expected a positive integer")
    if args.m is not None:  # the rows of the packed 2:4 operand (kernels/packed.py's check_shape)
        from .kernels.packed import ROW_ALIGN
        if args.m % ROW_ALIGN:
            raise UserError(f"invalid --m {args.m}: the 2:4 layout takes a multiple of {ROW_ALIGN} rows (tokens), "
                            f"e.g. {-(-args.m // ROW_ALIGN) * ROW_ALIGN}")
    if args.gpu_name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", args.gpu_name):
        raise UserError(f"invalid --gpu-name {args.gpu_name!r}: a folder name (letters, digits, '.', '_', '-'), "
                        f"e.g. h100; --out chooses the directory")
    if not torch.cuda.is_available():
        raise UserError("elas bench measures GPU kernels and needs a CUDA GPU")
    env = kb.environment()
    gpu = gpu_folder(env["gpu"]) if args.gpu_name is None else args.gpu_name
    rows: list = []
    extra: dict = {}
    sizes = args.sizes.split(",") if args.sizes else None
    suffix = f"_batchx{args.batch_scale:g}" if args.batch_scale != 1.0 else ""
    out = Path(args.out or f"benchmarks/results/{gpu}") / f"{args.what}{suffix}.json"
    from .train import TrainError
    from .train.trainer import check_writable
    try:
        check_writable(out.parent)  # (before any timing: a file in its place or no permission is one line)
    except TrainError as e:
        raise UserError(str(e)) from None
    if out.exists():
        print(f"elas: {out} exists: this run replaces it (--out DIR writes elsewhere)", file=sys.stderr)

    def write(rows: list, extra: dict | None = None) -> None:  # also after each row of long benchmarks
        doc = {"command": "elas bench " + " ".join(sys.argv[2:]), "env": env, **(extra or {}), "rows": rows}
        tmp = out.with_name(out.name + ".tmp")  # whole or not at all: a run killed mid-write keeps the last file
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(doc, indent=1))
            os.replace(tmp, out)
        except OSError as e:  # (a full disk mid-run: said in one line; the rows timed so far are in the last file)
            tmp.unlink(missing_ok=True)
            raise UserError(f"could not write {out}: {e.strerror or e}") from None

    if args.what == "gemm":
        rows = kb.bench_gemm(m=args.m or 16384, on_row=write)
        extra = {"host_overhead": kb.bench_host_overhead()}
    elif args.what == "sparsify":
        rows = kb.bench_sparsify(m=args.m or 16384, on_row=write)
    elif args.what == "sste":
        rows = kb.bench_sste(on_row=write)
    elif args.what == "epilogue":
        rows = kb.bench_epilogue(m=args.m or 8192, on_row=write)  # the 1B step's tokens per micro-batch (32 x 256)
    elif args.what == "infer":
        from .bench.infer import bench_infer
        rows = bench_infer(sizes or ["llama-1b"], infer_variants, on_row=write)
    elif args.what == "loro":
        from .bench.loro import bench_loro
        from .optim.loro import SOLVERS
        rows = bench_loro(sizes or ("llama-60m", "llama-130m", "llama-350m", "llama-1b"),
                          tuple(args.solvers.split(",")) if args.solvers else SOLVERS, grad_rank=args.grad_rank,
                          on_row=write)
    elif args.what == "loss":
        from .bench.loss import bench_loss
        rows = bench_loss(on_row=write)
    elif args.what == "ffn":
        from .bench.ffn import bench_ffn
        rows = bench_ffn(sizes, batch_scale=args.batch_scale,
                         variants=args.variants.split(",") if args.variants else None, on_row=write)
    elif args.what == "compile":
        from .bench.compile import bench_compile
        rows = bench_compile((sizes or ["llama-1b"])[0], args.variants.split(",") if args.variants else None,
                             batch=int(32 * args.batch_scale), on_row=write)
    else:
        from .bench.step import bench_step, ratios
        rows = bench_step(sizes or ["llama-1b"], batches, step_variants, step_modes, args.optimizer,
                          profile=not args.no_profile, checkpointing=args.activation_checkpointing,
                          on_row=lambda rs: write(ratios(rs)))
        rows = ratios(rows)
    write(rows, extra)
    print(f"wrote {out}")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from .kernels.cuda import build_cutlass
    t0 = time.perf_counter()
    try:
        path = build_cutlass.build(args.lib, Path(args.out) if args.out else None, progress=not args.no_progress)
    except (ValueError, RuntimeError, OSError) as e:
        raise UserError(str(e)) from None
    mb = path.stat().st_size / 2 ** 20
    print(f"elas: built {path} ({mb:.1f} MB) in {time.perf_counter() - t0:.0f} s")
    if args.lib == "relu2":
        from .kernels.cuda import cutlass_relu2
        if cutlass_relu2.library_path() == path:
            print("elas: model.relu2_kernel=auto (the default) runs its ReLU^2 GEMMs on a Hopper GPU, and "
                  "act24.cutlass=true / model.rope_kernel=cutlass can use it")
        else:
            print(f"elas: set ELAS_CUTLASS_RELU2={path} for elas to find it")
    return 0


def _grid_estimates(args: argparse.Namespace) -> dict[str, float]:
    """--estimate-from's runs scaled to this grid's size and tokens (experiment.scaled_estimates)."""
    from .train.experiment import scaled_estimates
    return scaled_estimates(Path(args.estimate_from), args.size, args.steps, args.batch_size, args.grad_accum)


def _print_grid_plan(args: argparse.Namespace, variants: list[str], seeds: list[int], out: Path,
                     estimates: dict[str, float] | None = None) -> int:
    """`elas experiment --plan`: what the grid in --out still has to run, and the GPU time it is estimated to
    need (from the runs done there), without running anything."""
    from .train.experiment import done_devices, grid_plan, run_tokens, variant_config
    try:
        for v in variants:  # a bad variant or key: one line, as for a run
            cfg = variant_config(args.size, v, args.steps, args.data, out, args.batch_size, args.grad_accum)
    except (ValueError, KeyError) as e:
        raise UserError(_message(e)) from None
    rows = grid_plan(variants, seeds, out, args.steps, cfg_of=lambda v, seed: variant_config(
        args.size, v, args.steps, args.data, out, args.batch_size, args.grad_accum, seed=seed),
        estimates=estimates, size=args.size, tokens=run_tokens(cfg, world=1))
    left = [r for r in rows if r["state"] not in ("done", "diverged")]
    # the estimates are the time of the machine the done runs trained on: a CPU grid's are CPU minutes
    kinds = done_devices(out, args.size) | (done_devices(args.estimate_from) if estimates else set())
    what = "GPU" if "cpu" not in kinds else "CPU" if kinds == {"cpu"} else "CPU and GPU"
    unit = "min" if what == "CPU and GPU" else f"{what}-min"
    print(f"{'run':<48} {'state':<32} estimate ({what} time, from the runs done here" +
          (f", else scaled from {args.estimate_from})" if args.estimate_from else ")"))
    for r in rows:
        est = "-" if r["gpu_s_left"] is None else f"~{r['gpu_s_left'] / 60:.1f} {unit}"
        where = f" (at step {r['step']})" if r["state"] == "partial" else ""
        print(f"{r['run']:<48} {r['state'] + where:<32} {est if r['state'] not in ('done', 'diverged') else ''}")
    known = [r["gpu_s_left"] for r in left if r["gpu_s_left"] is not None]
    gone = sum(r["state"] == "diverged" for r in rows)
    print(f"{len(rows) - len(left) - gone} of {len(rows)} runs done" + (f", {gone} diverged" if gone else "") +
          f"; {len(left)} to run" + (
        f", ~{sum(known) / 60:.0f} {unit}" + (" (and runs with no estimate)" if len(known) < len(left) else "")
        if known else " (no estimate: no run is done here yet)"))
    other = [r for r in rows if r["state"] == "other settings"]
    if other:
        print(f"{len(other)} run(s) in {out} hold other settings, which the grid refuses "
              f"({other[0]['run']}: {'; '.join(other[0]['differs'][:3])}): give the grid another --out, or the "
              f"settings they were run with")
    # each seed's remaining part as a command (this plan's own settings repeated, so it runs this grid)
    same = (f"--size {args.size} --steps {args.steps} --batch-size {args.batch_size} --grad-accum "
            f"{args.grad_accum} --data {args.data} --out {out}")
    for seed in seeds:
        todo = [r["variant"] for r in left if r["seed"] == seed and r["state"] != "other settings"]
        if todo:
            print(f"seed {seed}: elas experiment {same} --seeds {seed} --variants {','.join(todo)}")
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    started = time.monotonic()  # (--time-left counts from here: preparing the data is part of the call)
    from .data import DataError
    from .train import TrainError
    from .train.trainer import TrainStopped
    from .train.experiment import ROW_KEYS, grid_rows, grid_variants, plot_curves, plot_stats, run_grid, summarize
    out = Path(args.out)
    variants = args.variants.split(",") if args.variants else grid_variants(args.steps)
    if "" in variants:
        raise UserError(f"--variants {args.variants!r} has an empty name: expected comma-separated variants, "
                        f"e.g. elas,relu2")
    twice = sorted({v for v in variants if variants.count(v) > 1})
    if twice:
        raise UserError(f"--variants names {', '.join(twice)} more than once")
    try:
        seeds = [int(k) for k in args.seeds.split(",")]
        assert seeds and all(k >= 0 for k in seeds) and len(set(seeds)) == len(seeds)
    except (ValueError, AssertionError):
        raise UserError(f"invalid --seeds {args.seeds!r}: expected distinct non-negative integers, e.g. 0,1") from None
    from .config import SIZES, closest
    if args.size not in SIZES:  # a size, not a preset: the variants name the rest
        raise UserError(f"unknown --size {args.size!r}{closest(args.size, SIZES)}: expected one of "
                        f"{', '.join(SIZES)} (the variants name the model; --variants elas,relu2 ...)")
    for flag, value in (("--steps", args.steps), ("--batch-size", args.batch_size), ("--grad-accum", args.grad_accum)):
        if value < 1:  # (before --plan divides by it, and before any data is prepared)
            raise UserError(f"invalid {flag} {value}: expected a positive integer")
    if args.time_left is not None and not args.time_left > 0:
        raise UserError(f"invalid --time-left {args.time_left}: expected a positive number of seconds")
    if args.plan and args.summarize_only:
        raise UserError("--plan and --summarize-only exclude each other: --plan lists what is left to run, "
                        "--summarize-only summarizes what ran")
    if args.summarize_only and not out.is_dir():
        raise UserError(f"--out {out} holds no grid to summarize (no such directory)")
    if args.summarize_only and not any(out.glob("*/summary.json")):
        raise UserError(f"--out {out} holds no finished run to summarize (no RUN/summary.json)")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory: choose a grid folder")
    if not out.exists() and any(p.exists() and not p.is_dir() for p in out.parents):
        raise UserError(f"--out {out} lies under a file, not a directory: choose a grid folder")
    estimates = None
    if args.estimate_from:
        if args.summarize_only or not (args.plan or args.time_left is not None):
            raise UserError("--estimate-from estimates the runs of --plan or --time-left: give one of them")
        estimates = _grid_estimates(args)
        if not estimates:
            raise UserError(f"--estimate-from {args.estimate_from} holds no finished run of `elas experiment` "
                            f"(RUN/summary.json naming its size, variant and tokens) to estimate from")
    try:  # (the rows it would summarize after training: a bad one found before, not after the runs; --plan reads
        grid_rows(out, () if args.plan else ROW_KEYS)  # their GPU time alone)
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.plan:
        return _print_grid_plan(args, variants, seeds, out, estimates)
    if not args.summarize_only:
        from types import SimpleNamespace

        from .train.experiment import check_transfer_data, variant_config
        try:  # every variant and key, and the transfer set, before any data is prepared
            cfgs = [variant_config(args.size, v, args.steps, args.data, out, args.batch_size, args.grad_accum)
                    for v in variants]
            if args.transfer_data:
                check_transfer_data(args.data, args.transfer_data)
        except (ValueError, KeyError) as e:
            raise UserError(_message(e)) from None
        builtin = BUILTIN_DATA.get(os.path.normpath(os.path.relpath(Path(args.data).absolute())))
        if builtin and not (Path(args.data) / "meta.json").exists():  # its vocabulary is known before it is made
            small = min(c.model.vocab_size for c in cfgs)
            if builtin[0] > small:
                fits = [k for k, (v, _) in BUILTIN_DATA.items() if v <= small]
                raise UserError(f"--size {args.size} has vocab_size {small}, but --data {args.data} would be prepared "
                                f"with a {builtin[0]}-token vocabulary: " +
                                (f"use --data {fits[0]}" if fits else "prepare a dataset with a smaller --vocab-size"))
        ensure_builtin_data(SimpleNamespace(data_dir=args.data))
        try:
            left = None if args.time_left is None else args.time_left - (time.monotonic() - started)
            if left is not None and left <= 0:
                raise UserError(f"--time-left {args.time_left:g} s was spent preparing the data: nothing started; "
                                f"the same command runs the grid on the prepared data")
            run_grid(args.size, variants, args.steps, args.data, out, args.batch_size, args.grad_accum, seeds,
                     args.transfer_data, time_left=left, estimates=estimates)
        except TrainStopped as e:  # the grid resumes where it stopped: the same command again
            if not e.quiet:
                print(f"elas: stopped by signal {e.signum}; " + (
                    "it came as a run completed, so the grid stopped before its next run" if e.complete else
                    "the run in progress saved its checkpoint") + ": the same command continues the grid",
                      file=sys.stderr)
            return 128 + e.signum
        except (TrainError, DataError, ValueError, KeyError) as e:
            if getattr(e, "quiet", False):  # under torchrun: every process stops with it, rank 0 says it
                return 2
            raise UserError(str(e)) from None
    from .train.experiment import diverged_runs
    if not _rank0():  # under torchrun: rank 0 writes the summary and its plots (one writer per file), and says it
        return 1 if diverged_runs(out) else 0
    _, text = summarize(out)
    if plot_curves(out, out / "loss_curves.png"):
        text += f"\n![loss curves]({out / 'loss_curves.png'})\n"
    if plot_stats(out, out / "activation_stats.png"):
        text += f"\n![activation statistics]({out / 'activation_stats.png'})\n"
    print(text)
    return 1 if diverged_runs(out) else 0  # (the summary says which)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="elas", description="Low-rank + 2:4 activation-sparse LLaMA pre-training.")
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND")
    p = sub.add_parser("model", help="parameter counts and FLOPs of a model (no weights allocated)")
    add_model_args(p)
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence the FLOPs are counted at")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--list", action="store_true", help="list presets")
    p.set_defaults(func=cmd_model)

    p = sub.add_parser("train", help="train a model (no arguments: a 5-6 minute CPU demo on the built-in corpus)")
    add_model_args(p)
    p.add_argument("--config", help="TOML file: training keys at the top, model keys under [model]")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. lr=3e-4, "
                   "model.rank=64, model.act24.dense_warmup_steps=100 (repeatable; not preset/recipe, which choose "
                   "the model, nor model.methods: a --config TOML's [model.METHOD] tables)")
    p.add_argument("--out", help="run directory (default runs/<recipe>, else runs/<preset>)")
    p.add_argument("--data", help="prepared dataset directory")
    p.add_argument("--max-steps", type=int, help="optimizer steps of the run (the learning-rate schedule and "
                   "the methods' phases are planned over them)")
    p.add_argument("--optimizer", choices=["adamw", "loro_adamw"],
                   help="loro_adamw also sets LORO's lr, exact-step period and weight decay (0) for the size")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--resume", nargs="?", const=True, type=_resume_value, metavar="auto",
                   help="continue the run in --out from its newest checkpoint that verifies (an error if it has "
                        "none); --resume auto: continue if there is one, else start")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--init-from", metavar="DIR", help="start from a Hugging Face Llama/Arcee checkpoint of the same "
                   "shape (full-rank models)")
    p.add_argument("--recipe", help="a paper's named run (see `elas recipes`), e.g. elas-60m; flags still apply")
    p.add_argument("--dry-run", action="store_true", help="print the resolved configuration and token budget; "
                   "train nothing")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("recipes", help="the papers' named training runs (elas train --recipe NAME)")
    p.set_defaults(func=cmd_recipes)

    p = sub.add_parser("plot", help="loss, validation loss, tokens/s and sparsity statistics of runs, one PNG")
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--out", default="runs/plot.png", help="the PNG to write (default runs/plot.png)")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("bench", help="GPU kernel benchmarks (JSON under benchmarks/results/<gpu>/)")
    p.add_argument("what", choices=["gemm", "sparsify", "sste", "epilogue", "infer", "ffn", "step", "loss", "loro",
                                    "compile", "report"],
                   help="report: render the result files into --doc")
    p.add_argument("--sizes", help="model sizes for ffn/step/infer, e.g. llama-60m,llama-1b (default: 60m..1b; "
                                   "step, infer: 1b)")
    p.add_argument("--batch-scale", type=float, default=1.0,
                   help="scale the papers' per-GPU batch (ffn, compile; step: --batches)")
    p.add_argument("--doc", help="report: the doc whose generated part is rewritten (default docs/performance.md)")
    p.add_argument("--results", help="report: the folder of <gpu>/*.json (default benchmarks/results)")
    p.add_argument("--m", type=int, default=None,
                   help="tokens (rows of the sparse operand, a multiple of 64; default 16384, and 8192 for "
                        "`epilogue`)")
    p.add_argument("--out", help="directory for the JSON (default benchmarks/results/<gpu>)")
    p.add_argument("--gpu-name", help="folder name for the GPU (default: from the device name)")
    p.add_argument("--variants", help=f"ffn/compile/step/infer: comma-separated variants (default compile: "
                                      f"{','.join(COMPILE_VARIANTS)}; ffn, step, infer: the papers' variants); in "
                                      f"ffn and step a variant may set keys of its methods: elas+act24.fused=true)")
    p.add_argument("--batches", help="step: comma-separated per-GPU batch sizes (default 32)")
    p.add_argument("--optimizer", choices=["adamw", "loro_adamw"],
                   help="step: the optimizer of every row (default adamw; loro_adamw: low-rank variants only)")
    p.add_argument("--modes", help="step: comma-separated modes among elas, elas-fp32, torch.compile, eager (default: all)")
    p.add_argument("--no-profile", action="store_true", help="step: skip the per-row profile breakdown")
    p.add_argument("--solvers", help="loro: comma-separated SVD solvers of the exact step (default: all)")
    p.add_argument("--grad-rank", type=int, help="loro: directions from a gradient of this rank (as trained layers "
                   "have; default: random directions)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="step: every row with activation checkpointing per block (as --set activation_checkpointing=true)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("experiment", help="run the quality grid of variants (one harness, same data and tokens)")
    p.add_argument("--size", default="llama-60m", help="model size of every run (default llama-60m)")
    p.add_argument("--variants", help=f"comma-separated subset of {','.join(VARIANTS)} (default: the papers' "
                   f"comparisons, the third paper's accelerated variants and ELAS's warm-up ablation); a variant "
                   f"may set model and method keys, and the optimizer's moment dtype: "
                   f"elas+act24.dense_warmup_steps=100, lowrank-relu2+optim_state_dtype=bf16")
    p.add_argument("--seeds", default="0", help="comma-separated seeds, each a run of every variant (default 0)")
    p.add_argument("--transfer-data", help="a dataset of other text with the training data's tokenizer (elas data "
                   "prepare --source stdlib --tokenizer DATA ...): every run's loss on its validation split")
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps per run (default 2000)")
    p.add_argument("--batch-size", type=int, default=256, help="sequences per micro-batch (default 256)")
    p.add_argument("--grad-accum", type=int, default=2,
                   help="micro-batches per step (default 2): a step is batch-size x grad-accum sequences")
    p.add_argument("--data", default="data/builtin", help="dataset directory (default data/builtin)")
    p.add_argument("--out", default="runs/quality", help="the grid's folder: one run per variant and seed "
                   "(default runs/quality); an interrupted grid resumes there")
    p.add_argument("--summarize-only", action="store_true", help="write summary.md and the plots from the runs "
                   "in --out; train nothing")
    p.add_argument("--time-left", type=float, metavar="SECONDS", help="start a run only where its estimated time "
                   "(as --plan's) fits in what is left of SECONDS; the others are left for a later call (a GPU "
                   "machine lent for a limited time, whose checkpoints go with it); partial runs resume regardless")
    p.add_argument("--plan", action="store_true", help="print what the grid in --out still has to run and its "
                   "estimated GPU time (from the runs done there); run nothing")
    p.add_argument("--estimate-from", metavar="DIR", help="another grid's folder (e.g. a smaller size's): the "
                   "estimates of --plan and --time-left for variants not done in --out, its runs' GPU times scaled "
                   "by training FLOPs and calibrated on the runs done in --out")
    p.set_defaults(func=cmd_experiment)

    p = sub.add_parser("build", help="build a CUDA library of elas's own kernels (no GPU needed; minutes)")
    p.add_argument("what", choices=["cutlass"], help="cutlass: the CUTLASS sm90 GEMMs (model.relu2_kernel)")
    p.add_argument("--lib", choices=["relu2", "sp"], default="relu2",
                   help="relu2: the GEMMs with ReLU^2 / 2:4 epilogues (default); sp: the 2:4 GEMM of the benchmarks")
    p.add_argument("--out", help="folder for the library (default: the cache folder, where elas looks for it)")
    p.add_argument("--no-progress", action="store_true", help="no elapsed-time line")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("data", help="dataset preparation")
    dsub = p.add_subparsers(dest="data_cmd", metavar="SUBCOMMAND", required=True)
    q = dsub.add_parser("prepare", help="text -> tokenizer -> train.bin/val.bin")
    q.add_argument("--out", required=True, help="dataset directory to create")
    q.add_argument("--source", choices=["builtin", "stdlib", "site-packages", "files", "hf"], default="builtin",
                   help="builtin: the interpreter's standard library + site-packages text; stdlib / site-packages: "
                        "one of the two (e.g. a transfer set for a model trained on the other)")
    q.add_argument("--files", nargs="+", help="directories, files, globs or .jsonl files (source files)")
    q.add_argument("--text-field", help="JSONL / HF field holding the text (default text)")
    q.add_argument("--hf", help="Hugging Face dataset name, e.g. allenai/c4")
    q.add_argument("--hf-config", help="dataset config, e.g. en")
    q.add_argument("--hf-split", help="dataset split (source hf; default train)")
    q.add_argument("--tokenizer", default="bpe", help="'bpe' to train one, or a tokenizer.json / dir / hub name")
    q.add_argument("--vocab-size", type=int, help="BPE vocabulary size (default 32000; a given --tokenizer keeps "
                   "its own)")
    q.add_argument("--max-mb", type=float, help="cap on text read, MB (0 = no cap; default 200, or none with "
                   "--max-tokens)")
    q.add_argument("--max-tokens", type=int, help="training tokens to write: the source is read until they are "
                   "(its first 8 bytes a token, at most 1 GB, held in memory and a trained BPE's text; the rest "
                   "streamed)")
    q.add_argument("--val-frac", type=float, default=0.01, help="fraction of documents for validation")
    q.add_argument("--force", action="store_true", help="rebuild an existing dataset")
    q.set_defaults(func=cmd_data_prepare)

    p = sub.add_parser("checkpoint", help="checkpoint tools")
    csub = p.add_subparsers(dest="checkpoint_cmd", metavar="SUBCOMMAND", required=True)
    q = csub.add_parser("consolidate", help="the whole weights of a sharded (FSDP2) checkpoint as one "
                                            "model.safetensors in it")
    q.add_argument("run", help="run directory")
    q.add_argument("--checkpoint", help="a checkpoint directory, or the name of one of the run's "
                   "(step-00000200; default: its newest that verifies)")
    q.set_defaults(func=cmd_checkpoint_consolidate)

    for name, fn, hlp in (("eval", cmd_eval, "validation perplexity of a checkpoint"),
                          ("generate", cmd_generate, "sample text from a checkpoint"),
                          ("export", cmd_export, "a checkpoint as a Hugging Face model directory (transformers)")):
        p = sub.add_parser(name, help=hlp)
        p.add_argument("--run", required=True, help="run directory")
        p.add_argument("--checkpoint", help="a checkpoint directory, or the name of one of the run's "
                       "(step-00000200; default: its newest that verifies)")
        if name != "export":
            p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
        if name == "export":
            p.add_argument("--to", required=True, help="directory for the Hugging Face checkpoint")
            p.add_argument("--force", action="store_true", help="overwrite a non-empty --to")
        elif name == "eval":
            p.add_argument("--data", help="dataset directory (default: the run's)")
            p.add_argument("--tokens", type=int, help="validation tokens (default: the run's eval_tokens; at least "
                           "one whole sequence)")
            p.add_argument("--json", action="store_true")
        else:
            p.add_argument("--prompt", default="def ", help="text to continue (default 'def ')")
            p.add_argument("--max-new-tokens", type=int, default=200,
                           help="tokens to generate (default 200); past the model's context (max_seq_len, with the "
                                "prompt) each token re-runs the whole window: slow")
            p.add_argument("--temperature", type=float, default=0.8, help="default 0.8; 0: the likeliest token")
            p.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest (default 50; 0: all)")
            p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
            p.add_argument("--decode", choices=["graph", "compiled", "eager"], default="graph",
                           help="CUDA decode step: replayed from a CUDA graph (default), compiled then replayed, or "
                                "eager (CPU always decodes eagerly)")
        p.set_defaults(func=fn)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not getattr(args, "func", None):
        ap.print_help()
        return 0
    try:
        # ELAS_CUBLAS_WORKSPACE, before any GEMM of this process (kernels/cublas.py). Not for the quality grid,
        # whose later runs must run the GEMMs of its first ones, made with torch's default workspace
        from .kernels.cublas import apply_choice, user_choice
        try:
            user_choice()  # (checked for every command, the grid's too)
            if args.cmd != "experiment":
                apply_choice()
        except ValueError as e:
            raise UserError(str(e)) from None
        rc = args.func(args)
        sys.stdout.flush()  # inside the try: a reader that left shows up here, not at interpreter exit
        return rc
    except BrokenPipeError:  # `elas model ... | head -1`: the reader left; not an error of ours
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("elas: interrupted", file=sys.stderr)
        return 130
    except UserError as e:
        print(f"elas: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
