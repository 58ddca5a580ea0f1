"""Data-free proxy losses (docs/method.md#the-data-free-proxy-loss).

With ``Σ = E[x xᵀ] ∝ I`` the layer loss ``E||x W - x Ŵ||²`` becomes the Frobenius
proxy ``||W - Ŵ||_F²``. Every function here is batched over leading dims and
returns one loss per matrix (shape ``lead``), float32. Losses that go through the
quantizer use the straight-through ``fake_quant``: their *value* is the actual
quantized loss and their gradient treats rounding as the identity.
"""

from __future__ import annotations

import enum

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

  Args:
    v: ``(..., d_in, d_out)`` float32.

  Returns:
    ``(..., d_in, d_out)`` float32.
  """
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
