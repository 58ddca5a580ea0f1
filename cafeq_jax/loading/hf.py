"""Hugging Face checkpoints (safetensors + config.json) for Gemma 2 and Llama models.

``load_hf(dir)`` reads a ``Gemma2ForCausalLM`` / ``LlamaForCausalLM`` checkpoint into
our param tree (``cafeq_jax.models.decoder``); ``save_hf(params, cfg, dir)`` writes one
that ``transformers.AutoModelForCausalLM.from_pretrained`` loads, with quantized
leaves exported as their effective weights (dequantized, online transform folded in).

Name mapping (torch ``Linear.weight`` is ``(d_out, d_in)``)::

  model.embed_tokens.weight (V, D)           embedder/input_embedding
  layers.i.self_attn.q_proj (H*hd, D)        attn/q_einsum/w (H, D, hd)
  layers.i.self_attn.{k,v}_proj (K*hd, D)    attn/kv_einsum/w[0|1] (K, D, hd)
  layers.i.self_attn.o_proj (D, H*hd)        attn/attn_vec_einsum/w (H, hd, D)
  layers.i.mlp.{gate,up}_proj (F, D)         mlp/gating_einsum[0|1] (F, D)
  layers.i.mlp.down_proj (D, F)              mlp/linear (F, D)
  layers.i.input_layernorm                   pre_attention_norm
  Gemma 2: post_attention_layernorm -> post_attention_norm,
           pre_feedforward_layernorm -> pre_ffw_norm,
           post_feedforward_layernorm -> post_ffw_norm
  Llama:   post_attention_layernorm -> pre_ffw_norm
  model.norm                                 final_norm
  lm_head.weight (V, D)                      unembed/w (D, V) (untied only)

RoPE needs no permutation: HF Gemma 2 / Llama use the same half-split convention.

``save_hf`` is atomic: the export is built in a hidden sibling directory and
swapped in only when complete (``cafeq_jax.atomic.replace_dir``), so a
previous export stays readable until then (Ctrl-C and SIGKILL included). It
records what it wrote in ``.cafeq_export.json`` (file sha256s, provenance), never
replaces a regular file, and refuses a non-empty directory it did not write;
files a user added to one of its exports (a ``tokenizer.json``) are kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any
from typing import Mapping

import jax
import numpy as np

from cafeq_jax import atomic
from cafeq_jax.models import config as config_lib
from cafeq_jax.models import linears as linears_lib
from cafeq_jax.models.config import ModelConfig

CONFIG_FILE = 'config.json'
WEIGHTS_FILE = 'model.safetensors'
EXPORT_MARKER = '.cafeq_export.json'
_ARCHS = {'gemma2': 'Gemma2ForCausalLM', 'llama': 'LlamaForCausalLM'}
_LAYER_TYPES = {'sliding_attention': 'local', 'full_attention': 'global'}
_GELU_TANH = ('gelu_pytorch_tanh', 'gelu_tanh', 'gelu_new')


def _family(d: dict) -> str:
  model_type = d.get('model_type')
  archs = d.get('architectures') or []
  if model_type == 'gemma2' or 'Gemma2ForCausalLM' in archs:
    return 'gemma2'
  if model_type == 'llama' or 'LlamaForCausalLM' in archs:
    return 'llama'
  raise ValueError(
    f'unsupported Hugging Face model: model_type={model_type!r}, architectures={archs!r}; '
    f'expected model_type "gemma2" or "llama" ({sorted(_ARCHS.values())}).'
  )


def _rope_theta(d: dict) -> float:
  rp = d.get('rope_parameters') or {}
  scaling = d.get('rope_scaling')
  rope_type = rp.get('rope_type', rp.get('type', 'default'))
  if scaling or rope_type not in ('default', None):
    raise ValueError(
      f'RoPE scaling {scaling or rp!r} is not supported; only default RoPE (rope_type "default").'
    )
  theta = rp.get('rope_theta', d.get('rope_theta', 10_000.0))
  return float(theta)


def _smallest_period(types: tuple[str, ...]) -> tuple[str, ...]:
  for p in range(1, len(types) + 1):
    if all(types[i] == types[i % p] for i in range(len(types))):
      return types[:p]
  return types


def config_from_hf(d: dict) -> ModelConfig:
  """``ModelConfig`` from a Hugging Face ``config.json`` dict (Gemma 2 or Llama)."""
  if not isinstance(d, Mapping):
    raise ValueError(
      f'a Hugging Face config must be a JSON object (dict); got a {type(d).__name__}.'
    )
  family = _family(d)
  try:
    D, H = int(d['hidden_size']), int(d['num_attention_heads'])
    common = dict(
      vocab_size=int(d['vocab_size']),
      num_layers=int(d['num_hidden_layers']),
      embed_dim=D,
      hidden_dim=int(d['intermediate_size']),
      num_heads=H,
      num_kv_heads=int(d.get('num_key_value_heads') or H),
      head_dim=int(d.get('head_dim') or D // H),
      rope_base=_rope_theta(d),
      max_seq_len=int(d.get('max_position_embeddings', 8192)),
      family=family,
    )
  except KeyError as e:
    raise ValueError(f'Hugging Face config is missing field {e.args[0]!r}.') from None
  except (TypeError, ValueError) as e:
    raise ValueError(
      f'Hugging Face config has a field of the wrong type (expected numbers for the sizes): {e}'
    ) from None
  if family == 'gemma2':
    act = d.get('hidden_activation') or d.get('hidden_act') or 'gelu_pytorch_tanh'
    if act not in _GELU_TANH:
      raise ValueError(
        f'Gemma 2 activation {act!r} is not supported; expected one of {_GELU_TANH}.'
      )
    layer_types = d.get('layer_types')
    if layer_types:
      bad = [t for t in layer_types if t not in _LAYER_TYPES]
      if bad:
        raise ValueError(f'unknown layer_types {bad}; expected {sorted(_LAYER_TYPES)}.')
      pattern = _smallest_period(tuple(_LAYER_TYPES[t] for t in layer_types))
    else:
      pattern = ('local', 'global')
    return ModelConfig(
      **common,
      norm_eps=float(d.get('rms_norm_eps', 1e-6)),
      activation='gelu_tanh',
      norm_scale_plus_one=True,
      use_post_norms=True,
      query_pre_attn_scalar=d.get('query_pre_attn_scalar'),
      attn_logits_softcap=d.get('attn_logit_softcapping'),
      final_logit_softcap=d.get('final_logit_softcapping'),
      sliding_window_size=d.get('sliding_window') if 'local' in pattern else None,
      attention_pattern=pattern,
      tie_embeddings=bool(d.get('tie_word_embeddings', True)),
      scale_embeddings=True,
    )
  act = d.get('hidden_act', 'silu')
  if act != 'silu':
    raise ValueError(f'Llama activation {act!r} is not supported; expected "silu".')
  for flag in ('attention_bias', 'mlp_bias'):
    if d.get(flag):
      raise ValueError(f'Llama config has {flag}=True; biases are not supported.')
  return config_lib.llama_config(
    **common,
    norm_eps=float(d.get('rms_norm_eps', 1e-6)),
    tie_embeddings=bool(d.get('tie_word_embeddings', False)),
  )


def config_to_hf(cfg: ModelConfig, **extra: Any) -> dict:
  """Hugging Face ``config.json`` dict for ``cfg`` (``extra`` fields override)."""
  common = dict(
    architectures=[_ARCHS[cfg.family]],
    model_type=cfg.family,
    vocab_size=cfg.vocab_size,
    hidden_size=cfg.embed_dim,
    intermediate_size=cfg.hidden_dim,
    num_hidden_layers=cfg.num_layers,
    num_attention_heads=cfg.num_heads,
    num_key_value_heads=cfg.num_kv_heads,
    head_dim=cfg.head_dim,
    rms_norm_eps=cfg.norm_eps,
    rope_theta=cfg.rope_base,
    rope_parameters={'rope_theta': cfg.rope_base, 'rope_type': 'default'},
    max_position_embeddings=cfg.max_seq_len,
    tie_word_embeddings=cfg.tie_embeddings,
    torch_dtype='float32',
    dtype='float32',
    attention_bias=False,
  )
  if cfg.family == 'gemma2':
    inv = {v: k for k, v in _LAYER_TYPES.items()}
    common.update(
      hidden_activation='gelu_pytorch_tanh',
      hidden_act='gelu_pytorch_tanh',
      query_pre_attn_scalar=(
        cfg.head_dim if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar
      ),
      attn_logit_softcapping=cfg.attn_logits_softcap,
      final_logit_softcapping=cfg.final_logit_softcap,
      sliding_window=cfg.sliding_window_size or cfg.max_seq_len,
      layer_types=[inv[t] for t in cfg.attention_types],
    )
  else:
    common.update(hidden_act='silu', mlp_bias=False)
  common.update(extra)
  return common


def check_exportable(cfg: ModelConfig) -> None:
  """Raises a ValueError unless ``cfg`` can be written as a Hugging Face checkpoint."""
  if cfg.family not in _ARCHS:
    raise ValueError(
      f'model family {cfg.family!r} has no Hugging Face export; expected one of {sorted(_ARCHS)}.'
    )
  check_llama_like(cfg)


def check_llama_like(cfg: ModelConfig) -> None:
  if cfg.family == 'llama' and (
    cfg.use_post_norms
    or cfg.norm_scale_plus_one
    or cfg.scale_embeddings
    or cfg.attn_logits_softcap
    or cfg.final_logit_softcap
    or 'local' in cfg.attention_types
  ):
    raise ValueError(f'config {cfg} is not expressible as a Hugging Face Llama model.')


def _hf_names(cfg: ModelConfig, i: int) -> dict[str, str]:
  """Our per-layer norm name -> HF tensor name."""
  p = f'model.layers.{i}.'
  if cfg.family == 'gemma2':
    return {
      'pre_attention_norm': p + 'input_layernorm.weight',
      'post_attention_norm': p + 'post_attention_layernorm.weight',
      'pre_ffw_norm': p + 'pre_feedforward_layernorm.weight',
      'post_ffw_norm': p + 'post_feedforward_layernorm.weight',
    }
  return {
    'pre_attention_norm': p + 'input_layernorm.weight',
    'pre_ffw_norm': p + 'post_attention_layernorm.weight',
  }


def expected_hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Name -> shape of every tensor of the HF checkpoint for ``cfg``."""
  D, F, V = cfg.embed_dim, cfg.hidden_dim, cfg.vocab_size
  Hd, Kd = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  shapes = {'model.embed_tokens.weight': (V, D), 'model.norm.weight': (D,)}
  if not cfg.tie_embeddings:
    shapes['lm_head.weight'] = (V, D)
  for i in range(cfg.num_layers):
    p = f'model.layers.{i}.'
    shapes.update(
      {
        p + 'self_attn.q_proj.weight': (Hd, D),
        p + 'self_attn.k_proj.weight': (Kd, D),
        p + 'self_attn.v_proj.weight': (Kd, D),
        p + 'self_attn.o_proj.weight': (D, Hd),
        p + 'mlp.gate_proj.weight': (F, D),
        p + 'mlp.up_proj.weight': (F, D),
        p + 'mlp.down_proj.weight': (D, F),
      }
    )
    for name in _hf_names(cfg, i).values():
      shapes[name] = (D,)
  return shapes


def _is_ignorable(name: str) -> bool:
  return name.endswith('rotary_emb.inv_freq')


def params_from_hf(state_dict: dict[str, Any], cfg: ModelConfig) -> dict:
  """Our param tree (float32 numpy leaves) from an HF state dict.

  Args:
    state_dict: tensor name -> array (numpy, jax or anything ``np.asarray`` takes).
    cfg: the model config (e.g. from ``config_from_hf``).

  Raises:
    ValueError: a tensor is missing, unexpected, or has the wrong shape (the message
      names the tensor and both shapes).
  """
  check_llama_like(cfg)
  expected = expected_hf_shapes(cfg)
  sd = dict(state_dict)
  if cfg.tie_embeddings:
    sd.pop('lm_head.weight', None)  # some exports store the tied copy
  missing = sorted(set(expected) - set(sd))
  if missing:
    raise ValueError(
      f'checkpoint is missing {len(missing)} tensor(s) for {cfg.family} '
      f'with {cfg.num_layers} layers: {missing[:8]}'
    )
  unexpected = sorted(n for n in set(sd) - set(expected) if not _is_ignorable(n))
  if unexpected:
    raise ValueError(
      f'checkpoint has {len(unexpected)} unexpected tensor(s) for this config '
      f'(wrong num_layers or architecture?): {unexpected[:8]}'
    )

  def get(name):
    a = sd[name]
    a = (
      np.asarray(jax.numpy.asarray(a, jax.numpy.float32))
      if not isinstance(a, np.ndarray)
      else a.astype(np.float32)
    )
    if tuple(a.shape) != expected[name]:
      raise ValueError(
        f'tensor {name!r} has shape {tuple(a.shape)} but the config expects {expected[name]}.'
      )
    return a

  H, K, hd, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.embed_dim
  params: dict[str, Any] = {'embedder': {'input_embedding': get('model.embed_tokens.weight')}}
  for i in range(cfg.num_layers):
    p = f'model.layers.{i}.'
    q = get(p + 'self_attn.q_proj.weight').reshape(H, hd, D).transpose(0, 2, 1)
    k = get(p + 'self_attn.k_proj.weight').reshape(K, hd, D).transpose(0, 2, 1)
    v = get(p + 'self_attn.v_proj.weight').reshape(K, hd, D).transpose(0, 2, 1)
    o = get(p + 'self_attn.o_proj.weight').T.reshape(H, hd, D)
    layer: dict[str, Any] = {
      'attn': {
        'q_einsum': {'w': np.ascontiguousarray(q)},
        'kv_einsum': {'w': np.ascontiguousarray(np.stack([k, v]))},
        'attn_vec_einsum': {'w': np.ascontiguousarray(o)},
      },
      'mlp': {
        'gating_einsum': np.stack([get(p + 'mlp.gate_proj.weight'), get(p + 'mlp.up_proj.weight')]),
        'linear': np.ascontiguousarray(get(p + 'mlp.down_proj.weight').T),
      },
    }
    for ours, theirs in _hf_names(cfg, i).items():
      layer[ours] = {'scale': get(theirs)}
    params[f'layer_{i}'] = layer
  params['final_norm'] = {'scale': get('model.norm.weight')}
  if not cfg.tie_embeddings:
    params['unembed'] = {'w': np.ascontiguousarray(get('lm_head.weight').T)}
  return params


def params_to_hf(params: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
  """HF state dict (float32 numpy, contiguous) from our params; inverse of
  ``params_from_hf``. ``QuantizedLinear`` leaves are exported as effective weights."""
  check_llama_like(cfg)
  fp = linears_lib.dequantize_params(params, cfg)
  f32 = lambda a: np.asarray(a, np.float32)
  H, K, hd, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.embed_dim
  sd = {
    'model.embed_tokens.weight': f32(fp['embedder']['input_embedding']),
    'model.norm.weight': f32(fp['final_norm']['scale']),
  }
  for i in range(cfg.num_layers):
    p = f'model.layers.{i}.'
    layer = fp[f'layer_{i}']
    q = f32(layer['attn']['q_einsum']['w'])
    kv = f32(layer['attn']['kv_einsum']['w'])
    o = f32(layer['attn']['attn_vec_einsum']['w'])
    gating = f32(layer['mlp']['gating_einsum'])
    sd.update(
      {
        p + 'self_attn.q_proj.weight': q.transpose(0, 2, 1).reshape(H * hd, D),
        p + 'self_attn.k_proj.weight': kv[0].transpose(0, 2, 1).reshape(K * hd, D),
        p + 'self_attn.v_proj.weight': kv[1].transpose(0, 2, 1).reshape(K * hd, D),
        p + 'self_attn.o_proj.weight': o.reshape(H * hd, D).T,
        p + 'mlp.gate_proj.weight': gating[0],
        p + 'mlp.up_proj.weight': gating[1],
        p + 'mlp.down_proj.weight': f32(layer['mlp']['linear']).T,
      }
    )
    for ours, theirs in _hf_names(cfg, i).items():
      sd[theirs] = f32(layer[ours]['scale'])
  if not cfg.tie_embeddings:
    sd['lm_head.weight'] = f32(fp['unembed']['w']).T
  return {k: np.ascontiguousarray(v) for k, v in sd.items()}


def file_sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      h.update(chunk)
  return h.hexdigest()


def read_export_marker(out_dir: str | os.PathLike) -> dict | None:
  """``save_hf``'s record in ``out_dir`` (files, sha256s, provenance), or None."""
  path = os.path.join(os.fspath(out_dir), EXPORT_MARKER)
  try:
    with open(path) as f:
      marker = json.load(f)
  except (OSError, ValueError):
    return None
  if not isinstance(marker, dict) or marker.get('format') != 'cafeq_jax.hf_export':
    return None
  return marker


def verify_export(out_dir: str | os.PathLike) -> dict:
  """Checks every file ``save_hf`` wrote in ``out_dir`` against its recorded sha256.

  Returns:
    The export's record (``read_export_marker``).

  Raises:
    ValueError: no record, or a file is missing or differs (names the file).
  """
  out_dir = os.fspath(out_dir)
  marker = read_export_marker(out_dir)
  if marker is None:
    raise ValueError(f'{out_dir!r} has no readable {EXPORT_MARKER}: not written by save_hf.')
  for name, digest in marker['files'].items():
    path = os.path.join(out_dir, name)
    if not os.path.isfile(path):
      raise ValueError(f'export {out_dir!r} lacks {name!r}, which save_hf wrote.')
    if file_sha256(path) != digest:
      raise ValueError(f'{path!r} does not match the sha256 save_hf recorded: corrupt.')
  return marker


_OWN_FILES = (WEIGHTS_FILE, CONFIG_FILE, EXPORT_MARKER)


def carried_files(out_dir: str, *, writer: str = 'save_hf', legacy: bool = True) -> list[str]:
  """Entries of an existing ``out_dir`` to keep in the new export (others' files).

  Shared by the exporters that write this directory layout (``save_hf``,
  ``compressed_tensors.save_compressed_tensors``: ``writer`` names the caller).
  ``legacy``: a directory holding exactly our two files (an export of an earlier
  version, without the record) may be replaced too.

  Raises:
    FileExistsError: ``out_dir`` is a file, or a non-empty directory that
      ``writer`` did not write.
  """
  if os.path.islink(out_dir) or not os.path.isdir(out_dir):
    raise FileExistsError(
      f'{out_dir!r} exists and is not a directory; {writer} never '
      'replaces a file. Choose another output directory.'
    )
  names = sorted(os.listdir(out_dir))
  ours = read_export_marker(out_dir) is not None
  old = legacy and bool(names) and set(names) <= {WEIGHTS_FILE, CONFIG_FILE}
  if names and not ours and not old:
    raise FileExistsError(
      f'{out_dir!r} is not empty ({names[:8]}{" ..." if len(names) > 8 else ""}) and was '
      f'not written by {writer} (no {EXPORT_MARKER}); refusing to replace it. Export '
      'to a new or empty directory.'
    )
  return [n for n in names if n not in _OWN_FILES and not atomic.is_temporary(n)]


def check_export_dir(out_dir: str | os.PathLike) -> None:
  """Raises FileExistsError unless ``save_hf`` may write ``out_dir`` (checks only)."""
  path = os.path.abspath(os.fspath(out_dir))
  if os.path.lexists(path):
    carried_files(path)


def carry(src: str, dst: str) -> None:
  """Hard-links (else copies) ``src`` (a file or a directory tree) to ``dst``."""
  if os.path.isdir(src) and not os.path.islink(src):
    shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
  else:
    _link_or_copy(src, dst)


def _link_or_copy(src: str, dst: str) -> None:
  if os.path.islink(src):
    os.symlink(os.readlink(src), dst)
    return
  try:
    os.link(src, dst)
  except OSError:
    shutil.copy2(src, dst)


def save_hf(
  params: dict,
  cfg: ModelConfig,
  out_dir: str | os.PathLike,
  *,
  provenance: Mapping[str, Any] | None = None,
  **config_extra: Any,
) -> str:
  """Writes ``model.safetensors`` + ``config.json`` to ``out_dir`` atomically.

  The files are written to a hidden temporary sibling directory that replaces
  ``out_dir`` in one atomic swap once complete (``atomic.replace_dir``); until
  then a previous export stays in place, readable.

  Args:
    params: the param tree (fp or with ``QuantizedLinear`` leaves, exported as
      effective weights).
    cfg: its ``ModelConfig``.
    out_dir: the export directory. It may be absent, empty, or an earlier
      ``save_hf`` export (whose other files, e.g. a ``tokenizer.json`` added
      later, are kept); anything else is refused.
    provenance: JSON-able record stored in ``.cafeq_export.json`` (e.g. which
      recipe and inputs produced the weights).
    **config_extra: fields overriding those of ``config.json``.

  Returns:
    ``out_dir``.

  Raises:
    FileExistsError: ``out_dir`` is a regular file or a non-empty directory not
      written by ``save_hf`` (nothing is changed).
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  out_dir = os.fspath(out_dir)
  path = os.path.abspath(out_dir)
  atomic.recover(path)
  carried = carried_files(path) if os.path.lexists(path) else []
  sd = params_to_hf(params, cfg)
  hf_config = json.dumps(config_to_hf(cfg, **config_extra), indent=2)
  record = json.dumps(provenance or {}, default=str)  # fail before writing anything
  tmp = atomic.make_temp_dir(path)
  try:
    save_file(sd, os.path.join(tmp, WEIGHTS_FILE), metadata={'format': 'pt'})
    atomic.apply_umask(os.path.join(tmp, WEIGHTS_FILE))  # safetensors creates it 0600
    with open(os.path.join(tmp, CONFIG_FILE), 'w') as f:
      f.write(hf_config)
    marker = {
      'format': 'cafeq_jax.hf_export',
      'files': {n: file_sha256(os.path.join(tmp, n)) for n in (WEIGHTS_FILE, CONFIG_FILE)},
      'provenance': json.loads(record),
    }
    with open(os.path.join(tmp, EXPORT_MARKER), 'w') as f:
      json.dump(marker, f, indent=2)
    for name in carried:
      carry(os.path.join(path, name), os.path.join(tmp, name))
    atomic.fsync_tree(tmp)
    atomic.replace_dir(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  atomic.clean_stale(path)
  return out_dir


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """All tensors of a safetensors file as float32-safe numpy arrays (bf16 via jax)."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top

  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'safetensors file {path!r} does not exist.')
  out = {}
  try:
    with safe_open(path, framework='flax') as f:
      for name in f.keys():
        out[name] = np.asarray(f.get_tensor(name).astype(jax.numpy.float32))
  except Exception as e:  # pylint: disable=broad-except  # safetensors raises assorted types
    raise ValueError(
      f'{path!r} could not be read as safetensors (truncated or corrupt?): {type(e).__name__}: {e}'
    ) from e
  return out


def load_hf(model_dir: str | os.PathLike) -> tuple[dict, ModelConfig]:
  """Reads an HF checkpoint directory: ``(params, cfg)``.

  Needs ``config.json`` and ``model.safetensors`` or sharded ``model-*.safetensors``
  with ``model.safetensors.index.json``.
  """
  model_dir = os.fspath(model_dir)
  if not os.path.isdir(model_dir):
    raise FileNotFoundError(f'Hugging Face checkpoint directory {model_dir!r} does not exist.')
  config_path = os.path.join(model_dir, CONFIG_FILE)
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f'{config_path!r} not found: an HF checkpoint needs config.json.')
  with open(config_path) as f:
    try:
      d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f'{config_path!r} is not valid JSON: {e}') from None
  try:
    cfg = config_from_hf(d)
  except ValueError as e:
    raise ValueError(f'{config_path}: {e}') from None
  single = os.path.join(model_dir, WEIGHTS_FILE)
  index = os.path.join(model_dir, WEIGHTS_FILE + '.index.json')
  if os.path.isfile(single):
    files = [single]
  elif os.path.isfile(index):
    try:
      with open(index) as f:
        files = sorted({os.path.join(model_dir, v) for v in json.load(f)['weight_map'].values()})
    except (ValueError, KeyError, TypeError, AttributeError) as e:
      raise ValueError(
        f'{index!r} is not a safetensors index (a JSON object with a '
        f'"weight_map" of tensor name -> file): {type(e).__name__}: '
        f'{e}'
      ) from None
  else:
    raise FileNotFoundError(
      f'no {WEIGHTS_FILE} (or {WEIGHTS_FILE}.index.json) in {model_dir!r}; found '
      f'{sorted(os.listdir(model_dir))}.'
    )
  sd: dict[str, np.ndarray] = {}
  for path in files:
    sd.update(read_safetensors(path))
  try:
    return params_from_hf(sd, cfg), cfg
  except ValueError as e:
    raise ValueError(f'{model_dir}: {e}') from None
