#!/usr/bin/env bash
# One device-machine call (one GPU, ~2.5 minutes): the chunked group scan now in the defaults (run 66's variant 3),
#   1. GPU tests of the pipelined kernels;
#   2. profile_harness.py, GRU(1, 1), T = 100k: the defaults, and with MIN_THREADS = 2^16 on top (runs of 16).
# Results: the log on stdout.
source "$(dirname "$0")/device_env.sh"
timeout 60 python -m pytest -m gpu -q -x tests/test_pipelined.py -p no:cacheprovider 2>&1 | tail -2
K=seqpar.kernels.pipelined_diag_gru
for v in "" "--set $K.MIN_THREADS=65536"; do
  echo "-- ${v:-defaults}"
  (cd benchmarks && timeout 35 python profile_harness.py --dims 1 --inits torch --phases long,replays $v \
    --out /tmp/h.json) 2>&1 | grep -v -i warn | grep "D="
done
