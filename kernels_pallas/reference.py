"""Plain-jnp references for the Pallas kernels (same signatures, no Pallas)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cafeq_jax import packing


def quantized_matmul_reference(x: jax.Array, packed: packing.PackedArray) -> jax.Array:
  """``x @ dequant(packed)`` computed densely in float32.

  Args:
    x: ``(..., K)`` float (bf16 or f32) activations.
    packed: ``PackedArray`` of original shape ``(K, N)``.

  Returns:
    ``(..., N)`` in ``x.dtype``. The f32 weight is materialised (this is the
    XLA path the kernel is checked against, not a fast path).
  """
  if len(packed.shape) != 2:
    raise ValueError(f'packed weight must be 2-D (K, N); got shape {packed.shape}.')
  if x.shape[-1] != packed.shape[0]:
    raise ValueError(
      f'x has last dim {x.shape[-1]} but the weight expects '
      f'K={packed.shape[0]} (weight shape {packed.shape}).'
    )
  w = packing.dequantize(packed, jnp.float32)
  y = jnp.dot(x.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST)
  return y.astype(x.dtype)


def blockdiag_matmul_reference(x: jax.Array, minv: jax.Array) -> jax.Array:
  """``x @ blockdiag(minv)`` for ``x`` (..., d_in) and ``minv`` (d_in // k, k, k).

  Returns ``(..., d_in)`` in ``x.dtype`` (computed in float32).
  """
  nb, k, k2 = minv.shape
  if k != k2 or nb * k != x.shape[-1]:
    raise ValueError(f'minv shape {minv.shape} must be (d_in // k, k, k) with d_in={x.shape[-1]}.')
  xb = x.astype(jnp.float32).reshape(*x.shape[:-1], nb, k)
  y = jnp.einsum(
    '...bi,bij->...bj', xb, minv.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
  )
  return y.reshape(x.shape).astype(x.dtype)
