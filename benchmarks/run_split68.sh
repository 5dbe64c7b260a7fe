#!/usr/bin/env bash
# One device-machine call (one GPU, ~5 minutes), session 10's first:
#   1. GPU tests of session 9's last, untested commits (graphs' chain cap, the look-back kernels' rel_residual);
#   2. profile_harness.py --phases long,replays,split: where the host time of GRU(1, 1) / GRU(4, 4), B = 16,
#      T = 100k goes (stamps at the solve's stages), torch and flax initialisation;
#   3. profile_pipelined.py, B*D = 16, T = 1M and 10M: one iteration against the copy bandwidth measured in the
#      same process, at the table's launch shape and others (warps were never swept at this width).
# Results: $OUT/results.tgz and the log on stdout.
source "$(dirname "$0")/device_env.sh"
D=$OUT/r
mkdir -p "$D"
echo "== 1. GPU tests"
timeout 100 python -m pytest -m gpu -q tests/test_graphs.py tests/test_finite.py tests/test_stopping.py \
  tests/test_lookback.py tests/test_fused_dense_gru.py tests/test_quasi_gemm.py -p no:cacheprovider \
  --durations=5 > "$D/gpu_tests.log" 2>&1
echo "tests rc=$?"; tail -12 "$D/gpu_tests.log"
echo "== 2. host split"
(cd benchmarks && timeout 120 python profile_harness.py --dims 1,4 --inits torch,flax --phases long,replays,split \
  --out "$D/harness_split.json") 2>&1 | grep -v -i warn
echo "== 3. B*D = 16 iterations"
CFGS=64:16:2:0,64:16:1:0,64:16:8:0,64:8:2:0,64:32:4:0,64:32:8:0,64:16:4:1,64:16:2:1,64:16:4:2,128:16:4:0,32:16:4:0
for T in 1M 10M; do
  (cd benchmarks && timeout 100 python profile_pipelined.py --batch 16 --dim 1 --steps $T --repeats 7 --gbps 0 \
    --configs $CFGS) 2>&1 | grep -v -i warn
done | tee "$D/bd16_configs.log"
tar -czf "$OUT/results.tgz" -C "$OUT" r && rm -rf "$D"
