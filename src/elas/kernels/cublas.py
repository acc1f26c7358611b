"""cuBLAS without a workspace: elas's commands set CUBLAS_WORKSPACE_CONFIG=:0:0 unless told otherwise.

Why: with the workspace torch gives it by default, cuBLAS on Hopper picks GEMM kernels that first clear a part
of that workspace, so most dense GEMMs launch a memset before their kernel. A 1B low-rank step in elas's default
mode (H100, batch 32 x 256) launched 281 memsets among 1,329 kernels; without a workspace it launches 9 among
1,057, its GEMMs take 0.17 ms more and the step 0.58 ms less (66.5-66.6 against 67.1-67.2 ms, two processes
each, `benchmarks/results/h100/blas_env_cublas_ws.json`). cuBLASLt's own workspace (CUBLASLT_WORKSPACE_SIZE=0)
changed nothing (`blas_env_ws0.json`).

torch reads the variable once, when it first hands out a cuBLAS handle, so it must be set before the first GEMM
of the process: `elas`'s command line does it first thing. A value already in the environment wins (e.g.
:4096:8, which `torch.use_deterministic_algorithms` requires), and ELAS_CUBLAS_WORKSPACE=torch leaves torch's
default alone. Every process of a comparison gets the same setting: `elas bench step` times plain
`torch.compile(model)` in the process that times elas's step, so the baseline keeps no memsets either, and the
JSON records the value (`environment()`).
"""
from __future__ import annotations

import os
from typing import MutableMapping

VAR = "CUBLAS_WORKSPACE_CONFIG"
NO_WORKSPACE = ":0:0"
CHOICES = ("none", "torch")  # ELAS_CUBLAS_WORKSPACE: none (the default) or torch (its own default workspace)


def set_default_workspace(env: MutableMapping[str, str] | None = None) -> str | None:
    """Set VAR to no workspace where nothing chose otherwise; returns the value in effect (None: torch's default).
    Raises ValueError for an ELAS_CUBLAS_WORKSPACE outside CHOICES."""
    env = os.environ if env is None else env
    choice = env.get("ELAS_CUBLAS_WORKSPACE", "none")
    if choice not in CHOICES:
        raise ValueError(f"ELAS_CUBLAS_WORKSPACE={choice!r}: expected one of {', '.join(CHOICES)} "
                         f"(none: cuBLAS without a workspace, elas's default; torch: torch's default workspace)")
    if choice == "none" and VAR not in env:
        env[VAR] = NO_WORKSPACE
    return env.get(VAR)
