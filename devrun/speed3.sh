#!/usr/bin/env bash
set -u
export PYTHONPATH=src ELAS_CACHE_DIR=.cache/elas TORCH_EXTENSIONS_DIR=.cache/torch_ext TRITON_CACHE_DIR=.cache/triton TORCHINDUCTOR_CACHE_DIR=.cache/inductor PYTHONUNBUFFERED=1
R=devrun/res3; mkdir -p $R
full=relu2-w24-vnm+vnm.router_mode=own+vnm.path=grouped+vnm.m=16+vnm.clustering=contiguous
timeout 200 python -m elas bench step --gpu-name h200 --out $R --sizes llama-1b --modes elas --no-profile \
  --variants relu2,$full 2>&1 | grep -v "^elas: \|Warning\|warn(" | tail -5
tar czf $OUT/res3.tgz -C devrun res3
echo "== tests $SECONDS s"
timeout $((330 - SECONDS)) python -m pytest -o addopts="" -q -p no:cacheprovider -m gpu tests/test_vnm.py tests/test_sste.py 2>&1 | tail -4
