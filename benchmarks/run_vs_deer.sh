#!/usr/bin/env bash
# One device-machine call: DEER (its own JAX code, from a checkout) and seqpar side by side,
# benchmarks/bench_vs_deer.py -> $OUT/vs_deer.json (+ vs_deer.log).  Extra arguments go to the script.
#
# Expects, in the ignored folder peers/ (carried with run's carry=["peers"]; see benchmarks/README.md):
#   peers/deer/    a checkout of github machine-discovery/deer (the deer/ package, DEER_COMMIT)
#   peers/wheels/  pure-Python wheels of equinox, optimistix, lineax, jaxtyping, wadler_lindig,
#                  typing_extensions: used only when the image's Python cannot import them
# DEER_PATH / DEER_SITE / PYTHON override the defaults.  The JAX process never preallocates.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
PY=${PYTHON:-python3}
OUTDIR=${OUT:-benchmarks/results}
mkdir -p "$OUTDIR"
PEERS=${PEERS:-peers}
export DEER_PATH=${DEER_PATH:-$PWD/$PEERS/deer}
[ -f "$DEER_PATH/deer/fseq1d.py" ] || echo "warning: no DEER checkout at $DEER_PATH (DEER rows will say so)"
if [ -z "${DEER_SITE:-}" ] && ! "$PY" -c "import equinox, optimistix" 2>/dev/null; then
  if ls "$PEERS"/wheels/*.whl > /dev/null 2>&1; then
    SITE=$PWD/$PEERS/site
    mkdir -p "$SITE"
    for w in "$PEERS"/wheels/*.whl; do "$PY" -m zipfile -e "$w" "$SITE"; done
    export DEER_SITE=$SITE  # appended after site-packages in the JAX process: installed packages win
    echo "equinox/optimistix not installed: using the carried wheels ($(ls "$PEERS"/wheels | tr '\n' ' '))"
  else
    echo "warning: equinox/optimistix not installed and no wheels in $PEERS/wheels: DEER loads deer.fseq1d only"
  fi
fi
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader 2>/dev/null || true
"$PY" -c "import jax, torch; print('jax', jax.__version__, 'torch', torch.__version__)" 2>&1 | tail -1
# the script stops launching work at --max-total-s (480 s) and rewrites the JSON after every configuration;
# the hard limit keeps the whole call under the device tool's 600 s
timeout -k 5 "${VS_DEER_TIMEOUT:-580}" "$PY" benchmarks/bench_vs_deer.py --deer-path "$DEER_PATH" \
  --out "$OUTDIR/vs_deer.json" "$@" 2>&1 | tee "$OUTDIR/vs_deer.log"
exit "${PIPESTATUS[0]}"
