"""llama.cpp's weight block types as quantization grids (docs/export.md#gguf).

Each GGML type stores a row of weights in blocks. Read as a ``QuantSpec`` (rows of
the matrix view ``(d_in, d_out)`` are the GGUF row's elements), a type is a group
size, a code range and a rule for how the per-group scale (and min) are themselves
stored:

  type  bits group  codes      stored per group             dequantized weight
  Q8_0   8    32   -128..127  f16 d                         d * q
  Q4_0   4    32     -8..7    f16 d                         d * q
  Q5_0   5    32    -16..15   f16 d                         d * q
  Q4_1   4    32      0..15   f16 d, f16 m                  d * q + m
  Q5_1   5    32      0..31   f16 d, f16 m                  d * q + m
  Q2_K   2    16      0..3    4-bit sc, m; f16 d, dmin /256 d*sc * q - dmin*m
  Q3_K   3    16     -4..3    6-bit sc-32; f16 d /256       d*(sc-32) * q
  Q4_K   4    32      0..15   6-bit sc, m; f16 d, dmin /256 d*sc * q - dmin*m
  Q5_K   5    32      0..31   6-bit sc, m; f16 d, dmin /256 d*sc * q - dmin*m
  Q6_K   6    16    -32..31   int8 sc; f16 d /256           d*sc * q

("/256": one ``d`` (and ``dmin``) per super-block of 256 weights; the K-types'
sub-block scales are integers times it.) In a ``QArray`` of a GGML spec, ``scale``
holds the effective group scale (``d`` or ``d * sc``: exact in float32, may be
negative for the symmetric types) and ``zero`` the subtracted min in weight units
(``-m`` or ``dmin * m``), so ``dequant = codes * scale - zero`` is the very float
expression llama.cpp evaluates. ``quantize_scales`` puts raw per-group scales onto
this grid; ``ggml.blocks`` recovers the integers when writing the bytes and refuses
anything that is not exactly on it.
"""

from __future__ import annotations

import dataclasses
import enum

import jax.numpy as jnp

SUPER_BLOCK = 256


class GGMLType(enum.StrEnum):
  """The llama.cpp block types the quantizer can round into."""

  Q8_0 = 'Q8_0'
  Q4_0 = 'Q4_0'
  Q5_0 = 'Q5_0'
  Q4_1 = 'Q4_1'
  Q5_1 = 'Q5_1'
  Q2_K = 'Q2_K'
  Q3_K = 'Q3_K'
  Q4_K = 'Q4_K'
  Q5_K = 'Q5_K'
  Q6_K = 'Q6_K'


@dataclasses.dataclass(frozen=True)
class TypeInfo:
  """The grid of one GGML type.

  Attributes:
    bits: code width.
    group_size: weights per (sub-)block sharing one scale.
    symmetric: codes ``[-2^(b-1), 2^(b-1) - 1]`` and no min; else ``[0, 2^b - 1]``
      with a min.
    scale_codes: ``None``: the scale is an f16 of its own. ``(lo, hi)``: the scale
      is ``d * sc`` with an f16 ``d`` per super-block and integer ``sc`` in
      ``[lo, hi]`` (the min likewise with ``[0, hi]``).
    block_bytes: bytes of one block (``group_size`` weights, or a super-block).
    fallback: the type llama.cpp uses for rows whose length is not a multiple of
      this type's block (``tensor_type_fallback`` in llama.cpp's
      src/llama-quant.cpp); None for the 32-weight types.
  """

  bits: int
  group_size: int
  symmetric: bool
  scale_codes: tuple[int, int] | None
  block_bytes: int
  fallback: GGMLType | None = None

  @property
  def block_size(self) -> int:
    """Weights per stored block: 256 for the K-types, else the group size."""
    return SUPER_BLOCK if self.scale_codes is not None else self.group_size

  @property
  def bits_per_weight(self) -> float:
    return 8.0 * self.block_bytes / self.block_size


T = GGMLType
INFO: dict[GGMLType, TypeInfo] = {
  T.Q8_0: TypeInfo(8, 32, True, None, 34),
  T.Q4_0: TypeInfo(4, 32, True, None, 18),
  T.Q5_0: TypeInfo(5, 32, True, None, 22),
  T.Q4_1: TypeInfo(4, 32, False, None, 20),
  T.Q5_1: TypeInfo(5, 32, False, None, 24),
  T.Q2_K: TypeInfo(2, 16, False, (0, 15), 84, T.Q4_0),
  T.Q3_K: TypeInfo(3, 16, True, (-32, 31), 110, T.Q4_0),
  T.Q4_K: TypeInfo(4, 32, False, (0, 63), 144, T.Q5_0),
  T.Q5_K: TypeInfo(5, 32, False, (0, 63), 176, T.Q5_1),
  T.Q6_K: TypeInfo(6, 16, True, (-128, 127), 210, T.Q8_0),
}


def type_for_rows(t, d_in: int) -> GGMLType:
  """``t``, or llama.cpp's fallback type when ``d_in`` is not a multiple of its block.

  Raises:
    ValueError: not even the fallback's block divides ``d_in`` (llama.cpp would
      store such a tensor as F16, which is not a quantized type).
  """
  t = GGMLType(t)
  first = t
  while d_in % INFO[t].block_size:
    nxt = INFO[t].fallback
    if nxt is None:
      raise ValueError(
        f'rows of {d_in} weights fit neither {first} nor its fallbacks '
        f'(blocks of {INFO[t].block_size}); llama.cpp would store this tensor as F16.'
      )
    t = nxt
  return t


def _f16(x):
  return x.astype(jnp.float16).astype(jnp.float32)


def raw_scale_zero(lo, hi, t: GGMLType):
  """Per-group scale and min offset from the group's (clipped) range ``[lo, hi]``.

  Symmetric types map the signed value of largest magnitude to the most negative
  code (``d = max / qmin``, as llama.cpp's reference quantizers do: the grid is
  ``[-2^(b-1), 2^(b-1) - 1]``, so the far end gets the extra level); asymmetric
  types span ``[min(lo, 0), hi]`` (K-types, whose mins are stored non-negative)
  or ``[lo, hi]`` (Q4_1 / Q5_1, whose min is a signed f16).

  Returns:
    ``(scale, offset)`` float32 like ``lo``; ``offset`` is ``None`` for the
    symmetric types. ``dequant = q * scale - offset``.
  """
  ti = INFO[t]
  if ti.symmetric:
    signed_max = jnp.where(hi >= -lo, hi, lo)
    return signed_max / -(2 ** (ti.bits - 1)), None
  if ti.scale_codes is not None:
    lo = jnp.minimum(lo, 0.0)
  scale = (hi - lo) / (2**ti.bits - 1)
  return scale, -lo


def quantize_scales(scale, offset, t: GGMLType):
  """Puts raw per-group ``scale``/``offset`` ((..., G, N) float32) onto ``t``'s grid.

  f16 types: both rounded to f16. K-types: per super-block (``256 / group_size``
  consecutive groups of one column), ``d = extreme / sc_extreme`` rounded to f16
  and each ``sc = round(scale / d)`` clipped to the type's integer range; the min
  offsets likewise with their own ``dmin``. The extreme sub-scale gets the most
  negative code for the signed types (Q3_K, Q6_K), as in llama.cpp.

  Returns:
    ``(scale, offset)`` on the grid (float32, exact products), ``offset`` None
    for the symmetric types.
  """
  ti = INFO[t]
  if ti.scale_codes is None:
    return _f16(scale), None if offset is None else _f16(offset)
  per = SUPER_BLOCK // ti.group_size

  def grid(x, lo, hi):
    *lead, g, n = x.shape
    xb = x.reshape(*lead, g // per, per, n)
    if lo < 0:  # signed codes: the value of largest magnitude gets code lo
      amax = jnp.max(jnp.abs(xb), axis=-2, keepdims=True)
      pick = jnp.abs(xb) == amax
      extreme = jnp.max(jnp.where(pick, xb, -jnp.inf), axis=-2, keepdims=True)
      d = _f16(extreme / lo)
    else:
      d = _f16(jnp.max(xb, axis=-2, keepdims=True) / hi)
    safe = jnp.where(d == 0, 1.0, d)
    sc = jnp.where(d == 0, 0.0, jnp.clip(jnp.round(xb / safe), lo, hi))
    return (d * sc).reshape(x.shape)

  lo, hi = ti.scale_codes
  scale = grid(scale, lo, hi)
  if offset is None:
    return scale, None
  return scale, grid(offset, 0, hi)
