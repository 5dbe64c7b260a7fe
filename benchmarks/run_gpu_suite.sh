#!/usr/bin/env bash
# One device-machine call: GPU tests, then the single-GPU benchmarks; results under $OUT.
# Usage (on the GPU machine, from the repo root):  OUT=/some/dir bash benchmarks/run_gpu_suite.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
python -m pip install -q --no-deps --no-build-isolation -e . > /dev/null 2>&1 || true
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 240 python -m pytest -m gpu -q -p no:cacheprovider tests/test_kernels.py tests/test_robustness.py 2>&1 | tail -15 > "$OUT/gpu_tests.log"
cat "$OUT/gpu_tests.log"
timeout 120 python benchmarks/bench_kernels.py --only densegru --out "$OUT/densegru.json" 2>&1 | tail -5
timeout 230 python benchmarks/bench_peers.py --time-budget 170 --cudnn-max-T 100k --out "$OUT/peers.json" 2>&1 | grep -v "^wrote"
timeout 200 python benchmarks/bench_training.py --time-budget 140 --out "$OUT/training.json" 2>&1 | grep -v "^wrote"
