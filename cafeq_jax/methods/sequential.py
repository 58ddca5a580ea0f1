"""Sequential rounding under captured input statistics (self-generated or calibration).

Layers are quantized in order, and each layer's inputs come from the model whose
earlier matrices are already quantized; within a layer it is "true-sequential":
q/k/v are rounded for the normed block input, ``o`` for its input recomputed with
the quantized q/k/v, gate/up for the MLP input after the quantized attention, and
``down`` for its input recomputed with the quantized gate/up. The inputs are read
from the decoder itself (``models.decoder.Block``'s sub-layer methods and the
``'intermediates'`` its modules sow, ``decoder.LINEAR_INPUTS``): nothing of the
model is re-implemented here.

Each matrix is rounded with GPTQ-form error feedback (``core.rounding.gptq_round``)
under ``H = Σ_tokens x xᵀ`` of its input. With an online transform ``(M, M⁻¹)``
the stored matrix is ``V = M W`` and the model computes ``(x M⁻¹) V̂``, so ``V``
is rounded under ``M⁻ᵀ H M⁻¹`` (the same layer loss ``||X (W - M⁻¹V̂)||²``) and the
later stages see ``M⁻¹ V̂``. The GPTQ baseline (calibration tokens) and CafeQ's
self-generated statistics run through this one engine.
"""

from __future__ import annotations

import functools
import operator
import time
from typing import Any
from typing import Mapping

import jax
import jax.numpy as jnp

from cafeq_jax import quantizer as qz
from cafeq_jax import recipes
from cafeq_jax import specs
from cafeq_jax.core import rounding
from cafeq_jax.core import stats
from cafeq_jax.core import transforms
from cafeq_jax.models import decoder
from cafeq_jax.models import linears
from cafeq_jax.models.config import ModelConfig

_HI = jax.lax.Precision.HIGHEST
Block = decoder.Block
# Per sub-layer: its method, the method giving its first matrices' input, the method
# finishing it from its last matrix's sown input, and the matrices of those two inputs.
_SUBLAYERS = (
  (Block.attend, Block.attention_input, Block.attention_output, (('q', 'k', 'v'), ('o',))),
  (Block.feed_forward, Block.mlp_input, Block.mlp_output, (('gate', 'up'), ('down',))),
)


def check_tokens(tokens, cfg: ModelConfig) -> jax.Array:
  """``tokens`` as ``(num_seqs, seq_len)`` int32 ids, or a ValueError naming the problem."""
  tokens = jnp.asarray(tokens)
  if tokens.ndim != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 1:
    raise ValueError(f'tokens must be (num_seqs, seq_len) ints; got shape {tuple(tokens.shape)}.')
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f'tokens must be integer ids; got dtype {tokens.dtype}.')
  lo, hi = int(tokens.min()), int(tokens.max())
  if lo < 0 or hi >= cfg.vocab_size:
    raise ValueError(f'token ids must lie in [0, {cfg.vocab_size}); got [{lo}, {hi}].')
  return tokens.astype(jnp.int32)


def _positions(x):
  B, S = x.shape[:2]
  return jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))


def _sublayer_args(x, method) -> tuple:
  return (x, _positions(x)) if method is Block.attend else (x,)


@functools.partial(jax.jit, static_argnames=('cfg', 'attn_type', 'method'))
def _run(layer, x, cfg, attn_type, method):
  """A sub-layer method of one block: ``(output, sown intermediates)``."""
  out, state = Block(cfg, attn_type).apply(
    {'params': layer}, *_sublayer_args(x, method), method=method, mutable=['intermediates']
  )
  return (out[0] if method is Block.attend else out), state.get('intermediates', {})


@functools.partial(jax.jit, static_argnames=('cfg', 'attn_type', 'method', 'sown'))
def _sown_input(layer, x, cfg, attn_type, method, sown):
  """The input that a sub-layer method of one block sows for its last matrix,
  ``sown = (module, field)`` (``decoder.LINEAR_INPUTS``), without the rest of the
  sub-layer: XLA drops that matrix's projection and the residual, which nothing reads."""
  module, field = sown
  return _run(layer, x, cfg, attn_type, method)[1][module][field][0]


@functools.partial(jax.jit, static_argnames=('cfg', 'attn_type', 'method'))
def sublayer(layer, x, cfg, attn_type: str, method) -> jax.Array:
  """One block's sub-layer with its residual, ``Block.attend`` (positions ``0..S-1``,
  no cache) or ``Block.feed_forward``: ``x`` ``(B, S, D)`` -> ``(B, S, D)``."""
  out = Block(cfg, attn_type).apply({'params': layer}, *_sublayer_args(x, method), method=method)
  return out[0] if method is Block.attend else out


@functools.partial(jax.jit, static_argnames=('cfg', 'attn_type', 'method'))
def _apply(layer, args, cfg, attn_type, method):
  """``Block.<method>(*args)`` of one block (no sown values)."""
  return Block(cfg, attn_type).apply({'params': layer}, *args, method=method)


_gram = jax.jit(stats.gram)


@functools.partial(jax.jit, static_argnames=('spec',))
def _layer_losses(w, w_hat, h, spec):
  """``||X(W - Ŵ)||²`` of the rounded ``Ŵ`` and of RTN's (the report's pair)."""
  return stats.weighted_loss(w, w_hat, h), stats.weighted_loss(w, qz.quant_dequant(w, spec), h)


def _batches(xs, batch):
  return [xs[i : i + batch] for i in range(0, xs.shape[0], batch)]


@jax.jit
def _transform_gram(h: jax.Array, m_inv: jax.Array) -> jax.Array:
  """``M⁻ᵀ H M⁻¹`` for ``h`` ``(d, d)`` and ``M⁻¹`` blocks ``(nb, k, k)``."""
  t = transforms.block_diag(m_inv)
  return jnp.matmul(t.T, jnp.matmul(h, t, precision=_HI), precision=_HI)


_apply_left = jax.jit(transforms.apply_left)


def _round_matrix(w, h, transform, spec, gptq):
  """GPTQ-form rounding of ``w`` under ``h``, behind ``transform = (M, M⁻¹)`` if any:
  the stored matrix's ``QArray`` and its effective ``Ŵ`` in the original basis."""
  if transform is None:
    q = gptq(w, h, spec)
    return q, qz.dequantize(q)
  m, m_inv = transform
  q = gptq(_apply_left(m, w), _transform_gram(h, m_inv), spec)
  return q, _apply_left(m_inv, qz.dequantize(q))


def round_sequential(
  params: dict,
  cfg: ModelConfig,
  tokens,
  *,
  spec: specs.Spec,
  matrices: tuple[str, ...],
  rounding_stage: recipes.GPTQ,
  batch_size: int = 8,
  blocks: Mapping[tuple[int, str], tuple[jax.Array, jax.Array]] | None = None,
) -> tuple[dict[tuple[int, str], qz.QArray], dict[str, Any]]:
  """Sequential GPTQ-form rounding of every selected matrix on ``tokens``.

  Args:
    params: fp model params (pair transforms possibly folded in).
    cfg: the ``ModelConfig``.
    tokens: ``(N, S)`` int token ids (calibration or self-generated).
    spec: the quantizer (or one per matrix: ``specs.SpecMap``).
    matrices: names to quantize (``linears.check_matrices``).
    rounding_stage: damping, act order and block size of the rounding.
    batch_size: sequences per forward pass.
    blocks: optional ``(layer, name) -> (M, M⁻¹)`` blocks ``(nb, k, k)``: those
      matrices are stored as ``V = M W`` and rounded under ``M⁻ᵀ H M⁻¹``.

  Returns:
    ``(qarrays, report)``: ``(layer, name) -> QArray`` of the stored matrix;
    ``report['layer_loss'][name]`` lists per layer ``||X(W-Ŵ)||²`` on these
    tokens, ``report['rtn_layer_loss'][name]`` that of RTN, ``report['seconds']``.
  """
  tokens = check_tokens(tokens, cfg)
  blocks = blocks or {}
  chosen = linears.check_matrices(matrices)
  gptq = functools.partial(
    rounding.gptq_round,
    damp=rounding_stage.damp,
    block=rounding_stage.block,
    act_order=rounding_stage.act_order,
  )
  t0 = time.perf_counter()
  table = params['embedder']['input_embedding']
  xs = jnp.concatenate([decoder.embed_tokens(table, t, cfg) for t in _batches(tokens, batch_size)])
  qarrays: dict[tuple[int, str], qz.QArray] = {}
  report: dict[str, Any] = {
    'layer_loss': {n: [] for n in chosen},
    'rtn_layer_loss': {n: [] for n in chosen},
    'tokens': int(tokens.size),
  }
  losses = []  # (name, loss, RTN's loss) as device scalars, read once at the end

  def round_into(l, layer, mats, names, h):
    """Rounds matrices ``names`` of layer ``l`` under ``h``: the layer with their ``Ŵ``."""
    for n in names:
      w, spec_n = mats[n], specs.resolve(spec, l, n)
      qarrays[(l, n)], mats[n] = _round_matrix(w, h, blocks.get((l, n)), spec_n, gptq)
      losses.append((n, *_layer_losses(w, mats[n], h, spec_n)))
    return linears.set_layer_matrices(layer, cfg, mats)

  for l, attn_type in enumerate(cfg.attention_types):
    layer = params[f'layer_{l}']
    mats = {n: jnp.asarray(w, jnp.float32) for n, w in linears.layer_matrices(layer, cfg).items()}
    for method, first_input, finish, (first, last) in _SUBLAYERS:
      batches = _batches(xs, batch_size)
      names = tuple(n for n in first if n in chosen)
      if names:
        h = functools.reduce(
          operator.add, (_gram(_apply(layer, (xb,), cfg, attn_type, first_input)) for xb in batches)
        )
        layer = round_into(l, layer, mats, names, h)
      # The sub-layer once, its first matrices rounded: its output, or the input of its
      # last matrix, which is then rounded and the sub-layer finished from that input.
      names = tuple(n for n in last if n in chosen)
      if names:
        sown = decoder.LINEAR_INPUTS[names[0]]
        inputs = [_sown_input(layer, xb, cfg, attn_type, method, sown) for xb in batches]
        layer = round_into(
          l, layer, mats, names, functools.reduce(operator.add, map(_gram, inputs))
        )
        outs = [_apply(layer, (xb, a), cfg, attn_type, finish) for xb, a in zip(batches, inputs)]
      else:
        outs = [_run(layer, xb, cfg, attn_type, method)[0] for xb in batches]
      xs = jnp.concatenate(outs)
  for n, loss, rtn in jax.device_get(losses):
    report['layer_loss'][n].append(float(loss))
    report['rtn_layer_loss'][n].append(float(rtn))
  report['seconds'] = time.perf_counter() - t0
  return qarrays, report


def input_second_moments(
  params: dict,
  cfg: ModelConfig,
  tokens,
  *,
  batch_size: int = 8,
  matrices: tuple[str, ...] = linears.LINEAR_NAMES,
) -> dict[str, jax.Array]:
  """``E[x xᵀ]`` of every selected matrix's input on ``tokens`` (fp model, one pass).

  Returns:
    ``{name: (L, d_in, d_in) float32}``, the mean over the ``N*S`` token positions.
  """
  tokens = check_tokens(tokens, cfg)
  chosen = tuple(matrices)
  unknown = [n for n in chosen if n not in linears.LINEAR_NAMES]
  if unknown:
    raise ValueError(f'unknown matrices {unknown}; expected names from {linears.LINEAR_NAMES}.')
  table = params['embedder']['input_embedding']
  xs = [decoder.embed_tokens(table, t, cfg) for t in _batches(tokens, batch_size)]
  out: dict[str, list[jax.Array]] = {n: [] for n in chosen}
  for l, attn_type in enumerate(cfg.attention_types):
    layer = params[f'layer_{l}']
    acc: dict[tuple[str, str], jax.Array] = {}
    for method, *_ in _SUBLAYERS:
      nxt = []
      for xb in xs:
        y, sown = _run(layer, xb, cfg, attn_type, method)
        for module, vals in sown.items():
          for name, (a,) in vals.items():
            g = stats.gram(a)
            acc[(module, name)] = g if (module, name) not in acc else acc[(module, name)] + g
        nxt.append(y)
      xs = nxt
    for n in chosen:
      out[n].append(acc[decoder.LINEAR_INPUTS[n]] / tokens.size)
  return {n: jnp.stack(v) for n, v in out.items()}


def input_moment_blocks(
  params: dict,
  cfg: ModelConfig,
  tokens,
  *,
  block_size: int,
  damp: float,
  matrices: tuple[str, ...] = linears.LINEAR_NAMES,
  batch_size: int = 8,
) -> dict[tuple[int, str], jax.Array]:
  """Diagonal ``k x k`` blocks of every selected matrix's input second moment.

  The weighting of ``Learned(loss='input')``: ``E[x xᵀ]`` on ``tokens`` through the
  fp model (``input_second_moments``), scaled to mean diagonal 1 plus ``damp`` on
  the diagonal (``core.stats.diagonal_blocks``).

  Returns:
    ``(layer, name) -> (d_in // block_size, block_size, block_size)`` float32.
  """
  moments = input_second_moments(params, cfg, tokens, batch_size=batch_size, matrices=matrices)
  out = {}
  for n, h in moments.items():
    blocks = stats.diagonal_blocks(h, block_size, damp=damp)
    out.update({(l, n): blocks[l] for l in range(blocks.shape[0])})
  return out
