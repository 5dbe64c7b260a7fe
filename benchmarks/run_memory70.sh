#!/usr/bin/env bash
# One device-machine call (one GPU, ~3 minutes), after run 69:
#   1. peak memory of graph-replayed GRU(1, 1) / GRU(4, 4) solves (B = 16, T = 100k) against the eager loop
#      (bench_pipeline.py --graph-memory-only), with the passes projecting the raw inputs (default) and without
#      (PROJECT_IN_PASS off: the projected inputs' buffers, as before session 10);
#   2. seqpar against DEER at D = 1, T = 1M, two rounds (the raw-input passes on the eager pipelined loop).
# Results: $OUT/results.tgz and the log on stdout.
source "$(dirname "$0")/device_env.sh"
D=$OUT/r
mkdir -p "$D"
echo "== 1. graph memory"
(cd benchmarks && timeout 90 python bench_pipeline.py --graph-memory-only --out "$D/graph_memory.json") 2>&1 \
  | grep -v -i warn
(cd benchmarks && timeout 90 python -c "
import runpy, sys
import seqpar.backend
seqpar.backend.PROJECT_IN_PASS = False
sys.argv = ['bench_pipeline.py', '--graph-memory-only', '--out', '$D/graph_memory_noproj.json']
runpy.run_path('bench_pipeline.py', run_name='__main__')") 2>&1 | grep -v -i warn
echo "== 2. against DEER, T = 1M"
if [ -d peers/deer ]; then
  OUT=$D VS_DEER_TIMEOUT=100 timeout 110 bash benchmarks/run_vs_deer.sh --dims 1 --steps 1M \
    --solvers seqpar-dense,deer --extra none --rounds 2 --repeats 9 --max-total-s 90 2>&1 \
    | grep -E "^round|^  D=|done"
fi
tar -czf "$OUT/results.tgz" -C "$OUT" r && rm -rf "$D"
