#!/usr/bin/env bash
# One device-machine call (one GPU, ~6 minutes): short solves after the session-9 host trims (NaN checks of
# replayed solves inside the first graph, one walk of the cell's tensors), against the trees before, same call.
#   1. GPU tests of the graphs and the device stopping rule;
#   2. profile_harness.py (GRU(1, 1) / GRU(4, 4), T = 100k, B = 16, torch and flax weights) on each tree in
#      peers/ (`git archive <commit> kernels seqpar`: peers/baseline = 39fecf7, session 7; peers/s8 = e603306,
#      session 8) and on this one; then this tree with the pass-fused group scan (FUSE_MAX_ELEMENTS);
#   3. seqpar against DEER at T = 100k, D = 1 and 4 (needs peers/deer: benchmarks/README.md).
# Results under $OUT.
source "$(dirname "$0")/device_env.sh"
echo "== 1. GPU tests"
timeout 200 python -m pytest -m gpu -q -x tests/test_graphs.py tests/test_stopping.py -p no:cacheprovider \
  > "$OUT/gpu_tests.log" 2>&1
echo "tests rc=$?"; tail -2 "$OUT/gpu_tests.log"
echo "== 2. short solves by tree"
PH="--dims 1,4 --inits torch,flax --phases long,deer_harness,replays"
for tree in peers/baseline peers/s8 .; do
  [ -d "$R/$tree/seqpar" ] || continue
  name=$(basename "$(cd "$R/$tree" && pwd)")
  echo "-- $tree"
  (cd benchmarks && PYTHONPATH=$R/$tree timeout 120 python profile_harness.py $PH --out "$OUT/harness_$name.json") \
    2>&1 | grep -v -i warn
done | tee "$OUT/harness_trees.log"
echo "-- this tree, FUSE_MAX_ELEMENTS = 65536"
(cd benchmarks && timeout 90 python profile_harness.py --dims 1 --inits torch,flax --phases long,deer_harness,replays \
  --set seqpar.kernels.pipelined_diag_gru.FUSE_MAX_ELEMENTS=65536 --out "$OUT/harness_fused.json") 2>&1 \
  | grep -v -i warn | tee "$OUT/harness_fused.log"
echo "== 3. against DEER"
if [ -d peers/deer ]; then
  VS_DEER_TIMEOUT=150 timeout 160 bash benchmarks/run_vs_deer.sh --dims 1,4 --steps 100k \
    --solvers seqpar-dense,seqpar-diag,deer --repeats 15 --max-total-s 140 2>&1 \
    | tee "$OUT/vs_deer.log" | grep -E "^D=|done"
fi
