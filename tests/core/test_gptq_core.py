"""Tests for cafeq_jax.core.gptq (Hessians, layer loss, GPTQ solve)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from cafeq_jax import quantizer as qz
from cafeq_jax.core import gptq


def test_hessian_accumulates_over_chunks_like_one_matmul():
  x = np.random.default_rng(0).normal(size=(3, 10, 16)).astype(np.float32)
  h = None
  for chunk in x:
    h = gptq.accumulate_hessian(h, jnp.asarray(chunk))
  want = x.reshape(-1, 16).astype(np.float64)
  np.testing.assert_allclose(np.asarray(h), want.T @ want, rtol=1e-5, atol=1e-4)
  with pytest.raises(ValueError, match='width'):
    gptq.accumulate_hessian(h, jnp.ones((2, 8)))


def test_layer_loss_equals_activation_error():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(50, 16))
  w, w_hat = rng.normal(size=(16, 4)), rng.normal(size=(16, 4))
  got = gptq.layer_loss(jnp.asarray(w), jnp.asarray(w_hat), jnp.asarray(x.T @ x))
  np.testing.assert_allclose(float(got), np.sum((x @ (w - w_hat)) ** 2), rtol=1e-4)


def test_gptq_quantize_lowers_calibration_loss_on_outlier_activations():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(512, 64)) * np.exp(rng.normal(size=64))  # uneven channel scales
  x[:, :8] += rng.normal(size=(512, 1)) * 3  # shared component: correlated channels
  h = jnp.asarray(x.T @ x, jnp.float32)
  w = jnp.asarray(rng.normal(size=(64, 16)), jnp.float32)
  spec = qz.QuantSpec(bits=3, group_size=32)
  q = gptq.gptq_quantize(w, h, spec)
  loss = float(gptq.layer_loss(w, qz.dequantize(q), h))
  rtn = float(gptq.layer_loss(w, qz.quant_dequant(w, spec), h))
  assert loss < 0.9 * rtn
