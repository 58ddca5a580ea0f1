"""GPTQ baseline over a model's param tree (calibration activations; comparison only).

Sequential, as the GPTQ reference implementation: layers are quantized in order and
each layer's calibration inputs come from the model whose earlier layers are
already quantized. Within a layer it is also "true-sequential": q/k/v are
quantized from the normed block input; the output projection's inputs are then
recomputed with the quantized q/k/v; the MLP input with the quantized attention;
the down projection's inputs with the quantized gate/up. Activations are
captured by running the decoder's own modules (``models.decoder.RMSNorm``,
``Attention``, ``MLP``, ``Block``) on one layer's params; the input of a final
projection is obtained without a hook in the decoder: ``o``'s by applying the
attention module with ``o`` replaced by column selections of the identity,
``down``'s as ``act(x W_gate) * (x W_up)`` through ``decoder.project``.

Settings read from the ``QuantConfig`` (``getattr`` with defaults): ``spec``,
``matrices``, ``gptq_damp`` (0.01), ``gptq_act_order`` (False), ``gptq_block``
(128), ``gptq_batch_size`` (sequences per forward chunk, 8).

Online transforms. ``gptq_qarrays(..., blocks=)`` takes block-diagonal transforms
``(M, M⁻¹)`` per ``(layer, name)`` (``methods.single.transforms_for``): the stored
matrix is ``V = M W`` and the model computes ``(x M⁻¹) V̂``, so ``V`` is rounded
under ``H_V = M⁻ᵀ H M⁻¹`` (the same layer loss ``||X (W - M⁻¹V̂)||²``) and the
later stages see ``M⁻¹ V̂``.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cafeq_jax import quantizer as qz
from cafeq_jax.core import gptq as gptq_core
from cafeq_jax.core import transforms
from cafeq_jax.models import decoder
from cafeq_jax.models import linears

_HI = jax.lax.Precision.HIGHEST
_ALL = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')


def _norm(cfg, scale, x):
  return decoder.RMSNorm(cfg.norm_scale_plus_one, cfg.norm_eps).apply(
      {'params': scale}, x)


def _attn(cfg, attn_type, attn_params, x, positions):
  out, _ = decoder.Attention(cfg, attn_type).apply(
      {'params': attn_params}, x, positions, None, None, None)
  return out


def _mlp(cfg, mlp_params, x):
  return decoder.MLP(cfg).apply({'params': mlp_params}, x)


@functools.partial(jax.jit, static_argnames=('cfg', 'attn_type', 'stage'))
def capture(layer: dict, x: jax.Array, cfg, attn_type: str, stage: str) -> jax.Array:
  """Activations of one layer; ``x`` is the block input for 'qkv', 'o' and 'mid' and
  the residual after attention (``x_mid``, from 'mid') for 'gu', 'down' and 'out'.

  ``stage``: 'qkv' -> normed block input ``(B, S, D)`` (input of q, k, v); 'o' ->
  attention output before ``o`` ``(B, S, H*hd)``; 'mid' -> ``x_mid`` = block input
  plus the (post-normed) attention output; 'gu' -> normed MLP input ``(B, S, D)``
  (input of gate, up); 'down' -> ``act(gate) * up`` ``(B, S, F)``; 'out' -> the
  layer's output ``(B, S, D)``.
  """
  B, S, _ = x.shape
  positions = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
  H, hd = cfg.num_heads, cfg.head_dim
  if stage in ('qkv', 'o', 'mid'):
    xn = _norm(cfg, layer['pre_attention_norm'], x)
    if stage == 'qkv':
      return xn
    if stage == 'o':
      # The attention module ends with ``o``; running it with ``o`` replaced by
      # column selections of the identity (shape (H, hd, D), as the module checks)
      # returns the o input, D coordinates per pass.
      n, d = H * hd, cfg.embed_dim
      eye = jnp.eye(n, -(-n // d) * d, dtype=jnp.float32)
      parts = []
      for p in range(0, n, d):
        sel = eye[:, p:p + d].reshape(H, hd, d)
        parts.append(_attn(cfg, attn_type, dict(layer['attn'], attn_vec_einsum={'w': sel}),
                           xn, positions))
      return jnp.concatenate(parts, axis=-1)[..., :n]
    h = _attn(cfg, attn_type, layer['attn'], xn, positions)
    if cfg.use_post_norms:
      h = _norm(cfg, layer['post_attention_norm'], h)
    return x + h
  fn = _norm(cfg, layer['pre_ffw_norm'], x)
  if stage == 'gu':
    return fn
  if stage == 'down':
    gate, up = decoder.project(fn, layer['mlp']['gating_einsum'], 'gating', cfg)
    act = (jax.nn.gelu(gate, approximate=True) if cfg.activation == 'gelu_tanh'
           else jax.nn.silu(gate))
    return act * up
  if stage != 'out':
    raise ValueError(
        f"stage={stage!r}; expected 'qkv', 'o', 'mid', 'gu', 'down' or 'out'.")
  h = _mlp(cfg, layer['mlp'], fn)
  if cfg.use_post_norms:
    h = _norm(cfg, layer['post_ffw_norm'], h)
  return x + h


@functools.partial(jax.jit, static_argnames=('cfg', 'attn_type', 'stage'))
def _stage(layer: dict, x: jax.Array, cfg, attn_type: str, stage: str):
  """``XᵀX`` of the stage's captured inputs (or the hidden states for 'mid'/'out')."""
  a = capture(layer, x, cfg, attn_type, stage)
  return a if stage in ('mid', 'out') else gptq_core.hessian(a)


def _run_stage(layer, xs, cfg, attn_type, stage, batch):
  """Sums a stage's Hessians (or concatenates hidden states) over chunks of ``xs``."""
  h, outs = None, []
  for i in range(0, xs.shape[0], batch):
    r = _stage(layer, xs[i:i + batch], cfg, attn_type, stage)
    if stage in ('mid', 'out'):
      outs.append(r)
    else:
      h = r if h is None else h + r
  return jnp.concatenate(outs) if stage in ('mid', 'out') else h


def _layer_matrices(layer: dict, cfg) -> dict[str, jax.Array]:
  m = {}
  m['q'] = linears.leaf_to_matrix('q_einsum', layer['attn']['q_einsum']['w'], cfg)
  kv = linears.leaf_to_matrix('kv_einsum', layer['attn']['kv_einsum']['w'], cfg)
  m['k'], m['v'] = kv[0], kv[1]
  m['o'] = linears.leaf_to_matrix('attn_vec_einsum', layer['attn']['attn_vec_einsum']['w'], cfg)
  gu = linears.leaf_to_matrix('gating_einsum', layer['mlp']['gating_einsum'], cfg)
  m['gate'], m['up'] = gu[0], gu[1]
  m['down'] = linears.leaf_to_matrix('linear', layer['mlp']['linear'], cfg)
  return {n: jnp.asarray(w, jnp.float32) for n, w in m.items()}


def _set_layer(layer: dict, cfg, m: dict[str, jax.Array]) -> dict:
  layer = jax.tree.map(lambda x: x, layer)  # shallow structural copy
  layer['attn'] = dict(layer['attn'])
  layer['mlp'] = dict(layer['mlp'])
  layer['attn']['q_einsum'] = {'w': linears.matrix_to_leaf('q_einsum', m['q'], cfg)}
  layer['attn']['kv_einsum'] = {
      'w': linears.matrix_to_leaf('kv_einsum', jnp.stack([m['k'], m['v']]), cfg)}
  layer['attn']['attn_vec_einsum'] = {
      'w': linears.matrix_to_leaf('attn_vec_einsum', m['o'], cfg)}
  layer['mlp']['gating_einsum'] = linears.matrix_to_leaf(
      'gating_einsum', jnp.stack([m['gate'], m['up']]), cfg)
  layer['mlp']['linear'] = linears.matrix_to_leaf('linear', m['down'], cfg)
  return layer


def embed(params: dict, cfg, tokens: jax.Array) -> jax.Array:
  """Input embeddings ``(B, S, D)`` float32 as the decoder computes them."""
  x = jnp.asarray(params['embedder']['input_embedding'], jnp.float32)[tokens]
  if cfg.scale_embeddings:
    x = x * jnp.sqrt(jnp.float32(cfg.embed_dim))
  return x


_STAGES = (('qkv', ('q', 'k', 'v')), ('o', ('o',)), ('gu', ('gate', 'up')),
           ('down', ('down',)))


@jax.jit
def _transform_hessian(h: jax.Array, m_inv: jax.Array) -> jax.Array:
  """``M⁻ᵀ H M⁻¹`` for ``h`` ``(d, d)`` and ``M⁻¹`` blocks ``(nb, k, k)``."""
  t = transforms.block_diag(m_inv)
  return jnp.matmul(t.T, jnp.matmul(h, t, precision=_HI), precision=_HI)


_apply_left = jax.jit(transforms.apply_left)


def gptq_qarrays(params: dict, model_config, quant_config, calib_tokens, *,
                 blocks: dict | None = None
                 ) -> tuple[dict[tuple[int, str], qz.QArray], dict[str, Any]]:
  """Sequential GPTQ of every selected matrix: ``(layer, name) -> QArray`` and a report.

  Args:
    params: fp model params.
    model_config: the ``ModelConfig``.
    quant_config: ``QuantConfig`` (fields in the module docstring).
    calib_tokens: ``(N, S)`` int calibration token ids.
    blocks: optional ``(layer, name) -> (M, M⁻¹)`` blocks ``(nb, k, k)``: those
      matrices are stored as ``V = M W`` (codes of ``V``; the model applies
      ``x M⁻¹`` online) and rounded under ``M⁻ᵀ H M⁻¹``.

  Returns:
    ``(qarrays, report)``; ``report['layer_loss'][name]`` lists, per layer, the
    calibration loss ``||X(W-Ŵ)||²`` of GPTQ and ``report['rtn_layer_loss']`` of
    RTN on the same inputs; ``report['seconds']`` the wall time.
  """
  cfg = model_config
  spec = quant_config.spec
  chosen = tuple(getattr(quant_config, 'matrices', _ALL))
  damp = float(getattr(quant_config, 'gptq_damp', 0.01))
  act_order = bool(getattr(quant_config, 'gptq_act_order', False))
  blocks = blocks or {}
  block = int(getattr(quant_config, 'gptq_block', 128))
  batch = int(getattr(quant_config, 'gptq_batch_size', 8))
  tokens = jnp.asarray(calib_tokens, jnp.int32)
  if tokens.ndim != 2 or tokens.shape[0] < 1:
    raise ValueError(f'calib_tokens must be (n_seq, seq_len) int; got shape '
                     f'{tuple(tokens.shape)}.')
  if int(tokens.max()) >= cfg.vocab_size or int(tokens.min()) < 0:
    raise ValueError(f'calib_tokens out of range [0, {cfg.vocab_size}).')
  t0 = time.perf_counter()
  xs = jnp.concatenate([embed(params, cfg, tokens[i:i + batch])
                        for i in range(0, tokens.shape[0], batch)])
  qarrays: dict[tuple[int, str], qz.QArray] = {}
  report: dict[str, Any] = {'layer_loss': {n: [] for n in chosen},
                            'rtn_layer_loss': {n: [] for n in chosen},
                            'calib_tokens': int(tokens.size)}
  for l, attn_type in enumerate(cfg.attention_types):
    layer = params[f'layer_{l}']
    mats = _layer_matrices(layer, cfg)
    for stage, names in _STAGES:
      if stage == 'gu':  # MLP stages start from the residual after (quantized) attention
        xs = _run_stage(layer, xs, cfg, attn_type, 'mid', batch)
      names = [n for n in names if n in chosen]
      if not names:
        continue
      h = _run_stage(layer, xs, cfg, attn_type, stage, batch)
      for n in names:
        w = mats[n]
        if (l, n) in blocks:
          m, m_inv = blocks[(l, n)]
          q = gptq_core.gptq_quantize(_apply_left(m, w), _transform_hessian(h, m_inv),
                                      spec, damp=damp, block=block, act_order=act_order)
          w_hat = _apply_left(m_inv, qz.dequantize(q))
        else:
          q = gptq_core.gptq_quantize(w, h, spec, damp=damp, block=block,
                                      act_order=act_order)
          w_hat = qz.dequantize(q)
        qarrays[(l, n)] = q
        mats[n] = w_hat
        report['layer_loss'][n].append(float(gptq_core.layer_loss(w, w_hat, h)))
        report['rtn_layer_loss'][n].append(
            float(gptq_core.layer_loss(w, qz.quant_dequant(w, spec), h)))
      layer = _set_layer(layer, cfg, mats)
    xs = _run_stage(layer, xs, cfg, attn_type, 'out', batch)
  report['seconds'] = time.perf_counter() - t0
  return qarrays, report


def quantize_gptq(params: dict, model_config, quant_config, calib_tokens
                  ) -> tuple[dict, dict[str, Any]]:
  """GPTQ-quantized params (``QuantizedLinear`` leaves, no transforms) and a report."""
  from cafeq_jax.methods import _tree  # pylint: disable=g-import-not-at-top
  qarrays, report = gptq_qarrays(params, model_config, quant_config, calib_tokens)
  return _tree.build_quantized_params(params, model_config, qarrays, {}), report
