"""Model adapters for paired transforms and pair adaptive rounding.

Maps a model's param tree (``cafeq_jax.models.linears`` matrix view, stacked over
layers) onto the pure math in ``core.pairs`` and ``core.rounding``
(docs/method.md, "Paired matrices" and "Adaptive rounding"). Each function
receives the recipe stage whose knobs it uses.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cafeq_jax import quantizer as qz
from cafeq_jax import recipes
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
  spec: qz.QuantSpec,
  matrices: tuple[str, ...],
) -> tuple[dict, dict[str, Any]]:
  """Learns and folds the pair transforms; the fp model's function is unchanged.

  Args:
    params: fp model params (gemma Flax layout).
    model_config: ``cafeq_jax.models.ModelConfig``.
    stage: the pair kinds and their optimiser (identity init: deterministic).
    spec: the quantizer of both matrices of every pair.
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
    p, e0, e1, _ = pairs_lib.optimize_pair(kind, geom, mats[na], mats[nb], spec, spec, stage.opt)
    mats[na], mats[nb] = pairs_lib.fold(kind, geom, mats[na], mats[nb], p)
    e0, e1 = np.asarray(e0), np.asarray(e1)
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
  spec: qz.QuantSpec,
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
  for w in (v, o):
    qz.validate_weight(w, spec)
  fn = lambda a, b: rounding.adaptive_round_pair(
    a,
    b,
    spec,
    spec,
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
    out[(l, 'v')], out[(l, 'o')], h = fn(v[l], o[l])
    hist.append(np.asarray(h))  # waits for this layer before the next is dispatched
  return (out, np.stack(hist)) if return_history else out
