"""Data-free proxy losses (docs/method.md#the-data-free-proxy-loss).

With ``Σ = E[x xᵀ] ∝ I`` the layer loss ``E||x W - x Ŵ||²`` becomes the Frobenius
proxy ``||W - Ŵ||_F²``. Every function here is batched over leading dims and
returns one loss per matrix (shape ``lead``), float32. Losses that go through the
quantizer use the straight-through ``fake_quant``: their *value* is the actual
quantized loss and their gradient treats rounding as the identity.
"""

from __future__ import annotations

import enum
import functools

import jax
import jax.numpy as jnp

from cafeq_jax import quantizer
from cafeq_jax.core import transforms


def frobenius(w: jax.Array, w_hat: jax.Array) -> jax.Array:
  """``||W - Ŵ||_F²`` per matrix.

  Args:
    w, w_hat: ``(..., d_in, d_out)``.

  Returns:
    ``(...)`` float32.
  """
  d = jnp.asarray(w, jnp.float32) - jnp.asarray(w_hat, jnp.float32)
  return jnp.sum(d * d, axis=(-2, -1))


def rtn_loss(w: jax.Array, spec: quantizer.QuantSpec) -> jax.Array:
  """Frobenius proxy of round-to-nearest: ``||W - Q(W)||²`` per matrix, ``(...)``."""
  return frobenius(w, quantizer.quant_dequant(jnp.asarray(w, jnp.float32), spec))


class Ste(enum.StrEnum):
  """Gradient through the quantizer."""

  ROUND = 'round'  # STE on the rounding only; scales (ranges) differentiable
  FULL = 'full'  # identity gradient through the whole quantizer (fake_quant)


STE_MODES = tuple(m.value for m in Ste)


def round_ste_quant(v: jax.Array, spec: quantizer.QuantSpec) -> jax.Array:
  """``quant_dequant(v)`` with a straight-through estimator on the rounding only.

  ``v̂ = s (clip(round_ste(v / s) + z) - z)`` with ``round_ste(u) = u +
  stop_gradient(round(u) - u)`` and the per-group scale ``s`` (and zero ``z``,
  itself rounded) computed from ``v`` as the quantizer does. The value equals
  ``quant_dequant(v, spec)`` (up to float rounding); unlike ``fake_quant`` (whose
  gradient is the identity, so ``||W - M⁻¹ fake_quant(M W)||²`` only sees the
  ``M⁻¹`` factor acting on a frozen error), the gradient reaches the group
  ranges: ``v̂ - v = s · r`` with ``r`` the frozen rounding residual, so the
  optimiser learns to shrink the ranges (max - min) of the quantization groups.

  For the plain uniform quantizer (no ``clip_search``, no GGML grid) the gradient
  is written out (``_round_ste_plain``): the same values as autodiff of
  ``round_ste_quant_autodiff`` (its backward on a ``(60, 576, 256)`` stack: 34 ms
  against autodiff's 54 ms on a 2-core Xeon, ``core.xla_cpu`` options on both), and
  finite on an all-zero asymmetric group (where autodiff's ``-v / s²`` at the floor
  scale is ``0 · inf``, NaN).

  Args:
    v: ``(..., d_in, d_out)`` float32.

  Returns:
    ``(..., d_in, d_out)`` float32.
  """
  v = jnp.asarray(v, jnp.float32)
  if spec.clip_search or spec.ggml_type is not None:
    return round_ste_quant_autodiff(v, spec)
  return _round_ste_plain(v, spec)


def round_ste_quant_autodiff(v: jax.Array, spec: quantizer.QuantSpec) -> jax.Array:
  """``round_ste_quant`` as the formula, differentiated by JAX (any spec)."""
  v = jnp.asarray(v, jnp.float32)
  *lead, d_in, d_out = v.shape
  g = spec.effective_group_size(d_in)
  scale, zero = quantizer.compute_scale_zero(v, spec)
  vg = v.reshape(*lead, d_in // g, g, d_out)
  s = scale[..., None, :]
  z = 0.0 if zero is None else jax.lax.stop_gradient(zero)[..., None, :]
  u = vg / s
  u = u + jax.lax.stop_gradient(jnp.round(u) - u)
  q = jnp.clip(u + z, spec.qmin, spec.qmax)
  return ((q - z) * s).reshape(v.shape)


def _tie_weight(x, bound, inside):
  """d/dx of ``max(x, bound)`` (``inside``: x > bound) with JAX's tie rule: 1, ½ at
  ``x == bound``, else 0 (``lax.max`` / ``lax.min`` split ties evenly)."""
  return jnp.where(inside, 1.0, jnp.where(x == bound, 0.5, 0.0))


def _plain_parts(v, spec):
  """Grouped ``v`` ``(..., G, g, N)``; its scale and zero ``(..., G, N)`` (zero 0
  when symmetric); ``u = v / s`` ``(..., G, g, N)``; ``u`` rounded by the STE plus
  the zero (``qz``, before the clip); and the clipped codes ``q``."""
  *lead, d_in, d_out = v.shape
  g = spec.effective_group_size(d_in)
  vg = v.reshape(*lead, d_in // g, g, d_out)
  scale, zero = quantizer.compute_scale_zero(v, spec)
  z = jnp.zeros_like(scale) if zero is None else zero
  u = vg / scale[..., None, :]
  qz = u + (jnp.round(u) - u) + z[..., None, :]
  return vg, scale, z, u, qz, jnp.clip(qz, spec.qmin, spec.qmax)


def _plain_value(v, spec):
  _, scale, z, _, _, q = _plain_parts(v, spec)
  return ((q - z[..., None, :]) * scale[..., None, :]).reshape(v.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _round_ste_plain(v: jax.Array, spec: quantizer.QuantSpec) -> jax.Array:
  return _plain_value(v, spec)


def _round_ste_plain_fwd(v, spec):
  return _plain_value(v, spec), v


def _round_ste_plain_bwd(spec, v, ct):
  """The chain rule of ``round_ste_quant_autodiff`` by hand. With ``c`` the clip's
  pass-through (1 inside ``[qmin, qmax]``, ½ on it, 0 beyond) and the STE's frozen
  residual, ``∂v̂/∂v = c`` and ``∂v̂/∂s = (q - z) - c v / s``; ``s`` comes from the group
  range ``[min(lo, 0), max(hi, 0)]`` (asymmetric) or ``max(|lo|, |hi|)``, and the
  min / max hand their gradient to the entries attaining them, split over ties."""
  vg, scale, z, u, qz, q = _plain_parts(v, spec)
  g = ct.reshape(vg.shape)
  qmin, qmax = float(spec.qmin), float(spec.qmax)
  c = jnp.where((qz > qmin) & (qz < qmax), 1.0, jnp.where((qz == qmin) | (qz == qmax), 0.5, 0.0))
  d_scale = jnp.sum(g * ((q - z[..., None, :]) - c * u), axis=-2)
  lo, hi = vg.min(axis=-2), vg.max(axis=-2)
  tiny = jnp.finfo(jnp.float32).tiny
  if spec.symmetric:
    amax = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
    d_amax = d_scale * _tie_weight(amax / spec.qmax, tiny, amax / spec.qmax > tiny) / spec.qmax
    d_lo = d_amax * _tie_weight(jnp.abs(lo), jnp.abs(hi), jnp.abs(lo) > jnp.abs(hi)) * jnp.sign(lo)
    d_hi = d_amax * _tie_weight(jnp.abs(hi), jnp.abs(lo), jnp.abs(hi) > jnp.abs(lo)) * jnp.sign(hi)
  else:
    span = jnp.maximum(hi, 0.0) - jnp.minimum(lo, 0.0)
    levels = qmax - qmin
    d_span = d_scale * _tie_weight(span / levels, tiny, span / levels > tiny) / levels
    d_lo = -d_span * _tie_weight(lo, 0.0, lo < 0.0)
    d_hi = d_span * _tie_weight(hi, 0.0, hi > 0.0)
  at_lo, at_hi = vg == lo[..., None, :], vg == hi[..., None, :]
  d_lo = d_lo / jnp.sum(at_lo, axis=-2, dtype=jnp.float32)
  d_hi = d_hi / jnp.sum(at_hi, axis=-2, dtype=jnp.float32)
  dv = g * c + jnp.where(at_lo, d_lo[..., None, :], 0.0) + jnp.where(at_hi, d_hi[..., None, :], 0.0)
  return (dv.reshape(v.shape),)


_round_ste_plain.defvjp(_round_ste_plain_fwd, _round_ste_plain_bwd)


def ste_quant(v: jax.Array, spec: quantizer.QuantSpec, ste: str | bool = 'round') -> jax.Array:
  """Quantize-dequantize ``v`` with the chosen gradient.

  ``ste``: ``'round'`` (``round_ste_quant``, default), ``'full'``
  (``quantizer.fake_quant``, identity gradient), or ``False`` (no STE:
  ``quant_dequant``, for evaluation).
  """
  if ste is False or ste is None:
    return quantizer.quant_dequant(v, spec)
  if ste is True or ste == 'round':
    return round_ste_quant(v, spec)
  if ste == 'full':
    return quantizer.fake_quant(v, spec)
  raise ValueError(f'ste={ste!r} is not supported; expected one of {STE_MODES} or False.')


def transformed_reconstruction(
  w: jax.Array,
  m: jax.Array,
  m_inv: jax.Array,
  spec: quantizer.QuantSpec,
  *,
  ste: str | bool = 'round',
) -> jax.Array:
  """``Ŵ(M) = M⁻¹ Q(M W)`` with block-diagonal ``M``.

  Args:
    w: ``(..., d_in, d_out)``.
    m, m_inv: ``(..., nb, k, k)`` blocks of ``M`` and ``M⁻¹`` (broadcast with
      ``w``'s leading dims).
    spec: the quantizer.
    ste: gradient of the quantizer (see ``ste_quant``): ``'round'`` (default),
      ``'full'``, or ``False`` for plain ``quant_dequant`` (same value).

  Returns:
    ``(..., d_in, d_out)`` float32.
  """
  v = transforms.apply_left(m, jnp.asarray(w, jnp.float32))
  v_hat = ste_quant(v, spec, ste)
  return transforms.apply_left(m_inv, v_hat)


def transformed_loss(
  w: jax.Array,
  m: jax.Array,
  m_inv: jax.Array,
  spec: quantizer.QuantSpec,
  *,
  ste: str | bool = 'round',
) -> jax.Array:
  """Single-matrix transformed loss ``||W - M⁻¹ Q(M W)||_F²`` per matrix.

  Written as ``W - M⁻¹ Q_ste(M W)``; since ``M⁻¹ M W = W`` identically this has
  the value and gradient of ``M⁻¹ (Q_ste(V) - V)`` with ``V = M W``.
  ``ste`` as in ``ste_quant``.

  Args:
    w: ``(..., d_in, d_out)``.
    m, m_inv: ``(..., nb, k, k)`` blocks of ``M`` and ``M⁻¹``.
    spec: the quantizer.

  Returns:
    ``(...)`` float32.
  """
  return frobenius(w, transformed_reconstruction(w, m, m_inv, spec, ste=ste))


def _gram_inner(a1, b1, a2, b2):
  """``<A1 B1, A2 B2>_F = tr((A1ᵀA2)(B2B1ᵀ))`` via (r x r) Grams, batched."""
  ga = jnp.einsum('...ir,...is->...rs', a1, a2)
  gb = jnp.einsum('...sj,...rj->...sr', b2, b1)
  return jnp.einsum('...rs,...sr->...', ga, gb)


def pair_loss(
  w1: jax.Array,
  w2: jax.Array,
  w1_hat: jax.Array,
  w2_hat: jax.Array,
  *,
  factored: bool | None = None,
) -> jax.Array:
  """Pair product proxy ``||W1 W2 - Ŵ1 Ŵ2||_F²`` per pair.

  Args:
    w1, w1_hat: ``(..., a, r)``.
    w2, w2_hat: ``(..., r, b)``.
    factored: evaluate without forming the ``(a, b)`` product. ``None`` picks
      the cheaper form (factored when ``r (a + b) < a b`` roughly).

  The factored form writes ``W1W2 - Ŵ1Ŵ2 = E1 W2 + Ŵ1 E2`` (``E = W - Ŵ``) and
  expands ``||E1W2||² + 2<E1W2, Ŵ1E2> + ||Ŵ1E2||²`` with ``||AB||² =
  tr((AᵀA)(BBᵀ))``; every term has the size of the error (no cancellation of
  ``||W1W2||²``-sized terms in float32).

  Returns:
    ``(...)`` float32.
  """
  f32 = lambda t: jnp.asarray(t, jnp.float32)
  w1, w2, w1_hat, w2_hat = map(f32, (w1, w2, w1_hat, w2_hat))
  if w1.shape != w1_hat.shape or w2.shape != w2_hat.shape:
    raise ValueError(
      f'pair shapes differ: w1 {w1.shape} vs w1_hat {w1_hat.shape}, '
      f'w2 {w2.shape} vs w2_hat {w2_hat.shape}.'
    )
  if w1.shape[-1] != w2.shape[-2]:
    raise ValueError(f'inner dims do not match: w1 {w1.shape} @ w2 {w2.shape}.')
  a, r = w1.shape[-2:]
  b = w2.shape[-1]
  if factored is None:
    factored = 3 * r * (a + b) < 2 * a * b
  if not factored:
    return frobenius(w1 @ w2, w1_hat @ w2_hat)
  e1, e2 = w1 - w1_hat, w2 - w2_hat
  return (
    _gram_inner(e1, w2, e1, w2)
    + 2.0 * _gram_inner(e1, w2, w1_hat, e2)
    + _gram_inner(w1_hat, e2, w1_hat, e2)
  )


def pair_quant_loss(
  w1: jax.Array,
  w2: jax.Array,
  spec1: quantizer.QuantSpec,
  spec2: quantizer.QuantSpec | None = None,
  *,
  ste: str | bool = 'round',
  factored: bool | None = None,
) -> jax.Array:
  """``||W1 W2 - Q(W1) Q(W2)||²`` per pair; ``ste`` as in ``ste_quant``."""
  spec2 = spec1 if spec2 is None else spec2
  return pair_loss(w1, w2, ste_quant(w1, spec1, ste), ste_quant(w2, spec2, ste), factored=factored)
