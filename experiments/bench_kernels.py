r"""Benchmark: packed int4/int3 Pallas matmul vs bf16 ``jnp.dot`` (SPEC §9).

Times, for each Gemma 2 projection shape and batch size, the bf16 ``jnp.dot``
baseline, the XLA dequantize-then-dot path, the fused Pallas kernels (int4 and
int3, group 128, asymmetric) and the block-diagonal transform kernel; prints
time, achieved memory bandwidth (bytes that must move: packed weight + scales +
zeros + activations + output) and the fraction of the roofline
``max(bytes / peak_bw, flops / peak_flops)``, and writes JSON. Column
``err|ovh``: the kernel's max error relative to the XLA path (max|y - ref| /
max|ref|; checks the compiled kernel on the device), or for the transform the
time of ``x @ blockdiag(Minv)`` as a fraction of the bf16 matmul.

Launch (GPU/TPU host):
  python -m experiments.bench_kernels --output_dir=/tmp/bench_kernels
Quick CPU smoke run (no accelerator: small shapes, interpret mode, < 1 min):
  python -m experiments.bench_kernels --output_dir=/tmp/bench_kernels_cpu
Tile sweep example:
  python -m experiments.bench_kernels --block_n=64 --block_m=16 --models=gemma2_2b
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
import traceback

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
                                  'Where bench_kernels.json is written.')
_MODELS = flags.DEFINE_list('models', ['gemma2_2b', 'gemma2_9b'],
                            'Model shape sets to benchmark.')
_BATCHES = flags.DEFINE_list('batches', ['1', '8', '64', '512'],
                             'Token batch sizes (rows of x).')
_BITS = flags.DEFINE_list('bits', ['4', '3'], 'Code widths of the packed kernels.')
_GROUP_SIZE = flags.DEFINE_integer('group_size', 128, 'Quantization group size.')
_ITERS = flags.DEFINE_integer('iters', 50, 'Timed iterations (median reported).')
_BLOCK_M = flags.DEFINE_integer('block_m', None, 'Override config.block_m.')
_BLOCK_N = flags.DEFINE_integer('block_n', None, 'Override config.block_n.')
_SPLIT_K = flags.DEFINE_integer('split_k', None, 'Override config.split_k (GPU).')
_TRANSFORM_K = flags.DEFINE_integer('transform_k', 64,
                                    'Block size of the online transform kernel.')

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


def peak_for(device_kind: str) -> tuple[float, float] | None:
  for name, bw, flops in PEAKS:
    if name.lower() in device_kind.lower():
      return bw, flops
  return None


def random_packed(key, k: int, n: int, bits: int, group_size: int) -> packing.PackedArray:
  """Random codes/scales/zeros with the real packed shapes (no quantization)."""
  k1, k2, k3 = jax.random.split(key, 3)
  npk = packing.packed_columns(n, bits)
  dshape = (3, k, npk) if bits == 3 else (k, npk)
  data = jax.random.bits(k1, dshape, jnp.uint8)
  g = k // group_size
  scale = jax.random.uniform(k2, (g, n), jnp.float32, 1e-3, 2e-2)
  zero = jax.random.randint(k3, (g, n), 0, 2**bits).astype(jnp.float32)
  return packing.PackedArray(data=data, scale=scale, zero=zero, bits=bits,
                             group_size=group_size, symmetric=False, shape=(k, n))


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


def main(argv):
  del argv
  backend = jax.default_backend()
  device = jax.devices()[0]
  kind = getattr(device, 'device_kind', str(device))
  logging.info('process %d/%d, %d devices: %s', jax.process_index(),
               jax.process_count(), jax.device_count(), kind)
  on_cpu = backend == 'cpu'
  peak = None if on_cpu else peak_for(kind)
  if on_cpu:
    print('No accelerator found (backend=cpu): running a tiny shape with the '
          'kernels in Pallas interpret mode; timings are NOT meaningful and '
          'roofline is unknown.')
    models, batches, iters = ['tiny'], [1, 8], 2
  else:
    models = _MODELS.value
    batches = [int(b) for b in _BATCHES.value]
    iters = _ITERS.value
  print(f'backend={backend} device={kind} peak='
        f'{"unknown" if peak is None else f"{peak[0]/1e12:.2f} TB/s, {peak[1]/1e12:.0f} TFLOP/s"}')

  overrides = {k: v for k, v in (('block_m', _BLOCK_M.value), ('block_n', _BLOCK_N.value),
                                 ('split_k', _SPLIT_K.value)) if v is not None}
  variant_default = (matmul_lib.DEFAULT_TPU_CONFIG if backend == 'tpu'
                     else matmul_lib.DEFAULT_GPU_CONFIG)
  config = (dataclasses.replace(variant_default, **overrides)
            if overrides else None)
  bits_list = [int(b) for b in _BITS.value]
  key = jax.random.PRNGKey(0)
  rows = []
  header = (f'{"model":10s} {"proj":8s} {"K":>6s} {"N":>6s} {"M":>4s} {"kernel":14s} '
            f'{"time_us":>9s} {"GB/s":>8s} {"roofline":>8s} {"vs_bf16":>7s} {"err|ovh":>8s}')
  print(header)
  for model in models:
    for proj, (k, n) in SHAPES[model].items():
      key, kw, kx, km = jax.random.split(key, 4)
      w_bf16 = (jax.random.normal(kw, (k, n), jnp.float32) * 0.02).astype(jnp.bfloat16)
      packs = {b: random_packed(jax.random.fold_in(kw, b), k, n, b, _GROUP_SIZE.value)
               for b in bits_list}
      minv = jax.random.normal(km, (k // _TRANSFORM_K.value, _TRANSFORM_K.value,
                                    _TRANSFORM_K.value), jnp.float32)
      for m in batches:
        x = jax.random.normal(jax.random.fold_in(kx, m), (m, k), jnp.bfloat16)
        io_bytes = 2 * m * k + 2 * m * n
        flops = 2 * m * k * n
        cases = [('bf16_dot', jax.jit(lambda x, w: jnp.dot(
            x, w, preferred_element_type=jnp.float32).astype(x.dtype)), (x, w_bf16),
                  2 * k * n + io_bytes, flops, None)]
        for b in bits_list:
          p = packs[b]
          wbytes = packing.nbytes(p) + io_bytes
          ref = jax.jit(kernels_pallas.quantized_matmul_reference)
          cases.append((f'xla_dequant_w{b}', ref, (x, p), wbytes, flops, None))
          kern = jax.jit(lambda x, p: kernels_pallas.quantized_matmul(
              x, p, interpret=on_cpu, config=config))
          cases.append((f'pallas_w{b}', kern, (x, p), wbytes, flops, ref))
        bd = jax.jit(lambda x, mi: kernels_pallas.blockdiag_matmul(x, mi, interpret=on_cpu))
        cases.append((f'blockdiag_k{_TRANSFORM_K.value}', bd, (x, minv),
                      2 * m * k * 2 + minv.size * 2, 2 * m * k * _TRANSFORM_K.value,
                      None))
        bf16_time = None
        for name, fn, args, nbytes, nflops, check in cases:
          row = dict(model=model, proj=proj, K=k, N=n, M=m, kernel=name,
                     bytes=int(nbytes), flops=int(nflops), device=kind, backend=backend)
          try:
            t = time_fn(fn, *args, iters=iters)
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
          if name.startswith('blockdiag'):
            # Online-transform cost relative to the bf16 matmul it precedes.
            row['time_frac_of_bf16_dot'] = t / bf16_time
            row['flop_overhead_ratio'] = kernels_pallas.blockdiag_overhead_ratio(
                k, n, _TRANSFORM_K.value)
          elif bf16_time is not None:
            row['speedup_vs_bf16'] = bf16_time / t
          err = ''
          if 'time_frac_of_bf16_dot' in row:
            err = f'ovh {row["time_frac_of_bf16_dot"]:.2f}'
          if check is not None:
            y = np.asarray(fn(*args).astype(jnp.float32))
            r = np.asarray(check(*args).astype(jnp.float32))
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
  os.makedirs(_OUTPUT_DIR.value, exist_ok=True)
  path = os.path.join(_OUTPUT_DIR.value, 'bench_kernels.json')
  with open(path, 'w') as f:
    json.dump(dict(backend=backend, device=kind,
                   peak_bw=None if peak is None else peak[0],
                   peak_flops=None if peak is None else peak[1],
                   config=None if config is None else vars(config),
                   rows=rows), f, indent=1)
  print(f'wrote {path}')


if __name__ == '__main__':
  app.run(main)
