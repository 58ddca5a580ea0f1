"""The "matrix view" of a model's quantizable weights, as the methods see them.

Per layer, seven matrices in ``(d_in, d_out)`` layout (``y = x @ W``):

  q:    (D, H*hd)    from attn/q_einsum/w (H, D, hd) -> transpose(1, 0, 2).reshape
  k:    (D, K*hd)    from attn/kv_einsum/w[0] (K, D, hd)
  v:    (D, K*hd)    from attn/kv_einsum/w[1]
  o:    (H*hd, D)    from attn/attn_vec_einsum/w (H, hd, D).reshape
  gate: (D, F)       from mlp/gating_einsum[0].T
  up:   (D, F)       from mlp/gating_einsum[1].T
  down: (F, D)       from mlp/linear

``get_linears`` stacks them over layers, ``set_linears`` is its exact inverse. Leaf
level helpers (``leaf_to_matrix`` / ``matrix_to_leaf``) convert one tree leaf to the
layout a ``QuantizedLinear`` stores and back.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cafeq_jax.models import qlinear
from cafeq_jax.models.config import ModelConfig

LINEAR_NAMES = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')

# Leaf kind -> path inside 'layer_{i}'.
LEAF_PATHS: dict[str, tuple[str, ...]] = {
    'q_einsum': ('attn', 'q_einsum', 'w'),
    'kv_einsum': ('attn', 'kv_einsum', 'w'),
    'attn_vec_einsum': ('attn', 'attn_vec_einsum', 'w'),
    'gating_einsum': ('mlp', 'gating_einsum'),
    'linear': ('mlp', 'linear'),
}

# Matrix name -> (leaf kind, index into the leaf's stack dim or None).
_SOURCES = {
    'q': ('q_einsum', None), 'k': ('kv_einsum', 0), 'v': ('kv_einsum', 1),
    'o': ('attn_vec_einsum', None), 'gate': ('gating_einsum', 0),
    'up': ('gating_einsum', 1), 'down': ('linear', None),
}


def linear_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
  """``(d_in, d_out)`` of each per-layer matrix, by name (``LINEAR_NAMES`` order)."""
  D, F = cfg.embed_dim, cfg.hidden_dim
  Hd, Kd = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  return {'q': (D, Hd), 'k': (D, Kd), 'v': (D, Kd), 'o': (Hd, D), 'gate': (D, F),
          'up': (D, F), 'down': (F, D)}


def leaf_shape(kind: str, cfg: ModelConfig) -> tuple[int, ...]:
  """Tree-layout shape of leaf ``kind`` (a key of ``LEAF_PATHS``)."""
  H, K, hd, D, F = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.embed_dim,
                    cfg.hidden_dim)
  shapes = {'q_einsum': (H, D, hd), 'kv_einsum': (2, K, D, hd),
            'attn_vec_einsum': (H, hd, D), 'gating_einsum': (2, F, D), 'linear': (F, D)}
  if kind not in shapes:
    raise ValueError(f'unknown leaf kind {kind!r}; expected one of {sorted(shapes)}.')
  return shapes[kind]


def _xp(a):
  return np if isinstance(a, np.ndarray) else jnp


def leaf_to_matrix(kind: str, w, cfg: ModelConfig):
  """Tree-layout leaf -> matrix view ``(*lead, d_in, d_out)`` (numpy or jax in, same out).

  'kv_einsum' and 'gating_einsum' give a ``(2, d_in, d_out)`` stack.
  """
  expected = leaf_shape(kind, cfg)
  if tuple(w.shape) != expected:
    raise ValueError(f'{kind} leaf has shape {tuple(w.shape)}; expected {expected}.')
  xp = _xp(w)
  if kind == 'q_einsum':
    H, D, hd = w.shape
    return xp.transpose(w, (1, 0, 2)).reshape(D, H * hd)
  if kind == 'kv_einsum':
    _, K, D, hd = w.shape
    return xp.transpose(w, (0, 2, 1, 3)).reshape(2, D, K * hd)
  if kind == 'attn_vec_einsum':
    H, hd, D = w.shape
    return w.reshape(H * hd, D)
  if kind == 'gating_einsum':
    return xp.transpose(w, (0, 2, 1))
  return w


def matrix_to_leaf(kind: str, m, cfg: ModelConfig):
  """Inverse of ``leaf_to_matrix``."""
  H, K, hd, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.embed_dim
  xp = _xp(m)
  if kind == 'q_einsum':
    return xp.transpose(m.reshape(D, H, hd), (1, 0, 2))
  if kind == 'kv_einsum':
    return xp.transpose(m.reshape(2, D, K, hd), (0, 2, 1, 3))
  if kind == 'attn_vec_einsum':
    return m.reshape(H, hd, D)
  if kind == 'gating_einsum':
    return xp.transpose(m, (0, 2, 1))
  if kind == 'linear':
    return m
  raise ValueError(f'unknown leaf kind {kind!r}; expected one of {sorted(LEAF_PATHS)}.')


def _get_path(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def _set_path(tree: dict, path, value) -> dict:
  """Copy of ``tree`` with ``tree[path] = value`` (dicts along the path are copied)."""
  out = dict(tree)
  if len(path) == 1:
    out[path[0]] = value
  else:
    out[path[0]] = _set_path(tree[path[0]], path[1:], value)
  return out


def effective_leaf(kind: str, w, cfg: ModelConfig, dtype=jnp.float32):
  """A leaf in tree layout as a float array; ``QuantizedLinear`` leaves are
  dequantized with the online transform folded (``W_eff = blockdiag(M^-1) @ W``)."""
  if isinstance(w, qlinear.QuantizedLinear):
    return matrix_to_leaf(kind, qlinear.effective_weight(w, dtype), cfg)
  return jnp.asarray(w, dtype)


def dequantize_params(params: dict, cfg: ModelConfig, dtype=jnp.float32) -> dict:
  """Same tree with every ``QuantizedLinear`` replaced by its effective float weight.

  Quantized leaves outside the per-layer projections (e.g. ``unembed/w``, stored as
  its own ``(D, V)`` matrix view) are handled too.
  """
  out = dict(params)
  for i in range(cfg.num_layers):
    name = f'layer_{i}'
    layer = params[name]
    for kind, path in LEAF_PATHS.items():
      w = _get_path(layer, path)
      if isinstance(w, qlinear.QuantizedLinear):
        layer = _set_path(layer, path, effective_leaf(kind, w, cfg, dtype))
    out[name] = layer
  if 'unembed' in params and isinstance(params['unembed']['w'], qlinear.QuantizedLinear):
    out['unembed'] = {'w': qlinear.effective_weight(params['unembed']['w'], dtype)}
  return out


def get_linears(params: dict, cfg: ModelConfig) -> dict[str, jax.Array]:
  """Per-layer matrices stacked over layers: ``name -> (L, d_in, d_out)`` float.

  Quantized leaves contribute their effective (dequantized, transform-folded) weight.
  """
  out: dict[str, list] = {n: [] for n in LINEAR_NAMES}
  for i in range(cfg.num_layers):
    layer = params[f'layer_{i}']
    mats = {}
    for kind, path in LEAF_PATHS.items():
      w = _get_path(layer, path)
      if isinstance(w, qlinear.QuantizedLinear):
        mats[kind] = qlinear.effective_weight(w)
      else:
        mats[kind] = leaf_to_matrix(kind, jnp.asarray(w), cfg)
    for name, (kind, idx) in _SOURCES.items():
      out[name].append(mats[kind] if idx is None else mats[kind][idx])
  return {n: jnp.stack(v) for n, v in out.items()}


def set_linears(params: dict, cfg: ModelConfig, linears: dict[str, Any]) -> dict:
  """Inverse of ``get_linears``: a new tree whose projection leaves come from ``linears``.

  Args:
    params: the model params (not modified).
    cfg: the model config.
    linears: ``name -> (L, d_in, d_out)`` for all of ``LINEAR_NAMES``.
  """
  shapes = linear_shapes(cfg)
  missing = [n for n in LINEAR_NAMES if n not in linears]
  if missing:
    raise ValueError(f'set_linears needs all of {LINEAR_NAMES}; missing {missing}.')
  for n in LINEAR_NAMES:
    expected = (cfg.num_layers, *shapes[n])
    if tuple(linears[n].shape) != expected:
      raise ValueError(
          f'linear {n!r} has shape {tuple(linears[n].shape)}; expected {expected} '
          f'(num_layers, d_in, d_out).')
  out = dict(params)
  for i in range(cfg.num_layers):
    m = {n: jnp.asarray(linears[n][i]) for n in LINEAR_NAMES}
    leaves = {
        'q_einsum': matrix_to_leaf('q_einsum', m['q'], cfg),
        'kv_einsum': matrix_to_leaf('kv_einsum', jnp.stack([m['k'], m['v']]), cfg),
        'attn_vec_einsum': matrix_to_leaf('attn_vec_einsum', m['o'], cfg),
        'gating_einsum': matrix_to_leaf('gating_einsum', jnp.stack([m['gate'], m['up']]), cfg),
        'linear': m['down'],
    }
    layer = params[f'layer_{i}']
    for kind, path in LEAF_PATHS.items():
      layer = _set_path(layer, path, leaves[kind])
    out[f'layer_{i}'] = layer
  return out
