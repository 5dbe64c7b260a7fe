#!/usr/bin/env bash
# One device-machine call (one GPU, ~4 minutes): the pipelined quasi-Newton GRU pass with its launch-shape table.
#   1. GPU tests: tests/test_pipelined_quasi.py;
#   2. one iteration per shape (bench_gru_quasi.py --pipelined --no-solves), D = 64 at the spill-free shapes;
#   3. whole solves, kernel off / on, torch and flax init, cuDNN: D = 16 and 32 at B = 16 with the defaults,
#      then D = 64, B = 8 with the kernel allowed at D = 64 (--use-max-d 64) at 16 rows / 4 warps.
# Results under $OUT: gpu_tests.log, quasi_iter74.json, quasi_solves74.json, quasi_solves64_74.json, *.log.
source "$(dirname "$0")/device_env.sh"
timeout 120 python -m pytest -m gpu -q -x tests/test_pipelined_quasi.py -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1
echo "tests rc=$?"; tail -2 "$OUT/gpu_tests.log"
cd benchmarks
timeout 80 python bench_gru_quasi.py --pipelined --no-solves --shapes 64:8,32:16,16:16 --configs default,16:4,16:2,32:8 \
  --reps 5 --out "$OUT/quasi_iter74.json" 2>&1 | grep -v -i warn > "$OUT/quasi_iter74.log"
echo "iter rc=${PIPESTATUS[0]}"
timeout 100 python bench_gru_quasi.py --pipelined --shapes 16:16 --configs default --solve-shapes 16:16,32:16 \
  --reps 3 --out "$OUT/quasi_solves74.json" 2>&1 | grep -v -i warn > "$OUT/quasi_solves74.log"
echo "solves rc=${PIPESTATUS[0]}"
timeout 90 python bench_gru_quasi.py --pipelined --shapes 64:8 --configs default --solve-shapes 64:8 --use-max-d 64 \
  --quasi-tiles 64=16:4 --reps 3 --out "$OUT/quasi_solves64_74.json" 2>&1 | grep -v -i warn > "$OUT/quasi_solves64_74.log"
echo "solves64 rc=${PIPESTATUS[0]}"
python - "$OUT" <<'PY'
import json, sys, os
out = sys.argv[1]
for f in ("quasi_iter74.json", "quasi_solves74.json", "quasi_solves64_74.json"):
    p = os.path.join(out, f)
    if not os.path.exists(p):
        print(f, "missing"); continue
    d = json.load(open(p))
    for r in d["pipelined_iteration"]:
        print(f, r["D"], r["B"], "lookback", round(r["lookback_ms"], 2),
              {k[10:-3]: round(v, 2) for k, v in r.items() if k.startswith("pipelined_") and k.endswith("_ms") and "pass" not in k})
    for r in d["pipelined_solve"]:
        print(f, r["D"], r["B"], r["init"], "off", round(r["off"]["ms"], 1), r["off"]["iterations"], "on", round(r["on"]["ms"], 1),
              r["on"]["iterations"], "f64", r["on"]["residual_f64"], "cudnn", round(r["cudnn_ms"], 1), "x", round(r["on_vs_cudnn"], 2))
PY
