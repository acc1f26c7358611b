#!/usr/bin/env bash
set -u
export PYTHONPATH=src ELAS_CACHE_DIR=.cache/elas TORCH_EXTENSIONS_DIR=.cache/torch_ext TRITON_CACHE_DIR=.cache/triton TORCHINDUCTOR_CACHE_DIR=.cache/inductor PYTHONUNBUFFERED=1
R=devrun/res2; mkdir -p $R
own=relu2-vnm-own+vnm.clustering=contiguous
full=relu2-w24-vnm+vnm.router_mode=own+vnm.path=grouped+vnm.m=16+vnm.clustering=contiguous
timeout 560 python -m elas bench step --gpu-name h200 --out $R --sizes llama-1b --modes elas --no-profile \
  --variants relu2,$own+vnm.topk=2,$full+vnm.topk=2,$own+vnm.m=8,$own 2>&1 | grep -v "^elas: \|Warning\|warn(" | tail -30
echo "== done $SECONDS s"
tar czf $OUT/res2.tgz -C devrun res2
