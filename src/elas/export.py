"""`elas export`: a trained run as a Hugging Face checkpoint (`AutoModelForCausalLM.from_pretrained(DIR)`).

The decoder maps one to one onto transformers' LLaMA family: SwiGLU presets onto `LlamaForCausalLM`, the ungated
ReLU^2 FFN onto `ArceeForCausalLM` (LLaMA with an up/down MLP and `hidden_act="relu2"`; vLLM serves it too).
RMSNorm, the rotate-half RoPE, causal SDPA and the untied head are the same computations.
- Low-rank linears are merged: W = M N^T ([d_out, d_in]).
- Weight methods are exported as their forward sees them at the checkpoint's step (`effective_weight()`, e.g.
  S-STE's S(W) in its sparse phase).
- Sparse *activations* (2:4, V:N:M) cannot be expressed in a transformers model: the export computes dense
  ReLU^2 activations. `export_hf` says so when the checkpoint's forward uses them (the result then differs from
  elas's sparse forward).
Needs the `hf` extra (transformers).
"""
from __future__ import annotations

import inspect
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from .config import ModelConfig
from .data.prepare import fsync_dir
from .model.lowrank import LowRankLinear

_ATTN = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
_FFN = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def _dense(lin: nn.Module) -> torch.Tensor:
    if isinstance(lin, LowRankLinear):
        return lin.merged_weight()
    return lin.effective_weight() if hasattr(lin, "effective_weight") else lin.weight


def _modules(model: nn.Module) -> dict[str, nn.Module]:
    """transformers LLaMA/Arcee weight name -> the elas module holding that weight (the one map both ways)."""
    out = {"model.embed_tokens.weight": model.embed, "model.norm.weight": model.norm, "lm_head.weight": model.lm_head}
    for i, blk in enumerate(model.blocks):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = blk.attn_norm
        out[p + "post_attention_layernorm.weight"] = blk.ffn_norm
        for ours, theirs in _ATTN.items():
            out[p + f"self_attn.{theirs}.weight"] = getattr(blk.attn, ours)
        for ours, theirs in _FFN.items():
            if hasattr(blk.ffn, ours):
                out[p + f"mlp.{theirs}.weight"] = getattr(blk.ffn, ours)
    return out


@torch.no_grad()
def hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """transformers LLaMA/Arcee names -> fp32 tensors of `model` (an elas LLaMA)."""
    out = {k: (_dense(m) if isinstance(m, (nn.Linear, LowRankLinear)) else m.weight)
           for k, m in _modules(model).items()}
    return {k: v.detach().float().contiguous().cpu() for k, v in out.items()}


def check_init_from(model: nn.Module, cfg: ModelConfig, hf_dir: Path) -> list[Path]:
    """That hf_dir can initialise `model` (a meta-device build will do): its architecture, shapes and weight
    files; returns the files. Called before any data is read; any mismatch is one line naming it."""
    hf_dir = Path(hf_dir)
    try:
        conf = json.loads((hf_dir / "config.json").read_text())
    except (OSError, ValueError):
        raise ValueError(f"--init-from {hf_dir}: no readable config.json (a Hugging Face model directory)") from None
    want = "ArceeForCausalLM" if cfg.ffn == "relu2" else "LlamaForCausalLM"
    arch = (conf.get("architectures") or ["?"])[0]
    if arch != want:
        raise ValueError(f"--init-from {hf_dir} holds a {arch}; a model with ffn={cfg.ffn} starts from a {want}")
    shape = {"hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
             "num_key_value_heads": cfg.n_heads, "intermediate_size": cfg.ffn_width, "vocab_size": cfg.vocab_size}
    diff = [f"{k} {conf.get(k)} (model: {v})" for k, v in shape.items() if conf.get(k, v) != v]
    if diff:
        raise ValueError(f"--init-from {hf_dir} does not match the model's shape: {', '.join(diff)}")
    # the settings that make the same weights compute another function (transformers' defaults where absent)
    rope = conf.get("rope_parameters") or conf.get("rope_scaling") or {}
    have = {"head_dim": conf.get("head_dim") or conf.get("hidden_size", cfg.d_model) // conf.get(
                "num_attention_heads", cfg.n_heads),
            "rope_theta": rope.get("rope_theta", conf.get("rope_theta", 10000.0)),
            "rope_type": rope.get("rope_type", rope.get("type", "default")),
            "rms_norm_eps": conf.get("rms_norm_eps", 1e-6),
            "hidden_act": conf.get("hidden_act", "relu2" if cfg.ffn == "relu2" else "silu"),
            "attention_bias": conf.get("attention_bias", False), "mlp_bias": conf.get("mlp_bias", False),
            "tie_word_embeddings": conf.get("tie_word_embeddings", False)}
    ours = {"head_dim": cfg.head_dim, "rope_theta": cfg.rope_theta, "rope_type": "default",
            "rms_norm_eps": cfg.norm_eps, "hidden_act": "relu2" if cfg.ffn == "relu2" else "silu",
            "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False}
    same = lambda a, b: math.isclose(a, b, rel_tol=1e-6) if isinstance(b, float) and isinstance(a, (int, float)) \
        else a == b
    diff = [f"{k} {have[k]} (model: {v})" for k, v in ours.items() if not same(have[k], v)]
    if diff:
        raise ValueError(f"--init-from {hf_dir} computes another function than the model: {', '.join(diff)}")
    if any(isinstance(m, LowRankLinear) for m in model.modules()):
        raise ValueError(f"--init-from {hf_dir}: the model is low-rank; a dense checkpoint initialises full-rank "
                         f"models only (rank 0)")
    files = sorted(hf_dir.glob("model*.safetensors"))
    if not files:
        raise ValueError(f"--init-from {hf_dir}: no model*.safetensors weights")
    return files


@torch.no_grad()
def load_hf_weights(model: nn.Module, cfg: ModelConfig, hf_dir: Path) -> None:
    """Initialise a full-rank elas model from a transformers Llama (SwiGLU) / Arcee (ReLU^2) checkpoint of the
    same shapes (`elas train --init-from DIR`)."""
    from safetensors.torch import load_file
    files = check_init_from(model, cfg, hf_dir)
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    mods = _modules(model)
    missing = [k for k in mods if k not in tensors]
    if missing:
        raise ValueError(f"--init-from {hf_dir} lacks {len(missing)} weights, e.g. {missing[0]}")
    for k, m in mods.items():
        if tensors[k].shape != m.weight.shape:
            raise ValueError(f"--init-from {hf_dir}: {k} is {tuple(tensors[k].shape)}, the model's is "
                             f"{tuple(m.weight.shape)}")
        m.weight.copy_(tensors[k])


def hf_config(cfg: ModelConfig, eos_id: int | None):
    """The transformers config object of an elas ModelConfig."""
    try:
        import transformers
    except ImportError:
        raise RuntimeError("elas export needs transformers: pip install 'elas[hf]'") from None
    cls = transformers.ArceeConfig if cfg.ffn == "relu2" else transformers.LlamaConfig
    kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_width,
              num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads,
              head_dim=cfg.head_dim, hidden_act="relu2" if cfg.ffn == "relu2" else "silu",
              max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=False,
              # BOS is the end-of-text: the token before every document in a dataset of `elas data prepare`
              attention_bias=False, mlp_bias=False, bos_token_id=eos_id, eos_token_id=eos_id,
              architectures=["ArceeForCausalLM" if cfg.ffn == "relu2" else "LlamaForCausalLM"])
    if "rope_parameters" in inspect.signature(cls.__init__).parameters:  # transformers >= 5
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    else:
        kw["rope_theta"] = cfg.rope_theta
    return cls(**kw)


EXPORT_FILES = frozenset({"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"})


def export_hf(model: nn.Module, cfg: ModelConfig, tokenizer_file: Path | None, out: Path, log=print) -> Path:
    """Write `model` (built from cfg, weights loaded, methods in the checkpoint step's mode) to `out`."""
    from .sparsity import applied_methods
    tensors = hf_state_dict(model)
    eos = None
    if tokenizer_file is not None and tokenizer_file.is_file():
        from .data.tokenizer import eot_id, load_tokenizer
        eos = eot_id(load_tokenizer(str(tokenizer_file)))
    conf = hf_config(cfg, eos)
    # written beside `out` first, then moved into it: an export that fails or is killed midway leaves an earlier
    # export in `out` whole (--force), not a new config.json beside a truncated model.safetensors
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        conf.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if eos is not None:
            (tmp / "tokenizer.json").write_bytes(tokenizer_file.read_bytes())
            eot = json.loads(tokenizer_file.read_text())["added_tokens"]
            name = next((t["content"] for t in eot if t["id"] == eos), None)
            (tmp / "tokenizer_config.json").write_text(json.dumps(
                {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": name, "bos_token": name,
                 "model_max_length": cfg.max_seq_len}, indent=1))
        # on disk before they take their names: unsynced, a machine crash after the renames could leave an empty or
        # zero-filled model.safetensors where the earlier export was (as `elas data prepare` and checkpoints sync)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        out.mkdir(exist_ok=True)
        # an earlier export's files that this one does not write (its tokenizer, when this run has none) would
        # describe another model: removed first; files no export writes (a user's notes) stay
        written = {f.name for f in tmp.iterdir()}
        for name in EXPORT_FILES - written:
            (out / name).unlink(missing_ok=True)
        for f in sorted(tmp.iterdir(), key=lambda f: f.name == "config.json"):  # config.json last
            os.replace(f, out / f.name)
        fsync_dir(out)  # (the renames themselves)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # activation methods in a sparse mode (weight methods are exported as effective_weight() above)
    act = [a.config.name for a in applied_methods(model) if str(a.mode).startswith("sparse")
           and not all(op.endswith(".weight") for op in a.config.operands())]
    if act:
        log(f"elas export: the checkpoint's forward uses sparse activations ({', '.join(act)}), which a "
            f"transformers model cannot express: the export computes dense ReLU^2 activations (its outputs differ "
            f"from elas's sparse forward)")
    merged = ", low-rank factors merged" if any(isinstance(m, LowRankLinear) for m in model.modules()) else ""
    log(f"elas export: wrote {conf.architectures[0]} ({sum(t.numel() for t in tensors.values()) / 1e6:.2f}M "
        f"parameters{merged}) to {out}")
    return out


__all__ = ["export_hf", "hf_state_dict", "hf_config", "check_init_from", "load_hf_weights"]
