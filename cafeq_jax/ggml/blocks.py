"""The bytes of llama.cpp's block types, written from a GGML-spec ``QArray``.

``to_blocks(q)`` turns one quantized matrix (``(d_in, d_out)`` matrix view, a
``QuantSpec`` with ``ggml_type``) into the rows GGUF stores: ``d_out`` rows of
``d_in`` weights, each row a run of blocks in the type's byte layout (ggml's
``block_q4_K`` etc.; the layouts below are the exact inverses of the dequantizers
in the ``gguf`` package, ``gguf.quants``, which tests read the bytes back with).

Nothing is re-rounded here. The codes are written as they are; the scales (and
mins) must already lie on the type's grid (``ggml.types.quantize_scales``): for
the K-types the integer sub-block scales and the f16 super-block scale are
recovered from the effective scales, and a block whose scales are not exactly
``d * sc`` for an f16 ``d`` and in-range integers ``sc`` raises ``ValueError``.
"""

from __future__ import annotations

import numpy as np

from cafeq_jax.ggml.types import INFO
from cafeq_jax.ggml.types import SUPER_BLOCK
from cafeq_jax.ggml.types import GGMLType


def _pack(vals: np.ndarray, a: int, s: int, w: int, width: int) -> np.ndarray:
  """Values ``(n, a*s*w)`` of ``width`` bits into bytes ``(n, a*w)``.

  Value ``(i, j, k)`` of the ``(a, s, w)`` view sits in byte ``i*w + k`` at bit
  ``j*width``: the inverse of gguf's ``bytes.reshape(n, a, 1, w) >> shifts``.
  """
  n = vals.shape[0]
  v = (
    vals.astype(np.uint16).reshape(n, a, s, w)
    << (width * np.arange(s, dtype=np.uint16))[None, None, :, None]
  )
  return v.sum(axis=2).astype(np.uint8).reshape(n, a * w)


def _f16_bytes(x: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(x.astype(np.float16)).view(np.uint8).reshape(x.shape[0], 2)


def _as_f16(x: np.ndarray, what: str, t: GGMLType) -> np.ndarray:
  h = x.astype(np.float16)
  bad = h.astype(np.float32) != x
  if bad.any():
    i = int(np.argwhere(bad.reshape(-1))[0, 0])
    raise ValueError(
      f'{t.value}: {what} {float(x.reshape(-1)[i])!r} is not an f16 value; the '
      'weights were not rounded onto this type (quantize with cafeq_jax.ggml.spec).'
    )
  return x


def factor_scales(e: np.ndarray, lo: int, hi: int, what: str, t: GGMLType):
  """``e`` (B, n) float32 as ``d * sc``: ``d`` (B,) f16-exact, ``sc`` (B, n) ints in [lo, hi].

  Raises:
    ValueError: some block has no such factorisation.
  """
  e = np.asarray(e, np.float32)
  amax = np.abs(e).max(axis=1)
  ext = np.take_along_axis(e, np.abs(e).argmax(axis=1)[:, None], axis=1)[:, 0]
  d = np.zeros(e.shape[0], np.float32)
  sc = np.zeros(e.shape, np.int32)
  todo = amax > 0
  # The quantizer gives the extreme sub-scale code ``lo`` (signed) or ``hi``; try
  # that first, then every other code for the blocks it does not explain.
  first = lo if lo < 0 else hi
  for k in [first] + [k for k in range(lo, hi + 1) if k not in (0, first)]:
    if not todo.any():
      break
    idx = np.nonzero(todo)[0]
    dk = (ext[idx] / np.float32(k)).astype(np.float32)
    ok = (dk.astype(np.float16).astype(np.float32) == dk) & (dk != 0)
    safe = np.where(dk == 0, 1.0, dk).astype(np.float32)
    s = np.round(e[idx] / safe[:, None])
    ok &= np.all((s >= lo) & (s <= hi), axis=1)
    ok &= np.all((dk[:, None] * s.astype(np.float32)) == e[idx], axis=1)
    d[idx[ok]] = dk[ok]
    sc[idx[ok]] = s[ok].astype(np.int32)
    todo[idx[ok]] = False
  if todo.any():
    b = int(np.nonzero(todo)[0][0])
    raise ValueError(
      f'{t.value}: the {what} of super-block {b} ({e[b].tolist()}) are not an f16 '
      f'times integers in [{lo}, {hi}]; the weights were not rounded onto this type '
      '(quantize with cafeq_jax.ggml.spec).'
    )
  return d, sc


def _check_codes(codes, qmin: int, qmax: int, t: GGMLType):
  if codes.min() < qmin or codes.max() > qmax:
    raise ValueError(f'{t.value}: codes outside [{qmin}, {qmax}].')


def to_blocks(q) -> tuple[np.ndarray, GGMLType]:
  """The GGUF bytes of one quantized matrix.

  Args:
    q: a ``QArray`` with codes ``(d_in, d_out)`` and a spec with ``ggml_type``.

  Returns:
    ``(data, type)``: ``data`` uint8 ``(d_out, d_in // block * block_bytes)``,
    row ``c`` holding column ``c`` of the matrix view (GGUF's ``(out, in)``
    tensor, blocks along ``in``).
  """
  t = q.spec.ggml_type
  if t is None:
    raise ValueError(
      f'spec {q.spec.name} is not a GGML type; GGUF holds llama.cpp block types '
      'only (quantize with a cafeq_jax.ggml.spec or a named mix).'
    )
  ti = INFO[t]
  codes = np.asarray(q.codes)
  if codes.ndim != 2:
    raise ValueError(f'to_blocks takes one matrix (d_in, d_out); got codes {codes.shape}.')
  d_in, d_out = codes.shape
  bs = ti.block_size
  if d_in % bs:
    raise ValueError(f'{t.value}: rows of {d_in} weights are not whole {bs}-weight blocks.')
  _check_codes(codes, q.spec.qmin, q.spec.qmax, t)
  nb = d_out * (d_in // bs)
  per = bs // ti.group_size
  c = codes.T.reshape(nb, bs).astype(np.int32)
  s = np.asarray(q.scale, np.float32).T.reshape(nb, per)
  z = None if q.zero is None else np.asarray(q.zero, np.float32).T.reshape(nb, per)
  out = _PACKERS[t](c, s, z, t)
  assert out.shape == (nb, ti.block_bytes), (out.shape, ti.block_bytes)
  return out.reshape(d_out, -1), t


def _q8_0(c, s, z, t):
  return np.concatenate(
    [_f16_bytes(_as_f16(s[:, 0], 'scale', t)), c.astype(np.int8).view(np.uint8)], 1
  )


def _q4_0(c, s, z, t):
  return np.concatenate([_f16_bytes(_as_f16(s[:, 0], 'scale', t)), _pack(c + 8, 1, 2, 16, 4)], 1)


def _q5_0(c, s, z, t):
  u = c + 16
  d = _f16_bytes(_as_f16(s[:, 0], 'scale', t))
  return np.concatenate([d, _pack(u >> 4, 4, 8, 1, 1), _pack(u & 15, 1, 2, 16, 4)], 1)


def _mins(z, t):
  # Q4_1 / Q5_1 store the min m (``d * q + m``); our zero is the subtracted ``-m``.
  return _f16_bytes(_as_f16(-z[:, 0], 'min', t))


def _q4_1(c, s, z, t):
  d = _f16_bytes(_as_f16(s[:, 0], 'scale', t))
  return np.concatenate([d, _mins(z, t), _pack(c, 1, 2, 16, 4)], 1)


def _q5_1(c, s, z, t):
  d = _f16_bytes(_as_f16(s[:, 0], 'scale', t))
  return np.concatenate([d, _mins(z, t), _pack(c >> 4, 4, 8, 1, 1), _pack(c & 15, 1, 2, 16, 4)], 1)


def _k_scales(s, z, t):
  lo, hi = INFO[t].scale_codes
  d, sc = factor_scales(s, lo, hi, 'scales', t)
  if z is None:
    return d, sc, None, None
  dmin, m = factor_scales(z, 0, hi, 'mins', t)
  return d, sc, dmin, m


def _scales_k4(sc, m):
  """Q4_K / Q5_K: eight 6-bit scales and mins in 12 bytes (ggml's get_scale_min_k4)."""
  lo_sc, hi_sc, lo_m, hi_m = sc[:, :4], sc[:, 4:], m[:, :4], m[:, 4:]
  b0 = lo_sc | ((hi_sc >> 4) << 6)
  b1 = lo_m | ((hi_m >> 4) << 6)
  b2 = (hi_sc & 15) | ((hi_m & 15) << 4)
  return np.concatenate([b0, b1, b2], 1).astype(np.uint8)


def _q2_k(c, s, z, t):
  d, sc, dmin, m = _k_scales(s, z, t)
  scales = (sc | (m << 4)).astype(np.uint8)
  return np.concatenate([scales, _pack(c, 2, 4, 32, 2), _f16_bytes(d), _f16_bytes(dmin)], 1)


def _q3_k(c, s, z, t):
  d, sc, _, _ = _k_scales(s, z, t)
  u = sc + 32  # 6-bit
  scales = np.concatenate([_pack(u & 15, 1, 2, 8, 4), _pack(u >> 4, 1, 4, 4, 2)], 1)
  high = (c >= 0).astype(np.int32)  # ggml: q = low - 4 * (1 - hbit)
  low = c + 4 * (1 - high)
  return np.concatenate(
    [_pack(high, 1, 8, 32, 1), _pack(low, 2, 4, 32, 2), scales, _f16_bytes(d)], 1
  )


def _q4_k(c, s, z, t):
  d, sc, dmin, m = _k_scales(s, z, t)
  head = [_f16_bytes(d), _f16_bytes(dmin), _scales_k4(sc, m)]
  return np.concatenate(head + [_pack(c, 4, 2, 32, 4)], 1)


def _q5_k(c, s, z, t):
  d, sc, dmin, m = _k_scales(s, z, t)
  head = [_f16_bytes(d), _f16_bytes(dmin), _scales_k4(sc, m)]
  return np.concatenate(head + [_pack(c >> 4, 1, 8, 32, 1), _pack(c & 15, 4, 2, 32, 4)], 1)


def _q6_k(c, s, z, t):
  d, sc, _, _ = _k_scales(s, z, t)
  u = c + 32
  parts = [_pack(u & 15, 2, 2, 64, 4), _pack(u >> 4, 2, 4, 32, 2)]
  return np.concatenate(parts + [sc.astype(np.int8).view(np.uint8), _f16_bytes(d)], 1)


_PACKERS = {
  GGMLType.Q8_0: _q8_0,
  GGMLType.Q4_0: _q4_0,
  GGMLType.Q5_0: _q5_0,
  GGMLType.Q4_1: _q4_1,
  GGMLType.Q5_1: _q5_1,
  GGMLType.Q2_K: _q2_k,
  GGMLType.Q3_K: _q3_k,
  GGMLType.Q4_K: _q4_k,
  GGMLType.Q5_K: _q5_k,
  GGMLType.Q6_K: _q6_k,
}
assert set(_PACKERS) == set(GGMLType) and SUPER_BLOCK == 256
