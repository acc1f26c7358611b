"""Configuration: dataclasses, named presets and variants, and `key=value` overrides.

A preset is plain data named `SIZE-VARIANT` (`llama-60m-elas`); the size alone is the SwiGLU baseline. Model
presets follow the GaLore/ELAS LLaMA benchmark (vocab 32000, untied embeddings). `VARIANTS` is the one registry
of named variants: the presets, `elas bench` and `elas experiment` all read it.

Sparsity methods are listed in `ModelConfig.methods` as plain mappings {"method": NAME, **fields} (the form
config.json records, with the method's "version"); elas.sparsity turns them into configs and applies them when
the model is built. `--set model.NAME.KEY=VALUE` sets a field of a listed method (`model.act24.grad_mode=mask`).
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
from dataclasses import dataclass, field, fields
from typing import Any

FFN_KINDS = ("swiglu", "relu2")
RESIDUAL_DTYPES = ("compute", "fp32")
LM_LOSSES = ("chunked", "logits")
ATTN_BACKENDS = ("auto", "torch", "flash", "cudnn", "efficient", "math", "triton")
RELU2_KERNELS = ("auto", "torch", "fused", "cutlass")
NORM_KERNELS = ("auto", "torch", "fused")
CE_KERNELS = ("auto", "torch", "triton")
ROPE_KERNELS = ("torch", "cutlass")
# model keys that choose kernels, not the model (its parameters and math): a resumed run may change them, its
# losses then differing from the uninterrupted run's in the last bits (another summation order)
KERNEL_KEYS = ("relu2_kernel", "norm_kernel", "rope_kernel", "attn_backend", "fuse_qkv", "pdl", "defer_residual",
               "ce_kernel")
CONFIG_VERSION = 3  # of config.json: 3 = attn_backend "auto" takes elas's attention kernel where it applies (2: torch's
# order); 2 = sparsity as a list of methods (1: flat act_sparsity/grad_mode/... keys)
D_FF_MULTIPLE = 128  # every 2:4 GEMM tile we target divides 128; 8191 (ELAS 1B) would leave a dense tail


def flatten(d: dict, prefix: str = "") -> dict:
    """{"model": {"rank": 8}} -> {"model.rank": 8} (the `--set` key names); lists (a model's methods) kept whole."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


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
    methods: list = field(default_factory=list)  # sparsity methods, [{"method": "act24", ...}] (elas.sparsity)
    # numerics (config.json files written before these keys existed load as fp32 / logits: their runs resume as
    # they were trained)
    residual_dtype: str = "compute"  # compute: the residual stream and norm outputs in the autocast dtype | fp32
    lm_loss: str = "chunked"  # chunked: LM head + cross-entropy without [tokens, vocab] logits | logits
    # the attention kernel (model/llama.py: Attention). triton: elas's causal attention with the rotary embedding
    # inside (kernels/cuda/attention.py; its reference off CUDA), torch's order where it does not apply (a KV
    # cache); torch: torch's own SDPA order (flash first); flash/cudnn/efficient/math: that SDPA backend first;
    # auto: triton on CUDA with Triton installed where the model allows it (head_dim a power of two >= 32, the
    # rotation not in the q/k GEMMs: rope_kernel=torch), else torch (build.attn_backend; 1.007-1.008x the 1B
    # low-rank step on two H100 hosts)
    attn_backend: str = "auto"
    # low-rank attention's q, k, v down-projections as one GEMM of width 3r, then the three up-projections on its
    # column blocks; parameters stay three modules (model/llama.py: Attention.qkv). The 1B low-rank step 1.005-
    # 1.015x on four H100 hosts, 1.023x on an H200; full-rank attention is not fused (no gain measured: 0.996x)
    fuse_qkv: bool = True
    # the dense ReLU^2 FFN's pointwise work: torch (separate kernels around the GEMMs, fused by Inductor when
    # compiled) | fused (inside the two d_ff-wide GEMMs' epilogues: model/ffn.py FusedReLU2, bf16 on CUDA; Triton
    # GEMMs) | cutlass (the same on CUTLASS sm90 GEMMs: kernels/cuda/cutlass_relu2.py, a library built beforehand
    # by `elas build cutlass`) | auto (cutlass where it can run: a Hopper GPU and the library found; else torch)
    relu2_kernel: str = "auto"
    # the blocks' RMSNorm backward: torch (autograd of the ops; compiled: a dx and a dw kernel per norm, and the
    # residual's add) | fused (one pass: dx with the residual's gradient, and dw; kernels/cuda/rmsnorm.py; its
    # reference elsewhere) | auto (fused on CUDA where Triton is installed, else torch: build.norm_kernel)
    norm_kernel: str = "auto"
    # the chunked LM loss's per-chunk softmax and logits' gradient (model/loss.py): torch (its ops; compiled: a
    # reduction and a scaling kernel per chunk, through fp32 logits) | triton (one pass over the logits in the
    # compute dtype: kernels/cuda/xent.py; its reference elsewhere) | auto (triton on CUDA where Triton is
    # installed, else torch: build.ce_kernel). Not used with lm_loss=logits
    ce_kernel: str = "auto"
    # the attention's rotary embedding: torch (its own kernels on q and k; one fused pass when compiled) | cutlass
    # (inside the q/k up-projection GEMM's epilogue, q and k interleaved per head: model/llama.py Attention,
    # kernels/cuda/cutlass_relu2.py; the library built beforehand)
    rope_kernel: str = "torch"
    # the compiled regions' Triton kernels launched with programmatic dependent launch (Hopper and later; Inductor's
    # triton.enable_pdl): each kernel is launched while its predecessor drains, and waits on the device for the
    # data it reads, which shortens the gap between kernels (train/parallelize.py compile_regions)
    pdl: bool = False
    # each block hands the next its FFN output beside the residual stream, and the next block adds the two where it
    # normalises them (the last: the loss head), so that the add is part of the norm's kernel when compiled, not a
    # kernel of its own at the end of every block (the blocks are compiled one by one: train/parallelize.py). The
    # same adds in the same order (model/llama.py Block, LLaMA.forward); decoding with a KV cache keeps the plain form
    defer_residual: bool = False

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

    def method(self, name: str) -> dict | None:
        """The listed method called `name` (its mapping, which may be edited), or None."""
        return next((m for m in self.methods if m["method"] == name), None)

    def validate(self) -> None:
        def bad(name: str, value: Any, valid: str) -> None:
            raise ValueError(f"invalid model.{name}={value!r}: {valid}")

        if self.d_ff is not None and (isinstance(self.d_ff, bool) or not isinstance(self.d_ff, int)):
            bad("d_ff", self.d_ff, "expected a positive integer width (or none: derived from the size)")
        for name in ("d_model", "n_layers", "n_heads", "intermediate", "vocab_size", "max_seq_len"):
            if getattr(self, name) <= 0:
                bad(name, getattr(self, name), "expected a positive integer")
        for name in ("norm_eps", "rope_theta", "init_std"):
            if not 0 < getattr(self, name) < math.inf:
                bad(name, getattr(self, name), "expected a positive finite number")
        if self.ffn not in FFN_KINDS:
            bad("ffn", self.ffn, f"expected one of {FFN_KINDS}")
        if not isinstance(self.methods, list) or not all(isinstance(m, dict) and "method" in m for m in self.methods):
            bad("methods", self.methods, 'expected a list of mappings with a "method" key')
        names = [m["method"] for m in self.methods]
        if len(set(names)) < len(names):
            bad("methods", names, "each method may be listed once")
        if self.methods and self.ffn_width % 4:
            bad("d_ff", self.ffn_width, "2:4 sparsity needs d_ff to be a multiple of 4 (128 recommended)")
        if self.d_model % self.n_heads or self.head_dim % 2:
            bad("n_heads", self.n_heads, f"d_model={self.d_model} must split into heads of even size")
        if self.d_ff is not None and self.d_ff <= 0:
            bad("d_ff", self.d_ff, "expected a positive width (or none: derived from the size)")
        if self.rank < 0:
            bad("rank", self.rank, "expected 0 (full-rank) or a positive rank")
        if self.rank > 0 and self.rank >= min(self.d_model, self.ffn_width):
            # (a rank below that which still saves no parameters builds that linear full-rank: make_linear)
            bad("rank", self.rank, f"a factorisation W = A.B needs rank < min(d_in, d_out) = "
                                   f"{min(self.d_model, self.ffn_width)}; use a smaller rank or 0 (full-rank)")
        if self.lowrank_scope not in ("all", "attn", "ffn"):
            bad("lowrank_scope", self.lowrank_scope, "expected all, attn or ffn")
        if self.residual_dtype not in RESIDUAL_DTYPES:
            bad("residual_dtype", self.residual_dtype, f"expected one of {RESIDUAL_DTYPES}")
        if self.lm_loss not in LM_LOSSES:
            bad("lm_loss", self.lm_loss, f"expected one of {LM_LOSSES}")
        if self.relu2_kernel not in RELU2_KERNELS:
            bad("relu2_kernel", self.relu2_kernel, f"expected one of {RELU2_KERNELS}")
        if self.norm_kernel not in NORM_KERNELS:
            bad("norm_kernel", self.norm_kernel, f"expected one of {NORM_KERNELS}")
        if self.ce_kernel not in CE_KERNELS:
            bad("ce_kernel", self.ce_kernel, f"expected one of {CE_KERNELS}")
        if self.rope_kernel not in ROPE_KERNELS:
            bad("rope_kernel", self.rope_kernel, f"expected one of {ROPE_KERNELS}")
        if self.attn_backend not in ATTN_BACKENDS:
            bad("attn_backend", self.attn_backend, f"expected one of {ATTN_BACKENDS}")
        if self.attn_backend == "triton" and self.rope_kernel == "cutlass":
            bad("attn_backend", self.attn_backend, "rotates q and k itself: set model.rope_kernel=torch with it "
                "(or model.attn_backend=torch)")
        hd = self.d_model // self.n_heads
        if self.attn_backend == "triton" and (hd < 32 or hd & (hd - 1)):
            bad("attn_backend", self.attn_backend,
                f"needs a head_dim that is a power of two >= 32 (this model's is {hd})")


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

@dataclass(frozen=True)
class Variant:
    """A named variant: ModelConfig keys ("size" = the size's LORO/ELAS rank), the optimizer its recipe trains
    with (`elas experiment`; `elas train` takes --optimizer), and its dense twin (the same widths and ranks
    without the method: what benchmarks compare it with)."""
    model: dict
    optimizer: str = "adamw"
    about: str = ""
    twin: str | None = None


ACT24_GRAD_MODES = ("ste", "mask")  # act24.grad_mode (here, not in sparsity/act24.py: the CLI's flags need it
# without importing torch, so that `elas --help` and a bad flag answer at once)


def act24(**fields: Any) -> dict:
    """The mapping of a 2:4 activation-sparsity method (fields: elas.sparsity.Act24Config)."""
    return {"method": "act24", **fields}


def sste24(**fields: Any) -> dict:
    """The mapping of a 2:4 soft-thresholded weight method (fields: elas.sparsity.SSTE24Config)."""
    return {"method": "sste24", **fields}


HAZIZA = dict(grad_mode="mask", permute_tokens=True, wgrad_dense_frac=0.05)  # Haziza et al.'s 2:4 activations


VNM_FAST = {"method": "vnm", "router": True, "router_mode": "own", "m": 16, "path": "grouped",
            "clustering": "contiguous", "sparse_until": 0.3}

VARIANTS: dict[str, Variant] = {
    "swiglu": Variant({}, about="full-rank SwiGLU, the baseline"),
    "relu2": Variant({"ffn": "relu2"}, about="full-rank ungated ReLU^2 FFN, d_ff = 1.5 x SwiGLU rounded up to 128"),
    # relu2-24 without Haziza's split: its weight gradients are exact (dense), and the step is faster with the 2:4
    # kernels here at every size 60M-1B (1B: 0.99x relu2 against 0.97x with the split at batch 32, 1.005x at 64;
    # 60M: 0.96x against 0.83x; benchmarks/results/h200/step_act24*.json): the split's backward kernel runs at
    # 1.0 TB/s and its two along-token sparse GEMMs save less than it costs
    "relu2-24": Variant({"ffn": "relu2", "methods": [act24(grad_mode="mask")]},
                        about="relu2 + 2:4 activations with the forward-mask gradient (Haziza et al.'s, dy1 2:4 too: 2 "
                              "of 6 GEMMs sparse), exact dense weight gradients", twin="relu2"),
    "relu2-24-split": Variant({"ffn": "relu2", "methods": [act24(**HAZIZA)]},
                              about="relu2-24 as Haziza et al. run it: token permutation and the 95/5 weight-gradient "
                                    "split (4 of 6 GEMMs sparse; slower here than relu2-24)", twin="relu2"),
    "lowrank-relu2": Variant({"ffn": "relu2", "rank": "size"}, "loro_adamw",
                             "relu2 with every attention/FFN linear low-rank (W = A.B), dense"),
    "elas": Variant({"ffn": "relu2", "rank": "size", "methods": [act24(grad_mode="ste")]}, "loro_adamw",
                    "lowrank-relu2 + 2:4 activations with a straight-through gradient (ELAS)", "lowrank-relu2"),
    "elas-mask": Variant({"ffn": "relu2", "rank": "size", "methods": [act24(grad_mode="mask")]}, "loro_adamw",
                         "ELAS with the forward-mask gradient (dy1 2:4 too)", "lowrank-relu2"),
    "elas-nowarmup": Variant({"ffn": "relu2", "rank": "size", "methods": [act24(grad_mode="ste",
                                                                              dense_warmup_steps=0)]},
                             "loro_adamw", "ELAS sparse from the first step (ablation of the dense warm-up)",
                             "lowrank-relu2"),
    "relu2-w24": Variant({"ffn": "relu2", "methods": [sste24()]},
                         about="relu2 with 2:4 weights by soft-thresholding (S-STE), dense -> sparse -> dense "
                               "(Madhyastha et al.; emulated)", twin="relu2"),
    "relu2-vnm": Variant({"ffn": "relu2", "methods": [{"method": "vnm", "router": True}]},
                         about="relu2 with V:N:M activations grouped by the neuron router (v=64, m=8: 2 of 8 "
                               "features per token; tokens routed to 16 clusters of neurons fill blocks of 64 that "
                               "share 4 of every 8 features; Madhyastha et al.; emulated; not causal: a block's "
                               "tokens share their selection)", twin="relu2"),
    "relu2-vnm-own": Variant({"ffn": "relu2", "methods": [{"method": "vnm", "router": True, "router_mode": "own",
                                                           "m": 16, "path": "grouped"}]},
                             about="V:N:M on the GPU for real: each token routed to one of 4 clusters of d_ff/4 "
                                   "neurons and multiplied by them only, 2 of every 4 kept (m=16: 87.5% sparse); "
                                   "the FFN's six GEMMs are grouped GEMMs over the clusters (Madhyastha et al.'s "
                                   "router in own mode; accelerated)", twin="relu2"),
    # the configuration measured to meet the V:N:M issue's targets together (docs/performance.md): own mode,
    # grouped, m=16 (87.5% sparse), contiguous clusters, top-1, 20% of the steps sparse (a 10% dense warm-up, then
    # sparse to 30% of the run, then dense)
    "relu2-vnm-fast": Variant({"ffn": "relu2", "methods": [VNM_FAST]},
                              about="relu2-vnm-own with contiguous clusters and 20% of the steps sparse: the V:N:M "
                                    "configuration measured fast (1B FFN 3.0x, step 1.44x) and within 1% of relu2 at "
                                    "60M (accelerated)", twin="relu2"),
    "relu2-vnm-blocks": Variant({"ffn": "relu2", "methods": [{"method": "vnm"}]},
                                about="relu2-vnm without the router: blocks of 64 consecutive tokens share their 4 "
                                      "of 8 features, chosen by exhaustive search (the baseline; emulated; not causal)",
                                twin="relu2"),
    "relu2-w24-vnm": Variant({"ffn": "relu2", "methods": [sste24(), {"method": "vnm", "router": True}]},
                             about="the third paper's full recipe: 2:4 weights by S-STE and routed V:N:M activations "
                                   "(emulated; not causal, as relu2-vnm)", twin="relu2"),
    "relu2-w24-vnm-fast": Variant({"ffn": "relu2", "methods": [sste24(sparse_until=0.3), VNM_FAST]},
                                  about="the full recipe as relu2-vnm-fast runs it (1B step 1.42x): V:N:M accelerated, "
                                        "the 2:4 weights S(W) entering its grouped GEMMs dense (emulated), both sparse "
                                        "over the same 20% of the steps", twin="relu2"),
    "relu2-w24-a24": Variant({"ffn": "relu2", "methods": [act24(**HAZIZA), sste24()]},
                             about="relu2-w24 and relu2-24-split's 2:4 activations together (emulated weights)",
                             twin="relu2"),
}
BENCH_VARIANTS = ("swiglu", "relu2", "relu2-24", "lowrank-relu2", "elas", "elas-mask")  # elas bench ffn/step
# elas bench compile: each dense twin before the variants measured beside it
COMPILE_VARIANTS = ("lowrank-relu2", "elas", "elas-mask", "relu2", "relu2-24")


def preset_name(size: str, variant: str) -> str:
    return size if variant == "swiglu" else f"{size}-{variant}"


def _build_presets() -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for size, (d, inter, heads, layers, rank, vocab) in SIZES.items():
        base = {"d_model": d, "intermediate": inter, "n_heads": heads, "n_layers": layers, "vocab_size": vocab}
        for variant, v in VARIANTS.items():
            cfg = dict(base)
            cfg.update({k: (rank if val == "size" else val) for k, val in v.model.items()})
            out[preset_name(size, variant)] = cfg
    return out


MODEL_PRESETS = _build_presets()
PRESET_RANKS = {size: spec[4] for size, spec in SIZES.items()}


def closest(name: str, options) -> str:
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.4)
    return f" (did you mean {match[0]!r}?)" if match else ""


def model_preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in MODEL_PRESETS:
        # the presets of the size named, where one is (a size has ~12), else the sizes: not all ~100 names
        size = next((sz for sz in sorted(SIZES, key=len, reverse=True) if name == sz or name.startswith(sz + "-")),
                    None)
        known = [n for n in MODEL_PRESETS if n == size or n.startswith(f"{size}-")] if size else list(SIZES)
        raise ValueError(f"unknown preset {name!r}{closest(name, MODEL_PRESETS)}; "
                         f"{f'the {size} presets' if size else 'sizes'}: {', '.join(known)} "
                         f"(all: elas model --list)")
    kw = copy.deepcopy(MODEL_PRESETS[name])
    kw.update(overrides)
    return ModelConfig(**kw)


def size_of(preset: str) -> str:
    """'llama-60m-elas' -> 'llama-60m'."""
    return max((s for s in SIZES if preset == s or preset.startswith(s + "-")), key=len, default=preset)


@dataclass
class TrainConfig:
    """Everything a run needs; `config.json` in the run directory is this, fully resolved."""
    preset: str = "llama-tiny-elas"
    recipe: str = ""  # the named recipe the run started from, "NAME@VERSION" (elas recipes), or ""
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
    # one-file checkpoints are copied to host memory at the step, then written by a thread while training goes
    # on (train/checkpoint.BackgroundSaver); false: the step waits for the write
    async_save: bool = True
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    # the parameters' dtype: fp32 (autocast casts each weight per use) | bf16 (the optimizer keeps fp32 masters:
    # optim/master.py) | auto (bf16 on one CUDA process, fp32 elsewhere: CPU, DDP, FSDP2)
    param_dtype: str = "auto"
    # the Adam moments' dtype of the optimizers over bf16 parameters (MasterAdamW, LORO): fp32 | bf16 (the first
    # moment rounded to nearest, the second stochastically: 20 bytes of optimizer traffic per parameter instead of
    # 28, and 4 bytes less state; optim/master_triton.py) | auto (bf16 where the parameters are bf16, fp32
    # elsewhere; resolved once by the trainer and recorded, so a resumed run keeps its moments). A resume may
    # change it (the state is cast)
    optim_state_dtype: str = "auto"
    compile: bool = True  # torch.compile every block and the loss head (CUDA; CPU runs stay eager)
    init_from: str = ""  # a Hugging Face Llama/Arcee directory whose weights start a new run (full-rank models)
    cuda_graphs: bool = True  # replay each step's forward+backward from a CUDA graph (CUDA, single process); false: eager
    parallel: str = "ddp"  # several processes (torchrun): ddp (replicated) | fsdp (FSDP2: parameters, gradients
    # and optimizer states sharded)
    # keep only each decoder block's input for the backward and recompute the block's activations there (one more
    # forward of every block per step, for the memory of all but one block's activations)
    activation_checkpointing: bool = False
    tensorboard: bool = False  # also log metrics to RUN/tensorboard (needs the tensorboard package: elas[tensorboard])

    def validate(self) -> None:
        self.model.validate()
        for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "log_every", "eval_every", "save_every",
                     "eval_tokens", "keep_checkpoints", "loro_exact_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"invalid {name}={getattr(self, name)!r}: expected a positive integer")
        if self.seq_len > self.model.max_seq_len:
            raise ValueError(f"seq_len={self.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")
        if self.activation_checkpointing and self.model.defer_residual:
            raise ValueError("activation_checkpointing=true with model.defer_residual=true: a checkpointed block keeps "
                             "its inputs, two a block when deferred (one more [batch, seq, d_model] a layer): set "
                             "one of them false")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"invalid precision={self.precision!r}: expected auto, bf16 or fp32")
        if self.param_dtype not in ("auto", "bf16", "fp32"):
            raise ValueError(f"invalid param_dtype={self.param_dtype!r}: expected auto, bf16 or fp32")
        if self.optim_state_dtype not in ("auto", "fp32", "bf16"):
            raise ValueError(f"invalid optim_state_dtype={self.optim_state_dtype!r}: expected auto, fp32 or bf16")
        if self.param_dtype == "bf16" and self.precision == "fp32":
            raise ValueError("param_dtype=bf16 computes in bf16: it needs precision=bf16 or auto, not fp32")
        if not valid_device(self.device):
            raise ValueError(f"invalid device={self.device!r}: expected auto, cpu, cuda or cuda:N")
        for name in ("grad_clip", "weight_decay", "loro_rewarm_steps", "seed"):
            if not getattr(self, name) >= 0:  # (NaN too)
                raise ValueError(f"invalid {name}={getattr(self, name)!r}: expected >= 0")
        if self.seed >= 2**64:  # (torch.manual_seed's range)
            raise ValueError(f"invalid seed={self.seed}: expected an integer in [0, 2^64)")
        if self.weight_decay == math.inf:
            raise ValueError(f"invalid weight_decay={self.weight_decay!r}: expected a finite number >= 0")
        if self.optimizer == "loro_adamw" and self.loro_exact_every <= self.loro_rewarm_steps:
            # the next exact step (a moment reset and a new re-warm) would come before the lr is back on schedule
            raise ValueError(f"loro_exact_every={self.loro_exact_every} must exceed loro_rewarm_steps="
                             f"{self.loro_rewarm_steps}: the lr would never return to its schedule between resets")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"invalid betas ({self.beta1}, {self.beta2}): each in [0, 1)")
        if self.parallel not in PARALLEL:
            raise ValueError(f"invalid parallel={self.parallel!r}: expected one of {PARALLEL}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"invalid optimizer={self.optimizer!r}: expected one of {OPTIMIZERS}")
        if not 0 < self.lr < math.inf or not 0 <= self.min_lr_ratio <= 1 or self.warmup_steps < 0:
            raise ValueError(f"invalid schedule: lr={self.lr} (> 0 and finite), min_lr_ratio={self.min_lr_ratio} (in [0, 1]), "
                             f"warmup_steps={self.warmup_steps} (>= 0)")


def valid_device(name: str) -> bool:
    """Whether `name` is a device elas runs on: auto, cpu, cuda or cuda:N."""
    return name in ("auto", "cpu", "cuda") or (name.startswith("cuda:") and name[5:].isdigit())


OPTIMIZERS = ("adamw", "loro_adamw")
PARALLEL = ("ddp", "fsdp")

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
# warm-up); llama-tiny is a CPU demo that trains in 5-6 minutes on 2 cores on the built-in corpus.
TRAIN_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama-tiny": {"seq_len": 128, "batch_size": 16, "max_steps": 600, "warmup_steps": 50, "lr": 3e-3,
                   "eval_every": 200, "eval_tokens": 65536, "save_every": 200, "data_dir": "data/builtin-8k",
                   "model.act24.dense_warmup_steps": 200, "model.max_seq_len": 256,
                   # the third paper's methods: dense for the first 10% of the demo, as the grid keeps 10% of a run
                   # (their 1000-step default would outlast its 600 steps: refused, see api.check_sparse_window)
                   "model.sste24.dense_warmup_steps": 60, "model.vnm.dense_warmup_steps": 60},
    "llama-60m": {"max_steps": 10_000, "warmup_steps": 1000, "batch_size": 256, "grad_accum": 2},
    "llama-130m": {"max_steps": 20_000, "warmup_steps": 2000, "batch_size": 256, "grad_accum": 2},
    "llama-350m": {"max_steps": 60_000, "warmup_steps": 6000, "batch_size": 128, "grad_accum": 4},
    "llama-1b": {"max_steps": 100_000, "warmup_steps": 10_000, "batch_size": 64, "grad_accum": 8},
    "llama-7b": {"max_steps": 150_000, "warmup_steps": 15_000, "batch_size": 16, "grad_accum": 32},
}


def train_config(preset: str = "llama-tiny-elas") -> TrainConfig:
    """The defaults for a preset: its model, then its size's training defaults."""
    cfg = TrainConfig(preset=preset, model=model_preset(preset))
    apply_overrides(cfg, dict(TRAIN_DEFAULTS.get(size_of(preset), {})), absent_methods_ok=True)
    return cfg


# ---- recipes: named, versioned training runs of the papers (src/elas/recipes/NAME.toml) ----------------------
def recipe_names() -> list[str]:
    from importlib import resources
    return sorted(p.name[:-5] for p in resources.files("elas.recipes").iterdir() if p.name.endswith(".toml"))


def load_recipe(name: str) -> dict:
    """The recipe's TOML as a dict: about, version, preset, training keys, [model] keys."""
    from importlib import resources
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    names = recipe_names()
    if name not in names:
        raise ValueError(f"unknown recipe {name!r}{closest(name, names)}; known: {', '.join(names)}")
    return tomllib.loads(resources.files("elas.recipes").joinpath(f"{name}.toml").read_text())


def recipe_config(name: str) -> TrainConfig:
    """A recipe on top of its preset's defaults (train_config); config.json records NAME@VERSION."""
    r = load_recipe(name)
    cfg = train_config(r["preset"])
    keys = {k: v for k, v in r.items() if k not in ("about", "version", "preset", "model")}
    keys.update(flatten(r.get("model", {}), "model."))  # ([model.act24] tables too, as in a --config file)
    apply_overrides(cfg, keys)
    cfg.recipe = f"{name}@{r['version']}"
    return cfg


# ---- overrides ----------------------------------------------------------------------------------------------
def _a(type_name: str) -> str:
    return {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false"}.get(
        type_name, f"a {type_name}")


def parse_value(text: str, current: Any, key: str, optional: bool = True) -> Any:
    """Parse a `--set key=value` string with the type of the field's current value; `none` only where the
    field may be None (optional)."""
    low = text.strip().lower()
    if low in ("none", "null"):
        if not optional and current is not None:
            raise ValueError(f"invalid value {text!r} for {key}: it cannot be none (expected a "
                             f"{type(current).__name__})")
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
        raise ValueError(f"invalid value {text!r} for {key}: expected {_a(type(current).__name__)}") from None
    if current is None:  # optional field: guess bool, number, else string
        if low in ("true", "false"):
            return low == "true"
        for cast in (int, float):
            try:
                return cast(text)
            except ValueError:
                pass
    return text


def _spells_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def split_variant(variant: str) -> tuple[str, dict[str, str]]:
    """"elas+act24.fused=true" -> ("elas", {"act24.fused": "true"}): a variant with model keys set (as `--set`
    sets them: METHOD.KEY for a key of one of its sparsity methods), so that a benchmark row or a
    quality run can measure an option."""
    name, *sets = variant.split("+")
    over = {}
    for kv in sets:
        key, eq, value = kv.partition("=")
        if not eq or not key:
            raise ValueError(f"bad variant option {kv!r} in {variant!r}: expected KEY=VALUE, e.g. "
                             f"elas+act24.fused=true")
        if key in over:
            raise ValueError(f"variant option {key!r} given twice in {variant!r} ({over[key]!r}, {value!r}): "
                             f"give it once")
        over[key] = value
    return name, over


# training settings a variant may set besides model keys ("lowrank-relu2+optim_state_dtype=bf16"), for a benchmark
# row or a quality run that measures them: the optimizer's numerics, never what makes runs comparable (lr, steps)
TRAIN_KEYS = {"optim_state_dtype": ("fp32", "bf16")}


def train_keys(variant: str) -> tuple[str, dict[str, str]]:
    """("lowrank-relu2+optim_state_dtype=bf16+fuse_qkv=true") -> ("lowrank-relu2+fuse_qkv=true",
    {"optim_state_dtype": "bf16"}); a bad value is a ValueError naming the valid ones."""
    name, sets = split_variant(variant)
    for k in sets:  # a misspelt training key would otherwise be offered the nearest *model* key
        near = difflib.get_close_matches(k, list(TRAIN_KEYS), n=1, cutoff=0.8)
        if k not in TRAIN_KEYS and near:
            raise ValueError(f"unknown variant option {k!r} in {variant!r} (did you mean {near[0]!r}?)")
    train = {k: v for k, v in sets.items() if k in TRAIN_KEYS}
    for k, v in train.items():
        if v not in TRAIN_KEYS[k]:
            raise ValueError(f"invalid {k}={v!r} in {variant!r}: expected {' or '.join(TRAIN_KEYS[k])}")
    return "+".join([name] + [f"{k}={v}" for k, v in sets.items() if k not in TRAIN_KEYS]), train


def apply_overrides(obj: Any, items: dict[str, Any], prefix: str = "", absent_methods_ok: bool = False) -> None:
    """Set (possibly dotted) keys on a dataclass tree; unknown keys raise with the closest valid key.
    On a config with `methods`, `NAME.KEY` sets KEY of the listed method NAME (absent_methods_ok: skip the key
    when NAME is not listed, or lists KEY itself, for defaults that apply to every variant of a size)."""
    names = [f.name for f in fields(obj)]
    for key, value in items.items():
        head, _, rest = key.partition(".")
        if head not in names and isinstance(getattr(obj, "methods", None), list):
            spec = obj.method(head)
            if spec is not None and rest and "." not in rest:
                if absent_methods_ok and rest in spec:  # (a size's default under a key the variant sets itself:
                    continue  # llama-tiny-elas-nowarmup's dense_warmup_steps=0 is the variant)
                cur = spec.get(rest)
                if isinstance(value, str) and isinstance(cur, bool) and value.strip().lower() == "auto":
                    cur = None  # a key whose default is auto, recorded as what it resolved to (act24.cutlass): the
                    # method's config checks the word (a plain true/false field refuses it there, in one line)
                if isinstance(value, str) and isinstance(cur, float) and _spells_number(value):
                    # a number keeps the kind its text spells, as where the preset does not list the key: sparse_until
                    # 0.3 (a -fast preset's, config.json's) is a fraction of the run, but 600 a step, not 600.0
                    cur = None
                spec[rest] = parse_value(value, cur, prefix + key) if isinstance(value, str) else value
                continue
            if spec is None and rest and absent_methods_ok:
                continue
            if rest:
                listed = ", ".join(m["method"] for m in obj.methods) or "none"
                raise KeyError(f"config key {prefix + key!r} sets a field of method {head!r}, which this model does "
                               f"not apply (its methods: {listed})")
        if head not in names:
            if head in _V1_ACT24_KEYS or head == "act_sparsity":  # the version-1 flat keys
                raise KeyError(f"config key {prefix + key!r} is now a field of the act24 method: "
                               f"{prefix}act24.{_V1_ACT24_KEYS.get(head, head)} (or --act-sparsity 2:4 / none)")
            model = getattr(obj, "model", None)
            if rest and hasattr(model, "method") and model.method(head) is not None:  # a method key without model.
                raise KeyError(f"unknown config key {prefix + key!r} (did you mean {prefix + 'model.' + key!r}?)")
            valid = _all_keys(obj, prefix)
            raise KeyError(f"unknown config key {prefix + key!r}{closest(prefix + key, valid)}")
        cur = getattr(obj, head)
        if rest:
            if not dataclasses.is_dataclass(cur):
                raise KeyError(f"config key {prefix + head!r} has no sub-keys (got {prefix + key!r})")
            apply_overrides(cur, {rest: value}, prefix + head + ".", absent_methods_ok)
        else:
            if dataclasses.is_dataclass(cur):
                raise KeyError(f"config key {prefix + head!r} is a section; set one of its keys, "
                               f"e.g. {prefix + head}.{fields(cur)[0].name}")
            kind = str(next(f.type for f in fields(obj) if f.name == head))
            optional = "None" in kind
            if kind == "float" and type(cur) is int:  # a number recorded as an integer (`lr = 1` in a TOML file)
                cur = float(cur)
            if isinstance(value, str) and not isinstance(cur, str):
                value = parse_value(value, cur, prefix + key, optional)
            _check_type(value, cur, prefix + key, optional)
            if kind == "float" and type(value) is int:  # recorded as the number it is (1.0), not as an integer
                value = float(value)
            setattr(obj, head, value)


def _check_type(value: Any, current: Any, key: str, optional: bool) -> None:
    """Values from TOML or Python keep the field's type: ints refuse floats (2.5 steps), bools refuse ints."""
    if value is None:
        if not optional:
            raise ValueError(f"invalid value none for {key}: expected {_a(type(current).__name__)}")
        return
    if current is None or isinstance(current, (list, dict)):
        return
    want = type(current)
    ok = isinstance(value, want) and (want is bool or not isinstance(value, bool))
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        raise ValueError(f"invalid value {value!r} for {key}: expected {_a(want.__name__)}")


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
    d = dataclasses.asdict(obj)
    if isinstance(obj, TrainConfig):
        d["config_version"] = CONFIG_VERSION
    return d


_V1_ACT24_KEYS = {"grad_mode": "grad_mode", "dense_warmup_steps": "dense_warmup_steps",
                  "permute_tokens": "permute_tokens", "wgrad_dense_frac": "wgrad_dense_frac",
                  "kernel_backend": "backend"}


def _migrate_model_v1(data: dict) -> dict:
    """A version-1 model section (flat act_sparsity/grad_mode/... keys) as a version-2 one (a method list)."""
    data = dict(data)
    sparse = data.pop("act_sparsity", None)
    flat = {new: data.pop(old) for old, new in _V1_ACT24_KEYS.items() if old in data}
    if sparse == "2:4":  # (version 1 of the method: its defaults as they were, Act24Config.upgrade)
        data["methods"] = [act24(version=1, **flat)]
    return data


def from_dict(cls, data: dict[str, Any]):
    """Rebuild a (nested) dataclass from to_dict output, ignoring nothing: unknown keys are errors.
    config.json files of version 1 (before sparsity methods were a list) are migrated."""
    version = data.get("config_version", 1)
    if not isinstance(version, int) or version > CONFIG_VERSION:  # (a default whose meaning changed would be misread)
        raise ValueError(f"config of version {version!r} is newer than this elas understands ({CONFIG_VERSION}): "
                         f"upgrade elas to read it")
    data = {k: v for k, v in data.items() if k != "config_version"}
    if cls is TrainConfig and version < 3 and isinstance(data.get("model"), dict):
        # attn_backend "auto" (or no key) meant torch's SDPA order before version 3: a run resumes as it was trained
        model = data["model"]
        if model.get("attn_backend", "auto") == "auto":
            data["model"] = {**model, "attn_backend": "torch"}
    if cls is TrainConfig:  # written before the key: fp32 moments (auto, bf16 over bf16 parameters, came later)
        data = {"optim_state_dtype": "fp32", **data}
    if cls is ModelConfig and ("act_sparsity" in data or "grad_mode" in data):
        data = _migrate_model_v1(data)
    if cls is ModelConfig:  # written before these keys: the model and kernels as it was trained (relu2_kernel's
        # and norm_kernel's defaults became "auto" later, fuse_qkv's true, ce_kernel's auto: a run saved without the
        # key ran torch's kernels)
        data = {"residual_dtype": "fp32", "lm_loss": "logits", "relu2_kernel": "torch", "norm_kernel": "torch",
                "fuse_qkv": False, "ce_kernel": "torch", **data}
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
    "TrainConfig", "TRAIN_DEFAULTS", "LORO_DEFAULTS", "train_config", "OPTIMIZERS", "ModelConfig", "MODEL_PRESETS",
    "PRESET_RANKS", "SIZES", "VARIANTS", "BENCH_VARIANTS", "COMPILE_VARIANTS", "Variant", "act24", "sste24", "preset_name", "model_preset",
    "relu2_width", "FFN_KINDS", "CONFIG_VERSION", "recipe_names", "load_recipe", "recipe_config",
    "apply_overrides", "parse_value", "to_dict", "from_dict", "closest", "size_of", "KERNEL_KEYS",
    "valid_device",
]
