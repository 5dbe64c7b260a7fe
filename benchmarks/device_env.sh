# Sourced first by the run_*.sh device-call scripts: strict mode; the repository root as the working folder ($R);
# the checkout on PYTHONPATH, Triton compiling (not interpreting); $OUT (default benchmarks/results) created; the
# GPU, torch and triton printed.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
R=$PWD
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 PYTHONPATH=$R
OUT=${OUT:-$R/benchmarks/results}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || true
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" 2>/dev/null || true

# alternate_trees ROUNDS DIR ARGS...: benchmarks/profile_harness.py ARGS on a baseline tree ($BASE_TREE, default
# peers/s8: `git archive e603306 kernels seqpar`, session 8's) and on this one, in turn, ROUNDS times, JSON to
# DIR/harness_<tree>_<round>.json (separate processes differ by +-20-30 % on one machine: alternating spreads a
# slow spell over both trees)
alternate_trees() {
  local rounds=$1 dir=$2 round tree name
  shift 2
  for round in $(seq 1 "$rounds"); do
    for tree in "${BASE_TREE:-peers/s8}" .; do
      [ -d "$R/$tree/seqpar" ] || continue
      name=$(basename "$(cd "$R/$tree" && pwd)")
      echo "-- round $round: $tree"
      (cd "$R/benchmarks" && PYTHONPATH=$R/$tree timeout 100 python profile_harness.py "$@" \
        --out "$dir/harness_${name}_$round.json") 2>&1 | grep -v -i warn
    done
  done
}
