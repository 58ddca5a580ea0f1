"""Matrix view of the projection weights: layout and exact round trip."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cafeq_jax import quantizer
from cafeq_jax.models import config as config_lib
from cafeq_jax.models import decoder, linears, qlinear


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
  np.testing.assert_allclose(x @ mats['gate'][1], x @ layer['mlp']['gating_einsum'][0].T,
                             rtol=1e-5, atol=1e-5)
  o_in = jax.random.normal(jax.random.key(2), (3, cfg.num_heads, cfg.head_dim))
  np.testing.assert_allclose(o_in.reshape(3, -1) @ mats['o'][1],
                             np.einsum('nhk,hkd->nd', o_in, layer['attn']['attn_vec_einsum']['w']),
                             rtol=1e-5, atol=1e-5)


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
  ql = qlinear.QuantizedLinear(weight=quantizer.quantize(leaf, spec), transform_inv=None,
                               shape=leaf.shape)
  qparams = {**params, 'layer_0': {**params['layer_0'],
                                   'mlp': {**params['layer_0']['mlp'], 'linear': ql}}}
  mats = linears.get_linears(qparams, cfg)
  np.testing.assert_array_equal(mats['down'][0], quantizer.quant_dequant(leaf, spec))
  np.testing.assert_array_equal(mats['down'][1], params['layer_1']['mlp']['linear'])
