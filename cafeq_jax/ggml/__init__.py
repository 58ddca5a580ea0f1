"""llama.cpp's weight formats: block types as quantizer grids, their bytes, named mixes."""

from cafeq_jax.ggml.types import INFO
from cafeq_jax.ggml.types import GGMLType
from cafeq_jax.ggml.types import type_for_rows


def spec(ggml_type, *, clip_search: bool = False):
  """The ``QuantSpec`` that rounds onto ``ggml_type``'s grid ('Q4_K', 'Q4_0', ...)."""
  from cafeq_jax import enums  # pylint: disable=g-import-not-at-top
  from cafeq_jax import quantizer  # pylint: disable=g-import-not-at-top

  t_enum = enums.coerce(GGMLType, ggml_type, 'ggml_type')
  t = INFO[t_enum]
  return quantizer.QuantSpec(
    bits=t.bits,
    group_size=t.group_size,
    symmetric=t.symmetric,
    clip_search=clip_search,
    ggml_type=t_enum,
  )


__all__ = ['GGMLType', 'INFO', 'spec', 'type_for_rows']
