"""Uniform weight quantizer: specs, quantized arrays, round-to-nearest, STE.

Conventions (docs/method.md#quantizer). A linear layer computes ``y = x @ W`` with ``W`` of shape
``(d_in, d_out)`` (Flax kernel layout). Quantization replaces ``W`` by
``Ŵ = s * (q - z)`` with integer codes ``q`` and one scale ``s`` (and, when
asymmetric, one zero point ``z``) per *group*: ``g`` consecutive rows of one
column. Per-output-channel quantization is the special case ``g = d_in``.

Every function accepts leading batch dimensions ``(..., d_in, d_out)`` so that
stacks of same-shape matrices (layers, heads) are processed in one call.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from cafeq_jax import enums
from cafeq_jax.ggml import types as ggml_types

SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128, 256)
DEFAULT_CLIP_GRID = tuple(round(1.0 - 0.025 * i, 3) for i in range(21))  # 1.0 .. 0.5


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantSpec:
  """Static description of a uniform quantizer.

  Attributes:
    bits: code width, one of 2, 3, 4, 8.
    group_size: rows of ``W`` sharing one scale, one of 32, 64, 128, 256; ``None``
      means one scale per output channel (the whole column).
    symmetric: codes in ``[-2^(b-1), 2^(b-1) - 1]`` with no zero point when True;
      codes in ``[0, 2^b - 1]`` with a zero point when False.
    clip_search: pick, per group, the clipping ratio from ``clip_grid`` that
      minimises the group's squared rounding error (MSE-optimal clipping).
    clip_grid: candidate ratios of the max-abs (symmetric) or of the min and max
      (asymmetric) range.
    group_fallback: when ``d_in`` is not divisible by ``group_size``, use the
      largest supported group size that divides ``d_in`` (e.g. 64 for SmolLM2's
      ``d_in = 576`` under g128) instead of raising. The ``QArray`` records the
      group size actually used.
    ggml_type: one of llama.cpp's block types (``ggml.types.GGMLType``): the
      quantizer rounds onto that type's grid exactly (f16 scales, or the K-types'
      integer sub-block scales and mins times an f16 per super-block of 256), so
      the codes are what a GGUF file of that type stores. ``bits``,
      ``group_size`` and ``symmetric`` must be the type's (build the spec with
      ``cafeq_jax.ggml.spec('Q4_K')``); 5- and 6-bit codes and 16-row groups
      exist only as GGML types. ``QArray.zero`` of such a spec holds the min in
      weight units: ``dequant = codes * scale - zero`` (see ``QArray``).
  """

  bits: int = 4
  group_size: int | None = 128
  symmetric: bool = False
  clip_search: bool = False
  clip_grid: tuple[float, ...] = DEFAULT_CLIP_GRID
  group_fallback: bool = False
  ggml_type: ggml_types.GGMLType | None = None

  def __post_init__(self):
    for name in ('symmetric', 'clip_search', 'group_fallback'):
      if not isinstance(getattr(self, name), (bool, np.bool_)):
        raise TypeError(f'{name}={getattr(self, name)!r} must be a bool (True / False).')
      object.__setattr__(self, name, bool(getattr(self, name)))
    for name in ('bits', 'group_size'):
      v = getattr(self, name)
      if v is not None and (
        isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer))
      ):
        raise TypeError(f'{name}={v!r} must be an int, not {type(v).__name__}.')
    if self.ggml_type is not None:
      self._check_ggml()  # the type fixes bits and group size (5/6 bits, 16 rows allowed)
    elif self.bits not in SUPPORTED_BITS:
      raise ValueError(f'bits={self.bits!r} is not supported; expected one of {SUPPORTED_BITS}.')
    elif self.group_size is not None and self.group_size not in SUPPORTED_GROUP_SIZES:
      raise ValueError(
        f'group_size={self.group_size!r} is not supported; expected None '
        f'(per output channel) or one of {SUPPORTED_GROUP_SIZES}.'
      )
    if not self.clip_grid or any(not 0.0 < r <= 1.0 for r in self.clip_grid):
      raise ValueError(f'clip_grid={self.clip_grid!r} must be non-empty with ratios in (0, 1].')
    object.__setattr__(self, 'clip_grid', tuple(float(r) for r in self.clip_grid))

  def _check_ggml(self):
    t = enums.coerce(ggml_types.GGMLType, self.ggml_type, 'ggml_type')
    object.__setattr__(self, 'ggml_type', t)
    ti = ggml_types.INFO[t]
    got = (self.bits, self.group_size, self.symmetric)
    if got != (ti.bits, ti.group_size, ti.symmetric) or self.group_fallback:
      raise ValueError(
        f'ggml_type={t.value} has bits={ti.bits}, group_size={ti.group_size}, '
        f'symmetric={ti.symmetric} and no group fallback; got bits={self.bits}, '
        f'group_size={self.group_size}, symmetric={self.symmetric}, '
        f'group_fallback={self.group_fallback}. Build it with '
        f"cafeq_jax.ggml.spec('{t.value}')."
      )

  @property
  def qmin(self) -> int:
    return -(2 ** (self.bits - 1)) if self.symmetric else 0

  @property
  def qmax(self) -> int:
    return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

  def groups(self, d_in: int) -> int:
    """Number of groups along ``d_in`` (1 for per-channel)."""
    return d_in // self.effective_group_size(d_in)

  def effective_group_size(self, d_in: int) -> int:
    """Rows per group for a matrix with ``d_in`` rows (see ``group_fallback``)."""
    if self.group_size is None:
      return d_in
    if self.ggml_type is not None:
      block = ggml_types.INFO[self.ggml_type].block_size
      if d_in % block:
        raise ValueError(
          f'd_in={d_in} is not a multiple of the {block}-weight blocks of '
          f'{self.ggml_type.value}; llama.cpp stores such rows as '
          f'{ggml_types.type_for_rows(self.ggml_type, d_in).value} '
          f'(cafeq_jax.ggml.types.type_for_rows).'
        )
      return self.group_size
    if d_in % self.group_size == 0:
      return self.group_size
    if self.group_fallback:
      for g in sorted(SUPPORTED_GROUP_SIZES, reverse=True):
        if g < self.group_size and d_in % g == 0:
          return g
    raise ValueError(
      f'd_in={d_in} is not divisible by group_size={self.group_size}'
      + (
        ''
        if self.group_fallback
        else '; use a group size dividing d_in, group_size=None, or group_fallback=True'
      )
      + '.'
    )

  def for_rows(self, d_in: int) -> QuantSpec:
    """This spec with the group size actually used for ``d_in`` rows."""
    g = self.effective_group_size(d_in)
    if self.group_size is None or g == self.group_size:
      return self
    return dataclasses.replace(self, group_size=g, group_fallback=False)

  @property
  def name(self) -> str:
    if self.ggml_type is not None:
      return self.ggml_type.value
    gran = 'pc' if self.group_size is None else f'g{self.group_size}'
    return f'w{self.bits}{gran}{"sym" if self.symmetric else "asym"}'


@flax.struct.dataclass
class QArray:
  """A quantized matrix (or stack of matrices).

  Invariant: ``dequantize(q) == scale[..., r // g, c] * (codes[..., r, c] -
  zero[..., r // g, c])`` (``zero = 0`` when symmetric), with ``g`` the group
  size (``d_in`` per channel) and ``qmin <= codes <= qmax``. For a GGML spec
  (``spec.ggml_type``) it is ``codes * scale - zero`` instead, ``zero`` being the
  min in weight units (any float) and ``scale`` possibly negative: the expression
  llama.cpp dequantizes with.

  Attributes:
    codes: ``(..., d_in, d_out)`` int8 (int16 for 8-bit asymmetric codes).
    scale: ``(..., d_in // g, d_out)`` float32, positive.
    zero: ``(..., d_in // g, d_out)`` float32 holding integers, or ``None`` when
      symmetric.
    spec: the static ``QuantSpec``.
  """

  codes: jax.Array
  scale: jax.Array
  zero: jax.Array | None
  spec: QuantSpec = flax.struct.field(pytree_node=False)

  @property
  def shape(self) -> tuple[int, ...]:
    return self.codes.shape

  def __getitem__(self, index) -> QArray:
    """Indexes the leading (stack) dims: ``q[l]`` is layer ``l`` of a stack.

    ``index`` must leave the last two dims (``d_in``, ``d_out``) whole; scales and
    zero points are indexed alike.
    """
    codes = self.codes[index]
    if codes.ndim < 2 or codes.shape[-2:] != self.codes.shape[-2:]:
      raise IndexError(
        f'QArray index {index!r} must select along the stack dims only; '
        f'codes {self.codes.shape} -> {codes.shape}.'
      )
    return QArray(
      codes=codes,
      scale=self.scale[index],
      zero=None if self.zero is None else self.zero[index],
      spec=self.spec,
    )

  @classmethod
  def stack(cls, qs) -> QArray:
    """Stacks same-spec, same-shape ``QArray``s along a new leading dim."""
    qs = list(qs)
    if not qs or any(q.spec != qs[0].spec or q.shape != qs[0].shape for q in qs):
      raise ValueError(
        'QArray.stack needs a non-empty list of QArrays with one spec and '
        f'shape; got {[(q.spec.name, q.shape) for q in qs]}.'
      )
    return cls(
      codes=jnp.stack([q.codes for q in qs]),
      scale=jnp.stack([q.scale for q in qs]),
      zero=None if qs[0].zero is None else jnp.stack([q.zero for q in qs]),
      spec=qs[0].spec,
    )


def code_dtype(spec: QuantSpec):
  """Integer dtype of a spec's codes: int8, or int16 for 8-bit asymmetric codes."""
  return jnp.int16 if spec.qmax > 127 else jnp.int8


def validate_weight(w, spec: QuantSpec, *, check_finite: bool = True) -> None:
  """Raises a ValueError naming the problem if ``w`` cannot be quantized by ``spec``.

  Checks rank (>= 2), floating dtype, divisibility of ``d_in`` by the group size
  and, when ``check_finite`` and ``w`` is concrete, NaN/Inf entries.
  """
  shape = tuple(w.shape)
  if len(shape) < 2:
    raise ValueError(
      f'weight must have rank >= 2 with shape (..., d_in, d_out); got shape {shape}.'
    )
  if not jnp.issubdtype(w.dtype, jnp.floating):
    raise ValueError(f'weight must be floating point; got dtype {w.dtype}.')
  try:
    spec.effective_group_size(shape[-2])
  except ValueError as e:
    raise ValueError(f'weight shape {shape}: {e}') from None
  if check_finite and not isinstance(w, jax.core.Tracer):
    finite = np.isfinite(np.asarray(w, dtype=np.float32))
    if not finite.all():
      bad = np.argwhere(~finite)[0].tolist()
      raise ValueError(
        f'weight of shape {shape} has {int((~finite).sum())} NaN/Inf entries '
        f'(first at index {bad}); refusing to quantize.'
      )


def _grouped(w: jax.Array, spec: QuantSpec) -> jax.Array:
  """(..., d_in, d_out) -> (..., n_groups, g, d_out)."""
  *lead, d_in, d_out = w.shape
  g = spec.effective_group_size(d_in)
  return w.reshape(*lead, d_in // g, g, d_out)


def _scale_zero_from_range(lo, hi, spec: QuantSpec):
  """Scale/zero for a group whose (clipped) range is [lo, hi]."""
  tiny = jnp.finfo(jnp.float32).tiny
  if spec.symmetric:
    amax = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
    scale = jnp.maximum(amax / spec.qmax, tiny)
    return scale, None
  lo = jnp.minimum(lo, 0.0)
  hi = jnp.maximum(hi, 0.0)
  scale = jnp.maximum((hi - lo) / (spec.qmax - spec.qmin), tiny)
  zero = jnp.clip(jnp.round(-lo / scale), spec.qmin, spec.qmax)
  return scale, zero


def round_codes(x, scale, zero, spec: QuantSpec):
  """Nearest codes of ``x`` for scales/zeros broadcastable to it (zero None: 0).

  Uniform specs: ``clip(round(x / scale) + zero)``; GGML specs:
  ``clip(round((x + zero) / scale))`` with code 0 where the scale is 0.
  """
  z = 0.0 if zero is None else zero
  if spec.ggml_type is None:
    return jnp.clip(jnp.round(x / scale) + z, spec.qmin, spec.qmax)
  dead = scale == 0
  q = jnp.where(dead, 0.0, jnp.round((x + z) / jnp.where(dead, 1.0, scale)))
  return jnp.clip(q, spec.qmin, spec.qmax)


def dequant_codes(q, scale, zero, spec: QuantSpec):
  """Weights of codes ``q`` (the ``QArray`` invariant, elementwise, broadcasting)."""
  z = 0.0 if zero is None else zero
  if spec.ggml_type is None:
    return (q - z) * scale
  return q * scale - z


def _round_grouped(wg, scale, zero, spec: QuantSpec):
  """Codes for grouped weights ``wg`` (..., G, g, N) with scales (..., G, N)."""
  z = None if zero is None else zero[..., None, :]
  return round_codes(wg, scale[..., None, :], z, spec)


def _dequant_grouped(q, scale, zero, spec: QuantSpec):
  z = None if zero is None else zero[..., None, :]
  return dequant_codes(q, scale[..., None, :], z, spec)


def compute_scale_zero(w: jax.Array, spec: QuantSpec):
  """Per-group scale and zero point of ``w`` under ``spec``.

  Args:
    w: ``(..., d_in, d_out)`` float.
    spec: the quantizer.

  Returns:
    ``(scale, zero)``, each ``(..., d_in // g, d_out)`` float32; ``zero`` is
    ``None`` when symmetric. With ``spec.clip_search`` the range of each group is
    shrunk by the ratio from ``spec.clip_grid`` minimising its squared error.
  """
  wg = _grouped(jnp.asarray(w, jnp.float32), spec)
  lo, hi = wg.min(axis=-2), wg.max(axis=-2)
  t = spec.ggml_type
  from_range = (
    _scale_zero_from_range
    if t is None
    else lambda lo, hi, spec: ggml_types.raw_scale_zero(lo, hi, spec.ggml_type)
  )
  if not spec.clip_search:
    s, z = from_range(lo, hi, spec)
    return (s, z) if t is None else ggml_types.quantize_scales(s, z, t)

  def error(ratio):
    s, z = from_range(lo * ratio, hi * ratio, spec)
    err = jnp.sum((_dequant_grouped(_round_grouped(wg, s, z, spec), s, z, spec) - wg) ** 2, axis=-2)
    return err, s, z

  grid = jnp.asarray(spec.clip_grid, jnp.float32)
  best_err, best_s, best_z = error(grid[0])

  def body(carry, ratio):
    best_err, best_s, best_z = carry
    err, s, z = error(ratio)
    better = err < best_err
    best_s = jnp.where(better, s, best_s)
    best_z = None if z is None else jnp.where(better, z, best_z)
    return (jnp.minimum(err, best_err), best_s, best_z), None

  (_, best_s, best_z), _ = jax.lax.scan(body, (best_err, best_s, best_z), grid[1:])
  # GGML grids: the search picks each group's range on raw scales, then the
  # scales go onto the type's grid (its super-block scale depends on all groups).
  return (best_s, best_z) if t is None else ggml_types.quantize_scales(best_s, best_z, t)


def round_with_scale(
  w: jax.Array, scale: jax.Array, zero: jax.Array | None, spec: QuantSpec
) -> QArray:
  """Round-to-nearest codes of ``w`` for given per-group ``scale``/``zero``."""
  wg = _grouped(jnp.asarray(w, jnp.float32), spec)
  q = _round_grouped(wg, scale, zero, spec).reshape(w.shape)
  return QArray(
    codes=q.astype(code_dtype(spec)), scale=scale, zero=zero, spec=spec.for_rows(w.shape[-2])
  )


def quantize(w: jax.Array, spec: QuantSpec) -> QArray:
  """Round-to-nearest quantization of ``w`` (..., d_in, d_out) under ``spec``."""
  validate_weight(w, spec)
  scale, zero = compute_scale_zero(w, spec)
  return round_with_scale(w, scale, zero, spec)


def dequantize(q: QArray, dtype=jnp.float32) -> jax.Array:
  """Inverse of ``quantize`` up to rounding: ``(..., d_in, d_out)`` of ``dtype``."""
  codes = q.codes.astype(jnp.float32)
  qg = _grouped(codes, q.spec)
  return _dequant_grouped(qg, q.scale, q.zero, q.spec).reshape(codes.shape).astype(dtype)


def quant_dequant(w: jax.Array, spec: QuantSpec) -> jax.Array:
  """``dequantize(quantize(w))`` in ``w``'s dtype, without input validation.

  Traceable (used inside jitted losses); validate concrete inputs up front with
  ``validate_weight``.
  """
  validate_weight(w, spec, check_finite=False)
  scale, zero = compute_scale_zero(w, spec)
  wg = _grouped(jnp.asarray(w, jnp.float32), spec)
  w_hat = _dequant_grouped(_round_grouped(wg, scale, zero, spec), scale, zero, spec)
  return w_hat.reshape(w.shape).astype(w.dtype)


def fake_quant(w: jax.Array, spec: QuantSpec) -> jax.Array:
  """Straight-through fake quantization: forward ``Q(w)``, gradient identity.

  ``w + stop_gradient(Q(w) - w)``: the value equals ``quant_dequant(w, spec)``
  and ``jax.grad`` sees the identity, exactly.
  """
  return w + jax.lax.stop_gradient(quant_dequant(w, spec) - w)


def bits_per_weight(spec: QuantSpec, d_in: int, scale_bits: int = 16) -> float:
  """Storage bits per weight: codes plus amortised scales (and zeros).

  GGML specs: the type's block bytes per weight (``scale_bits`` is ignored).
  """
  if spec.ggml_type is not None:
    return ggml_types.INFO[spec.ggml_type].bits_per_weight
  per_group = scale_bits * (1 if spec.symmetric else 2)
  return spec.bits + per_group / spec.effective_group_size(d_in)
