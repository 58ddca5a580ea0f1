"""llama.cpp's named quantization mixes ('Q3_K_S', 'Q4_K_M', ...) as per-matrix specs.

A mix (llama.cpp's ``llama_ftype``) gives each linear of each layer a block type.
``tensor_types`` follows ``llama_tensor_get_type_impl`` and
``tensor_type_fallback`` of llama.cpp's src/llama-quant.cpp (the version vendored by
llama-cpp-python 0.3.36) for a dense Llama-family model without an importance
matrix; only the rules that apply to such a model are kept:

* base type: Q3_K for Q3_K_S/M/L, Q4_K for Q4_K_S/M, Q5_K for Q5_K_S/M, else the
  mix's own type (Q2_K, Q6_K, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0);
* ``attn_v``: Q2_K -> Q4_K if ``n_head / n_head_kv >= 4`` else Q3_K; Q3_K_M ->
  Q5_K for the first two layers, else Q4_K; Q3_K_L -> Q5_K; Q4_K_M / Q5_K_M ->
  Q6_K on the ``use_more_bits`` layers; Q4_K_S -> Q5_K for the first 4 layers;
* ``ffn_down``: Q2_K -> Q3_K; Q3_K_M -> Q5_K for layers ``< n/16``, else Q4_K;
  Q3_K_L -> Q5_K; Q4_K_M / Q5_K_M -> Q6_K on the ``use_more_bits`` layers; Q4_K_S
  -> Q5_K for layers ``< n/8``;
* ``attn_output``: Q2_K -> Q3_K; Q3_K_M -> Q4_K; Q3_K_L -> Q5_K;
* then a row length (``d_in``) that the type's block does not divide falls back
  (Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0), e.g. every
  linear reading SmolLM2's 576-wide residual stream.

``use_more_bits(i, n) = i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2``. The token
embedding and norms are not part of a mix here: ``save_gguf`` keeps them as the
source file stores them.
"""

from __future__ import annotations

from cafeq_jax.ggml.types import GGMLType
from cafeq_jax.ggml.types import type_for_rows

T = GGMLType
# GGUF tensor name of each matrix of the matrix view (cafeq_jax.models.linears).
GGUF_NAMES = {
  'q': 'attn_q',
  'k': 'attn_k',
  'v': 'attn_v',
  'o': 'attn_output',
  'gate': 'ffn_gate',
  'up': 'ffn_up',
  'down': 'ffn_down',
}
_BASE = {
  'Q2_K': T.Q2_K,
  'Q3_K_S': T.Q3_K,
  'Q3_K_M': T.Q3_K,
  'Q3_K_L': T.Q3_K,
  'Q4_K_S': T.Q4_K,
  'Q4_K_M': T.Q4_K,
  'Q5_K_S': T.Q5_K,
  'Q5_K_M': T.Q5_K,
  'Q6_K': T.Q6_K,
  'Q4_0': T.Q4_0,
  'Q4_1': T.Q4_1,
  'Q5_0': T.Q5_0,
  'Q5_1': T.Q5_1,
  'Q8_0': T.Q8_0,
}
MIXES = tuple(_BASE)


def _use_more_bits(i: int, n: int) -> bool:
  return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _type(mix: str, name: str, i: int, n: int, n_gqa: int) -> GGMLType:
  """llama.cpp's choice before the shape fallback."""
  t = _BASE[mix]
  if name == 'v':
    if mix == 'Q2_K':
      return T.Q4_K if n_gqa >= 4 else T.Q3_K
    if mix == 'Q3_K_M':
      return T.Q5_K if i < 2 else T.Q4_K
    if mix == 'Q3_K_L':
      return T.Q5_K
    if mix in ('Q4_K_M', 'Q5_K_M') and _use_more_bits(i, n):
      return T.Q6_K
    if mix == 'Q4_K_S' and i < 4:
      return T.Q5_K
  elif name == 'down':
    if mix == 'Q2_K':
      return T.Q3_K
    if mix == 'Q3_K_M':
      return T.Q5_K if i < n // 16 else T.Q4_K
    if mix == 'Q3_K_L':
      return T.Q5_K
    if mix in ('Q4_K_M', 'Q5_K_M') and _use_more_bits(i, n):
      return T.Q6_K
    if mix == 'Q4_K_S' and i < n // 8:
      return T.Q5_K
  elif name == 'o':
    if mix == 'Q2_K':
      return T.Q3_K
    if mix == 'Q3_K_M':
      return T.Q4_K
    if mix == 'Q3_K_L':
      return T.Q5_K
  return t


def check_mix(mix: str) -> str:
  if mix not in _BASE:
    raise ValueError(f'GGUF mix {mix!r} is unknown; expected one of {list(MIXES)}.')
  return mix


def tensor_types(mix: str, cfg) -> dict[tuple[int, str], GGMLType]:
  """The block type of every ``(layer, matrix)`` of a Llama ``ModelConfig`` under ``mix``.

  Raises:
    ValueError: unknown mix, or a matrix whose rows fit no quantized type.
  """
  from cafeq_jax.models import linears  # pylint: disable=g-import-not-at-top

  check_mix(mix)
  shapes = linears.linear_shapes(cfg)  # name -> (d_in, d_out)
  n, n_gqa = cfg.num_layers, cfg.num_heads // cfg.num_kv_heads
  out = {}
  for name in linears.LINEAR_NAMES:
    d_in = shapes[name][0]
    for i in range(n):
      t = _type(mix, name, i, n, n_gqa)
      try:
        out[(i, name)] = type_for_rows(t, d_in)
      except ValueError as e:
        raise ValueError(f'mix {mix}, layer {i} {GGUF_NAMES[name]}: {e}') from None
  return out


def spec_map(mix: str, cfg, *, clip_search: bool = False):
  """``tensor_types`` as a ``specs.SpecMap`` named 'gguf-<mix>' (recipe ``spec``)."""
  from cafeq_jax import ggml  # pylint: disable=g-import-not-at-top
  from cafeq_jax import specs  # pylint: disable=g-import-not-at-top

  types = tensor_types(mix, cfg)
  return specs.SpecMap.from_dict(
    f'gguf-{mix}', {k: ggml.spec(t, clip_search=clip_search) for k, t in types.items()}
  )
