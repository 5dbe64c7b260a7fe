#!/usr/bin/env bash
# One device-machine call (one GPU, ~7 minutes): the queued graph replay with the stopping rule on the device
# (seqpar/graphs.py, kernels/stopping.py) and the projection inside the graphs, against the tree before them.
#   1. GPU tests: the device stopping rule, graphed vs eager solves, the pipelined kernels (one-tile group
#      scan), the robustness checks;
#   2. seqpar against DEER at T = 100k, D = 1 and 4 (needs peers/ carried: benchmarks/README.md);
#   3. profile_short_solve.py (solve / loop / replays / entry, GPU timeline) on the tree before (peers/baseline:
#      `git archive <commit> kernels seqpar`, if present) and on this one, same call;
#   4. bench_short_solves.py (look-back / pipelined x graphs off / on) and profile_host.py (host time by piece).
# Results under $OUT.
source "$(dirname "$0")/device_env.sh"
echo "== 1. GPU tests"
timeout 240 python -m pytest -m gpu -q -x tests/test_stopping.py tests/test_graphs.py tests/test_pipelined.py \
  tests/test_robustness.py -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1
echo "tests rc=$?"; tail -3 "$OUT/gpu_tests.log"
echo "== 2. against DEER"
if [ -d peers/deer ]; then
  VS_DEER_TIMEOUT=150 timeout 160 bash benchmarks/run_vs_deer.sh --dims 1,4 --steps 100k \
    --solvers seqpar-dense,seqpar-diag,deer --repeats 9 --max-total-s 120 --extra 1:1000:1:seqpar-diag 2>&1 \
    | tee "$OUT/vs_deer.log" | grep -E "^D=|done"
fi
cd benchmarks
echo "== 3. short-solve profile, tree before and this tree"
for tree in $R/peers/baseline $R; do
  [ -d "$tree/seqpar" ] || continue
  echo "-- $tree"
  PYTHONPATH=$tree timeout 90 python profile_short_solve.py --dims 1,4 --steps 100k --out-dir /tmp --trace-dir /tmp \
    2>&1 | grep -v -i warn
done | tee "$OUT/profile_short_solve.log"
echo "== 4. short solves, host time"
timeout 90 python bench_short_solves.py --dims 1,4 --steps 100k --out "$OUT/short_solves.json"
timeout 60 python profile_host.py --dims 1 --calls 300 --out "$OUT/profile_host.json" 2>&1 | head -16
