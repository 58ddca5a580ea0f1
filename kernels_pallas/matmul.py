"""Weight-only quantized matmul ``x @ dequant(W)`` with fused dequantisation.

See the package docstring for the packed layout and the tile/block terminology.

Two kernel variants share the same math:

* ``gpu`` (Triton lowering): grid ``(M tiles, Np tiles, K splits)``; each program
  loops over its K range in steps of ``bk`` with ``lax.fori_loop`` and keeps one
  f32 accumulator per plane in registers. All loads/stores are power-of-2 sized
  (Triton's constraint); K splits (split-K) raise parallelism at batch 1 and
  their partial f32 sums are added by XLA. Up to 8 rows (decode) the body is a
  per-row GEMV (broadcast-multiply + reduce on the CUDA cores); from 9 rows on
  it is a tensor-core ``dot`` on a ``(bm >= 16, bk) x (bk, bn)`` tile.
* ``tpu`` (Mosaic): grid ``(M tiles, Np tiles, K tiles)`` with the K axis
  ``arbitrary`` and an f32 VMEM scratch accumulator ``(P, bm, bn)``; tiles obey
  the (8, 128) rule (``bk`` and ``bn`` multiples of 128 or full). Its output is
  ``(P, M, Np)`` (planes on the untiled leading axis) and transposed by XLA.

Per K tile ``t`` (one quantization group, ``bk == g``) and plane ``i`` the
kernel computes ``acc_i += (x_t @ (u_i - z_i)) * s_i``: codes minus zero point
are small integers, exact in bf16, so the MXU/tensor-core dot sees exact weights
and the per-group scale is applied to the ``(bm, bn)`` partial product rather than
the ``(bk, bn)`` weight tile (cheaper when ``bm < bk``, the decode case). This
is the same as ``s * (x_t @ u) - s * z * rowsum(x_t)`` without its cancellation.
Per-channel weights scale once at the end; on TPU, groups smaller than the 128
lane tile (``bk = n_sub * g``) are dequantised in the weight domain instead.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math

import jax
from jax.experimental import pallas as pl
import jax.numpy as jnp

from cafeq_jax import packing
from kernels_pallas import reference

_SUPPORTED_BITS = (2, 3, 4, 8)
# GPU: up to this many rows, each row is a GEMV on the CUDA cores (Triton's
# tensor-core dot needs >= 16 rows, so a dot would pad batch 1 to 16 rows).
_GEMV_MAX_ROWS = 8
_SUPPORTED_X_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantizedMatmulConfig:
  """Tile sizes (upper bounds; the planner shrinks them to fit the shape).

  Note: these defaults follow the usual Triton/Mosaic matmul heuristics for
  memory-bound decode shapes (small ``bm``, ``bn`` 64-256, ``bk`` = group size).
  They have NOT been swept on hardware: no accelerator was available when they
  were written. ``experiments/bench_kernels.py`` is the sweep harness
  (``--config.block_n=...``); update them from its JSON on a GPU/TPU.

  Attributes:
    block_m: rows of ``x`` per tile (GPU: power of 2 >= 16; TPU: multiple of 16).
    block_n: packed columns per tile (GPU: power of 2; TPU: multiple of 128).
    block_k: K tile for per-channel weights (grouped weights use the group
      size, at least 128 on TPU).
    split_k: GPU only, number of K splits; ``None`` picks the smallest power of
      2 giving at least ``min_programs`` programs.
    min_programs: GPU auto split-K target (about 2 programs per H100 SM).
    max_plane_cols: GPU cap on ``P * bn``: a program keeps ``P`` f32
      ``(bm, bn)`` accumulators in registers (int3 has ``P = 8``).
    num_warps: Triton warps per program; ``None``: 8 when the accumulators hold
      >= 16K floats, else 4.
    num_stages: Triton software-pipelining stages.
  """

  block_m: int = 64
  block_n: int = 128
  block_k: int = 256
  split_k: int | None = None
  min_programs: int = 264
  max_plane_cols: int = 512
  num_warps: int | None = None
  num_stages: int = 3


DEFAULT_GPU_CONFIG = QuantizedMatmulConfig()
DEFAULT_TPU_CONFIG = QuantizedMatmulConfig(block_m=128, block_n=256, block_k=512)


@dataclasses.dataclass(frozen=True)
class _Plan:
  bm: int
  bn: int
  bk: int
  m_pad: int
  np_pad: int
  n_sub: int  # quantization groups per K tile (TPU, g < 128)
  split_k: int  # GPU only
  per_channel: bool
  g: int


def _next_pow2(v: int) -> int:
  return 1 << max(0, (v - 1).bit_length())


def _round_up(v: int, m: int) -> int:
  return -(-v // m) * m


def _largest_pow2_divisor(v: int, cap: int) -> int:
  d = 1
  while d * 2 <= cap and v % (d * 2) == 0:
    d *= 2
  return d


def _normalize_backend(backend: str) -> str:
  b = backend.lower()
  if b in ('gpu', 'cuda', 'rocm'):
    return 'gpu'
  if b in ('tpu', 'cpu'):
    return b
  raise ValueError(
    f"backend={backend!r} is not supported; expected 'gpu', 'cuda', 'rocm', 'tpu' or 'cpu'."
  )


def _k_tile(
  k: int, group_size: int | None, variant: str, config: QuantizedMatmulConfig
) -> tuple[int | None, str]:
  """K tile ``bk`` for ``variant`` or (None, reason)."""
  min_bk = 128 if variant == 'tpu' else 16
  if group_size is None:
    bk = _largest_pow2_divisor(k, max(config.block_k, min_bk))
    if bk < min_bk:
      return None, (
        f'per-channel weight with K={k} has no power-of-2 divisor >= {min_bk} to tile K'
      )
    return bk, ''
  if k % group_size:
    return None, f'K={k} is not divisible by group_size={group_size}'
  if group_size & (group_size - 1) or group_size < 16:
    return None, f'group_size={group_size} is not a power of 2 >= 16'
  bk = max(group_size, min_bk) if variant == 'tpu' else group_size
  if k % bk:
    return None, f'K={k} is not divisible by the {variant} K tile {bk}'
  return bk, ''


def can_use_quantized_matmul(
  shape: tuple[int, ...], bits: int, group_size: int | None, backend: str | None = None
) -> tuple[bool, str]:
  """Whether the Pallas kernel supports a weight of ``shape`` (K, N).

  Args:
    shape: original weight shape ``(K, N)``.
    bits: code width.
    group_size: quantization group size (``None`` = per output channel).
    backend: 'gpu' | 'cuda' | 'rocm' | 'tpu' | 'cpu' (interpret mode);
      defaults to ``jax.default_backend()``.

  Returns:
    ``(True, '')`` or ``(False, reason)``.
  """
  try:
    backend = _normalize_backend(backend or jax.default_backend())
  except ValueError as e:
    return False, str(e)
  if len(shape) != 2:
    return False, (
      f'weight shape {tuple(shape)} is not 2-D (K, N); leading '
      'batch dims are not supported by the kernel'
    )
  if bits not in _SUPPORTED_BITS:
    return False, f'bits={bits} not in {_SUPPORTED_BITS}'
  k, n = shape
  if k <= 0 or n <= 0:
    return False, f'empty weight shape {tuple(shape)}'
  variant = 'tpu' if backend == 'tpu' else 'gpu'
  bk, reason = _k_tile(
    k, group_size, variant, DEFAULT_TPU_CONFIG if variant == 'tpu' else DEFAULT_GPU_CONFIG
  )
  if bk is None:
    return False, reason
  return True, ''


def _plan(
  m: int,
  k: int,
  n: int,
  bits: int,
  group_size: int | None,
  variant: str,
  config: QuantizedMatmulConfig,
) -> _Plan:
  bk, reason = _k_tile(k, group_size, variant, config)
  if bk is None:
    raise ValueError(reason)
  npk = packing.packed_columns(n, bits)
  per_channel = group_size is None
  g = k if per_channel else group_size
  if variant == 'gpu':
    if m <= _GEMV_MAX_ROWS:  # row-by-row GEMV body, no 16-row padding
      bm = _next_pow2(m)
    else:
      bm = min(_next_pow2(max(config.block_m, 16)), _next_pow2(max(m, 16)))
    p = packing.CODES_PER_UNIT[bits]
    cap = max(16, min(_next_pow2(config.block_n), _next_pow2(max(1, config.max_plane_cols // p))))
    cand = _largest_pow2_divisor(npk, cap)
    if cand >= 32 or cand >= npk:
      bn = max(cand, 16)
    else:
      bn = min(cap, max(16, _next_pow2(npk)))
    np_pad = _round_up(npk, bn)
    # Fewer, larger M tiles re-read the weight less; more, smaller ones fill the
    # GPU. Halve bm (not below 16) while there are too few programs.
    while bm > 16 and (_round_up(m, bm) // bm) * (np_pad // bn) < config.min_programs // 2:
      bm //= 2
    m_pad = _round_up(m, bm)
    nk = k // bk
    if config.split_k is not None:
      split = config.split_k
      if nk % split:
        raise ValueError(f'split_k={split} does not divide the {nk} K tiles.')
    else:
      # Smallest divisor of the K-tile count reaching min_programs, bounded so
      # that the f32 partial sums (split * m_pad * N * 4 bytes, written and
      # re-read) stay under the packed weight bytes.
      progs = (m_pad // bm) * (np_pad // bn)
      max_split = max(1, (k * bits) // (32 * m_pad))
      split = 1
      for d in range(1, min(nk, max_split) + 1):
        if nk % d == 0:
          split = d
          if progs * d >= config.min_programs:
            break
    return _Plan(bm, bn, bk, m_pad, np_pad, 1, split, per_channel, g)
  # tpu
  bm = min(_round_up(max(config.block_m, 16), 16), _round_up(m, 16))
  if npk <= config.block_n and npk % 128:
    bn, np_pad = npk, npk  # full-dim block is always legal
  else:
    np_pad = _round_up(npk, 128)
    bn = 128
    while bn * 2 <= config.block_n and np_pad % (bn * 2) == 0:
      bn *= 2
  n_sub = 1 if per_channel else bk // group_size
  return _Plan(bm, bn, bk, _round_up(m, bm), np_pad, n_sub, 1, per_channel, g)


def _unpack_planes(tiles, bits: int):
  """uint8 tiles -> list of P int32 ``(bk, bn)`` code planes (shifts and masks)."""
  if bits == 3:
    d0, d1, d2 = (t.astype(jnp.int32) for t in tiles)
    word = d0 | (d1 << 8) | (d2 << 16)
  else:
    word = tiles[0].astype(jnp.int32)
  p = packing.CODES_PER_UNIT[bits]
  if p == 1:
    return [word]
  mask = 2**bits - 1
  return [(word >> (bits * i)) & mask if i else word & mask for i in range(p)]


def _gpu_kernel(*refs, bits, bk, n_k, per_channel, symmetric, zconst, gemv):
  if symmetric:
    x_ref, d_ref, s_ref, o_ref = refs
    z_ref = None
  else:
    x_ref, d_ref, s_ref, z_ref, o_ref = refs
  p = packing.CODES_PER_UNIT[bits]
  bm = x_ref.shape[0]
  bn = d_ref.shape[-1]

  def zero_row(grp, i):
    if symmetric:
      return zconst
    return z_ref[grp, i, :][None, :].astype(jnp.float32)

  def body(t, accs):
    k0 = pl.multiple_of(t * bk, bk)
    if bits == 3:
      tiles = [d_ref[c, pl.ds(k0, bk), :] for c in range(3)]
    else:
      tiles = [d_ref[pl.ds(k0, bk), :]]
    planes = _unpack_planes(tiles, bits)
    grp = 0 if per_channel else t
    if gemv:
      x_rows = [x_ref[r, pl.ds(k0, bk)].astype(jnp.float32)[:, None] for r in range(bm)]
    else:
      x_t = x_ref[:, pl.ds(k0, bk)]
    out = []
    for i in range(p):
      w = planes[i].astype(jnp.float32) - zero_row(grp, i)  # exact integers
      s_i = None if per_channel else s_ref[grp, i, :].astype(jnp.float32)
      if gemv:  # accs[i] is a tuple of bm (bn,) rows
        rows = []
        for r in range(bm):
          d = jnp.sum(x_rows[r] * w, axis=0)
          rows.append(accs[i][r] + (d if s_i is None else d * s_i))
        out.append(tuple(rows))
      else:
        d = jnp.dot(x_t, w.astype(x_t.dtype), preferred_element_type=jnp.float32)
        out.append(accs[i] + (d if s_i is None else d * s_i[None, :]))
    return tuple(out)

  if gemv:
    init = tuple(tuple(jnp.zeros((bn,), jnp.float32) for _ in range(bm)) for _ in range(p))
  else:
    init = tuple(jnp.zeros((bm, bn), jnp.float32) for _ in range(p))
  accs = jax.lax.fori_loop(0, n_k, body, init)
  for i in range(p):
    s_i = s_ref[0, i, :].astype(jnp.float32) if per_channel else None
    if gemv:
      for r in range(bm):
        a = accs[i][r] if s_i is None else accs[i][r] * s_i
        o_ref[r, i, :] = a.astype(o_ref.dtype)
    else:
      a = accs[i] if s_i is None else accs[i] * s_i[None, :]
      o_ref[:, i, :] = a.astype(o_ref.dtype)


def _tpu_kernel(*refs, bits, g, n_sub, n_k, per_channel, symmetric, zconst):
  if symmetric:
    x_ref, d_ref, s_ref, o_ref, acc_ref = refs
    z_ref = None
  else:
    x_ref, d_ref, s_ref, z_ref, o_ref, acc_ref = refs
  p = packing.CODES_PER_UNIT[bits]
  kt = pl.program_id(2)

  @pl.when(kt == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  x_t = x_ref[...]
  if bits == 3:
    tiles = [d_ref[c] for c in range(3)]
  else:
    tiles = [d_ref[...]]
  planes = _unpack_planes(tiles, bits)
  bn = planes[0].shape[-1]

  def expand(ref, i):  # (n_sub, P, bn) block -> (n_sub * g, bn) per-row values
    rows = [
      jnp.broadcast_to(ref[j, i : i + 1, :].astype(jnp.float32), (g, bn)) for j in range(n_sub)
    ]
    return jnp.concatenate(rows, axis=0)

  for i in range(p):
    u = planes[i].astype(jnp.float32)
    if n_sub == 1:
      z = zconst if symmetric else z_ref[0, i : i + 1, :].astype(jnp.float32)
      d = jnp.dot(x_t, (u - z).astype(x_t.dtype), preferred_element_type=jnp.float32)
      if not per_channel:
        d = d * s_ref[0, i : i + 1, :].astype(jnp.float32)
    else:
      z = zconst if symmetric else expand(z_ref, i)
      w = ((u - z) * expand(s_ref, i)).astype(x_t.dtype)
      d = jnp.dot(x_t, w, preferred_element_type=jnp.float32)
    acc_ref[i] += d

  @pl.when(kt == n_k - 1)
  def _():
    for i in range(p):
      a = acc_ref[i]
      if per_channel:
        a = a * s_ref[0, i : i + 1, :].astype(jnp.float32)
      o_ref[i] = a.astype(o_ref.dtype)


def _planar(a: jax.Array, n: int, p: int, npk: int, np_pad: int) -> jax.Array:
  """(G, N) per-column values -> (G, P, np_pad) in the packed planar order."""
  if npk * p != n:
    a = jnp.pad(a, ((0, 0), (0, npk * p - n)))
  a = a.reshape(a.shape[0], p, npk)
  if np_pad != npk:
    a = jnp.pad(a, ((0, 0), (0, 0), (0, np_pad - npk)))
  return a


@functools.partial(jax.jit, static_argnames=('variant', 'interpret', 'config'))
def _quantized_matmul_pallas(x, packed, *, variant, interpret, config):
  k, n = packed.shape
  lead = x.shape[:-1]
  x2 = x.reshape(-1, k)
  m = x2.shape[0]
  bits = packed.bits
  p = packing.CODES_PER_UNIT[bits]
  npk = packing.packed_columns(n, bits)
  plan = _plan(m, k, n, bits, packed.group_size, variant, config)
  bm, bn, bk = plan.bm, plan.bn, plan.bk
  if plan.m_pad != m:
    x2 = jnp.pad(x2, ((0, plan.m_pad - m), (0, 0)))
  data = packed.data
  if plan.np_pad != npk:
    pad = [(0, 0)] * (data.ndim - 1) + [(0, plan.np_pad - npk)]
    data = jnp.pad(data, pad)
  scale = _planar(packed.scale, n, p, npk, plan.np_pad)
  zero = None if packed.symmetric else _planar(packed.zero, n, p, npk, plan.np_pad)
  zconst = float(-packed.spec.qmin)
  n_groups = scale.shape[0]
  mt, nt = plan.m_pad // bm, plan.np_pad // bn

  if variant == 'gpu':
    from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top

    s = plan.split_k
    ks = k // s
    x_spec = pl.BlockSpec((bm, ks), lambda i, j, q: (i, q))
    if bits == 3:
      d_spec = pl.BlockSpec((3, ks, bn), lambda i, j, q: (0, q, j))
    else:
      d_spec = pl.BlockSpec((ks, bn), lambda i, j, q: (q, j))
    if plan.per_channel:
      s_spec = pl.BlockSpec((1, p, bn), lambda i, j, q: (0, 0, j))
    else:
      s_spec = pl.BlockSpec((n_groups // s, p, bn), lambda i, j, q: (q, 0, j))
    in_specs = [x_spec, d_spec, s_spec] + ([] if zero is None else [s_spec])
    out_dtype = x.dtype if s == 1 else jnp.float32
    kernel = functools.partial(
      _gpu_kernel,
      bits=bits,
      bk=bk,
      n_k=ks // bk,
      per_channel=plan.per_channel,
      symmetric=packed.symmetric,
      zconst=zconst,
      gemv=bm < 16,
    )
    out = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((s, plan.m_pad, p, plan.np_pad), out_dtype),
      grid=(mt, nt, s),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((None, bm, p, bn), lambda i, j, q: (q, i, 0, j)),
      interpret=interpret,
      compiler_params=None
      if interpret
      else plgpu.CompilerParams(
        num_warps=config.num_warps or (8 if bm * bn * p >= 16384 else 4),
        num_stages=config.num_stages,
      ),
      name=f'quantized_matmul_int{bits}',
    )(*([x2, data, scale] + ([] if zero is None else [zero])))
    out = out[0] if s == 1 else out.sum(axis=0)
  else:
    from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top

    n_k = k // bk
    x_spec = pl.BlockSpec((bm, bk), lambda i, j, q: (i, q))
    if bits == 3:
      d_spec = pl.BlockSpec((3, bk, bn), lambda i, j, q: (0, q, j))
    else:
      d_spec = pl.BlockSpec((bk, bn), lambda i, j, q: (q, j))
    if plan.per_channel:
      s_spec = pl.BlockSpec((1, p, bn), lambda i, j, q: (0, 0, j))
    else:
      s_spec = pl.BlockSpec((plan.n_sub, p, bn), lambda i, j, q: (q, 0, j))
    in_specs = [x_spec, d_spec, s_spec] + ([] if zero is None else [s_spec])
    kernel = functools.partial(
      _tpu_kernel,
      bits=bits,
      g=min(plan.g, bk),
      n_sub=plan.n_sub,
      n_k=n_k,
      per_channel=plan.per_channel,
      symmetric=packed.symmetric,
      zconst=zconst,
    )
    out = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((p, plan.m_pad, plan.np_pad), x.dtype),
      grid=(mt, nt, n_k),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((p, bm, bn), lambda i, j, q: (0, i, j)),
      scratch_shapes=[pltpu.VMEM((p, bm, bn), jnp.float32)],
      interpret=interpret,
      compiler_params=None
      if interpret
      else pltpu.CompilerParams(dimension_semantics=('parallel', 'parallel', 'arbitrary')),
      name=f'quantized_matmul_int{bits}',
    )(*([x2, data, scale] + ([] if zero is None else [zero])))
    out = jnp.transpose(out, (1, 0, 2))
  out = out[:m, :, :npk].reshape(m, p * npk)[:, :n]
  return out.astype(x.dtype).reshape(*lead, n)


_WARNED: set[tuple] = set()


def _warn_fallback_once(key: tuple, reason: str) -> None:
  """Logs once per ``key = (shape, bits, group_size, backend, x dtype)``."""
  if key not in _WARNED:
    _WARNED.add(key)
    shape, bits, group_size, backend, x_dtype = key
    logging.warning(
      'quantized_matmul: no Pallas kernel for weight %s int%d '
      'group_size=%s with x %s on %s: %s; falling back to the XLA '
      'reference (dequantize + dot), which materialises the weight '
      'and is slower.',
      shape,
      bits,
      group_size,
      x_dtype,
      backend,
      reason,
    )


def quantized_matmul(
  x: jax.Array,
  packed: packing.PackedArray,
  *,
  backend: str | None = None,
  interpret: bool | None = None,
  config: QuantizedMatmulConfig | None = None,
) -> jax.Array:
  """``x @ dequant(packed)`` with dequantisation fused into a Pallas kernel.

  Args:
    x: ``(..., K)`` bfloat16/float16/float32 activations, any number of rows.
    packed: ``PackedArray`` with original shape ``(K, N)``.
    backend: 'gpu'/'cuda'/'rocm' (Triton kernel), 'tpu' (Mosaic kernel) or
      'cpu'; defaults to ``jax.default_backend()``. On 'cpu' the GPU-structured
      kernel runs in interpret mode.
    interpret: run the kernel in Pallas interpret mode; defaults to True on a
      CPU-only host. Set it with backend='tpu' or 'gpu' to test a variant on CPU.
    config: tile sizes; defaults per variant.

  Returns:
    ``(..., N)`` in ``x.dtype`` (f32 accumulation).

  When the kernel does not support the shape/bits/group size/dtype (see
  ``can_use_quantized_matmul``) this logs a warning once per case and returns
  ``reference.quantized_matmul_reference(x, packed)``.
  """
  if not isinstance(packed, packing.PackedArray):
    raise TypeError(f'packed must be a PackedArray; got {type(packed).__name__}.')
  if len(packed.shape) != 2:
    raise ValueError(
      f'quantized_matmul expects a 2-D (K, N) PackedArray; got shape '
      f'{packed.shape}. Select one matrix of a stack with packing.index(p, i).'
    )
  if x.shape[-1] != packed.shape[-2]:
    raise ValueError(
      f'x has last dim {x.shape[-1]} but the weight expects '
      f'K={packed.shape[-2]} (weight shape {packed.shape}).'
    )
  default_backend = jax.default_backend()
  backend = _normalize_backend(backend or default_backend)
  if interpret is None:
    interpret = default_backend == 'cpu'
  key = (tuple(packed.shape), packed.bits, packed.group_size, backend, str(x.dtype))
  ok, reason = can_use_quantized_matmul(packed.shape, packed.bits, packed.group_size, backend)
  if ok and jnp.dtype(x.dtype) not in _SUPPORTED_X_DTYPES:
    ok, reason = False, f'x dtype {x.dtype} not in {_SUPPORTED_X_DTYPES}'
  if ok and backend == 'cpu' and not interpret:
    ok, reason = False, 'no compiled Pallas kernel on CPU (pass interpret=True)'
  if ok and math.prod(x.shape[:-1]) == 0:
    ok, reason = False, 'x has no rows'
  if not ok:
    _warn_fallback_once(key, reason)
    return reference.quantized_matmul_reference(x, packed)
  variant = 'tpu' if backend == 'tpu' else 'gpu'
  if config is None:
    config = DEFAULT_TPU_CONFIG if variant == 'tpu' else DEFAULT_GPU_CONFIG
  return _quantized_matmul_pallas(
    x, packed, variant=variant, interpret=bool(interpret), config=config
  )
