"""Matrix view of the projection weights: layout and exact round trip."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cafeq_jax import quantizer
from cafeq_jax.models import config as config_lib
from cafeq_jax.models import decoder
from cafeq_jax.models import linears
from cafeq_jax.models import qlinear


@pytest.fixture(scope='module')
def model():
  cfg = config_lib.get_config('tiny_gemma2')
  return cfg, decoder.init_params(cfg, jax.random.key(0))


def test_get_linears_shapes_follow_linear_shapes(model):
  cfg, params = model
  mats = linears.get_linears(params, cfg)
  assert tuple(mats) == linears.LINEAR_NAMES
  for name, (d_in, d_out) in linears.linear_shapes(cfg).items():
    assert mats[name].shape == (cfg.num_layers, d_in, d_out), name


def test_matrix_view_computes_the_same_projection_as_the_leaf(model):
  """x @ W_q equals the q_einsum head outputs; x @ W_gate equals gating_einsum[0]."""
  cfg, params = model
  mats = linears.get_linears(params, cfg)
  layer = params['layer_1']
  x = jax.random.normal(jax.random.key(1), (3, cfg.embed_dim))
  q_heads = np.einsum('nd,hdk->nhk', x, layer['attn']['q_einsum']['w'])
  np.testing.assert_allclose(x @ mats['q'][1], q_heads.reshape(3, -1), rtol=1e-5, atol=1e-5)
  v_heads = np.einsum('nd,hdk->nhk', x, layer['attn']['kv_einsum']['w'][1])
  np.testing.assert_allclose(x @ mats['v'][1], v_heads.reshape(3, -1), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
    x @ mats['gate'][1], x @ layer['mlp']['gating_einsum'][0].T, rtol=1e-5, atol=1e-5
  )
  o_in = jax.random.normal(jax.random.key(2), (3, cfg.num_heads, cfg.head_dim))
  np.testing.assert_allclose(
    o_in.reshape(3, -1) @ mats['o'][1],
    np.einsum('nhk,hkd->nd', o_in, layer['attn']['attn_vec_einsum']['w']),
    rtol=1e-5,
    atol=1e-5,
  )


def test_set_linears_inverts_get_linears_exactly(model):
  cfg, params = model
  back = linears.set_linears(params, cfg, linears.get_linears(params, cfg))
  jax.tree.map(np.testing.assert_array_equal, back, params)


def test_set_linears_changes_only_the_named_matrix(model):
  cfg, params = model
  mats = dict(linears.get_linears(params, cfg))
  mats['up'] = mats['up'].at[2, 5, 7].set(123.0)
  new = linears.set_linears(params, cfg, mats)
  assert float(new['layer_2']['mlp']['gating_einsum'][1, 7, 5]) == 123.0
  diff = jax.tree.map(lambda a, b: int((np.asarray(a) != np.asarray(b)).sum()), new, params)
  assert sum(jax.tree.leaves(diff)) == 1


def test_set_linears_rejects_wrong_shape_and_missing_names(model):
  cfg, params = model
  mats = dict(linears.get_linears(params, cfg))
  with pytest.raises(ValueError, match=r"'down' has shape \(3, 64, 128\); expected \(3, 128, 64\)"):
    linears.set_linears(params, cfg, {**mats, 'down': jnp.swapaxes(mats['down'], 1, 2)})
  del mats['k']
  with pytest.raises(ValueError, match=r"missing \['k'\]"):
    linears.set_linears(params, cfg, mats)


def test_get_linears_uses_effective_weight_of_quantized_leaves(model):
  cfg, params = model
  spec = quantizer.QuantSpec(bits=3, group_size=32)
  leaf = params['layer_0']['mlp']['linear']
  ql = qlinear.QuantizedLinear(
    weight=quantizer.quantize(leaf, spec), transform_inv=None, shape=leaf.shape
  )
  qparams = {
    **params,
    'layer_0': {**params['layer_0'], 'mlp': {**params['layer_0']['mlp'], 'linear': ql}},
  }
  mats = linears.get_linears(qparams, cfg)
  np.testing.assert_array_equal(mats['down'][0], quantizer.quant_dequant(leaf, spec))
  np.testing.assert_array_equal(mats['down'][1], params['layer_1']['mlp']['linear'])


def test_leaves_describe_the_param_tree_layout(model):
  cfg, params = model
  assert tuple(n for leaf in linears.LEAVES for n in leaf.names) == linears.LINEAR_NAMES
  assert linears.LEAF_GROUPS == tuple(leaf.names for leaf in linears.LEAVES)
  for leaf in linears.LEAVES:
    w = linears._get_path(params['layer_0'], leaf.path)  # pylint: disable=protected-access
    assert w.shape == linears.leaf_shape(leaf.kind, cfg), leaf.kind
    for n in leaf.names:
      assert linears.LEAF_OF[n] is leaf
    m = linears.leaf_to_matrix(leaf.kind, np.asarray(w), cfg)
    assert isinstance(m, np.ndarray)  # numpy in, numpy out
    np.testing.assert_array_equal(linears.matrix_to_leaf(leaf.kind, m, cfg), w)
  with pytest.raises(ValueError, match="unknown leaf kind 'w'"):
    linears.leaf_shape('w', cfg)


def test_layer_matrices_and_set_layer_matrices_round_trip(model):
  cfg, params = model
  mats = linears.get_linears(params, cfg)
  layer = params['layer_1']
  one = linears.layer_matrices(layer, cfg)
  assert tuple(one) == linears.LINEAR_NAMES
  for n, w in one.items():
    np.testing.assert_array_equal(w, mats[n][1], err_msg=n)
  back = linears.set_layer_matrices(layer, cfg, one)
  jax.tree.map(np.testing.assert_array_equal, back, layer)
  # A leaf is replaced only when all its matrices are given; the input is not modified.
  v = one['v'].at[3, 4].set(7.0)
  same = linears.set_layer_matrices(layer, cfg, {'v': v})
  jax.tree.map(np.testing.assert_array_equal, same, layer)
  new = linears.set_layer_matrices(layer, cfg, {'k': one['k'], 'v': v})
  kv = np.asarray(new['attn']['kv_einsum']['w'])
  assert kv[1, 4 // cfg.head_dim, 3, 4 % cfg.head_dim] == 7.0
  assert int((kv != np.asarray(layer['attn']['kv_einsum']['w'])).sum()) == 1
  assert float(layer['attn']['kv_einsum']['w'][1, 0, 3, 4]) != 7.0
  assert new['mlp'] is layer['mlp']


def _some_quantized(cfg, params, spec):
  """QArrays of every matrix; transforms: none for q, one for k and another for v,
  one shared by gate and up, one only for down's first layer (o: none)."""
  mats = linears.get_linears(params, cfg)
  qarrays, tinvs = {}, {}
  key = jax.random.key(7)
  for l in range(cfg.num_layers):
    shared = None
    for n in linears.LINEAR_NAMES:
      qarrays[(l, n)] = quantizer.quantize(mats[n][l], spec)
      key, sub = jax.random.split(key)
      d_in = mats[n].shape[-2]
      t = jnp.eye(16) + 0.1 * jax.random.normal(sub, (d_in // 16, 16, 16))
      if n in ('gate', 'up'):
        shared = t if shared is None else shared
        t = shared
      tinvs[(l, n)] = {'q': None, 'o': None}.get(n, t)
    if l > 0:
      tinvs[(l, 'down')] = None
  return qarrays, tinvs


def test_quantized_params_and_quantized_matrices_are_inverses(model):
  cfg, params = model
  spec = quantizer.QuantSpec(bits=3, group_size=32)
  qarrays, tinvs = _some_quantized(cfg, params, spec)
  qp = linears.quantized_params(params, cfg, qarrays, tinvs)
  leaf = qp['layer_0']['mlp']['gating_einsum']
  assert isinstance(leaf, qlinear.QuantizedLinear) and leaf.shape == (2, 128, 64)
  assert leaf.transform_inv.shape == (4, 16, 16)  # equal blocks: stored once
  assert qp['layer_0']['attn']['kv_einsum']['w'].transform_inv.shape == (2, 4, 16, 16)
  assert qp['layer_0']['attn']['q_einsum']['w'].transform_inv is None
  back_q, back_t = linears.quantized_matrices(qp, cfg)
  assert sorted(back_q) == sorted(qarrays)
  for k, q in qarrays.items():
    for a, b in zip(jax.tree.leaves(back_q[k]), jax.tree.leaves(q)):
      np.testing.assert_array_equal(a, b, err_msg=str(k))
    assert back_q[k].spec == q.spec
    if tinvs[k] is None:
      assert back_t[k] is None, k
    else:
      np.testing.assert_array_equal(back_t[k], tinvs[k], err_msg=str(k))
  # The tree puts them back as they were, and the params are not modified.
  again = linears.quantized_params(params, cfg, back_q, back_t)
  jax.tree.map(np.testing.assert_array_equal, again, qp)
  assert not isinstance(params['layer_0']['mlp']['linear'], qlinear.QuantizedLinear)
  # Packed weights read back unpacked.
  packed_q, _ = linears.quantized_matrices(qlinear.pack_params(qp), cfg)
  for k, q in qarrays.items():
    np.testing.assert_array_equal(packed_q[k].codes, q.codes, err_msg=str(k))


def test_quantized_params_of_a_subset_keeps_the_rest_fp(model):
  cfg, params = model
  spec = quantizer.QuantSpec(bits=3, group_size=32)
  qarrays, _ = _some_quantized(cfg, params, spec)
  down = {k: q for k, q in qarrays.items() if k[1] == 'down'}
  qp = linears.quantized_params(params, cfg, down, {})
  assert isinstance(qp['layer_2']['mlp']['linear'], qlinear.QuantizedLinear)
  assert qp['layer_2']['mlp']['gating_einsum'] is params['layer_2']['mlp']['gating_einsum']
  got, tinvs = linears.quantized_matrices(qp, cfg)
  assert sorted(got) == sorted(down) and all(t is None for t in tinvs.values())
  # A missing identity transform of one matrix of a leaf becomes identity blocks.
  kv = {k: q for k, q in qarrays.items() if k[1] in ('k', 'v')}
  t = jnp.eye(16) + 0.1 * jax.random.normal(jax.random.key(9), (4, 16, 16))
  qp = linears.quantized_params(params, cfg, kv, {(0, 'k'): t})
  _, tinvs = linears.quantized_matrices(qp, cfg)
  np.testing.assert_array_equal(tinvs[(0, 'k')], t)
  np.testing.assert_array_equal(tinvs[(0, 'v')], np.broadcast_to(np.eye(16), (4, 16, 16)))
  assert tinvs[(1, 'k')] is None
  with pytest.raises(ValueError, match=r"share one leaf; got only \['k'\]"):
    linears.quantized_params(params, cfg, {k: q for k, q in kv.items() if k[1] == 'k'}, {})
