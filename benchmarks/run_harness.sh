#!/usr/bin/env bash
# One device-machine call (one GPU, ~1 minute): benchmarks/profile_harness.py with the GPU's clocks logged
# every 20 ms beside it (nvidia-smi), so that a harness's slow phase can be matched with the clocks.
# Results under $OUT: harness.json, harness.log, clocks.csv.
source "$(dirname "$0")/device_env.sh"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,power.draw --format=csv 2>/dev/null || true
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,utilization.gpu --format=csv -lms 20 \
  > "$OUT/clocks.csv" 2>/dev/null &
SMI=$!
python -c "import time; print('t_wall at start', time.time())"
(cd benchmarks && timeout 240 python profile_harness.py "$@" --out "$OUT/harness.json") 2>&1 | grep -v -i warn \
  | tee "$OUT/harness.log"
kill $SMI 2>/dev/null || true
