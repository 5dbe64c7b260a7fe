#!/usr/bin/env bash
# Weak/strong scaling and capacity on 1, 2, 4, 8 GPUs (up to those present); JSON rows -> ${OUT:-benchmarks/results}/scaling.json
set -euo pipefail
cd "$(dirname "$0")/.."
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())")
OUTDIR=${OUT:-benchmarks/results}
for n in 1 2 4 8; do
  [ "$n" -le "$NGPU" ] || break
  run="torchrun --standalone --nproc-per-node $n benchmarks/bench_scaling.py --out $OUTDIR/scaling.json"
  $run --kind weak --steps-per-rank 2.5M --hidden 256
  $run --kind strong --seq-len 10M --hidden 256
  $run --kind strong --seq-len 10M --hidden 64 --batch 1 --cell gru --jacobian diag --label "gru D=64 quasi"
  $run --kind capacity --hidden 64 --try 100M,50M,20M,10M,5M
done
python3 benchmarks/plot.py --results "$OUTDIR"
