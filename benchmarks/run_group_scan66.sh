#!/usr/bin/env bash
# One device-machine call (one GPU, ~4 minutes): the group-totals scan at B*D = 16 (kernels/pipelined_diag_gru.py).
# Run 65's timeline of GRU(1, 1), B = 16, T = 100k had _group_scan_kernel at 15-17 us per pass, as long as the pass
# (runs of 8 steps: 782 groups scanned by one program).  Variants, each in its own process:
#   default | MIN_THREADS = 2^16 (runs of 16) | MIN_THREADS = 2^15 (runs of 32) | the chunked scan (GROUP_SCAN_WALK
#   = 64, GROUP_SCAN_CH = 64: three launches, 13 programs)
# timed by profile_harness.py (T = 100k solves: long, replays) and profile_pipelined.py (T = 1M: pass, iteration);
# then bench_vs_deer.py, D = 1, T = 100k, three rounds, with the default and with the variant of the fastest replays.
# Results: $OUT/results.tgz and the log on stdout.
source "$(dirname "$0")/device_env.sh"
D=$OUT/r
mkdir -p "$D"
K=seqpar.kernels.pipelined_diag_gru
VARIANTS=("" "--set $K.MIN_THREADS=65536" "--set $K.MIN_THREADS=32768"
          "--set $K.GROUP_SCAN_WALK=64 --set $K.GROUP_SCAN_CH=64")
for i in "${!VARIANTS[@]}"; do
  v=${VARIANTS[$i]}
  echo "-- variant $i: ${v:-default}"
  (cd benchmarks && timeout 80 python profile_harness.py --dims 1 --inits torch --phases long,replays $v \
    --out "$D/harness_v$i.json") 2>&1 | grep -v -i warn
  (cd benchmarks && timeout 60 python profile_pipelined.py --batch 16 --dim 1 --steps 1M --repeats 7 $v) 2>&1 \
    | grep -v -i warn
done | tee "$D/variants.log"
BEST=$(python - "$D" <<'PY'
import json, sys
best = min(range(4), key=lambda i: json.load(open(f"{sys.argv[1]}/harness_v{i}.json"))["rows"][0]["phases"]
           ["replays"]["median_us"])
print(best)
PY
)
echo "fastest replays: variant $BEST"
if [ -d peers/deer ]; then
  for i in 0 $BEST; do
    [ "$i" = 0 ] && [ "$BEST" = 0 ] && [ -n "${DONE0:-}" ] && continue
    DONE0=1
    echo "-- against DEER, variant $i: ${VARIANTS[$i]:-default}"
    mkdir -p "$D/deer_v$i"
    OUT=$D/deer_v$i VS_DEER_TIMEOUT=80 timeout 90 bash benchmarks/run_vs_deer.sh --dims 1 --steps 100k \
      --solvers seqpar-dense,deer --extra none --rounds 3 --repeats 15 --max-total-s 70 ${VARIANTS[$i]} 2>&1 \
      | grep -E "^round|done"
  done
fi
tar -czf "$OUT/results.tgz" -C "$OUT" r && rm -rf "$D"
