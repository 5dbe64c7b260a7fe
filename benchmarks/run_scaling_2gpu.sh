#!/usr/bin/env bash
# The sharding benchmark (issue 8) on a 2-GPU machine, in one call: the NCCL GPU tests (2 ranks vs 1),
# then the scaling suite on 1 and 2 GPUs (the 1-GPU baseline in the same call, same machine).
# JSON rows -> ${OUT:-benchmarks/results}/scaling.json; logs beside it.  Capacity: run_capacity.sh.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD
OUTDIR=${OUT:-benchmarks/results}
nvidia-smi -L
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
timeout 150 python -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu_nccl.py 2>&1 | tail -30 > "$OUTDIR/gpu_tests_nccl.log"
tail -4 "$OUTDIR/gpu_tests_nccl.log"
for n in 1 2; do
  timeout 170 torchrun --standalone --nproc-per-node "$n" benchmarks/bench_scaling.py --kind suite \
    --out "$OUTDIR/scaling.json" > "$OUTDIR/suite_$n.log" 2>&1
  grep -E "suite|Error|error" "$OUTDIR/suite_$n.log" | tail -12
done
