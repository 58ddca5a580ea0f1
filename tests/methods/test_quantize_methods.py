"""End-to-end tests of ``cafeq_jax.quantize`` with real recipes on the tiny model presets.

The quantized models are checked against independent numpy recomputations: the
quantizer on each matrix, the effective weights ``M⁻¹ dequant(Q)`` rebuilt from
the stored codes, scales and transforms, and the layer losses of the report.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cafeq_jax import methods
from cafeq_jax import models
from cafeq_jax import quantizer
from cafeq_jax import recipes
from cafeq_jax.core import optimize
from cafeq_jax.core import rounding
from cafeq_jax.core import transforms
from cafeq_jax.methods import selfgen
from cafeq_jax.methods import single
from cafeq_jax.models import linears
from cafeq_jax.models import qlinear

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# pylint: disable=g-import-not-at-top,wrong-import-position
from np_reference import assert_runs_as_its_effective_weights
from np_reference import leaf as _leaf
from np_reference import np_block_apply
from np_reference import np_dequantize
from np_reference import np_effective
from np_reference import np_qkv_input

# pylint: enable=g-import-not-at-top,wrong-import-position

SPEC = quantizer.QuantSpec(bits=3, group_size=32)
SMALL = dict(bits=3, group_size=32)
MLP = ('gate', 'up', 'down')


@pytest.fixture(scope='module')
def tiny():
  cfg = models.get_config('tiny_llama')
  params = models.init_params(cfg, jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (1, 8), 0, cfg.vocab_size)
  return cfg, params, tokens


def test_rtn_equals_the_quantizer_on_every_matrix(tiny):
  cfg, params, tokens = tiny
  qp, report = methods.quantize(params, cfg, recipes.get('rtn', **SMALL))
  mats = linears.get_linears(params, cfg)
  kv = _leaf(qp, 0, ('attn', 'kv_einsum', 'w'))
  assert isinstance(kv, qlinear.QuantizedLinear) and kv.transform_inv is None
  qarrays, tinvs = linears.quantized_matrices(qp, cfg)
  assert sorted(qarrays) == sorted(
    (l, n) for l in range(cfg.num_layers) for n in linears.LINEAR_NAMES
  )
  for (l, n), q in qarrays.items():
    ref = quantizer.quantize(mats[n][l], SPEC)
    np.testing.assert_array_equal(np.asarray(q.codes), np.asarray(ref.codes), err_msg=n)
    np.testing.assert_array_equal(np.asarray(q.scale), np.asarray(ref.scale), err_msg=n)
    np.testing.assert_array_equal(np.asarray(q.zero), np.asarray(ref.zero), err_msg=n)
    assert tinvs[(l, n)] is None
    want = np.sum((np.asarray(mats[n][l], np.float64) - np_dequantize(q)) ** 2)
    assert report.per_matrix[(l, n)]['final'] == pytest.approx(want, rel=1e-4)
    assert report.per_matrix[(l, n)]['rtn'] == pytest.approx(want, rel=1e-4)
  assert len(report.per_matrix) == 7 * cfg.num_layers
  assert (report.method, report.spec) == ('rtn', 'w3g32asym')
  assert report.extra['online_overhead'] == 0 and report.extra['block_size'] is None
  assert_runs_as_its_effective_weights(qp, params, cfg, tokens)


def test_hadamard_stores_an_exact_online_inverse(tiny):
  # At 8 bits the quantized model must be close to fp: a wrong transform_inv is not.
  cfg, params, tokens = tiny
  recipe = recipes.get('hadamard', bits=8, group_size=None, transform__block_size=32)
  qp, report = methods.quantize(params, cfg, recipe, jax.random.PRNGKey(3))
  leaf = _leaf(qp, 1, ('mlp', 'gating_einsum'))
  t = np.asarray(leaf.transform_inv, np.float64)
  assert t.shape == (2, 2, 32, 32)  # gate and up: one transform each (share=False)
  # Each block is a signed Hadamard matrix / sqrt(k): orthogonal, entries ±1/sqrt(32).
  np.testing.assert_allclose(np.abs(t), 32**-0.5, rtol=1e-6)
  np.testing.assert_allclose(
    np.einsum('...ij,...kj->...ik', t, t), np.broadcast_to(np.eye(32), t.shape), atol=1e-6
  )
  mats = linears.get_linears(params, cfg)
  np.testing.assert_allclose(
    np_effective(leaf), np.stack([mats['gate'][1], mats['up'][1]]), atol=2e-3
  )
  ref = models.forward(params, cfg, tokens)
  out = models.forward(qp, cfg, tokens)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=5e-2)
  assert_runs_as_its_effective_weights(qp, params, cfg, tokens)
  # Overhead: every x M⁻¹ costs d_in * k MACs against d_in * d_out for x W.
  shapes = linears.linear_shapes(cfg).values()
  want = sum(d_in * 32 for d_in, _ in shapes) / sum(d_in * d_out for d_in, d_out in shapes)
  assert report.extra['online_overhead'] == pytest.approx(want)
  assert report.extra['block_size'] == 32
  # The signs come from the key.
  other, _ = methods.quantize(params, cfg, recipe, jax.random.PRNGKey(4))
  assert not np.array_equal(
    np.asarray(other['layer_1']['mlp']['gating_einsum'].transform_inv),
    np.asarray(leaf.transform_inv),
  )


def test_cafeq_single_transforms_lower_the_proxy_deterministically(tiny):
  cfg, params, tokens = tiny
  recipe = recipes.get(
    'cafeq-single',
    **SMALL,
    matrices=('gate', 'up'),
    transform__block_size=32,
    transform__steps=15,
    transform__learning_rate=1e-2,
  )
  qp1, rep = methods.quantize(params, cfg, recipe, jax.random.PRNGKey(5))
  qp2, _ = methods.quantize(params, cfg, recipe, jax.random.PRNGKey(5))
  for a, b in zip(jax.tree.leaves(qp1), jax.tree.leaves(qp2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert rep.total('final') < 0.95 * rep.total('rtn')
  assert all(v['final'] <= v['init'] * (1 + 1e-5) for v in rep.per_matrix.values())
  # The report's proxy is ||W - M⁻¹ dequant(Q)||² of the stored leaves.
  mats = linears.get_linears(params, cfg)
  up = np_effective(_leaf(qp1, 1, ('mlp', 'gating_einsum')))[1]
  want = np.sum((np.asarray(mats['up'][1], np.float64) - up) ** 2)
  assert rep.per_matrix[(1, 'up')]['final'] == pytest.approx(want, rel=1e-4)
  # Unselected matrices stay fp (the very arrays); the quantized model runs.
  for path in (('attn', 'q_einsum', 'w'), ('mlp', 'linear')):
    assert _leaf(qp1, 0, path) is _leaf(params, 0, path)
  assert sorted(rep.per_matrix) == sorted((l, n) for l in range(2) for n in ('gate', 'up'))
  assert_runs_as_its_effective_weights(qp1, params, cfg, tokens)


def test_gptq_under_shared_learned_transforms_equals_rtn_of_the_transformed_matrix(tiny):
  """Without right scales ``M = D1 R``, so ``H = M⁻ᵀ M⁻¹ = D1⁻²`` is diagonal: the
  error feedback vanishes and Frobenius GPTQ-form rounding gives RTN's codes."""
  cfg, params, tokens = tiny
  config = optimize.TransformConfig(block_size=32, steps=5, parameterization='rotation')
  learned = recipes.Learned(config=config, share=True)
  recipe = recipes.Recipe(
    spec=SPEC, matrices=('gate', 'up'), transform=learned, rounding=recipes.GPTQ()
  )
  qp, rep = methods.quantize(params, cfg, recipe, jax.random.PRNGKey(0))
  leaf = _leaf(qp, 0, ('mlp', 'gating_einsum'))
  assert leaf.transform_inv.shape == (2, 32, 32)  # one transform for gate and up
  assert rep.total('final') < rep.total('rtn')
  qp_rtn, _ = methods.quantize(
    params, cfg, recipe.replace(rounding=recipes.RTN()), jax.random.PRNGKey(0)
  )
  for a, b in zip(jax.tree.leaves(qp), jax.tree.leaves(qp_rtn)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert_runs_as_its_effective_weights(qp, params, cfg, tokens)


def _random_blocks(key, n, nb, k, orthogonal):
  if orthogonal:
    m = transforms.random_hadamard_blocks(key, nb, k, (n,))
    return m, jnp.swapaxes(m, -1, -2)
  m = jnp.eye(k) + 0.3 * jax.random.normal(key, (n, nb, k, k))
  return m, jnp.linalg.inv(m)


@pytest.mark.parametrize('act_order', [False, True])
def test_round_matrices_gptq_rounds_mw_under_the_transform_gram(act_order):
  """Frobenius GPTQ of ``V = M W`` under ``H = M⁻ᵀ M⁻¹`` with the stage's damping and
  act order (act order used to be dropped here), against ``core.rounding`` directly."""
  w = jax.random.normal(jax.random.PRNGKey(0), (2, 64, 32))
  m, m_inv = _random_blocks(jax.random.PRNGKey(1), 2, 4, 16, orthogonal=False)
  blocks = {(l, 'down'): (m[l], m_inv[l]) for l in range(2)}
  stage = recipes.GPTQ(damp=0.05, act_order=act_order, block=32)
  qa, tinvs = single.round_matrices({'down': w}, {'down': [0, 1]}, blocks, SPEC, stage)
  for l in range(2):
    v = np_block_apply(m[l], w[l])
    t = np.asarray(transforms.block_diag(m_inv[l]), np.float64)
    want = rounding.gptq_round(
      jnp.asarray(v, jnp.float32),
      jnp.asarray(t.T @ t, jnp.float32),
      SPEC,
      damp=0.05,
      block=32,
      act_order=act_order,
    )
    np.testing.assert_array_equal(np.asarray(qa[(l, 'down')].codes), np.asarray(want.codes))
    np.testing.assert_array_equal(np.asarray(tinvs[(l, 'down')]), np.asarray(m_inv[l]))
  flipped, _ = single.round_matrices(
    {'down': w},
    {'down': [0, 1]},
    blocks,
    SPEC,
    recipes.GPTQ(damp=0.05, act_order=not act_order, block=32),
  )
  assert not np.array_equal(
    np.asarray(flipped[(0, 'down')].codes), np.asarray(qa[(0, 'down')].codes)
  )


def test_round_matrices_gptq_under_orthogonal_transforms_is_rtn():
  # H = M⁻ᵀ M⁻¹ = I: no error feedback, any damping or order gives RTN of M W.
  w = jax.random.normal(jax.random.PRNGKey(2), (2, 64, 32))
  m, m_inv = _random_blocks(jax.random.PRNGKey(3), 2, 2, 32, orthogonal=True)
  blocks = {(l, 'down'): (m[l], m_inv[l]) for l in range(2)}
  for stage in (recipes.GPTQ(), recipes.GPTQ(damp=0.5, act_order=True)):
    qa, _ = single.round_matrices({'down': w}, {'down': [0, 1]}, blocks, SPEC, stage)
    for l in range(2):
      ref = quantizer.quantize(transforms.apply_left(m[l], w[l]), SPEC)
      np.testing.assert_array_equal(np.asarray(qa[(l, 'down')].codes), np.asarray(ref.codes))
  with pytest.raises(ValueError, match='needs methods.sequential.round_sequential'):
    single.round_matrices(
      {'down': w}, {'down': [0]}, {}, SPEC, recipes.GPTQ(statistics=recipes.SelfGenerated())
    )


def test_quantize_arguments_are_checked(tiny):
  cfg, params, tokens = tiny
  with pytest.raises(ValueError, match='needs calib_tokens'):
    methods.quantize(params, cfg, recipes.get('gptq', **SMALL))
  with pytest.raises(ValueError, match='calibration-free'):
    methods.quantize(params, cfg, recipes.get('rtn', **SMALL), calib_tokens=tokens)
  with pytest.raises(TypeError, match=r'recipe must be a cafeq_jax.recipes.Recipe.*got dict'):
    methods.quantize(params, cfg, {'method': 'rtn'})
  with pytest.raises(ValueError, match='block_size=48 does not divide d_in=64'):
    methods.quantize(
      params, cfg, recipes.get('cafeq-single', **SMALL, matrices=MLP, transform__block_size=48)
    )
  with pytest.raises(ValueError, match='block_size=128 does not divide d_in=64'):
    methods.quantize(params, cfg, recipes.get('hadamard', **SMALL, transform__block_size=128))


def test_cafeq_sg_statistics_are_self_generated_deterministic_and_beat_rtn(tiny):
  """The model samples its own sequences (no text is read); every matrix is rounded
  under its Σ on them, layer by layer, behind shared Hadamard online transforms; same
  key -> same codes; layer 0's q loss is ||X(W - Ŵ)||² on exactly those tokens."""
  cfg, params, tokens = tiny
  recipe = recipes.get(
    'cafeq-sg', **SMALL, transform__block_size=32, statistics__num_seqs=4, statistics__seq_len=12
  )
  key = jax.random.PRNGKey(0)
  qp1, rep = methods.quantize(params, cfg, recipe, key)
  qp2, _ = methods.quantize(params, cfg, recipe, key)
  for a, b in zip(jax.tree.leaves(qp1), jax.tree.leaves(qp2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert _leaf(qp1, 1, ('mlp', 'gating_einsum')).transform_inv.shape == (2, 32, 32)
  extra = rep.extra['sequential']
  assert extra['source'] == 'SelfGenerated' and extra['tokens'] == 4 * 12
  loss = sum(sum(v) for v in extra['layer_loss'].values())
  loss_rtn = sum(sum(v) for v in extra['rtn_layer_loss'].values())
  assert loss < loss_rtn, (loss, loss_rtn)
  # The sequences: sampled by the fp model from token 0 with the key folded with 2.
  toks = selfgen.sample_tokens(params, cfg, recipe.statistics, jax.random.fold_in(key, 2))
  assert toks.shape == (4, 12) and np.all(toks[:, 0] == 0)
  x = np_qkv_input(params, cfg, toks)
  w = np.asarray(linears.get_linears(params, cfg)['q'][0], np.float64)
  w_hat = np_effective(_leaf(qp1, 0, ('attn', 'q_einsum', 'w')))
  want = np.sum((x @ (w - w_hat)) ** 2)
  assert extra['layer_loss']['q'][0] == pytest.approx(want, rel=1e-3)
  assert_runs_as_its_effective_weights(qp1, params, cfg, tokens)


def test_uniform_first_tokens_start_each_sequence_at_a_random_id(tiny):
  cfg, params, _ = tiny
  stage = recipes.SelfGenerated(num_seqs=16, seq_len=5, first='uniform')
  toks = selfgen.sample_tokens(params, cfg, stage, jax.random.PRNGKey(3))
  again = selfgen.sample_tokens(params, cfg, stage, jax.random.PRNGKey(3))
  np.testing.assert_array_equal(toks, again)
  assert toks.shape == (16, 5) and len(set(toks[:, 0].tolist())) > 8
  assert toks.min() >= 0 and toks.max() < cfg.vocab_size
  fixed = selfgen.sample_tokens(
    params, cfg, recipes.SelfGenerated(num_seqs=16, seq_len=5), jax.random.PRNGKey(3)
  )
  assert np.all(fixed[:, 0] == 0)
  with pytest.raises(ValueError, match="statistics.first='random' is not supported"):
    recipes.SelfGenerated(first='random')
