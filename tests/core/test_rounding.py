"""Tests for cafeq_jax.core.rounding: GPTQ-form rounding and adaptive pair rounding."""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from cafeq_jax import quantizer as qz
from cafeq_jax.core import rounding


def _np_scale_zero(x, bits, symmetric):
  """Textbook per-column scale/zero of x (g, n) in float64."""
  tiny = np.finfo(np.float32).tiny
  if symmetric:
    qmax = 2 ** (bits - 1) - 1
    return np.maximum(np.abs(x).max(0) / qmax, tiny), np.zeros(x.shape[1])
  lo, hi = np.minimum(x.min(0), 0), np.maximum(x.max(0), 0)
  s = np.maximum((hi - lo) / (2**bits - 1), tiny)
  return s, np.clip(np.round(-lo / s), 0, 2**bits - 1)


def _np_damped_hinv_upper(w, h, damp):
  """GPTQ's preparation in float64: dead rows zeroed (``H_ii = 1``), relative
  damping, upper Cholesky factor of ``H⁻¹``. Returns ``(w, u)`` (``w`` a copy)."""
  w, h = w.astype(np.float64).copy(), h.astype(np.float64).copy()
  dead = np.diag(h) == 0
  h[dead, dead] = 1
  w[dead] = 0
  h += damp * np.mean(np.diag(h)) * np.eye(h.shape[0])
  return w, np.linalg.cholesky(np.linalg.inv(h)).T


def numpy_gptq(w, h, bits, group, symmetric, damp=0.01):
  """Unblocked GPTQ written from the paper (Frantar et al. 2022, Alg. 1), float64.

  w: (d_in, d_out) swept along d_in; returns the dequantized weights.
  """
  d = h.shape[0]
  w, u = _np_damped_hinv_upper(w, h, damp)
  qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
  out = np.zeros_like(w)
  if group is None:
    s, z = _np_scale_zero(w, bits, symmetric)
  for i in range(d):
    if group is not None and i % group == 0:
      s, z = _np_scale_zero(w[i : i + group], bits, symmetric)
    q = np.clip(np.round(w[i] / s) + z, qmin, qmax)
    out[i] = (q - z) * s
    e = (w[i] - out[i]) / u[i, i]
    w[i:] -= np.outer(u[i, i:], e)
  return out


def _correlated(rng, n, d):
  a = rng.normal(size=(d, d)) / np.sqrt(d) + np.eye(d)
  return rng.normal(size=(n, d)) @ a


@pytest.mark.parametrize(
  'bits,group,symmetric', [(3, 32, False), (4, None, True), (2, 64, True), (4, None, False)]
)
def test_gptq_matches_independent_numpy_gptq(bits, group, symmetric):
  rng = np.random.default_rng(bits + (group or 1))
  x = _correlated(rng, 1024, 128)
  h = (x.T @ x).astype(np.float32)
  w = rng.normal(size=(128, 20)).astype(np.float32)
  spec = qz.QuantSpec(bits=bits, group_size=group, symmetric=symmetric)
  got = np.asarray(qz.dequantize(rounding.gptq_round(w, h, spec, block=64)))
  want = numpy_gptq(w, h, bits, group, symmetric)
  close = np.isclose(got, want, rtol=1e-4, atol=1e-5)
  # Float32 vs float64 error feedback may flip a rare code near a rounding tie.
  assert close.mean() > 0.99, close.mean()
  loss = lambda v: np.sum((x @ (w - v)) ** 2)
  np.testing.assert_allclose(loss(got), loss(want), rtol=2e-2)


@pytest.mark.parametrize(
  'spec',
  [
    qz.QuantSpec(bits=3, group_size=32),
    qz.QuantSpec(bits=4, group_size=None, symmetric=True),
    qz.QuantSpec(bits=3, group_size=64, clip_search=True),
  ],
)
def test_gptq_with_identity_hessian_equals_rtn_exactly(spec):
  w = np.random.default_rng(1).standard_t(3, size=(192, 24)).astype(np.float32)
  want = qz.quantize(jnp.asarray(w), spec)
  got = rounding.gptq_round(w, 5.0 * np.eye(192, dtype=np.float32), spec, block=64)
  np.testing.assert_array_equal(np.asarray(got.codes), np.asarray(want.codes))
  np.testing.assert_array_equal(np.asarray(got.scale), np.asarray(want.scale))


def test_gptq_output_side_with_identity_hessian_equals_rtn():
  spec = qz.QuantSpec(bits=3, group_size=32)
  w = np.random.default_rng(2).normal(size=(64, 40)).astype(np.float32)
  got = rounding.gptq_round_output(w, np.eye(40, dtype=np.float32), spec)
  want = qz.quantize(jnp.asarray(w), spec)
  np.testing.assert_array_equal(np.asarray(got.codes), np.asarray(want.codes))
  np.testing.assert_allclose(np.asarray(got.scale), np.asarray(want.scale), rtol=1e-6)


@pytest.mark.parametrize(
  'block',
  [pytest.param(32, marks=pytest.mark.slow), 128, pytest.param(1000, marks=pytest.mark.slow)],
)
def test_gptq_reduces_activation_error_vs_rtn_and_block_size_is_irrelevant(block):
  rng = np.random.default_rng(3)
  x = _correlated(rng, 2048, 160)
  h = (x.T @ x).astype(np.float32)
  w = rng.normal(size=(160, 32)).astype(np.float32)
  spec = qz.QuantSpec(bits=3, group_size=32)
  got = rounding.gptq_round(w, h, spec, block=block)
  rtn = np.asarray(qz.quant_dequant(jnp.asarray(w), spec))
  loss = lambda v: np.sum((x @ (w - v)) ** 2)
  assert loss(np.asarray(qz.dequantize(got))) < 0.8 * loss(rtn)
  ref = rounding.gptq_round(w, h, spec, block=32)
  agree = np.mean(np.asarray(ref.codes) == np.asarray(got.codes))
  assert agree > 0.99


def test_gptq_output_side_matches_gptq_on_transpose_per_channel():
  # Per-channel on the transpose == one group per column of W: same problem.
  rng = np.random.default_rng(4)
  a = rng.normal(size=(48, 300))
  h = (a @ a.T).astype(np.float32)
  w = rng.normal(size=(64, 48)).astype(np.float32)
  spec_w = qz.QuantSpec(bits=3, group_size=None)
  got = np.asarray(qz.dequantize(rounding.gptq_round_output(w, h, spec_w)))
  # numpy reference: GPTQ on V = Wᵀ with per-ROW scales (each row = a column of W).
  v = w.T.astype(np.float64).copy()
  hh = h.astype(np.float64) + 0.01 * np.mean(np.diag(h)) * np.eye(48)
  u = np.linalg.cholesky(np.linalg.inv(hh)).T
  out = np.zeros_like(v)
  for i in range(48):
    s, z = _np_scale_zero(v[i][:, None], 3, False)
    q = np.clip(np.round(v[i] / s) + z, 0, 7)
    out[i] = (q - z) * s
    v[i:] -= np.outer(u[i, i:], (v[i] - out[i]) / u[i, i])
  assert np.isclose(got, out.T, rtol=1e-4, atol=1e-5).mean() > 0.99
  loss = lambda x: np.sum(((w - x) @ a) ** 2)
  rtn = np.asarray(qz.quant_dequant(jnp.asarray(w), spec_w))
  assert loss(got) < loss(rtn)


def test_gptq_zeroes_dead_inputs_and_batches_leading_dims():
  rng = np.random.default_rng(5)
  x = rng.normal(size=(256, 64))
  x[:, 3] = 0
  h = (x.T @ x).astype(np.float32)
  w = rng.normal(size=(2, 64, 8)).astype(np.float32)
  spec = qz.QuantSpec(bits=4, group_size=32)
  q = rounding.gptq_round(w, np.stack([h, h]), spec)
  assert q.codes.shape == (2, 64, 8) and q.scale.shape == (2, 2, 8)
  wh = np.asarray(qz.dequantize(q))
  np.testing.assert_allclose(wh[:, 3], 0, atol=1e-6)
  single = rounding.gptq_round(w[1], h, spec)
  np.testing.assert_array_equal(np.asarray(single.codes), np.asarray(q.codes[1]))


def test_gptq_rejects_bad_shapes():
  spec = qz.QuantSpec(bits=4, group_size=32)
  with pytest.raises(ValueError, match='expected'):
    rounding.gptq_round(np.zeros((64, 4), np.float32), np.eye(32, dtype=np.float32), spec)
  with pytest.raises(ValueError, match='group_size'):
    rounding.gptq_round(np.zeros((48, 4), np.float32), np.eye(48, dtype=np.float32), spec)


def test_pair_product_error_matches_dense_formula_for_gqa_blocks():
  rng = np.random.default_rng(6)
  k, h, b, a, c = 2, 6, 4, 10, 7
  w1, w2 = rng.normal(size=(a, k * b)), rng.normal(size=(h * b, c))
  w1h, w2h = w1 + 0.1 * rng.normal(size=w1.shape), w2 + 0.1 * rng.normal(size=w2.shape)
  want = 0.0
  for head in range(h):
    g = head // (h // k)
    p = w1[:, g * b : (g + 1) * b] @ w2[head * b : (head + 1) * b]
    ph = w1h[:, g * b : (g + 1) * b] @ w2h[head * b : (head + 1) * b]
    want += np.sum((p - ph) ** 2)
  f32 = lambda v: jnp.asarray(v, jnp.float32)
  got = rounding.pair_product_error(f32(w1), f32(w2), f32(w1h), f32(w2h), n1=k, n2=h)
  np.testing.assert_allclose(float(got), want, rtol=1e-4)
  # Reversed roles (query/key: n1 = H heads share n2 = K key blocks).
  w1r, w2r = w2.T.copy(), w1.T.copy()  # (c, h*b), (k*b, a)
  w1rh, w2rh = w2h.T.copy(), w1h.T.copy()
  got_r = rounding.pair_product_error(f32(w1r), f32(w2r), f32(w1rh), f32(w2rh), n1=h, n2=k)
  np.testing.assert_allclose(float(got_r), want, rtol=1e-4)


def test_adaptive_rounding_never_worse_than_rtn_and_reports_history():
  rng = np.random.default_rng(7)
  w1 = rng.normal(size=(64, 32)).astype(np.float32)
  w2 = rng.normal(size=(32, 96)).astype(np.float32)
  spec = qz.QuantSpec(bits=3, group_size=32)
  for mode in ('rtn', 'gptq'):
    q1, q2, hist = rounding.adaptive_round_pair(w1, w2, spec, spec, rounds=2, rounding=mode)
    p_hat = np.asarray(qz.dequantize(q1)) @ np.asarray(qz.dequantize(q2))
    err = np.sum((w1 @ w2 - p_hat) ** 2)
    rtn = np.sum(
      (
        w1 @ w2
        - np.asarray(qz.quant_dequant(jnp.asarray(w1), spec))
        @ np.asarray(qz.quant_dequant(jnp.asarray(w2), spec))
      )
      ** 2
    )
    np.testing.assert_allclose(hist[0], rtn, rtol=1e-4)
    np.testing.assert_allclose(err, np.min(hist), rtol=1e-4)
    assert err < 0.9 * rtn, (mode, err, rtn)
  assert len(hist) == 2 + 2 * 2


def test_adaptive_rounding_on_tiny_pairs_against_exhaustive_search():
  # W1 (32, 3), W2 (3, 2), 2-bit per-channel. For the returned Ŵ1 and Ŵ2's scales,
  # enumerate all 4^6 code matrices of W2: the exhaustive optimum must lower-bound
  # the adaptive result, which must not exceed RTN; on average AR beats RTN.
  spec = qz.QuantSpec(bits=2, group_size=None)
  gains = []
  for seed in range(4):
    rng = np.random.default_rng(100 + seed)
    w1 = rng.normal(size=(32, 3)).astype(np.float32)
    w2 = rng.normal(size=(3, 2)).astype(np.float32)
    q1, q2, hist = rounding.adaptive_round_pair(w1, w2, spec, spec, rounds=3)
    w1h = np.asarray(qz.dequantize(q1), np.float64)
    p = w1.astype(np.float64) @ w2
    got = np.sum((p - w1h @ np.asarray(qz.dequantize(q2), np.float64)) ** 2)
    np.testing.assert_allclose(got, float(np.min(hist)), rtol=1e-4)
    assert got <= float(hist[0]) * (1 + 1e-6)
    s, z = np.asarray(q2.scale, np.float64)[0], np.asarray(q2.zero, np.float64)[0]
    codes = np.array(list(itertools.product(range(4), repeat=3)), np.float64)  # (64, 3)
    best = 0.0
    for col in range(2):  # columns are independent given Ŵ1
      cands = (codes - z[col]) * s[col]  # (64, 3)
      errs = np.sum((p[:, col][None] - cands @ w1h.T) ** 2, axis=1)
      best += errs.min()
    assert best <= got * (1 + 1e-6)
    gains.append(float(hist[0]) - got)
  assert np.mean(gains) > 0


@pytest.mark.slow  # covered at model level by tests/methods/test_paired.py
def test_adaptive_rounding_blocked_gqa_pair_matches_per_block_problem_when_aligned():
  rng = np.random.default_rng(9)
  k, h, b, a, c = 2, 4, 32, 64, 64
  w1 = rng.normal(size=(a, k * b)).astype(np.float32)
  w2 = rng.normal(size=(h * b, c)).astype(np.float32)
  spec = qz.QuantSpec(bits=3, group_size=32)
  q1, q2, hist = rounding.adaptive_round_pair(
    w1, w2, spec, spec, n1=k, n2=h, rounds=2, rounding='gptq'
  )
  assert q1.codes.shape == (a, k * b) and q2.codes.shape == (h * b, c)
  got = rounding.pair_product_error(
    jnp.asarray(w1), jnp.asarray(w2), qz.dequantize(q1), qz.dequantize(q2), n1=k, n2=h
  )
  assert float(got) < 0.9 * float(hist[0])
  np.testing.assert_allclose(float(got), float(np.min(hist)), rtol=1e-5)


def test_adaptive_rounding_rejects_bad_config():
  spec = qz.QuantSpec(bits=3, group_size=None)
  w1, w2 = np.ones((8, 4), np.float32), np.ones((4, 8), np.float32)
  with pytest.raises(ValueError, match='rounding'):
    rounding.adaptive_round_pair(w1, w2, spec, spec, rounding='adaround')
  with pytest.raises(ValueError, match='inner block'):
    rounding.adaptive_round_pair(w1, np.ones((5, 8), np.float32), spec, spec)


def test_gptq_group_fallback_uses_the_group_size_dividing_d_in():
  rng = np.random.default_rng(10)
  x = _correlated(rng, 512, 192)
  h = (x.T @ x).astype(np.float32)
  w = rng.normal(size=(192, 8)).astype(np.float32)
  got = rounding.gptq_round(w, h, qz.QuantSpec(bits=3, group_size=128, group_fallback=True))
  want = rounding.gptq_round(w, h, qz.QuantSpec(bits=3, group_size=64))
  assert got.spec.group_size == 64 and got.scale.shape == (3, 8)
  np.testing.assert_array_equal(np.asarray(got.codes), np.asarray(want.codes))
  q_out = rounding.gptq_round_output(
    w, np.eye(8, dtype=np.float32), qz.QuantSpec(bits=3, group_size=128, group_fallback=True)
  )
  rtn = qz.quantize(jnp.asarray(w), qz.QuantSpec(bits=3, group_size=64))
  assert q_out.spec.group_size == 64
  np.testing.assert_array_equal(np.asarray(q_out.codes), np.asarray(rtn.codes))


def numpy_gptq_act_order(w, h, bits, group, symmetric, damp=0.01):
  """GPTQ with act order and static groups, from the reference implementation's recipe.

  Group scales come from the input ``w`` in natural order; rows are swept by
  decreasing ``H_ii`` with the Hessian permuted alike. Returns dequantized weights.
  """
  w = w.astype(np.float64)
  d = w.shape[0]
  g = d if group is None else group
  scales = [_np_scale_zero(w[i : i + g], bits, symmetric) for i in range(0, d, g)]
  perm = np.argsort(-np.diag(h), kind='stable')
  wp, u = _np_damped_hinv_upper(w[perm], h[perm][:, perm], damp)
  qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
  out = np.zeros_like(wp)
  for i in range(d):
    s, z = scales[perm[i] // g]
    q = np.clip(np.round(wp[i] / s) + z, qmin, qmax)
    out[i] = (q - z) * s
    e = (wp[i] - out[i]) / u[i, i]
    wp[i:] -= np.outer(u[i, i:], e)
  res = np.empty_like(out)
  res[perm] = out
  return res


@pytest.mark.parametrize('bits,group,symmetric', [(3, 32, False), (4, None, True)])
def test_gptq_act_order_matches_numpy_reference_and_keeps_groups(bits, group, symmetric):
  rng = np.random.default_rng(7)
  # Input channels of very different energy, as in LLMs with massive activations.
  x = _correlated(rng, 1024, 128) * np.exp(rng.normal(size=128) * 1.5)
  h = (x.T @ x).astype(np.float32)
  w = rng.normal(size=(128, 20)).astype(np.float32)
  spec = qz.QuantSpec(bits=bits, group_size=group, symmetric=symmetric)
  q = rounding.gptq_round(w, h, spec, block=64, act_order=True)
  got = np.asarray(qz.dequantize(q))
  want = numpy_gptq_act_order(w, h, bits, group, symmetric)
  close = np.isclose(got, want, rtol=1e-4, atol=1e-5)
  assert close.mean() > 0.99, close.mean()
  # Static groups: the stored scales are those of RTN on the input weights.
  np.testing.assert_allclose(np.asarray(q.scale), np.asarray(qz.quantize(w, spec).scale), rtol=1e-6)
  loss = lambda v: np.sum((x @ (w - v)) ** 2)
  assert loss(got) < loss(np.asarray(qz.quant_dequant(w, spec)))


def test_gptq_act_order_with_identity_hessian_equals_rtn_exactly():
  w = np.random.default_rng(2).standard_t(3, size=(128, 16)).astype(np.float32)
  spec = qz.QuantSpec(bits=3, group_size=32)
  got = rounding.gptq_round(w, np.eye(128, dtype=np.float32), spec, act_order=True)
  np.testing.assert_array_equal(np.asarray(got.codes), np.asarray(qz.quantize(w, spec).codes))
