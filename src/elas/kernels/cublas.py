"""cuBLAS without a workspace, on request: ELAS_CUBLAS_WORKSPACE=none makes elas's commands set
CUBLAS_WORKSPACE_CONFIG=:0:0 (opt-in: timed at one size only).

Why: with the workspace torch gives it by default, cuBLAS on Hopper picks, for about a third of a step's GEMM
launches, kernels that have a memset clear part of that workspace before them. Without a workspace it takes the
same tile shapes in their `ssched` form, which needs none. A 1B low-rank step in elas mode (H100, batch 32 x 256,
`relu2_kernel=torch`) launched 281 memsets among 1,329 kernels (272 of them before 272 of its 732 GEMM
launches); without a workspace 9 among 1,057: its GEMMs took 0.17-0.19 ms more and the step 0.57-0.58 ms less
(66.5-66.6 against 67.1-67.2 ms, two processes each, `benchmarks/results/h100/blas_env_cublas_ws.json`).
cuBLASLt's own workspace (CUBLASLT_WORKSPACE_SIZE=0) changed nothing (`blas_env_ws0.json`).

Why not the default yet: without a workspace cuBLAS cannot take its split-K kernels, whose partial sums live
there, and smaller models use them (a 350M full-rank step on the H200 ran `..._splitK_NNT` and cuBLASLt's
`splitKreduce_kernel`: `h200/step_vnm_select.json`). Until `run_gpu.sh blas_env` has timed every size and the
full-rank models, torch's default stays.

torch reads the variable once, when it first hands out a cuBLAS handle, so it must be set before the first GEMM
of the process: `elas`'s command line does it first thing. A CUBLAS_WORKSPACE_CONFIG already in the environment
wins (e.g. :4096:8, which `torch.use_deterministic_algorithms` requires). `elas experiment` never sets it, so a
grid's later runs run its first runs' GEMMs. The setting is the process's: `elas bench step` times plain
`torch.compile(model)` in the process that times elas's step, so both rows run under it, and the JSON records the
value (`environment()`). Checkpoints record it too, and a resume under another setting is warned about
(`resume_warning`).
"""
from __future__ import annotations

import os
from typing import MutableMapping

VAR = "CUBLAS_WORKSPACE_CONFIG"
NO_WORKSPACE = ":0:0"
CHOICES = ("torch", "none")  # ELAS_CUBLAS_WORKSPACE: torch (its default workspace; the default) or none


def user_choice(env: MutableMapping[str, str] | None = None) -> str:
    """ELAS_CUBLAS_WORKSPACE (default torch); ValueError for a value outside CHOICES."""
    choice = (os.environ if env is None else env).get("ELAS_CUBLAS_WORKSPACE", "torch")
    if choice not in CHOICES:
        raise ValueError(f"ELAS_CUBLAS_WORKSPACE={choice!r}: expected one of {', '.join(CHOICES)} "
                         f"(torch: torch's default workspace, the default; none: cuBLAS without a workspace)")
    return choice


def apply_choice(env: MutableMapping[str, str] | None = None) -> str | None:
    """ELAS_CUBLAS_WORKSPACE=none: set VAR to no workspace, unless VAR is set already; returns the value in effect
    (None: torch's default). Raises ValueError for an ELAS_CUBLAS_WORKSPACE outside CHOICES."""
    env = os.environ if env is None else env
    if user_choice(env) == "none" and VAR not in env:
        env[VAR] = NO_WORKSPACE
    return env.get(VAR)


def workspace_in_effect(env: MutableMapping[str, str] | None = None) -> str | None:
    """The value cuBLAS's workspace is set by in this process (None: torch's default); recorded in checkpoints."""
    return (os.environ if env is None else env).get(VAR)


def describe(value: str | None) -> str:
    """One phrase for the start-up log."""
    if value is None:
        return "cuBLAS with torch's default workspace"
    if value == NO_WORKSPACE:
        return f"cuBLAS without a workspace ({VAR}={value})"
    return f"cuBLAS workspace {VAR}={value}"


def resume_warning(saved: dict, env: MutableMapping[str, str] | None = None) -> str | None:
    """A line to log when a run resumes under another cuBLAS workspace setting than the process that wrote its
    checkpoint (trainer.json's `cublas_workspace_config`): cuBLAS may then pick other GEMM kernels, and the losses
    differ from the uninterrupted run's in the last bits. None where they agree or the checkpoint predates the key."""
    if "cublas_workspace_config" not in saved:
        return None
    before, now = saved["cublas_workspace_config"], workspace_in_effect(env)
    if before == now:
        return None
    show = lambda v: "unset (torch's default)" if v is None else v  # noqa: E731
    return (f"elas: warning: {VAR} is {show(now)} here but was {show(before)} when the checkpoint was written: "
            f"cuBLAS may pick other GEMM kernels, so the losses may differ from an uninterrupted run's in the last "
            f"bits (for an exact resume, run with ELAS_CUBLAS_WORKSPACE and {VAR} as before)")

