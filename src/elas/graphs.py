"""CUDA-graph capture shared by the training step (train/step.py), the decode step (model/generate.py) and the
kernels' timing graphs (kernels/cuda/gemm.py): one place for what a capture must do beyond torch.cuda.graph."""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def graph_capture(graph: torch.cuda.CUDAGraph, **kw):
    """torch.cuda.graph(graph), with torch's cuBLAS(Lt) workspaces dropped before and after the capture, as
    Inductor's CUDA-graph trees do. torch keeps one workspace per (handle, stream), reused by every later GEMM
    on that stream, and a graph's reset (its destruction) drops those of its capture stream
    (pytorch/pytorch#193402). Graphs on torch's default capture stream would otherwise share the workspace
    allocated in the first one's private pool, which that graph's destruction frees under the others (the step
    graph replaced at a mode switch, a decode graph, a timing graph). Dropped before, the capture allocates its
    own workspace in its own pool; dropped after, no later GEMM, eager or captured, is handed it."""
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", lambda: None)  # (absent from a torch without CUDA)
    clear()
    try:
        with torch.cuda.graph(graph, **kw):
            yield
    finally:
        clear()
