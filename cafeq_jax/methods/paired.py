"""Model adapters for paired transforms and pair adaptive rounding.

Maps a model's param tree (``cafeq_jax.models.linears`` matrix view, stacked over
layers) onto the pure math in ``core.pairs`` and ``core.rounding``
(docs/method.md, "Paired matrices" and "Adaptive rounding"). Each function
receives the recipe stage whose knobs it uses.
"""

from __future__ import annotations

import time
from typing import Any

import jax.numpy as jnp
import numpy as np

from cafeq_jax import quantizer as qz
from cafeq_jax import recipes
from cafeq_jax import specs
from cafeq_jax.core import pairs as pairs_lib
from cafeq_jax.core import rounding
from cafeq_jax.models import linears

PairKind = pairs_lib.PairKind
PAIR_MATRICES = {PairKind.VO: ('v', 'o'), PairKind.QK: ('q', 'k'), PairKind.UPDOWN: ('up', 'down')}


def _geometry(cfg) -> pairs_lib.PairGeometry:
  return pairs_lib.PairGeometry(
    num_heads=cfg.num_heads,
    num_kv_heads=cfg.num_kv_heads,
    head_dim=cfg.head_dim,
    hidden_dim=cfg.hidden_dim,
  )


def apply_pair_transforms(
  params: dict,
  model_config,
  stage: recipes.PairTransforms,
  spec: specs.Spec,
  matrices: tuple[str, ...],
) -> tuple[dict, dict[str, Any]]:
  """Learns and folds the pair transforms; the fp model's function is unchanged.

  Args:
    params: fp model params (gemma Flax layout).
    model_config: ``cafeq_jax.models.ModelConfig``.
    stage: the pair kinds and their optimiser (identity init: deterministic).
    spec: the quantizer of both matrices of every pair (or one per matrix:
      layers whose pair has other specs are optimised as their own stack).
    matrices: the quantized matrices (a pair is transformed when either is).

  Returns:
    ``(params, report)``: params with transforms folded (projection leaves float32)
    and ``report[kind] = {'before': [L], 'after': [L], 'seconds': float}``, the RTN
    pair product error per layer with the identity and with the learned transform.
  """
  geom = _geometry(model_config)
  mats = {
    n: jnp.asarray(w, jnp.float32) for n, w in linears.get_linears(params, model_config).items()
  }
  report: dict[str, Any] = {}
  for kind in stage.kinds:
    na, nb = PAIR_MATRICES[kind]
    if na not in matrices and nb not in matrices:
      continue
    t0 = time.perf_counter()
    num_layers = mats[na].shape[0]
    groups: dict[tuple, list[int]] = {}
    for l in range(num_layers):
      key = (specs.resolve(spec, l, na), specs.resolve(spec, l, nb))
      groups.setdefault(key, []).append(l)
    e0, e1 = np.zeros(num_layers), np.zeros(num_layers)
    for (spec_a, spec_b), ls in groups.items():
      if len(groups) == 1:  # the whole stack
        a, b = mats[na], mats[nb]
      else:
        a, b = mats[na][jnp.asarray(ls)], mats[nb][jnp.asarray(ls)]
      p, g0, g1, _ = pairs_lib.optimize_pair(kind, geom, a, b, spec_a, spec_b, stage.opt)
      a, b = pairs_lib.fold(kind, geom, a, b, p)
      if len(groups) == 1:
        mats[na], mats[nb] = a, b
      else:
        mats[na] = mats[na].at[jnp.asarray(ls)].set(a)
        mats[nb] = mats[nb].at[jnp.asarray(ls)].set(b)
      e0[ls], e1[ls] = np.asarray(g0), np.asarray(g1)
    report[kind.value] = {
      'before': e0.tolist(),
      'after': e1.tolist(),
      'seconds': time.perf_counter() - t0,
      'total_before': float(e0.sum()),
      'total_after': float(e1.sum()),
    }
  return linears.set_linears(params, model_config, mats), report


def adaptive_round_pairs(
  params: dict,
  model_config,
  stage: recipes.PairAdaptive,
  spec: specs.Spec,
  matrices: tuple[str, ...],
  *,
  return_history: bool = False,
):
  """Adaptive rounding of the value/output pair of every layer.

  Per layer, ``W1 = v`` ``(D, K*hd)`` and ``W2 = o`` ``(H*hd, D)`` with the GQA block
  structure (``n1 = K`` value groups, ``n2 = H`` output heads; ``W2`` for KV group
  ``k`` is its query heads' ``W_O^h`` side by side), one layer per call.

  Returns:
    ``{(layer, 'v'): QArray (D, K*hd), (layer, 'o'): QArray (H*hd, D)}`` (empty when
    'v' and 'o' are not both quantized); with ``return_history`` also
    ``history`` ``(L, n_candidates)`` product errors (RTN first).
  """
  if 'v' not in matrices or 'o' not in matrices:
    return ({}, None) if return_history else {}
  mats = linears.get_linears(params, model_config)
  v = jnp.asarray(mats['v'], jnp.float32)
  o = jnp.asarray(mats['o'], jnp.float32)
  for l in range(model_config.num_layers):
    qz.validate_weight(v[l], specs.resolve(spec, l, 'v'))
    qz.validate_weight(o[l], specs.resolve(spec, l, 'o'))
  fn = lambda a, b, l: rounding.adaptive_round_pair(
    a,
    b,
    specs.resolve(spec, l, 'v'),
    specs.resolve(spec, l, 'o'),
    rounds=stage.rounds,
    rounding=stage.solver.value,
    n1=model_config.num_kv_heads,
    n2=model_config.num_heads,
    damp=stage.damp,
  )
  # One layer per call (compiled once), not a vmap over layers: batched LAPACK
  # calls (pinv, Cholesky) of several layers running at once deadlock jaxlib's CPU
  # thread pool on 2-core machines (see core.pairs.inv).
  out, hist = {}, []
  for l in range(model_config.num_layers):
    out[(l, 'v')], out[(l, 'o')], h = fn(v[l], o[l], l)
    hist.append(np.asarray(h))  # waits for this layer before the next is dispatched
  return (out, np.stack(hist)) if return_history else out
