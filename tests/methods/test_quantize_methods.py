"""End-to-end tests of methods.quantize on the tiny model presets."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cafeq_jax import methods
from cafeq_jax import models
from cafeq_jax import quantizer
from cafeq_jax.models import linears
from cafeq_jax.models import qlinear

SPEC = dict(bits=3, group_size=32)
MLP = ('gate', 'up', 'down')


@pytest.fixture(scope='module')
def tiny():
  cfg = models.get_config('tiny_llama')
  params = models.init_params(cfg, jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (1, 8), 0, cfg.vocab_size)
  return cfg, params, tokens


def _leaf(params, layer, path):
  node = params[f'layer_{layer}']
  for p in path:
    node = node[p]
  return node


def test_rtn_equals_the_quantizer_on_every_matrix(tiny):
  cfg, params, _ = tiny
  qp, report = methods.quantize(params, cfg, methods.QuantConfig(method='rtn', spec=SPEC))
  mats = linears.get_linears(params, cfg)
  kv = _leaf(qp, 0, ('attn', 'kv_einsum', 'w'))
  assert isinstance(kv, qlinear.QuantizedLinear) and kv.transform_inv is None
  for layer in range(cfg.num_layers):
    got = {'q': _leaf(qp, layer, ('attn', 'q_einsum', 'w')).weight,
           'down': _leaf(qp, layer, ('mlp', 'linear')).weight}
    for n, q in got.items():
      ref = quantizer.quantize(mats[n][layer], quantizer.QuantSpec(**SPEC))
      np.testing.assert_array_equal(np.asarray(q.codes), np.asarray(ref.codes))
      np.testing.assert_array_equal(np.asarray(q.scale), np.asarray(ref.scale))
  assert len(report.per_matrix) == 7 * cfg.num_layers
  assert report.total('final') == pytest.approx(report.total('rtn'), rel=1e-5)


def test_hadamard_stores_an_exact_online_inverse(tiny):
  # At 8 bits the quantized model must be close to fp: a wrong transform_inv is not.
  cfg, params, tokens = tiny
  qc = methods.QuantConfig(method='hadamard', spec=dict(bits=8, group_size=None),
                           block_size=32)
  qp, report = methods.quantize(params, cfg, qc, jax.random.PRNGKey(3))
  leaf = _leaf(qp, 1, ('mlp', 'gating_einsum'))
  assert leaf.transform_inv.shape[-3:] == (2, 32, 32)
  mats = linears.get_linears(params, cfg)
  np.testing.assert_allclose(np.asarray(qlinear.effective_weight(leaf)),
                             np.stack([mats['gate'][1], mats['up'][1]]), atol=2e-3)
  ref = models.forward(params, cfg, tokens)
  out = models.forward(qp, cfg, tokens)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=5e-2)
  assert 0 < report.extra['online_overhead'] < 1


def test_cafeq_single_transforms_lower_the_proxy_deterministically(tiny):
  cfg, params, tokens = tiny
  qc = methods.QuantConfig(method='cafeq', spec=SPEC, matrices=MLP, block_size=32, steps=15,
                           learning_rate=1e-2)
  qp1, rep = methods.quantize(params, cfg, qc, jax.random.PRNGKey(5))
  qp2, _ = methods.quantize(params, cfg, qc, jax.random.PRNGKey(5))
  for a, b in zip(jax.tree.leaves(qp1), jax.tree.leaves(qp2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert rep.total('final') < 0.95 * rep.total('rtn')
  assert all(v['final'] <= v['init'] * (1 + 1e-5) for v in rep.per_matrix.values())
  # Unselected matrices stay fp; the quantized model runs.
  assert not isinstance(_leaf(qp1, 0, ('attn', 'q_einsum', 'w')), qlinear.QuantizedLinear)
  out = models.forward(qp1, cfg, tokens)
  assert out.shape == (1, 8, cfg.vocab_size) and bool(jnp.all(jnp.isfinite(out)))


def test_cafeq_gptq_rounding_under_shared_transforms_runs(tiny):
  cfg, params, tokens = tiny
  qc = methods.QuantConfig(method='cafeq', spec=SPEC, matrices=('gate', 'up'), block_size=32,
                           steps=5, rounding='gptq', share_transforms=True)
  qp, rep = methods.quantize(params, cfg, qc, jax.random.PRNGKey(0))
  leaf = _leaf(qp, 0, ('mlp', 'gating_einsum'))
  assert leaf.transform_inv.shape == (2, 32, 32)  # one transform for gate and up
  assert rep.total('final') < rep.total('rtn')
  assert bool(jnp.all(jnp.isfinite(models.forward(qp, cfg, tokens))))


def test_calibration_arguments_are_checked(tiny):
  cfg, params, tokens = tiny
  with pytest.raises(ValueError, match='needs calib_tokens'):
    methods.quantize(params, cfg, methods.QuantConfig(method='gptq', spec=SPEC))
  with pytest.raises(ValueError, match='calibration-free'):
    methods.quantize(params, cfg, methods.QuantConfig(method='rtn', spec=SPEC),
                     calib_tokens=tokens)
  with pytest.raises(TypeError, match='QuantConfig'):
    methods.quantize(params, cfg, {'method': 'rtn'})
  with pytest.raises(ValueError, match='does not divide d_in=64'):
    methods.quantize(params, cfg, methods.QuantConfig(method='cafeq', spec=SPEC,
                                                      matrices=MLP, block_size=48))


def test_cafeq_selfgen_statistics_are_data_free_deterministic_and_beat_rtn(tiny):
  """statistics='selfgen': the model samples its own sequences (no text is read),
  every matrix is rounded under its Σ on them, layer by layer, under fixed Hadamard
  online transforms; same key -> same codes, and the loss on the sampled inputs is
  below RTN's."""
  cfg, params, tokens = tiny
  qc = methods.QuantConfig(method='cafeq', spec=SPEC, block_size=32, statistics='selfgen',
                           rounding='gptq', single_transform='hadamard', gptq_act_order=True,
                           selfgen_num_seqs=4, selfgen_seq_len=16)
  qp1, rep = methods.quantize(params, cfg, qc, jax.random.PRNGKey(0))
  qp2, _ = methods.quantize(params, cfg, qc, jax.random.PRNGKey(0))
  leaf1 = _leaf(qp1, 1, ('mlp', 'linear'))
  leaf2 = _leaf(qp2, 1, ('mlp', 'linear'))
  np.testing.assert_array_equal(np.asarray(leaf1.weight.codes), np.asarray(leaf2.weight.codes))
  assert leaf1.transform_inv is not None
  extra = rep.extra['selfgen']
  assert extra['tokens'] == 4 * 16
  loss = sum(sum(v) for v in extra['layer_loss'].values())
  loss_rtn = sum(sum(v) for v in extra['rtn_layer_loss'].values())
  assert loss < loss_rtn, (loss, loss_rtn)
  assert bool(jnp.all(jnp.isfinite(models.forward(qp1, cfg, tokens))))


def test_cafeq_selfgen_config_errors_name_the_problem():
  with pytest.raises(ValueError, match="rounding='gptq'"):
    methods.QuantConfig(method='cafeq', statistics='selfgen', rounding='rtn')
  with pytest.raises(ValueError, match='statistics='):
    methods.QuantConfig(method='cafeq', statistics='calibration')
  with pytest.raises(ValueError, match='selfgen_seq_len'):
    methods.QuantConfig(method='cafeq', statistics='selfgen', rounding='gptq',
                        selfgen_seq_len=1)
  with pytest.raises(ValueError, match='single_transform'):
    methods.QuantConfig(method='cafeq', single_transform='random')
