"""Tests for cafeq_jax.packing: exact round trips and the documented byte layout."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cafeq_jax import packing
from cafeq_jax import quantizer

_SETTINGS = settings(max_examples=50, deadline=None)


def _random_qarray(seed, lead, k, n, bits, group_size, symmetric, as_numpy=False):
  """QArray whose codes include every value of the spec (when there is room)."""
  spec = quantizer.QuantSpec(bits=bits, group_size=group_size, symmetric=symmetric)
  rng = np.random.default_rng(seed)
  shape = (*lead, k, n)
  codes = rng.integers(spec.qmin, spec.qmax + 1, size=shape)
  flat = codes.reshape(-1)
  every = np.arange(spec.qmin, spec.qmax + 1)
  flat[: min(flat.size, every.size)] = every[: flat.size]
  codes = flat.reshape(shape).astype(np.int16 if spec.qmax > 127 else np.int8)
  g = spec.effective_group_size(k)
  sshape = (*lead, k // g, n)
  scale = rng.uniform(0.01, 1.0, size=sshape).astype(np.float32)
  zero = None
  if not symmetric:
    zero = rng.integers(0, spec.qmax + 1, size=sshape).astype(np.float32)
  if as_numpy:
    return quantizer.QArray(codes=codes, scale=scale, zero=zero, spec=spec)
  return quantizer.QArray(
    codes=jnp.asarray(codes),
    scale=jnp.asarray(scale),
    zero=None if zero is None else jnp.asarray(zero),
    spec=spec,
  )


_shapes = st.tuples(
  st.lists(st.integers(1, 3), min_size=0, max_size=2),  # leading batch dims
  st.sampled_from([32, 64]),  # K
  st.integers(1, 37),  # N (mostly not % 8)
)


@_SETTINGS
@given(
  shape=_shapes,
  bits=st.sampled_from([2, 3, 4, 8]),
  symmetric=st.booleans(),
  per_channel=st.booleans(),
  seed=st.integers(0, 2**31 - 1),
)
def test_pack_unpack_round_trips_every_code_exactly(shape, bits, symmetric, per_channel, seed):
  # numpy path (fast host-side packing; same code as the jnp path).
  lead, k, n = shape
  q = _random_qarray(
    seed, tuple(lead), k, n, bits, None if per_channel else 32, symmetric, as_numpy=True
  )
  p = packing.pack(q)
  assert isinstance(p.data, np.ndarray) and p.data.dtype == np.uint8
  back = packing.unpack(p)
  np.testing.assert_array_equal(back.codes, q.codes)
  assert back.codes.dtype == q.codes.dtype
  np.testing.assert_array_equal(back.scale, q.scale)
  if symmetric:
    assert back.zero is None
    np.testing.assert_array_equal(p.zero, -q.spec.qmin)
  else:
    np.testing.assert_array_equal(back.zero, q.zero)
  assert back.spec == q.spec


@pytest.mark.parametrize(
  'bits,symmetric,lead,n',
  [
    (3, False, (), 13),
    (3, True, (2,), 8),
    (4, False, (2, 1), 7),
    (4, True, (), 16),
    (2, False, (), 5),
    (8, False, (3,), 9),
    (8, True, (), 3),
  ],
)
def test_jnp_pack_matches_numpy_pack_and_round_trips(bits, symmetric, lead, n):
  qn = _random_qarray(5, lead, 64, n, bits, 32, symmetric, as_numpy=True)
  qj = jax.tree.map(jnp.asarray, qn)
  pj = packing.pack(qj)
  assert isinstance(pj.data, jax.Array)
  np.testing.assert_array_equal(np.asarray(pj.data), packing.pack(qn).data)
  back = packing.unpack(pj)
  np.testing.assert_array_equal(np.asarray(back.codes), qn.codes)
  np.testing.assert_allclose(
    np.asarray(packing.dequantize(pj)), np.asarray(quantizer.dequantize(qj)), rtol=1e-6
  )


@_SETTINGS
@given(
  lead=st.lists(st.integers(1, 3), max_size=2),
  k=st.integers(1, 9),
  n=st.integers(1, 40),
  bits=st.sampled_from([2, 3, 4, 8]),
  seed=st.integers(0, 2**31 - 1),
)
def test_pack_codes_matches_bitwise_numpy_reference(lead, k, n, bits, seed):
  rng = np.random.default_rng(seed)
  u = rng.integers(0, 2**bits, size=(*lead, k, n))
  data = packing.pack_codes(u, bits)
  p = packing.CODES_PER_UNIT[bits]
  npk = math.ceil(n / p)
  up = np.zeros((*lead, k, npk * p), np.int64)
  up[..., :n] = u
  # Independent reference: write every code's bits one at a time.
  word = np.zeros((*lead, k, npk), np.int64)
  for i in range(p):
    for b in range(bits):
      word |= ((up[..., i * npk : (i + 1) * npk] >> b) & 1) << (bits * i + b)
  if bits == 3:
    expected = np.stack([(word >> (8 * j)) & 0xFF for j in range(3)], axis=-3)
  else:
    expected = word
  np.testing.assert_array_equal(data, expected.astype(np.uint8))
  np.testing.assert_array_equal(packing.unpack_codes(data, bits, n), u)


@pytest.mark.parametrize('n', [8, 16, 2048])
def test_int3_codes_take_exactly_three_bits_per_weight(n):
  q = _random_qarray(0, (), 128, n, 3, 128, False)
  p = packing.pack(q)
  assert p.data.shape == (3, 128, n // 8)
  assert p.data.size * 8 / (128 * n) == 3.0


def test_int3_padding_is_below_one_unit_per_row():
  q = _random_qarray(1, (2,), 64, 13, 3, 32, True)
  p = packing.pack(q)
  assert p.data.shape == (2, 3, 64, 2)  # ceil(13 / 8) = 2 units of 3 bytes per row


@pytest.mark.parametrize('bits,expected_bpw', [(2, 2), (3, 3), (4, 4), (8, 8)])
def test_nbytes_counts_codes_scales_and_asymmetric_zeros(bits, expected_bpw):
  k, n, g = 256, 512, 128
  for symmetric in (True, False):
    q = _random_qarray(2, (), k, n, bits, g, symmetric)
    p = packing.pack(q)
    scales = (k // g) * n * 4
    expected = k * n * expected_bpw // 8 + scales * (1 if symmetric else 2)
    assert packing.nbytes(p) == expected
  assert packing.bf16_nbytes((k, n)) == 2 * k * n
  # bf16 halves the scale and zero-point bytes (q is asymmetric here); the zero
  # points are integers below 2^bits, so they survive bf16 exactly.
  p16 = packing.pack(q, scale_dtype=jnp.bfloat16)
  assert packing.nbytes(p16) == k * n * expected_bpw // 8 + scales
  assert p16.zero.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(packing.unpack(p16).zero), np.asarray(q.zero))
  np.testing.assert_array_equal(np.asarray(packing.unpack(p16).codes), np.asarray(q.codes))


def test_pack_and_unpack_are_jittable():
  q = _random_qarray(3, (2,), 64, 24, 3, 32, False)
  p = jax.jit(packing.pack)(q)
  back = jax.jit(packing.unpack)(p)
  np.testing.assert_array_equal(np.asarray(back.codes), np.asarray(q.codes))
  assert p.shape == (2, 64, 24) and p.bits == 3 and p.group_size == 32


def test_pack_round_trips_quantizer_output():
  w = jax.random.normal(jax.random.PRNGKey(0), (64, 20))
  spec = quantizer.QuantSpec(bits=4, group_size=32, symmetric=False)
  q = quantizer.quantize(w, spec)
  p = packing.pack(q)
  np.testing.assert_array_equal(
    np.asarray(packing.dequantize(p)), np.asarray(quantizer.dequantize(q))
  )


def test_index_selects_one_matrix_of_a_stack():
  q = _random_qarray(4, (2,), 64, 24, 3, 32, False)
  p = packing.pack(q)
  p1 = packing.index(p, 1)
  assert p1.shape == (64, 24) and p1.data.shape == (3, 64, 3)
  np.testing.assert_array_equal(np.asarray(packing.unpack(p1).codes), np.asarray(q.codes[1]))
  with pytest.raises(ValueError, match=r'\(64, 24\)'):
    packing.index(p1, 0)


def test_bad_bits_and_bad_data_raise_naming_the_value():
  with pytest.raises(ValueError, match='bits=5'):
    packing.pack_codes(jnp.zeros((4, 4), jnp.uint8), 5)
  with pytest.raises(TypeError, match='uint8'):
    packing.unpack_codes(jnp.zeros((4, 4), jnp.int32), 4, 8)
  with pytest.raises(ValueError, match=r'\(\.\.\., 3, K, Np\)'):
    packing.unpack_codes(jnp.zeros((4, 4), jnp.uint8), 3, 32)
  with pytest.raises(ValueError, match='n=9'):
    packing.unpack_codes(jnp.zeros((4, 4), jnp.uint8), 4, 9)
