#!/usr/bin/env bash
# One device-machine call (one GPU, ~8 minutes), session 9:
#   1. GPU tests: NaN / Inf counts (kernels/finite.py), the graphs, the quasi-Newton GEMM epilogue;
#   2. profile_harness.py, GRU(1, 1) / GRU(4, 4), T = 100k: session 8's tree (peers/s8 = `git archive e603306
#      kernels seqpar`) and this one, alternating twice (the host's slow spells fall on both);
#   3. benchmarks/run_quasi_epilogue.sh (the "epilogue" quasi-Newton variant against "gemm", D = 64, B = 8, 1M);
#   4. seqpar against DEER at T = 100k, D = 1 and 4, three rounds (needs peers/deer).
# Results under $OUT.
source "$(dirname "$0")/device_env.sh"
echo "== 1. GPU tests"
timeout 150 python -m pytest -m gpu -q -x tests/test_finite.py tests/test_graphs.py tests/test_stopping.py \
  -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1
echo "tests rc=$?"; tail -2 "$OUT/gpu_tests.log"
echo "== 2. short solves, session 8's tree and this one, alternating"
alternate_trees 2 "$OUT" --dims 1,4 --inits torch --phases long,replays | tee "$OUT/harness_trees.log"
echo "== 3. quasi-Newton epilogue"
OUT=$OUT timeout 330 bash benchmarks/run_quasi_epilogue.sh
echo "== 4. against DEER"
if [ -d peers/deer ]; then
  VS_DEER_TIMEOUT=170 timeout 180 bash benchmarks/run_vs_deer.sh --dims 1,4 --steps 100k \
    --solvers seqpar-dense,deer --extra none --rounds 3 --repeats 15 --max-total-s 160 2>&1 \
    | tee "$OUT/vs_deer.log" | grep -E "^round|^D=|done"
fi
