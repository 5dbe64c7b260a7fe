#!/usr/bin/env bash
# One device-machine call (one GPU, ~8 minutes): the pipelined quasi-Newton GRU pass with programs splitting the
# channels (QuasiRunConfig.cb; two maps buffers).
#   1. GPU tests: tests/test_pipelined_quasi.py -k gpu_pass (split and whole-width launch shapes against float64);
#   2. one iteration (pass + carry scan) against the look-back iteration, per launch shape, at D = 64, B = 8
#      and D = 32, B = 16 (T = 1M);
#   3. whole solves off / on (torch and flax init, cuDNN in the same process) at D = 64, B = 8 with the kernel
#      at the fastest shape of step 2, and at D = 16 / 32, B = 16 (torch init) with D = 32's fastest shape.
# Short form (device budget): CONFIGS64=... INITS64=torch SKIP32=1 SKIPTESTS=1 bash benchmarks/run_quasi_split75.sh.
# Results under $OUT: gpu_tests.log, quasi_split75{,_solve64,_solve32}.{json,log}.
source "$(dirname "$0")/device_env.sh"
[ -n "${SKIPTESTS:-}" ] || timeout 45 python -m pytest -m gpu -q -x tests/test_pipelined_quasi.py -k "gpu_pass and (64-32 or 33-16)" -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1
echo "tests rc=$?"; tail -2 "$OUT/gpu_tests.log"
cd benchmarks
timeout 100 python bench_gru_quasi.py --pipelined --shapes 64:8 --no-solves --reps 5 \
  --configs "${CONFIGS64:-default,16:4,16:4:c32,64:8:c32,16:4:c16}" \
  --out "$OUT/quasi_split75.json" 2>&1 | grep -v -i warn > "$OUT/quasi_split75.log"
echo "sweep64 rc=${PIPESTATUS[0]}"
best() {  # the fastest launch shape of a sweep as rows:warps:channels, and whether it beat the look-back iteration
  python - "$1" <<'PY'
import json, sys
sys.path.insert(0, ".")
from bench_gru_quasi import parse_config
r = json.load(open(sys.argv[1]))["pipelined_iteration"][0]
ms = {k[10:-3]: v for k, v in r.items() if k.startswith("pipelined_") and k.endswith("_ms") and not k.endswith("pass_ms")}
conf = min(ms, key=ms.get)
_, cfg = parse_config(conf, r["T"], r["B"], r["D"])
print(f"{cfg.r * cfg.bb}:{cfg.warps}:{cfg.cb}", conf, round(ms[conf], 2), "lookback", round(r["lookback_ms"], 2), file=sys.stderr)
print(f"{cfg.r * cfg.bb}:{cfg.warps}:{cfg.cb}")
PY
}
B64=$(best "$OUT/quasi_split75.json")
echo "best64=$B64"
timeout 130 python bench_gru_quasi.py --pipelined --shapes 64:8 --configs default --use-max-d 64 --quasi-tiles "64=$B64" \
  --solve-shapes 64:8 --inits "${INITS64:-torch,flax}" --reps 5 --out "$OUT/quasi_split75_solve64.json" 2>&1 | grep -v -i warn \
  > "$OUT/quasi_split75_solve64.log"
echo "solve64 rc=${PIPESTATUS[0]}"
[ -n "${SKIP32:-}" ] || timeout 100 python bench_gru_quasi.py --pipelined --shapes 32:16 --no-solves --reps 5 \
  --configs default,16:2,16:2:c16,16:4:c16 \
  --out "$OUT/quasi_split75_d32.json" 2>&1 | grep -v -i warn > "$OUT/quasi_split75_d32.log"
echo "sweep32 rc=${PIPESTATUS[0]}"
[ -n "${SKIP32:-}" ] || B32=$(best "$OUT/quasi_split75_d32.json")
echo "best32=$B32"
[ -n "${SKIP32:-}" ] || timeout 110 python bench_gru_quasi.py --pipelined --shapes 32:16 --configs default --quasi-tiles "32=$B32" \
  --solve-shapes 16:16,32:16 --inits torch --reps 5 --out "$OUT/quasi_split75_solve32.json" 2>&1 | grep -v -i warn \
  > "$OUT/quasi_split75_solve32.log"
echo "solve32 rc=${PIPESTATUS[0]}"
python - "$OUT"/quasi_split75*.json <<'PY'
import json, sys
for path in sys.argv[1:]:
  try:
    d = json.load(open(path))
  except Exception as e:
    print(path, e); continue
  print(path.rsplit("/", 1)[-1], d.get("tiles"), "use_max_d", d.get("use_max_d"))
  for r in d["pipelined_iteration"]:
    print(r["D"], r["B"], "lookback", round(r["lookback_ms"], 2),
          {k[10:-3]: round(v, 2) for k, v in r.items() if k.startswith("pipelined_") and k.endswith("_ms")},
          {k: v for k, v in r.items() if k.endswith("error")})
  for r in d["pipelined_solve"]:
    print(r["D"], r["B"], r["init"], "off", round(r["off"]["ms"], 1), r["off"]["iterations"], "on", round(r["on"]["ms"], 1),
          r["on"]["iterations"], "f64", r["on"]["residual_f64"], "diff", r["max_state_diff"], "cudnn",
          round(r["cudnn_ms"], 1), "x", round(r["on_vs_cudnn"], 2), "off x", round(r["cudnn_ms"] / r["off"]["ms"], 2))
PY
for f in "$OUT"/quasi_split75*.log; do echo "== $f"; tail -n 4 "$f" | cut -c1-400; done
