#!/usr/bin/env bash
# One device-machine call (one GPU, ~3 minutes): RECORD_IN_PASS (kernels/pipelined_diag_gru.py: a guarded pass
# records its residual in its last program) on the GPU:
#   1. the GPU tests of the graphs and the stopping rule with it on;
#   2. GRU(1, 1), B = 16, T = 100k (profile_harness.py, long): off and on in alternating processes, three rounds.
# Results: $OUT/results.tgz and the log on stdout.
source "$(dirname "$0")/device_env.sh"
D=$OUT/r
mkdir -p "$D"
echo "== 1. GPU tests, RECORD_IN_PASS on"
timeout 90 python -c "
import sys, pytest
import seqpar.kernels.pipelined_diag_gru as k
k.RECORD_IN_PASS = True
sys.exit(pytest.main(['-m', 'gpu', '-q', 'tests/test_graphs.py', 'tests/test_stopping.py', '-p', 'no:cacheprovider']))
" > "$D/gpu_tests_record.log" 2>&1
echo "tests rc=$?"; tail -3 "$D/gpu_tests_record.log"
echo "== 2. off / on, alternating"
for round in 1 2 3; do
  for v in False True; do
    echo "-- round $round: RECORD_IN_PASS=$v"
    (cd benchmarks && timeout 40 python profile_harness.py --dims 1 --inits torch --phases long \
      --set seqpar.kernels.pipelined_diag_gru.RECORD_IN_PASS=$v --out "$D/harness_record_${v}_$round.json") 2>&1 \
      | grep -v -i warn | grep long
  done
done | tee "$D/record_ab.log"
tar -czf "$OUT/results.tgz" -C "$OUT" r && rm -rf "$D"
