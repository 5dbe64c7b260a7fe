#!/usr/bin/env bash
# One device-machine call (one GPU, ~4 minutes), session 9's last: chained first queues (seqpar/graphs.py).
#   1. GPU tests: the graphs, NaN / Inf counts, the device stopping rule;
#   2. seqpar against DEER at T = 100k, D = 1 and 4, three rounds (needs peers/deer);
#   3. profile_harness.py, GRU(1, 1) / GRU(4, 4): session 8's tree (peers/s8) and this one, alternating twice;
#   4. profile_short_solve.py, GRU(1, 1): the GPU timeline of one solve.
# Results: $OUT/results.tgz (the call returns few files) and the log on stdout.
source "$(dirname "$0")/device_env.sh"
D=$OUT/r
mkdir -p "$D"
echo "== 1. GPU tests"
timeout 150 python -m pytest -m gpu -q -x tests/test_graphs.py tests/test_finite.py tests/test_stopping.py \
  -p no:cacheprovider > "$D/gpu_tests.log" 2>&1
echo "tests rc=$?"; tail -2 "$D/gpu_tests.log"
echo "== 2. against DEER"
if [ -d peers/deer ]; then
  OUT=$D VS_DEER_TIMEOUT=140 timeout 150 bash benchmarks/run_vs_deer.sh --dims 1,4 --steps 100k \
    --solvers seqpar-dense,deer --extra none --rounds 3 --repeats 15 --max-total-s 130 2>&1 \
    | grep -E "^round|^  D=|done"
fi
echo "== 3. short solves, session 8's tree and this one, alternating"
alternate_trees 2 "$D" --dims 1,4 --inits torch --phases long,replays
echo "== 4. one solve's GPU timeline"
(cd benchmarks && timeout 90 python profile_short_solve.py --dims 1 --steps 100k --out-dir "$D" --trace-dir /tmp) \
  2>&1 | grep -v -i warn
python - "$D/profile_short_solve.json" <<'PY'
import json, sys
for r in json.load(open(sys.argv[1]))["rows"]:
    for s in r["trace"].get("sequence", []):
        print(s)
PY
tar -czf "$OUT/results.tgz" -C "$OUT" r && rm -rf "$D"
