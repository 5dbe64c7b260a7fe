#!/usr/bin/env bash
# One device-machine call (one GPU, ~4 minutes): the quasi-Newton dense GRU's "epilogue" variant (the recurrent
# GEMM with the GRU step as its epilogue, kernels/quasi_gru_gemm.py, then the diagonal scan) against "gemm".
#   1. GPU tests: tests/test_quasi_gemm.py (epilogue vs gemm vs float64, whole solves), tests/test_linear.py;
#   2. bench_gru_quasi.py --epilogue at D=64, B=8, T=1M (arguments of this script go to it): one iteration of
#      each variant, the GEMM-epilogue kernel alone at six tiles and the scan alone, then seqpar.solve with
#      QUASI_EPILOGUE_MIN_D off / on for torch's and DEER's flax init (iterations, float64 residual), and cuDNN.
# Results under $OUT: gpu_tests.log, quasi_epilogue.json, quasi_epilogue.log.
source "$(dirname "$0")/device_env.sh"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null || true
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
echo "== 1. GPU tests"
timeout 150 python -m pytest -m gpu -q -x tests/test_quasi_gemm.py tests/test_linear.py -p no:cacheprovider \
  > "$OUT/gpu_tests.log" 2>&1
echo "tests rc=$?"; tail -3 "$OUT/gpu_tests.log"
echo "== 2. bench_gru_quasi.py --epilogue"
(cd benchmarks && timeout 200 python bench_gru_quasi.py --epilogue "$@" --out "$OUT/quasi_epilogue.json") 2>&1 \
  | grep -v -i warn | tee "$OUT/quasi_epilogue.log"
echo "bench rc=${PIPESTATUS[0]}"
