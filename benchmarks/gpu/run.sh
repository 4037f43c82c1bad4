#!/usr/bin/env bash
# One GPU run (H100/H200, jax 0.11.x, no network): check every GPU kernel against its
# reference, then time them against cuDNN / XLA / jax's bundled Pallas attention.
# At most ~9.5 minutes (6 for the kernels, 3 for fp8 vs bf16 training: fp8_train.py), so
# the whole run fits one 10-minute device call;
# logs and JSON under $OUT (the JSON is rewritten after every
# measurement, so a timeout keeps what was measured); the ratio table prints last.
# Exit status is bench.py's: 0 all checks passed, 1 a check (or one of our kernels) failed,
# 2 no GPU without --dry-run, 124 killed by the timeout.
#   OUT=/tmp/out benchmarks/gpu/run.sh            # on the GPU machine
#   benchmarks/gpu/run.sh --dry-run               # anywhere: CPU, tiny shapes, interpreted
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
"$PY" - <<'PYEOF' > "$OUT/env.txt" 2>&1 || true
import jax, platform; print(platform.python_version(), jax.__version__, jax.devices())
PYEOF
if ! "$PY" -c "import tpustack.kernels" 2>/dev/null; then
  # The GPU machines have no network and no install of this checkout: map
  # tpustack.kernels (jax-only) onto kernels/ through a throwaway shim package.
  SHIM="$(mktemp -d)"
  mkdir -p "$SHIM/tpustack"
  ln -s "$PWD/kernels" "$SHIM/tpustack/kernels"
  : > "$SHIM/tpustack/__init__.py"
  export PYTHONPATH="$SHIM:${PYTHONPATH:-}"
fi
if command -v nvidia-smi >/dev/null; then nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true; fi
# Leave the card's settings alone; keep XLA from grabbing 75% up front so peak memory is real.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
# --budget-s stops starting new timings after 300 s; the timeout is the hard stop.
set +e
timeout 360 "$PY" benchmarks/gpu/bench.py --out "$OUT" --budget-s 300 "$@" 2>&1 | tee "$OUT/bench.log"
rc="${PIPESTATUS[0]}"
set -e
if [ "$rc" = 124 ]; then
  echo "run.sh: bench.py killed after 360 s; the JSON in $OUT holds what it measured" | tee -a "$OUT/bench.log" >&2
elif [ "$rc" != 0 ]; then
  echo "run.sh: bench.py exited $rc (see the reasons above and $OUT/bench.log)" >&2
fi
# fp8 training against bf16 (train.precision=fp8): needs the whole tpustack's dependencies.
FP8_ARGS=()
for a in "$@"; do if [ "$a" = --dry-run ]; then FP8_ARGS+=(--dry-run); fi; done
if "$PY" -c "import flax, optax, orbax.checkpoint, ml_collections" 2>/dev/null; then
  t0=$SECONDS
  if ! timeout 170 "$PY" benchmarks/gpu/fp8_train.py --out "$OUT" ${FP8_ARGS[@]+"${FP8_ARGS[@]}"} 2>&1 | tee "$OUT/fp8_train.log"; then
    echo "run.sh: fp8_train.py failed or timed out (see $OUT/fp8_train.log)" >&2
    # A quick failure is most likely the image's flax/optax/orbax API against our code: once
    # more with the pinned versions, when their wheels travelled in .whl/pinned.
    if [ $((SECONDS - t0)) -lt 60 ] && ls .whl/pinned/*.whl >/dev/null 2>&1; then
      "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/pinned .whl/pinned/*.whl \
        && PYTHONPATH="/tmp/pinned:${PYTHONPATH:-}" timeout 150 "$PY" benchmarks/gpu/fp8_train.py --out "$OUT" \
             2>&1 | tee "$OUT/fp8_train_pinned.log" || echo "run.sh: fp8_train.py with pinned wheels failed too" >&2
    fi
  fi
else
  echo "run.sh: fp8_train.py skipped: flax / optax / orbax / ml_collections not installed" | tee "$OUT/fp8_train.log" >&2
fi
exit "$rc"
