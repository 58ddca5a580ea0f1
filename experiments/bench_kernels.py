r"""Benchmark: packed int4/int3 Pallas matmul vs bf16 ``jnp.dot`` (SPEC §9, issue #5).

Times, for each Gemma 2 projection shape and batch size, the bf16 ``jnp.dot``
baseline, the XLA dequantize-then-dot path, the fused Pallas kernels (int4 and
int3, group 128, asymmetric) and the block-diagonal transform kernel; prints
time, achieved memory bandwidth (bytes that must move: packed weight + scales +
zeros + activations + output) and the fraction of the roofline
``max(bytes / peak_bw, flops / peak_flops)``, and writes JSON (and the README
table as Markdown). Column ``err|ovh``: the kernel's max error relative to the
XLA path (max|y - ref| / max|ref|; checks the compiled kernel on the device),
or for the transform the time of ``x @ blockdiag(Minv)`` as a fraction of the
bf16 matmul.

Timing. One jitted program applies the op to ``copies`` distinct copies of the
weight one after the other; the reported time is the median program time over
``--iters`` runs divided by ``copies``. Distinct copies (at least
``--rotate_mb`` MB of weights in all, at most ``--max_copies`` of them) keep a
weight from being served by the 50 MB L2 of an H100 from one call to the next,
and one program per measurement amortises the host dispatch, which would
otherwise dominate the microsecond-scale batch-1 kernels. Each copy is one more
kernel call in the program: if compilation is slow, lower ``--max_copies``.

GPU run (one H100; not yet run on a GPU: the defaults compile about 80 Triton
kernels, so allow several minutes; ``--models=gemma2_2b --batches=1,64`` is a
quicker first look). From the repository root, with a CUDA ``jax`` installed::

  bash experiments/bench_kernels_gpu.sh /tmp/bench_kernels_gpu

which checks the compiled kernels against the reference on the device
(``pytest -k compiled``) and then runs::

  python -m experiments.bench_kernels --output_dir=/tmp/bench_kernels_gpu --markdown

It writes ``bench_kernels.json`` (every row) and ``bench_kernels.md`` (the README
table: device, per-shape times and speedups, and the issue-#5 targets, met or
missed) and prints the table last. To (re)make the table from a saved JSON::

  python -m experiments.bench_kernels --markdown_from=/tmp/bench_kernels_gpu/bench_kernels.json

and paste it into the README's kernel section.

CPU smoke run (no accelerator: prints so, runs one tiny shape in Pallas
interpret mode, 2 weight copies, < 1 min; timings are not meaningful)::

  python -m experiments.bench_kernels --output_dir=/tmp/bench_kernels_cpu

Tile sweep example (GPU)::

  python -m experiments.bench_kernels --block_n=64 --block_m=16 --models=gemma2_2b
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

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from cafeq_jax import packing
import kernels_pallas
from kernels_pallas import matmul as matmul_lib

_OUTPUT_DIR = flags.DEFINE_string('output_dir', '/tmp/bench_kernels',
                                  'Where bench_kernels.json and .md are written.')
_MODELS = flags.DEFINE_list('models', ['gemma2_2b', 'gemma2_9b'],
                            'Model shape sets to benchmark (keys of SHAPES).')
_BATCHES = flags.DEFINE_list('batches', ['1', '8', '64', '512'],
                             'Token batch sizes (rows of x).')
_BITS = flags.DEFINE_list('bits', ['4', '3'], 'Code widths of the packed kernels.')
_GROUP_SIZE = flags.DEFINE_integer('group_size', 128, 'Quantization group size.')
_ITERS = flags.DEFINE_integer('iters', 50, 'Timed iterations (median reported).')
_ROTATE_MB = flags.DEFINE_integer(
    'rotate_mb', 256, 'Accelerator: use enough distinct weight copies to move at '
    'least this many MB per timed program (defeats the L2 cache).')
_MAX_COPIES = flags.DEFINE_integer('max_copies', 32,
                                   'Upper bound on the weight copies per program.')
_BLOCK_M = flags.DEFINE_integer('block_m', None, 'Override config.block_m.')
_BLOCK_N = flags.DEFINE_integer('block_n', None, 'Override config.block_n.')
_SPLIT_K = flags.DEFINE_integer('split_k', None, 'Override config.split_k (GPU).')
_TRANSFORM_K = flags.DEFINE_integer('transform_k', 64,
                                    'Block size of the online transform kernel.')
_MARKDOWN = flags.DEFINE_bool('markdown', False,
                              'Print the Markdown (README) table at the end.')
_MARKDOWN_FROM = flags.DEFINE_string(
    'markdown_from', None, 'Only print the Markdown table of this bench_kernels.json '
    '(no benchmark is run).')

# (d_in, d_out) of each projection (Flax layout), per layer.
SHAPES = {
    'gemma2_2b': {'q': (2304, 2048), 'kv': (2304, 1024), 'o': (2048, 2304),
                  'gate_up': (2304, 9216), 'down': (9216, 2304)},
    'gemma2_9b': {'q': (3584, 4096), 'kv': (3584, 2048), 'o': (4096, 3584),
                  'gate_up': (3584, 14336), 'down': (14336, 3584)},
    # CPU smoke run only.
    'tiny': {'proj': (256, 512)},
}

# Peak HBM bandwidth (bytes/s) and dense bf16 FLOP/s by device-kind substring
# (vendor datasheets); first match wins, so more specific names come first.
PEAKS = (
    ('H100 PCIe', 2.0e12, 756e12),
    ('H100', 3.35e12, 989e12),       # SXM (device_kind 'NVIDIA H100 80GB HBM3')
    ('H200', 4.8e12, 989e12),
    ('A100-SXM4-80GB', 2.039e12, 312e12),
    ('A100', 1.555e12, 312e12),
    ('L4', 0.3e12, 121e12),
    ('TPU v4', 1.2e12, 275e12),
    ('TPU v5 lite', 0.819e12, 197e12),
    ('TPU v5e', 0.819e12, 197e12),
    ('TPU v5', 2.765e12, 459e12),    # v5p
    ('TPU v6', 1.64e12, 918e12),
)

# Issue #5 targets: (bits, batch) -> minimum speedup over bf16 on every shape.
TARGETS = {(4, 1): 3.0, (3, 1): 3.5, (4, 64): 1.0, (3, 64): 1.0}


def peak_for(device_kind: str) -> tuple[float, float] | None:
  for name, bw, flops in PEAKS:
    if name.lower() in device_kind.lower():
      return bw, flops
  return None


def random_packed(key, k: int, n: int, bits: int, group_size: int) -> packing.PackedArray:
  """Random codes with the real packed shapes and bf16 scales/zeros (the saved-model
  format, ``pack_params(scale_dtype=jnp.bfloat16)``); no quantization."""
  k1, k2, k3 = jax.random.split(key, 3)
  npk = packing.packed_columns(n, bits)
  dshape = (3, k, npk) if bits == 3 else (k, npk)
  data = jax.random.bits(k1, dshape, jnp.uint8)
  g = k // group_size
  scale = jax.random.uniform(k2, (g, n), jnp.float32, 1e-3, 2e-2).astype(jnp.bfloat16)
  zero = jax.random.randint(k3, (g, n), 0, 2**bits).astype(jnp.bfloat16)
  return packing.PackedArray(data=data, scale=scale, zero=zero, bits=bits,
                             group_size=group_size, symmetric=False, shape=(k, n))


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


def markdown_table(result: dict[str, Any]) -> str:
  """The README table of a ``bench_kernels.json`` result (see module docstring).

  Args:
    result: the JSON dict written by this script.

  Returns:
    Markdown: a header naming the device, one row per (model, projection,
    batch) with the bf16 time and, per bit width, the kernel time, speedup over
    bf16 and roofline fraction, the transform overhead, and the target summary.
  """
  rows = result['rows']
  bits = sorted({int(r['kernel'][len('pallas_w'):]) for r in rows
                 if r['kernel'].startswith('pallas_w')}, reverse=True)
  by_key: dict[tuple, dict[str, dict]] = {}
  for r in rows:
    by_key.setdefault((r['model'], r['proj'], r['K'], r['N'], r['M']), {})[r['kernel']] = r
  peak = ('unknown' if result.get('peak_bw') is None else
          f'{result["peak_bw"] / 1e12:.2f} TB/s, {result["peak_flops"] / 1e12:.0f} TFLOP/s')
  lines = [
      f'Kernel benchmark on **{result["device"]}** (backend {result["backend"]}, '
      f'jax {result.get("jax_version", "?")}, datasheet peak {peak}).',
      '',
  ]
  if not result.get('accelerator', result['backend'] != 'cpu'):
    lines += ['No accelerator was found: Pallas interpret mode on CPU, timings are '
              'NOT meaningful.', '']
  lines += [
      'Median time per matmul in µs; `×`: speedup over bf16 `jnp.dot`; `roof`: '
      'fraction of the roofline; `x M⁻¹`: block-diagonal transform time / bf16 '
      'matmul time.', '']
  head = ['model', 'proj', 'K × N', 'M', 'bf16 µs']
  for b in bits:
    head += [f'int{b} µs', f'int{b} ×', f'int{b} roof']
  head += ['x M⁻¹']
  lines += ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for (model, proj, k, n, m), ks in by_key.items():
    def cell(name, field, spec):
      r = ks.get(name)
      if r is None:
        return ''
      if 'error' in r:
        return 'FAILED'
      return _fmt(r.get(field), spec)
    cells = [model, proj, f'{k} × {n}', str(m), cell('bf16_dot', 'time_us', '.1f')]
    for b in bits:
      cells += [cell(f'pallas_w{b}', 'time_us', '.1f'),
                cell(f'pallas_w{b}', 'speedup_vs_bf16', '.2f'),
                cell(f'pallas_w{b}', 'roofline_frac', '.2f')]
    bd = [r for name, r in ks.items() if name.startswith('blockdiag')]
    cells.append(cell(bd[0]['kernel'], 'time_frac_of_bf16_dot', '.2f') if bd else '')
    lines.append('| ' + ' | '.join(cells) + ' |')
  lines += [''] + target_summary(result)
  return '\n'.join(lines) + '\n'


def target_summary(result: dict[str, Any]) -> list[str]:
  """Issue #5 targets (``TARGETS``): worst speedup over the shapes, met or missed."""
  out = ['Targets (issue #5), worst case over the shapes:', '']
  if not result.get('accelerator', result['backend'] != 'cpu'):
    return out + ['- not evaluated: no accelerator.']
  for (b, m), target in TARGETS.items():
    speedups = [r['speedup_vs_bf16'] for r in result['rows']
                if r['kernel'] == f'pallas_w{b}' and r['M'] == m and 'speedup_vs_bf16' in r]
    if not speedups:
      continue
    worst = min(speedups)
    verdict = 'met' if worst >= target else 'MISSED'
    out.append(f'- int{b}, batch {m}: {worst:.2f}× (target ≥ {target:.1f}×): {verdict}')
  if len(out) == 2:
    out.append('- no row at the target batch sizes (1, 64).')
  return out


def run_benchmark(*, models, batches, bits_list, group_size, iters, rotate_bytes,
                  max_copies, transform_k, config) -> dict[str, Any]:
  """Runs every case and returns the JSON-able result (see module docstring)."""
  backend = jax.default_backend()
  kind = getattr(jax.devices()[0], 'device_kind', str(jax.devices()[0]))
  on_cpu = backend == 'cpu'
  peak = None if on_cpu else peak_for(kind)
  print(f'backend={backend} device={kind} peak='
        f'{"unknown" if peak is None else f"{peak[0]/1e12:.2f} TB/s, {peak[1]/1e12:.0f} TFLOP/s"}')
  key = jax.random.PRNGKey(0)
  rows = []
  print(f'{"model":10s} {"proj":8s} {"K":>6s} {"N":>6s} {"M":>4s} {"kernel":14s} '
        f'{"time_us":>9s} {"GB/s":>8s} {"roofline":>8s} {"vs_bf16":>7s} {"err|ovh":>8s}')
  for model in models:
    for proj, (k, n) in SHAPES[model].items():
      key, kw, kx, km = jax.random.split(key, 4)
      w_bf16 = (jax.random.normal(kw, (k, n), jnp.float32) * 0.02).astype(jnp.bfloat16)
      packs = {b: random_packed(jax.random.fold_in(kw, b), k, n, b, group_size)
               for b in bits_list}
      minv = jax.random.normal(km, (k // transform_k, transform_k, transform_k),
                               jnp.float32)

      def ncopies(weight_bytes):
        return 2 if on_cpu else num_copies(weight_bytes, rotate_bytes, max_copies)

      weights = {'bf16': copies_of(w_bf16, ncopies(2 * k * n)),
                 'minv': copies_of(minv, ncopies(4 * minv.size))}
      for b in bits_list:
        weights[b] = copies_of(packs[b], ncopies(packing.nbytes(packs[b])))
      for m in batches:
        x = jax.random.normal(jax.random.fold_in(kx, m), (m, k), jnp.bfloat16)
        io_bytes = 2 * m * k + 2 * m * n
        flops = 2 * m * k * n
        bf16_dot = lambda x, w: jnp.dot(
            x, w, preferred_element_type=jnp.float32).astype(x.dtype)
        cases = [('bf16_dot', bf16_dot, weights['bf16'], 2 * k * n + io_bytes, flops,
                  None)]
        for b in bits_list:
          wbytes = packing.nbytes(packs[b]) + io_bytes
          ref = kernels_pallas.quantized_matmul_reference
          cases.append((f'xla_dequant_w{b}', ref, weights[b], wbytes, flops, None))
          kern = lambda x, p: kernels_pallas.quantized_matmul(
              x, p, interpret=on_cpu, config=config)
          cases.append((f'pallas_w{b}', kern, weights[b], wbytes, flops,
                        f'xla_dequant_w{b}'))
        bd = lambda x, mi: kernels_pallas.blockdiag_matmul(x, mi, interpret=on_cpu)
        cases.append((f'blockdiag_k{transform_k}', bd, weights['minv'],
                      2 * m * k * 2 + minv.size * 2, 2 * m * k * transform_k, None))
        bf16_time = None
        programs = {}  # case name -> its jitted rotating program (compiled once)
        for name, fn, ws, nbytes, nflops, check in cases:
          row = dict(model=model, proj=proj, K=k, N=n, M=m, kernel=name,
                     bytes=int(nbytes), flops=int(nflops), copies=len(ws), device=kind,
                     backend=backend)
          try:
            programs[name] = rotating(fn)
            t = time_fn(programs[name], x, ws, iters=iters) / len(ws)
          except Exception as e:  # pylint: disable=broad-except
            row['error'] = f'{type(e).__name__}: {e}'[:2000]
            logging.error('%s failed:\n%s', name, traceback.format_exc())
            print(f'{model:10s} {proj:8s} {k:6d} {n:6d} {m:4d} {name:14s} FAILED '
                  f'({type(e).__name__})')
            rows.append(row)
            continue
          if name == 'bf16_dot':
            bf16_time = t
          row['time_us'] = t * 1e6
          row['gbps'] = nbytes / t / 1e9
          if peak is not None:
            row['roofline_frac'] = max(nbytes / peak[0], nflops / peak[1]) / t
          err = ''
          if name.startswith('blockdiag'):
            # Online-transform cost relative to the bf16 matmul it precedes.
            row['flop_overhead_ratio'] = kernels_pallas.blockdiag_overhead_ratio(
                k, n, transform_k)
            if bf16_time is not None:
              row['time_frac_of_bf16_dot'] = t / bf16_time
              err = f'ovh {row["time_frac_of_bf16_dot"]:.2f}'
          elif bf16_time is not None:
            row['speedup_vs_bf16'] = bf16_time / t
          if check in programs:  # the kernel against the XLA path, same weights
            y = np.asarray(programs[name](x, ws)[0].astype(jnp.float32))
            r = np.asarray(programs[check](x, ws)[0].astype(jnp.float32))
            row['max_rel_err'] = float(np.abs(y - r).max() / (np.abs(r).max() + 1e-30))
            err = f'{row["max_rel_err"]:.1e}'
          speedup = (f'{row["speedup_vs_bf16"]:.2f}' if 'speedup_vs_bf16' in row
                     else '')
          roof = ('unknown' if 'roofline_frac' not in row
                  else f'{row["roofline_frac"]:.2f}')
          print(f'{model:10s} {proj:8s} {k:6d} {n:6d} {m:4d} {name:14s} '
                f'{row["time_us"]:9.1f} {row["gbps"]:8.1f} {roof:>8s} '
                f'{speedup:>7s} {err:>8s}')
          rows.append(row)
      del weights
  return dict(backend=backend, device=kind, accelerator=not on_cpu,
              jax_version=jax.__version__,
              peak_bw=None if peak is None else peak[0],
              peak_flops=None if peak is None else peak[1],
              config=None if config is None else dataclasses.asdict(config),
              iters=iters, rows=rows)


def main(argv):
  del argv
  if _MARKDOWN_FROM.value:
    with open(_MARKDOWN_FROM.value) as f:
      print(markdown_table(json.load(f)), end='')
    return
  backend = jax.default_backend()
  kind = getattr(jax.devices()[0], 'device_kind', str(jax.devices()[0]))
  logging.info('process %d/%d, %d devices: %s', jax.process_index(),
               jax.process_count(), jax.device_count(), kind)
  if backend == 'cpu':
    print('No accelerator found (backend=cpu): running a tiny shape with the '
          'kernels in Pallas interpret mode; timings are NOT meaningful and '
          'roofline is unknown.')
    models, batches, iters = ['tiny'], [1, 8], 2
  else:
    models = _MODELS.value
    batches = [int(b) for b in _BATCHES.value]
    iters = _ITERS.value
  unknown = [m for m in models if m not in SHAPES]
  if unknown:
    raise app.UsageError(f'--models={unknown} unknown; expected some of {sorted(SHAPES)}.')
  overrides = {k: v for k, v in (('block_m', _BLOCK_M.value), ('block_n', _BLOCK_N.value),
                                 ('split_k', _SPLIT_K.value)) if v is not None}
  variant_default = (matmul_lib.DEFAULT_TPU_CONFIG if backend == 'tpu'
                     else matmul_lib.DEFAULT_GPU_CONFIG)
  config = dataclasses.replace(variant_default, **overrides) if overrides else None
  result = run_benchmark(
      models=models, batches=batches, bits_list=[int(b) for b in _BITS.value],
      group_size=_GROUP_SIZE.value, iters=iters, rotate_bytes=_ROTATE_MB.value << 20,
      max_copies=_MAX_COPIES.value, transform_k=_TRANSFORM_K.value, config=config)
  os.makedirs(_OUTPUT_DIR.value, exist_ok=True)
  path = os.path.join(_OUTPUT_DIR.value, 'bench_kernels.json')
  with open(path, 'w') as f:
    json.dump(result, f, indent=1)
  table = markdown_table(result)
  with open(os.path.join(_OUTPUT_DIR.value, 'bench_kernels.md'), 'w') as f:
    f.write(table)
  print(f'wrote {path} and bench_kernels.md')
  if _MARKDOWN.value:
    print()
    print(table, end='')


if __name__ == '__main__':
  app.run(main)
