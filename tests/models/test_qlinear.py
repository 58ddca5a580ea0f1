"""QuantizedLinear: packing a quantized param tree ahead of serving, backend switch."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cafeq_jax import packing
from cafeq_jax import quantizer
from cafeq_jax.models import qlinear


def _ql(lead=(), d_in=64, d_out=48, bits=4, transform=False, seed=0):
  kw, kt = jax.random.split(jax.random.PRNGKey(seed))
  w = jax.random.normal(kw, (*lead, d_in, d_out), jnp.float32)
  q = quantizer.quantize(w, quantizer.QuantSpec(bits=bits, group_size=32))
  t = None
  if transform:
    t = jnp.eye(16) + 0.2 * jax.random.normal(kt, (d_in // 16, 16, 16))
  return qlinear.QuantizedLinear(weight=q, transform_inv=t, shape=tuple(w.shape))


def test_pack_params_packs_every_quantized_leaf_and_keeps_the_rest():
  norm = jnp.ones((64,))
  already = _ql(seed=2)
  already = already.replace(weight=packing.pack(already.weight))
  host = _ql(bits=3, seed=3)
  host = host.replace(weight=jax.tree.map(np.asarray, host.weight))
  tree = {
    'a': {'w': _ql(lead=(2,), transform=True)},
    'b': already,
    'c': host,
    'norm': {'scale': norm},
  }
  out = qlinear.pack_params(tree)
  assert out['norm']['scale'] is norm and out['b'] is already
  for name, ql in (('a', out['a']['w']), ('c', out['c'])):
    src = tree['a']['w'] if name == 'a' else tree['c']
    assert isinstance(ql.weight, packing.PackedArray), name
    assert ql.shape == src.shape and ql.matrix_shape == src.matrix_shape
    back = packing.unpack(ql.weight)  # exact: same codes, scales, zeros
    np.testing.assert_array_equal(np.asarray(back.codes), np.asarray(src.weight.codes))
    np.testing.assert_array_equal(np.asarray(back.scale), np.asarray(src.weight.scale))
  assert out['a']['w'].transform_inv is tree['a']['w'].transform_inv
  assert isinstance(out['c'].weight.data, np.ndarray)  # numpy in: packed on the host
  again = qlinear.pack_params(out)
  assert again['a']['w'].weight is out['a']['w'].weight  # idempotent


def test_pack_weight_rejects_other_types():
  with pytest.raises(TypeError, match='QArray or PackedArray; got ndarray'):
    qlinear.pack_weight(np.zeros((4, 4)))


@pytest.mark.parametrize('lead,transform', [((), False), ((2,), True)])
def test_packed_leaf_gives_the_same_outputs_on_both_backends(lead, transform):
  ql = _ql(lead=lead, transform=transform)
  packed = qlinear.pack_params(ql)
  x = jax.random.normal(jax.random.PRNGKey(5), (3, 64), jnp.float32)
  ref = np.asarray(qlinear.matmul(x, ql, backend='xla'))
  np.testing.assert_allclose(
    np.asarray(qlinear.matmul(x, packed, backend='xla')), ref, rtol=1e-6, atol=1e-6
  )
  np.testing.assert_allclose(
    np.asarray(qlinear.matmul(x, packed, backend='pallas')),
    ref,
    rtol=1e-5,
    atol=1e-5 * np.abs(ref).max(),
  )
  np.testing.assert_allclose(
    ref, np.asarray(x @ qlinear.effective_weight(ql)), rtol=1e-4, atol=1e-4 * np.abs(ref).max()
  )


def test_pallas_backend_warns_once_when_it_packs_a_qarray_per_call(caplog):
  qlinear._WARNED_PER_CALL_PACKING.clear()
  ql = _ql(seed=7)
  x = jnp.ones((2, 64), jnp.float32)
  with caplog.at_level(logging.WARNING):
    y1 = qlinear.matmul(x, ql, backend='pallas')
    y2 = qlinear.matmul(x, ql, backend='pallas')
    qlinear.matmul(x, qlinear.pack_params(ql), backend='pallas')
  messages = [r.getMessage() for r in caplog.records if 'on every call' in r.getMessage()]
  assert len(messages) == 1
  assert '(64, 48)' in messages[0] and 'pack_params' in messages[0]
  np.testing.assert_array_equal(np.asarray(y1), np.asarray(y2))
