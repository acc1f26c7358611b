#!/usr/bin/env bash
# call 1: V:N:M GPU tests, torch grouped GEMM vs dense, FFN fwd+bwd at 1B for top-k routing and m=8
set -u
export PYTHONPATH=src ELAS_CACHE_DIR=.cache/elas TORCH_EXTENSIONS_DIR=.cache/torch_ext TRITON_CACHE_DIR=.cache/triton TORCHINDUCTOR_CACHE_DIR=.cache/inductor PYTHONUNBUFFERED=1
R=devrun/res; mkdir -p $R
own=relu2-vnm-own+vnm.clustering=contiguous
full=relu2-w24-vnm+vnm.router_mode=own+vnm.path=grouped+vnm.m=16+vnm.clustering=contiguous
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 150 python -m pytest -o addopts="" -q -p no:cacheprovider -m gpu tests/test_vnm.py 2>&1 | tail -8
echo "== grouped_gemm $SECONDS s"; timeout 120 python benchmarks/grouped_gemm.py $R 2>&1 | tail -20
echo "== ffn $SECONDS s"
timeout $((560 - SECONDS)) python -m elas bench ffn --gpu-name h200 --out $R --sizes llama-1b \
  --variants relu2,$own,$own+vnm.topk=2,$own+vnm.topk=4,$own+vnm.m=8,$full+vnm.topk=2 2>&1 | grep -v "Warning\|warn(" | tail -30
echo "== done $SECONDS s"
tar czf $OUT/res.tgz -C devrun res
