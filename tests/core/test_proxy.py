"""Tests of cafeq_jax.core.proxy against numpy closed forms."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cafeq_jax import quantizer
from cafeq_jax.core import proxy
from cafeq_jax.core import transforms

SPEC = quantizer.QuantSpec(bits=3, group_size=32)


def _w(key, shape):
  return jax.random.normal(jax.random.PRNGKey(key), shape, jnp.float32)


def test_frobenius_matches_numpy_per_matrix():
  a, b = np.asarray(_w(0, (2, 3, 8, 5))), np.asarray(_w(1, (2, 3, 8, 5)))
  expected = ((a.astype(np.float64) - b) ** 2).sum(axis=(-2, -1))
  np.testing.assert_allclose(np.asarray(proxy.frobenius(a, b)), expected, rtol=1e-5)


def test_transformed_loss_with_identity_equals_rtn_loss():
  w = _w(2, (3, 64, 16))
  eye = transforms.identity_blocks(2, 32, (3,))
  np.testing.assert_allclose(
    np.asarray(proxy.transformed_loss(w, eye, eye, SPEC)),
    np.asarray(proxy.rtn_loss(w, SPEC)),
    rtol=1e-6,
  )


@pytest.mark.parametrize('ste', ['round', 'full', False])
def test_transformed_loss_matches_numpy_reference(ste):
  key = jax.random.PRNGKey(3)
  t = transforms.init_transform(key, 64, 16, batch_shape=(2,))
  t = t.replace(skew=0.3 * _w(4, t.skew.shape), log_row=0.2 * _w(5, t.log_row.shape))
  m = np.asarray(t.matrix(), np.float64)
  w = np.asarray(_w(6, (2, 64, 24)), np.float64)
  expected = []
  for b in range(2):
    dense = np.zeros((64, 64))
    for i in range(4):
      dense[16 * i : 16 * i + 16, 16 * i : 16 * i + 16] = m[b, i]
    v_hat = np.asarray(quantizer.quant_dequant(jnp.asarray(dense @ w[b], jnp.float32), SPEC))
    expected.append(((w[b] - np.linalg.solve(dense, v_hat)) ** 2).sum())
  got = proxy.transformed_loss(w, *t.matrix_and_inverse(), SPEC, ste=ste)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=2e-3)


def test_round_ste_value_equals_quant_dequant():
  v = _w(7, (2, 64, 10)) * 3.0
  for spec in [SPEC, quantizer.QuantSpec(bits=4, group_size=None, symmetric=True)]:
    np.testing.assert_allclose(
      np.asarray(proxy.round_ste_quant(v, spec)),
      np.asarray(quantizer.quant_dequant(v, spec)),
      atol=1e-5,
    )


def test_full_ste_gives_no_rotation_gradient_but_round_ste_does():
  # With the identity-gradient STE, ||W - M⁻¹ fq(MW)||² = ||M⁻¹ E||² with E frozen:
  # an orthogonal M cannot change it, so the rotation gets no gradient. The rounding-
  # only STE sees the group ranges and does.
  w = _w(8, (64, 16)).at[3].mul(10.0)
  t = transforms.init_transform(jax.random.PRNGKey(0), 64, 32)

  def loss(skew, ste):
    m, m_inv = t.replace(skew=skew).matrix_and_inverse()
    return proxy.transformed_loss(w, m, m_inv, SPEC, ste=ste)

  g_full = jax.grad(loss)(t.skew + 0.0, 'full')
  g_round = jax.grad(loss)(t.skew + 0.0, 'round')
  assert float(jnp.abs(g_round).max()) > 1e-3
  assert float(jnp.abs(g_full).max()) < 1e-5 * float(jnp.abs(g_round).max()) + 1e-9


@pytest.mark.parametrize('factored', [True, False, None])
def test_pair_loss_matches_numpy_product_error(factored):
  w1, w2 = _w(9, (3, 40, 8)), _w(10, (3, 8, 30))
  w1h, w2h = (
    quantizer.quant_dequant(w1, quantizer.QuantSpec(bits=3, group_size=None)),
    w2 + 0.05 * _w(11, w2.shape),
  )
  a, b, ah, bh = (np.asarray(x, np.float64) for x in (w1, w2, w1h, w2h))
  expected = ((a @ b - ah @ bh) ** 2).sum(axis=(-2, -1))
  got = proxy.pair_loss(w1, w2, w1h, w2h, factored=factored)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4)


def test_pair_loss_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match='inner dims'):
    proxy.pair_loss(jnp.zeros((4, 3)), jnp.zeros((5, 2)), jnp.zeros((4, 3)), jnp.zeros((5, 2)))
  with pytest.raises(ValueError, match='pair shapes differ'):
    proxy.pair_loss(jnp.zeros((4, 3)), jnp.zeros((3, 2)), jnp.zeros((4, 4)), jnp.zeros((3, 2)))


def test_pair_quant_loss_is_zero_for_exactly_representable_factors():
  w1 = jnp.asarray(np.tile([[0.0, 1.0, 2.0, 3.0]], (8, 1)).T.repeat(8, 1)[:, :8], jnp.float32)
  w2 = jnp.ones((8, 4), jnp.float32)
  spec = quantizer.QuantSpec(bits=2, group_size=None)
  assert float(proxy.pair_quant_loss(w1, w2, spec)) == pytest.approx(0.0, abs=1e-8)
  with pytest.raises(ValueError, match='ste='):
    proxy.ste_quant(w1, spec, 'bogus')


def _ste_inputs(kind: str) -> jax.Array:
  v = np.array(_w(11, (3, 64, 24)))
  if kind == 'ties':  # repeated group minima / maxima and codes exactly on the clip bounds
    v = np.round(v * 2) / 2
  elif kind == 'zeros':  # an all-zero group (scale at its floor) and an all-positive column
    v[:, :32, :5] = 0.0
    v[:, :, 7] = np.abs(v[:, :, 7])
  return jnp.asarray(v)


@pytest.mark.parametrize(
  'spec',
  [
    SPEC,
    quantizer.QuantSpec(bits=2, group_size=32),
    quantizer.QuantSpec(bits=3, group_size=64, symmetric=True),
    quantizer.QuantSpec(bits=4, group_size=None, symmetric=True),
  ],
  ids=lambda s: s.name,
)
@pytest.mark.parametrize('kind', ['normal', 'ties', 'zeros'])
def test_round_ste_gradient_equals_autodiff_of_its_formula(spec, kind):
  """The hand-written backward pass against JAX's autodiff of the plain formula,
  ties included (JAX's min / max / clip split ties evenly)."""
  v = _ste_inputs(kind)
  ct = _w(12, v.shape)

  def vjp(fn):
    return jax.jit(lambda v: (lambda out, back: (out, back(ct)[0]))(*jax.vjp(fn, v)))(v)

  got, got_grad = vjp(lambda x: proxy.round_ste_quant(x, spec))
  want, want_grad = vjp(lambda x: proxy.round_ste_quant_autodiff(x, spec))
  got_grad, want_grad = np.asarray(got_grad), np.asarray(want_grad)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert np.isfinite(got_grad).all()
  # Autodiff's d(v / s)/ds = -v / s² is 0 * inf = NaN on an all-zero asymmetric group
  # (s at its floor, tiny); the written-out pass stays finite there.
  finite = np.isfinite(want_grad)
  assert finite.all() or (kind == 'zeros' and not spec.symmetric)
  np.testing.assert_allclose(got_grad[finite], want_grad[finite], rtol=1e-5, atol=2e-6)
  assert np.abs(want_grad - np.asarray(ct))[finite].max() > 0.1  # the scales' share is there


def test_round_ste_with_clip_search_is_the_autodiffed_formula():
  spec = quantizer.QuantSpec(bits=3, group_size=32, clip_search=True)
  v, ct = _ste_inputs('normal'), _w(13, (3, 64, 24))
  got = jax.vjp(lambda x: proxy.round_ste_quant(x, spec), v)[1](ct)[0]
  want = jax.vjp(lambda x: proxy.round_ste_quant_autodiff(x, spec), v)[1](ct)[0]
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
