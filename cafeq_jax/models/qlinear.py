"""Quantized linear layers: the leaf type of a quantized model's param tree.

A quantized model has the same param tree as the fp model, with each quantized weight
leaf replaced by a ``QuantizedLinear``. The leaf stores the *matrix view* of the
weight, ``(d_in, d_out)`` with ``y = x @ W`` (see ``cafeq_jax.models.linears`` for the
mapping from each leaf's own layout), optionally with leading stack dims (``kv_einsum``
holds ``(2, D, K*hd)``: key then value; ``gating_einsum`` holds ``(2, D, F)``: gate then
up), and an optional online transform: the layer computes

    y = (x @ blockdiag(M_1^-1, ..., M_nb^-1)) @ dequant(W)

so the effective fp weight is ``W_eff = blockdiag(M^-1) @ dequant(W)``.

Serving with the Pallas kernels (``backend='pallas'``) reads ``PackedArray``
weights. Quantization methods return ``QArray`` weights (one code per int8); convert
a quantized param tree once with ``pack_params`` before serving. A ``QArray`` weight
still works on the Pallas path but is packed on every call (inside a jitted forward:
on every forward), which re-reads the int8 codes and writes the packed ones each
time; that logs a warning once per weight shape.
"""

from __future__ import annotations

import logging
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from cafeq_jax import packing
from cafeq_jax import quantizer
from cafeq_jax.core import transforms

BACKENDS = ('xla', 'pallas')


@flax.struct.dataclass
class QuantizedLinear:
  """A quantized weight leaf.

  Attributes:
    weight: ``QArray`` or ``PackedArray`` of shape ``(*lead, d_in, d_out)`` (the
      matrix view of the leaf; ``lead`` is ``(2,)`` for ``kv_einsum`` and
      ``gating_einsum``, empty otherwise), or a tuple of one per stacked matrix
      when they have different specs (e.g. a GGUF mix giving key and value
      different types).
    transform_inv: ``(d_in // k, k, k)`` float32 blocks of ``M^-1`` applied online to
      the input (shared by the stacked matrices), ``(*lead, d_in // k, k, k)`` for one
      transform per stacked matrix, or None.
    shape: static; the shape of the original fp leaf this replaces.
  """

  weight: Any
  transform_inv: jax.Array | None
  shape: tuple[int, ...] = flax.struct.field(pytree_node=False)

  @property
  def matrix_shape(self) -> tuple[int, ...]:
    """``(*lead, d_in, d_out)`` of the matrix view."""
    return _matrix_shape(self.weight)


def _is_packed(w) -> bool:
  return isinstance(w, packing.PackedArray)


def _matrix_shape(w) -> tuple[int, ...]:
  if isinstance(w, tuple):
    shapes = {_matrix_shape(x) for x in w}
    if len(shapes) != 1:
      raise ValueError(f'QuantizedLinear.weight tuple mixes shapes {sorted(shapes)}.')
    return (len(w), *shapes.pop())
  if isinstance(w, quantizer.QArray):
    return tuple(w.codes.shape)
  if _is_packed(w):
    return tuple(w.shape)
  raise TypeError(
    f'QuantizedLinear.weight must be a QArray or PackedArray; got {type(w).__name__}.'
  )


def as_qarray(w) -> quantizer.QArray:
  """The weight as a ``QArray`` (unpacking a ``PackedArray``)."""
  if isinstance(w, quantizer.QArray):
    return w
  if _is_packed(w):
    return packing.unpack(w)
  raise TypeError(
    f'QuantizedLinear.weight must be a QArray or PackedArray; got {type(w).__name__}.'
  )


def qarrays(w) -> list[quantizer.QArray]:
  """The weight as a list of ``QArray``: one, or one per matrix of a tuple weight."""
  return [as_qarray(x) for x in w] if isinstance(w, tuple) else [as_qarray(w)]


def dequantize_weight(ql: QuantizedLinear, dtype=jnp.float32) -> jax.Array:
  """``dequant(W)``: ``(*lead, d_in, d_out)`` of ``dtype`` (transform not folded)."""
  if isinstance(ql.weight, tuple):
    return jnp.stack([quantizer.dequantize(q, dtype) for q in qarrays(ql.weight)])
  return quantizer.dequantize(as_qarray(ql.weight), dtype)


def effective_weight(ql: QuantizedLinear, dtype=jnp.float32) -> jax.Array:
  """``W_eff = blockdiag(M^-1) @ dequant(W)``: ``(*lead, d_in, d_out)`` of ``dtype``.

  ``x @ W_eff`` equals ``matmul(x, ql)`` up to float rounding.
  """
  w = dequantize_weight(ql, jnp.float32)
  if ql.transform_inv is not None:
    w = transforms.apply_left(jnp.asarray(ql.transform_inv, jnp.float32), w)
  return w.astype(dtype)


def _transform_for(ql: QuantizedLinear, index):
  t = ql.transform_inv
  if t is None or t.ndim == 3:
    return t
  return t[index]


def _index(w, i: int):
  """Matrix ``i`` of a stacked ``QArray`` / ``PackedArray`` (leading dim) or a tuple."""
  if isinstance(w, tuple):
    return w[i]
  if isinstance(w, quantizer.QArray):
    return w[i]
  return w.replace(
    data=w.data[i],
    scale=w.scale[i],
    zero=None if w.zero is None else w.zero[i],
    shape=tuple(w.shape[1:]),
  )


def _pallas():
  try:
    import kernels_pallas  # pylint: disable=g-import-not-at-top

    return kernels_pallas
  except ImportError as e:
    raise ImportError(
      "backend='pallas' needs the kernels_pallas package (quantized_matmul), which "
      f"could not be imported ({e}); use backend='xla'."
    ) from e


_WARNED_PER_CALL_PACKING: set[tuple] = set()


def _warn_packing_per_call(weight: quantizer.QArray) -> None:
  key = (tuple(weight.codes.shape), weight.spec.bits, weight.spec.group_size)
  if key not in _WARNED_PER_CALL_PACKING:
    _WARNED_PER_CALL_PACKING.add(key)
    logging.warning(
      "QuantizedLinear: backend='pallas' got a QArray weight of shape %s (int%d, "
      'group_size=%s) and packs it on every call, re-reading and re-writing its codes; '
      'convert the param tree once with cafeq_jax.models.qlinear.pack_params(params).',
      key[0],
      key[1],
      key[2],
    )


_pack_jit = jax.jit(packing.pack, static_argnames=('scale_dtype',))


def pack_weight(weight, *, scale_dtype=jnp.float32):
  """A ``QArray`` packed to a ``PackedArray``; a ``PackedArray`` is returned as is.

  Args:
    weight: ``QArray`` with codes ``(*lead, d_in, d_out)`` or ``PackedArray``.
    scale_dtype: storage dtype of the scales (see ``packing.pack``).

  Returns:
    ``PackedArray`` of the same shape. numpy fields are packed on the host (numpy
    out); jax arrays by one jitted ``packing.pack`` per distinct shape/spec.
  """
  if isinstance(weight, tuple):
    return tuple(pack_weight(w, scale_dtype=scale_dtype) for w in weight)
  if _is_packed(weight):
    return weight
  if not isinstance(weight, quantizer.QArray):
    raise TypeError(f'pack_weight expects a QArray or PackedArray; got {type(weight).__name__}.')
  if isinstance(weight.codes, np.ndarray):
    return packing.pack(weight, scale_dtype=scale_dtype)
  return _pack_jit(weight, scale_dtype=scale_dtype)


def pack_params(params: Any, *, scale_dtype=jnp.float32) -> Any:
  """Packs every ``QuantizedLinear`` weight of a param tree, once, ahead of serving.

  Args:
    params: any pytree (e.g. the output of ``cafeq_jax.methods.quantize``);
      ``QuantizedLinear`` leaves with a ``QArray`` weight get its ``PackedArray``
      (same codes, scales, zeros and ``transform_inv``); everything else is kept.
    scale_dtype: storage dtype of the packed scales (float32 keeps the weights
      bit-exact; bfloat16 halves scale bytes and rounds them).

  Returns:
    The same tree structure with packed weights: ``backend='pallas'`` then feeds
    them straight to the kernels and ``backend='xla'`` gives the same outputs as
    before packing (``scale_dtype=float32``).
  """

  def one(leaf):
    if (
      isinstance(leaf, QuantizedLinear)
      and not _is_packed(leaf.weight)
      and not (isinstance(leaf.weight, tuple) and all(_is_packed(w) for w in leaf.weight))
    ):
      return leaf.replace(weight=pack_weight(leaf.weight, scale_dtype=scale_dtype))
    return leaf

  return jax.tree.map(one, params, is_leaf=lambda a: isinstance(a, QuantizedLinear))


def _matmul_one(x, weight, transform_inv, backend):
  if backend == 'xla':
    if transform_inv is not None:
      x = transforms.apply_to_activations(x, transform_inv)
    w = (
      packing.dequantize(weight, x.dtype)
      if _is_packed(weight)
      else quantizer.dequantize(weight, x.dtype)
    )
    return x @ w
  kp = _pallas()
  if transform_inv is not None:
    x = kp.blockdiag_matmul(x, transform_inv)
  if not _is_packed(weight):
    _warn_packing_per_call(weight)
    weight = packing.pack(weight)
  return kp.quantized_matmul(x, weight)


def matmul(x: jax.Array, ql: QuantizedLinear, backend: str = 'xla') -> jax.Array:
  """``(x @ blockdiag(M^-1)) @ dequant(W)``.

  Args:
    x: ``(..., d_in)`` activations (float32 or bfloat16).
    ql: the quantized weight.
    backend: 'xla' (dequantize, then a plain matmul) or 'pallas'
      (``kernels_pallas.blockdiag_matmul`` then ``kernels_pallas.quantized_matmul``,
      dequantization fused in the kernel; a ``QArray`` weight is packed on every
      call, with a warning: pack the tree once with ``pack_params``).

  Returns:
    ``(..., d_out)`` in ``x``'s dtype, or ``(*lead, ..., d_out)`` for a stacked
    weight (``lead`` first: ``y[0]`` uses matrix 0).
  """
  if backend not in BACKENDS:
    raise ValueError(f'backend={backend!r}; expected one of {BACKENDS}.')
  shape = _matrix_shape(ql.weight)
  if x.shape[-1] != shape[-2]:
    raise ValueError(
      f'input width {x.shape[-1]} (x shape {x.shape}) does not match the quantized '
      f'weight of shape {shape} (expected (..., d_in, d_out)).'
    )
  lead = shape[:-2]
  if not lead:
    return _matmul_one(x, ql.weight, ql.transform_inv, backend)
  if len(lead) != 1:
    raise ValueError(f'QuantizedLinear supports at most one stack dim; got shape {shape}.')
  return jnp.stack(
    [_matmul_one(x, _index(ql.weight, i), _transform_for(ql, i), backend) for i in range(lead[0])]
  )
