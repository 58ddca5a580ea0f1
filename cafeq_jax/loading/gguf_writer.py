"""Write a quantized Llama-family model as a GGUF file that llama.cpp runs.

The inverse of ``loading.gguf`` for a quantized tree (docs/export.md#gguf): every
quantized linear is written in its own llama.cpp block type straight from its
codes and scales (``ggml.blocks``: nothing is re-rounded, so the file dequantizes
to exactly the weights our forward uses), Q and K rows are permuted back to
llama.cpp's interleaved-RoPE order, and the metadata, tokenizer and non-linear
tensors come from a source GGUF (e.g. the SmolLM2 file the model was loaded
from): a source tensor whose dequantized values equal ours is copied byte for
byte in its own type (SmolLM2's Q8_0 embedding), anything else is written as F32.
Without a source the ``llama.*`` metadata is written from the ``ModelConfig``, and
the tokenizer from a Hugging Face dir's ``tokenizer.json`` when one is given
(``loading.gguf_tokenizer``); without either the file has no tokenizer
(transformers reads its weights; llama.cpp needs a tokenizer to load a model).

Refused before anything is written: a model family llama.cpp's ``llama``
architecture cannot express, a quantized linear whose spec is not a GGML type
(``cafeq_jax.ggml.spec`` / ``ggml.mixes.spec_map`` round into one), an online
transform ``x M⁻¹`` (llama.cpp has no such op), an unwritable path. The file is
written to a sibling temporary and moved into place (``atomic.write_with``): an
interrupted write leaves any earlier file intact.
"""

from __future__ import annotations

import json
import os
from typing import Any
from typing import Mapping

import numpy as np

from cafeq_jax import atomic
from cafeq_jax.ggml import blocks
from cafeq_jax.ggml import mixes
from cafeq_jax.loading import gguf as gguf_lib
from cafeq_jax.loading import gguf_tokenizer
from cafeq_jax.loading import hf
from cafeq_jax.models import linears
from cafeq_jax.models import qlinear
from cafeq_jax.models.config import ModelConfig

# Fields the writer sets itself (or that describe the reader's view of the file).
_OWN_FIELDS = ('GGUF.', 'general.architecture', 'general.file_type')
# llama.cpp's llama_ftype numbers of the mixes (include/llama.h), for general.file_type.
FILE_TYPES = {
  'Q4_0': 2,
  'Q4_1': 3,
  'Q8_0': 7,
  'Q5_0': 8,
  'Q5_1': 9,
  'Q2_K': 10,
  'Q3_K_S': 11,
  'Q3_K_M': 12,
  'Q3_K_L': 13,
  'Q4_K_S': 14,
  'Q4_K_M': 15,
  'Q5_K_S': 16,
  'Q5_K_M': 17,
  'Q6_K': 18,
}


def rope_permutation(n_heads: int, head_dim: int) -> np.ndarray:
  """Row order of llama.cpp's Q/K: GGUF row ``r`` is HF (half-split RoPE) row ``perm[r]``.

  The inverse of ``loading.gguf.unpermute_rope_rows``.
  """
  return np.arange(n_heads * head_dim).reshape(n_heads, 2, head_dim // 2).swapaxes(1, 2).reshape(-1)


def _check_config(cfg: ModelConfig) -> None:
  if cfg.family != 'llama':
    raise ValueError(
      f'save_gguf writes llama.cpp\'s "llama" architecture; model family {cfg.family!r} is not one.'
    )
  hf.check_llama_like(cfg)  # no Gemma-style norms, soft-caps or local attention


def check_recipe(recipe) -> None:
  """Raises before any work if ``recipe``'s output cannot be written as GGUF.

  Checked: no online transform stage, and every spec a GGML type.
  """
  from cafeq_jax import specs  # pylint: disable=g-import-not-at-top

  if recipe.transform is not None:
    raise ValueError(
      f'recipe {recipe.name!r} has the online transform stage '
      f'{type(recipe.transform).__name__} (x M^-1 applied to activations at '
      'inference): llama.cpp has no such op, so GGUF cannot hold it. Use a recipe '
      "without a transform stage ('rtn', 'gptq-selfgen', 'cafeq-pairs', "
      "'cafeq-pairs-ar'); pair transforms are folded into the weights and are fine."
    )
  bad = [s.name for s in specs.distinct(recipe.spec) if s.ggml_type is None]
  if bad:
    raise ValueError(
      f'recipe {recipe.name!r} quantizes with {bad}, not a llama.cpp block type; '
      'round into one with cafeq_jax.ggml.spec(...) or ggml.mixes.spec_map(mix, cfg).'
    )


def linear_blocks(qparams: dict, cfg: ModelConfig) -> dict[tuple[int, str], tuple[np.ndarray, Any]]:
  """``(layer, name) -> (bytes (d_out, row_bytes) uint8, GGMLType)`` of every linear.

  Raises:
    ValueError: a linear that is not quantized, has an online transform, or whose
      spec is not a GGML type (naming the layer and matrix).
  """
  qarrays, tinvs = linears.quantized_matrices(qparams, cfg)
  h, k, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  perms = {'q': rope_permutation(h, hd), 'k': rope_permutation(k, hd)}
  out = {}
  for l in range(cfg.num_layers):
    for n in linears.LINEAR_NAMES:
      where = f'layer {l} {n!r} (blk.{l}.{mixes.GGUF_NAMES[n]})'
      if (l, n) not in qarrays:
        raise ValueError(f'{where} is not quantized; save_gguf writes quantized models.')
      if tinvs[(l, n)] is not None:
        raise ValueError(
          f'{where} has an online transform x M^-1 (a Hadamard or learned transform '
          'stage): llama.cpp has no such op, so GGUF cannot hold it.'
        )
      q = qarrays[(l, n)]
      if q.spec.ggml_type is None:
        raise ValueError(
          f'{where} is quantized as {q.spec.name}, not a llama.cpp block type; '
          'quantize with cafeq_jax.ggml.spec(...) or ggml.mixes.spec_map(...).'
        )
      if n in perms:
        p = perms[n]
        q = q.replace(
          codes=np.asarray(q.codes)[:, p],
          scale=np.asarray(q.scale)[:, p],
          zero=None if q.zero is None else np.asarray(q.zero)[:, p],
        )
      try:
        out[(l, n)] = blocks.to_blocks(q)
      except ValueError as e:
        raise ValueError(f'{where}: {e}') from None
  return out


def _other_tensors(qparams: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
  """The non-linear tensors, float32 numpy in GGUF's (out, in) shapes."""
  f32 = lambda a: np.asarray(a, np.float32)
  out = {
    'token_embd.weight': f32(qparams['embedder']['input_embedding']),
    'output_norm.weight': f32(qparams['final_norm']['scale']),
  }
  for l in range(cfg.num_layers):
    layer = qparams[f'layer_{l}']
    out[f'blk.{l}.attn_norm.weight'] = f32(layer['pre_attention_norm']['scale'])
    out[f'blk.{l}.ffn_norm.weight'] = f32(layer['pre_ffw_norm']['scale'])
  if not cfg.tie_embeddings:
    w = qparams['unembed']['w']
    if isinstance(w, qlinear.QuantizedLinear):
      raise ValueError('save_gguf writes the output embedding unquantized; got a quantized one.')
    out['output.weight'] = f32(w).T
  return out


def _config_metadata(cfg: ModelConfig) -> dict[str, Any]:
  a = 'llama.'
  return {
    a + 'block_count': cfg.num_layers,
    a + 'context_length': cfg.max_seq_len,
    a + 'embedding_length': cfg.embed_dim,
    a + 'feed_forward_length': cfg.hidden_dim,
    a + 'attention.head_count': cfg.num_heads,
    a + 'attention.head_count_kv': cfg.num_kv_heads,
    a + 'attention.key_length': cfg.head_dim,
    a + 'attention.value_length': cfg.head_dim,
    a + 'rope.freq_base': float(cfg.rope_base),
    a + 'rope.dimension_count': cfg.head_dim,
    a + 'attention.layer_norm_rms_epsilon': float(cfg.norm_eps),
    a + 'vocab_size': cfg.vocab_size,
  }


def _check_source_config(reader, cfg: ModelConfig, source: str) -> None:
  meta = gguf_lib.read_metadata(reader)
  names = {t.name for t in reader.tensors}
  tokens = reader.fields.get('tokenizer.ggml.tokens')
  src = gguf_lib.gguf_model_config(
    meta, tensor_names=names, vocab_size=len(tokens.data) if tokens is not None else None
  )
  fields = (
    'vocab_size',
    'num_layers',
    'embed_dim',
    'hidden_dim',
    'num_heads',
    'num_kv_heads',
    'head_dim',
    'tie_embeddings',
  )
  diff = {
    f: (getattr(src, f), getattr(cfg, f)) for f in fields if getattr(src, f) != getattr(cfg, f)
  }
  if diff:
    raise ValueError(f'source GGUF {source!r} describes another model: (file, ours) = {diff}.')


def read_provenance(path: str | os.PathLike) -> dict | None:
  """The ``provenance`` record a ``save_gguf`` file holds (None: absent or unreadable)."""
  try:
    field = gguf_lib.open_gguf(path).fields.get('cafeq.provenance')
    return json.loads(field.contents()) if field is not None else None
  except (OSError, ValueError):
    return None


def save_gguf(
  qparams: dict,
  cfg: ModelConfig,
  path: str | os.PathLike,
  *,
  source: str | os.PathLike | None = None,
  tokenizer: str | os.PathLike | None = None,
  mix: str | None = None,
  name: str | None = None,
  provenance: Mapping[str, Any] | None = None,
) -> str:
  """Writes ``qparams`` (every linear quantized into a GGML type) to the GGUF ``path``.

  Args:
    qparams: a quantized tree (``cafeq_jax.quantize`` with a GGML spec or a mix's
      ``spec_map``), linears as ``QuantizedLinear`` leaves without transform.
    cfg: its ``ModelConfig`` (Llama family).
    path: the ``.gguf`` file to write (replaced atomically if it exists).
    source: GGUF file to take metadata, tokenizer and non-linear tensor types
      from (must describe the same model); None: metadata from ``cfg``.
    tokenizer: without ``source``, a Hugging Face dir whose byte-level BPE
      ``tokenizer.json`` (and special tokens) is written as the file's tokenizer
      (``loading.gguf_tokenizer``); None: no tokenizer.
    mix: the llama.cpp mix name the types follow (sets ``general.file_type``).
    name: ``general.name`` (default: the source's, else 'cafeq-jax').
    provenance: JSON-able record stored as the string field ``cafeq.provenance``.

  Returns:
    ``path``.
  """
  import gguf  # pylint: disable=g-import-not-at-top
  from gguf import quants  # pylint: disable=g-import-not-at-top

  _check_config(cfg)
  path = os.fspath(path)
  if os.path.isdir(path):
    raise IsADirectoryError(f'GGUF path {path!r} is a directory; give a file name.')
  parent = os.path.dirname(os.path.abspath(path))
  if os.path.exists(parent) and not os.access(parent, os.W_OK):
    raise PermissionError(f'cannot write {path!r}: directory {parent!r} is not writable.')
  if mix is not None:
    mixes.check_mix(mix)
  record = json.dumps(provenance or {}, default=str)
  linear = linear_blocks(qparams, cfg)  # every refusal happens here, before writing
  others = _other_tensors(qparams, cfg)
  reader = tok = None
  if source is not None and tokenizer is not None:
    raise ValueError('give source (its tokenizer is copied) or tokenizer, not both.')
  if source is not None:
    source = os.fspath(source)
    reader = gguf_lib.open_gguf(source)
    _check_source_config(reader, cfg, source)
  if tokenizer is not None:
    tok = gguf_tokenizer.tokenizer_fields(tokenizer, vocab_size=cfg.vocab_size)

  src_tensors = {t.name: t for t in reader.tensors} if reader is not None else {}

  def write(tmp: str) -> None:
    w = gguf.GGUFWriter(tmp, 'llama')
    if reader is not None:
      for key, field in reader.fields.items():
        if any(key.startswith(p) for p in _OWN_FIELDS):
          continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, field.contents(), vtype, sub_type=sub)
    else:
      w.add_name(name or 'cafeq-jax')
      for key, value in _config_metadata(cfg).items():
        if isinstance(value, float):
          w.add_float32(key, value)
        else:
          w.add_uint32(key, int(value))
      if tok is not None:
        gguf_tokenizer.add_to_writer(w, tok)
    if name is not None and reader is not None:
      w.add_key_value('general.name', name, gguf.GGUFValueType.STRING)
    if mix is not None:
      w.add_file_type(FILE_TYPES[mix])
    w.add_string('cafeq.provenance', record)
    order = ['token_embd.weight']
    for l in range(cfg.num_layers):
      b = f'blk.{l}.'
      order += [b + 'attn_norm.weight']
      order += [b + mixes.GGUF_NAMES[n] + '.weight' for n in ('q', 'k', 'v', 'o')]
      order += [b + 'ffn_norm.weight']
      order += [b + mixes.GGUF_NAMES[n] + '.weight' for n in ('gate', 'up', 'down')]
    order += ['output_norm.weight'] + (['output.weight'] if 'output.weight' in others else [])
    by_name = {f'blk.{l}.{mixes.GGUF_NAMES[n]}.weight': v for (l, n), v in linear.items()}
    for tname in order:
      if tname in by_name:
        data, t = by_name[tname]
        w.add_tensor(tname, data, raw_dtype=gguf.GGMLQuantizationType[t.value])
        continue
      ours = others[tname]
      st = src_tensors.get(tname)
      if st is not None and st.tensor_type not in (
        gguf.GGMLQuantizationType.F32,
        gguf.GGMLQuantizationType.F16,
      ):
        values = quants.dequantize(st.data, st.tensor_type).reshape(ours.shape)
        if np.array_equal(values, ours):  # e.g. SmolLM2's Q8_0 embedding: same bytes
          w.add_tensor(tname, np.asarray(st.data), raw_dtype=st.tensor_type)
          continue
      w.add_tensor(tname, np.ascontiguousarray(ours, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

  atomic.write_with(path, write)
  return path
