#!/usr/bin/env bash
# One device-machine call (one GPU, ~2 minutes): where a short solve's time goes now (session 9).
#   1. profile_short_solve.py (GPU timeline of one GRU(1, 1) / GRU(4, 4) solve, T = 100k, B = 16);
#   2. profile_harness.py, long and deer_harness phases with seqpar's own wall time per call;
#   3. bench_vs_deer.py, D = 1 and 4, T = 100k, seqpar-dense and DEER, two rounds (needs peers/deer).
# Results under $OUT (few files: the call returns a limited number).
source "$(dirname "$0")/device_env.sh"
(cd benchmarks && timeout 90 python profile_short_solve.py --dims 1,4 --steps 100k --out-dir "$OUT" --trace-dir /tmp) \
  2>&1 | grep -v -i warn | tee "$OUT/diag.log"
(cd benchmarks && timeout 90 python profile_harness.py --dims 1,4 --inits torch,flax --phases long,deer_harness,replays \
  --out "$OUT/harness.json") 2>&1 | grep -v -i warn | tee -a "$OUT/diag.log"
if [ -d peers/deer ]; then
  VS_DEER_TIMEOUT=120 timeout 130 bash benchmarks/run_vs_deer.sh --dims 1,4 --steps 100k --solvers seqpar-dense,deer \
    --extra none --rounds 2 --repeats 15 --max-total-s 110 2>&1 | grep -E "^round|^  D=|done" | tee -a "$OUT/diag.log"
fi
