"""Tests for cafeq_jax.quantizer against an independent numpy implementation."""

from __future__ import annotations

import hypothesis
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cafeq_jax import quantizer as qz


def numpy_rtn(w: np.ndarray, bits: int, group: int | None, symmetric: bool) -> np.ndarray:
  """Reference RTN written from the textbook definition, one group at a time."""
  d_in, d_out = w.shape
  g = d_in if group is None else group
  out = np.empty_like(w, dtype=np.float64)
  for c in range(d_out):
    for start in range(0, d_in, g):
      x = w[start : start + g, c].astype(np.float64)
      if symmetric:
        qmax = 2 ** (bits - 1) - 1
        s = max(np.abs(x).max() / qmax, np.finfo(np.float32).tiny)
        q = np.clip(np.round(x / s), -qmax - 1, qmax)
        out[start : start + g, c] = q * s
      else:
        lo, hi = min(x.min(), 0.0), max(x.max(), 0.0)
        s = max((hi - lo) / (2**bits - 1), np.finfo(np.float32).tiny)
        z = np.clip(np.round(-lo / s), 0, 2**bits - 1)
        q = np.clip(np.round(x / s) + z, 0, 2**bits - 1)
        out[start : start + g, c] = (q - z) * s
  return out


@pytest.mark.parametrize('bits', [2, 3, 4, 8])
@pytest.mark.parametrize('group', [None, 32, 64])
@pytest.mark.parametrize('symmetric', [True, False])
def test_rtn_matches_numpy_reference(bits, group, symmetric):
  rng = np.random.default_rng(bits * 100 + (group or 0) + symmetric)
  w = rng.standard_t(df=3, size=(128, 24)).astype(np.float32)
  spec = qz.QuantSpec(bits=bits, group_size=group, symmetric=symmetric)
  got = np.asarray(qz.dequantize(qz.quantize(jnp.asarray(w), spec)))
  want = numpy_rtn(w, bits, group, symmetric)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@hypothesis.settings(deadline=None, max_examples=40)
@hypothesis.given(
  w=hnp.arrays(
    np.float32,
    st.tuples(st.sampled_from([32, 64, 96]), st.integers(1, 9)),
    elements=st.floats(-1e3, 1e3, width=32),
  ),
  bits=st.sampled_from([2, 3, 4, 8]),
  symmetric=st.booleans(),
  group=st.sampled_from([None, 32]),
)
def test_error_is_at_most_half_a_step_without_clipping(w, bits, symmetric, group):
  spec = qz.QuantSpec(bits=bits, group_size=group, symmetric=symmetric)
  q = qz.quantize(jnp.asarray(w), spec)
  w_hat = np.asarray(qz.dequantize(q))
  g = spec.effective_group_size(w.shape[0])
  step = np.repeat(np.asarray(q.scale), g, axis=0)
  # float32 forms ``scale`` and ``(code - zero) * scale``: a few ulps of the values
  # themselves on top of half a step (a tie, 250 in [0, 500] at 8 bits, lands 1.6e-5
  # of the step beyond it).
  ulps = 4 * np.finfo(np.float32).eps * (np.abs(w) + np.abs(w_hat))
  assert np.all(np.abs(w - w_hat) <= step / 2 * (1 + 1e-5) + ulps + 1e-30)
  codes = np.asarray(q.codes)
  assert codes.min() >= spec.qmin and codes.max() <= spec.qmax


def test_quantized_array_round_trips_through_its_invariant():
  w = jax.random.normal(jax.random.key(0), (3, 64, 16))
  spec = qz.QuantSpec(bits=3, group_size=32, symmetric=False)
  q = qz.quantize(w, spec)
  assert q.codes.shape == (3, 64, 16) and q.scale.shape == (3, 2, 16)
  rebuilt = (
    np.asarray(q.codes, np.float32).reshape(3, 2, 32, 16) - np.asarray(q.zero)[:, :, None]
  ) * np.asarray(q.scale)[:, :, None]
  np.testing.assert_allclose(np.asarray(qz.dequantize(q)), rebuilt.reshape(3, 64, 16), rtol=1e-6)
  # Re-quantizing the dequantized weights is a fixed point.
  again = qz.quantize(qz.dequantize(q), spec)
  np.testing.assert_array_equal(np.asarray(again.codes), np.asarray(q.codes))


def test_batched_quantize_equals_per_matrix():
  w = jax.random.normal(jax.random.key(1), (4, 64, 8))
  spec = qz.QuantSpec(bits=4, group_size=32)
  stacked = qz.dequantize(qz.quantize(w, spec))
  for i in range(4):
    np.testing.assert_array_equal(stacked[i], qz.dequantize(qz.quantize(w[i], spec)))


@pytest.mark.parametrize('symmetric', [True, False])
def test_clip_search_picks_the_grid_minimum(symmetric):
  rng = np.random.default_rng(0)
  w = rng.standard_t(df=2, size=(64, 6)).astype(np.float32)
  spec = qz.QuantSpec(bits=3, group_size=None, symmetric=symmetric, clip_search=True)
  got_err = ((np.asarray(qz.quant_dequant(jnp.asarray(w), spec)) - w) ** 2).sum(0)
  # Brute force over the grid, column by column, with the numpy reference.
  errs = []
  for r in spec.clip_grid:
    base = qz.QuantSpec(bits=3, group_size=None, symmetric=symmetric)
    lo, hi = w.min(0) * r, w.max(0) * r
    s, z = qz._scale_zero_from_range(jnp.asarray(lo), jnp.asarray(hi), base)
    s = np.asarray(s)
    zz = 0.0 if z is None else np.asarray(z)
    q = np.clip(np.round(w / s) + zz, base.qmin, base.qmax)
    errs.append((((q - zz) * s - w) ** 2).sum(0))
  np.testing.assert_allclose(got_err, np.min(errs, axis=0), rtol=1e-5)
  plain = qz.QuantSpec(bits=3, group_size=None, symmetric=symmetric)
  plain_err = ((np.asarray(qz.quant_dequant(jnp.asarray(w), plain)) - w) ** 2).sum(0)
  assert np.all(got_err <= plain_err + 1e-6) and got_err.sum() < plain_err.sum()


def test_fake_quant_forward_is_quantized_and_gradient_is_identity():
  w = jax.random.normal(jax.random.key(2), (64, 8))
  spec = qz.QuantSpec(bits=3, group_size=32)
  np.testing.assert_array_equal(qz.fake_quant(w, spec), qz.quant_dequant(w, spec))
  c = jax.random.normal(jax.random.key(3), (64, 8))
  grad = jax.grad(lambda v: jnp.sum(c * qz.fake_quant(v, spec)))(w)
  np.testing.assert_array_equal(grad, c)


def test_quantize_works_under_jit_and_matches_eager():
  w = jax.random.normal(jax.random.key(4), (128, 16))
  spec = qz.QuantSpec(bits=4, group_size=64, clip_search=True)
  eager = qz.quant_dequant(w, spec)
  jitted = jax.jit(qz.quant_dequant, static_argnums=1)(w, spec)
  np.testing.assert_allclose(eager, jitted, rtol=1e-6)


@pytest.mark.parametrize(
  'kwargs, match',
  [
    (dict(bits=5), 'bits=5'),
    (dict(group_size=100), 'group_size=100'),
    (dict(clip_grid=()), 'clip_grid'),
  ],
)
def test_bad_spec_raises_naming_the_value(kwargs, match):
  with pytest.raises(ValueError, match=match):
    qz.QuantSpec(**kwargs)


def test_bad_weights_raise_naming_the_problem():
  spec = qz.QuantSpec(bits=4, group_size=32)
  with pytest.raises(ValueError, match='d_in=48'):
    qz.quantize(jnp.ones((48, 4)), spec)
  with pytest.raises(ValueError, match='rank'):
    qz.quantize(jnp.ones((64,)), spec)
  with pytest.raises(ValueError, match='NaN/Inf'):
    qz.quantize(jnp.ones((64, 4)).at[3, 1].set(jnp.nan), spec)
  with pytest.raises(ValueError, match='NaN/Inf'):
    qz.quantize(jnp.ones((64, 4)).at[0, 0].set(jnp.inf), spec)
  with pytest.raises(ValueError, match='floating'):
    qz.quantize(jnp.ones((64, 4), jnp.int32), spec)


def test_bits_per_weight_counts_codes_and_group_metadata():
  assert qz.bits_per_weight(qz.QuantSpec(bits=3, group_size=128), 512) == 3 + 32 / 128
  assert (
    qz.bits_per_weight(qz.QuantSpec(bits=4, group_size=None, symmetric=True), 512) == 4 + 16 / 512
  )


def test_group_fallback_uses_the_largest_dividing_group_size():
  w = jax.random.normal(jax.random.key(5), (576, 8))
  with pytest.raises(ValueError, match='d_in=576 is not divisible by group_size=128'):
    qz.quantize(w, qz.QuantSpec(bits=3, group_size=128))
  q = qz.quantize(w, qz.QuantSpec(bits=3, group_size=128, group_fallback=True))
  assert q.spec.group_size == 64 and q.scale.shape == (9, 8)
  np.testing.assert_array_equal(
    np.asarray(qz.dequantize(q)),
    np.asarray(qz.quant_dequant(w, qz.QuantSpec(bits=3, group_size=64))),
  )


def _stack_of(n=4, spec=qz.QuantSpec(bits=3, group_size=32)):
  w = jax.random.normal(jax.random.key(6), (n, 64, 8))
  return w, qz.quantize(w, spec)


@pytest.mark.parametrize('symmetric', [True, False])
def test_qarray_getitem_indexes_codes_scales_and_zeros_of_the_stack(symmetric):
  spec = qz.QuantSpec(bits=4, group_size=32, symmetric=symmetric)
  w = jax.random.normal(jax.random.key(7), (2, 3, 64, 8))
  q = qz.quantize(w, spec)
  for index in (1, (1, 2), slice(0, 2), np.array([1, 0]), (slice(None), 1), -1, ...):
    got = q[index]
    np.testing.assert_array_equal(got.codes, np.asarray(q.codes)[index])
    np.testing.assert_array_equal(got.scale, np.asarray(q.scale)[index])
    if symmetric:
      assert got.zero is None
    else:
      np.testing.assert_array_equal(got.zero, np.asarray(q.zero)[index])
    assert got.spec == q.spec
  # A slice of the stack is the quantization of that slice of the weights.
  np.testing.assert_array_equal(q[1, 2].codes, qz.quantize(w[1, 2], spec).codes)
  np.testing.assert_array_equal(qz.dequantize(q[0]), qz.dequantize(q)[0])


@pytest.mark.parametrize(
  'index',
  [
    0,
    (0, 0),
    (Ellipsis, 0),
    (slice(None), slice(0, 32)),
    (Ellipsis, slice(0, 32), slice(None)),
    (0, slice(None), 0),
  ],
)
def test_qarray_indexing_into_d_in_or_d_out_is_an_index_error(index):
  w = jax.random.normal(jax.random.key(8), (64, 8))
  q = qz.quantize(w, qz.QuantSpec(bits=3, group_size=32))
  stacked = qz.quantize(jnp.stack([w, w]), qz.QuantSpec(bits=3, group_size=32))
  target = q if index in (0, (0, 0)) else stacked
  with pytest.raises(IndexError, match='must select along the stack dims only'):
    target[index]  # pylint: disable=pointless-statement


def test_qarray_stack_equals_quantizing_the_stacked_weights():
  w, q = _stack_of()
  parts = [qz.quantize(w[i], q.spec) for i in range(4)]
  s = qz.QArray.stack(parts)
  for a, b in zip(jax.tree.leaves(s), jax.tree.leaves(q)):
    np.testing.assert_array_equal(a, b)
  assert s.spec == q.spec and s.shape == (4, 64, 8)
  # stack inverts indexing, also for symmetric (zero-free) arrays.
  back = qz.QArray.stack([q[i] for i in range(4)])
  np.testing.assert_array_equal(back.codes, q.codes)
  sym = qz.quantize(w, qz.QuantSpec(bits=3, group_size=32, symmetric=True))
  again = qz.QArray.stack([sym[i] for i in range(4)])
  assert again.zero is None
  np.testing.assert_array_equal(again.scale, sym.scale)


def test_qarray_stack_refuses_mixed_specs_shapes_and_empty_lists():
  w, q = _stack_of()
  other = qz.quantize(w[0], qz.QuantSpec(bits=4, group_size=32))
  with pytest.raises(ValueError, match='one spec and shape'):
    qz.QArray.stack([q[0], other])
  with pytest.raises(ValueError, match='one spec and shape'):
    qz.QArray.stack([q[0], q[:2]])
  with pytest.raises(ValueError, match='non-empty'):
    qz.QArray.stack([])


@pytest.mark.parametrize('bits', [2, 3, 4, 8])
@pytest.mark.parametrize('symmetric', [True, False])
def test_code_dtype_holds_every_code_of_the_spec(bits, symmetric):
  spec = qz.QuantSpec(bits=bits, group_size=32, symmetric=symmetric)
  dtype = qz.code_dtype(spec)
  assert dtype == (jnp.int16 if bits == 8 and not symmetric else jnp.int8)
  info = np.iinfo(dtype)
  assert info.min <= spec.qmin and spec.qmax <= info.max
  w = jnp.linspace(-1.0, 2.0, 64 * 4).reshape(64, 4)
  q = qz.quantize(w, spec)
  assert q.codes.dtype == dtype
  codes = np.asarray(q.codes)
  # The full range is used: [0, qmax] asymmetric, [-qmax, qmax] symmetric (qmin =
  # -qmax - 1 is never reached: scale = max|w| / qmax).
  assert codes.max() == spec.qmax
  assert codes.min() == (-spec.qmax if symmetric else spec.qmin)
