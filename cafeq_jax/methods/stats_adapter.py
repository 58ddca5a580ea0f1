"""Per-matrix input second moments of a model, from data-free sources (and text).

Keyed like ``models.linears.get_linears``: ``{name: (L, d_in, d_in) float32}`` with
``H[l] = E[x xᵀ]`` (mean over tokens) of the input of matrix ``name`` in layer ``l``.

Sources:
* ``activation_hessians(params, cfg, tokens)``: the fp model run on given token ids
  (one pass, no quantization in the loop). With real text this is the calibration
  statistic (diagnosis / comparison only).
* ``selfgen_hessians(params, cfg, stage=SelfGenerated(...), key=)``: data-free. The model
  samples its own sequences from a start token (temperature 1 by default), and the
  statistics are taken on those: no external text is read.
* ``structural_hessians(params, cfg)``: data-free, weights only. ``diag(g²)`` of the
  RMSNorm scale for q/k/v/gate/up; for ``o`` the value projection pushed through it
  (``W_vᵀ diag(g²) W_v`` per KV group, block-diagonal per head); for ``down`` a Monte
  Carlo estimate of ``act(x W_gate) ⊙ (x W_up)`` with ``x ~ N(0, diag(g²))``.

``quantize_with_hessians`` rounds every matrix with GPTQ-form error feedback under
the given ``H`` (``core.rounding.gptq_round``) and builds the quantized param tree.
"""

from __future__ import annotations

import time
from typing import Any
from typing import Mapping
from typing import Sequence

import jax
import jax.numpy as jnp

from cafeq_jax import quantizer as qz
from cafeq_jax import recipes
from cafeq_jax.core import rounding
from cafeq_jax.core import stats
from cafeq_jax.methods import selfgen
from cafeq_jax.methods import sequential
from cafeq_jax.models import decoder
from cafeq_jax.models import linears

_HI = jax.lax.Precision.HIGHEST
MATRICES = linears.LINEAR_NAMES


def activation_hessians(
  params: dict, cfg, tokens: Any, *, batch_size: int = 8, matrices: Sequence[str] = MATRICES
) -> dict[str, jax.Array]:
  """``E[x xᵀ]`` of every selected matrix's input on ``tokens`` (fp model).

  ``methods.sequential.input_second_moments``: one pass, no quantization in the loop.

  Returns:
    ``{name: (L, d_in, d_in) float32}``, the mean over the ``N*S`` token positions.
  """
  return sequential.input_second_moments(
    params, cfg, tokens, batch_size=batch_size, matrices=tuple(matrices)
  )


def selfgen_hessians(
  params: dict,
  cfg,
  *,
  stage: recipes.SelfGenerated,
  key: jax.Array,
  matrices: Sequence[str] = MATRICES,
  return_tokens: bool = False,
):
  """Data-free ``{name: (L, d_in, d_in)}`` second moments from self-generated text.

  ``selfgen.sample_tokens`` then ``activation_hessians`` on them. With
  ``return_tokens`` also returns the ``(num_seqs, seq_len)`` tokens.
  """
  toks = selfgen.sample_tokens(params, cfg, stage, key)
  h = activation_hessians(params, cfg, toks, batch_size=stage.batch_size, matrices=matrices)
  return (h, toks) if return_tokens else h


def structural_hessians(
  params: dict, cfg, *, key: jax.Array | None = None, num_samples: int = 4096
) -> dict[str, jax.Array]:
  """Weights-only estimates ``{name: (L, d_in, d_in)}`` (see the module docstring).

  Assumes the normalised residual ``x / rms(x)`` is isotropic, so the RMSNorm
  output has ``Σ = diag(g²)``; ``o``'s input gets the value projection's second
  moment ``W_vᵀ Σ W_v`` per KV group; ``down``'s input is sampled
  (``num_samples`` Gaussian draws with ``key``, default ``PRNGKey(0)``).
  """
  key = jax.random.PRNGKey(0) if key is None else key
  mats = linears.get_linears(params, cfg)
  plus_one = bool(cfg.norm_scale_plus_one)
  g_att = jnp.stack(
    [
      jnp.asarray(params[f'layer_{l}']['pre_attention_norm']['scale'])
      for l in range(cfg.num_layers)
    ]
  )
  g_ffw = jnp.stack(
    [jnp.asarray(params[f'layer_{l}']['pre_ffw_norm']['scale']) for l in range(cfg.num_layers)]
  )
  h_att = stats.diag_from_scale(g_att, plus_one=plus_one)
  h_ffw = stats.diag_from_scale(g_ffw, plus_one=plus_one)
  h_v = stats.propagate(h_att, mats['v'])
  h_o = stats.repeat_kv_blocks(h_v, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
  gf = (1.0 + g_ffw) if plus_one else g_ffw
  z = jax.random.normal(key, (num_samples, cfg.embed_dim), jnp.float32)

  def down_h(g, wg, wu):
    x = z * g
    a = decoder.mlp_activation(jnp.matmul(x, wg, precision=_HI), cfg) * jnp.matmul(
      x, wu, precision=_HI
    )
    return stats.second_moment(a)

  h_down = jax.lax.map(lambda t: down_h(*t), (gf, mats['gate'], mats['up']))
  return {'q': h_att, 'k': h_att, 'v': h_att, 'o': h_o, 'gate': h_ffw, 'up': h_ffw, 'down': h_down}


def quantize_with_hessians(
  params: dict,
  cfg,
  spec: qz.QuantSpec,
  hessians: Mapping[str, jax.Array],
  *,
  matrices: Sequence[str] = MATRICES,
  damp: float = 0.01,
  block: int = 128,
) -> tuple[dict, dict[tuple[int, str], qz.QArray], dict[str, Any]]:
  """GPTQ-form rounding of every selected matrix under ``hessians[name]`` (no transform).

  Args:
    params: fp params. cfg: the ``ModelConfig``.
    spec: quantizer (``group_fallback`` honoured per matrix).
    hessians: ``{name: (L, d_in, d_in)}``; ``None`` for a name means RTN.
    matrices: names to quantize (leaf groups k/v and gate/up go together).
    damp, block: as in ``core.rounding.gptq_round``.

  Returns:
    ``(qparams, qarrays, info)``: the quantized tree, ``(layer, name) -> QArray``
    and ``info['seconds']`` the rounding wall time.
  """
  mats = linears.get_linears(params, cfg)
  t0 = time.perf_counter()
  qarrays: dict[tuple[int, str], qz.QArray] = {}
  for n in matrices:
    if n not in mats:
      raise ValueError(f'model has no matrix {n!r}; it has {sorted(mats)}.')
    w = jnp.asarray(mats[n], jnp.float32)
    h = hessians.get(n)
    if h is None:
      q = qz.quantize(w, spec.for_rows(w.shape[-2]))
    else:
      q = rounding.gptq_round(w, h, spec, damp=damp, block=block)
    for l in range(cfg.num_layers):
      qarrays[(l, n)] = q[l]
  qparams = linears.quantized_params(params, cfg, qarrays, {})
  jax.block_until_ready(jax.tree.leaves(qparams))
  return qparams, qarrays, {'seconds': time.perf_counter() - t0}
