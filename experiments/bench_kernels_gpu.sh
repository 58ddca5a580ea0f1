#!/usr/bin/env bash
# Issue #5 kernel benchmark on one GPU (an H100): checks the compiled kernels
# against the reference on the device, then times them against bf16 jnp.dot and
# prints the README table last (see experiments/bench_kernels.py's docstring).
#
# Usage, from the repository root of a host with a CUDA jax (e.g. the lent
# H100, whose image has jax, flax, optax, absl-py and pytest):
#   bash experiments/bench_kernels_gpu.sh [OUT_DIR] [extra bench_kernels flags]
# e.g. a quick first check: bash experiments/bench_kernels_gpu.sh /tmp/b --models=gemma2_2b --batches=1,64
#
# Writes OUT_DIR/bench_kernels.json (every row), OUT_DIR/bench_kernels.md (the
# README table with the device named), bench_kernels.log and pytest_compiled.log.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-/tmp/bench_kernels_gpu}"
shift || true
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"

"$PY" - <<'PYEOF'
import sys
import jax
print('jax', jax.__version__, jax.devices())
if jax.default_backend() != 'gpu':
  sys.exit(f'bench_kernels_gpu.sh: no GPU found (jax backend={jax.default_backend()!r}); '
           'for the CPU smoke run use: python -m experiments.bench_kernels')
PYEOF

# Compiled (non-interpret) Triton kernels vs the reference, on the device.
if "$PY" -m pytest -q -n 0 tests/kernels_pallas/test_quantized_matmul.py -k compiled \
    >"$OUT/pytest_compiled.log" 2>&1; then
  echo "compiled-kernel tests passed: $(tail -n 1 "$OUT/pytest_compiled.log")"
else
  echo "compiled-kernel tests FAILED (benchmarking anyway): see $OUT/pytest_compiled.log"
  tail -n 30 "$OUT/pytest_compiled.log"
fi

# Per-case failures are printed as FAILED rows; their tracebacks go to the log.
status=0
"$PY" -m experiments.bench_kernels --output_dir="$OUT" --markdown "$@" \
    2>"$OUT/bench_kernels.log" || status=$?
if [ "$status" -ne 0 ]; then
  tail -n 40 "$OUT/bench_kernels.log"
fi
exit "$status"
