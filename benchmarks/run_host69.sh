#!/usr/bin/env bash
# One device-machine call (one GPU, ~5 minutes): session 10's host-time cuts, the result's copy queued behind
# the passes (stopping.take_final), the N = 16 pipelined launches with one step prefetched, and passes that
# project one input feature themselves (backend.PROJECT_IN_PASS).
#   1. GPU tests: the stopping rule and take_final, the graphs, NaN / Inf counts, the pipelined kernels;
#   2. profile_harness.py (long, split), GRU(1, 1) / GRU(4, 4), torch init: session 9's last tree
#      (peers/s9 = `git archive 33c59d1 kernels seqpar`) and this one, alternating, two rounds; then GRU(1, 1)
#      with PROJECT_IN_PASS off, and with RECORD_IN_PASS on;
#   3. seqpar against DEER at T = 100k, D = 1, three rounds (needs peers/deer);
#   4. one B*D = 16 iteration at T = 1M and 10M against the copy bandwidth measured in the same process.
# Results: $OUT/results.tgz and the log on stdout.
source "$(dirname "$0")/device_env.sh"
D=$OUT/r
mkdir -p "$D"
echo "== 1. GPU tests"
timeout 110 python -m pytest -m gpu -q tests/test_stopping.py tests/test_graphs.py tests/test_finite.py \
  tests/test_pipelined.py::test_gpu_pass_projecting_raw_inputs tests/test_pipelined.py::test_gpu_pass_matches_reference \
  tests/test_pipelined.py::test_gpu_solve_long_sequence_matches_float64_gru -p no:cacheprovider --durations=5 \
  > "$D/gpu_tests.log" 2>&1
echo "tests rc=$?"; tail -8 "$D/gpu_tests.log"
echo "== 2. session 9's tree and this one, alternating"
BASE_TREE=peers/s9 alternate_trees 2 "$D" --dims 1,4 --inits torch --phases long,split
echo "-- this tree, PROJECT_IN_PASS off"
(cd benchmarks && timeout 60 python profile_harness.py --dims 1 --inits torch --phases long,split \
  --set seqpar.backend.PROJECT_IN_PASS=False --out "$D/harness_noproj.json") 2>&1 | grep -v -i warn
echo "-- this tree, RECORD_IN_PASS on (the passes record their residuals: one launch less per pass)"
(cd benchmarks && timeout 60 python profile_harness.py --dims 1 --inits torch --phases long,split \
  --set seqpar.kernels.pipelined_diag_gru.RECORD_IN_PASS=True --out "$D/harness_record.json") 2>&1 | grep -v -i warn
echo "== 3. against DEER"
if [ -d peers/deer ]; then
  OUT=$D VS_DEER_TIMEOUT=100 timeout 110 bash benchmarks/run_vs_deer.sh --dims 1 --steps 100k \
    --solvers seqpar-dense,deer --extra none --rounds 3 --repeats 15 --max-total-s 90 2>&1 \
    | grep -E "^round|^  D=|done"
fi
echo "== 4. B*D = 16 iterations"
for T in 1M 10M; do
  (cd benchmarks && timeout 60 python profile_pipelined.py --batch 16 --dim 1 --steps $T --repeats 7 --gbps 0) 2>&1 \
    | grep -v -i warn
done | tee "$D/bd16.log"
tar -czf "$OUT/results.tgz" -C "$OUT" r && rm -rf "$D"
