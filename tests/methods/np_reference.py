"""Independent numpy recomputations for the method tests (imported by them).

Rebuilds what a quantized model stores from first principles: dequantized codes
``scale * (codes - zero)`` per group of rows, block-diagonal transforms applied by
an explicit einsum, the RMSNorm of the decoder, and the param tree with every
quantized leaf replaced by its effective float weight ``M⁻¹ dequant(Q)``.
"""

from __future__ import annotations

import numpy as np

from cafeq_jax import models
from cafeq_jax import quantizer
from cafeq_jax.models import linears
from cafeq_jax.models import qlinear


def leaf(params, layer: int, path):
  node = params[f'layer_{layer}']
  for p in path:
    node = node[p]
  return node


def np_dequantize(q: quantizer.QArray) -> np.ndarray:
  """``scale * (codes - zero)`` per group of rows, float64."""
  codes = np.asarray(q.codes, np.float64)
  g = codes.shape[-2] // q.scale.shape[-2]
  scale = np.repeat(np.asarray(q.scale, np.float64), g, axis=-2)
  zero = 0.0 if q.zero is None else np.repeat(np.asarray(q.zero, np.float64), g, axis=-2)
  return scale * (codes - zero)


def np_block_apply(blocks, w) -> np.ndarray:
  """``blockdiag(blocks) @ w`` for blocks ``(..., nb, k, k)``, ``w`` ``(..., d_in, d_out)``."""
  blocks, w = np.asarray(blocks, np.float64), np.asarray(w, np.float64)
  nb, k = blocks.shape[-3], blocks.shape[-1]
  wb = w.reshape(*w.shape[:-2], nb, k, w.shape[-1])
  return np.einsum('...bij,...bjo->...bio', blocks, wb).reshape(w.shape)


def np_effective(ql: qlinear.QuantizedLinear) -> np.ndarray:
  """``M⁻¹ dequant(Q)`` of a leaf in its matrix view ``(*lead, d_in, d_out)``."""
  w = np_dequantize(ql.weight)
  t = ql.transform_inv
  if t is None:
    return w
  t = np.asarray(t, np.float64)
  if t.ndim == 3 and w.ndim == 3:  # one transform shared by the stacked matrices
    t = np.broadcast_to(t, (w.shape[0], *t.shape))
  return np_block_apply(t, w)


def np_fp_params(qparams, cfg):
  """The param tree with every quantized leaf replaced by its numpy effective weight."""
  out = dict(qparams)
  for l in range(cfg.num_layers):
    layer = qparams[f'layer_{l}']
    for lf in linears.LEAVES:
      node = leaf(qparams, l, lf.path)
      if isinstance(node, qlinear.QuantizedLinear):
        w = linears.matrix_to_leaf(lf.kind, np_effective(node).astype(np.float32), cfg)
        layer = linears._set_path(layer, lf.path, w)  # pylint: disable=protected-access
    out[f'layer_{l}'] = layer
  return out


def assert_runs_as_its_effective_weights(qparams, params, cfg, tokens):
  """The quantized model computes what its rebuilt fp weights compute, and is not fp."""
  out = np.asarray(models.forward(qparams, cfg, tokens))
  ref = np.asarray(models.forward(np_fp_params(qparams, cfg), cfg, tokens))
  fp = np.asarray(models.forward(params, cfg, tokens))
  scale = np.abs(ref).max()
  np.testing.assert_allclose(out, ref, atol=2e-5 * scale, rtol=0)
  assert np.abs(out - fp).max() > 100 * np.abs(out - ref).max()


def np_rms_norm(x, scale, cfg) -> np.ndarray:
  """The decoder's RMSNorm in float64 (``1 + scale`` for Gemma, ``scale`` for Llama)."""
  x = np.asarray(x, np.float64)
  y = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.norm_eps)
  s = np.asarray(scale, np.float64)
  return y * ((1 + s) if cfg.norm_scale_plus_one else s)


def np_qkv_input(params, cfg, tokens) -> np.ndarray:
  """Layer 0's q/k/v input ``(N*S, D)``: the normed embeddings (no quantization upstream)."""
  emb = np.asarray(params['embedder']['input_embedding'], np.float64)[np.asarray(tokens)]
  if cfg.scale_embeddings:
    emb = emb * np.sqrt(cfg.embed_dim)
  x = np_rms_norm(emb, params['layer_0']['pre_attention_norm']['scale'], cfg)
  return x.reshape(-1, cfg.embed_dim)
