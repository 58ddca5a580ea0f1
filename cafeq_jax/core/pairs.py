"""Paired transforms folded into the weights: exact, no inference cost.

Math and notation: docs/method.md#paired-matrices.

Two weights that meet directly admit ``(W1 T)(T⁻¹ W2)``. Three kinds, each with an
identity init, a ``fold`` (arrays in, arrays out, batched over leading dims such
as layers) and the orientation of its pair product:

* ``'vo'``: value/output per KV group. ``v`` ``(D, K*hd)``, ``o`` ``(H*hd, D)``;
  a dense ``M_k`` ``(hd, hd)`` per KV group: ``v_k → v_k M_k`` and, for each query
  head ``h`` of group ``k`` (``h // (H/K) == k``), ``o_h → M_k⁻¹ o_h``. Exact because
  the attention-weighted sum of values is linear and per head.
* ``'qk'``: query/key with RoPE in between (half-split RoPE: coordinates ``i`` and
  ``i + hd/2`` form frequency pair ``i``). Per KV group and frequency pair, a scaled
  rotation ``a R(θ)`` on the query side and its inverse-transpose ``a⁻¹ R(θ)`` on the
  key side. Scaled 2x2 rotations commute with every RoPE rotation, so
  ``⟨RoPE(q T), RoPE(k T⁻ᵀ)⟩ = ⟨RoPE(q), RoPE(k)⟩`` for all positions. With GQA the
  key head is shared by ``H/K`` query heads, which therefore share its transform.
  Parameters ``(log a, θ)`` ``(K, hd/2)`` each.
* ``'updown'``: MLP. ``(act(x W_gate) ⊙ (x W_up)) W_down`` is invariant under
  ``W_up → W_up D``, ``W_down → D⁻¹ W_down`` for diagonal ``D``; parameter
  ``log d`` ``(F,)``; the gate is untouched.

Pair products (what the model consumes; ``rounding.pair_product_error``): ``vo``:
``v_k o_h`` per query head; ``qk``: ``q_h k_kᵀ`` per query head (the bilinear form at
relative position 0); ``updown``: ``W_up W_down`` (the gate's elementwise factor is
ignored: a data-free proxy).

Training (``optimize_pair``): Adam on the parameters of every layer at once (the
loss is a sum over layers and Adam is per-coordinate, so layers are independent),
with either
* ``'lse'`` (the paper): a smooth maximum ``t·logsumexp(r/t)`` of the quantization
  ranges ``r`` (max - min per group and column; 2·max|w| when symmetric) of both
  transformed matrices, with relative temperature ``t = τ·mean(r)``; the loss is
  the sum over the two matrices of ``log smax(r)``, invariant to ``T → cT``;
* ``'product'``: the quantized pair product error through the straight-through
  quantizer.
The iterate with the lowest *actual* RTN product error is kept per layer
(the identity is a candidate, so the result is never worse than no transform).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from cafeq_jax import enums
from cafeq_jax import quantizer as qz
from cafeq_jax.core import proxy
from cafeq_jax.core import rounding
from cafeq_jax.core import transforms
from cafeq_jax.core import xla_cpu


class PairKind(enum.StrEnum):
  """Pairs of matrices that meet directly in the graph (a transform folds into both)."""

  VO = 'vo'  # value / output, per KV group
  QK = 'qk'  # query / key, RoPE-commuting 2x2 scaled rotations
  UPDOWN = 'updown'  # MLP up / down, a diagonal on the hidden units


class PairLoss(enum.StrEnum):
  """Objective of the pair-transform optimisation."""

  LSE = 'lse'  # smooth max of the quantization ranges (the paper)
  PRODUCT = 'product'  # STE product error
  BOTH = 'both'  # lse for the first half of the steps, product after


PAIR_KINDS = tuple(m.value for m in PairKind)
_HI = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------------
# Folding.


def _group_index(num_heads: int, num_kv_heads: int):
  if num_heads % num_kv_heads:
    raise ValueError(f'num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}.')
  return jnp.arange(num_heads) // (num_heads // num_kv_heads)


def vo_init(num_kv_heads: int, head_dim: int, batch_shape: tuple[int, ...] = ()):
  """Identity ``M``: ``(*batch, K, hd, hd)`` float32."""
  eye = jnp.eye(head_dim, dtype=jnp.float32)
  return jnp.broadcast_to(eye, (*batch_shape, num_kv_heads, head_dim, head_dim))


# Gauss-Jordan, plain XLA ops: jnp.linalg.inv's LAPACK call deadlocks on 2-core
# CPUs inside the optimisation (see transforms.gauss_jordan_inverse).
inv = transforms.gauss_jordan_inverse


def vo_fold(v: jax.Array, o: jax.Array, m: jax.Array, *, num_heads: int):
  """Folds ``M`` into value/output.

  Args:
    v: ``(..., D, K*hd)`` value matrix view. o: ``(..., H*hd, D)`` output view.
    m: ``(..., K, hd, hd)`` per KV group, invertible.
    num_heads: ``H``.

  Returns:
    ``(v M, M⁻¹ o)`` with the block structure above, same shapes and dtypes.
  """
  *lead, d, khd = v.shape
  k, hd = m.shape[-3], m.shape[-1]
  if khd != k * hd or o.shape[-2] != num_heads * hd:
    raise ValueError(
      f'v {tuple(v.shape)}, o {tuple(o.shape)} and m {tuple(m.shape)} '
      f'do not agree for num_heads={num_heads}.'
    )
  grp = _group_index(num_heads, k)
  m32 = m.astype(jnp.float32)
  vb = v.astype(jnp.float32).reshape(*lead, d, k, hd)
  v2 = jnp.einsum('...dki,...kij->...dkj', vb, m32, precision=_HI).reshape(v.shape)
  minv = inv(m32)[..., grp, :, :]  # (..., H, hd, hd)
  ob = o.astype(jnp.float32).reshape(*lead, num_heads, hd, o.shape[-1])
  o2 = jnp.einsum('...hij,...hjd->...hid', minv, ob, precision=_HI).reshape(o.shape)
  return v2.astype(v.dtype), o2.astype(o.dtype)


def qk_init(num_kv_heads: int, head_dim: int, batch_shape: tuple[int, ...] = ()):
  """Identity ``(log_scale, angle)``, each ``(*batch, K, hd/2)`` float32."""
  if head_dim % 2:
    raise ValueError(f'head_dim={head_dim} must be even for RoPE pairs.')
  z = jnp.zeros((*batch_shape, num_kv_heads, head_dim // 2), jnp.float32)
  return z, z


def _rotate_pairs(w, scale, cos, sin):
  """Columns of ``w`` ``(..., D, n, hd)``: pairs (i, i+hd/2) -> scale * R(θ_i) applied."""
  half = w.shape[-1] // 2
  x1, x2 = w[..., :half], w[..., half:]
  s, c, sn = scale[..., None, :, :], cos[..., None, :, :], sin[..., None, :, :]
  return jnp.concatenate([s * (c * x1 - sn * x2), s * (sn * x1 + c * x2)], axis=-1)


def qk_fold(q: jax.Array, k: jax.Array, params, *, num_heads: int):
  """Folds per-frequency scaled rotations into query/key.

  Args:
    q: ``(..., D, H*hd)``. k: ``(..., D, K*hd)`` (half-split RoPE layout per head).
    params: ``(log_scale, angle)`` each ``(..., K, hd/2)``.
    num_heads: ``H``.

  Returns:
    ``(q', k')``: query head ``h`` of KV group ``g`` gets ``a_g R(θ_g)`` on each
    frequency pair, key head ``g`` gets ``a_g⁻¹ R(θ_g)`` (the inverse-transpose).
  """
  log_a, theta = params
  kh, half = log_a.shape[-2], log_a.shape[-1]
  hd = 2 * half
  *lead, d, hhd = q.shape
  if hhd != num_heads * hd or k.shape[-1] != kh * hd:
    raise ValueError(
      f'q {tuple(q.shape)}, k {tuple(k.shape)} and params '
      f'{tuple(log_a.shape)} do not agree for num_heads={num_heads}.'
    )
  grp = _group_index(num_heads, kh)
  cos, sin = jnp.cos(theta), jnp.sin(theta)
  qb = q.astype(jnp.float32).reshape(*lead, d, num_heads, hd)
  q2 = _rotate_pairs(qb, jnp.exp(log_a)[..., grp, :], cos[..., grp, :], sin[..., grp, :])
  kb = k.astype(jnp.float32).reshape(*lead, d, kh, hd)
  k2 = _rotate_pairs(kb, jnp.exp(-log_a), cos, sin)
  return q2.reshape(q.shape).astype(q.dtype), k2.reshape(k.shape).astype(k.dtype)


def updown_init(hidden_dim: int, batch_shape: tuple[int, ...] = ()):
  """Identity ``log d``: ``(*batch, F)`` float32."""
  return jnp.zeros((*batch_shape, hidden_dim), jnp.float32)


def updown_fold(up: jax.Array, down: jax.Array, log_d: jax.Array):
  """``(up D, D⁻¹ down)`` with ``D = diag(exp(log_d))``; up ``(..., D, F)``, down ``(..., F, D)``."""
  d = jnp.exp(log_d.astype(jnp.float32))
  return (
    (up.astype(jnp.float32) * d[..., None, :]).astype(up.dtype),
    (down.astype(jnp.float32) / d[..., :, None]).astype(down.dtype),
  )


# ----------------------------------------------------------------------------------
# Pair description: fold + product orientation, per kind.


@dataclasses.dataclass(frozen=True)
class PairGeometry:
  """Static shapes of one layer's attention/MLP for the pair kinds."""

  num_heads: int
  num_kv_heads: int
  head_dim: int
  hidden_dim: int


def init_params(kind: PairKind, geom: PairGeometry, batch_shape: tuple[int, ...] = ()):
  """Identity transform parameters of ``kind`` with leading ``batch_shape``."""
  if kind == 'vo':
    return vo_init(geom.num_kv_heads, geom.head_dim, batch_shape)
  if kind == 'qk':
    return qk_init(geom.num_kv_heads, geom.head_dim, batch_shape)
  if kind == 'updown':
    return updown_init(geom.hidden_dim, batch_shape)
  raise ValueError(f'pair kind {kind!r}; expected one of {PAIR_KINDS}.')


def fold(kind: PairKind, geom: PairGeometry, a: jax.Array, b: jax.Array, params):
  """Folds ``params`` into the pair ``(a, b)`` in matrix-view layout.

  ``vo``: ``(v, o)``; ``qk``: ``(q, k)``; ``updown``: ``(up, down)``.
  """
  if kind == 'vo':
    return vo_fold(a, b, params, num_heads=geom.num_heads)
  if kind == 'qk':
    return qk_fold(a, b, params, num_heads=geom.num_heads)
  if kind == 'updown':
    return updown_fold(a, b, params)
  raise ValueError(f'pair kind {kind!r}; expected one of {PAIR_KINDS}.')


def product_error(kind: PairKind, geom: PairGeometry, a, b, a_hat, b_hat) -> jax.Array:
  """Pair product error of one layer (matrix views, unbatched), f32 scalar."""
  if kind == 'vo':
    return rounding.pair_product_error(a, b, a_hat, b_hat, n1=geom.num_kv_heads, n2=geom.num_heads)
  if kind == 'qk':
    return rounding.pair_product_error(
      a, b.T, a_hat, b_hat.T, n1=geom.num_heads, n2=geom.num_kv_heads
    )
  if kind == 'updown':
    # Dense form: Gram matrices would be (F, F), far bigger than W_up W_down.
    d = jnp.matmul(a - a_hat, b, precision=_HI) + jnp.matmul(a_hat, b - b_hat, precision=_HI)
    return jnp.sum(d * d)
  raise ValueError(f'pair kind {kind!r}; expected one of {PAIR_KINDS}.')


def _ranges(w: jax.Array, spec: qz.QuantSpec) -> jax.Array:
  """Per (group, column) quantization range of ``w`` ``(d_in, d_out)``, flattened."""
  g = spec.effective_group_size(w.shape[-2])
  wg = w.reshape(w.shape[-2] // g, g, w.shape[-1])
  if spec.symmetric:
    r = 2.0 * jnp.max(jnp.abs(wg), axis=-2)
  else:
    r = jnp.maximum(jnp.max(wg, axis=-2), 0.0) - jnp.minimum(jnp.min(wg, axis=-2), 0.0)
  return r.reshape(-1)


def lse_range_loss(
  ws: tuple[jax.Array, ...], specs: tuple[qz.QuantSpec, ...], temperature: float
) -> jax.Array:
  """``Σ_m log smax_t(r_m)``: smooth max of each matrix's group ranges (paper's loss).

  ``smax_t(r) = t·logsumexp(r / t)``, ``t = temperature · mean(r)`` (stop-gradient),
  so the loss is invariant to scaling one factor up and the other down.
  """
  total = 0.0
  for w, spec in zip(ws, specs):
    r = _ranges(w, spec)
    t = temperature * jax.lax.stop_gradient(jnp.mean(r)) + 1e-30
    total = total + jnp.log(t * jax.nn.logsumexp(r / t))
  return total


# ----------------------------------------------------------------------------------
# Optimisation.


@dataclasses.dataclass(frozen=True)
class PairOptConfig:
  """Optimisation of a pair transform.

  Attributes:
    loss: 'lse' (smooth max of ranges, the paper), 'product' (STE product error)
      or 'both' (lse for the first half of the steps, product for the rest).
    steps: Adam steps.
    learning_rate: Adam learning rate (the paper's useful range is 1e-3..1e-2).
    temperature: relative temperature of the smooth max.
    eval_every: evaluate the actual RTN product error every this many steps (and at
      the end); the best evaluated iterate is kept.
    ste: gradient through the quantizer for 'product': 'full' (``fake_quant``) or
      'round' (``core.proxy.round_ste_quant``: the gradient also reaches the ranges).
  """

  loss: PairLoss = PairLoss.LSE
  steps: int = 200
  learning_rate: float = 5e-3
  temperature: float = 0.05
  eval_every: int = 5
  ste: proxy.Ste = proxy.Ste.ROUND

  def __post_init__(self):
    object.__setattr__(self, 'loss', enums.coerce(PairLoss, self.loss, 'loss'))
    object.__setattr__(self, 'ste', enums.coerce(proxy.Ste, self.ste, 'ste'))
    for name in ('steps', 'eval_every'):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f'{name}={v!r} must be an int, not {type(v).__name__}.')
    for name in ('learning_rate', 'temperature'):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f'{name}={v!r} must be a finite number.')
    if self.steps < 0 or self.eval_every < 1:
      raise ValueError(f'steps={self.steps} must be >= 0 and eval_every={self.eval_every} >= 1.')
    if not self.learning_rate > 0 or not self.temperature > 0:
      raise ValueError(
        f'learning_rate={self.learning_rate} and temperature={self.temperature} must be > 0.'
      )


@functools.partial(xla_cpu.hot_jit, static_argnames=('kind', 'geom', 'spec_a', 'spec_b', 'config'))
def _optimize_jit(a, b, params0, kind, geom, spec_a, spec_b, config):
  def layer_fold(p, a_l, b_l):
    return fold(kind, geom, a_l, b_l, p)

  def actual(p, a_l, b_l):
    a2, b2 = layer_fold(p, a_l, b_l)
    err = product_error(
      kind, geom, a2, b2, qz.quant_dequant(a2, spec_a), qz.quant_dequant(b2, spec_b)
    )
    return jnp.where(jnp.isfinite(err), err, jnp.inf)

  def lse(p, a_l, b_l):
    a2, b2 = layer_fold(p, a_l, b_l)
    return lse_range_loss((a2, b2), (spec_a, spec_b), config.temperature)

  def prod(p, a_l, b_l):
    a2, b2 = layer_fold(p, a_l, b_l)
    return product_error(
      kind,
      geom,
      a2,
      b2,
      proxy.ste_quant(a2, spec_a, config.ste),
      proxy.ste_quant(b2, spec_b, config.ste),
    )

  actual_v = jax.vmap(actual)
  lse_v, prod_v = jax.vmap(lse), jax.vmap(prod)
  # The product loss is normalised by the identity's error so the two losses (and
  # layers) have comparable gradient scales under Adam's first steps.
  err0 = actual_v(params0, a, b)
  norm = jax.lax.stop_gradient(jnp.maximum(err0, 1e-30))

  def total(p, use_prod):
    return jax.lax.cond(
      use_prod, lambda: jnp.sum(prod_v(p, a, b) / norm), lambda: jnp.sum(lse_v(p, a, b))
    )

  opt = optax.adam(config.learning_rate)

  def keep(best, best_err, cand, err):
    better = err < best_err
    sel = lambda x, y: jnp.where(better.reshape(better.shape + (1,) * (x.ndim - 1)), x, y)
    return jax.tree.map(sel, cand, best), jnp.minimum(err, best_err)

  def step(carry, i):
    p, opt_state, best, best_err = carry
    best, best_err = jax.lax.cond(
      i % config.eval_every == 0,
      lambda: keep(best, best_err, p, actual_v(p, a, b)),
      lambda: (best, best_err),
    )
    if config.loss == 'lse':
      use_prod = jnp.asarray(False)
    elif config.loss == 'product':
      use_prod = jnp.asarray(True)
    else:
      use_prod = i >= config.steps // 2
    loss, grads = jax.value_and_grad(total)(p, use_prod)
    grads = jax.tree.map(lambda g: jnp.where(jnp.isfinite(g), g, 0.0), grads)
    updates, opt_state = opt.update(grads, opt_state, p)
    return (optax.apply_updates(p, updates), opt_state, best, best_err), loss

  init = (params0, opt.init(params0), params0, err0)
  (p, _, best, best_err), losses = jax.lax.scan(step, init, jnp.arange(config.steps))
  best, best_err = keep(best, best_err, p, actual_v(p, a, b))
  return best, err0, best_err, losses


def optimize_pair(
  kind: PairKind,
  geom: PairGeometry,
  a: jax.Array,
  b: jax.Array,
  spec_a: qz.QuantSpec,
  spec_b: qz.QuantSpec,
  config: PairOptConfig = PairOptConfig(),
  params0: Any = None,
):
  """Learns the pair transform of ``kind`` for a stack of layers in one jit.

  Args:
    kind: 'vo', 'qk' or 'updown'.
    geom: head/hidden sizes.
    a, b: ``(L, ...)`` stacked matrix views of the pair (``(v, o)``, ``(q, k)`` or
      ``(up, down)``), float32.
    spec_a, spec_b: quantizers of ``a`` and ``b``.
    config: optimisation settings.
    params0: initial parameters (default identity), leading dim ``L``.

  Returns:
    ``(params, err_identity (L,), err_best (L,), losses (steps,))``: the per-layer
    parameters with the lowest actual RTN product error seen (never worse than
    ``params0``), the errors at ``params0`` and at the result, and the training loss.
  """
  if kind not in PAIR_KINDS:
    raise ValueError(f'pair kind {kind!r}; expected one of {PAIR_KINDS}.')
  if a.ndim != 3 or b.ndim != 3 or a.shape[0] != b.shape[0]:
    raise ValueError(
      f'a {tuple(a.shape)} and b {tuple(b.shape)} must be (L, d_in, d_out) stacks with the same L.'
    )
  qz.validate_weight(a, spec_a)
  qz.validate_weight(b, spec_b)
  if params0 is None:
    params0 = init_params(kind, geom, (a.shape[0],))
  return _optimize_jit(
    jnp.asarray(a, jnp.float32),
    jnp.asarray(b, jnp.float32),
    params0,
    kind,
    geom,
    spec_a,
    spec_b,
    config,
  )
