"""Bit-packed storage of quantized weights (int2/int3/int4/int8).

A ``QArray`` keeps one integer code per int8 (or int16) element. ``PackedArray``
stores the same codes densely so that bytes on disk and bytes moved from HBM
per weight are ``bits / 8`` (plus the per-group scales/zeros).

Codes are stored *unsigned*: ``u = q - qmin``, so ``u`` lies in ``[0, 2^b - 1]``
for both symmetric and asymmetric quantizers, and the dequantized weight is

    w = scale * (u - zero'),   zero' = zero - qmin  (asymmetric: zero' = zero
                                                     because qmin = 0;
                                                     symmetric:  zero' = -qmin).

Layout ("planar" along the output dimension N = d_out). Let ``P`` be the number
of codes per storage unit (int8: 1, int4: 2, int3: 8, int2: 4). N is padded with
code 0 up to ``Np * P`` with ``Np = ceil(N / P)``; plane ``i`` holds output
columns ``[i * Np, (i + 1) * Np)``. Packing never mixes rows (K = d_in), so a
kernel tiled over K can take whole quantization groups, and a kernel tile over
packed columns ``[c0, c0 + bn)`` yields outputs for columns ``i * Np + c`` of all
planes, i.e. an ``(M, P, Np)``-shaped output that is a free reshape of
``(M, N_padded)``.

- int8: ``data`` uint8 ``(..., K, N)``, ``data[k, c] = u[k, c]``.
- int4: ``data`` uint8 ``(..., K, Np)``, ``data[k, c] = u[k, c] | u[k, c + Np] << 4``.
- int2: ``data`` uint8 ``(..., K, Np)``, ``data[k, c] = sum_i u[k, c + i Np] << 2 i``.
- int3: ``data`` uint8 ``(..., 3, K, Np)``: bytes ``b0, b1, b2 = data[..., 0|1|2, k, c]``
  form the 24-bit word ``b0 | b1 << 8 | b2 << 16`` that holds ``u[k, c + i Np]``
  in bits ``3 i .. 3 i + 2`` for ``i = 0..7``. Exactly 3 bits per weight (8 codes
  in 3 bytes); the three byte planes let a kernel load three ``(bk, bn)`` uint8
  tiles and rebuild the word with shifts.

Scales and zeros keep the ``QArray`` shapes ``(..., d_in // g, d_out)`` (not
padded). ``zero`` is always materialised (``-qmin`` for symmetric specs) so that
consumers have one formula; ``nbytes`` does not count it for symmetric specs
because it is a constant of the spec.

All functions are pure ``jnp`` (jit-able, leading batch dims allowed) and accept
numpy inputs.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from cafeq_jax import quantizer

# Codes per storage unit (and number of planes along N) for each bit width.
CODES_PER_UNIT = {8: 1, 4: 2, 3: 8, 2: 4}


@flax.struct.dataclass
class PackedArray:
  """Bit-packed quantized matrix (or stack of matrices); see module docstring.

  Invariant: ``unpack(p)`` is the ``QArray`` it was packed from, i.e. the weight
  is ``scale[..., r // g, c] * (u[..., r, c] - zero[..., r // g, c])`` with ``u``
  the unsigned codes read from ``data``.

  Attributes:
    data: uint8 packed codes; ``(..., K, Np)`` for int2/int4, ``(..., 3, K, Np)``
      for int3, ``(..., K, N)`` for int8.
    scale: ``(..., K // g, N)`` float32 (or bfloat16, see ``pack``).
    zero: ``(..., K // g, N)`` in the scale's dtype, holding integers in the
      unsigned code domain ``[0, 2^b - 1]`` (exact in bfloat16 for b <= 8;
      ``-qmin`` everywhere for symmetric specs).
    bits: code width (2, 3, 4, 8). Static.
    group_size: rows per group, ``None`` for per output channel. Static.
    symmetric: whether the source spec was symmetric. Static.
    shape: original ``(..., d_in, d_out)`` shape. Static.
  """

  data: jax.Array
  scale: jax.Array
  zero: jax.Array
  bits: int = flax.struct.field(pytree_node=False)
  group_size: int | None = flax.struct.field(pytree_node=False)
  symmetric: bool = flax.struct.field(pytree_node=False)
  shape: tuple[int, ...] = flax.struct.field(pytree_node=False)

  @property
  def spec(self) -> quantizer.QuantSpec:
    return quantizer.QuantSpec(bits=self.bits, group_size=self.group_size, symmetric=self.symmetric)

  @property
  def codes_per_unit(self) -> int:
    return CODES_PER_UNIT[self.bits]

  @property
  def n_packed(self) -> int:
    """Np: packed columns (N padded up to a multiple of P, divided by P)."""
    return packed_columns(self.shape[-1], self.bits)

  @property
  def qmin(self) -> int:
    return self.spec.qmin


def packed_columns(n: int, bits: int) -> int:
  """Np = ceil(n / P) for ``bits``."""
  _check_bits(bits)
  return -(-n // CODES_PER_UNIT[bits])


def _check_bits(bits: int) -> None:
  if bits not in CODES_PER_UNIT:
    raise ValueError(f'bits={bits!r} cannot be packed; expected one of {tuple(CODES_PER_UNIT)}.')


def _xp(a):
  """numpy for numpy inputs (fast host-side packing), jax.numpy otherwise."""
  return np if isinstance(a, np.ndarray) else jnp


def pack_codes(u, bits: int):
  """Packs unsigned codes ``u`` (..., K, N) in ``[0, 2^bits)`` into uint8 planes.

  Returns ``(..., K, Np)`` uint8 (int2/int4), ``(..., 3, K, Np)`` (int3) or
  ``(..., K, N)`` (int8). Values outside ``[0, 2^bits)`` are masked to ``bits``.
  numpy in, numpy out; anything else goes through ``jax.numpy`` (jit-able).
  """
  _check_bits(bits)
  xp = _xp(u)
  u = xp.asarray(u)
  if u.ndim < 2:
    raise ValueError(f'codes must have shape (..., K, N); got shape {u.shape}.')
  u = u.astype(xp.uint32) & xp.uint32(2**bits - 1)
  p = CODES_PER_UNIT[bits]
  n = u.shape[-1]
  np_ = packed_columns(n, bits)
  if np_ * p != n:
    pad = [(0, 0)] * (u.ndim - 1) + [(0, np_ * p - n)]
    u = xp.pad(u, pad)
  planes = [u[..., i * np_ : (i + 1) * np_] for i in range(p)]
  word = planes[0]
  for i in range(1, p):
    word = word | (planes[i] << xp.uint32(bits * i))
  if bits == 3:
    return xp.stack(
      [((word >> xp.uint32(8 * j)) & xp.uint32(0xFF)).astype(xp.uint8) for j in range(3)], axis=-3
    )
  return word.astype(xp.uint8)


def unpack_codes(data, bits: int, n: int):
  """Inverse of ``pack_codes``: uint8 planes -> unsigned codes (..., K, n) uint8."""
  _check_bits(bits)
  xp = _xp(data)
  data = xp.asarray(data)
  if data.dtype != np.uint8:
    raise TypeError(f'packed data must be uint8; got dtype {data.dtype}.')
  p = CODES_PER_UNIT[bits]
  if bits == 3:
    if data.ndim < 3 or data.shape[-3] != 3:
      raise ValueError(f'int3 packed data must have shape (..., 3, K, Np); got {data.shape}.')
    d = data.astype(xp.uint32)
    word = d[..., 0, :, :] | (d[..., 1, :, :] << xp.uint32(8)) | (d[..., 2, :, :] << xp.uint32(16))
  else:
    word = data.astype(xp.uint32)
  np_ = word.shape[-1]
  if np_ != packed_columns(n, bits):
    raise ValueError(
      f'packed data has {np_} packed columns but n={n} needs '
      f'{packed_columns(n, bits)} for bits={bits}.'
    )
  mask = xp.uint32(2**bits - 1)
  planes = [(word >> xp.uint32(bits * i)) & mask for i in range(p)]
  u = xp.concatenate(planes, axis=-1) if p > 1 else planes[0]
  return u[..., :n].astype(xp.uint8)


def pack(q: quantizer.QArray, *, scale_dtype=jnp.float32) -> PackedArray:
  """Packs a ``QArray`` (codes (..., d_in, d_out)) into a ``PackedArray``.

  Args:
    q: the quantized array; leading batch dims allowed. numpy fields give numpy
      fields (host-side packing); jax arrays give jax arrays (jit-able).
    scale_dtype: storage dtype of the scales and zero points (float32 keeps
      ``unpack`` exact; bfloat16 halves their bytes and rounds the scales; the
      zero points are small integers and stay exact).

  Returns:
    A ``PackedArray`` with the layout described in the module docstring.
  """
  spec = q.spec
  if spec.ggml_type is not None:
    raise ValueError(
      f'{spec.name} weights use llama.cpp block formats (codes * scale - min), which '
      'PackedArray and the Pallas kernels do not hold: write them with '
      "cafeq_jax.loading.save_gguf, or run them with backend='xla'."
    )
  _check_bits(spec.bits)
  qmin = spec.qmin
  xp = _xp(q.codes)
  u = xp.asarray(q.codes).astype(xp.int32) - qmin
  data = pack_codes(u, spec.bits)
  scale = xp.asarray(q.scale).astype(scale_dtype)
  if q.zero is None:
    zero = xp.full(scale.shape, -qmin, scale_dtype)
  else:
    zero = (xp.asarray(q.zero).astype(xp.float32) - qmin).astype(scale_dtype)
  return PackedArray(
    data=data,
    scale=scale,
    zero=zero,
    bits=spec.bits,
    group_size=spec.group_size,
    symmetric=spec.symmetric,
    shape=tuple(q.codes.shape),
  )


def unpack(p: PackedArray) -> quantizer.QArray:
  """Exact inverse of ``pack``: returns the ``QArray`` (codes int8/int16)."""
  spec = p.spec
  xp = _xp(p.data)
  u = unpack_codes(p.data, p.bits, p.shape[-1]).astype(xp.int32)
  codes = (u + spec.qmin).astype(xp.int16 if spec.qmax > 127 else xp.int8)
  zero = None if p.symmetric else p.zero.astype(xp.float32) + spec.qmin
  return quantizer.QArray(codes=codes, scale=p.scale.astype(xp.float32), zero=zero, spec=spec)


def dequantize(p: PackedArray, dtype=jnp.float32) -> jax.Array:
  """Dense weight ``(..., d_in, d_out)`` of ``dtype`` from a ``PackedArray``."""
  *lead, k, n = p.shape
  u = unpack_codes(p.data, p.bits, n).astype(jnp.float32)
  g = k if p.group_size is None else p.group_size
  ug = u.reshape(*lead, k // g, g, n)
  w = (ug - p.zero.astype(jnp.float32)[..., None, :]) * p.scale.astype(jnp.float32)[..., None, :]
  return w.reshape(p.shape).astype(dtype)


def index(p: PackedArray, i) -> PackedArray:
  """The matrix ``i`` of a stacked ``PackedArray`` (indexes the first leading dim).

  Args:
    p: ``PackedArray`` of shape ``(L, ..., d_in, d_out)``.
    i: int or traced int index into ``L``.

  Returns:
    ``PackedArray`` of shape ``(..., d_in, d_out)`` (e.g. the key half of a
    stacked kv weight). Use this rather than ``jax.tree.map`` so the static
    ``shape`` stays consistent with the arrays.
  """
  if len(p.shape) < 3:
    raise ValueError(f'index needs a stacked PackedArray (rank >= 3); got shape {p.shape}.')
  return PackedArray(
    data=p.data[i],
    scale=p.scale[i],
    zero=p.zero[i],
    bits=p.bits,
    group_size=p.group_size,
    symmetric=p.symmetric,
    shape=p.shape[1:],
  )


def nbytes(p: PackedArray) -> int:
  """Storage bytes: packed codes + scales (+ zeros when asymmetric)."""
  total = _array_bytes(p.data) + _array_bytes(p.scale)
  if not p.symmetric:
    total += _array_bytes(p.zero)
  return total


def bf16_nbytes(shape: tuple[int, ...]) -> int:
  """Bytes of the same weight stored densely in bfloat16."""
  return 2 * math.prod(shape)


def _array_bytes(a) -> int:
  return math.prod(a.shape) * np.dtype(a.dtype).itemsize
