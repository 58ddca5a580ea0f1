"""GPTQ (Frantar et al., 2022) core: Hessians from activations and the layer solve.

The calibration-based baseline of SPEC §6 (comparison only; CafeQ is data-free).
For a linear ``y = x @ W`` with ``W`` ``(d_in, d_out)`` and calibration inputs
``X`` ``(n, d_in)``, GPTQ minimises ``||X W - X Ŵ||²`` = ``tr((W-Ŵ)ᵀ H (W-Ŵ))`` with
``H = XᵀX`` by error-feedback rounding along ``d_in``
(``core.rounding.gptq_round``: lazy batch updates, relative damping, group scales
computed from the error-updated weights at each group's first row). Rows are
processed in natural order, or with ``act_order`` by decreasing ``H_ii`` with
static group scales (groups stay consecutive rows).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cafeq_jax import quantizer as qz
from cafeq_jax.core import rounding

_HI = jax.lax.Precision.HIGHEST


def hessian(x: jax.Array) -> jax.Array:
  """``XᵀX`` of activations ``x`` ``(..., d)`` (all leading dims are samples): ``(d, d)`` f32."""
  x = jnp.asarray(x, jnp.float32).reshape(-1, x.shape[-1])
  return jnp.matmul(x.T, x, precision=_HI)


def accumulate_hessian(h: jax.Array | None, x: jax.Array) -> jax.Array:
  """``h + XᵀX`` (``h`` None starts a new sum); ``x`` ``(..., d)``, ``h`` ``(d, d)``."""
  hx = hessian(x)
  if h is None:
    return hx
  if h.shape != hx.shape:
    raise ValueError(f'hessian shape {tuple(h.shape)} does not match activations of '
                     f'width {x.shape[-1]}.')
  return h + hx


def layer_loss(w: jax.Array, w_hat: jax.Array, h: jax.Array) -> jax.Array:
  """``tr((W-Ŵ)ᵀ H (W-Ŵ))`` = ``||X(W-Ŵ)||²``; ``w`` ``(..., d_in, d_out)``, ``h`` ``(..., d_in, d_in)``."""
  e = jnp.asarray(w, jnp.float32) - jnp.asarray(w_hat, jnp.float32)
  return jnp.sum(e * jnp.matmul(h, e, precision=_HI), axis=(-2, -1))


def gptq_quantize(w: jax.Array, h: jax.Array, spec: qz.QuantSpec, *,
                  damp: float = 0.01, block: int = 128,
                  act_order: bool = False) -> qz.QArray:
  """GPTQ-quantize ``w`` ``(..., d_in, d_out)`` for Hessian ``h`` ``(..., d_in, d_in)``."""
  return rounding.gptq_round(w, h, spec, damp=damp, block=block, act_order=act_order)
