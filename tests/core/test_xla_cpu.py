"""Tests of cafeq_jax.core.xla_cpu (compile options of the optimisers' hot loops)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cafeq_jax.core import xla_cpu


def _grouped_range(x):
  g = x.reshape(x.shape[0], -1, 32, x.shape[-1])
  return jnp.sum(g - g.min(axis=-2, keepdims=True), axis=-2) * jnp.max(g, axis=-2)


def test_hot_jit_computes_what_jit_does_at_top_level_and_nested():
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 128, 40))
  hot = xla_cpu.hot_jit(_grouped_range)
  want = jax.jit(_grouped_range)(x)
  np.testing.assert_allclose(np.asarray(hot(x)), np.asarray(want), rtol=1e-6)
  # Under another jit the options (top level only in JAX) are left to the caller.
  nested = jax.jit(lambda x: hot(x) + 1.0)(x)
  np.testing.assert_allclose(np.asarray(nested), np.asarray(want) + 1.0, rtol=1e-6)


def test_cpu_options_are_accepted_and_drop_ynnpack_fusions():
  assert jax.default_backend() == 'cpu'
  opts = xla_cpu.options()
  assert opts in ({}, xla_cpu.OPTIONS)  # {}: a jaxlib without the option
  if opts:
    x = jnp.zeros((3, 128, 40))
    text = jax.jit(_grouped_range, compiler_options=opts).lower(x).compile().as_text()
    assert 'ynn' not in text.lower()
