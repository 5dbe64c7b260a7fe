#!/usr/bin/env bash
# One device-machine call (one GPU, ~6 minutes): the checks the CPU-only changes of the short-solve path
# still owe a GPU, and the open narrow-width question.  Results under $OUT.
#   1. GPU tests of the graph replay, the robustness checks and the pipelined kernels;
#   2. the entry path's host time on the GPU (bench_solve_entry.py);
#   3. short solves, look-back / pipelined loop x graphs off / on (bench_short_solves.py);
#   4. peak memory of graph-replayed 100k-step solves against the eager loop (bench_pipeline.py
#      --graph-memory-only);
#   5. the B*D = 64 pipelined pass: the table's config against 64-step runs, 8 runs per program, prefetch 2
#      (run 50's sweep: 1.49x against 1.53x at 1M) at 1M and at 10M, both N = 64 shapes.
source "$(dirname "$0")/device_env.sh"
echo "== 1. GPU tests"
timeout 240 python -m pytest -m gpu -q -x tests/test_graphs.py tests/test_robustness.py tests/test_pipelined.py \
  -p no:cacheprovider 2>&1 | tail -3 | tee "$OUT/gpu_tests_short_solves.log"
cd benchmarks
echo "== 2. entry path"
timeout 60 python bench_solve_entry.py --device cuda --out "$OUT/solve_entry_gpu.json"
echo "== 3. short solves"
timeout 90 python bench_short_solves.py --dims 1,4 --steps 100k --out "$OUT/short_solves.json"
echo "== 4. graph memory"
timeout 60 python bench_pipeline.py --graph-memory-only --out "$OUT/graph_memory.json"
echo "== 5. B*D = 64 pipelined pass"
for shape in "--batch 16 --dim 4 --steps 1M" "--batch 16 --dim 4 --steps 10M" "--batch 1 --dim 64 --steps 10M"; do
  timeout 40 python profile_pipelined.py $shape --repeats 7
  timeout 40 python profile_pipelined.py $shape --repeats 7 --run 64 --runs-per-program 8 --prefetch 2
done 2>&1 | tee "$OUT/n64_configs.log"
