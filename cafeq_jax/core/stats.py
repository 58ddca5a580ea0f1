"""Second-moment estimates ``Σ = E[x xᵀ]`` of a linear layer's inputs, and diagnostics.

Pure math on arrays (docs/method.md#the-data-free-proxy-loss); nothing here knows
about models (the model-level adapter is ``cafeq_jax.methods.stats_adapter``).

The true layer loss of a quantized ``W`` ``(d_in, d_out)`` is
``tr((W-Ŵ)ᵀ Σ (W-Ŵ))``; the data-free Frobenius proxy assumes ``Σ ∝ I``. This module
provides (i) diagnostics of how far a measured ``Σ`` is from ``∝ I`` and how much a
``Σ ∝ I`` choice of ``Ŵ`` costs under the true ``Σ``, and (ii) cheap structural
estimates of ``Σ`` from the weights alone (RMSNorm scales, propagation through a
linear map, shrinkage toward the identity).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HI = jax.lax.Precision.HIGHEST


def gram(x: jax.Array) -> jax.Array:
  """``XᵀX`` of activations ``x`` ``(..., d)`` (all leading dims are samples): ``(d, d)`` f32.

  Sums over samples (GPTQ's ``H``); sums of chunks' grams equal the gram of the
  concatenation.
  """
  x = jnp.asarray(x, jnp.float32).reshape(-1, x.shape[-1])
  return jnp.matmul(x.T, x, precision=_HI)


def second_moment(x: jax.Array) -> jax.Array:
  """``E[x xᵀ]`` over all leading dims of ``x`` ``(..., d)``: ``(d, d)`` float32."""
  x = jnp.asarray(x, jnp.float32)
  if x.ndim < 1 or x.shape[-1] < 1:
    raise ValueError(f'x must have a non-empty last dim; got shape {x.shape}.')
  x = x.reshape(-1, x.shape[-1])
  if x.shape[0] == 0:
    raise ValueError(f'x has no samples (shape {x.shape}).')
  return jnp.matmul(x.T, x, precision=_HI) / x.shape[0]


def normalize_trace(h: jax.Array) -> jax.Array:
  """``h * d / tr(h)`` (mean diagonal 1) for ``h`` ``(..., d, d)``; 0-trace stays 0."""
  h = jnp.asarray(h, jnp.float32)
  tr = jnp.trace(h, axis1=-2, axis2=-1)[..., None, None]
  return jnp.where(tr > 0, h * h.shape[-1] / jnp.where(tr > 0, tr, 1.0), h)


def diagonal_blocks(h: jax.Array, block_size: int, *, damp: float = 0.0) -> jax.Array:
  """The ``k x k`` diagonal blocks of ``h`` ``(..., d, d)``: ``(..., d // k, k, k)`` f32.

  Each matrix is first scaled to mean diagonal 1 (``normalize_trace``) and ``damp``
  is added to its diagonal (the same relative damping as GPTQ's ``H``), so every
  block is positive definite and the weighting is scale-free.
  """
  h = normalize_trace(h)
  d, k = h.shape[-1], block_size
  if k < 1 or d % k:
    raise ValueError(f'block_size={block_size!r} must divide d={d}.')
  nb = d // k
  h = h + damp * jnp.eye(d, dtype=h.dtype)
  blocks = h.reshape(*h.shape[:-2], nb, k, nb, k)
  idx = jnp.arange(nb)
  return blocks[..., idx, :, idx, :].transpose(*range(1, h.ndim - 1), 0, h.ndim - 1, h.ndim)


def top_channel_mass(h: jax.Array, k: int) -> jax.Array:
  """Fraction of ``tr(h)`` on the ``k`` largest diagonal entries: ``(...)`` float32.

  ``k/d`` for ``h ∝ I``; close to 1 when a few input channels carry the energy.
  """
  d = h.shape[-1]
  if not 1 <= k <= d:
    raise ValueError(f'k={k}; expected 1 <= k <= d={d}.')
  diag = jnp.diagonal(jnp.asarray(h, jnp.float32), axis1=-2, axis2=-1)
  top = jax.lax.top_k(diag, k)[0]
  return jnp.sum(top, -1) / jnp.sum(diag, -1)


def effective_rank(h: jax.Array) -> jax.Array:
  """Participation ratio ``tr(h)² / tr(h²)`` in ``[1, d]`` (``d`` iff ``h ∝ I``)."""
  h = jnp.asarray(h, jnp.float32)
  tr = jnp.trace(h, axis1=-2, axis2=-1)
  tr2 = jnp.sum(h * jnp.swapaxes(h, -1, -2), axis=(-2, -1))
  return tr**2 / tr2


def weighted_loss(w: jax.Array, w_hat: jax.Array, h: jax.Array) -> jax.Array:
  """``tr((W-Ŵ)ᵀ H (W-Ŵ))`` (``= ||X(W-Ŵ)||²`` for ``H = XᵀX``): the layer loss.

  ``w``, ``w_hat`` ``(..., d_in, d_out)``, ``h`` ``(..., d_in, d_in)``.
  """
  e = jnp.asarray(w, jnp.float32) - jnp.asarray(w_hat, jnp.float32)
  return jnp.sum(e * jnp.matmul(h, e, precision=_HI), axis=(-2, -1))


def diag_from_scale(scale: jax.Array, *, plus_one: bool = False) -> jax.Array:
  """``diag(g²)`` for an RMSNorm scale ``g`` ``(..., d)`` (``1 + scale`` for Gemma).

  If the normalised input ``x / rms(x)`` were isotropic, the RMSNorm output (the
  input of the following linears) would have this second moment. ``(..., d, d)``.
  """
  g = jnp.asarray(scale, jnp.float32)
  g = 1.0 + g if plus_one else g
  return jnp.eye(g.shape[-1], dtype=jnp.float32) * (g * g)[..., None, :]


def propagate(h: jax.Array, w: jax.Array) -> jax.Array:
  """Second moment of ``x @ W`` given that of ``x``: ``Wᵀ H W``.

  ``h`` ``(..., d_in, d_in)``, ``w`` ``(..., d_in, d_out)`` -> ``(..., d_out, d_out)``.
  """
  w = jnp.asarray(w, jnp.float32)
  return jnp.matmul(jnp.swapaxes(w, -1, -2), jnp.matmul(h, w, precision=_HI), precision=_HI)


def repeat_kv_blocks(h: jax.Array, num_heads: int, num_kv_heads: int, head_dim: int) -> jax.Array:
  """Block-diagonal ``(H*hd, H*hd)`` with query head ``i`` getting KV group ``i // (H/K)``.

  ``h`` ``(..., K*hd, K*hd)`` is the second moment of the value projections; the
  attention output of head ``i`` is a convex mix of its group's values, so its
  second moment is (at most) that group's diagonal block. Cross-head blocks are 0.
  """
  if num_heads % num_kv_heads:
    raise ValueError(f'num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}.')
  if h.shape[-1] != num_kv_heads * head_dim:
    raise ValueError(
      f'h has shape {tuple(h.shape)}; expected (..., {num_kv_heads * head_dim}, '
      f'{num_kv_heads * head_dim}).'
    )
  lead = h.shape[:-2]
  hb = h.reshape(lead + (num_kv_heads, head_dim, num_kv_heads, head_dim))
  blocks = jnp.stack([hb[..., j, :, j, :] for j in range(num_kv_heads)], axis=-3)
  blocks = jnp.repeat(blocks, num_heads // num_kv_heads, axis=-3)  # (..., H, hd, hd)
  eye = jnp.eye(num_heads, dtype=h.dtype)
  out = eye[:, None, :, None] * blocks[..., :, :, None, :]
  return out.reshape(lead + (num_heads * head_dim, num_heads * head_dim))


def shrink(h: jax.Array, alpha: float) -> jax.Array:
  """``(1-α) ĥ + α I`` with ``ĥ`` the trace-normalised ``h``: a hedge toward ``Σ ∝ I``.

  ``alpha`` in ``[0, 1]``; ``alpha = 1`` gives the Frobenius proxy (RTN under GPTQ).
  """
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f'alpha={alpha}; expected a value in [0, 1].')
  d = h.shape[-1]
  return (1.0 - alpha) * normalize_trace(h) + alpha * jnp.eye(d, dtype=jnp.float32)


def proxy_mismatch(
  w: jax.Array, w_hat_proxy: jax.Array, w_hat_ref: jax.Array, h: jax.Array
) -> jax.Array:
  """True-loss ratio ``L_H(Ŵ_proxy) / L_H(Ŵ_ref)`` of two quantizations of ``w``.

  E.g. ``Ŵ_proxy`` = Hadamard+RTN (better Frobenius) vs ``Ŵ_ref`` = RTN: a ratio
  > 1 means the Frobenius improvement is a loss under the true ``H``.
  """
  return weighted_loss(w, w_hat_proxy, h) / weighted_loss(w, w_hat_ref, h)
