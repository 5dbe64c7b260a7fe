#!/usr/bin/env bash
# One device-machine call (one GPU, ~3 minutes): the pipelined quasi-Newton GRU pass with its launch-shape table.
#   1. GPU tests: tests/test_pipelined_quasi.py;
#   2. bench_gru_quasi.py --pipelined: one iteration at D = 64, B = 8 and D = 32, B = 16 at the default and the
#      spill-free launch shapes (16 rows, 2 or 4 warps) against the look-back iteration, then whole solves off / on,
#      torch init, and cuDNN, at D = 16 and 32, B = 16, T = 1M (the defaults);
#   3. D = 64, B = 8: the kernel at 16 rows x 4 warps, one iteration and the solves off / on, torch init.
# Results under $OUT: gpu_tests.log, quasi_final74{,_d64}.json, quasi_final74{,_d64}.log.
source "$(dirname "$0")/device_env.sh"
timeout 50 python -m pytest -m gpu -q -x tests/test_pipelined_quasi.py -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1
echo "tests rc=$?"; tail -2 "$OUT/gpu_tests.log"
cd benchmarks
timeout 150 python bench_gru_quasi.py --pipelined --shapes 64:8,32:16 --configs default,16:4,16:2 --solve-shapes 16:16,32:16 --inits torch \
  --reps 5 --out "$OUT/quasi_final74.json" 2>&1 | grep -v -i warn > "$OUT/quasi_final74.log"
echo "bench rc=${PIPESTATUS[0]}"
# 3. D = 64, B = 8 with the kernel at 16 rows x 4 warps (ptxas: no spills), solves off / on, torch init
timeout 120 python bench_gru_quasi.py --pipelined --shapes 64:8 --configs default --use-max-d 64 --quasi-tiles 64=16:4 \
  --solve-shapes 64:8 --inits torch --reps 5 --out "$OUT/quasi_final74_d64.json" 2>&1 | grep -v -i warn > "$OUT/quasi_final74_d64.log"
echo "bench d64 rc=${PIPESTATUS[0]}"
python - "$OUT/quasi_final74.json" "$OUT/quasi_final74_d64.json" <<'PY'
import json, sys
for path in sys.argv[1:]:
  try:
    d = json.load(open(path))
  except Exception as e:
    print(path, e); continue
  for r in d["pipelined_iteration"]:
    print(r["D"], r["B"], "lookback", round(r["lookback_ms"], 2),
          {k[10:-3]: round(v, 2) for k, v in r.items() if k.startswith("pipelined_") and k.endswith("_ms")})
  for r in d["pipelined_solve"]:
    print(r["D"], r["B"], r["init"], "off", round(r["off"]["ms"], 1), r["off"]["iterations"], "on", round(r["on"]["ms"], 1),
          r["on"]["iterations"], "f64", r["on"]["residual_f64"], "diff", r["max_state_diff"], "cudnn",
          round(r["cudnn_ms"], 1), "x", round(r["on_vs_cudnn"], 2))
PY
