"""Online transform ``x @ blockdiag(Minv)`` (docs/method.md#single-matrix-transforms).

A learned transform ``M`` (block-diagonal, ``d_in / k`` blocks of ``k x k``) is
folded into the quantized weight (``Q(M W)``) and undone on the activations at
run time: ``y = (x @ blockdiag(M^-1)) @ dequant(Q(M W))``. The online part costs
``d_in * k`` multiply-adds per token, against ``d_in * d_out`` for the matmul it
precedes (``blockdiag_overhead_ratio``).

Kernel: grid ``(M tiles, d_in tiles)``; a d_in tile of width ``tw`` holds
``tw / k`` whole blocks, each a small ``(bm, k) @ (k, k)`` dot. On GPU ``tw = k``
(power of 2 >= 16, Triton's load/dot constraints); on TPU ``tw = max(k, 128)``
(lane tiling), so blocks smaller than 128 are handled several per tile.
"""

from __future__ import annotations

import functools
import logging

import jax
from jax.experimental import pallas as pl
import jax.numpy as jnp

from kernels_pallas import reference
from kernels_pallas.matmul import _next_pow2
from kernels_pallas.matmul import _normalize_backend
from kernels_pallas.matmul import _round_up

_WARNED: set[tuple] = set()


def blockdiag_overhead_ratio(d_in: int, d_out: int, k: int) -> float:
  """MACs of ``x @ blockdiag(Minv)`` over MACs of ``x @ W``: ``d_in k / (d_in d_out)``."""
  if d_in % k:
    raise ValueError(f'd_in={d_in} is not divisible by the block size k={k}.')
  return (d_in * k) / (d_in * d_out)


def can_use_blockdiag_matmul(d_in: int, k: int, backend: str | None = None) -> tuple[bool, str]:
  """Whether the Pallas block-diagonal kernel supports ``d_in`` and block ``k``."""
  try:
    backend = _normalize_backend(backend or jax.default_backend())
  except ValueError as e:
    return False, str(e)
  if k <= 0 or d_in % k:
    return False, f'd_in={d_in} is not divisible by the block size k={k}'
  if k & (k - 1) or k < 16:
    return False, f'block size k={k} is not a power of 2 >= 16'
  if backend == 'tpu' and d_in % max(k, 128):
    return False, f'd_in={d_in} is not a multiple of the TPU tile {max(k, 128)}'
  return True, ''


def _kernel(x_ref, m_ref, o_ref, *, k, nbs):
  for b in range(nbs):
    xb = x_ref[:, pl.ds(b * k, k)]
    y = jnp.dot(xb, m_ref[b].astype(xb.dtype), preferred_element_type=jnp.float32)
    o_ref[:, pl.ds(b * k, k)] = y.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=('variant', 'interpret', 'block_m'))
def _blockdiag_pallas(x, minv, *, variant, interpret, block_m):
  nb, k, _ = minv.shape
  d_in = nb * k
  lead = x.shape[:-1]
  x2 = x.reshape(-1, d_in)
  m = x2.shape[0]
  if variant == 'gpu':
    bm = min(_next_pow2(max(block_m, 16)), _next_pow2(max(m, 16)))
    tw = k
  else:
    bm = min(_round_up(block_m, 16), _round_up(m, 16))
    tw = max(k, 128)
  nbs = tw // k
  m_pad = _round_up(m, bm)
  if m_pad != m:
    x2 = jnp.pad(x2, ((0, m_pad - m), (0, 0)))
  if interpret:
    compiler_params = None
  elif variant == 'gpu':
    # Triton CompilerParams also select the Triton lowering (the default GPU
    # lowering of pallas_call is Mosaic GPU, which has no dot for this kernel).
    from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top

    compiler_params = plgpu.CompilerParams(num_warps=4, num_stages=2)
  else:
    from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top

    compiler_params = pltpu.CompilerParams(dimension_semantics=('parallel', 'parallel'))
  # Minv in x's dtype (bf16 activations: bf16 MXU/tensor-core dot, f32 accumulate).
  out = pl.pallas_call(
    functools.partial(_kernel, k=k, nbs=nbs),
    out_shape=jax.ShapeDtypeStruct((m_pad, d_in), x.dtype),
    grid=(m_pad // bm, d_in // tw),
    in_specs=[
      pl.BlockSpec((bm, tw), lambda i, j: (i, j)),
      pl.BlockSpec((nbs, k, k), lambda i, j: (j, 0, 0)),
    ],
    out_specs=pl.BlockSpec((bm, tw), lambda i, j: (i, j)),
    interpret=interpret,
    compiler_params=compiler_params,
    name='blockdiag_matmul',
  )(x2, minv.astype(x.dtype))
  return out[:m].reshape(*lead, d_in)


def blockdiag_matmul(
  x: jax.Array,
  minv: jax.Array,
  *,
  backend: str | None = None,
  interpret: bool | None = None,
  block_m: int = 64,
) -> jax.Array:
  """``x @ blockdiag(minv)`` with a small Pallas kernel.

  Args:
    x: ``(..., d_in)`` float activations.
    minv: ``(d_in // k, k, k)`` blocks (cast to ``x.dtype`` for the dot).
    backend: as in ``quantized_matmul``; defaults to ``jax.default_backend()``.
    interpret: Pallas interpret mode; defaults to True on a CPU-only host.
    block_m: rows per tile (upper bound).

  Returns:
    ``(..., d_in)`` in ``x.dtype``. Unsupported cases log a warning once and use
    ``reference.blockdiag_matmul_reference``.
  """
  if minv.ndim != 3 or minv.shape[1] != minv.shape[2]:
    raise ValueError(f'minv must have shape (d_in // k, k, k); got {minv.shape}.')
  nb, k, _ = minv.shape
  if nb * k != x.shape[-1]:
    raise ValueError(
      f'minv shape {minv.shape} covers d_in={nb * k} but x has last dim {x.shape[-1]}.'
    )
  default_backend = jax.default_backend()
  backend = _normalize_backend(backend or default_backend)
  if interpret is None:
    interpret = default_backend == 'cpu'
  ok, reason = can_use_blockdiag_matmul(nb * k, k, backend)
  if ok and backend == 'cpu' and not interpret:
    ok, reason = False, 'no compiled Pallas kernel on CPU (pass interpret=True)'
  if ok and x.size == 0:
    ok, reason = False, 'x is empty'
  if not ok:
    key = (nb * k, k, backend)
    if key not in _WARNED:
      _WARNED.add(key)
      logging.warning(
        'blockdiag_matmul: no Pallas kernel for d_in=%d, k=%d on '
        '%s: %s; falling back to the XLA reference (einsum).',
        nb * k,
        k,
        backend,
        reason,
      )
    return reference.blockdiag_matmul_reference(x, minv)
  variant = 'tpu' if backend == 'tpu' else 'gpu'
  return _blockdiag_pallas(x, minv, variant=variant, interpret=bool(interpret), block_m=block_m)
