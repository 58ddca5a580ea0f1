"""The sequential engine (``methods.sequential``): GPTQ-form rounding under captured Σ.

Calibration GPTQ and CafeQ's self-generated statistics both run through it; the
inputs of every matrix come from the decoder's own sub-layer methods and sows.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cafeq_jax import methods
from cafeq_jax import quantizer as qz
from cafeq_jax import recipes
from cafeq_jax.core import optimize
from cafeq_jax.core import transforms
from cafeq_jax.methods import sequential
from cafeq_jax.models import config as model_config_lib
from cafeq_jax.models import decoder
from cafeq_jax.models import linears
from cafeq_jax.models import qlinear

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# pylint: disable=g-import-not-at-top,wrong-import-position
from np_reference import assert_runs_as_its_effective_weights
from np_reference import np_dequantize
from np_reference import np_qkv_input

# pylint: enable=g-import-not-at-top,wrong-import-position

SPEC = qz.QuantSpec(bits=3, group_size=32)
Block = decoder.Block


def _model(name):
  cfg = model_config_lib.get_config(name)
  return cfg, decoder.init_params(cfg, jax.random.PRNGKey(0))


@pytest.mark.parametrize(
  'name', ['tiny_llama', pytest.param('tiny_gemma2', marks=pytest.mark.slow)]
)
def test_sublayer_methods_chain_to_the_logits_and_second_moments_are_their_sown_inputs(name):
  cfg, params = _model(name)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 9), 0, cfg.vocab_size)
  pos = jnp.broadcast_to(jnp.arange(9), (2, 9))
  mats = linears.get_linears(params, cfg)
  x = decoder.embed_tokens(params['embedder']['input_embedding'], tokens, cfg)
  grams = {n: [] for n in linears.LINEAR_NAMES}
  sown_o, sown_down = decoder.LINEAR_INPUTS['o'], decoder.LINEAR_INPUTS['down']
  for l, attn_type in enumerate(cfg.attention_types):
    block, v = Block(cfg, attn_type), {'params': params[f'layer_{l}']}
    xn = block.apply(v, x, method=Block.attention_input)
    (x_mid, _), st = block.apply(v, x, pos, method=Block.attend, mutable=['intermediates'])
    sown = st['intermediates']['attn']
    np.testing.assert_array_equal(np.asarray(sown['qkv_input'][0]), np.asarray(xn))
    # Attention output == sown o input @ o.
    attn, _ = decoder.Attention(cfg, attn_type).apply(
      {'params': v['params']['attn']}, xn, pos, None, None, None
    )
    o_in = sown['o_input'][0]
    # What the engine reads for o: that input, without the rest of the sub-layer.
    np.testing.assert_allclose(
      np.asarray(sequential._sown_input(v['params'], x, cfg, attn_type, Block.attend, sown_o)),
      np.asarray(o_in),
      rtol=1e-6,
      atol=1e-7,
    )
    np.testing.assert_allclose(
      np.asarray(o_in @ mats['o'][l]), np.asarray(attn), rtol=1e-4, atol=1e-5
    )
    fn = block.apply(v, x_mid, method=Block.mlp_input)
    x, st = block.apply(v, x_mid, method=Block.feed_forward, mutable=['intermediates'])
    sown_mlp = st['intermediates']['mlp']
    np.testing.assert_array_equal(np.asarray(sown_mlp['gating_input'][0]), np.asarray(fn))
    # MLP output == sown down input @ down.
    mlp = decoder.MLP(cfg).apply({'params': v['params']['mlp']}, fn)
    down_in = sown_mlp['down_input'][0]
    np.testing.assert_allclose(
      np.asarray(
        sequential._sown_input(v['params'], x_mid, cfg, attn_type, Block.feed_forward, sown_down)
      ),
      np.asarray(down_in),
      rtol=1e-6,
      atol=1e-7,
    )
    np.testing.assert_allclose(
      np.asarray(down_in @ mats['down'][l]), np.asarray(mlp), rtol=1e-4, atol=1e-5
    )
    for names, a in (
      (('q', 'k', 'v'), xn),
      (('o',), o_in),
      (('gate', 'up'), fn),
      (('down',), down_in),
    ):
      a = np.asarray(a, np.float64).reshape(-1, a.shape[-1])
      for n in names:
        grams[n].append(a.T @ a / a.shape[0])
  x = decoder.RMSNorm(cfg.norm_scale_plus_one, cfg.norm_eps).apply(
    {'params': params['final_norm']}, x
  )
  w_out = params['embedder']['input_embedding'].T if cfg.tie_embeddings else params['unembed']['w']
  logits = x @ w_out
  if cfg.final_logit_softcap:
    logits = jnp.tanh(logits / cfg.final_logit_softcap) * cfg.final_logit_softcap
  want = decoder.forward(params, cfg, tokens)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(want), rtol=1e-4, atol=1e-4)
  # The engine's second moments (one batch per sequence) are those of the sown inputs.
  hs = sequential.input_second_moments(params, cfg, tokens, batch_size=1)
  for n in linears.LINEAR_NAMES:
    np.testing.assert_allclose(
      np.asarray(hs[n]), np.stack(grams[n]), rtol=1e-4, atol=1e-6, err_msg=n
    )


def test_calibration_gptq_beats_rtn_and_its_report_measures_the_stored_weights():
  cfg, params = _model('tiny_llama')
  tokens = jax.random.randint(jax.random.PRNGKey(2), (4, 16), 0, cfg.vocab_size)
  recipe = recipes.get('gptq', bits=3, group_size=32, statistics__batch_size=2)
  qparams, rep = methods.quantize(params, cfg, recipe, calib_tokens=tokens)
  leaf = qparams['layer_0']['attn']['kv_einsum']['w']
  assert isinstance(leaf, qlinear.QuantizedLinear) and leaf.transform_inv is None
  report = rep.extra['sequential']
  assert report['source'] == 'Calibration' and report['tokens'] == 64
  total = sum(sum(v) for v in report['layer_loss'].values())
  total_rtn = sum(sum(v) for v in report['rtn_layer_loss'].values())
  assert total < 0.8 * total_rtn, (total, total_rtn)
  assert all(len(v) == cfg.num_layers for v in report['layer_loss'].values())
  # Layer 0's q/k/v read the normed embeddings whatever is quantized: the reported
  # losses are ||X(W - Ŵ)||² of the stored codes and of RTN, recomputed in numpy.
  x = np_qkv_input(params, cfg, tokens)
  mats = linears.get_linears(params, cfg)
  qarrays, _ = linears.quantized_matrices(qparams, cfg)
  for n in ('q', 'k', 'v'):
    w = np.asarray(mats[n][0], np.float64)
    got = np.sum((x @ (w - np_dequantize(qarrays[(0, n)]))) ** 2)
    rtn = np.sum((x @ (w - np_dequantize(qz.quantize(mats[n][0], SPEC)))) ** 2)
    assert report['layer_loss'][n][0] == pytest.approx(got, rel=1e-3), n
    assert report['rtn_layer_loss'][n][0] == pytest.approx(rtn, rel=1e-3), n
    assert got < rtn, n
  # quantize() is the engine: the same codes from round_sequential directly.
  direct, _ = sequential.round_sequential(
    params,
    cfg,
    tokens,
    spec=recipe.spec,
    matrices=recipe.matrices,
    rounding_stage=recipe.rounding,
    batch_size=2,
  )
  for k, q in direct.items():
    np.testing.assert_array_equal(np.asarray(q.codes), np.asarray(qarrays[k].codes), err_msg=k)
  assert_runs_as_its_effective_weights(qparams, params, cfg, tokens[:1, :8])


def test_round_sequential_is_deterministic_and_respects_matrices():
  cfg, params = _model('tiny_llama')
  tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 8), 0, cfg.vocab_size)
  kw = dict(spec=SPEC, matrices=('gate', 'up', 'down'), rounding_stage=recipes.GPTQ(), batch_size=2)
  q1, rep = sequential.round_sequential(params, cfg, tokens, **kw)
  q2, _ = sequential.round_sequential(params, cfg, tokens, **kw)
  assert set(n for _, n in q1) == {'gate', 'up', 'down'}
  assert sorted(rep['layer_loss']) == ['down', 'gate', 'up']
  for k in q1:
    np.testing.assert_array_equal(np.asarray(q1[k].codes), np.asarray(q2[k].codes))
  with pytest.raises(ValueError, match='share one param leaf'):
    sequential.round_sequential(params, cfg, tokens, **{**kw, 'matrices': ('gate',)})
  with pytest.raises(ValueError, match=r"unknown matrices \['mlp'\]"):
    sequential.input_second_moments(params, cfg, tokens, matrices=('mlp',))


def test_bad_tokens_are_refused_naming_the_problem():
  cfg, params = _model('tiny_llama')
  recipe = recipes.get('gptq', bits=3, group_size=32)
  with pytest.raises(
    ValueError, match=r'tokens must be \(num_seqs, seq_len\) ints; got shape \(8,\)'
  ):
    methods.quantize(params, cfg, recipe, calib_tokens=jnp.zeros((8,), jnp.int32))
  with pytest.raises(ValueError, match=r'token ids must lie in \[0, 128\); got \[10000, 10000\]'):
    methods.quantize(params, cfg, recipe, calib_tokens=jnp.full((1, 4), 10_000, jnp.int32))
  with pytest.raises(ValueError, match='integer ids; got dtype float32'):
    sequential.check_tokens(np.zeros((1, 4), np.float32), cfg)
  with pytest.raises(ValueError, match='got shape'):
    sequential.check_tokens(np.zeros((0, 4), np.int32), cfg)
  np.testing.assert_array_equal(
    sequential.check_tokens(np.ones((2, 3), np.int64), cfg), np.ones((2, 3), np.int32)
  )


def test_sequential_rounding_under_online_transforms_minimises_the_transformed_loss():
  """With block transforms the stored codes are of ``M W`` and the model computes
  ``(x M⁻¹) V̂``: the result runs in the decoder as its effective weights, and on the
  first layer (same inputs for both) its calibration loss is below RTN of ``M W``
  mapped back."""
  cfg, params = _model('tiny_llama')
  tokens = jax.random.randint(jax.random.PRNGKey(4), (4, 16), 0, cfg.vocab_size)
  mats = linears.get_linears(params, cfg)
  blocks = {}
  for l in range(cfg.num_layers):
    for n, w in mats.items():
      m = transforms.random_hadamard_blocks(jax.random.PRNGKey(l), w.shape[-2] // 16, 16)
      blocks[(l, n)] = (m, jnp.swapaxes(m, -1, -2))
  qa, report = sequential.round_sequential(
    params,
    cfg,
    tokens,
    spec=SPEC,
    matrices=linears.LINEAR_NAMES,
    rounding_stage=recipes.GPTQ(),
    batch_size=2,
    blocks=blocks,
  )
  x = np_qkv_input(params, cfg, tokens)
  for n in ('q', 'k', 'v'):
    m, m_inv = blocks[(0, n)]
    w = np.asarray(mats[n][0], np.float64)
    w_hat = np.asarray(transforms.apply_left(m_inv, qz.dequantize(qa[(0, n)])), np.float64)
    w_rtn = np.asarray(
      transforms.apply_left(m_inv, qz.quant_dequant(transforms.apply_left(m, mats[n][0]), SPEC)),
      np.float64,
    )
    loss = lambda v: float(np.sum((x @ (w - v)) ** 2))
    assert loss(w_hat) < loss(w_rtn), n
    np.testing.assert_allclose(loss(w_hat), report['layer_loss'][n][0], rtol=1e-3)
  tinvs = {k: blocks[k][1] for k in qa}
  qparams = linears.quantized_params(params, cfg, qa, tinvs)
  np.testing.assert_array_equal(
    np.asarray(qparams['layer_0']['attn']['q_einsum']['w'].transform_inv),
    np.asarray(blocks[(0, 'q')][1]),
  )
  assert_runs_as_its_effective_weights(qparams, params, cfg, tokens[:1, :8])


def _weighted_rtn_loss(w, m, m_inv, sigma):
  """tr(Eᵀ Σ E), E = W - M⁻¹ RTN(M W), in float64 (Σ ``(d, d)``)."""
  v_hat = qz.quant_dequant(transforms.apply_left(m, jnp.asarray(w, jnp.float32)), SPEC)
  e = np.asarray(w, np.float64) - np.asarray(transforms.apply_left(m_inv, v_hat), np.float64)
  return float(np.trace(e.T @ sigma @ e))


def test_input_weighted_learned_transforms_lower_the_loss_they_are_weighted_by():
  """``Learned(loss='input')`` learns each ``M`` on ``tr(Eᵀ Σ_bd E)`` with Σ of the
  rounding's tokens (here calibration tokens, fp model): on layer 0's q (input
  computed in numpy, a few channels made dominant) its transform beats RTN and the
  Frobenius-learned transform on that objective; the run is deterministic and the
  model runs as its effective weights."""
  cfg, params = _model('tiny_llama')
  scale = params['layer_0']['pre_attention_norm']['scale']
  params = jax.tree.map(lambda x: x, params)
  params['layer_0']['pre_attention_norm']['scale'] = scale.at[::7].mul(8.0)
  tokens = jax.random.randint(jax.random.PRNGKey(5), (4, 16), 0, cfg.vocab_size)
  tc = optimize.TransformConfig(block_size=16, steps=60)
  rounding = recipes.GPTQ(statistics=recipes.Calibration(batch_size=2))

  def run(loss):
    r = recipes.Recipe(
      spec=SPEC, transform=recipes.Learned(config=tc, loss=loss), rounding=rounding
    )
    return methods.quantize(params, cfg, r, jax.random.PRNGKey(0), calib_tokens=tokens)

  (qw, rep), (qf, _) = run('input'), run('frobenius')
  assert rep.timings['input_statistics'] > 0
  x = np_qkv_input(params, cfg, tokens)
  sigma = x.T @ x / x.shape[0]
  k, d = 16, sigma.shape[0]
  bd = np.zeros_like(sigma)  # the k x k diagonal blocks, as the loss reads them
  for j in range(d // k):
    bd[j * k : (j + 1) * k, j * k : (j + 1) * k] = sigma[j * k : (j + 1) * k, j * k : (j + 1) * k]
  w = linears.get_linears(params, cfg)['q'][0]

  def loss_of(qparams):
    m_inv = jnp.asarray(qparams['layer_0']['attn']['q_einsum']['w'].transform_inv, jnp.float32)
    return _weighted_rtn_loss(w, jnp.linalg.inv(m_inv), m_inv, bd)

  eye = jnp.broadcast_to(jnp.eye(k), (d // k, k, k))
  rtn = _weighted_rtn_loss(w, eye, eye, bd)
  assert loss_of(qw) < 0.5 * rtn
  assert loss_of(qw) < 0.8 * loss_of(qf)  # 0.27 vs 0.44 of RTN when written
  again, _ = run('input')
  for a, b in zip(jax.tree.leaves(qw), jax.tree.leaves(again)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert_runs_as_its_effective_weights(qw, params, cfg, tokens[:1, :8])
