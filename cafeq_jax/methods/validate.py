"""Up-front checks of the param tree ``methods.quantize`` is given, before any work.

``check_params(params, model_config)`` runs first in ``quantize`` (before pair
transforms, online transforms or the self-generation), so a bad input fails in
seconds with a message naming the leaf instead of after the expensive stages:

* structure: ``layer_0`` .. ``layer_{L-1}`` exist (and no others), each with the
  projection leaves of ``models.linears.LEAVES`` at their tree-layout shapes;
* values: every floating-point leaf of the whole tree is finite (the embedding
  and the norms too, which no quantizer looks at: a NaN there makes every
  method's perplexity NaN). A non-finite value is reported with its leaf path
  and index and, in a projection leaf, with its layer, matrix name and
  ``(row, column)`` in the matrix view ``(d_in, d_out)`` of the *input*
  (untransformed) model (``linears.leaf_to_matrix``).
"""

from __future__ import annotations

import re
from typing import Any
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from cafeq_jax.models import linears
from cafeq_jax.models import qlinear
from cafeq_jax.models.config import ModelConfig

_LAYER = re.compile(r'^layer_(\d+)$')


def _path_str(path) -> str:
  """``jax.tree_util`` key path -> 'layer_0/attn/q_einsum/w'."""
  parts = []
  for k in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return '/'.join(parts)


def _get(tree, path: tuple[str, ...]):
  for p in path:
    if not isinstance(tree, Mapping) or p not in tree:
      return None
    tree = tree[p]
  return tree


def check_structure(params: Any, cfg: ModelConfig) -> None:
  """Raises a ValueError unless ``params`` has ``cfg``'s layers and projection leaves.

  Args:
    params: the fp param tree (docs/params.md).
    cfg: its ``ModelConfig``.
  """
  if not isinstance(params, Mapping):
    raise TypeError(
      f'params must be a dict param tree (docs/params.md); got {type(params).__name__}.'
    )
  layers = sorted((int(m.group(1)) for m in map(_LAYER.match, params) if m))
  missing = [f'layer_{i}' for i in range(cfg.num_layers) if f'layer_{i}' not in params]
  extra = [f'layer_{i}' for i in layers if i >= cfg.num_layers]
  if missing or extra:
    raise ValueError(
      f'the param tree does not match model_config: it has {len(layers)} layer(s) '
      f'({", ".join(f"layer_{i}" for i in layers[:3])}{" ..." if len(layers) > 3 else ""})'
      f' but num_layers={cfg.num_layers}'
      + (f'; missing {missing[:4]}' if missing else '')
      + (f'; unexpected {extra[:4]}' if extra else '')
      + '.'
    )
  for i in range(cfg.num_layers):
    for leaf in linears.LEAVES:
      w = _get(params[f'layer_{i}'], leaf.path)
      where = '/'.join((f'layer_{i}',) + leaf.path)
      if w is None:
        raise ValueError(
          f'param leaf {where!r} is missing (expected the {leaf.kind} '
          f'weight of matrices {leaf.names}).'
        )
      if isinstance(w, qlinear.QuantizedLinear):
        continue
      expected = linears.leaf_shape(leaf.kind, cfg)
      if tuple(np.shape(w)) != expected:
        raise ValueError(
          f'param leaf {where!r} has shape {tuple(np.shape(w))}; model_config implies {expected}.'
        )


def _bad_mask(x) -> np.ndarray | None:
  """Host bool mask of the non-finite entries of a float leaf, or None if all finite.

  Device arrays are reduced on device (one scalar back); host numpy arrays (the
  fp model kept on the host by layer-wise runs) are checked where they are.
  """
  if not isinstance(x, (np.ndarray, np.generic, jax.Array)):
    return None
  if not jnp.issubdtype(x.dtype, jnp.inexact):
    return None
  if isinstance(x, jax.Array):
    if bool(jnp.all(jnp.isfinite(x))):
      return None
    try:
      host = np.asarray(jax.device_get(x))
    except Exception:  # pylint: disable=broad-except  # not fully addressable
      return np.ones((), bool)
  else:
    host = np.asarray(x)
  if host.dtype not in (np.float16, np.float32, np.float64):
    host = host.astype(np.float32)  # bfloat16 and other ml_dtypes
  finite = np.isfinite(host)
  return None if finite.all() else ~finite


def _where_in_matrix(layer: int, leaf: linears.Leaf, bad: np.ndarray, cfg: ModelConfig) -> str:
  """'layer 1, matrix "q" (D, H*hd) view, row 3, column 17' of the first bad entry."""
  try:
    view = np.asarray(linears.leaf_to_matrix(leaf.kind, bad, cfg))
  except ValueError:
    return ''
  idx = tuple(int(i) for i in np.argwhere(view)[0])
  name = leaf.names[idx[0]] if len(leaf.names) > 1 else leaf.names[0]
  row, col = idx[-2:]
  d_in, d_out = linears.linear_shapes(cfg)[name]
  return (
    f'; that is layer {layer}, matrix {name!r} of the input model, row {row} '
    f'(of d_in={d_in}), column {col} (of d_out={d_out}) in its (d_in, d_out) view'
  )


def check_finite(params: Any, cfg: ModelConfig | None = None) -> None:
  """Raises a ValueError naming the first leaf of ``params`` with a NaN or ±inf.

  Args:
    params: any param tree (arrays of any dtype; integer leaves are skipped).
    cfg: its ``ModelConfig``; with it, a bad projection leaf is also located as
      layer / matrix / (row, column) of the matrix view.
  """
  kinds = {leaf.path: leaf for leaf in linears.LEAVES}
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  for path, x in flat:
    bad = _bad_mask(x)
    if bad is None:
      continue
    where = _path_str(path)
    n = int(bad.sum()) if bad.ndim else 1
    exact = bad.shape == np.shape(x)
    first = tuple(int(i) for i in np.argwhere(bad)[0]) if exact and bad.ndim else ()
    what = ''
    if first:
      value = float(np.asarray(jax.device_get(x[first]), np.float32))
      what = f' (first: {value} at index {first})'
    located = ''
    parts = where.split('/')
    if cfg is not None and exact and parts and _LAYER.match(parts[0]):
      leaf = kinds.get(tuple(parts[1:]))
      if leaf is not None and tuple(np.shape(x)) == linears.leaf_shape(leaf.kind, cfg):
        located = _where_in_matrix(int(parts[0][len('layer_') :]), leaf, bad, cfg)
    raise ValueError(
      f'param leaf {where!r} {tuple(np.shape(x))} has {n} non-finite value(s)'
      f'{what}{located}. The input model must be finite: check the checkpoint it was '
      'loaded from.'
    )


def check_params(params: Any, cfg: ModelConfig) -> None:
  """``check_structure`` then ``check_finite`` (see the module docstring)."""
  check_structure(params, cfg)
  check_finite(params, cfg)
