#!/usr/bin/env bash
# One device-machine call (one GPU, ~5 minutes): the pipelined quasi-Newton dense GRU pass
# (kernels/pipelined_quasi_gru.py: maps kept between passes, one recurrent GEMM per pass) against the look-back
# iteration it replaces at 9 <= D <= 64.
#   1. GPU tests: tests/test_pipelined_quasi.py (passes vs float64 references, whole solves vs float64);
#   2. bench_gru_quasi.py --pipelined (arguments of this script go to it): one iteration of each variant per
#      shape and launch shape, then seqpar.solve with the kernel off / on for torch's and DEER's flax init
#      (iterations, float64 residual), and cuDNN, at D=64, B=8, T=1M.
# Results under $OUT: gpu_tests.log, quasi_pipelined.json, quasi_pipelined.log.
source "$(dirname "$0")/device_env.sh"
echo "== 1. GPU tests"
timeout 200 python -m pytest -m gpu -q -x tests/test_pipelined_quasi.py -p no:cacheprovider \
  > "$OUT/gpu_tests.log" 2>&1
echo "tests rc=$?"; tail -3 "$OUT/gpu_tests.log"
echo "== 2. bench_gru_quasi.py --pipelined"
(cd benchmarks && timeout 330 python bench_gru_quasi.py --pipelined "$@" --out "$OUT/quasi_pipelined.json") 2>&1 \
  | grep -v -i warn | tee "$OUT/quasi_pipelined.log"
echo "bench rc=${PIPESTATUS[0]}"
