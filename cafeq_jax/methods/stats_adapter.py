"""Per-matrix input second moments of a model, from data-free sources (and text).

Keyed like ``models.linears.get_linears``: ``{name: (L, d_in, d_in) float32}`` with
``H[l] = E[x xᵀ]`` (mean over tokens) of the input of matrix ``name`` in layer ``l``.

Sources:
* ``activation_hessians(params, cfg, tokens)``: the fp model run on given token ids
  (one pass, no quantization in the loop). With real text this is the calibration
  statistic (diagnosis / comparison only).
* ``selfgen_hessians(params, cfg, num_seqs=, seq_len=, key=)``: data-free. The model
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
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cafeq_jax import quantizer as qz
from cafeq_jax.core import rounding
from cafeq_jax.core import stats
from cafeq_jax.methods import _tree
from cafeq_jax.methods import gptq as gptq_method
from cafeq_jax.models import linears

_HI = jax.lax.Precision.HIGHEST
MATRICES = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')
# Stage of methods.gptq.capture whose output is each matrix's input.
_STAGE_OF = {'q': 'qkv', 'k': 'qkv', 'v': 'qkv', 'o': 'o', 'gate': 'gu', 'up': 'gu',
             'down': 'down'}


def _check_tokens(tokens, cfg) -> jax.Array:
  tokens = jnp.asarray(tokens, jnp.int32)
  if tokens.ndim != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 1:
    raise ValueError(f'tokens must be (num_seqs, seq_len) ints; got shape '
                     f'{tuple(tokens.shape)}.')
  if int(tokens.min()) < 0 or int(tokens.max()) >= cfg.vocab_size:
    raise ValueError(f'token ids must lie in [0, {cfg.vocab_size}); got '
                     f'[{int(tokens.min())}, {int(tokens.max())}].')
  return tokens


def activation_hessians(params: dict, cfg, tokens: Any, *, batch_size: int = 8,
                        matrices: Sequence[str] = MATRICES) -> dict[str, jax.Array]:
  """``E[x xᵀ]`` of every selected matrix's input on ``tokens`` (fp model).

  Args:
    params: fp params. cfg: the ``ModelConfig``.
    tokens: ``(N, S)`` int token ids.
    batch_size: sequences per forward chunk.
    matrices: names from ``MATRICES``.

  Returns:
    ``{name: (L, d_in, d_in) float32}``, the mean over the ``N*S`` token positions.
  """
  bad = [m for m in matrices if m not in _STAGE_OF]
  if bad:
    raise ValueError(f'unknown matrices {bad}; expected names from {MATRICES}.')
  tokens = _check_tokens(tokens, cfg)
  n_tok = tokens.size
  cap = gptq_method.capture
  xs = jnp.concatenate([gptq_method.embed(params, cfg, tokens[i:i + batch_size])
                        for i in range(0, tokens.shape[0], batch_size)])
  stages = sorted({_STAGE_OF[m] for m in matrices})
  out: dict[str, list[jax.Array]] = {m: [] for m in matrices}
  hess = jax.jit(lambda a: jnp.einsum('bsi,bsj->ij', a, a, precision=_HI))
  for l, attn_type in enumerate(cfg.attention_types):
    layer = params[f'layer_{l}']
    acc = {s: 0.0 for s in stages}
    mids, outs = [], []
    for i in range(0, xs.shape[0], batch_size):
      x = xs[i:i + batch_size]
      for s in ('qkv', 'o'):
        if s in acc:
          acc[s] = acc[s] + hess(cap(layer, x, cfg, attn_type, s))
      mid = cap(layer, x, cfg, attn_type, 'mid')
      for s in ('gu', 'down'):
        if s in acc:
          acc[s] = acc[s] + hess(cap(layer, mid, cfg, attn_type, s))
      outs.append(cap(layer, mid, cfg, attn_type, 'out'))
    xs = jnp.concatenate(outs)
    for m in matrices:
      out[m].append(acc[_STAGE_OF[m]] / n_tok)
  return {m: jnp.stack(v) for m, v in out.items()}


def selfgen_tokens(params: dict, cfg, *, num_seqs: int, seq_len: int, key: jax.Array,
                   temperature: float = 1.0, start_id: int = 0,
                   top_k: int | None = None) -> np.ndarray:
  """Sequences sampled from the model itself: ``(num_seqs, seq_len)`` int32.

  Each row is ``start_id`` followed by ``seq_len - 1`` tokens sampled at
  ``temperature`` (deterministic given ``key``). For SmolLM2 ``start_id=0`` is
  ``<|endoftext|>``, the document separator of its pretraining stream, so samples
  look like the start of a pretraining document. Nothing external is read.
  """
  from cafeq_jax.models.generate import generate  # pylint: disable=g-import-not-at-top
  if num_seqs < 1 or seq_len < 2:
    raise ValueError(f'num_seqs={num_seqs}, seq_len={seq_len}; expected >= 1 and >= 2.')
  if not 0 <= start_id < cfg.vocab_size:
    raise ValueError(f'start_id={start_id}; expected an id in [0, {cfg.vocab_size}).')
  if temperature <= 0:
    raise ValueError(f'temperature={temperature}; expected > 0 (sampling).')
  prompt = jnp.full((num_seqs, 1), start_id, jnp.int32)
  gen = generate(params, cfg, prompt, max_new_tokens=seq_len - 1,
                 temperature=float(temperature), top_k=top_k, key=key)
  return np.concatenate([np.asarray(prompt), np.asarray(gen)], axis=1).astype(np.int32)


def selfgen_hessians(params: dict, cfg, *, num_seqs: int, seq_len: int, key: jax.Array,
                     temperature: float = 1.0, start_id: int = 0,
                     batch_size: int = 8, matrices: Sequence[str] = MATRICES,
                     return_tokens: bool = False):
  """Data-free ``{name: (L, d_in, d_in)}`` second moments from self-generated text.

  ``selfgen_tokens`` then ``activation_hessians`` on them (see both). With
  ``return_tokens`` also returns the ``(num_seqs, seq_len)`` tokens (e.g. to feed
  sequential GPTQ, ``methods.gptq.quantize_gptq``, as its calibration set).
  """
  toks = selfgen_tokens(params, cfg, num_seqs=num_seqs, seq_len=seq_len, key=key,
                        temperature=temperature, start_id=start_id)
  h = activation_hessians(params, cfg, toks, batch_size=batch_size, matrices=matrices)
  return (h, toks) if return_tokens else h


def _mlp_act(cfg, x):
  return (jax.nn.gelu(x, approximate=True) if cfg.activation == 'gelu_tanh'
          else jax.nn.silu(x))


def structural_hessians(params: dict, cfg, *, key: jax.Array | None = None,
                        num_samples: int = 4096) -> dict[str, jax.Array]:
  """Weights-only estimates ``{name: (L, d_in, d_in)}`` (see the module docstring).

  Assumes the normalised residual ``x / rms(x)`` is isotropic, so the RMSNorm
  output has ``Σ = diag(g²)``; ``o``'s input gets the value projection's second
  moment ``W_vᵀ Σ W_v`` per KV group; ``down``'s input is sampled
  (``num_samples`` Gaussian draws with ``key``, default ``PRNGKey(0)``).
  """
  key = jax.random.PRNGKey(0) if key is None else key
  mats = linears.get_linears(params, cfg)
  plus_one = bool(cfg.norm_scale_plus_one)
  g_att = jnp.stack([jnp.asarray(params[f'layer_{l}']['pre_attention_norm']['scale'])
                     for l in range(cfg.num_layers)])
  g_ffw = jnp.stack([jnp.asarray(params[f'layer_{l}']['pre_ffw_norm']['scale'])
                     for l in range(cfg.num_layers)])
  h_att = stats.diag_from_scale(g_att, plus_one=plus_one)
  h_ffw = stats.diag_from_scale(g_ffw, plus_one=plus_one)
  h_v = stats.propagate(h_att, mats['v'])
  h_o = stats.repeat_kv_blocks(h_v, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
  gf = (1.0 + g_ffw) if plus_one else g_ffw
  z = jax.random.normal(key, (num_samples, cfg.embed_dim), jnp.float32)

  def down_h(g, wg, wu):
    x = z * g
    a = _mlp_act(cfg, jnp.matmul(x, wg, precision=_HI)) * jnp.matmul(x, wu, precision=_HI)
    return stats.second_moment(a)

  h_down = jax.lax.map(lambda t: down_h(*t), (gf, mats['gate'], mats['up']))
  return {'q': h_att, 'k': h_att, 'v': h_att, 'o': h_o, 'gate': h_ffw, 'up': h_ffw,
          'down': h_down}


def quantize_with_hessians(params: dict, cfg, spec: qz.QuantSpec,
                           hessians: Mapping[str, jax.Array], *,
                           matrices: Sequence[str] = MATRICES, damp: float = 0.01,
                           block: int = 128) -> tuple[dict, dict[tuple[int, str], qz.QArray],
                                                      dict[str, Any]]:
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
      qarrays[(l, n)] = _tree.slice_qarray(q, l)
  qparams = _tree.build_quantized_params(params, cfg, qarrays, {})
  jax.block_until_ready(jax.tree.leaves(qparams))
  return qparams, qarrays, {'seconds': time.perf_counter() - t0}
