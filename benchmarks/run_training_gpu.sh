#!/usr/bin/env bash
# Training on GPUs (issue 11), one call on a 2-GPU machine: marker recall at T=1M on 1 and 2 GPUs (same
# curve expected), then the neural-ODE example against torchdiffeq.  Outputs under ${OUT:-benchmarks/results}.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD
O=${OUT:-benchmarks/results}
for n in 1 2; do
  timeout 170 torchrun --standalone --nproc-per-node "$n" launch/train.py --device cuda --seq-len 1M --hidden 256 \
    --input-size 16 --batch 4 --steps 40 --verify --json "$O/train_1M_${n}gpu.json" --plot "$O/train_1M_${n}gpu.png" \
    > "$O/train_1M_${n}gpu.log" 2>&1
  tail -4 "$O/train_1M_${n}gpu.log"
done
timeout 200 python launch/train_ode.py --device cuda --steps-grid 100k --epochs 30 --compare-torchdiffeq \
  --out "$O/train_ode.json" --plot "$O/train_ode.png" > "$O/train_ode.log" 2>&1
tail -5 "$O/train_ode.log"
