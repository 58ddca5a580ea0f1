r"""Benchmark: packed int4/int3 Pallas matmul vs bf16 ``jnp.dot`` (issues #5, #16).

The kernels: docs/method.md#kernels.

Times, for each projection shape (SmolLM2-135M, Gemma 2 2B / 9B) and batch size,
the bf16 ``jnp.dot`` baseline, the XLA dequantize-then-dot path, the fused Pallas
kernels (int4 and int3, group 128, asymmetric and/or symmetric, bf16 activations)
and the block-diagonal transform kernel ``x M^-1``; prints time, achieved memory
bandwidth (bytes that must move: packed weight + scales + zeros + activations +
output) as GB/s and as a fraction of the device's datasheet HBM peak, and the
fraction of the roofline ``max(bytes / peak_bw, flops / peak_flops)``, and writes
JSON (and the README table as Markdown). Column ``err|ovh``: the kernel's max
error relative to the XLA path (max|y - ref| / max|ref|; checks the compiled
kernel on the device), or for the transform the time of ``x @ blockdiag(Minv)``
as a fraction of the bf16 matmul. Every ratio (speedup over bf16, over the XLA
dequant path, transform overhead) compares timings of the same run.

Decode step (``--config.decode_batches=1,16``): one jitted decode step of a whole
model (``--config.decode_model``, random weights of the preset, bf16 activations
and KV cache) with bf16 weights, with packed weights through the XLA dequant path
and through the kernels (also with an online ``x M^-1`` on every linear); time per
step, speedup over bf16 and the kernels' logits error against the XLA path.

Timing. One jitted program applies the op to ``copies`` distinct copies of the
weight one after the other; the reported time is the median program time over
``--config.iters`` runs divided by ``copies``. Distinct copies (at least
``--config.rotate_mb`` MB of weights in all, at most ``--config.max_copies`` of
them) keep a weight from being served by the 50 MB L2 of an H100 from one call
to the next, and one program per measurement amortises the host dispatch, which
would otherwise dominate the microsecond-scale batch-1 kernels. Each copy is one
more kernel call in the program: if compilation is slow, lower
``--config.max_copies``. ``--config.time_budget_s`` stops the shape grid (not the
decode step) once that many seconds have passed; rows so far are kept, and the
JSON is rewritten after every shape, so a killed run leaves its rows too.

GPU run (one H100 / H200; not yet run on a GPU). From the repository root, with a
CUDA ``jax`` installed::

  bash experiments/bench_kernels_gpu.sh /tmp/bench_kernels_gpu

which checks the compiled kernels against the reference on the device and then
runs the issue's whole set (see that script's header), e.g.::

  python -m experiments.bench_kernels --config.output_dir=/tmp/bench_kernels_gpu \
      --config.markdown=True --config.models=gemma2_2b,gemma2_9b,smollm2_135m \
      --config.batches=1,4,16,64 --config.schemes=asym,sym --config.decode_batches=1,16

It writes ``bench_kernels.json`` (every row) and ``bench_kernels.md`` (the README
table: device, per-shape times and speedups, the decode step, and the issue-#5
targets, met or missed) and prints the table last. To (re)make the table from a
saved JSON::

  python -m experiments.bench_kernels \
      --config.markdown_from=/tmp/bench_kernels_gpu/bench_kernels.json

and paste it into the README's kernel section.

CPU smoke run (no accelerator: prints so, runs one tiny shape in Pallas
interpret mode, 2 weight copies, < 1 min; timings are not meaningful)::

  python -m experiments.bench_kernels --config.output_dir=/tmp/bench_kernels_cpu

Interpret mode with chosen shapes (any host; what ``bench_kernels_gpu.sh
--interpret`` runs)::

  python -m experiments.bench_kernels --config.interpret=True --config.models=tiny \
      --config.batches=1,4 --config.iters=2 --config.decode_model=tiny_llama \
      --config.decode_batches=1,16

Tile sweep example (GPU)::

  python -m experiments.bench_kernels --config.block_n=64 --config.block_m=16 \
      --config.models=gemma2_2b
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import time
import traceback
from typing import Any
from typing import Callable

from absl import app
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cafeq_jax import atomic
from cafeq_jax import packing
from experiments import cli
import kernels_pallas
from kernels_pallas import matmul as matmul_lib

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), 'configs', 'bench_kernels.py')
_CONFIG = None  # the --config flag, defined only when run as a program (see bottom)

# (d_in, d_out) of each projection (Flax layout), per layer.
SHAPES = {
  'gemma2_2b': {
    'q': (2304, 2048),
    'kv': (2304, 1024),
    'o': (2048, 2304),
    'gate_up': (2304, 9216),
    'down': (9216, 2304),
  },
  'gemma2_9b': {
    'q': (3584, 4096),
    'kv': (3584, 2048),
    'o': (4096, 3584),
    'gate_up': (3584, 14336),
    'down': (14336, 3584),
  },
  # d_in = 576 is not a multiple of 128: those shapes use group size 64.
  'smollm2_135m': {
    'q': (576, 576),
    'kv': (576, 192),
    'o': (576, 576),
    'gate_up': (576, 1536),
    'down': (1536, 576),
  },
  # CPU smoke / interpret runs only.
  'tiny': {'proj': (256, 512)},
}

SCHEMES = ('asym', 'sym')

# Group sizes tried, largest first, when the requested one does not divide d_in.
_FALLBACK_GROUPS = (256, 128, 64, 32)

# Peak HBM bandwidth (bytes/s) and dense bf16 FLOP/s by device-kind substring
# (vendor datasheets); first match wins, so more specific names come first.
PEAKS = (
  ('H100 PCIe', 2.0e12, 756e12),
  ('H100', 3.35e12, 989e12),  # SXM (device_kind 'NVIDIA H100 80GB HBM3')
  ('H200', 4.8e12, 989e12),
  ('A100-SXM4-80GB', 2.039e12, 312e12),
  ('A100', 1.555e12, 312e12),
  ('L4', 0.3e12, 121e12),
  ('TPU v4', 1.2e12, 275e12),
  ('TPU v5 lite', 0.819e12, 197e12),
  ('TPU v5e', 0.819e12, 197e12),
  ('TPU v5', 2.765e12, 459e12),  # v5p
  ('TPU v6', 1.64e12, 918e12),
)

# Issue #5 targets: (bits, batch) -> minimum speedup over bf16 on every shape.
TARGETS = {(4, 1): 3.0, (3, 1): 3.5, (4, 64): 1.0, (3, 64): 1.0}


def peak_for(device_kind: str) -> tuple[float, float] | None:
  for name, bw, flops in PEAKS:
    if name.lower() in device_kind.lower():
      return bw, flops
  return None


def group_for(k: int, group_size: int) -> int:
  """``group_size`` if it divides ``k``, else the largest smaller one that does."""
  if k % group_size == 0:
    return group_size
  for g in _FALLBACK_GROUPS:
    if g < group_size and k % g == 0:
      return g
  raise ValueError(f'no group size <= {group_size} among {_FALLBACK_GROUPS} divides d_in={k}.')


def kernel_name(bits: int, scheme: str, prefix: str = 'pallas') -> str:
  """Row name of a packed case: ``pallas_w4`` (asym), ``pallas_w4sym``, ``xla_dequant_w3``."""
  return f'{prefix}_w{bits}{"" if scheme == "asym" else scheme}'


def random_packed(
  key,
  k: int,
  n: int,
  bits: int,
  group_size: int,
  *,
  symmetric: bool = False,
  lead: tuple[int, ...] = (),
  scale_range: tuple[float, float] = (1e-3, 2e-2),
) -> packing.PackedArray:
  """Random codes with the real packed shapes and bf16 scales/zeros (the saved-model
  format, ``pack_params(scale_dtype=jnp.bfloat16)``); no quantization.

  Args:
    key: PRNG key.
    k: rows ``d_in``.
    n: columns ``d_out``.
    bits: code width.
    group_size: rows per scale.
    symmetric: no zero point (stored as ``2^(bits-1)``, as ``packing.pack`` does).
    lead: leading stack dims (``(2,)`` for a kv or gate/up leaf).
    scale_range: scales are uniform in this range.
  """
  k1, k2, k3 = jax.random.split(key, 3)
  npk = packing.packed_columns(n, bits)
  dshape = (*lead, 3, k, npk) if bits == 3 else (*lead, k, npk)
  data = jax.random.bits(k1, dshape, jnp.uint8)
  g = k // group_size
  scale = jax.random.uniform(k2, (*lead, g, n), jnp.float32, *scale_range).astype(jnp.bfloat16)
  if symmetric:
    zero = jnp.full((*lead, g, n), 2 ** (bits - 1), jnp.bfloat16)
  else:
    zero = jax.random.randint(k3, (*lead, g, n), 0, 2**bits).astype(jnp.bfloat16)
  return packing.PackedArray(
    data=data,
    scale=scale,
    zero=zero,
    bits=bits,
    group_size=group_size,
    symmetric=symmetric,
    shape=(*lead, k, n),
  )


def num_copies(weight_bytes: int, rotate_bytes: int, max_copies: int) -> int:
  """Distinct weight copies so that one program moves >= ``rotate_bytes``."""
  return max(1, min(max_copies, math.ceil(rotate_bytes / max(1, weight_bytes))))


def copies_of(tree: Any, n: int) -> list[Any]:
  """``n`` pytrees with the same values in distinct device buffers."""
  return [tree] + [jax.tree.map(jnp.copy, tree) for _ in range(n - 1)]


def rotating(fn):
  """``fn(x, w)`` -> jitted ``g(x, ws)`` applying ``fn`` to each weight in ``ws``."""
  return jax.jit(lambda x, ws: [fn(x, w) for w in ws])


def time_fn(fn, *args, iters: int) -> float:
  """Median wall time in seconds of ``fn(*args)`` (compiled, after warm-up)."""
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def _fmt(v, spec: str, missing: str = '') -> str:
  return missing if v is None else format(v, spec)


def _has_accelerator(result: dict[str, Any]) -> bool:
  return result.get('accelerator', result['backend'] != 'cpu')


def _packed_bits(rows) -> list[int]:
  return sorted(
    {
      int(r['kernel'][len('pallas_w') :].rstrip('sym'))
      for r in rows
      if r['kernel'].startswith('pallas_w')
    },
    reverse=True,
  )


def markdown_table(result: dict[str, Any]) -> str:
  """The README table of a ``bench_kernels.json`` result (see module docstring).

  Args:
    result: the JSON dict written by this script.

  Returns:
    Markdown: a header naming the device; per scheme (asym, sym) a table with one
    row per (model, projection, batch): the bf16 time and, per bit width, the
    kernel time, speedup over bf16 and over the XLA dequant path, achieved HBM
    bandwidth as a fraction of the peak and the roofline fraction, and the
    transform overhead; the decode-step table; and the target summary.
  """
  rows = result['rows']
  bits = _packed_bits(rows)
  peak = (
    'unknown'
    if result.get('peak_bw') is None
    else f'{result["peak_bw"] / 1e12:.2f} TB/s, {result["peak_flops"] / 1e12:.0f} TFLOP/s'
  )
  lines = [
    f'Kernel benchmark on **{result["device"]}** (backend {result["backend"]}, '
    f'jax {result.get("jax_version", "?")}, datasheet peak {peak}).',
    '',
  ]
  if not _has_accelerator(result):
    lines += [
      'No accelerator was found: Pallas interpret mode on CPU, timings are NOT meaningful.',
      '',
    ]
  elif result.get('interpret'):
    lines += ['Kernels ran in Pallas interpret mode: timings are NOT meaningful.', '']
  if result.get('partial'):
    lines += ['Partial result: the run stopped before its end (rows measured so far).', '']
  lines += [
    'Median time per matmul in µs, bf16 activations; `×bf16`: speedup over bf16 '
    '`jnp.dot`; `×XLA`: speedup over the XLA dequantize-then-matmul path; `HBM`: '
    'achieved bandwidth / datasheet peak; `roof`: fraction of the roofline; '
    '`x M⁻¹`: block-diagonal transform time / bf16 matmul time.',
    '',
  ]
  by_key: dict[tuple, dict[str, dict]] = {}
  for r in rows:
    by_key.setdefault((r['model'], r['proj'], r['K'], r['N'], r['M']), {})[r['kernel']] = r
  schemes = [
    s for s in SCHEMES if any(r['kernel'] == kernel_name(b, s) for r in rows for b in bits)
  ]
  for scheme in schemes or ['asym']:
    if len(schemes) > 1:
      lines += [
        f'**{scheme}** (g{result.get("group_size", 128)}'
        f'{", zero points" if scheme == "asym" else ", no zero point"}):',
        '',
      ]
    head = ['model', 'proj', 'K × N', 'g', 'M', 'bf16 µs']
    for b in bits:
      head += [f'int{b} µs', f'int{b} ×bf16', f'int{b} ×XLA', f'int{b} HBM', f'int{b} roof']
    head += ['x M⁻¹']
    lines += ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for (model, proj, k, n, m), ks in by_key.items():

      def cell(name, field, spec, ks=ks):
        r = ks.get(name)
        if r is None:
          return ''
        if 'error' in r:
          return 'FAILED'
        if field == 'time_us' and r.get('fallback'):
          return f'{_fmt(r.get(field), spec)} (fallback)'
        return _fmt(r.get(field), spec)

      group = next((r.get('group_size') for r in ks.values() if 'group_size' in r), None)
      cells = [
        model,
        proj,
        f'{k} × {n}',
        _fmt(group, 'd'),
        str(m),
        cell('bf16_dot', 'time_us', '.1f'),
      ]
      for b in bits:
        name = kernel_name(b, scheme)
        cells += [
          cell(name, 'time_us', '.1f'),
          cell(name, 'speedup_vs_bf16', '.2f'),
          cell(name, 'speedup_vs_xla_dequant', '.2f'),
          cell(name, 'hbm_frac', '.2f'),
          cell(name, 'roofline_frac', '.2f'),
        ]
      bd = [r for name, r in ks.items() if name.startswith('blockdiag')]
      cells.append(cell(bd[0]['kernel'], 'time_frac_of_bf16_dot', '.2f') if bd else '')
      lines.append('| ' + ' | '.join(cells) + ' |')
    lines.append('')
  if result.get('skipped'):
    lines += [
      f'Not run (time budget of {result.get("time_budget_s")} s spent): '
      + ', '.join(result['skipped'])
      + '.',
      '',
    ]
  if result.get('decode_rows'):
    lines += decode_table(result) + ['']
  lines += target_summary(result)
  return '\n'.join(lines) + '\n'


def decode_table(result: dict[str, Any]) -> list[str]:
  """Markdown lines of the decode-step rows (``result['decode_rows']``)."""
  rows = result['decode_rows']
  first = rows[0]
  lines = [
    f'Decode step of **{first["model"]}** (random weights, bf16 activations and '
    f'KV cache of {first["cache_len"]} slots; packed weights g'
    f'{first.get("group_size", "")} asym): time per step in ms, `×bf16`: '
    "speedup over bf16 weights; `err`: the kernels' logits against the XLA "
    'dequant path (max|y - ref| / max|ref|).',
    '',
    '| variant | batch | ms / step | tokens / s | ×bf16 | err |',
    '|---|---|---|---|---|---|',
  ]
  for r in rows:
    if 'error' in r:
      lines.append(f'| {r["variant"]} | {r["batch"]} | FAILED | | | |')
      continue
    lines.append(
      f'| {r["variant"]} | {r["batch"]} | {r["time_ms"]:.3f} | '
      f'{r["tokens_per_s"]:.0f} | {_fmt(r.get("speedup_vs_bf16"), ".2f")} | '
      f'{_fmt(r.get("max_rel_err"), ".1e")} |'
    )
  return lines


def target_summary(result: dict[str, Any]) -> list[str]:
  """Issue #5 targets (``TARGETS``): worst speedup over the shapes, met or missed."""
  out = ['Targets (issues #5, #16), worst case over the shapes:', '']
  if not _has_accelerator(result) or result.get('interpret'):
    return out + [
      '- not evaluated: no accelerator.'
      if not _has_accelerator(result)
      else '- not evaluated: interpret mode.'
    ]
  for (b, m), target in TARGETS.items():
    speedups = [
      r['speedup_vs_bf16']
      for r in result['rows']
      if r['kernel'] == f'pallas_w{b}' and r['M'] == m and 'speedup_vs_bf16' in r
    ]
    if not speedups:
      continue
    worst = min(speedups)
    verdict = 'met' if worst >= target else 'MISSED'
    out.append(f'- int{b}, batch {m}: {worst:.2f}× (target ≥ {target:.1f}×): {verdict}')
  if len(out) == 2:
    out.append('- no row at the target batch sizes (1, 64).')
  return out


def _print_row(row: dict[str, Any], err: str = '') -> None:
  head = (
    f'{row["model"]:12s} {row["proj"]:8s} {row["K"]:6d} {row["N"]:6d} '
    f'{row["M"]:4d} {row["kernel"]:17s}'
  )
  if 'error' in row:
    print(f'{head} FAILED ({row["error"].split(":")[0]})', flush=True)
    return
  speedup = f'{row["speedup_vs_bf16"]:.2f}' if 'speedup_vs_bf16' in row else ''
  hbm = f'{row["hbm_frac"]:.2f}' if 'hbm_frac' in row else 'unknown'
  roof = f'{row["roofline_frac"]:.2f}' if 'roofline_frac' in row else 'unknown'
  print(
    f'{head} {row["time_us"]:9.1f} {row["gbps"]:8.1f} {hbm:>7s} {roof:>8s} '
    f'{speedup:>7s} {err:>8s}{" (fallback)" if row.get("fallback") else ""}',
    flush=True,
  )


def run_benchmark(
  *,
  models,
  batches,
  bits_list,
  group_size,
  iters,
  rotate_bytes,
  max_copies,
  transform_k,
  config,
  schemes=('asym',),
  interpret: bool | None = None,
  time_budget_s: float = 0,
  on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
  """Runs every case and returns the JSON-able result (see module docstring).

  Args:
    models: keys of ``SHAPES``.
    batches: rows of ``x``.
    bits_list: code widths.
    group_size: requested group size (``group_for`` gives the one used per d_in).
    iters: timed iterations per case.
    rotate_bytes: accelerator: bytes of distinct weight copies per program.
    max_copies: upper bound on the copies.
    transform_k: block size of the ``x M^-1`` kernel.
    config: ``QuantizedMatmulConfig`` or None (the kernel's default).
    schemes: 'asym' and/or 'sym'.
    interpret: Pallas interpret mode; default: on a CPU-only host.
    time_budget_s: stop starting new (shape, batch) blocks after this many
      seconds (0: no limit); the blocks left out are listed in ``skipped``.
    on_progress: called with the result so far after every (shape, batch) block.
  """
  t_start = time.perf_counter()
  backend = jax.default_backend()
  kind = getattr(jax.devices()[0], 'device_kind', str(jax.devices()[0]))
  on_cpu = backend == 'cpu'
  if interpret is None:
    interpret = on_cpu
  peak = None if on_cpu else peak_for(kind)
  print(
    f'backend={backend} device={kind} interpret={interpret} peak='
    f'{"unknown" if peak is None else f"{peak[0] / 1e12:.2f} TB/s, {peak[1] / 1e12:.0f} TFLOP/s"}'
  )
  key = jax.random.PRNGKey(0)
  rows, skipped = [], []
  result = dict(
    backend=backend,
    device=kind,
    accelerator=not on_cpu,
    interpret=interpret,
    jax_version=jax.__version__,
    peak_bw=None if peak is None else peak[0],
    peak_flops=None if peak is None else peak[1],
    config=None if config is None else dataclasses.asdict(config),
    group_size=group_size,
    iters=iters,
    rows=rows,
    skipped=skipped,
    time_budget_s=time_budget_s,
  )
  print(
    f'{"model":12s} {"proj":8s} {"K":>6s} {"N":>6s} {"M":>4s} {"kernel":17s} '
    f'{"time_us":>9s} {"GB/s":>8s} {"HBM":>7s} {"roofline":>8s} {"vs_bf16":>7s} '
    f'{"err|ovh":>8s}'
  )
  for model in models:
    for proj, (k, n) in SHAPES[model].items():
      if time_budget_s and time.perf_counter() - t_start > time_budget_s:
        skipped.append(f'{model}/{proj}')
        continue
      g = group_for(k, group_size)
      key, kw, kx, km = jax.random.split(key, 4)
      w_bf16 = (jax.random.normal(kw, (k, n), jnp.float32) * 0.02).astype(jnp.bfloat16)
      packs = {
        (b, s): random_packed(
          jax.random.fold_in(kw, 2 * b + (s == 'sym')), k, n, b, g, symmetric=s == 'sym'
        )
        for b in bits_list
        for s in schemes
      }
      minv = jax.random.normal(km, (k // transform_k, transform_k, transform_k), jnp.float32)

      def ncopies(weight_bytes):
        return 2 if on_cpu else num_copies(weight_bytes, rotate_bytes, max_copies)

      weights = {
        'bf16': copies_of(w_bf16, ncopies(2 * k * n)),
        'minv': copies_of(minv, ncopies(4 * minv.size)),
      }
      for bs, p in packs.items():
        weights[bs] = copies_of(p, ncopies(packing.nbytes(p)))
      bd_ok, bd_why = kernels_pallas.can_use_blockdiag_matmul(k, transform_k, backend)
      for m in batches:
        if time_budget_s and time.perf_counter() - t_start > time_budget_s:
          skipped.append(f'{model}/{proj}/M={m}')
          continue
        x = jax.random.normal(jax.random.fold_in(kx, m), (m, k), jnp.bfloat16)
        io_bytes = 2 * m * k + 2 * m * n
        flops = 2 * m * k * n
        bf16_dot = lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)
        cases = [('bf16_dot', bf16_dot, weights['bf16'], 2 * k * n + io_bytes, flops, None, '')]
        for b in bits_list:
          ok, why = kernels_pallas.can_use_quantized_matmul((k, n), b, g, backend)
          for s in schemes:
            wbytes = packing.nbytes(packs[(b, s)]) + io_bytes
            ref = kernels_pallas.quantized_matmul_reference
            xla_name = kernel_name(b, s, 'xla_dequant')
            cases.append((xla_name, ref, weights[(b, s)], wbytes, flops, None, ''))
            kern = lambda x, p: kernels_pallas.quantized_matmul(
              x, p, interpret=interpret, config=config
            )
            cases.append(
              (kernel_name(b, s), kern, weights[(b, s)], wbytes, flops, xla_name, '' if ok else why)
            )
        bd = lambda x, mi: kernels_pallas.blockdiag_matmul(x, mi, interpret=interpret)
        cases.append(
          (
            f'blockdiag_k{transform_k}',
            bd,
            weights['minv'],
            2 * m * k * 2 + minv.size * 2,
            2 * m * k * transform_k,
            None,
            '' if bd_ok else bd_why,
          )
        )
        times = {}
        programs = {}  # case name -> its jitted rotating program (compiled once)
        for name, fn, ws, nbytes, nflops, check, fallback in cases:
          row = dict(
            model=model,
            proj=proj,
            K=k,
            N=n,
            M=m,
            kernel=name,
            group_size=g,
            bytes=int(nbytes),
            flops=int(nflops),
            copies=len(ws),
            device=kind,
            backend=backend,
          )
          if fallback:  # the kernel wrapper times the XLA reference instead
            row['fallback'] = fallback
          try:
            programs[name] = rotating(fn)
            t = time_fn(programs[name], x, ws, iters=iters) / len(ws)
          except Exception as e:  # pylint: disable=broad-except
            row['error'] = f'{type(e).__name__}: {e}'[:2000]
            logging.error('%s failed:\n%s', name, traceback.format_exc())
            _print_row(row)
            rows.append(row)
            continue
          times[name] = t
          row['time_us'] = t * 1e6
          row['gbps'] = nbytes / t / 1e9
          if peak is not None:
            row['hbm_frac'] = nbytes / t / peak[0]
            row['roofline_frac'] = max(nbytes / peak[0], nflops / peak[1]) / t
          err = ''
          bf16_time = times.get('bf16_dot')
          if name.startswith('blockdiag'):
            # Online-transform cost relative to the matmuls it precedes.
            row['flop_overhead_ratio'] = kernels_pallas.blockdiag_overhead_ratio(k, n, transform_k)
            if bf16_time is not None:
              row['time_frac_of_bf16_dot'] = t / bf16_time
              err = f'ovh {row["time_frac_of_bf16_dot"]:.2f}'
            for other, t_other in times.items():
              if other.startswith('pallas_w'):
                row[f'time_frac_of_{other}'] = t / t_other
          elif bf16_time is not None:
            row['speedup_vs_bf16'] = bf16_time / t
          if check in programs:  # the kernel against the XLA path, same weights
            if check in times:
              row['speedup_vs_xla_dequant'] = times[check] / t
            y = np.asarray(programs[name](x, ws)[0].astype(jnp.float32))
            r = np.asarray(programs[check](x, ws)[0].astype(jnp.float32))
            row['max_rel_err'] = float(np.abs(y - r).max() / (np.abs(r).max() + 1e-30))
            err = f'{row["max_rel_err"]:.1e}'
          _print_row(row, err)
          rows.append(row)
        if on_progress is not None:
          on_progress(result)
      del weights
  result['seconds'] = time.perf_counter() - t_start
  return result


# Projection leaves of a decoder layer's param tree: path -> (lead, d_in, d_out) of
# the matrix view (``cafeq_jax.models.qlinear.QuantizedLinear``) from the config.
_DECODE_LEAVES = {
  ('attn', 'q_einsum', 'w'): lambda c: ((), c.embed_dim, c.num_heads * c.head_dim),
  ('attn', 'kv_einsum', 'w'): lambda c: ((2,), c.embed_dim, c.num_kv_heads * c.head_dim),
  ('attn', 'attn_vec_einsum', 'w'): lambda c: ((), c.num_heads * c.head_dim, c.embed_dim),
  ('mlp', 'gating_einsum'): lambda c: ((2,), c.embed_dim, c.hidden_dim),
  ('mlp', 'linear'): lambda c: ((), c.hidden_dim, c.embed_dim),
}


def _get(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def _with(tree: dict, path, value) -> dict:
  """Copy of ``tree`` with ``tree[path] = value`` (dicts along the path copied)."""
  out = dict(tree)
  out[path[0]] = value if len(path) == 1 else _with(tree[path[0]], path[1:], value)
  return out


def random_quantized_params(
  params: dict, cfg, key, *, bits: int, group_size: int, transform_k: int | None = None
) -> dict:
  """``params`` with every per-layer projection a packed random ``QuantizedLinear``.

  Codes are random, scales bf16 and sized so that the effective weights have
  about the fp init's spread (0.02); with ``transform_k`` every linear also gets a
  random online transform ``(d_in // k, k, k)``. Timing only: not a quantization.
  """
  from cafeq_jax.models import qlinear  # pylint: disable=g-import-not-at-top

  out = dict(params)
  s = 0.04 / 2**bits
  for i in range(cfg.num_layers):
    layer = params[f'layer_{i}']
    for path, shape_fn in _DECODE_LEAVES.items():
      lead, k, n = shape_fn(cfg)
      leaf = _get(layer, path)
      key, kw, kt = jax.random.split(key, 3)
      w = random_packed(
        kw, k, n, bits, group_for(k, group_size), lead=lead, scale_range=(0.5 * s, 1.5 * s)
      )
      tinv = None
      if transform_k:
        tinv = jax.random.normal(
          kt, (k // transform_k, transform_k, transform_k), jnp.float32
        ) / math.sqrt(transform_k)
      layer = _with(
        layer, path, qlinear.QuantizedLinear(weight=w, transform_inv=tinv, shape=tuple(leaf.shape))
      )
    out[f'layer_{i}'] = layer
  return out


def _tree_bytes(tree) -> int:
  return sum(
    math.prod(a.shape) * np.dtype(a.dtype).itemsize
    for a in jax.tree.leaves(tree)
    if hasattr(a, 'dtype')
  )


def decode_benchmark(
  *,
  model: str,
  batches,
  bits_list,
  group_size: int,
  cache_len: int,
  iters: int,
  transform_k: int,
  on_progress: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
  """One jitted decode step of ``model``: bf16 weights vs packed (XLA and kernels).

  ``on_progress`` is called with the rows so far after every row.

  Returns:
    One row per (variant, batch): ``time_ms`` (median per step), ``tokens_per_s``,
    ``speedup_vs_bf16``, ``bytes`` (params + KV cache read per step), ``hbm_frac``
    on an accelerator with a known peak, and for kernel variants ``max_rel_err`` of
    the logits against the XLA dequant path on the same weights.
  """
  from cafeq_jax.models import config as config_lib  # pylint: disable=g-import-not-at-top
  from cafeq_jax.models import decoder  # pylint: disable=g-import-not-at-top

  backend = jax.default_backend()
  kind = getattr(jax.devices()[0], 'device_kind', str(jax.devices()[0]))
  peak = None if backend == 'cpu' else peak_for(kind)
  cfg = config_lib.get_config(model)
  key = jax.random.PRNGKey(1)
  fp = decoder.init_params(cfg, key)
  bf16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), fp)
  del fp
  variants = [('bf16', 'xla', bf16, None)]
  for b in bits_list:
    q = random_quantized_params(
      bf16, cfg, jax.random.fold_in(key, b), bits=b, group_size=group_size
    )
    variants += [
      (f'xla_dequant_w{b}', 'xla', q, None),
      (f'pallas_w{b}', 'pallas', q, f'xla_dequant_w{b}'),
    ]
  b0 = bits_list[0]
  qt = random_quantized_params(
    bf16,
    cfg,
    jax.random.fold_in(key, 100 + b0),
    bits=b0,
    group_size=group_size,
    transform_k=transform_k,
  )
  variants += [
    (f'xla_dequant_w{b0}_t{transform_k}', 'xla', qt, None),
    (f'pallas_w{b0}_t{transform_k}', 'pallas', qt, f'xla_dequant_w{b0}_t{transform_k}'),
  ]
  start = max(0, min(cache_len // 2, cache_len - iters - 3))
  # Group sizes used (SmolLM2: 64 where d_in = 576, 128 elsewhere), e.g. '64/128'.
  groups = '/'.join(
    str(g) for g in sorted({group_for(fn(cfg)[1], group_size) for fn in _DECODE_LEAVES.values()})
  )
  rows = []
  print(f'decode step: {model}, cache {cache_len} slots from slot {start}, {cfg.num_layers} layers')
  print(f'{"variant":20s} {"batch":>5s} {"ms/step":>9s} {"tok/s":>9s} {"vs_bf16":>7s} {"err":>8s}')
  for batch in batches:
    tokens = jax.random.randint(jax.random.fold_in(key, batch), (batch, 1), 0, cfg.vocab_size)
    times, first_logits = {}, {}
    for name, mode, params, check in variants:
      row = dict(
        model=model,
        variant=name,
        backend=mode,
        batch=batch,
        cache_len=cache_len,
        group_size=groups,
        device=kind,
      )
      try:
        model_fn = decoder.Transformer(cfg, jnp.bfloat16, mode)
        step = jax.jit(
          lambda p, t, c, model_fn=model_fn: model_fn.apply({'params': p}, t, cache=c),
          donate_argnums=(2,),
        )
        cache = decoder.init_cache(cfg, batch, cache_len, jnp.bfloat16)
        cache['end_index'] = jnp.asarray(start, jnp.int32)
        cache_bytes = _tree_bytes(cache)
        logits, cache = step(params, tokens, cache)
        first_logits[name] = np.asarray(logits.astype(jnp.float32))
        logits, cache = step(params, tokens, cache)
        jax.block_until_ready(logits)
        samples = []
        for _ in range(iters):
          t0 = time.perf_counter()
          logits, cache = step(params, tokens, cache)
          jax.block_until_ready(logits)
          samples.append(time.perf_counter() - t0)
        del cache
      except Exception as e:  # pylint: disable=broad-except
        row['error'] = f'{type(e).__name__}: {e}'[:2000]
        logging.error('decode %s failed:\n%s', name, traceback.format_exc())
        print(f'{name:20s} {batch:5d} FAILED ({type(e).__name__})', flush=True)
        rows.append(row)
        if on_progress is not None:
          on_progress(rows)
        continue
      t = statistics.median(samples)
      times[name] = t
      row.update(time_ms=t * 1e3, tokens_per_s=batch / t, bytes=_tree_bytes(params) + cache_bytes)
      if peak is not None:
        row['hbm_frac'] = row['bytes'] / t / peak[0]
      if 'bf16' in times:
        row['speedup_vs_bf16'] = times['bf16'] / t
      err = ''
      if check in first_logits:
        y, r = first_logits[name], first_logits[check]
        row['max_rel_err'] = float(np.abs(y - r).max() / (np.abs(r).max() + 1e-30))
        row['speedup_vs_xla_dequant'] = times[check] / t
        err = f'{row["max_rel_err"]:.1e}'
      speedup = _fmt(row.get('speedup_vs_bf16'), '.2f')
      print(
        f'{name:20s} {batch:5d} {row["time_ms"]:9.3f} {row["tokens_per_s"]:9.0f} '
        f'{speedup:>7s} {err:>8s}',
        flush=True,
      )
      rows.append(row)
      if on_progress is not None:
        on_progress(rows)
  return rows


def _write(result: dict[str, Any], output_dir: str) -> str:
  os.makedirs(output_dir, exist_ok=True)
  path = os.path.join(output_dir, 'bench_kernels.json')
  atomic.write_text(path, json.dumps(result, indent=1))
  return path


def run(config: ml_collections.ConfigDict) -> dict[str, Any] | None:
  """The job of ``config`` (experiments/configs/bench_kernels.py).

  Prints the rows as they are measured, writes ``bench_kernels.json`` (rewritten
  after every shape) and ``bench_kernels.md`` to ``config.output_dir`` and returns
  the result; with ``config.markdown_from`` only prints the table of that JSON
  and returns None.
  """
  if config.markdown_from:
    with open(config.markdown_from) as f:
      print(markdown_table(json.load(f)), end='')
    return None
  backend = jax.default_backend()
  decode_model = config.decode_model
  if backend == 'cpu' and not config.interpret:
    print(
      'No accelerator found (backend=cpu): running a tiny shape with the '
      'kernels in Pallas interpret mode; timings are NOT meaningful and '
      'roofline is unknown.'
    )
    models, batches, iters, decode_model = ['tiny'], [1, 8], 2, 'tiny_llama'
  else:
    models = cli.split_names(config.models)
    batches = cli.split_ints(config.batches, 'batches')
    iters = config.iters
  unknown = [m for m in models if m not in SHAPES]
  if unknown:
    raise app.UsageError(f'--config.models={unknown} unknown; expected some of {sorted(SHAPES)}.')
  schemes = cli.split_names(config.schemes)
  if not schemes or any(s not in SCHEMES for s in schemes):
    raise app.UsageError(
      f'--config.schemes={config.schemes!r}: expected a comma list of {SCHEMES}.'
    )
  bits_list = cli.split_ints(config.bits, 'bits')
  decode_batches = cli.split_ints(config.decode_batches, 'decode_batches')
  from cafeq_jax.models import config as model_configs  # pylint: disable=g-import-not-at-top

  if decode_batches and decode_model not in model_configs.PRESETS:
    raise app.UsageError(
      f'--config.decode_model={decode_model!r} unknown; expected one '
      f'of {sorted(model_configs.PRESETS)}.'
    )
  overrides = {
    k: v
    for k, v in (
      ('block_m', config.block_m),
      ('block_n', config.block_n),
      ('split_k', config.split_k),
    )
    if v is not None
  }
  variant_default = (
    matmul_lib.DEFAULT_TPU_CONFIG if backend == 'tpu' else matmul_lib.DEFAULT_GPU_CONFIG
  )
  tiles = dataclasses.replace(variant_default, **overrides) if overrides else None
  result = run_benchmark(
    models=models,
    batches=batches,
    bits_list=bits_list,
    group_size=config.group_size,
    iters=iters,
    rotate_bytes=config.rotate_mb << 20,
    max_copies=config.max_copies,
    transform_k=config.transform_k,
    config=tiles,
    schemes=schemes,
    interpret=True if config.interpret else None,
    time_budget_s=config.time_budget_s,
    on_progress=lambda r: _write(dict(r, partial=True), config.output_dir),
  )
  if decode_batches:
    result['decode_rows'] = decode_benchmark(
      model=decode_model,
      batches=decode_batches,
      bits_list=bits_list,
      group_size=config.group_size,
      cache_len=config.decode_cache_len,
      iters=iters,
      transform_k=config.transform_k,
      on_progress=lambda rows: _write(
        dict(result, decode_rows=rows, partial=True), config.output_dir
      ),
    )
  result['partial'] = False
  path = _write(result, config.output_dir)
  table = markdown_table(result)
  atomic.write_text(os.path.join(config.output_dir, 'bench_kernels.md'), table)
  print(f'wrote {path} and bench_kernels.md')
  if config.markdown:
    print()
    print(table, end='')
  return result


if __name__ == '__main__':
  cli.launch(run, _DEFAULT_CONFIG)
