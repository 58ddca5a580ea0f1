"""Model adapters for paired transforms and pair adaptive rounding (SPEC §4, §5).

Maps a model's param tree (``cafeq_jax.models.linears`` matrix view, stacked over
layers) onto the pure math in ``core.pairs`` and ``core.rounding``. Settings come
from a ``QuantConfig`` (read with ``getattr`` and these defaults):

  spec                  QuantSpec of every matrix
  matrices              which linears are quantized (a pair is transformed when
                        either of its matrices is)
  pairs                 ('vo', 'qk', 'updown')
  pair_loss             'lse' (paper: smooth max of ranges) | 'product' | 'both'
  pair_steps            200
  pair_learning_rate    5e-3
  pair_temperature      0.05
  pair_eval_every       5   (actual product error evaluated every k steps)
  ste                   'round'
  ar_rounds             3
  ar_solver             'gptq' ('rtn' = the paper's form)
  gptq_damp             0.01
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cafeq_jax import quantizer as qz
from cafeq_jax.core import pairs as pairs_lib
from cafeq_jax.core import rounding
from cafeq_jax.models import linears

PAIR_MATRICES = {'vo': ('v', 'o'), 'qk': ('q', 'k'), 'updown': ('up', 'down')}
_ALL = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')


def _geometry(cfg) -> pairs_lib.PairGeometry:
  return pairs_lib.PairGeometry(num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                                head_dim=cfg.head_dim, hidden_dim=cfg.hidden_dim)


def pair_opt_config(quant_config) -> pairs_lib.PairOptConfig:
  """The ``core.pairs.PairOptConfig`` described by ``quant_config``."""
  return pairs_lib.PairOptConfig(
      loss=getattr(quant_config, 'pair_loss', 'lse'),
      steps=int(getattr(quant_config, 'pair_steps', 200)),
      learning_rate=float(getattr(quant_config, 'pair_learning_rate', 5e-3)),
      temperature=float(getattr(quant_config, 'pair_temperature', 0.05)),
      eval_every=int(getattr(quant_config, 'pair_eval_every', 5)),
      ste=getattr(quant_config, 'ste', 'round'))


def _spec(quant_config) -> qz.QuantSpec:
  spec = getattr(quant_config, 'spec', None)
  if not isinstance(spec, qz.QuantSpec):
    raise TypeError(f'quant_config.spec must be a QuantSpec; got {spec!r}.')
  return spec


def apply_pair_transforms(params: dict, model_config, quant_config,
                          key: jax.Array | None = None) -> tuple[dict, dict[str, Any]]:
  """Learns and folds the pair transforms; the fp model's function is unchanged.

  Args:
    params: fp model params (gemma Flax layout).
    model_config: ``cafeq_jax.models.ModelConfig``.
    quant_config: a ``QuantConfig`` (fields above).
    key: unused (identity init, deterministic); kept for the method signature.

  Returns:
    ``(params, report)``: params with transforms folded (projection leaves float32)
    and ``report[kind] = {'before': [L], 'after': [L], 'seconds': float}``, the RTN
    pair product error per layer with the identity and with the learned transform.
  """
  del key
  spec = _spec(quant_config)
  chosen = tuple(getattr(quant_config, 'matrices', _ALL))
  kinds = tuple(getattr(quant_config, 'pairs', pairs_lib.PAIR_KINDS))
  for kind in kinds:
    if kind not in PAIR_MATRICES:
      raise ValueError(f'pair kind {kind!r}; expected one of {tuple(PAIR_MATRICES)}.')
  opt = pair_opt_config(quant_config)
  geom = _geometry(model_config)
  mats = {n: jnp.asarray(w, jnp.float32)
          for n, w in linears.get_linears(params, model_config).items()}
  report: dict[str, Any] = {}
  for kind in kinds:
    na, nb = PAIR_MATRICES[kind]
    if na not in chosen and nb not in chosen:
      continue
    t0 = time.perf_counter()
    p, e0, e1, _ = pairs_lib.optimize_pair(kind, geom, mats[na], mats[nb], spec, spec, opt)
    mats[na], mats[nb] = pairs_lib.fold(kind, geom, mats[na], mats[nb], p)
    e0, e1 = np.asarray(e0), np.asarray(e1)
    report[kind] = {'before': e0.tolist(), 'after': e1.tolist(),
                    'seconds': time.perf_counter() - t0,
                    'total_before': float(e0.sum()), 'total_after': float(e1.sum())}
  return linears.set_linears(params, model_config, mats), report


def adaptive_round_pairs(params: dict, model_config, quant_config, *,
                         return_history: bool = False):
  """Adaptive rounding of the value/output pair of every layer (SPEC §5).

  Per layer, ``W1 = v`` ``(D, K*hd)`` and ``W2 = o`` ``(H*hd, D)`` with the GQA block
  structure (``n1 = K`` value groups, ``n2 = H`` output heads; ``W2`` for KV group
  ``k`` is its query heads' ``W_O^h`` side by side), one layer per call.

  Returns:
    ``{(layer, 'v'): QArray (D, K*hd), (layer, 'o'): QArray (H*hd, D)}`` (empty when
    'v' and 'o' are not both quantized); with ``return_history`` also
    ``history`` ``(L, n_candidates)`` product errors (RTN first).
  """
  spec = _spec(quant_config)
  chosen = tuple(getattr(quant_config, 'matrices', _ALL))
  if 'v' not in chosen or 'o' not in chosen:
    return ({}, None) if return_history else {}
  mats = linears.get_linears(params, model_config)
  v = jnp.asarray(mats['v'], jnp.float32)
  o = jnp.asarray(mats['o'], jnp.float32)
  for w in (v, o):
    qz.validate_weight(w, spec)
  fn = lambda a, b: rounding.adaptive_round_pair(
      a, b, spec, spec, rounds=int(getattr(quant_config, 'ar_rounds', 3)),
      rounding=getattr(quant_config, 'ar_solver', 'gptq'),
      n1=model_config.num_kv_heads, n2=model_config.num_heads,
      damp=float(getattr(quant_config, 'gptq_damp', 0.01)))
  # One layer per call (compiled once), not a vmap over layers: batched LAPACK
  # calls (pinv, Cholesky) of several layers running at once deadlock jaxlib's CPU
  # thread pool on 2-core machines (see core.pairs.inv).
  out, hist = {}, []
  for l in range(model_config.num_layers):
    out[(l, 'v')], out[(l, 'o')], h = fn(v[l], o[l])
    hist.append(np.asarray(h))  # waits for this layer before the next is dispatched
  return (out, np.stack(hist)) if return_history else out
