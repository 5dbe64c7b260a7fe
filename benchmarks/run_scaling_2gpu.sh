#!/usr/bin/env bash
# The sharding benchmark (issue 8) on a 2-GPU machine, in one call: the GPU tests (NCCL 2 ranks vs 1,
# kernels), then the scaling suite on 1 and 2 GPUs (the 1-GPU baseline in the same call, same machine),
# then capacity.  JSON rows -> ${OUT:-benchmarks/results}/scaling.json; logs beside it.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD
OUTDIR=${OUT:-benchmarks/results}
nvidia-smi -L
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
timeout 420 python -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu_nccl.py tests/test_kernels.py \
  tests/test_gpu.py 2>&1 | tail -25 > "$OUTDIR/gpu_tests_2gpu.log"
tail -5 "$OUTDIR/gpu_tests_2gpu.log"
for n in 1 2; do
  timeout 300 torchrun --standalone --nproc-per-node "$n" benchmarks/bench_scaling.py --kind suite \
    --out "$OUTDIR/scaling.json" 2>&1 | grep -v "^\s*$" | tail -12
done
for n in 2 1; do
  timeout 300 torchrun --standalone --nproc-per-node "$n" benchmarks/bench_scaling.py --kind capacity --hidden 64 \
    --try "${CAPACITY_TRY:-100M,80M,60M,40M,30M}" --out "$OUTDIR/scaling.json" 2>&1 | tail -3
done
