"""Configuration: dataclasses, named presets, and `key=value` overrides.

A preset is plain data. Model presets follow the GaLore/ELAS LLaMA benchmark (vocab 32000, untied embeddings).
Each size comes in the five variants the papers compare, named `llama-60m`, `llama-60m-relu2`, ...:

    (none)          full-rank SwiGLU, the baseline
    relu2           full-rank ungated ReLU^2 FFN, d_ff = 1.5 x SwiGLU intermediate rounded up to 128
    relu2-24        relu2 + 2:4 activation sparsity with Haziza et al.'s recipe (mask gradient, token permutation,
                    95/5 split of the weight-gradient GEMMs)
    lowrank-relu2   relu2 with every attention/FFN linear low-rank (W = A.B), dense
    elas            lowrank-relu2 + 2:4 activation sparsity with a straight-through gradient (ELAS)
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field, fields
from typing import Any

FFN_KINDS = ("swiglu", "relu2")
GRAD_MODES = ("ste", "mask")
ACT_SPARSITY = (None, "2:4")
D_FF_MULTIPLE = 128  # every 2:4 GEMM tile we target divides 128; 8191 (ELAS 1B) would leave a dense tail


def relu2_width(swiglu_intermediate: int, multiple: int = D_FF_MULTIPLE) -> int:
    """ReLU^2 FFN width with the SwiGLU parameter budget: 1.5 x intermediate, rounded UP to `multiple`."""
    return int(math.ceil(1.5 * swiglu_intermediate / multiple) * multiple)


@dataclass
class ModelConfig:
    d_model: int = 512
    n_layers: int = 8
    n_heads: int = 8
    intermediate: int = 1376  # SwiGLU hidden width of the size class; relu2 derives its d_ff from it
    vocab_size: int = 32000
    max_seq_len: int = 1024
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    init_std: float = 0.02
    ffn: str = "swiglu"  # one of FFN_KINDS
    d_ff: int | None = None  # None: intermediate for swiglu, relu2_width(intermediate) for relu2
    rank: int = 0  # 0: full-rank; >0: every attention/FFN linear is W = A.B with this rank
    lowrank_scope: str = "all"  # all | attn | ffn
    act_sparsity: str | None = None  # None | "2:4": applied to y2 = relu(y1)^2 of relu2 FFNs
    grad_mode: str = "ste"  # ste (ELAS) | mask (Haziza et al.)
    dense_warmup_steps: int = 1000  # sparsity is off before this step (both papers use 1000)
    permute_tokens: bool = False  # fixed permutation of sequence positions around the FFN (Haziza)
    wgrad_dense_frac: float | None = None  # e.g. 0.05: weight-gradient GEMMs pruned 2:4 along tokens except
    # the densest 5% of features (Haziza's 95/5 split); None: weight gradients exact (dense)
    kernel_backend: str = "auto"  # auto | reference | cuda (see elas.kernels)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def ffn_width(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        return self.intermediate if self.ffn == "swiglu" else relu2_width(self.intermediate)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def validate(self) -> None:
        def bad(name: str, value: Any, valid: str) -> None:
            raise ValueError(f"invalid model.{name}={value!r}: {valid}")

        if self.ffn not in FFN_KINDS:
            bad("ffn", self.ffn, f"expected one of {FFN_KINDS}")
        if self.grad_mode not in GRAD_MODES:
            bad("grad_mode", self.grad_mode, f"expected one of {GRAD_MODES}")
        if self.act_sparsity not in ACT_SPARSITY:
            bad("act_sparsity", self.act_sparsity, "expected none or '2:4'")
        if self.act_sparsity and self.ffn != "relu2":
            bad("act_sparsity", self.act_sparsity, "2:4 activation sparsity needs ffn='relu2' (SwiGLU is not sparse)")
        if self.act_sparsity and self.ffn_width % 4:
            bad("d_ff", self.ffn_width, "2:4 sparsity needs d_ff to be a multiple of 4 (128 recommended)")
        if self.d_model % self.n_heads or self.head_dim % 2:
            bad("n_heads", self.n_heads, f"d_model={self.d_model} must split into heads of even size")
        if self.rank < 0:
            bad("rank", self.rank, "expected 0 (full-rank) or a positive rank")
        if self.lowrank_scope not in ("all", "attn", "ffn"):
            bad("lowrank_scope", self.lowrank_scope, "expected all, attn or ffn")
        if self.wgrad_dense_frac is not None and not 0.0 <= self.wgrad_dense_frac <= 1.0:
            bad("wgrad_dense_frac", self.wgrad_dense_frac, "expected a fraction in [0, 1] or none")
        if self.dense_warmup_steps < 0:
            bad("dense_warmup_steps", self.dense_warmup_steps, "expected >= 0")
        if self.kernel_backend not in ("auto", "reference", "cuda"):
            bad("kernel_backend", self.kernel_backend, "expected auto, reference or cuda")
        for name in ("d_model", "n_layers", "n_heads", "intermediate", "vocab_size", "max_seq_len"):
            if getattr(self, name) <= 0:
                bad(name, getattr(self, name), "expected a positive integer")


# ---- presets ------------------------------------------------------------------------------------------------
# size: (d_model, intermediate, n_heads, n_layers, LORO/ELAS rank, vocab)
SIZES: dict[str, tuple[int, int, int, int, int, int]] = {
    "llama-tiny": (128, 352, 4, 4, 32, 8192),
    "llama-60m": (512, 1376, 8, 8, 128, 32000),
    "llama-130m": (768, 2048, 12, 12, 256, 32000),
    "llama-350m": (1024, 2736, 16, 24, 256, 32000),
    "llama-1b": (2048, 5461, 32, 24, 512, 32000),
    "llama-7b": (4096, 11008, 32, 32, 1024, 32000),
}

VARIANTS: dict[str, dict[str, Any]] = {
    "swiglu": {},
    "relu2": {"ffn": "relu2"},
    "relu2-24": {"ffn": "relu2", "act_sparsity": "2:4", "grad_mode": "mask", "permute_tokens": True,
                 "wgrad_dense_frac": 0.05},
    "lowrank-relu2": {"ffn": "relu2", "rank": "size"},
    "elas": {"ffn": "relu2", "rank": "size", "act_sparsity": "2:4", "grad_mode": "ste"},
}


def _build_presets() -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for size, (d, inter, heads, layers, rank, vocab) in SIZES.items():
        base = {"d_model": d, "intermediate": inter, "n_heads": heads, "n_layers": layers, "vocab_size": vocab}
        for variant, over in VARIANTS.items():
            name = size if variant == "swiglu" else f"{size}-{variant}"
            cfg = dict(base)
            cfg.update({k: (rank if v == "size" else v) for k, v in over.items()})
            out[name] = cfg
    return out


MODEL_PRESETS = _build_presets()
PRESET_RANKS = {size: spec[4] for size, spec in SIZES.items()}


def closest(name: str, options) -> str:
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.4)
    return f" (did you mean {match[0]!r}?)" if match else ""


def model_preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in MODEL_PRESETS:
        raise ValueError(f"unknown preset {name!r}{closest(name, MODEL_PRESETS)}; "
                         f"known: {', '.join(MODEL_PRESETS)}")
    kw = dict(MODEL_PRESETS[name])
    kw.update(overrides)
    return ModelConfig(**kw)


def size_of(preset: str) -> str:
    """'llama-60m-elas' -> 'llama-60m'."""
    return max((s for s in SIZES if preset == s or preset.startswith(s + "-")), key=len, default=preset)


@dataclass
class TrainConfig:
    """Everything a run needs; `config.json` in the run directory is this, fully resolved."""
    preset: str = "llama-tiny-elas"
    model: ModelConfig = field(default_factory=ModelConfig)
    data_dir: str = "data/builtin"
    out_dir: str = ""  # default: runs/<preset>
    seq_len: int = 256
    batch_size: int = 16  # sequences per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step; global batch = batch_size * grad_accum * world
    max_steps: int = 1000
    optimizer: str = "adamw"  # adamw | loro_adamw (low-rank models)
    loro_exact_every: int = 500  # LORO: exact Riemannian step (and Adam-state reset) every K steps
    loro_rewarm_steps: int = 5  # LORO: linear lr re-warm after each reset
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100  # linear lr warm-up
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    eval_every: int = 200
    eval_tokens: int = 1_000_000  # validation tokens per evaluation (capped by the split)
    log_every: int = 10
    save_every: int = 200
    keep_checkpoints: int = 2
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    compile: bool = False  # torch.compile the model
    cuda_graphs: bool = True  # replay each step's forward+backward from a CUDA graph (CUDA, single process); false: eager

    def validate(self) -> None:
        self.model.validate()
        for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "log_every", "eval_every", "save_every",
                     "eval_tokens", "keep_checkpoints", "loro_exact_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"invalid {name}={getattr(self, name)!r}: expected a positive integer")
        if self.seq_len > self.model.max_seq_len:
            raise ValueError(f"seq_len={self.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"invalid precision={self.precision!r}: expected auto, bf16 or fp32")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"invalid optimizer={self.optimizer!r}: expected one of {OPTIMIZERS}")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1 or self.warmup_steps < 0:
            raise ValueError(f"invalid schedule: lr={self.lr} (> 0), min_lr_ratio={self.min_lr_ratio} (in [0, 1]), "
                             f"warmup_steps={self.warmup_steps} (>= 0)")


OPTIMIZERS = ("adamw", "loro_adamw")

# LORO's published recipe per size (lr, exact-step period); applied by `elas train --optimizer loro_adamw`
LORO_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama-tiny": {"lr": 0.01, "loro_exact_every": 100, "weight_decay": 0.0},
    "llama-60m": {"lr": 0.01, "loro_exact_every": 500, "weight_decay": 0.0},
    "llama-130m": {"lr": 0.01, "loro_exact_every": 500, "weight_decay": 0.0},
    "llama-350m": {"lr": 0.01, "loro_exact_every": 500, "weight_decay": 0.0},
    "llama-1b": {"lr": 0.005, "loro_exact_every": 200, "weight_decay": 0.0},
    "llama-7b": {"lr": 0.005, "loro_exact_every": 200, "weight_decay": 0.0},
}

# Training defaults per size. The benchmark sizes follow GaLore/ELAS (seq 256, 512 x 256 tokens per step, 10%
# warm-up); llama-tiny is a CPU demo that trains in a few minutes on 2 cores on the built-in corpus.
TRAIN_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama-tiny": {"seq_len": 128, "batch_size": 16, "max_steps": 600, "warmup_steps": 50, "lr": 3e-3,
                   "eval_every": 200, "eval_tokens": 65536, "save_every": 200, "data_dir": "data/builtin-8k",
                   "model.dense_warmup_steps": 200, "model.max_seq_len": 256},
    "llama-60m": {"max_steps": 10_000, "warmup_steps": 1000, "batch_size": 256, "grad_accum": 2},
    "llama-130m": {"max_steps": 20_000, "warmup_steps": 2000, "batch_size": 256, "grad_accum": 2},
    "llama-350m": {"max_steps": 60_000, "warmup_steps": 6000, "batch_size": 128, "grad_accum": 4},
    "llama-1b": {"max_steps": 100_000, "warmup_steps": 10_000, "batch_size": 64, "grad_accum": 8},
    "llama-7b": {"max_steps": 150_000, "warmup_steps": 15_000, "batch_size": 16, "grad_accum": 32},
}


def train_config(preset: str = "llama-tiny-elas") -> TrainConfig:
    """The defaults for a preset: its model, then its size's training defaults."""
    cfg = TrainConfig(preset=preset, model=model_preset(preset))
    apply_overrides(cfg, dict(TRAIN_DEFAULTS.get(size_of(preset), {})))
    return cfg


# ---- overrides ----------------------------------------------------------------------------------------------
def parse_value(text: str, current: Any, key: str) -> Any:
    """Parse a `--set key=value` string with the type of the field's current value."""
    low = text.strip().lower()
    if low in ("none", "null"):
        return None
    if isinstance(current, bool):
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"invalid value {text!r} for {key}: expected true or false")
    try:
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
    except ValueError:
        raise ValueError(f"invalid value {text!r} for {key}: expected a {type(current).__name__}") from None
    if current is None:  # optional field: guess number, else string
        for cast in (int, float):
            try:
                return cast(text)
            except ValueError:
                pass
    return text


def apply_overrides(obj: Any, items: dict[str, Any], prefix: str = "") -> None:
    """Set (possibly dotted) keys on a dataclass tree; unknown keys raise with the closest valid key."""
    names = [f.name for f in fields(obj)]
    for key, value in items.items():
        head, _, rest = key.partition(".")
        if head not in names:
            valid = _all_keys(obj, prefix)
            raise KeyError(f"unknown config key {prefix + key!r}{closest(prefix + key, valid)}")
        cur = getattr(obj, head)
        if rest:
            if not dataclasses.is_dataclass(cur):
                raise KeyError(f"config key {prefix + head!r} has no sub-keys (got {prefix + key!r})")
            apply_overrides(cur, {rest: value}, prefix + head + ".")
        else:
            if dataclasses.is_dataclass(cur):
                raise KeyError(f"config key {prefix + head!r} is a section; set one of its keys, "
                               f"e.g. {prefix + head}.{fields(cur)[0].name}")
            if isinstance(value, str):
                value = parse_value(value, cur, prefix + key)
            setattr(obj, head, value)


def _all_keys(obj: Any, prefix: str = "") -> list[str]:
    keys = []
    for f in fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            keys += _all_keys(v, prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def from_dict(cls, data: dict[str, Any]):
    """Rebuild a (nested) dataclass from to_dict output, ignoring nothing: unknown keys are errors."""
    kw = {}
    known = {f.name: f for f in fields(cls)}
    for k, v in data.items():
        if k not in known:
            raise KeyError(f"unknown config key {k!r} for {cls.__name__}{closest(k, known)}")
        sub = _dataclass_type(cls, known[k])
        kw[k] = from_dict(sub, v) if sub is not None and isinstance(v, dict) else v
    return cls(**kw)


def _dataclass_type(cls, f):
    import typing
    hints = typing.get_type_hints(cls)
    t = hints.get(f.name)
    return t if dataclasses.is_dataclass(t) else None


__all__ = [
    "TrainConfig", "TRAIN_DEFAULTS", "LORO_DEFAULTS", "train_config", "OPTIMIZERS", "ModelConfig", "MODEL_PRESETS", "PRESET_RANKS", "SIZES", "VARIANTS", "model_preset", "relu2_width",
    "apply_overrides", "parse_value", "to_dict", "from_dict", "closest", "size_of",
]
