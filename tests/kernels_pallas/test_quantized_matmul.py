"""Pallas quantized matmul (interpret mode on CPU) vs an independent numpy reference.

Both kernel variants ('gpu': Triton-structured, 'tpu': Mosaic-structured) run
with ``interpret=True``, so their bodies, block specs, padding and plane layout
are checked here; compiled lowering needs the accelerator.

Tolerances: f32 activations: |err| <= 1e-5 * max|ref| + 1e-5 |ref| (f32
accumulation order only). bf16 activations: the reference uses the same
bf16-rounded x in float64, so the error is the bf16 rounding of the output (and,
on the TPU path with g < 128, of the dequantised weight): 1e-2 relative to
max|ref|.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cafeq_jax import packing
from cafeq_jax import quantizer
import kernels_pallas
from kernels_pallas import matmul as matmul_lib


def _case(k, n, bits, group_size, symmetric, seed=0):
  kw, kx = jax.random.split(jax.random.PRNGKey(seed))
  w = jax.random.normal(kw, (k, n), jnp.float32)
  q = quantizer.quantize(
    w, quantizer.QuantSpec(bits=bits, group_size=group_size, symmetric=symmetric)
  )
  return q, packing.pack(q), kx


def _numpy_reference(x, q):
  """x @ (scale * (codes - zero)) in float64 from the *unpacked* QArray."""
  codes = np.asarray(q.codes, np.float64)
  k, n = codes.shape
  g = q.spec.effective_group_size(k)
  scale = np.repeat(np.asarray(q.scale, np.float64), g, axis=0)
  zero = 0.0 if q.zero is None else np.repeat(np.asarray(q.zero, np.float64), g, axis=0)
  return np.asarray(x, np.float64) @ (scale * (codes - zero))


def _check(y, x, q, dtype):
  ref = _numpy_reference(np.asarray(x.astype(jnp.float32)), q)
  assert y.dtype == dtype
  assert y.shape == ref.shape
  y = np.asarray(y.astype(jnp.float32), np.float64)
  amax = np.abs(ref).max()
  if dtype == jnp.float32:
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * amax)
  else:
    np.testing.assert_allclose(y, ref, rtol=1e-2, atol=1e-2 * amax)


@pytest.mark.parametrize('variant', ['gpu', 'tpu'])
@pytest.mark.parametrize('symmetric', [False, True])
@pytest.mark.parametrize('group_size', [32, 64, 128, None])
@pytest.mark.parametrize('bits', [3, 4])
def test_kernel_matches_reference_across_bits_groups_symmetry(bits, group_size, symmetric, variant):
  # N = 200 is not a multiple of 8 (int3 pads N) nor of the tile (pads Np).
  q, p, kx = _case(256, 200, bits, group_size, symmetric)
  x = jax.random.normal(kx, (3, 256), jnp.float32)
  y = kernels_pallas.quantized_matmul(x, p, backend=variant, interpret=True)
  _check(y, x, q, jnp.float32)


@pytest.mark.parametrize(
  'bits,dtype,batch,variant',
  [
    (3, jnp.float32, 1, 'gpu'),
    (3, jnp.bfloat16, 17, 'gpu'),
    (3, jnp.bfloat16, 1, 'tpu'),
    (4, jnp.bfloat16, 1, 'gpu'),
    (4, jnp.float32, 17, 'tpu'),
    (4, jnp.bfloat16, 17, 'tpu'),
  ],
)
def test_kernel_matches_reference_for_odd_batches_and_bf16(bits, dtype, batch, variant):
  q, p, kx = _case(128, 72, bits, 32, False, seed=batch)
  x = jax.random.normal(kx, (batch, 128), jnp.float32).astype(dtype)
  y = kernels_pallas.quantized_matmul(x, p, backend=variant, interpret=True)
  _check(y, x, q, dtype)


@pytest.mark.parametrize('variant', ['gpu', 'tpu'])
@pytest.mark.parametrize('symmetric', [False, True])
def test_kernel_reads_bf16_scales_and_zeros_of_saved_models(symmetric, variant):
  # Saved models pack with bf16 scales and zero points; the zero points stay
  # exact and the reference uses the same bf16-rounded scales.
  q, _, kx = _case(256, 72, 3, 64, symmetric, seed=3)
  p = packing.pack(q, scale_dtype=jnp.bfloat16)
  assert p.scale.dtype == p.zero.dtype == jnp.bfloat16
  q16 = q.replace(scale=p.scale.astype(jnp.float32))
  x = jax.random.normal(kx, (5, 256), jnp.float32)
  y = kernels_pallas.quantized_matmul(x, p, backend=variant, interpret=True)
  _check(y, x, q16, jnp.float32)


@pytest.mark.parametrize('split_k', [1, 2])
def test_gpu_kernel_split_k_and_multiple_m_tiles(split_k):
  q, p, kx = _case(256, 64, 4, 64, False)
  x = jax.random.normal(kx, (40, 256), jnp.float32)  # 40 rows -> 3 M tiles of 16
  config = kernels_pallas.QuantizedMatmulConfig(block_m=16, block_n=16, split_k=split_k)
  y = kernels_pallas.quantized_matmul(x, p, backend='gpu', interpret=True, config=config)
  _check(y, x, q, jnp.float32)


def test_kernel_handles_leading_activation_dims_and_jit():
  q, p, kx = _case(128, 40, 3, 64, True)
  x = jax.random.normal(kx, (2, 3, 128), jnp.float32)
  f = jax.jit(lambda x, p: kernels_pallas.quantized_matmul(x, p, interpret=True))
  y = f(x, p)
  assert y.shape == (2, 3, 40)
  _check(y.reshape(6, 40), x.reshape(6, 128), q, jnp.float32)


@pytest.mark.parametrize('bits', [2, 8])
def test_kernel_also_supports_int2_and_int8(bits):
  q, p, kx = _case(128, 24, bits, 64, False)
  x = jax.random.normal(kx, (2, 128), jnp.float32)
  y = kernels_pallas.quantized_matmul(x, p, backend='gpu', interpret=True)
  _check(y, x, q, jnp.float32)


def test_reference_matches_numpy():
  q, p, kx = _case(64, 30, 3, 32, False)
  x = jax.random.normal(kx, (5, 64), jnp.float32)
  _check(kernels_pallas.quantized_matmul_reference(x, p), x, q, jnp.float32)


@pytest.mark.parametrize(
  'shape,bits,group_size,backend,ok',
  [
    ((2304, 2048), 4, 128, 'gpu', True),
    ((2304, 2048), 3, None, 'tpu', True),
    ((2304, 2048), 3, 32, 'tpu', True),  # 4 groups per 128-wide K tile
    ((96, 64), 4, 32, 'tpu', False),  # K=96 not a multiple of the 128 tile
    ((96, 64), 4, 32, 'gpu', True),
    ((100, 64), 4, None, 'gpu', False),  # no power-of-2 K divisor >= 16
    ((2, 64, 64), 4, 32, 'gpu', False),  # stacked weights
    ((64, 64), 5, 32, 'gpu', False),
    ((64, 64), 4, 32, 'metal', False),
  ],
)
def test_can_use_predicate(shape, bits, group_size, backend, ok):
  got, reason = kernels_pallas.can_use_quantized_matmul(shape, bits, group_size, backend)
  assert got is ok
  assert (reason == '') is ok


def test_unsupported_shape_falls_back_to_reference_with_one_warning(caplog):
  matmul_lib._WARNED.clear()
  q, p, kx = _case(96, 16, 4, 32, False)
  x = jax.random.normal(kx, (2, 96), jnp.float32)
  with caplog.at_level(logging.WARNING):
    y1 = kernels_pallas.quantized_matmul(x, p, backend='tpu', interpret=True)
    y2 = kernels_pallas.quantized_matmul(x, p, backend='tpu', interpret=True)
  warnings = [r for r in caplog.records if 'falling back' in r.getMessage()]
  assert len(warnings) == 1
  message = warnings[0].getMessage()
  # Names the weight, the backend, why, and that the fallback is slower.
  for part in ('(96, 16) int4 group_size=32', 'on tpu', 'K=96', 'XLA reference', 'slower'):
    assert part in message, (part, message)
  _check(y1, x, q, jnp.float32)
  np.testing.assert_array_equal(np.asarray(y1), np.asarray(y2))


@pytest.mark.parametrize('case', ['bad_dtype', 'cpu_compiled', 'no_rows'])
def test_every_fallback_path_warns(caplog, case):
  matmul_lib._WARNED.clear()
  q, p, kx = _case(64, 16, 4, 32, False)
  x = jax.random.normal(kx, (2, 64), jnp.float32)
  kwargs = dict(backend='gpu', interpret=True)
  if case == 'bad_dtype':
    x, reason = x.astype(jnp.int32), 'x dtype int32'
  elif case == 'cpu_compiled':
    kwargs, reason = dict(backend='cpu', interpret=False), 'interpret=True'
  else:
    x, reason = x[:0], 'no rows'
  with caplog.at_level(logging.WARNING):
    y = kernels_pallas.quantized_matmul(x, p, **kwargs)
  messages = [r.getMessage() for r in caplog.records if 'falling back' in r.getMessage()]
  assert len(messages) == 1 and reason in messages[0], messages
  np.testing.assert_array_equal(
    np.asarray(y), np.asarray(kernels_pallas.quantized_matmul_reference(x, p))
  )


def test_supported_case_runs_the_kernel_without_warning(caplog, monkeypatch):
  matmul_lib._WARNED.clear()
  calls = []
  kernel = matmul_lib._quantized_matmul_pallas
  monkeypatch.setattr(
    matmul_lib,
    '_quantized_matmul_pallas',
    lambda *a, **kw: calls.append(kw['variant']) or kernel(*a, **kw),
  )
  q, p, kx = _case(64, 16, 4, 32, False)
  with caplog.at_level(logging.WARNING):
    kernels_pallas.quantized_matmul(
      jax.random.normal(kx, (2, 64)), p, backend='gpu', interpret=True
    )
  assert calls == ['gpu']
  assert not [r for r in caplog.records if 'falling back' in r.getMessage()]


def test_mismatched_k_or_stacked_weight_raises_naming_shapes():
  q, p, _ = _case(64, 16, 4, 32, False)
  with pytest.raises(ValueError, match='K=64'):
    kernels_pallas.quantized_matmul(jnp.ones((2, 32)), p, interpret=True)
  stacked = packing.pack(jax.tree.map(lambda a: jnp.stack([a, a]), q))
  with pytest.raises(ValueError, match=r'packing.index'):
    kernels_pallas.quantized_matmul(jnp.ones((2, 64)), stacked, interpret=True)


def test_gpu_plan_caps_accumulators_splits_k_for_decode_and_pads_n():
  cfg = matmul_lib.DEFAULT_GPU_CONFIG
  plan = matmul_lib._plan(1, 2304, 2304, 3, 128, 'gpu', cfg)
  assert plan.bm == 1 and plan.bk == 128 and plan.bn == 32  # Np = 288 = 9 * 32
  assert plan.np_pad == 288 and 8 * plan.bn <= 512
  assert 18 % plan.split_k == 0 and 9 * plan.split_k >= cfg.min_programs // 2
  big = matmul_lib._plan(512, 2304, 2048, 4, 128, 'gpu', cfg)
  assert big.bm == 16 and big.split_k == 1  # partial sums would cost too much
  huge = matmul_lib._plan(4096, 3584, 14336, 4, 128, 'gpu', cfg)
  assert huge.bm == 64 and huge.split_k == 1
  plan = matmul_lib._plan(3, 256, 200, 4, 64, 'gpu', matmul_lib.DEFAULT_GPU_CONFIG)
  assert plan.np_pad % plan.bn == 0 and plan.np_pad >= 100


@pytest.mark.skipif(
  jax.default_backend() not in ('gpu', 'tpu'),
  reason='compiled (non-interpret) kernels need a GPU or TPU',
)
@pytest.mark.parametrize('bits', [3, 4])
@pytest.mark.parametrize('batch', [1, 8, 64])
def test_compiled_kernel_matches_reference_on_accelerator(bits, batch):
  q, p, kx = _case(2304, 2048, bits, 128, False)
  x = jax.random.normal(kx, (batch, 2304), jnp.float32).astype(jnp.bfloat16)
  y = kernels_pallas.quantized_matmul(x, p, interpret=False)
  _check(y, x, q, jnp.bfloat16)
  minv = jax.random.normal(kx, (2304 // 64, 64, 64), jnp.float32)
  yb = kernels_pallas.blockdiag_matmul(x, minv, interpret=False)
  ref = kernels_pallas.blockdiag_matmul_reference(x, minv)
  np.testing.assert_allclose(
    np.asarray(yb, np.float32),
    np.asarray(ref, np.float32),
    rtol=2e-2,
    atol=2e-2 * float(jnp.abs(ref).max()),
  )
