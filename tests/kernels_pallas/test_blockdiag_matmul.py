"""Block-diagonal online transform kernel (interpret mode) vs numpy."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

import kernels_pallas
from kernels_pallas import blockdiag as blockdiag_lib


def _numpy_blockdiag(x, minv):
  return np.asarray(x, np.float64) @ scipy.linalg.block_diag(*np.asarray(minv, np.float64))


@pytest.mark.parametrize(
  'k,batch,variant',
  [
    (16, 1, 'gpu'),
    (64, 5, 'gpu'),
    (16, 5, 'tpu'),
    (64, 1, 'tpu'),
    (128, 5, 'tpu'),
  ],
)
def test_blockdiag_kernel_matches_numpy_f32(k, batch, variant):
  d_in = 256
  kx, km = jax.random.split(jax.random.PRNGKey(k + batch))
  x = jax.random.normal(kx, (batch, d_in), jnp.float32)
  minv = jax.random.normal(km, (d_in // k, k, k), jnp.float32)
  y = kernels_pallas.blockdiag_matmul(x, minv, backend=variant, interpret=True)
  ref = _numpy_blockdiag(x, minv)
  np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_blockdiag_kernel_bf16_and_leading_dims():
  kx, km = jax.random.split(jax.random.PRNGKey(0))
  x = jax.random.normal(kx, (2, 3, 128), jnp.float32).astype(jnp.bfloat16)
  minv = jax.random.normal(km, (4, 32, 32), jnp.float32)
  y = kernels_pallas.blockdiag_matmul(x, minv, interpret=True)
  assert y.dtype == jnp.bfloat16 and y.shape == (2, 3, 128)
  # Reference with the same bf16-rounded Minv the kernel feeds to the dot.
  ref = _numpy_blockdiag(
    np.asarray(x.astype(jnp.float32)).reshape(6, 128),
    np.asarray(minv.astype(jnp.bfloat16).astype(jnp.float32)),
  )
  np.testing.assert_allclose(
    np.asarray(y.astype(jnp.float32)).reshape(6, 128), ref, rtol=1e-2, atol=1e-2 * np.abs(ref).max()
  )


def test_blockdiag_reference_matches_numpy():
  x = np.random.default_rng(0).normal(size=(3, 96)).astype(np.float32)
  minv = np.random.default_rng(1).normal(size=(3, 32, 32)).astype(np.float32)
  y = kernels_pallas.blockdiag_matmul_reference(jnp.asarray(x), jnp.asarray(minv))
  np.testing.assert_allclose(np.asarray(y), _numpy_blockdiag(x, minv), rtol=1e-5, atol=1e-4)


def test_blockdiag_unsupported_block_falls_back_to_reference_with_one_warning(caplog):
  blockdiag_lib._WARNED.clear()
  x = jnp.ones((2, 24), jnp.float32)
  minv = jnp.broadcast_to(2 * jnp.eye(12), (2, 12, 12))  # k=12: not a power of 2
  ok, reason = kernels_pallas.can_use_blockdiag_matmul(24, 12, 'gpu')
  assert not ok and 'k=12' in reason
  with caplog.at_level(logging.WARNING):
    y = kernels_pallas.blockdiag_matmul(x, minv, backend='gpu', interpret=True)
    kernels_pallas.blockdiag_matmul(x, minv, backend='gpu', interpret=True)
  np.testing.assert_allclose(np.asarray(y), 2 * np.ones((2, 24)))
  messages = [r.getMessage() for r in caplog.records if 'falling back' in r.getMessage()]
  assert len(messages) == 1
  for part in ('d_in=24, k=12 on gpu', 'not a power of 2', 'XLA reference'):
    assert part in messages[0], (part, messages[0])


def test_blockdiag_overhead_ratio_is_k_over_d_out():
  assert kernels_pallas.blockdiag_overhead_ratio(2304, 2048, 64) == 64 / 2048
  assert kernels_pallas.blockdiag_overhead_ratio(9216, 2304, 128) == pytest.approx(128 / 2304)
  with pytest.raises(ValueError, match='k=100'):
    kernels_pallas.blockdiag_overhead_ratio(2304, 2048, 100)


def test_blockdiag_shape_mismatch_raises():
  with pytest.raises(ValueError, match='d_in=64'):
    kernels_pallas.blockdiag_matmul(jnp.ones((2, 32)), jnp.ones((2, 32, 32)), interpret=True)
