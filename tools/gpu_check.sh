#!/usr/bin/env bash
# Issue 9's GPU checks on one H100/H200, in one device call (`run`, timeout_s=600, carry [".whl"]):
#   bash tools/gpu_check.sh                    # all stages; STAGES="tests" or "bench" to rerun one
#   stage   what                                                                              expected
#   setup   pip install the wheels carried in .whl/ (no network there), python -m advarm       ~0.5 min
#   tests   tests/test_gpu.py: golden fixtures on CUDA for torch and mamba_ssm, fp32 + bf16;
#           kernels vs torch path (fp32/bf16, forward + gradients), Mamba2 and Mamba1 at widths
#           768/256/96/64 (first Triton autotuning included)                                   ~2 min
#   bench   benchmark.py, bf16, every usable backend, each run against DeiT-Base at the same
#           size and batch: Adventurer-Base/16 train+infer 224/b64 and 448/b32, train 1024/b8;
#           ARM-Base finetune train 224/b64 (3 windows of 5 steps after 2 warm-up steps)       ~4 min
#   compile benchmark.py --compile, Adventurer-Base train 224/b64 and 1024/b8 (not in the
#           default STAGES: add it when time is left)                                          ~3 min
# Everything lands in $OUT: gpu_check.log (this output), tests.log, bench.jsonl (one JSON line per row).
# .whl/ (gitignored) holds mamba_ssm-2.3.2.post1-py3-none-any.whl (its Python/Triton part, built here with
# `MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE pip wheel --no-deps --no-build-isolation
# mamba-ssm==2.3.2.post1 -w .whl`), einops, pytest and its dependencies, ninja (for the build), and the CUDA
# wheels of tools/build_wheels.sh once built.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
STAGES=${STAGES:-setup tests bench}
BENCH="python benchmark.py --device cuda --dtype bfloat16 --ssm-backend all --repeats 3 --iters 5 --warmup 2"
stage() { [[ " $STAGES " == *" $1 "* ]]; }
clock() { echo "== $1 at $(date -u +%T) (${SECONDS}s)"; }

if stage setup; then
  clock setup
  for part in .whl/*.part-aa; do  # wheels over 16 MiB come back from the device in parts
    [ -e "$part" ] && cat "${part%.part-aa}".part-* > "${part%.part-aa}"
  done
  wheels=$(ls .whl/*.whl)
  if ls .whl/mamba_ssm-*-linux_*.whl >/dev/null 2>&1; then  # the CUDA build replaces the Python/Triton one
    wheels=$(echo "$wheels" | grep -v "mamba_ssm-.*-py3-none-any")
  fi
  echo "$wheels" && pip install --no-index --no-deps --quiet $wheels
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python -c "import torch, triton, timm; print('torch', torch.__version__, 'triton', triton.__version__, 'timm', timm.__version__)"
  python -m advarm
fi
if stage tests; then
  clock tests
  python -m pytest -q -rs tests/test_gpu.py 2>&1 | tee "$OUT/tests.log" | tail -40
fi
if stage bench; then
  clock bench
  $BENCH --model adventurer_base_patch16 --img-size 224 --batch-size 64 --mode both --json "$OUT/bench.jsonl"
  $BENCH --model adventurer_base_patch16 --img-size 448 --batch-size 32 --mode both --json "$OUT/bench.jsonl"
  $BENCH --model adventurer_base_patch16 --img-size 1024 --batch-size 8 --mode train --json "$OUT/bench.jsonl"
  $BENCH --model arm_base_pz16 --img-size 224 --batch-size 64 --mode train --json "$OUT/bench.jsonl"
fi
if stage compile; then
  clock compile
  $BENCH --compile --ssm-backend torch --model adventurer_base_patch16 --img-size 224 --batch-size 64 --mode train \
      --json "$OUT/bench.jsonl"
  $BENCH --compile --ssm-backend torch --model adventurer_base_patch16 --img-size 1024 --batch-size 8 --mode train \
      --json "$OUT/bench.jsonl"
fi
clock done
