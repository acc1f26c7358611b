"""Multi-GPU measurements of the trainer: scaling 1 -> N processes (DDP and FSDP2), kill -9 of one rank and
exact resume, and a 7B ELAS run sharded by FSDP2. Every number comes from the trainer's own metrics.jsonl.

    python benchmarks/multi_gpu.py --gpus 2                        # every stage (about 25 min on 2 x H200)
    python benchmarks/multi_gpu.py --gpus 2 --stages scale         # one stage per call on a time-limited machine
    python benchmarks/multi_gpu.py --gpus 2 --stages table         # the table of what the stages wrote
    python benchmarks/multi_gpu.py --gpus 2 --device cpu --presets llama-tiny-elas --kill-preset llama-tiny-elas \
        --big-preset llama-tiny-elas --steps 6                     # the same logic on CPU processes (gloo)

Stages (each writes <results>/multi_gpu_<stage>.json; `table` prints them all):
  data   a BPE dataset from the interpreter's text (skipped when --data already holds one)
  scale  tokens/s and peak memory per GPU of each preset on 1 and N processes, DDP and FSDP2, in the trainer's
         default mode (compiled, CUDA graphs where they work); scaling efficiency = tokens/s on N / (N x on 1).
         The per-process batch is the same on 1 and N (weak scaling: N times the tokens per step).
  kill   an uninterrupted run; the same run with rank 1 killed by SIGKILL after its first checkpoint (the trainer's
         fault injection: the process kills itself, as kill -9 would); `--resume` on N processes (losses must be
         bit-identical to the uninterrupted run's) and on 1 process with N times the sequences (same global
         batch and data order; losses within --tolerance: another reduction order)
  big    the big preset (llama-7b-elas) with FSDP2 across the N processes: tokens/s, memory per GPU, losses;
         stopped by SIGTERM at --big-seconds (the trainer checkpoints and can --resume)
NCCL_NVLS_ENABLE=0 (no NVLink multicast) is set in every process started here.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("data", "scale", "kill", "big", "table")


def env() -> dict:
    e = dict(os.environ, NCCL_NVLS_ENABLE="0", PYTHONUNBUFFERED="1")
    e["PYTHONPATH"] = str(ROOT / "src") + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    return e


def train(n: int, out: Path, args, preset: str, steps: int, *sets: str, extra_env: dict | None = None,
          resume: bool = False, timeout: float | None = None) -> subprocess.CompletedProcess:
    """One training run on n processes (torchrun for n > 1, so that the trainer runs as on a cluster)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n)] if n > 1 \
        else [sys.executable]
    cmd += ["-m", "elas", "train", "--preset", preset, "--data", str(args.data), "--out", str(out),
            "--max-steps", str(steps), "--device", args.device, "--no-progress",
            "--set", "eval_every=1000000", "--set", f"log_every={args.log_every}"]
    for s in [*args.train_set, *sets]:
        cmd += ["--set", s]
    if resume:
        cmd.append("--resume")
    print(f"[{time.strftime('%H:%M:%S')}] {'resume ' if resume else ''}{preset} x{n} {' '.join(sets)} -> {out}",
          flush=True)
    p = subprocess.Popen(cmd, cwd=ROOT, env={**env(), **(extra_env or {})}, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        text, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # SIGTERM: the trainer saves a checkpoint and stops
        os.killpg(p.pid, signal.SIGTERM)
        text, _ = p.communicate()
    lines = [ln for ln in text.splitlines() if ln.startswith(("elas:", "step ")) or "rror" in ln]
    print("\n".join("    " + ln[:200] for ln in lines[-8:]), flush=True)
    return subprocess.CompletedProcess(cmd, p.returncode, text, "")


def records(run: Path) -> list[dict]:
    f = run / "metrics.jsonl"
    if not f.is_file():
        return []
    return [r for r in map(json.loads, f.read_text().splitlines()) if "loss" in r]


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run)}


def throughput(run: Path) -> dict:
    """Median tokens/s of the logged intervals after the first (which holds the compile and the capture), and the
    peak memory the trainer reports (this process's GPU: rank 0)."""
    recs = records(run)
    tps = [r["tokens_per_s"] for r in recs[1:] if r.get("tokens_per_s")]
    return {"tokens_per_s": statistics.median(tps) if tps else None, "intervals": len(tps),
            "peak_mem_gb": max((r.get("peak_mem_gb") or 0.0 for r in recs), default=None),
            "last_loss": recs[-1]["loss"] if recs else None}


def write(args, stage: str, doc: dict) -> None:
    doc = {"stage": stage, "gpus": args.gpus, "device": args.device, "date": time.strftime("%Y-%m-%d"),
           "versions": versions(), **doc}
    for d in (args.results, Path(os.environ["OUT"]) if os.environ.get("OUT") else None):
        if d is not None:
            d.mkdir(parents=True, exist_ok=True)
            (d / f"multi_gpu_{stage}.json").write_text(json.dumps(doc, indent=1))


def versions() -> dict:
    import torch
    out = {"torch": torch.__version__}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
        out["cuda"] = torch.version.cuda
        out["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    return out


def stage_data(args) -> None:
    if (Path(args.data) / "train.bin").is_file():
        print(f"data: {args.data} is prepared")
        return
    subprocess.run([sys.executable, "-m", "elas", "data", "prepare", "--out", str(args.data), "--source", "builtin",
                    "--max-mb", str(args.data_mb)], cwd=ROOT, env=env(), check=True)


def stage_scale(args) -> None:
    rows = []
    for preset in args.presets:
        for par in args.parallel:
            per = {}
            for n in (1, args.gpus):
                run = args.runs / f"scale-{preset}-{par}-{n}"
                shutil.rmtree(run, ignore_errors=True)
                p = train(n, run, args, preset, args.steps, f"parallel={par}", f"batch_size={args.batch}",
                          "save_every=1000000", timeout=args.run_seconds)
                per[n] = {"returncode": p.returncode, **throughput(run)}
            one, many = per[1]["tokens_per_s"], per[args.gpus]["tokens_per_s"]
            eff = many / (args.gpus * one) if one and many else None
            rows.append({"preset": preset, "parallel": par, "batch_per_gpu": args.batch, "steps": args.steps,
                         "one": per[1], "many": per[args.gpus], "efficiency": eff})
            write(args, "scale", {"rows": rows})


def stage_kill(args) -> None:
    n, preset, every = args.gpus, args.kill_preset, args.kill_save_every
    sets = [f"parallel={args.kill_parallel}", f"save_every={every}", "keep_checkpoints=3"]
    per = f"batch_size={args.batch}"
    ref, run, one = (args.runs / f"kill-{k}" for k in ("ref", "run", "one"))
    for d in (ref, run, one):
        shutil.rmtree(d, ignore_errors=True)
    train(n, ref, args, preset, args.kill_steps, *sets, per)
    killed = train(n, run, args, preset, args.kill_steps, *sets, per,
                   extra_env={"ELAS_FAULT_AT_STEP": str(every), "ELAS_FAULT_RANK": "1"})
    shutil.copytree(run, one)  # the same checkpoints, resumed on one process
    train(n, run, args, preset, args.kill_steps, *sets, per, resume=True)
    # one process with n times the sequences: the same global batch and data order as n processes
    train(1, one, args, preset, args.kill_steps, *sets, f"batch_size={args.batch * n}", resume=True)
    a, b, c = losses(ref), losses(run), losses(one)
    after = [s for s in sorted(a) if s > every]
    same = bool(after) and all(s in b and a[s] == b[s] for s in after)
    diff = max((abs(a[s] - c[s]) / abs(a[s]) for s in after if s in c), default=None)
    write(args, "kill", {
        "preset": preset, "parallel": args.kill_parallel, "steps": args.kill_steps, "killed_after_checkpoint": every,
        "killed_returncode": killed.returncode, "killed_by_signal": "SIGKILL" in killed.stdout,
        "losses": {"uninterrupted": a, f"resumed_on_{n}": b, "resumed_on_1": c},
        "same_count_bit_identical": same, "one_process_max_rel_diff": diff, "tolerance": args.tolerance,
        "one_process_within_tolerance": diff is not None and diff <= args.tolerance})


def stage_big(args) -> None:
    run = args.runs / "big"
    shutil.rmtree(run, ignore_errors=True)
    p = train(args.gpus, run, args, args.big_preset, args.big_steps, "parallel=fsdp", f"batch_size={args.big_batch}",
              f"save_every={args.big_steps}", timeout=args.big_seconds)
    recs = records(run)
    write(args, "big", {"preset": args.big_preset, "parallel": "fsdp", "batch_per_gpu": args.big_batch,
                        "returncode": p.returncode, "steps_run": recs[-1]["step"] if recs else 0, **throughput(run),
                        "losses": {r["step"]: r["loss"] for r in recs},
                        "log": [ln for ln in p.stdout.splitlines() if ln.startswith("elas:")][-12:]})


def stage_table(args) -> None:
    def load(stage):
        f = args.results / f"multi_gpu_{stage}.json"
        return json.loads(f.read_text()) if f.is_file() else None

    n = args.gpus
    print(f"| preset | parallel | tokens/s x1 | tokens/s x{n} | efficiency | peak GB x1 | peak GB x{n} (per GPU) |")
    print("|---|---|---|---|---|---|---|")
    for r in (load("scale") or {}).get("rows", []):
        f = (lambda v, fmt: "-" if v is None else format(v, fmt))
        print(f"| {r['preset']} | {r['parallel']} | {f(r['one']['tokens_per_s'], ',.0f')} | "
              f"{f(r['many']['tokens_per_s'], ',.0f')} | {f(r['efficiency'], '.1%')} | "
              f"{f(r['one']['peak_mem_gb'], '.1f')} | {f(r['many']['peak_mem_gb'], '.1f')} |")
    k = load("kill")
    if k:
        print(f"kill -9 of rank 1 after step {k['killed_after_checkpoint']} ({k['preset']}, {k['parallel']}): resumed "
              f"on {n}: bit-identical {k['same_count_bit_identical']}; on 1: max rel. loss diff "
              f"{k['one_process_max_rel_diff']} (tolerance {k['tolerance']})")
    b = load("big")
    if b:
        print(f"{b['preset']} FSDP2 x{n}: {b['steps_run']} steps, {b['tokens_per_s'] or 0:,.0f} tokens/s, peak "
              f"{b['peak_mem_gb']} GB per GPU, last loss {b['last_loss']}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpus", type=int, default=2, help="processes (GPUs) of the multi-process runs")
    p.add_argument("--stages", default="data,scale,kill,big,table", help=f"comma-separated among {', '.join(STAGES)}")
    p.add_argument("--device", default="cuda", help="cuda, or cpu to run the logic on CPU processes (gloo)")
    p.add_argument("--data", type=Path, default=ROOT / "data" / "multi_gpu")
    p.add_argument("--data-mb", type=int, default=20)
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "multi_gpu")
    p.add_argument("--results", type=Path, default=None, help="default benchmarks/results/h200x<gpus>")
    p.add_argument("--presets", default="llama-350m-elas,llama-1b-elas,llama-1b-lowrank-relu2")
    p.add_argument("--parallel", default="ddp,fsdp")
    p.add_argument("--batch", type=int, default=32, help="sequences per process and step")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--set", dest="train_set", action="append", default=[], metavar="KEY=VALUE",
                   help="a training key for every run (repeatable), e.g. seq_len=128")
    p.add_argument("--run-seconds", type=float, default=None, help="stop a scaling run after this long (SIGTERM)")
    p.add_argument("--kill-preset", default="llama-350m-elas")
    p.add_argument("--kill-parallel", default="fsdp")
    p.add_argument("--kill-steps", type=int, default=40)
    p.add_argument("--kill-save-every", type=int, default=20)
    p.add_argument("--tolerance", type=float, default=2e-3, help="relative loss difference allowed on 1 process")
    p.add_argument("--big-preset", default="llama-7b-elas")
    p.add_argument("--big-batch", type=int, default=16)
    p.add_argument("--big-steps", type=int, default=300)
    p.add_argument("--big-seconds", type=float, default=480)
    args = p.parse_args()
    stages = args.stages.split(",")
    bad = [s for s in stages if s not in STAGES]
    if bad or args.gpus < 1:
        p.error(f"invalid --stages {bad} or --gpus {args.gpus}: stages are {', '.join(STAGES)}, gpus >= 1")
    args.presets, args.parallel = args.presets.split(","), args.parallel.split(",")
    args.results = args.results or ROOT / "benchmarks" / "results" / f"h200x{args.gpus}"
    if args.device != "cpu":
        import torch
        have = torch.cuda.device_count()
        if have < args.gpus:
            p.error(f"--gpus {args.gpus} but this machine has {have} CUDA devices")
    for s in stages:
        globals()[f"stage_{s}"](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
