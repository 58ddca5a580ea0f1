"""Glue between a model's param tree and the per-matrix math (internal).

Per-layer matrices use the "matrix view" of ``cafeq_jax.models.linears``
(``(L, d_in, d_out)`` stacks per name). A quantized model is the same tree with
each quantized weight leaf replaced by a ``QuantizedLinear`` (CONTRACTS.md).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from cafeq_jax import quantizer
from cafeq_jax.methods import config as config_lib

# Param leaf (path inside ``layer_{i}``) holding each group of matrices.
LEAF_PATHS = {
    ('q',): ('attn', 'q_einsum', 'w'),
    ('k', 'v'): ('attn', 'kv_einsum', 'w'),
    ('o',): ('attn', 'attn_vec_einsum', 'w'),
    ('gate', 'up'): ('mlp', 'gating_einsum'),
    ('down',): ('mlp', 'linear'),
}


def get_linears(params, model_config) -> dict[str, jax.Array]:
  from cafeq_jax.models import linears  # pylint: disable=g-import-not-at-top
  return linears.get_linears(params, model_config)


def set_linears(params, model_config, mats: Mapping[str, jax.Array]):
  from cafeq_jax.models import linears  # pylint: disable=g-import-not-at-top
  return linears.set_linears(params, model_config, dict(mats))


def _copy(tree):
  if isinstance(tree, Mapping):
    return {k: _copy(v) for k, v in tree.items()}
  return tree


def slice_qarray(q: quantizer.QArray, index) -> quantizer.QArray:
  return quantizer.QArray(codes=q.codes[index], scale=q.scale[index],
                          zero=None if q.zero is None else q.zero[index], spec=q.spec)


def stack_qarrays(qs: list[quantizer.QArray]) -> quantizer.QArray:
  return quantizer.QArray(
      codes=jnp.stack([q.codes for q in qs]), scale=jnp.stack([q.scale for q in qs]),
      zero=None if qs[0].zero is None else jnp.stack([q.zero for q in qs]),
      spec=qs[0].spec)


def build_quantized_params(params, model_config, qarrays: Mapping[tuple[int, str], quantizer.QArray],
                           transform_invs: Mapping[tuple[int, str], jax.Array | None]):
  """Replaces the weight leaves of the quantized matrices by ``QuantizedLinear``.

  Args:
    params: the (fp, possibly pair-folded) param tree.
    model_config: the ``ModelConfig``.
    qarrays: ``(layer, name) -> QArray`` of the matrix view ``(d_in, d_out)`` of
      the *stored* matrix (``M W`` when transformed).
    transform_invs: ``(layer, name) -> (nb, k, k)`` blocks of ``M⁻¹`` or None.

  Returns:
    A new param tree (the input is not modified).
  """
  from cafeq_jax.models import qlinear  # pylint: disable=g-import-not-at-top
  out = _copy(params)
  names = {n for _, n in qarrays}
  for group, path in LEAF_PATHS.items():
    chosen = [n for n in group if n in names]
    if not chosen:
      continue
    if len(chosen) != len(group):
      raise ValueError(f'matrices {group} share one leaf; got only {chosen}.')
    for layer in range(model_config.num_layers):
      node = out[f'layer_{layer}']
      for p in path[:-1]:
        node = node[p]
      leaf = node[path[-1]]
      qs = [qarrays[(layer, n)] for n in group]
      ts = [transform_invs.get((layer, n)) for n in group]
      if len(group) == 1:
        weight, t = qs[0], ts[0]
      else:
        weight = stack_qarrays(qs)
        if all(t is None for t in ts):
          t = None
        else:
          ref = next(t for t in ts if t is not None)
          eye = jnp.broadcast_to(jnp.eye(ref.shape[-1], dtype=jnp.float32), ref.shape)
          ts = [eye if t is None else t for t in ts]
          same = all(t is ts[0] or bool(jnp.array_equal(t, ts[0])) for t in ts)
          t = ts[0] if same else jnp.stack(ts)
      node[path[-1]] = qlinear.QuantizedLinear(
          weight=weight, transform_inv=None if t is None else jnp.asarray(t, jnp.float32),
          shape=tuple(leaf.shape))
  return out


def effective_weight(q: quantizer.QArray, transform_inv: jax.Array | None) -> jax.Array:
  """``blockdiag(M⁻¹) @ dequant(q)``: ``(..., d_in, d_out)`` float32."""
  from cafeq_jax.core import transforms  # pylint: disable=g-import-not-at-top
  w = quantizer.dequantize(q)
  if transform_inv is None:
    return w
  return transforms.apply_left(jnp.asarray(transform_inv, jnp.float32), w)


def selected_linears(params, model_config, quant_config: config_lib.QuantConfig
                     ) -> dict[str, jax.Array]:
  mats = get_linears(params, model_config)
  missing = [n for n in quant_config.matrices if n not in mats]
  if missing:
    raise ValueError(f'model has no matrices {missing}; it has {sorted(mats)}.')
  return {n: jnp.asarray(mats[n], jnp.float32) for n in quant_config.matrices}


def is_quantized_leaf(x: Any) -> bool:
  return type(x).__name__ == 'QuantizedLinear'
