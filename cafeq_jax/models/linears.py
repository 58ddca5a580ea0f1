"""The "matrix view" of a model's quantizable weights, as the methods see them.

Per layer, seven matrices in ``(d_in, d_out)`` layout (``y = x @ W``):

  q:    (D, H*hd)    from attn/q_einsum/w (H, D, hd) -> transpose(1, 0, 2).reshape
  k:    (D, K*hd)    from attn/kv_einsum/w[0] (K, D, hd)
  v:    (D, K*hd)    from attn/kv_einsum/w[1]
  o:    (H*hd, D)    from attn/attn_vec_einsum/w (H, hd, D).reshape
  gate: (D, F)       from mlp/gating_einsum[0].T
  up:   (D, F)       from mlp/gating_einsum[1].T
  down: (F, D)       from mlp/linear

This module is the one place that knows the layout (see docs/params.md): which
param leaf holds which matrices (``LEAVES``: k/v and gate/up share a leaf),
their shapes, one layer's get/set (``layer_matrices`` / ``set_layer_matrices``),
the stacks over layers (``get_linears`` / ``set_linears``, exact inverses), and
the quantized tree (``quantized_params`` puts ``QArray``s and online transforms
into ``QuantizedLinear`` leaves, ``quantized_matrices`` reads them back). Leaf
level helpers (``leaf_to_matrix`` / ``matrix_to_leaf``) convert one tree leaf to the
layout a ``QuantizedLinear`` stores and back.
"""

from __future__ import annotations

import dataclasses
from typing import Any
from typing import Iterable
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from cafeq_jax import quantizer
from cafeq_jax.models import qlinear
from cafeq_jax.models.config import ModelConfig

LINEAR_NAMES = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')
Key = tuple[int, str]  # (layer, matrix name)


@dataclasses.dataclass(frozen=True)
class Leaf:
  """One param leaf of a layer holding projection matrices.

  Attributes:
    kind: the leaf's name in the tree ('q_einsum', 'kv_einsum', ...).
    path: keys inside ``layer_{i}``.
    names: the matrices it holds, in the order of its stack dim (one name: no
      stack dim).
  """

  kind: str
  path: tuple[str, ...]
  names: tuple[str, ...]


LEAVES = (
  Leaf('q_einsum', ('attn', 'q_einsum', 'w'), ('q',)),
  Leaf('kv_einsum', ('attn', 'kv_einsum', 'w'), ('k', 'v')),
  Leaf('attn_vec_einsum', ('attn', 'attn_vec_einsum', 'w'), ('o',)),
  Leaf('gating_einsum', ('mlp', 'gating_einsum'), ('gate', 'up')),
  Leaf('linear', ('mlp', 'linear'), ('down',)),
)
LEAF_OF: dict[str, Leaf] = {n: leaf for leaf in LEAVES for n in leaf.names}
# Matrices stored stacked in one param leaf: selected together or not at all.
LEAF_GROUPS = tuple(leaf.names for leaf in LEAVES)


def check_matrices(matrices: Iterable[str]) -> tuple[str, ...]:
  """Validates a selection of matrix names; returns it in ``LINEAR_NAMES`` order.

  Raises a ValueError for a string (not a sequence), an empty selection, unknown
  names, repeats, or a leaf group taken only in part (k without v, ...).
  """
  if isinstance(matrices, str):
    raise TypeError(
      f'matrices must be a sequence of names, not the string {matrices!r}; e.g. ("q", "k", "v").'
    )
  matrices = tuple(matrices)
  unknown = [m for m in matrices if m not in LINEAR_NAMES]
  if unknown or not matrices or len(set(matrices)) != len(matrices):
    raise ValueError(
      f'matrices={matrices!r} must be a non-empty subset of '
      f'{LINEAR_NAMES} without repeats (unknown: {unknown}).'
    )
  for group in LEAF_GROUPS:
    chosen = [m for m in group if m in matrices]
    if chosen and len(chosen) != len(group):
      raise ValueError(
        f'matrices {group} share one param leaf and must be quantized together; '
        f'got {chosen} without {[m for m in group if m not in chosen]}.'
      )
  return tuple(m for m in LINEAR_NAMES if m in matrices)


def linear_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
  """``(d_in, d_out)`` of each per-layer matrix, by name (``LINEAR_NAMES`` order)."""
  D, F = cfg.embed_dim, cfg.hidden_dim
  Hd, Kd = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  return {
    'q': (D, Hd),
    'k': (D, Kd),
    'v': (D, Kd),
    'o': (Hd, D),
    'gate': (D, F),
    'up': (D, F),
    'down': (F, D),
  }


def leaf_shape(kind: str, cfg: ModelConfig) -> tuple[int, ...]:
  """Tree-layout shape of leaf ``kind`` (a ``Leaf.kind`` of ``LEAVES``)."""
  H, K, hd, D, F = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.embed_dim, cfg.hidden_dim)
  shapes = {
    'q_einsum': (H, D, hd),
    'kv_einsum': (2, K, D, hd),
    'attn_vec_einsum': (H, hd, D),
    'gating_einsum': (2, F, D),
    'linear': (F, D),
  }
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
  raise ValueError(f'unknown leaf kind {kind!r}; expected one of {sorted(l.kind for l in LEAVES)}.')


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
    for leaf in LEAVES:
      w = _get_path(layer, leaf.path)
      if isinstance(w, qlinear.QuantizedLinear):
        layer = _set_path(layer, leaf.path, effective_leaf(leaf.kind, w, cfg, dtype))
    out[name] = layer
  if 'unembed' in params and isinstance(params['unembed']['w'], qlinear.QuantizedLinear):
    out['unembed'] = {'w': qlinear.effective_weight(params['unembed']['w'], dtype)}
  return out


def layer_matrices(layer: dict, cfg: ModelConfig) -> dict[str, jax.Array]:
  """The seven matrices of one layer's params: ``name -> (d_in, d_out)``.

  Quantized leaves contribute their effective (dequantized, transform-folded)
  float32 weight; fp leaves keep their dtype.
  """
  out = {}
  for leaf in LEAVES:
    w = _get_path(layer, leaf.path)
    if isinstance(w, qlinear.QuantizedLinear):
      m = qlinear.effective_weight(w)
    else:
      m = leaf_to_matrix(leaf.kind, jnp.asarray(w), cfg)
    for i, n in enumerate(leaf.names):
      out[n] = m if len(leaf.names) == 1 else m[i]
  return out


def set_layer_matrices(layer: dict, cfg: ModelConfig, mats: Mapping[str, Any]) -> dict:
  """Copy of one layer's params whose projection leaves hold ``mats`` (fp arrays).

  ``mats`` maps some or all of ``LINEAR_NAMES`` to ``(d_in, d_out)``; a leaf is
  replaced only when all of its matrices are given.
  """
  for leaf in LEAVES:
    if not all(n in mats for n in leaf.names):
      continue
    m = [jnp.asarray(mats[n]) for n in leaf.names]
    layer = _set_path(
      layer, leaf.path, matrix_to_leaf(leaf.kind, m[0] if len(m) == 1 else jnp.stack(m), cfg)
    )
  return layer


def get_linears(params: dict, cfg: ModelConfig) -> dict[str, jax.Array]:
  """Per-layer matrices stacked over layers: ``name -> (L, d_in, d_out)`` float.

  Quantized leaves contribute their effective (dequantized, transform-folded) weight.
  """
  per_layer = [layer_matrices(params[f'layer_{i}'], cfg) for i in range(cfg.num_layers)]
  return {n: jnp.stack([m[n] for m in per_layer]) for n in LINEAR_NAMES}


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
        f'(num_layers, d_in, d_out).'
      )
  out = dict(params)
  for i in range(cfg.num_layers):
    out[f'layer_{i}'] = set_layer_matrices(
      params[f'layer_{i}'], cfg, {n: linears[n][i] for n in LINEAR_NAMES}
    )
  return out


def selected_linears(
  params: dict, cfg: ModelConfig, matrices: Iterable[str]
) -> dict[str, jax.Array]:
  """``get_linears`` restricted to ``matrices``, as float32 stacks ``(L, d_in, d_out)``."""
  mats = get_linears(params, cfg)
  return {n: jnp.asarray(mats[n], jnp.float32) for n in check_matrices(matrices)}


def _copy(tree):
  if isinstance(tree, Mapping):
    return {k: _copy(v) for k, v in tree.items()}
  return tree


def _leaf_transform(ts: list) -> jax.Array | None:
  """One leaf's ``transform_inv`` from its matrices' (``None``: identity blocks)."""
  if all(t is None for t in ts):
    return None
  if len(ts) == 1:
    return jnp.asarray(ts[0], jnp.float32)
  ref = next(t for t in ts if t is not None)
  eye = jnp.broadcast_to(jnp.eye(ref.shape[-1], dtype=jnp.float32), ref.shape)
  ts = [eye if t is None else t for t in ts]
  same = all(t is ts[0] or bool(jnp.array_equal(t, ts[0])) for t in ts)
  return jnp.asarray(ts[0] if same else jnp.stack(ts), jnp.float32)


def quantized_params(
  params: dict,
  cfg: ModelConfig,
  qarrays: Mapping[Key, quantizer.QArray],
  transform_invs: Mapping[Key, jax.Array | None],
) -> dict:
  """Replaces the weight leaves of the quantized matrices by ``QuantizedLinear``.

  Args:
    params: the (fp, possibly pair-folded) param tree (not modified).
    cfg: the ``ModelConfig``.
    qarrays: ``(layer, name) -> QArray`` of the matrix view ``(d_in, d_out)`` of
      the *stored* matrix (``M W`` when transformed), for every layer of each
      quantized leaf.
    transform_invs: ``(layer, name) -> (nb, k, k)`` blocks of ``M⁻¹`` or None.
      Matrices of one leaf with equal blocks share one ``(nb, k, k)``;
      otherwise the leaf stores ``(2, nb, k, k)`` (identity for a missing one).

  Returns:
    A new param tree.
  """
  out = _copy(params)
  names = {n for _, n in qarrays}
  for leaf in LEAVES:
    chosen = [n for n in leaf.names if n in names]
    if not chosen:
      continue
    if len(chosen) != len(leaf.names):
      raise ValueError(f'matrices {leaf.names} share one leaf; got only {chosen}.')
    for layer in range(cfg.num_layers):
      node = _get_path(out[f'layer_{layer}'], leaf.path[:-1])
      fp = node[leaf.path[-1]]
      qs = [qarrays[(layer, n)] for n in leaf.names]
      if len(qs) == 1:
        weight = qs[0]
      elif all(q.spec == qs[0].spec for q in qs):
        weight = quantizer.QArray.stack(qs)
      else:  # e.g. a GGUF mix with other types for key and value
        weight = tuple(qs)
      node[leaf.path[-1]] = qlinear.QuantizedLinear(
        weight=weight,
        transform_inv=_leaf_transform([transform_invs.get((layer, n)) for n in leaf.names]),
        shape=tuple(fp.shape),
      )
  return out


def quantized_matrices(
  qparams: dict, cfg: ModelConfig
) -> tuple[dict[Key, quantizer.QArray], dict[Key, jax.Array | None]]:
  """Inverse of ``quantized_params``: ``(layer, name) -> QArray`` and ``M⁻¹`` blocks.

  Only the ``QuantizedLinear`` leaves are read (fp leaves are skipped); packed
  weights are unpacked.
  """
  qarrays, tinvs = {}, {}
  for leaf in LEAVES:
    for l in range(cfg.num_layers):
      node = _get_path(qparams[f'layer_{l}'], leaf.path)
      if not isinstance(node, qlinear.QuantizedLinear):
        continue
      qs, t = qlinear.qarrays(node.weight), node.transform_inv
      for i, n in enumerate(leaf.names):
        qarrays[(l, n)] = qs[0] if len(leaf.names) == 1 else (qs[i] if len(qs) > 1 else qs[0][i])
        tinvs[(l, n)] = t if (t is None or t.ndim == 3) else t[i]
  return qarrays, tinvs
