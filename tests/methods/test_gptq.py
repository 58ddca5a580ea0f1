"""Tests for cafeq_jax.methods.gptq on tiny decoder presets."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cafeq_jax import quantizer as qz
from cafeq_jax.methods import gptq
from cafeq_jax.models import config as model_config_lib
from cafeq_jax.models import decoder
from cafeq_jax.models import linears
from cafeq_jax.models import qlinear


@dataclasses.dataclass(frozen=True)
class _Config:
  spec: qz.QuantSpec = qz.QuantSpec(bits=3, group_size=32)
  matrices: tuple[str, ...] = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')
  gptq_batch_size: int = 2


def _model(name):
  cfg = model_config_lib.get_config(name)
  return cfg, decoder.init_params(cfg, jax.random.PRNGKey(0))


@pytest.mark.parametrize('name', ['tiny_llama', pytest.param('tiny_gemma2', marks=pytest.mark.slow)])
def test_captured_layer_chain_reproduces_decoder_logits_and_projection_inputs(name):
  cfg, params = _model(name)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 9), 0, cfg.vocab_size)
  x = gptq.embed(params, cfg, tokens)
  mats = linears.get_linears(params, cfg)
  for l, attn_type in enumerate(cfg.attention_types):
    layer = params[f'layer_{l}']
    # Attention output == captured o input @ o; MLP output == captured down input @ down.
    o_in = gptq.capture(layer, x, cfg, attn_type, 'o')
    xn = gptq.capture(layer, x, cfg, attn_type, 'qkv')
    pos = jnp.broadcast_to(jnp.arange(9), (2, 9))
    attn, _ = decoder.Attention(cfg, attn_type).apply({'params': layer['attn']}, xn, pos,
                                                      None, None, None)
    np.testing.assert_allclose(np.asarray(o_in @ mats['o'][l]), np.asarray(attn),
                               rtol=1e-4, atol=1e-5)
    x = gptq.capture(layer, x, cfg, attn_type, 'mid')
    fn = gptq.capture(layer, x, cfg, attn_type, 'gu')
    down_in = gptq.capture(layer, x, cfg, attn_type, 'down')
    mlp = decoder.MLP(cfg).apply({'params': layer['mlp']}, fn)
    np.testing.assert_allclose(np.asarray(down_in @ mats['down'][l]), np.asarray(mlp),
                               rtol=1e-4, atol=1e-5)
    x = gptq.capture(layer, x, cfg, attn_type, 'out')
  x = decoder.RMSNorm(cfg.norm_scale_plus_one, cfg.norm_eps).apply(
      {'params': params['final_norm']}, x)
  w_out = params['embedder']['input_embedding'].T if cfg.tie_embeddings else params[
      'unembed']['w']
  logits = x @ w_out
  if cfg.final_logit_softcap:
    logits = jnp.tanh(logits / cfg.final_logit_softcap) * cfg.final_logit_softcap
  want = decoder.forward(params, cfg, tokens)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(want), rtol=1e-4, atol=1e-4)


def test_quantize_gptq_beats_rtn_on_calibration_loss_and_runs_in_the_model():
  cfg, params = _model('tiny_llama')
  tokens = jax.random.randint(jax.random.PRNGKey(2), (4, 16), 0, cfg.vocab_size)
  qparams, report = gptq.quantize_gptq(params, cfg, _Config(), tokens)
  leaf = qparams['layer_0']['attn']['kv_einsum']['w']
  assert isinstance(leaf, qlinear.QuantizedLinear)
  total = sum(sum(v) for v in report['layer_loss'].values())
  total_rtn = sum(sum(v) for v in report['rtn_layer_loss'].values())
  assert total < 0.8 * total_rtn, (total, total_rtn)
  assert all(len(v) == cfg.num_layers for v in report['layer_loss'].values())
  logits = decoder.forward(qparams, cfg, tokens)
  assert np.isfinite(np.asarray(logits)).all()
  # The stored weights are what the report measured: dequantized leaves differ from fp.
  w_q = linears.get_linears(qparams, cfg)['down']
  w_fp = linears.get_linears(params, cfg)['down']
  assert float(jnp.abs(w_q - w_fp).max()) > 0


def test_quantize_gptq_is_deterministic_and_respects_matrices():
  cfg, params = _model('tiny_llama')
  tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 8), 0, cfg.vocab_size)
  qc = dataclasses.replace(_Config(), matrices=('gate', 'up', 'down'))
  q1, _ = gptq.gptq_qarrays(params, cfg, qc, tokens)
  q2, _ = gptq.gptq_qarrays(params, cfg, qc, tokens)
  assert set(n for _, n in q1) == {'gate', 'up', 'down'}
  for k in q1:
    np.testing.assert_array_equal(np.asarray(q1[k].codes), np.asarray(q2[k].codes))


def test_quantize_gptq_rejects_bad_tokens():
  cfg, params = _model('tiny_llama')
  with pytest.raises(ValueError, match='calib_tokens'):
    gptq.quantize_gptq(params, cfg, _Config(), jnp.zeros((8,), jnp.int32))
  with pytest.raises(ValueError, match='out of range'):
    gptq.quantize_gptq(params, cfg, _Config(), jnp.full((1, 4), 10_000, jnp.int32))


def test_sequential_gptq_under_online_transforms_minimises_the_transformed_loss():
  """With block transforms the stored codes are of ``M W`` and the model computes
  ``(x M⁻¹) V̂``: the result runs in the decoder, has the transforms' inverse in its
  leaves, and on the first layer (same inputs for both) its calibration loss is
  below RTN of ``M W`` mapped back."""
  from cafeq_jax.core import transforms
  from cafeq_jax.methods import _tree
  cfg, params = _model('tiny_llama')
  tokens = jax.random.randint(jax.random.PRNGKey(4), (4, 16), 0, cfg.vocab_size)
  qc = _Config()
  mats = linears.get_linears(params, cfg)
  blocks = {}
  for l in range(cfg.num_layers):
    for n, w in mats.items():
      m = transforms.random_hadamard_blocks(jax.random.PRNGKey(l), w.shape[-2] // 16, 16)
      blocks[(l, n)] = (m, jnp.swapaxes(m, -1, -2))
  qa, report = gptq.gptq_qarrays(params, cfg, qc, tokens, blocks=blocks)
  # Layer 0's q/k/v inputs are the same with or without quantization upstream.
  x = gptq.capture(params['layer_0'], gptq.embed(params, cfg, tokens), cfg,
                   cfg.attention_types[0], 'qkv').reshape(-1, cfg.embed_dim)
  for n in ('q', 'k', 'v'):
    m, m_inv = blocks[(0, n)]
    w = mats[n][0]
    w_hat = _tree.effective_weight(qa[(0, n)], m_inv)
    w_rtn = transforms.apply_left(m_inv, qz.quant_dequant(transforms.apply_left(m, w),
                                                           qc.spec))
    loss = lambda v: float(jnp.sum((x @ (w - v)) ** 2))
    assert loss(w_hat) < loss(w_rtn), n
    np.testing.assert_allclose(loss(w_hat), report['layer_loss'][n][0], rtol=1e-3)
  tinvs = {k: blocks[k][1] for k in qa}
  qparams = _tree.build_quantized_params(params, cfg, qa, tinvs)
  assert qparams['layer_0']['attn']['q_einsum']['w'].transform_inv is not None
  logits = decoder.forward(qparams, cfg, tokens)
  assert np.isfinite(np.asarray(logits)).all()
