"""`elas` command line: thin parsing around the library. User mistakes end in one line on stderr, exit 2."""
from __future__ import annotations

import argparse
import json
import sys

from .config import ModelConfig, model_preset


class UserError(Exception):
    """A mistake of the user's (bad value, missing file): printed as one line, no traceback."""


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=None, help="model preset, e.g. llama-60m, llama-1b-elas (see `elas model --list`)")
    p.add_argument("--ffn", choices=["swiglu", "relu2"], default=None, help="FFN kind")
    p.add_argument("--rank", type=int, default=None, help="low-rank rank for attention/FFN linears (0 = full)")
    p.add_argument("--act-sparsity", default=None, choices=["none", "2:4"], help="activation sparsity of ReLU^2")
    p.add_argument("--grad-mode", default=None, choices=["ste", "mask"], help="gradient through the 2:4 mask")
    p.add_argument("--d-ff", type=int, default=None, help="FFN width (default: derived from the preset)")


def model_overrides(args: argparse.Namespace) -> dict:
    over = {}
    if args.ffn is not None:
        over["ffn"] = args.ffn
    if args.rank is not None:
        over["rank"] = args.rank
    if args.act_sparsity is not None:
        over["act_sparsity"] = None if args.act_sparsity == "none" else args.act_sparsity
        if over["act_sparsity"] and args.ffn is None:
            over["ffn"] = "relu2"
    if args.grad_mode is not None:
        over["grad_mode"] = args.grad_mode
    if args.d_ff is not None:
        over["d_ff"] = args.d_ff
    return over


def resolve_model(preset: str, over: dict) -> ModelConfig:
    try:
        return model_preset(preset, **over)
    except (ValueError, TypeError) as e:
        raise UserError(str(e)) from None


def cmd_model(args: argparse.Namespace) -> int:
    from .config import MODEL_PRESETS
    from .model.stats import model_summary

    if args.list:
        for name in MODEL_PRESETS:
            print(name)
        return 0
    cfg = resolve_model(args.preset or "llama-60m", model_overrides(args))
    info = {"preset": args.preset or "llama-60m", **model_summary(cfg, seq_len=args.seq_len), "config": vars(cfg)}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['preset']}: {info['params'] / 1e6:.2f}M parameters "
          f"({info['non_embedding_params'] / 1e6:.2f}M non-embedding)")
    for part, n in info["params_by_part"].items():
        print(f"  {part:<10} {n / 1e6:10.2f}M")
    print(f"  ffn={cfg.ffn} d_ff={cfg.ffn_width} rank={cfg.rank or 'full'} act_sparsity={cfg.act_sparsity or 'none'}")
    print(f"  forward GFLOPs/token at seq {args.seq_len}: {info['fwd_flops_per_token'] / 1e9:.3f} "
          f"(2:4 GEMMs at half: {info['fwd_flops_per_token_2to4'] / 1e9:.3f})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="elas", description="Low-rank + 2:4 activation-sparse LLaMA pre-training.")
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND")
    p = sub.add_parser("model", help="parameter counts and FLOPs of a model (no weights allocated)")
    add_model_args(p)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--list", action="store_true", help="list presets")
    p.set_defaults(func=cmd_model)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not getattr(args, "func", None):
        ap.print_help()
        return 0
    try:
        return args.func(args)
    except UserError as e:
        print(f"elas: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
