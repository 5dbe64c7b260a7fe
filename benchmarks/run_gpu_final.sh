#!/usr/bin/env bash
# One device-machine call: the launchers on a real GPU (NCCL / MPI, 1 rank per GPU), the default
# job, the training example, narrow-lane kernel check, 1-GPU scaling baselines. Results under $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
python -m pip install -q --no-deps --no-build-isolation -e . > /dev/null 2>&1 || true
NG=$(python -c "import torch; print(torch.cuda.device_count())")
echo "== torchrun NCCL x$NG, 10M steps, DiagGRU H=64, verify first 100k"
timeout 150 torchrun --standalone --nproc-per-node "$NG" launch/solve.py --seq-len 10M --device cuda --hidden 64 \
  --verify --verify-window 100k --json "$OUT/launch_nccl.json" 2>&1 | grep -v "^W1" | tail -8
echo "== mpiexec x1 --backend mpi, same job"
timeout 120 mpiexec -n 1 python launch/solve.py --backend mpi --seq-len 10M --device cuda --hidden 64 --json "$OUT/launch_mpi.json" 2>&1 | tail -3
echo "== default job"
timeout 150 python launch/default_job.py 2>&1 | grep -v "^W1" | tail -4
echo "== training example, 1M steps, H=256, B=16"
timeout 120 torchrun --standalone --nproc-per-node "$NG" launch/train.py --device cuda --seq-len 1M --hidden 256 --batch 16 --steps 8 2>&1 | grep -v "^W1" | tail -6
echo "== kernels after the narrow-lane tile change (scan, fused GRU, solve)"
timeout 150 python benchmarks/bench_kernels.py --only scan,gru,solve --out "$OUT/kernels_run5.json" 2>&1 | grep -E "^==|median|speedup" | tail -12
echo "== peers at small D (narrow lanes)"
timeout 100 python benchmarks/bench_peers.py --dims 1,4 --Ts 100k,1M --cudnn-max-T 100k --out "$OUT/peers_smallD.json" 2>&1 | grep "^D="
echo "== 1-GPU scaling baselines"
timeout 120 torchrun --standalone --nproc-per-node 1 benchmarks/bench_scaling.py --kind weak --steps-per-rank 2.5M --hidden 256 --out "$OUT/scaling.json" 2>&1 | grep "^{"
timeout 150 torchrun --standalone --nproc-per-node 1 benchmarks/bench_scaling.py --kind strong --seq-len 10M --hidden 256 --out "$OUT/scaling.json" 2>&1 | grep "^{"
