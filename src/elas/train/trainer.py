"""The training loop: schedule, gradient accumulation, clipping, evaluation, sparsity schedule, checkpoints, and
the order in which a model is built, compiled, wrapped or sharded (parallelize.py), initialised and restored.

One optimizer step = `grad_accum` micro-batches of `batch_size` sequences on every process. The data order, the
lr and the sparsity state are pure functions of the step, so a run's position is its step count.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from ..config import TrainConfig, flatten, from_dict, to_dict
from ..data.loader import Batches, TokenWindows, check_token_range, load_meta
from ..data.prepare import DataError
from ..build import (act24_cutlass, attn_backend, build_model, ce_kernel, check_kernels, norm_kernel, relu2_kernel,
                     resolve_methods)
from ..kernels import cublas
from ..optim import build_optimizer, warmup_cosine
from ..sparsity import collect_stats, describe, method_to_dict, run_modes, set_step
from ..sparsity.api import dense_throughout, edit_in_place
from ..summary import model_summary
from .checkpoint import (BackgroundSaver, CheckpointError, any_failed, checkpoints, clear_partial,
                         is_sharded_checkpoint, load_checkpoint, write_atomic,
                         load_optimizer, load_sharded_checkpoint, newest_verified, resume_checkpoint, save_checkpoint,
                         save_sharded_checkpoint, snapshot)
from .distributed import Dist, agree, agree_stop, all_reduce_sum, init_distributed, shutdown
from .parallelize import (allow_mode_graphs, checkpoint_blocks, compile_counts, compile_options, compile_regions,
                          eager_regions, grad_sync, hold_params_in, shard_fsdp, wrap_ddp)
from .step import StepGrads

PROBE_SEQS = 8  # sequences the sparsity statistics of a log step are measured on (a no-grad probe forward)

# dense bf16 tensor-core peak per GPU, for MFU
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


class TrainError(Exception):
    """A user-facing failure: bad data, bad config, unwritable directory, divergence. One line."""


def _saved_train_key(ckpt: Path, key: str):
    """A training key as the checkpoint's config copy (trainer.json) has it; None where it has none."""
    try:
        return (json.loads((Path(ckpt) / "trainer.json").read_text()).get("config") or {}).get(key)
    except (OSError, ValueError, AttributeError):
        return None


# stop votes above any signal's number: rank 0's background checkpoint failed (stop), or another of its writes
# (a metrics line on a full disk) did (save the steps since the last checkpoint where it fits, then stop)
SAVE_FAILED, WRITE_FAILED = 1000, 2000


class Diverged(TrainError):
    """The loss or the weights became NaN/inf; nothing was saved after the last good checkpoint. Every process
    finds it (the check is all-reduced): `quiet` on all but rank 0, which says it."""

    def __init__(self, message: str, step: int, quiet: bool = False):
        super().__init__(message)
        self.step, self.quiet = step, quiet


class _StartError(TrainError):
    """A failure that every process of a run raises alike (at start-up, or learnt from rank 0 through a vote);
    `quiet` on all but rank 0, which says it (one line, not one per process)."""

    def __init__(self, message: str, quiet: bool = False):
        super().__init__(message)
        self.quiet = quiet


class TrainStopped(TrainError):
    """A run stopped by a signal (Ctrl-C, a scheduler's SIGTERM) after its checkpoint was written: not a failure.
    `elas train` exits with 128 + the signal's number, as a process killed by it would be reported."""

    def __init__(self, signum: int, step: int, run_dir: Path, quiet: bool = False, complete: bool = False,
                 world: int = 1, global_batch: int = 0):
        # quiet: a process other than rank 0 (which says it); complete: the run had finished (the grid's stop
        # between runs), so nothing was in progress; world, global_batch: a run of several processes (torchrun),
        # which `elas train --resume` alone would continue in one process, with another global batch
        self.signum, self.quiet, self.complete = signum, quiet, complete
        how = (f"`elas train --out {run_dir} --resume`" if world <= 1 else
               f"the same torchrun command with `--resume` ({world} processes; on another number keep batch_size x "
               f"grad_accum x processes = {global_batch}, the global batch, so the run continues exactly)")
        super().__init__(f"stopped by signal {signum} at step {step}; checkpoint saved: continue with {how}")


def pick_device(name: str) -> torch.device:
    """The run's device, with its index where it is a GPU ("cuda" -> "cuda:<current>"): torch.cuda.set_device refuses
    a device without one, and the tensors a run makes report theirs."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type != "cuda":
        return dev
    if not torch.cuda.is_available():
        raise TrainError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    if dev.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    if dev.index >= torch.cuda.device_count():
        raise TrainError(f"device {name!r} requested but this machine has {torch.cuda.device_count()} GPU(s): "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return dev


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    gpu = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in gpu), None)


def check_fits(cfg: TrainConfig, device: torch.device, param_dtype: str = "bf16") -> None:
    """A run that cannot fit the device's memory, refused before any data or model is made (the OS would kill a
    CPU run without a word). The bound is a floor of two parts, each less than any step holds:
    - the weights and their optimizer state, per parameter: the weight and its gradient in param_dtype (the
      resolved one), AdamW's two moments (fp32, or bf16 with optim_state_dtype bf16 or auto over bf16 weights)
      and bf16 weights' fp32 master: 16 bytes, or 12 with bf16 moments; over the processes where FSDP shards them;
    - one micro-batch's activations: every block's input [batch_size x seq_len, d_model] at 2 bytes (bf16, the
      narrowest the step computes in), what even activation checkpointing keeps.
    A step needs more (the other activations, the logits, the allocator's slack), so a refused run could never
    have fitted."""
    if device.type == "cuda":
        total, where = torch.cuda.get_device_properties(device).total_memory, f"{device}'s"
    elif hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        total, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's"
    else:  # (no way to ask: nothing is refused)
        return
    m = cfg.model
    acts = m.n_layers * cfg.batch_size * cfg.seq_len * m.d_model * 2
    if acts > total:
        raise TrainError(f"batch_size={cfg.batch_size} x seq_len={cfg.seq_len} cannot fit: one micro-batch's "
                         f"activations need at least {acts / 2**30:,.1f} GiB (the {m.n_layers} blocks' inputs alone), "
                         f"more than {where} {total / 2**30:,.1f} GiB; lower batch_size and raise grad_accum to keep "
                         f"the global batch")
    from ..build import build_model
    n = sum(p.numel() for p in build_model(m, "meta").parameters())
    bf16_moments = cfg.optim_state_dtype == "bf16" or (cfg.optim_state_dtype == "auto" and param_dtype == "bf16")
    per = (2 + 2 + 4 if param_dtype == "bf16" else 4 + 4) + 2 * (2 if bf16_moments else 4)
    shards = max(int(os.environ.get("WORLD_SIZE", "1")), 1) if cfg.parallel == "fsdp" else 1
    state = n * per // shards
    what = (f"its weights, gradients and optimizer state need {state / 2**30:,.1f} GiB ({per} bytes a {param_dtype} "
            f"parameter" + (f", over {shards} FSDP processes" if shards > 1 else "") + ")")
    if state > total:
        raise TrainError(f"a model of {n / 1e9:,.2f}B parameters cannot train here: {what}, more than {where} "
                         f"{total / 2**30:,.1f} GiB; choose a smaller model" +
                         (", or shard it over more GPUs with parallel=fsdp under torchrun" if device.type == "cuda"
                          else ", or train it on GPUs"))
    if state + acts > total:
        raise TrainError(f"batch_size={cfg.batch_size} x seq_len={cfg.seq_len} cannot fit beside the model: {what} "
                         f"and one micro-batch's activations at least {acts / 2**30:,.1f} GiB more (the "
                         f"{m.n_layers} blocks' inputs alone), more than {where} {total / 2**30:,.1f} GiB; lower "
                         f"batch_size and raise grad_accum to keep the global batch")


def check_writable(path: Path) -> None:
    file = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if file is not None:
        raise TrainError(f"--out {path}: {file} is a file, not a directory; choose another --out")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise TrainError(f"output directory {path} is not writable ({e.strerror or e}); choose another --out") from None


RESUMES = "resumes.jsonl"  # one line per resume that changed the run's plan: {"step", "changed": {key: [old, new]}}


def config_changes(old: dict, new: dict) -> dict:
    """{key: [old, new]} of the training keys two config.json dicts differ in, each read as a resume reads it
    (from_dict: older versions migrated, absent keys at their defaults). Model keys are left out: a resume keeps
    its model, and the kernel keys it may change are resolved per machine (and said at the start); so are the run
    directory's own path (a moved run is the same run) and the file's version."""
    a, b = (to_dict(from_dict(TrainConfig, d)) for d in (old, new))
    skip = ("model", "out_dir", "config_version")
    return {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b)) if k not in skip and a.get(k) != b.get(k)}


def record_resume(run_dir: Path, step: int, new: dict) -> dict:
    """Before a resume rewrites config.json with its settings: the training keys it changes, with their old values,
    appended to RESUMES as one line (nothing where none changed, or where config.json is unreadable: the
    checkpoint's copy then stands for it, load_run_config). config.json holds the latest plan, RESUMES what each
    resume replaced. A line equal to the last one is not written twice (a resume whose config.json write failed,
    resumed again)."""
    try:
        old = json.loads((Path(run_dir) / "config.json").read_text())
        changed = config_changes(old, new) if isinstance(old, dict) else {}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}
    if changed:
        path = Path(run_dir) / RESUMES
        lines = path.read_bytes() if path.exists() else b""
        if lines and not lines.endswith(b"\n"):  # (a torn last line, from a kill mid-write in another version)
            lines = lines[:lines.rfind(b"\n") + 1]
        line = (json.dumps({"step": step, "changed": changed}) + "\n").encode()
        if not lines.endswith(line):
            write_atomic(path, lines + line)
    return changed


def read_metrics(path: Path, bad: list | None = None) -> list[dict]:
    """The records of a run's metrics.jsonl. Lines are appended one at a time, so a run killed while writing one
    leaves at most its last line torn: that line is dropped. Any other bad line is an error, unless `bad` is given:
    then its (line number, text) pairs are appended there and the line skipped."""
    lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip()] if Path(path).exists() else []
    recs = []
    for i, ln in enumerate(lines):
        try:
            recs.append(json.loads(ln))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                if bad is None:
                    raise ValueError(f"{path}: line {i + 1} is not JSON: {ln[:80]!r}") from None
                bad.append((i + 1, ln))
    return recs


def truncate_metrics(path: Path, step: int) -> list[int]:
    """Drop metric lines of steps after `step` (written by a run killed after its last checkpoint), and a torn last
    line; the file is rewritten whole or not at all. A damaged line elsewhere (an edit, a disk error) does not stop
    a resume: it is appended to <path>.bad and its number returned."""
    if not path.exists():
        return []
    bad: list = []
    keep = [json.dumps(r) for r in read_metrics(path, bad) if r.get("step", 0) <= step]
    if bad:
        with open(path.with_name(path.name + ".bad"), "a") as fh:
            fh.write("".join(ln + "\n" for _, ln in bad))
    write_atomic(path, "".join(ln + "\n" for ln in keep).encode())  # (a failed write leaves no temporary file)
    return [i for i, _ in bad]


def _write_failed(path: Path, e: OSError, run_dir: Path) -> str:
    """One line for a run file that could not be written (a full disk, say)."""
    return (f"could not write {path} ({os.strerror(e.errno) if e.errno else e}); the newest complete checkpoint is "
            f"{getattr(newest_verified(run_dir), 'name', 'none')}: free space, then `elas train --out {run_dir} "
            f"--resume`")


def run_tokenizer(run_dir: str | Path, cfg: TrainConfig) -> Path:
    """The tokenizer.json of a run: its own copy (written at its start), else its dataset's (runs of older
    versions)."""
    own = Path(run_dir) / "tokenizer.json"
    return own if own.is_file() else Path(cfg.data_dir) / "tokenizer.json"


def check_same_data(ckpt: Path, meta: dict, data_dir: str, full_rank: bool = True) -> None:
    """A resume continues on the data its checkpoint was trained on: the training split's SHA-1 and the tokenizer's
    vocabulary, as the checkpoint recorded them (checkpoints of older versions record none: not checked).
    full_rank: whether the run's weights can start another run (`--init-from` takes full-rank models only)."""
    try:
        saved = json.loads((Path(ckpt) / "trainer.json").read_text()).get("data") or {}
    except (OSError, json.JSONDecodeError):
        return
    now = {"train_sha1": meta.get("train_sha1"), "vocab_size": meta.get("vocab_size")}
    diff = [f"{k} {saved[k]} -> {now[k]}" for k in now if saved.get(k) is not None and now[k] is not None
            and saved[k] != now[k]]
    if diff:
        raise TrainError(f"{data_dir} is not the data checkpoint {Path(ckpt).name} was trained on ({'; '.join(diff)}): "
                         f"resume with the run's own data (--data), or start a new run (--out)" +
                         (" from its weights (`elas export`, then --init-from)" if full_rank else ""))


def check_same_tokenizer(init_from: str, data_dir: str) -> None:
    """A run started from other weights (--init-from) reads token ids as those weights learned them: the two
    tokenizer.json vocabularies must be the same (where either is missing there is nothing to compare)."""
    def vocab(d: str):
        try:
            return json.loads((Path(d) / "tokenizer.json").read_text()).get("model", {}).get("vocab")
        except (OSError, ValueError, AttributeError):
            return None
    a, b = vocab(init_from), vocab(data_dir)
    if a is not None and b is not None and a != b:
        raise TrainError(f"--init-from {init_from} was trained with another tokenizer than {data_dir}'s (their "
                         f"vocabularies differ): prepare the data with its tokenizer (`elas data prepare --tokenizer "
                         f"{init_from} ...`)")


# run directory -> the descriptor of its lock file, for the run directories this process trains into
_LOCKS: dict[str, int] = {}


def log_line(msg: str) -> None:
    """The default log: each line flushed, so that a log file or a pipe shows it as it comes (print alone holds
    lines back there until its buffer fills)."""
    print(msg, flush=True)


def lock_run_dir(run_dir: Path) -> None:
    """Hold <run_dir>/.lock (an exclusive flock) while this process trains there: a second process (a requeued job
    while the first still runs) stops with a one-line error instead of writing the same checkpoints and metrics.
    Reentrant within a process; released by unlock_run_dir or when the process ends (a kill included)."""
    key = str(Path(run_dir).resolve())
    if key in _LOCKS:
        return
    try:
        import fcntl
    except ImportError:  # (no flock on this platform: no lock)
        return
    fd = os.open(Path(run_dir) / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if not isinstance(e, BlockingIOError):  # (ENOLCK, ENOSYS, ...: a file system without flock, not a holder)
            os.close(fd)
            print(f"elas: warning: {run_dir} cannot be locked on this file system ({os.strerror(e.errno)}): "
                  f"nothing stops a second process from training into it", file=sys.stderr)
            return
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        raise TrainError(f"{run_dir} is in use by another elas process" + (f" (pid {holder})" if holder else "") +
                         ": two processes training into one run directory would overwrite each other's checkpoints; "
                         "wait for it to end or stop it") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    _LOCKS[key] = fd


def unlock_run_dir(run_dir: Path) -> None:
    fd = _LOCKS.pop(str(Path(run_dir).resolve()), None)
    if fd is not None:
        os.close(fd)


@torch.no_grad()
def evaluate(model, windows: TokenWindows, tokens: int, batch_size: int, device, autocast, d: Dist = Dist(),
             agree_on_failure: bool = False):
    """Mean next-token loss over the first min(tokens // seq_len, all) validation windows; returns (loss, n_tokens).
    Full batches run through the model as it is: compiled regions compile one no-grad graph each per sparsity mode
    (eager evaluation of a 7B model ran at 7.5k tokens/s, a quarter of its training step's rate). A last,
    smaller batch runs with the regions eager: its shape would compile them again.
    agree_on_failure (several processes whose forward has no collective: DDP, not FSDP): a process whose
    evaluation fails (out of memory, say) still joins the final all-reduce, which tells every process; each then
    raises with `elas_agreed` set (the failing ones their own error, the others a quiet one), so that they can
    save together instead of leaving their peers in a collective."""
    n = max(1, min(windows.n, tokens // windows.seq_len))
    was_training = model.training
    model.eval()
    total = torch.zeros(3, dtype=torch.float64, device=device)  # [sum of token losses, tokens, failed processes]
    mine = torch.arange(n)[d.rank::d.world]
    error = None
    try:
        # every process runs as many forwards as the one with the most windows: under FSDP each forward gathers the
        # weights (and DDP broadcasts buffers), so a process with one batch more would wait for the others forever.
        # One out of windows runs window 0 and counts nothing
        for i in range(0, -(-n // d.world), batch_size):
            idx = mine[i:i + batch_size]
            x, y = windows.get((idx if len(idx) else torch.zeros(1, dtype=torch.long)).numpy())
            x, y = x.to(device), y.to(device)
            with autocast(), (eager_regions() if x.shape[0] < batch_size else nullcontext()):
                loss = model(x, y)
            if len(idx):
                total[:2] += torch.stack([loss.double() * y.numel(), torch.tensor(float(y.numel()), device=device)])
    except Exception as e:  # noqa: BLE001 - whatever failed, the others learn it from the reduce below
        if not (d.enabled and agree_on_failure):
            model.train(was_training)
            raise
        error, total[2] = e, 1.0
    all_reduce_sum(total, d)
    model.train(was_training)
    if total[2] > 0:
        if error is None:
            error = _StartError(f"{int(total[2].item())} other process(es) failed during the evaluation: see their "
                                f"error above", quiet=True)
        error.elas_agreed = True  # every process knows: they may save together (Trainer._save_before_failing)
        raise error
    return (total[0] / total[1]).item(), int(total[1].item())


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool | str = False, log=log_line, progress: bool = True):
        """resume: False (the run directory must hold no checkpoint), True (it must: continue from its newest
        checkpoint that verifies) or "auto" (continue if there is one, else start)."""
        self.cfg, self.log, self.progress = cfg, log, progress
        self._t_created = time.perf_counter()
        self.elapsed_before = 0.0  # seconds the run took in earlier processes, up to the checkpoint it resumes
        try:
            cfg.validate()
            # the methods' own keys, before any data is read; config.json then records them in full, versioned
            methods = resolve_methods(cfg.model)
            # (before the process group: every process finds the same; the first says it)
            warn = log if int(os.environ.get("RANK", "0")) == 0 else (lambda *a: None)
            for m in methods:
                m.check_run(cfg.max_steps, cfg.batch_size * cfg.seq_len)
                m.check_with(methods)
                if not m.causal:
                    warn(f"elas: warning: {m.name} is not causal in its sparse steps (SparsityMethod.causal): a "
                        f"token's output depends on later tokens of its block (and other sequences); its loss is not "
                        f"a causal model's, and generation (a token at a time) computes another function")
                if dense_throughout(m, cfg.max_steps):
                    warn(f"elas: warning: {m.name} stays dense for the whole run: its dense warm-up "
                        f"(dense_warmup_steps={m.dense_warmup_steps}) is not shorter than max_steps={cfg.max_steps}; "
                        f"lower model.{m.name}.dense_warmup_steps for sparse steps")
            cfg.model.methods = [method_to_dict(m) for m in methods]
            if cfg.warmup_steps > cfg.max_steps:  # (step s trains at (s + 1) / warmup_steps of it: equal, the
                # last step reaches the peak)
                warn(f"elas: warning: the learning rate never reaches lr={cfg.lr:g}: its linear warm-up "
                    f"(warmup_steps={cfg.warmup_steps}) is longer than max_steps={cfg.max_steps}; lower "
                    f"warmup_steps")
        except (ValueError, TypeError) as e:
            raise TrainError(str(e)) from None
        if cfg.tensorboard:
            try:
                import tensorboard  # noqa: F401  (torch's SummaryWriter needs it)
            except ImportError:
                raise TrainError("tensorboard=true needs the tensorboard package: pip install 'elas[tensorboard]' "
                                 "(or tensorboard)") from None
        self.device = pick_device(cfg.device)
        self.dist = init_distributed(self.device.type)
        if self.device.type == "cuda" and self.dist.enabled:
            self.device = torch.device("cuda", self.dist.local_rank)
        if self.device.type == "cuda":  # (--device cuda:1 too: kernels launched on the current stream)
            torch.cuda.set_device(self.device)
        bf16 = computes_in_bf16(cfg, self.device)
        self.param_dtype = resolve_param_dtype(cfg, self.device, self.dist.enabled, bf16,
                                               resume_from=(cfg.out_dir or f"runs/{cfg.preset}") if resume else None)
        self.moments_auto = cfg.optim_state_dtype == "auto"
        if self.moments_auto:  # recorded resolved (config.json); a resume keeps its checkpoint's moments (also
            # where this config is not the run's own: `--resume` without --out takes the preset's)
            saved = saved_optimizer_dtypes(cfg.out_dir or f"runs/{cfg.preset}")[2] if resume else None
            cfg.optim_state_dtype = saved or ("bf16" if self.param_dtype == "bf16" else "fp32")
        # model.relu2_kernel=auto is resolved once, here, and the run records the kernel it took (config.json and
        # each checkpoint's copy): a resumed run takes the kernels of the run it resumes, whatever this machine
        # would pick; a kernel it cannot run is a one-line error naming the key that turns it off
        self.kernel_note = None  # (what "auto" kernel keys resolved to on a GPU: logged at the start)
        # this process's answers only: a collective here would come before `agree`, where processes started with
        # other settings (relu2_kernel=auto on one, torch on another) or one that failed would leave the others
        # waiting in it; the ranks agree on the ReLU^2 kernel after `agree` (below). A kernel that cannot run
        # here is this process's start-up error, which `agree` tells every process
        relu2_asked, relu2_auto = cfg.model.relu2_kernel, None  # relu2_auto: (kernel, why) this process found
        methods_asked, cutlass_auto = [dict(m) for m in cfg.model.methods], []  # likewise act24.cutlass=auto
        error = None  # (kept until every process has compared its start-up: `agree`)
        try:
            check_fits(cfg, self.device, self.param_dtype)  # (also where the CLI did not start the run: elas experiment)
            if cfg.model.relu2_kernel == "auto":
                relu2_auto = relu2_kernel(cfg.model, self.device)
                cfg.model.relu2_kernel = relu2_auto[0]
            cutlass_auto = act24_cutlass(cfg.model, self.device)  # likewise: the 2:4 FFN's CUTLASS epilogues
            if cfg.model.norm_kernel == "auto":  # likewise recorded: a resumed run keeps its norms' backward
                cfg.model.norm_kernel = norm_kernel(cfg.model, self.device)
            if cfg.model.ce_kernel == "auto":  # likewise: a resumed run keeps its loss's kernel
                cfg.model.ce_kernel = ce_kernel(cfg.model, self.device)
            if cfg.model.attn_backend == "auto":  # likewise: a resumed run keeps its attention kernel
                cfg.model.attn_backend = attn_backend(cfg.model, self.device)
                if self.device.type == "cuda":
                    self.kernel_note = "; ".join(filter(None, [self.kernel_note, "attention: " + (
                        "elas's kernel, the rotary embedding inside (model.attn_backend=auto; =torch for torch's "
                        "SDPA)" if cfg.model.attn_backend == "triton" else
                        "torch's SDPA (model.attn_backend=auto: elas's kernel needs a Hopper GPU and head_dim "
                        "32-128)")]))
            if self.device.type == "cuda":
                self.kernel_note = "; ".join(filter(None, [self.kernel_note, cublas.describe(
                    cublas.workspace_in_effect())]))
            check_kernels(cfg.model, self.device)
            if cfg.compile and self.device.type == "cuda":
                compile_options(cfg.model)  # (model.pdl on a torch without it)
        except (ValueError, TrainError) as e:  # (also a bad ELAS_CUTLASS_SKIP)
            error = str(e)
        # data, before the run directory exists: a failed check leaves nothing behind. config.json records the
        # data directory absolute, so eval/generate/--resume work from any working directory
        cfg.data_dir = str(Path(cfg.data_dir).resolve())
        try:
            self.meta = load_meta(cfg.data_dir)
            self.train_windows = TokenWindows(cfg.data_dir, "train", cfg.seq_len)
            self.val_windows = TokenWindows(cfg.data_dir, "val", cfg.seq_len)
            if self.meta["vocab_size"] > cfg.model.vocab_size:
                fix = ("resume with the run's own data (--data), or start a new run (--out)" if resume is True else
                       f"--set model.vocab_size={self.meta['vocab_size']} or prepare the data with --vocab-size "
                       f"{cfg.model.vocab_size}")  # (a resumed run's vocabulary cannot change)
                raise TrainError(f"the tokenizer of {cfg.data_dir} has {self.meta['vocab_size']} tokens but the "
                                 f"model's vocab_size is {cfg.model.vocab_size}: {fix}")
            check_token_range(cfg.data_dir, self.meta, cfg.model.vocab_size)
            if cfg.init_from and resume is not True:
                check_same_tokenizer(cfg.init_from, cfg.data_dir)
        except (DataError, TrainError) as e:
            error = error or str(e)
        # several processes: the same config and data everywhere, and no process stopped, before anything else
        settings = {k: v for k, v in flatten(to_dict(cfg)).items() if k not in ("device", "data_dir")}  # (data: by hash)
        settings["model.relu2_kernel"] = relu2_asked  # (as given: "auto" is resolved together, below)
        settings["model.methods"] = methods_asked
        settings["data.train_sha1"] = (getattr(self, "meta", None) or {}).get("train_sha1")
        error = agree(self.dist, error, settings)
        if error:
            raise _StartError(error, quiet=self.dist.enabled and not self.dist.main)
        if relu2_auto is not None:  # every process is here (its settings agreed): the same ReLU^2 kernel on all
            kernel, why = relu2_auto
            if self.dist.enabled:  # cutlass only where every rank can run it
                ok = torch.tensor([float(kernel == "cutlass")], device=self.device)
                if all_reduce_sum(ok, self.dist).item() < self.dist.world and kernel == "cutlass":
                    kernel, why = "torch", "another rank cannot run the CUTLASS kernels"
            cfg.model.relu2_kernel = kernel
            if self.device.type == "cuda" and cfg.model.ffn == "relu2":
                self.kernel_note = "; ".join(filter(None, [
                    f"dense ReLU^2 cores: {kernel} kernels (model.relu2_kernel=auto: " +
                    (f"the CUTLASS library at {why})" if kernel == "cutlass" else f"{why})"), self.kernel_note]))
        if cutlass_auto:  # act24.cutlass=auto: on only where every rank can run the library
            if self.dist.enabled:
                ok = torch.tensor([float(use) for _, use, _ in cutlass_auto], device=self.device)
                every = (all_reduce_sum(ok, self.dist) == self.dist.world).tolist()
                cutlass_auto = [(i, use and all_, why if all_ or not use else
                                 "auto: another rank cannot run the CUTLASS kernels")
                                for (i, use, why), all_ in zip(cutlass_auto, every)]
            for i, use, why in cutlass_auto:
                cfg.model.methods[i]["cutlass"] = use
                if self.device.type == "cuda":
                    self.kernel_note = "; ".join(filter(None, [self.kernel_note, "2:4 FFN: " + (
                        "CUTLASS GEMMs with the 2:4 work in their epilogues where faster (act24.cutlass=auto; "
                        "=false for cuBLAS + the separate kernels)" if use else
                        f"cuBLAS + the separate 2:4 kernels (act24.cutlass={why})")]))
        self.run_dir = Path(cfg.out_dir or f"runs/{cfg.preset}")
        found = checkpoints(self.run_dir)
        if found and not resume:
            raise _StartError(f"{self.run_dir} already holds a run (checkpoint {found[0].name}); pass --resume to "
                              f"continue it or choose another --out", quiet=self.dist.enabled and not self.dist.main)
        # the run directory locked (one job at a time) and seen by every process (each reads and writes checkpoints
        # there), before rank 0 moves damaged checkpoints aside in it
        claim = resume is not True or self.run_dir.is_dir()
        if self.dist.enabled:  # one answer for every process: the claim is collective, and a directory that only
            # some processes see (one on each node's own disk) is what it refuses; a process that sees none would
            # otherwise skip it and leave the others waiting in it
            claim = bool(all_reduce_sum(torch.tensor([float(claim)], device=self.device), self.dist).item())
        if claim:
            self._claim_run_dir()
        self.ckpt = None
        if resume:  # rank 0 moves damaged checkpoints aside; then every rank takes the newest that verifies
            if self.dist.main:
                self.ckpt = resume_checkpoint(self.run_dir, log)
            if self.dist.enabled:
                torch.distributed.barrier()
            if not self.dist.main:
                self.ckpt = newest_verified(self.run_dir)
        if resume is True and self.ckpt is None:
            raise _StartError(f"--resume: {self.run_dir} holds no checkpoint that verifies" +
                              (" (the damaged ones were moved aside as *.corrupt)" if found else "") +
                              "; drop --resume to start a new run there, or pass --resume auto",
                              quiet=self.dist.enabled and not self.dist.main)  # (every process finds the same)
        if self.ckpt is None and self.dist.main:
            # the run starts at step 0 where an earlier one logged steps (every checkpoint damaged, or a run that
            # stopped before its first checkpoint): that log stays beside it (the fresh start would otherwise
            # truncate metrics.jsonl to nothing)
            old = self.run_dir / "metrics.jsonl"
            if old.is_file() and old.stat().st_size:
                aside = old.with_name(f"metrics.before-restart-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
                os.replace(old, aside)
                why = "no checkpoint of it verifies" if found else "it holds no checkpoint"
                log(f"elas: {self.run_dir} starts again at step 0 ({why}); its earlier metrics were moved to "
                    f"{aside.name}")
        if self.ckpt is not None:
            self._check_param_dtype()
            check_same_data(self.ckpt, self.meta, cfg.data_dir, full_rank=cfg.model.rank == 0)

        self.global_batch = cfg.batch_size * cfg.grad_accum * self.dist.world
        self.batches = Batches(self.train_windows, self.global_batch, cfg.seed, self.dist.rank, self.dist.world)

        # model and optimizer. parallel=fsdp builds on the meta device and initialises after sharding
        # (LLaMA.init_weights: by parameter name, so the values do not depend on the process count)
        self.fsdp = cfg.parallel == "fsdp"
        meta = self.fsdp and not (cfg.init_from and self.ckpt is None)
        torch.manual_seed(cfg.seed)
        try:
            self.model = build_model(cfg.model, "meta" if meta else self.device, materialise_on=self.device)
            if cfg.init_from and self.ckpt is None:  # a new run from a Hugging Face checkpoint (a resume has its own)
                from ..export import load_hf_weights
                load_hf_weights(self.model, cfg.model, Path(cfg.init_from))
        except (ValueError, TypeError, OSError) as e:  # a method that cannot apply (2:4 on SwiGLU), a bad
            raise TrainError(str(e)) from None  # --init-from, a kernel library that is missing
        self.step, self.tokens = 0, 0
        self.saved_max_steps = None  # the max_steps the resumed checkpoint was trained towards (its config copy)
        self.saved_position = None  # the resumed checkpoint's data position (samples read: step x its global batch)
        self.cublas_note = None  # a resume under another cuBLAS workspace setting (logged after "resumed from")
        self.modes: tuple = ()  # the sparsity methods' modes at the current step
        sharded_ckpt = self.ckpt is not None and is_sharded_checkpoint(self.ckpt)
        if self.ckpt is not None and not sharded_ckpt:  # weights into the whole model, before any sharding
            if meta:
                raise _StartError(f"checkpoint {self.ckpt} holds whole tensors, but parallel=fsdp resumes from the "
                                  f"sharded checkpoints it writes; resume with --set parallel=ddp",
                                  quiet=self.dist.enabled and not self.dist.main)
            try:
                state = load_checkpoint(self.ckpt, self.model)
            except CheckpointError as e:
                raise TrainError(str(e)) from None
            self.step, self.tokens = state["step"], state["tokens"]
            self.elapsed_before = float(state.get("elapsed_s", 0.0))  # absent in checkpoints of older versions
            self.saved_max_steps = (state.get("config") or {}).get("max_steps")
            self.saved_position = state.get("data_position")
            self.cublas_note = self._cublas_note(state)
        # compiled regions on CUDA (CPU runs stay eager: CI and demos need no compiler); then DDP wraps the model,
        # or FSDP2 shards it (parameters become DTensors: the optimizer is built on the shards)
        self.compiled = cfg.compile and self.device.type == "cuda"
        if self.compiled and importlib.util.find_spec("triton") is None:  # Inductor generates Triton on GPUs
            self.compiled = False
            log("elas: not compiling: Triton is not installed (pip install triton, or --set compile=false)")
        if cfg.activation_checkpointing:  # before compiling and sharding (the blocks keep their names)
            checkpoint_blocks(self.model)
        if self.compiled:
            allow_mode_graphs(len(run_modes(self.model, cfg.max_steps)))
            compile_regions(self.model)
        self.sharded = self.dist.enabled and self.fsdp
        if self.sharded:
            shard_fsdp(self.model, self.device, bf16)
        if meta:  # storage for this process's shards (or the whole model on one process), then the values
            self.model.to_empty(device=self.device)
            self.model.init_weights(cfg.seed)
        if self.param_dtype == "bf16":  # after the weights are loaded, before the optimizer takes its fp32 masters
            hold_params_in(self.model, torch.bfloat16)
        if self.ckpt is not None:  # (its state would not fit this optimizer's groups: "corrupt", which it is not)
            was = _saved_train_key(self.ckpt, "optimizer")
            if was not in (None, cfg.optimizer):
                raise _StartError(f"checkpoint {self.ckpt} was trained with optimizer={was}, this run asks for "
                                  f"{cfg.optimizer}: a resumed run keeps its optimizer; start a new run (another "
                                  f"--out) for {cfg.optimizer}", quiet=self.dist.enabled and not self.dist.main)
        try:
            self.optimizer = build_optimizer(self.model, cfg)
        except ValueError as e:
            raise TrainError(str(e)) from None
        if self.ckpt is not None:  # optimizer state; a sharded checkpoint reshards everything onto this run
            try:
                if sharded_ckpt:
                    state = load_sharded_checkpoint(self.ckpt, self.model, self.optimizer)
                    self.step, self.tokens = state["step"], state["tokens"]
                    self.elapsed_before = float(state.get("elapsed_s", 0.0))
                    self.saved_max_steps = (state.get("config") or {}).get("max_steps")
                    self.saved_position = state.get("data_position")
                    self.cublas_note = self._cublas_note(state)
                else:
                    load_optimizer(self.ckpt, self.model, self.optimizer)
            except CheckpointError as e:
                raise TrainError(str(e)) from None
        self.ddp = wrap_ddp(self.model, self.device) if self.dist.enabled and not self.sharded else None
        self.fwd = self.ddp if self.ddp is not None else self.model
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if bf16 else nullcontext
        self.eager_reason = self._graphs_reason()
        self.grads = StepGrads(self.model, self.fwd, self.autocast, cfg.grad_accum, cfg.grad_clip,
                               no_sync=grad_sync(self.model, self.ddp), graphs=self.eager_reason is None,
                               optimizer=self.optimizer, clip_into=False if self.sharded else None)
        self.flops_per_token = model_summary(cfg.model, cfg.seq_len)["train_flops_per_token"]
        self.peak = peak_flops(self.device)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.tb = None  # a SummaryWriter beside metrics.jsonl (rank 0, tensorboard=true), opened in fit
        self._voting = False  # in fit's loop with several processes: rank 0's failed writes go through the vote
        self._stop_signal: int | None = None
        self._saved_step: int | None = None  # a step whose checkpoint was written before its evaluation
        self._old_handlers: dict = {}  # the stop signals' handlers before fit (or close) caught them
        self._finished = False  # fit() completed: close() then waits for the other processes
        self.saver = BackgroundSaver()  # one-file checkpoints written while training goes on (async_save)

    # -- one optimizer step ---------------------------------------------------------------------------------
    def _graphs_reason(self) -> str | None:
        """Why this run's steps are eager (None: they are captured as CUDA graphs)."""
        cfg = self.cfg
        if not cfg.cuda_graphs:
            return "cuda_graphs=false"
        if self.device.type != "cuda":
            return "CPU"
        if self.dist.enabled:
            return f"{self.cfg.parallel.upper()}: the gradient reduction is not captured yet"
        return None

    def train_step(self, step: int, track_stats: bool = False) -> tuple[torch.Tensor, torch.Tensor, dict]:
        cfg = self.cfg
        lr = cfg.lr * warmup_cosine(step, cfg.max_steps, cfg.warmup_steps, cfg.min_lr_ratio)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        # a new mode re-captures the step's graph; a method that edits its weights when a mode starts (S-STE's
        # dense_init=sparse) does so through the optimizer, whose fp32 masters are the weights' authority
        self.modes = set_step(self.model, step, cfg.max_steps, edit=getattr(self.optimizer, "edit_", edit_in_place))
        micro = list(self.batches.micro_batches(step, cfg.grad_accum))
        stats = self._probe_stats(micro[0][0][:PROBE_SEQS], micro[0][1][:PROBE_SEQS]) if track_stats else {}
        loss, gnorm = self.grads.run(micro, mode=self.modes)  # and the optimizer's step
        return loss, gnorm, stats

    @torch.no_grad()
    def _probe_stats(self, x, y) -> dict:
        """The methods' statistics on a no-grad forward of (x, y) with the current weights: what the step's
        forward sees on those sequences (the first PROBE_SEQS of the step; a forward of a whole micro-batch at
        every log step would cost ~3% of the run at log_every=10). A captured step runs no Python, so the
        statistics cannot come from the step itself."""
        def forward():
            with self.autocast(), eager_regions():  # the methods' sinks are Python lists: not traced
                self.model(x.to(self.device), y.to(self.device))
        return collect_stats(self.model, forward)

    # -- the loop ---------------------------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg, d = self.cfg, self.dist
        complete = self.ckpt is not None and self.step >= cfg.max_steps  # a resume with nothing to train
        if d.main:
            # atomic: a full disk or a kill mid-write must not leave the run without its config (each checkpoint
            # holds a copy too: load_run_config). A resume that trains nothing leaves the run's plan as it was.
            target = self.run_dir / "config.json"
            try:  # (a full disk here is one line, not a traceback)
                if not complete:
                    if self.ckpt is not None:  # a resume that changed the plan keeps the old values beside it
                        target = self.run_dir / RESUMES
                        changed = record_resume(self.run_dir, self.step, to_dict(cfg))
                        if changed:
                            self.log(f"elas: {RESUMES} keeps what this resume changed ({', '.join(changed)}), "
                                     f"config.json the new plan")
                        target = self.run_dir / "config.json"
                    write_atomic(target, json.dumps(to_dict(cfg), indent=2).encode())
                # the run keeps its tokenizer beside it: generate and export work after the dataset moves or goes.
                # A resume keeps its copy (its data was checked to be the checkpoint's); a start at step 0 writes
                # its data's: a run directory started again (no checkpoint, or none that verifies), maybe on other
                # data, must not keep the tokenizer of the data its earlier start read
                tok = Path(cfg.data_dir) / "tokenizer.json"
                target = self.run_dir / "tokenizer.json"
                if tok.is_file() and (not target.is_file() or (
                        self.ckpt is None and target.read_bytes() != tok.read_bytes())):
                    write_atomic(target, tok.read_bytes())
                target = self.metrics_path
                dropped = truncate_metrics(self.metrics_path, self.step)
            except OSError as e:
                raise TrainError(_write_failed(target, e, self.run_dir)) from None
            if dropped:
                self.log(f"elas: {len(dropped)} unreadable line(s) of {self.metrics_path.name} moved to "
                         f"{self.metrics_path.name}.bad (line {dropped[0]} first); the run goes on")
            where = f"{self.device}" + (f" x{d.world} ({cfg.parallel.upper()})" if d.enabled else "")
            self.log(f"elas: {cfg.preset} | {sum(p.numel() for p in self.model.parameters()) / 1e6:.2f}M params "
                     f"| {where} | global batch {self.global_batch} x {cfg.seq_len} tokens | run dir {self.run_dir}")
            if self.global_batch > self.train_windows.n:  # (Batches runs on into the next epoch's order)
                self.log(f"elas: warning: the global batch ({self.global_batch} sequences) is larger than the "
                         f"training split ({self.train_windows.n} sequences of {cfg.seq_len} tokens): every step "
                         f"reads some sequences twice; lower batch_size or use more data")
            if self.fsdp and not d.enabled:
                self.log("elas: parallel=fsdp in one process: nothing is sharded (torchrun starts the processes that "
                         "shard); checkpoints are written in FSDP's sharded form (dcp/)")
            for line in describe(self.model):
                self.log(f"elas: {line}")
            if self.kernel_note:
                self.log(f"elas: {self.kernel_note}")
            if self.param_dtype == "bf16":
                moments = (f"{cfg.optim_state_dtype} Adam moments (optim_state_dtype="
                           + ("auto; --set optim_state_dtype=fp32 for fp32 moments)" if self.moments_auto else
                              f"{cfg.optim_state_dtype})"))
                self.log(f"elas: parameters in bf16, fp32 master weights and {moments} in "
                         f"{type(self.optimizer).__name__} (param_dtype={cfg.param_dtype}; --set param_dtype=fp32 "
                         f"opts out)")
            how = ("compiled (torch.compile per block and loss head; --set compile=false opts out)"
                   if self.compiled else "not compiled" + (" (compile=false)" if self.device.type == "cuda" else ""))
            self.log(f"elas: steps {how}; " + (
                "replayed from a CUDA graph (captured at the first step and when a sparsity method changes mode; "
                "--set cuda_graphs=false opts out)" if self.eager_reason is None
                else f"eager steps ({self.eager_reason})"))
            if cfg.activation_checkpointing:
                self.log("elas: activation checkpointing: each block's activations are recomputed in the backward "
                         "(activation_checkpointing=true)")
            if self.ckpt is not None:
                self.log(f"elas: resumed from {self.ckpt} at step {self.step}")
                if self.cublas_note:
                    self.log(self.cublas_note)
                if not complete and self.step and self.saved_position not in (None, self.step * self.global_batch):
                    # the data of a step is a function of the step and the global batch: another global batch (the
                    # same batch_size on another process count changes no config key) re-reads or skips samples
                    was = self.saved_position // self.step
                    self.log(f"elas: warning: the global batch is {self.global_batch} sequences (batch_size x "
                             f"grad_accum x processes), checkpoint {self.ckpt.name}'s was {was}: from step {self.step} "
                             f"on this run reads from sample {self.step * self.global_batch}, not "
                             f"{self.saved_position}, so it {'re-reads' if self.global_batch < was else 'skips'} "
                             f"samples and differs from an uninterrupted run; keep batch_size x grad_accum x "
                             f"processes = {was} to continue it exactly")
                if complete and self.saved_max_steps not in (None, cfg.max_steps):
                    self.log(f"elas: nothing to train: the run is at step {self.step}, at or past --max-steps "
                             f"{cfg.max_steps}; its config.json keeps max_steps={self.saved_max_steps}")
                elif complete:
                    self.log(f"elas: the run is complete (step {self.step} of max_steps={cfg.max_steps}): nothing to "
                             f"train; raise --max-steps to extend it")
                elif self.saved_max_steps not in (None, cfg.max_steps):
                    # a method's phase given as a fraction of the run (sparse_until 0.3) moves with its length too
                    moving = [m["method"] for m in cfg.model.methods
                              if isinstance(m.get("sparse_until"), float) and 0 < m["sparse_until"] < 1]
                    self.log(f"elas: warning: max_steps {self.saved_max_steps} -> {cfg.max_steps}: the learning-rate "
                             f"schedule (warm-up, then cosine to step {cfg.max_steps})" +
                             (f" and the end of the sparse phase of {', '.join(moving)} (sparse_until a fraction of "
                              f"the run)" if moving else "") +
                             f" {'change' if moving else 'changes'} from step {self.step} on, so the losses from "
                             f"here differ from a run planned "
                             f"for either length")
        # every process catches the stop signals (torchrun passes a SIGTERM or Ctrl-C to each): they agree on the
        # step to stop at, save together (FSDP2's shards need every process) and leave. Once the last step is
        # trained there is nothing left to stop: a signal then is recorded (stop_signal), the final evaluation and
        # save complete, and the run ends as finished, not as a stopped one (status 143); close() catches them
        # again while a complete run waits for the other processes
        self._catch_signals()
        vote = None  # several processes: the stop vote of the step before, all-reduced (see below)
        save_error = None  # rank 0's failed background checkpoint, said once every process has it from the vote
        self._write_error, self._voting = None, d.enabled  # rank 0's other failed write (_write_metrics), likewise
        bar = None
        if d.main and self.progress:
            from tqdm import tqdm
            bar = tqdm(total=cfg.max_steps, initial=self.step, unit="step", dynamic_ncols=True, mininterval=1.0)
        result: dict = {}
        bad = torch.zeros((), dtype=torch.bool, device=self.device)
        t_last, tok_last = time.perf_counter(), self.tokens
        t_trained_from, eval_hinted = t_last, False  # training time since the last evaluation (saves excluded)
        start = self.step
        fault = int(os.environ.get("ELAS_FAULT_AT_STEP", "-1"))  # fault injection for the kill/resume tests:
        if os.environ.get("ELAS_FAULT_RANK", str(d.rank)) != str(d.rank):  # every process, or only this rank
            fault = -1
        try:
            while self.step < cfg.max_steps:
                step = self.step
                log_now = (step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_steps
                prev_modes, t_step, graphs_before = self.modes, time.perf_counter(), compile_counts()
                loss, gnorm, stats = self.train_step(step, track_stats=log_now)
                stop = self._stop_signal
                if d.enabled:  # each step's vote (max over the processes) is read one step later, by then complete:
                    # every process stops after the same step, and the host waits on no collective of this step
                    code = WRITE_FAILED if self._write_error else SAVE_FAILED if save_error else stop or 0
                    prev, vote = vote, torch.full((1,), float(code), device=self.device)
                    torch.distributed.all_reduce(vote, op=torch.distributed.ReduceOp.MAX)
                    stop = int(prev.item()) if prev is not None else None
                    if stop is not None and stop >= SAVE_FAILED:  # every process leaves here, rank 0 saying why
                        if stop >= WRITE_FAILED:  # (the save is collective: every process takes it)
                            # this step's update is in the weights: the checkpoint is of step + 1 (named step, a
                            # resume would take the update twice; written only where the weights are finite)
                            self.step += 1
                            self.tokens += self.global_batch * cfg.seq_len
                            self._save_before_failing(f"the write of {self.metrics_path.name}", agreed=True)
                        why = _write_failed(*self._write_error, self.run_dir) if self._write_error else save_error
                        raise _StartError(why or "rank 0 could not write its files", quiet=not d.main)
                if self.compiled and d.main and (step == start or self.modes != prev_modes):
                    torch.cuda.synchronize(self.device)  # compiling is host work; the warm-up and capture are not
                    msg = (f"elas: step {step + 1} (modes {list(self.modes)}): compiled "
                           f"{compile_counts() - graphs_before} graphs" +
                           (" and captured the step" if self.grads.graphs else "") +
                           f" in {time.perf_counter() - t_step:.1f} s")
                    (bar.write if bar is not None else self.log)(msg)
                    # tokens/s of the first log leaves the compile out
                    t_last, tok_last = time.perf_counter(), self.tokens + self.global_batch * cfg.seq_len
                bad |= ~torch.isfinite(loss) | ~torch.isfinite(gnorm)
                self.step += 1
                self.tokens += self.global_batch * cfg.seq_len
                if bar is not None:
                    bar.update(1)
                if self.saver is not None and d.main and save_error is None:
                    try:
                        self.saver.check()  # a background checkpoint that failed stops the run now
                    except CheckpointError as e:
                        if not d.enabled:
                            raise TrainError(str(e)) from None
                        save_error = str(e)  # (leaving alone would leave the others in this step's collectives)
                if step == fault:  # a kill after this step, with the checkpoints before it on disk
                    self.saver.wait()
                    os.kill(os.getpid(), signal.SIGKILL)
                save_now = self.step % cfg.save_every == 0 or self.step == cfg.max_steps
                eval_now = self.step % cfg.eval_every == 0 or self.step == cfg.max_steps
                if log_now or save_now or eval_now or stop:
                    if save_now or stop:  # a finite loss does not prove the update after it was
                        bad |= ~torch.stack([torch.isfinite(_local(p)).all() for p in self.model.parameters()]).all()
                    if bool(all_reduce_sum(bad.float(), d).item()):  # one host sync per log, not per step
                        raise Diverged(f"loss became NaN/inf by step {self.step}; stopped without saving. The last "
                                         f"good checkpoint is {getattr(newest_verified(self.run_dir), 'name', 'none')}; "
                                         f"lower --set lr or raise model.act24.dense_warmup_steps and --resume",
                                         self.step, quiet=d.enabled and not d.main)
                if log_now:
                    loss_v = all_reduce_sum(loss.detach().clone(), d).item() / d.world
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    now = time.perf_counter()
                    tps = (self.tokens - tok_last) / max(now - t_last, 1e-9)
                    t_last, tok_last = now, self.tokens
                    rec = {"step": self.step, "loss": loss_v, "lr": self.optimizer.param_groups[0]["lr"],
                           "tokens": self.tokens, "grad_norm": float(gnorm), "tokens_per_s": tps,
                           "mfu": tps * self.flops_per_token / (self.peak * d.world) if self.peak else None,
                           "sparse": any(str(m).startswith("sparse") for m in self.modes), "modes": list(self.modes)}
                    if self.device.type == "cuda":  # since the start of the run (this process)
                        rec["peak_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9
                        # held from the driver: a captured step's activations sit in the graph's pool, reserved
                        # but not allocated between replays, so this (not peak_mem_gb) is what must fit the GPU
                        rec["peak_reserved_gb"] = torch.cuda.max_memory_reserved(self.device) / 1e9
                    rec.update({k: v for k, v in stats.items() if k.endswith("/mean")})
                    rec["stats"] = {k: v for k, v in stats.items() if not k.endswith("/mean")}
                    self._write_metrics(rec)
                    if bar is not None:
                        bar.set_postfix(loss=f"{loss_v:.3f}", tok_s=f"{tps:,.0f}",
                                        **({"mem": f"{rec['peak_reserved_gb']:.1f}GB"} if "peak_reserved_gb" in rec else {}),
                                        **({"mfu": f"{rec['mfu']:.1%}"} if rec["mfu"] else {}))
                saved = False
                if stop and self.step >= cfg.max_steps and (save_now or eval_now):
                    # a signal at the last step: nothing is left to stop, but its checkpoint is written before the
                    # final evaluation (minutes on a CPU), so that a launcher's kill after its grace period costs
                    # the evaluation at most, never the steps since the previous save. (Several processes read the
                    # vote one step late: there, a signal in the step before the last)
                    t0 = time.perf_counter()
                    if d.main:
                        self.log(f"elas: signal {stop}: saving the checkpoint of the last step ({self.step}) before "
                                 f"the final evaluation")
                    self.save()
                    # (on disk before the evaluation, not in a background write it would kill; a failure agreed on:
                    # the other processes would wait in the evaluation's collectives)
                    self._wait_saves_agreed("the last step's checkpoint")
                    self._saved_step = self.step  # (an evaluation that fails now need not write it again)
                    saved, t_last = True, t_last + time.perf_counter() - t0
                    t_trained_from += time.perf_counter() - t0
                if eval_now:
                    t0, graphs_before = time.perf_counter(), compile_counts()
                    try:
                        vl, n = evaluate(self.fwd, self.val_windows, cfg.eval_tokens, cfg.batch_size, self.device,
                                         self.autocast, d, agree_on_failure=cfg.parallel != "fsdp")
                    except Exception as e:
                        self._save_before_failing("the evaluation", agreed=getattr(e, "elas_agreed", False))
                        raise
                    eval_s, trained_s = time.perf_counter() - t0, t0 - t_trained_from
                    eval_graphs = compile_counts() - graphs_before  # the first evaluation's no-grad graphs
                    t_last += eval_s  # tokens/s counts the training steps only
                    result = {"step": self.step, "val_loss": vl, "val_ppl": math.exp(min(vl, 50)), "val_tokens": n,
                              "eval_s": eval_s}
                    self._write_metrics(result)
                    if d.main:
                        msg = (f"step {self.step}: val loss {vl:.4f}, perplexity {result['val_ppl']:.2f} "
                               f"({n:,} tokens, {eval_s:.1f} s" +
                               (f", including compiling {eval_graphs} no-grad graphs)" if eval_graphs else ")"))
                        (bar.write if bar is not None else self.log)(msg)
                        if (not eval_hinted and not eval_graphs and self.step < cfg.max_steps
                                and eval_s > 0.25 * trained_s):
                            eval_hinted = True  # e.g. 7B: 1M eval tokens run eagerly take ~2x its 200 steps
                            (bar.write if bar is not None else self.log)(
                                f"elas: that evaluation took {eval_s:.1f} s, {eval_s / max(trained_s, 1e-9):.0%} of "
                                f"the {trained_s:.1f} s of training since the previous one; lower eval_tokens "
                                f"(now {cfg.eval_tokens}" + (f", of which the split held {n:,}" if n < cfg.eval_tokens
                                                             else "") +
                                f") or raise eval_every (now {cfg.eval_every}): `--set eval_tokens=...` in `elas "
                                f"train`")
                    t_trained_from = time.perf_counter()
                stop = stop if self.step < cfg.max_steps else None  # (the last step: saved as planned; run complete)
                if (save_now and not saved) or stop:
                    t0 = time.perf_counter()
                    if stop and d.main:  # (said first: a launcher's kill during the save is then visible)
                        self.log(f"elas: signal {stop}: saving the checkpoint of step {self.step} before stopping")
                    self.save()
                    t_last += time.perf_counter() - t0
                    t_trained_from += time.perf_counter() - t0
                if stop:
                    self._wait_saves()
                    raise TrainStopped(stop, self.step, self.run_dir, quiet=d.enabled and not d.main,
                                       world=d.world if d.enabled else 1, global_batch=self.global_batch)
            # (no vote after the loop: a failed write of rank 0's is agreed on below, once the last checkpoint is
            # written; one process raising alone would leave the others in the collectives that follow)
            missing = complete and self.step == cfg.max_steps and d.main and not any(
                "val_loss" in r and r.get("step") == self.step for r in read_metrics(self.metrics_path, []))
            if complete and self.step == cfg.max_steps and d.enabled:  # rank 0's file decides: evaluate is a
                # collective, so every rank takes it or none
                missing = bool(all_reduce_sum(torch.tensor([float(missing)], device=self.device), d).item())
            if missing:
                # the last step's evaluation failed after its checkpoint was written for it (_save_before_failing):
                # the run is trained but has no final validation loss, which is taken now (without it the grid,
                # which reads it from metrics.jsonl, would fail on every later invocation)
                t0 = time.perf_counter()
                # the forward the last step trained, which the uninterrupted run evaluated: step N-1's modes (a
                # model built for the resume starts in its methods' first modes)
                self.modes = set_step(self.model, self.step - 1, cfg.max_steps,
                                      edit=getattr(self.optimizer, "edit_", edit_in_place))
                vl, n = evaluate(self.fwd, self.val_windows, cfg.eval_tokens, cfg.batch_size, self.device,
                                 self.autocast, d)
                result = {"step": self.step, "val_loss": vl, "val_ppl": math.exp(min(vl, 50)), "val_tokens": n,
                          "eval_s": time.perf_counter() - t0}
                self._write_metrics(result)
                if d.main:
                    self.log(f"step {self.step}: val loss {vl:.4f}, perplexity {result['val_ppl']:.2f} ({n:,} tokens, "
                             f"the run's final evaluation, missing from {self.metrics_path.name})")
            # the last checkpoint is on disk before fit() returns. Under DDP rank 0 writes it in the background: its
            # failure reaches every process through one all-reduce (a peer that left the final barrier would read
            # as a transport error), and every process stops, rank 0 saying why
            self._wait_saves_agreed("the run's last checkpoint")
            # a write of rank 0's that failed after the last vote that was read (a metrics line of the last two
            # steps, the final evaluation's): every process stops, rank 0 saying why, as the vote would have made
            # them (the run's last checkpoint is on disk: --resume finds the run complete)
            self._voting = False
            if d.enabled and any_failed(self._write_error is not None):
                why = _write_failed(*self._write_error, self.run_dir) if self._write_error else None
                raise _StartError(why or "rank 0 could not write its files", quiet=not d.main)
            self._finished = True
        finally:
            self._voting = False
            if self.saver.busy():  # an error left the loop: let the write in flight finish (its own error, if
                try:  # any, is not the one to report)
                    self.saver.wait()
                except Exception:  # noqa: BLE001
                    pass
            if bar is not None:
                bar.close()
            self._restore_signals()  # (the caller's again: a notebook's Ctrl-C after fit is its own)
        result.setdefault("step", self.step)
        return result

    def elapsed_s(self) -> float:
        """Wall time of this run so far: this process's since the trainer was built, plus what the earlier
        processes took up to the checkpoint it resumed (a killed process's work after its last checkpoint is
        redone and counted once, in the process that redoes it)."""
        return self.elapsed_before + time.perf_counter() - self._t_created

    def _cublas_note(self, state: dict) -> str | None:
        """The warning for a CUDA run resumed under another cuBLAS workspace setting than its checkpoint's."""
        return cublas.resume_warning(state) if self.device.type == "cuda" else None

    def save(self) -> None:
        state = {"step": self.step, "tokens": self.tokens, "data_position": self.step * self.global_batch,
                 "param_dtype": self.param_dtype,  # what its optimizer state is the state of (_check_param_dtype)
                 "preset": self.cfg.preset, "elapsed_s": round(self.elapsed_s(), 3),
                 "config": to_dict(self.cfg),  # the run's config beside its weights (load_run_config)
                 "data": {"train_sha1": self.meta.get("train_sha1"), "vocab_size": self.meta.get("vocab_size")},
                 # (None: torch's default; recorded where cuBLAS runs, so a CPU run's checkpoint checks nothing)
                 **({"cublas_workspace_config": cublas.workspace_in_effect()} if self.device.type == "cuda" else {})}
        error = None
        try:
            if self.fsdp:  # every process writes its shards (collective; one process writes them all)
                save_sharded_checkpoint(self.run_dir, self.step, self.model, self.optimizer, state,
                                        self.cfg.keep_checkpoints)
            elif self.dist.main and self.cfg.async_save:
                self.saver.wait()  # the previous write (and its error) first: one snapshot in host memory at a time
                snap, step, keep = snapshot(self.model, self.optimizer), self.step, self.cfg.keep_checkpoints
                self.saver.submit(lambda: save_checkpoint(self.run_dir, step, self.model, self.optimizer, state, keep,
                                                          snap=snap))
            elif self.dist.main:
                save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, state, self.cfg.keep_checkpoints)
        except CheckpointError as e:
            if not self.dist.enabled or self.fsdp:  # (a sharded save's failure is agreed inside: every process)
                raise _StartError(str(e), quiet=self.dist.enabled and not self.dist.main) from None
            error = str(e)
        if self.dist.enabled and not self.fsdp:  # rank 0 wrote it: every process learns whether it could (the
            # all-reduce also waits for it, as a barrier did); the others stop quietly where it says why
            if any_failed(error is not None):
                raise _StartError(error or "rank 0 could not write the checkpoint", quiet=error is None)

    def _wait_saves_agreed(self, what: str) -> None:
        """_wait_saves, where rank 0's failed background write stops every process (one all-reduce): rank 0 with
        its error, the others quietly."""
        failed = None
        try:
            self._wait_saves()
        except TrainError as e:
            failed = e
        if self.dist.enabled and any_failed(failed is not None) and failed is None:
            raise _StartError(f"rank 0 could not write {what}", quiet=True)
        if failed is not None:
            raise failed

    def _wait_saves(self) -> None:
        """Until the checkpoint being written in the background is on disk; its error as a TrainError."""
        try:
            self.saver.wait()
        except CheckpointError as e:
            raise TrainError(str(e)) from None

    def _write_metrics(self, rec: dict) -> None:
        if not self.dist.main:
            return
        try:
            with open(self.metrics_path, "a") as fh:
                fh.write(json.dumps(rec) + "\n")
            if self.cfg.tensorboard:  # the same numbers, by step: train/*, val/*, sparsity statistics
                if self.tb is None:
                    from torch.utils.tensorboard import SummaryWriter
                    self.tb = SummaryWriter(str(self.run_dir / "tensorboard"))
                prefix = "val" if "val_loss" in rec else "train"
                for k, v in rec.items():
                    if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                        self.tb.add_scalar(f"{prefix}/{k}", v, rec["step"])
                for k, v in rec.get("stats", {}).items():
                    self.tb.add_scalar(f"stats/{k}", v, rec["step"])
                self.tb.flush()
        except OSError as e:  # a full disk: a metrics line is often the first write to fail. The steps since the
            # last checkpoint are saved first where the checkpoint still fits (older ones make room), then one line
            # (a line torn by the failed write is the file's last: the resume drops it)
            if self._voting:  # several processes, in the loop: the next step's vote tells every process, which
                self._write_error = (self.metrics_path, e)  # save and stop together (said after the save)
                return
            self._save_before_failing(f"the write of {self.metrics_path.name}")
            raise TrainError(_write_failed(self.metrics_path, e, self.run_dir)) from None

    def _check_param_dtype(self) -> None:
        """A checkpoint holds the optimizer state of its parameters' dtype: bf16 parameters' fp32 masters
        (MasterAdamW) or fp32 parameters' AdamW state. param_dtype=auto resolves by the machine (one GPU: bf16;
        several processes, CPU: fp32), so a resume elsewhere would load the one into the other (an error about a
        corrupt checkpoint, from deep in torch). Checkpoints of older versions do not record it: not checked."""
        try:
            saved = json.loads((self.ckpt / "trainer.json").read_text()).get("param_dtype")
        except (OSError, ValueError, AttributeError):
            return  # (loading it reports a damaged checkpoint)
        if saved and saved != self.param_dtype:
            raise TrainError(param_dtype_conflict(self.ckpt.name, saved, self.param_dtype, self.cfg, self.device,
                                                  self.dist.enabled))

    def _save_before_failing(self, what: str, agreed: bool = False) -> None:
        """An error outside the training step (an evaluation's out-of-memory, say) would lose every step since the
        last checkpoint: write this step's first, where that is one process's decision or all agree (rank 0's
        failed write, passed to every process by the stop vote). A failing save leaves the original error to be
        reported."""
        if self.dist.enabled and not agreed:  # (one process: the others may be in a collective)
            return
        # a finite loss does not prove the update after it was: non-finite weights saved would be what a resume
        # takes, and `keep` would prune the good checkpoint behind them (under FSDP each process holds a shard:
        # agreed on, as the save is collective)
        bad = (~torch.stack([torch.isfinite(_local(p)).all() for p in self.model.parameters()]).all()).float()
        if bool(all_reduce_sum(bad, self.dist).item()):
            if self.dist.main:
                self.log(f"elas: the weights are not finite at step {self.step}: no checkpoint written; the last "
                         f"good one is {getattr(newest_verified(self.run_dir), 'name', 'none')}")
            return
        if self.ckpt is not None and self.ckpt.name == f"step-{self.step:08d}":
            return  # nothing trained since the checkpoint this run resumed from (rewriting it would only risk it)
        if self._saved_step == self.step:
            return  # written already, before this step's evaluation (a stop signal at the last step)
        try:
            self.save()
            self._wait_saves()
            if self.dist.main:
                self.log(f"elas: {what} at step {self.step} failed; the checkpoint of step {self.step} was written "
                         f"first (--resume continues from it)")
        except Exception:  # noqa: BLE001 - the error being raised is the one to report
            pass

    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signum

    @property
    def stop_signal(self) -> int | None:
        """A stop signal that came once the run was complete (its last step trained and saved; fit returned), or
        None: nothing was left to stop, so the run ends as finished; a caller with more to do (the grid) stops."""
        return self._stop_signal if self._finished else None

    def _catch_signals(self) -> None:
        self._old_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)} \
            if _is_main_thread() else {}

    def _restore_signals(self) -> None:
        for s, h in self._old_handlers.items():
            signal.signal(s, h)
        self._old_handlers = {}

    def _claim_run_dir(self) -> None:
        """Rank 0 creates and locks the run directory (one process trains into it at a time: a requeued job, say)
        and writes a token there; every other process must read that token: a run directory that is not one
        shared directory would scatter the checkpoints' shards over the nodes. Any failure stops every process."""
        d, error, token = self.dist, None, None
        if d.main:
            try:
                check_writable(self.run_dir)
                lock_run_dir(self.run_dir)
                for name in clear_partial(self.run_dir):
                    self.log(f"elas: removed checkpoints/{name}, a save killed mid-write (never loadable)")
                if d.enabled:
                    token = os.urandom(8).hex()
                    write_atomic(self.run_dir / ".elas-shared", token.encode())
            except TrainError as e:
                error = str(e)
        if not d.enabled:
            if error:
                raise TrainError(error)
            return
        box = [error, token]
        torch.distributed.broadcast_object_list(box, src=0)
        error, token = box
        if error:
            raise _StartError(error, quiet=not d.main)
        try:
            seen = (self.run_dir / ".elas-shared").read_text()
        except OSError:
            seen = None
        got: list = [None] * d.world
        torch.distributed.all_gather_object(got, seen == token)
        apart = [r for r, ok in enumerate(got) if not ok]
        if apart:
            raise _StartError(f"{self.run_dir} is not one directory shared by every process (rank(s) "
                              f"{', '.join(map(str, apart))} do not see the file rank 0 wrote there): every process "
                              f"reads and writes the run's checkpoints, so --out must be on a filesystem all nodes "
                              f"share", quiet=not d.main)

    def close(self) -> bool:
        """Release the run's resources; False when the process group did not come down (see `shutdown`)."""
        if self.tb is not None:
            self.tb.close()
        if self.dist.main:
            unlock_run_dir(self.run_dir)
        # DDP's reducer holds the group and its last all-reduce works: dropped before the group goes
        self.ddp = self.fwd = self.grads = None
        # after a complete run every process waits for the others before the group is torn down (a process that
        # left early could abort a peer still finishing its last collective); after a failure nobody waits
        if self._finished:  # a stop signal while a complete run waits is recorded (stop_signal), not a kill
            self._catch_signals()
        try:
            voted = self._finished and self.dist.enabled and torch.distributed.is_initialized()
            if voted:  # (the wait): every process takes the signal any process got, so under torchrun a signal
                # that reached one rank only after the last step stops the grid on every rank, not on that one
                sent = self._stop_signal
                agreed = agree_stop(self.dist, sent, self.device)
                self._restore_signals()  # a signal after the vote: its default action (the run is saved)
                # one that came while this process waited in the vote (its handler runs once the collective
                # returns) was not voted on: delivered again with the caller's handler, not dropped
                late = self._stop_signal if sent is None else None
                self._stop_signal = agreed
                if late is not None and agreed is None:
                    signal.raise_signal(late)
            return shutdown(self.dist, wait=self._finished and not voted)
        finally:
            self._restore_signals()


def _local(p: torch.Tensor) -> torch.Tensor:
    """This process's shard of an FSDP2 parameter (a DTensor), or the tensor itself."""
    return p.to_local() if hasattr(p, "to_local") else p


def _is_main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def computes_in_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    """precision: bf16, or auto on a GPU (bf16 autocast); fp32 otherwise."""
    return cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")


def saved_optimizer_dtypes(run_dir: str | Path) -> tuple[str, str | None, str | None]:
    """(checkpoint name, the parameters' dtype its optimizer state is for, its moments' dtype) of a run's newest
    checkpoint whose trainer.json reads (a damaged newer one is skipped, as the resume will skip it); a dtype is
    None where the checkpoint records none (older versions: param_dtype before it existed; moments before
    optim_state_dtype existed are fp32). ("", None, None) for a run without a checkpoint."""
    for ckpt in checkpoints(Path(run_dir)):
        try:
            state = json.loads((ckpt / "trainer.json").read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(state, dict):
            continue
        config = state.get("config") if isinstance(state.get("config"), dict) else None
        moments = config.get("optim_state_dtype", "fp32") if config else None
        return ckpt.name, state.get("param_dtype"), moments if moments in ("fp32", "bf16") else None
    return "", None, None


def param_dtype_conflict(ckpt: str, saved: str, now: str, cfg: TrainConfig, device: torch.device,
                         distributed: bool) -> str:
    where = "on one GPU (param_dtype auto or bf16)" if saved == "bf16" else "with --set param_dtype=fp32"
    return (f"checkpoint {ckpt} holds the optimizer state of {saved} parameters, but this run would hold them in "
            f"{now} (param_dtype={cfg.param_dtype} on {device.type}{', several processes' if distributed else ''}): "
            f"resume it {where}; converting one into the other is not supported yet")


def resolve_param_dtype(cfg: TrainConfig, device: torch.device, distributed: bool, bf16: bool,
                        resume_from: str | Path | None = None) -> str:
    """'bf16' or 'fp32': the dtype the model's parameters are held in (TrainConfig.param_dtype). resume_from: the
    directory of the run being resumed, whose newest checkpoint's parameters must be of this dtype (checked here,
    before the moments: a run that resolved bf16 moments over bf16 parameters records them, and resumed where
    the parameters would be fp32 the conflict to name is the parameters')."""
    if cfg.param_dtype == "bf16" and distributed:
        raise TrainError(f"param_dtype=bf16 is for one process for now: {cfg.parallel.upper()} reduces fp32 "
                         f"gradients of fp32 parameters; set param_dtype=auto or fp32")
    dtype = cfg.param_dtype if cfg.param_dtype != "auto" else \
        "bf16" if (device.type == "cuda" and bf16 and not distributed) else "fp32"
    ckpt = ""
    if resume_from is not None:
        ckpt, saved, _ = saved_optimizer_dtypes(resume_from)
        if saved and saved != dtype:
            raise TrainError(param_dtype_conflict(ckpt, saved, dtype, cfg, device, distributed))
    if cfg.optim_state_dtype == "bf16" and dtype != "bf16":
        fix = (f"resume checkpoint {ckpt} with --set optim_state_dtype=auto (the moments it was trained with) or fp32"
               if ckpt else "set param_dtype=bf16 (one process, precision bf16 or auto) or optim_state_dtype=auto "
               "(bf16 moments where the parameters are bf16)")
        raise TrainError(f"optim_state_dtype=bf16 is for bf16 parameters (the optimizer's fp32 masters); this run "
                         f"holds them in fp32 (param_dtype={cfg.param_dtype} on {device.type}"
                         f"{', several processes' if distributed else ''}"
                         f"{', precision=fp32' if cfg.precision == 'fp32' else ''}): {fix}")
    return dtype


def load_run_config(run_dir: str | Path, log=None) -> TrainConfig:
    """A run's config: its config.json, or, where that is missing or damaged (a full disk, a kill mid-write in
    an older version, a deletion), the copy its newest checkpoint holds, written back to config.json with a log
    line. A run directory with neither is an error."""
    p = Path(run_dir) / "config.json"
    why = "no config.json"
    if p.is_file():
        try:
            return from_dict(TrainConfig, json.loads(p.read_text()))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:  # (JSON, not an object)
            why = f"{p} is not a valid elas config ({e})"
    for ckpt in checkpoints(Path(run_dir)):
        try:
            saved = json.loads((ckpt / "trainer.json").read_text()).get("config")
            cfg = from_dict(TrainConfig, saved) if saved else None
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            cfg = None
        if cfg is not None:
            try:
                write_atomic(p, json.dumps(saved, indent=2).encode())
            except OSError as e:  # (a full disk: one line, as every other write of the run)
                raise TrainError(_write_failed(p, e, Path(run_dir))) from None
            (log or print)(f"elas: {why}; the config was recovered from checkpoint {ckpt.name} and written back")
            return cfg
    if why == "no config.json":
        raise TrainError(f"{run_dir} is not a run directory (no config.json)")
    raise TrainError(why + " (and no checkpoint holds a copy)")
