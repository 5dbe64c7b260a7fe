#!/usr/bin/env bash
# Capacity (largest T solved, converged, residual checked over every step by the solve) on 2 and 1 GPUs.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD
OUTDIR=${OUT:-benchmarks/results}
for spec in "2 64 ${TRY2_64:-150M,140M,120M,100M}" "1 64 ${TRY1_64:-75M,70M,60M,50M}" "2 256 ${TRY2_256:-36M,32M,28M,24M}" "1 256 ${TRY1_256:-18M,16M,14M,12M}"; do
  set -- $spec
  timeout 100 torchrun --standalone --nproc-per-node "$1" benchmarks/bench_scaling.py --kind capacity --hidden "$2" \
    --try "$3" --out "$OUTDIR/capacity.json" 2>&1 | grep -E "^\{|Error" | tail -2
done
