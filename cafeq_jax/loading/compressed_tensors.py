"""Quantized models in the compressed-tensors "pack-quantized" format (vLLM / transformers).

``save_compressed_tensors(params, cfg, out_dir)`` writes ``model.safetensors`` +
``config.json`` (with a ``quantization_config`` of ``quant_method:
"compressed-tensors"``, ``format: "pack-quantized"``) that vLLM serves with its
WNA16 kernels and that ``transformers.AutoModelForCausalLM.from_pretrained`` loads
(with the ``compressed-tensors`` package). docs/export.md#compressed-tensors has the
format; in short, per quantized projection ``P`` (torch layout, ``(d_out, d_in)``):

  P.weight_packed      int32 (d_out, d_in * bits / 32): codes offset by
                       2^(bits-1) into [0, 2^bits), 32 / bits per word, element
                       j of a row at bits [bits * (j % (32/bits)), ...) of word
                       j // (32/bits) (little end first).
  P.weight_scale       float32 (d_out, d_in / g); (d_out, 1) per channel.
  P.weight_zero_point  int32 (ceil(d_out * bits / 32), d_in / g), asymmetric only:
                       zero points offset and packed like the codes but along
                       d_out (dim 0).
  P.weight_shape       int64 (2,) = [d_out, d_in].

compressed-tensors dequantizes ``scale * (c - zp)`` with *signed* codes ``c`` and zero
points ``zp`` in ``[-2^(b-1), 2^(b-1) - 1]`` for both symmetric and asymmetric
schemes. Our symmetric codes are already signed (stored nibble ``q + 2^(b-1)``); our
asymmetric codes ``q`` and zeros ``z`` live in ``[0, 2^b - 1]``, so ``c = q - 2^(b-1)``
and ``zp = z - 2^(b-1)`` (``c - zp = q - z``) and the stored nibbles are ``q`` and ``z``
themselves. Scales stay float32: the dequantized weight equals
``quantizer.dequantize`` bit for bit (in float32).

transformers 5.24 + compressed-tensors 0.20 load symmetric exports with a plain
``from_pretrained``; asymmetric ones need ``quantization_config=
CompressedTensorsConfig(dequantize=True)`` (the default path lays out
``weight_zero_point`` unpacked and refuses the packed tensor). Online transforms are
refused: transformers never applies a compressed-tensors ``transform_config``.

Nothing here imports torch or compressed-tensors: numpy + safetensors only. Writes
are atomic and follow ``cafeq_jax.loading.hf.save_hf``'s rules (temp sibling, one
swap, ``.cafeq_export.json`` record, never replaces a file or a foreign directory).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any
from typing import Mapping

import numpy as np

from cafeq_jax import atomic
from cafeq_jax import quantizer
from cafeq_jax.loading import hf
from cafeq_jax.models import linears as linears_lib
from cafeq_jax.models import qlinear
from cafeq_jax.models.config import ModelConfig

FORMAT = 'pack-quantized'
QUANT_METHOD = 'compressed-tensors'
# The compressed-tensors release whose format this follows (config.json "version").
FORMAT_VERSION = '0.20.0'
# vLLM's WNA16 kernels (Marlin, Machete, ...) take 4- and 8-bit integer weights
# (uint4b8 / uint8b128, with zero points uint4 / uint8) and group sizes -1, 32, 64, 128.
SUPPORTED_BITS = (4, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)
_RECIPES_WITHOUT_TRANSFORM = "'rtn', 'gptq-selfgen', 'cafeq-pairs'"
# Our matrix name -> the torch module under ``model.layers.{i}.``.
MODULES = {
  'q': 'self_attn.q_proj',
  'k': 'self_attn.k_proj',
  'v': 'self_attn.v_proj',
  'o': 'self_attn.o_proj',
  'gate': 'mlp.gate_proj',
  'up': 'mlp.up_proj',
  'down': 'mlp.down_proj',
}
# vLLM fuses these into one qkv_proj / gate_up_proj: one scheme for all of a set.
FUSED = (('q', 'k', 'v'), ('gate', 'up'))
# The QuantSpec fields this writer understands; a spec with any other field set
# (e.g. a block format) is refused.
_SPEC_FIELDS = ('bits', 'group_size', 'symmetric', 'clip_search', 'clip_grid', 'group_fallback')

Scheme = tuple[int, int | None, bool]  # (bits, group size or None per channel, symmetric)


def module_name(layer: int, name: str) -> str:
  """Torch module of our matrix ``name`` in layer ``layer``: ``model.layers.{i}.self_attn.q_proj``."""
  return f'model.layers.{layer}.{MODULES[name]}'


def pack_int32(values: np.ndarray, bits: int) -> np.ndarray:
  """Packs unsigned ``bits``-wide values along the last axis into int32 words.

  Args:
    values: ``(rows, cols)`` integers in ``[0, 2^bits)``.
    bits: 4 or 8 (any divisor of 32).

  Returns:
    ``(rows, ceil(cols * bits / 32))`` int32; element ``j`` of a row sits at bits
    ``[bits * (j % n), bits * (j % n + 1))`` of word ``j // n``, ``n = 32 // bits``
    (compressed-tensors' ``pack_to_int32`` after its offset; padding is zero).
  """
  per = 32 // bits
  rows, cols = values.shape
  words = -(-cols // per)
  u = np.zeros((rows, words * per), np.uint32)
  u[:, :cols] = values
  u = u.reshape(rows, words, per) << (bits * np.arange(per, dtype=np.uint32))
  return np.bitwise_or.reduce(u, axis=-1).view(np.int32)


def unpack_int32(packed: np.ndarray, bits: int, cols: int) -> np.ndarray:
  """Inverse of ``pack_int32``: ``(rows, words)`` int32 -> ``(rows, cols)`` int64 in ``[0, 2^bits)``."""
  per = 32 // bits
  u = np.ascontiguousarray(packed).view(np.uint32)
  shifts = bits * np.arange(per, dtype=np.uint32)
  out = (u[..., None] >> shifts) & np.uint32((1 << bits) - 1)
  return out.reshape(u.shape[0], -1)[:, :cols].astype(np.int64)


def _where(layer: int, name: str) -> str:
  return f'layer {layer} {name!r} ({module_name(layer, name)})'


def _scheme_name(s: Scheme) -> str:
  bits, g, sym = s
  return f'w{bits}{"pc" if g is None else f"g{g}"}{"sym" if sym else "asym"}'


def _check_spec(spec: quantizer.QuantSpec, where: str) -> Scheme:
  """The ``(bits, group_size, symmetric)`` of an exportable spec; raises a ValueError otherwise."""
  try:
    plain = quantizer.QuantSpec(**{f: getattr(spec, f) for f in _SPEC_FIELDS})
  except (AttributeError, TypeError, ValueError) as e:
    plain = e
  if plain != spec:
    raise ValueError(
      f'{where}: quantizer spec {spec!r} is not a plain uniform integer spec '
      f'(bits, group_size, symmetric); compressed-tensors pack-quantized holds only '
      'those. Export other formats another way.'
    )
  if spec.bits not in SUPPORTED_BITS:
    raise ValueError(
      f'{where}: bits={spec.bits} cannot be exported as compressed-tensors '
      f"pack-quantized; supported bits are {SUPPORTED_BITS} (vLLM's WNA16 kernels "
      'take 4- and 8-bit integer weights only).'
    )
  if spec.group_size is not None and spec.group_size not in SUPPORTED_GROUP_SIZES:
    raise ValueError(
      f'{where}: group_size={spec.group_size} cannot be exported; supported are None '
      f"(per output channel) and {SUPPORTED_GROUP_SIZES} (the group sizes of vLLM's "
      'WNA16 kernels).'
    )
  return (spec.bits, spec.group_size, spec.symmetric)


def check_recipe(recipe) -> None:
  """Raises before any work if ``recipe``'s output cannot be written by
  ``save_compressed_tensors`` (an online transform stage, or a spec it cannot hold)."""
  from cafeq_jax import specs  # pylint: disable=g-import-not-at-top

  if recipe.transform is not None:
    raise ValueError(
      f'recipe {recipe.name!r} has the online transform stage '
      f'{type(recipe.transform).__name__}: compressed-tensors pack-quantized cannot '
      f'hold it; use a recipe without one such as {_RECIPES_WITHOUT_TRANSFORM}.'
    )
  for spec in specs.distinct(recipe.spec):
    _check_spec(spec, f'recipe {recipe.name!r}')


def _float32_exact(a, what: str, where: str) -> np.ndarray:
  arr = np.asarray(a)
  out = np.asarray(arr, np.float32)
  if not np.issubdtype(arr.dtype, np.floating) and arr.dtype.name != 'bfloat16':
    raise ValueError(f'{where}: {what} has dtype {arr.dtype}; expected a float dtype.')
  if not np.isfinite(out).all():
    raise ValueError(f'{where}: {what} has NaN/Inf entries.')
  if arr.dtype != np.float32 and not np.array_equal(out.astype(arr.dtype), arr):
    raise ValueError(f'{where}: {what} ({arr.dtype}) is not exactly representable in float32.')
  return out


def _pack_qarray(
  q: quantizer.QArray, d_in: int, d_out: int, where: str, write_group: int | None
) -> dict[str, np.ndarray]:
  """Validates one ``(d_in, d_out)`` QArray and converts it (no re-rounding).

  ``write_group`` is the group size written: the QArray's own, or a divisor of it
  (each scale and zero point then repeated ``g / write_group`` times: the same
  dequantized weight).
  """
  bits, g, sym = _check_spec(q.spec, where)
  codes = np.asarray(q.codes)
  if codes.shape != (d_in, d_out):
    raise ValueError(
      f'{where}: quantized codes have shape {codes.shape}; the config expects (d_in, d_out) '
      f'= {(d_in, d_out)}.'
    )
  if not np.issubdtype(codes.dtype, np.integer):
    raise ValueError(f'{where}: codes have dtype {codes.dtype}; expected an integer dtype.')
  if g is not None and d_in % g:
    raise ValueError(f'{where}: d_in={d_in} is not divisible by group_size={g}.')
  groups = 1 if g is None else d_in // g
  repeat = 1 if g is None else g // write_group
  spec = q.spec
  lo, hi = int(codes.min()), int(codes.max())
  if lo < spec.qmin or hi > spec.qmax:
    raise ValueError(
      f'{where}: codes span [{lo}, {hi}], outside [{spec.qmin}, {spec.qmax}] of {spec.name}.'
    )
  scale = _float32_exact(q.scale, 'scale', where)
  if scale.shape != (groups, d_out):
    raise ValueError(
      f'{where}: scale has shape {scale.shape}; expected {(groups, d_out)} for {spec.name}.'
    )
  if not (scale > 0).all():
    raise ValueError(f'{where}: scales must be positive; found {int((scale <= 0).sum())} <= 0.')
  offset = 1 << (bits - 1)
  tensors = {
    # Stored value = signed compressed-tensors code + 2^(b-1) = q - qmin.
    'weight_packed': pack_int32(codes.T.astype(np.int64) - spec.qmin, bits),
    'weight_scale': np.ascontiguousarray(np.repeat(scale, repeat, axis=0).T),
    'weight_shape': np.asarray([d_out, d_in], np.int64),
  }
  if sym != (q.zero is None):
    raise ValueError(
      f'{where}: spec {spec.name} is {"" if sym else "a"}symmetric but the zero point is '
      f'{"present" if sym else "missing"}.'
    )
  if not sym:
    zero = _float32_exact(q.zero, 'zero point', where)
    if zero.shape != (groups, d_out):
      raise ValueError(f'{where}: zero point has shape {zero.shape}; expected {(groups, d_out)}.')
    if not np.array_equal(zero, np.round(zero)) or zero.min() < 0 or zero.max() > spec.qmax:
      raise ValueError(
        f'{where}: zero points must be integers in [0, {spec.qmax}] '
        f'(compressed-tensors stores them as int{bits} {-offset}..{offset - 1}); '
        f'got values in [{zero.min()}, {zero.max()}].'
      )
    # Stored value = signed zp + 2^(b-1) = z; packed along d_out (torch dim 0): pack
    # the rows of our (groups, d_out) layout, then transpose.
    zp = np.repeat(zero, repeat, axis=0).astype(np.int64)
    tensors['weight_zero_point'] = np.ascontiguousarray(pack_int32(zp, bits).T)
  return tensors


def written_schemes(
  schemes: Mapping[tuple[int, str], Scheme | None], *, merge_group_sizes: bool = True
) -> dict[tuple[int, str], Scheme | None]:
  """The scheme each projection is written with.

  With ``merge_group_sizes``, grouped matrices of one bit width and symmetry are all
  written with the smallest group size among them (e.g. SmolLM2 under g128 with
  ``group_fallback``: g64 for d_in = 576 and g128 for down_proj -> g64 throughout),
  so one config group describes them; per-channel and dense matrices keep theirs.
  """
  if not merge_group_sizes:
    return dict(schemes)
  finest: dict[tuple[int, bool], int] = {}
  for s in schemes.values():
    if s is not None and s[1] is not None:
      finest[(s[0], s[2])] = min(s[1], finest.get((s[0], s[2]), s[1]))
  return {
    k: s if s is None or s[1] is None else (s[0], finest[(s[0], s[2])], s[2])
    for k, s in schemes.items()
  }


def _weights_args(scheme: Scheme) -> dict:
  """``QuantizationArgs`` of a scheme, as compressed-tensors 0.20 serializes them."""
  bits, g, sym = scheme
  return {
    'num_bits': bits,
    'type': 'int',
    'symmetric': sym,
    'group_size': g,
    'strategy': 'channel' if g is None else 'group',
    'dynamic': False,
  }


def _targets(mods: list[tuple[int, str]], cfg: ModelConfig) -> list[str]:
  """Compact compressed-tensors targets for modules ``(layer, name)``: one regex per
  matrix name present in every layer, exact module names otherwise."""
  out = []
  for name in linears_lib.LINEAR_NAMES:
    layers = sorted(l for l, n in mods if n == name)
    if not layers:
      continue
    if layers == list(range(cfg.num_layers)):
      out.append('re:^model\\.layers\\.\\d+\\.' + MODULES[name].replace('.', '\\.') + '$')
    else:
      out += [module_name(l, name) for l in layers]
  return out


def quantization_config(schemes: Mapping[tuple[int, str], Scheme | None], cfg: ModelConfig) -> dict:
  """The ``quantization_config`` of ``config.json``.

  Args:
    schemes: ``(layer, name) -> (bits, group_size, symmetric)`` of every projection,
      None for a dense one.
    cfg: the model config.

  Returns:
    A JSON-able dict (``compressed_tensors.QuantizationConfig`` fields): one config
    group per distinct scheme (``targets: ["Linear"]`` when one scheme covers every
    projection), dense projections and ``lm_head`` in ``ignore``.
  """
  by_scheme: dict[Scheme, list[tuple[int, str]]] = {}
  dense = []
  for key in sorted(schemes, key=lambda k: (k[0], linears_lib.LINEAR_NAMES.index(k[1]))):
    s = schemes[key]
    if s is None:
      dense.append(module_name(*key))
    else:
      by_scheme.setdefault(s, []).append(key)
  single = len(by_scheme) == 1 and not dense
  groups = {}
  for i, (s, mods) in enumerate(by_scheme.items()):
    groups[f'group_{i}'] = {
      'targets': ['Linear'] if single else _targets(mods, cfg),
      'weights': _weights_args(s),
      'input_activations': None,
      'output_activations': None,
      'format': FORMAT,
    }
  return {
    'quant_method': QUANT_METHOD,
    'format': FORMAT,
    'quantization_status': 'compressed',
    'config_groups': groups,
    # Embedding is not a Linear (no target matches it); listed for readers.
    'ignore': ['model.embed_tokens', 'lm_head', *dense],
    'kv_cache_scheme': None,
    'global_compression_ratio': None,
    'version': FORMAT_VERSION,
  }


def _check_transform(t, where: str) -> None:
  if t is None:
    return
  t = np.asarray(t, np.float32)
  if np.array_equal(t, np.broadcast_to(np.eye(t.shape[-1], dtype=np.float32), t.shape)):
    return  # identity blocks (a leaf where only the other matrix has a transform)
  raise ValueError(
    f'online transform x M^-1 on {where}: compressed-tensors pack-quantized cannot hold '
    'it (transformers never applies a compressed-tensors transform_config when '
    'loading, and its block transforms repeat one k x k block, while ours has '
    f'{t.shape[-3]} independent blocks of size {t.shape[-1]}). Use a recipe without '
    f'an online transform such as {_RECIPES_WITHOUT_TRANSFORM}, or hf.save_hf, which '
    'folds it into dense weights.'
  )


def _dense_matrix(layer: dict, name: str, cfg: ModelConfig) -> np.ndarray:
  leaf = linears_lib.LEAF_OF[name]
  w = layer
  for p in leaf.path:
    w = w[p]
  m = np.asarray(linears_lib.leaf_to_matrix(leaf.kind, np.asarray(w, np.float32), cfg))
  return m if len(leaf.names) == 1 else m[leaf.names.index(name)]


def compressed_state_dict(
  params: dict, cfg: ModelConfig, *, merge_group_sizes: bool = True
) -> tuple[dict[str, np.ndarray], dict[tuple[int, str], Scheme | None]]:
  """Validates a quantized tree and converts it to compressed-tensors tensors.

  Args:
    params: param tree with ``QuantizedLinear`` projection leaves (fp leaves are
      written dense), from ``cafeq_jax.quantize``.
    cfg: its ``ModelConfig`` (Llama or Gemma 2).
    merge_group_sizes: see ``written_schemes``.

  Returns:
    ``(state_dict, schemes)``: tensor name -> contiguous numpy array (float32 dense
    tensors; see the module docstring for the quantized ones), and
    ``(layer, name) -> (bits, group_size, symmetric)`` as written (None: dense).

  Raises:
    ValueError: an online transform, unsupported bits / group size / spec, codes or
      zero points out of range, q/k/v or gate/up with different schemes, a
      non-exportable model family; the message names the layer and matrix.
  """
  hf.check_exportable(cfg)
  shapes = linears_lib.linear_shapes(cfg)
  qarrays, tinvs = linears_lib.quantized_matrices(params, cfg)
  for l in range(cfg.num_layers):
    for n in linears_lib.LINEAR_NAMES:
      _check_transform(tinvs.get((l, n)), _where(l, n))
  own = {
    (l, n): None if (l, n) not in qarrays else _check_spec(qarrays[(l, n)].spec, _where(l, n))
    for l in range(cfg.num_layers)
    for n in linears_lib.LINEAR_NAMES
  }
  schemes = written_schemes(own, merge_group_sizes=merge_group_sizes)
  for l in range(cfg.num_layers):
    for fused in FUSED:
      got = {n: schemes[(l, n)] for n in fused}
      if len(set(got.values())) > 1:
        desc = ', '.join(
          f'{n}: {"dense" if s is None else _scheme_name(s)}' for n, s in got.items()
        )
        raise ValueError(
          f'layer {l}: {fused} are stored with different schemes ({desc}); vLLM fuses '
          f'{"/".join(MODULES[n].split(".")[-1] for n in fused)} into one layer and needs '
          'one scheme for all of them. Quantize them together with one spec.'
        )
  sd: dict[str, np.ndarray] = {}
  for l in range(cfg.num_layers):
    layer = params[f'layer_{l}']
    for n in linears_lib.LINEAR_NAMES:
      d_in, d_out = shapes[n]
      prefix = module_name(l, n)
      if schemes[(l, n)] is None:
        sd[prefix + '.weight'] = _dense_matrix(layer, n, cfg).T
        continue
      packed = _pack_qarray(qarrays[(l, n)], d_in, d_out, _where(l, n), schemes[(l, n)][1])
      for k, v in packed.items():
        sd[f'{prefix}.{k}'] = v
    for ours, theirs in hf._hf_names(cfg, l).items():  # pylint: disable=protected-access
      sd[theirs] = _float32_exact(layer[ours]['scale'], f'norm {ours}', f'layer {l}')
  sd['model.embed_tokens.weight'] = _float32_exact(
    params['embedder']['input_embedding'], 'embedding', 'embedder'
  )
  sd['model.norm.weight'] = _float32_exact(params['final_norm']['scale'], 'scale', 'final_norm')
  if not cfg.tie_embeddings:
    w = params['unembed']['w']
    w = qlinear.effective_weight(w) if isinstance(w, qlinear.QuantizedLinear) else w
    sd['lm_head.weight'] = _float32_exact(w, 'unembedding', 'unembed').T
  for name, shape in hf.expected_hf_shapes(cfg).items():
    if name in sd and tuple(sd[name].shape) != shape:
      raise ValueError(f'tensor {name!r} has shape {sd[name].shape}; expected {shape}.')
  return {k: np.ascontiguousarray(v) for k, v in sd.items()}, schemes


def save_compressed_tensors(
  params: dict,
  cfg: ModelConfig,
  out_dir: str | os.PathLike,
  *,
  provenance: Mapping[str, Any] | None = None,
  merge_group_sizes: bool = True,
) -> str:
  """Writes a compressed-tensors pack-quantized checkpoint to ``out_dir`` atomically.

  Everything is validated and converted in memory first; the files are then written
  to a hidden temporary sibling that replaces ``out_dir`` in one swap
  (``atomic.replace_dir``), so an error or interrupt leaves ``out_dir`` as it was.

  Args:
    params: quantized param tree (``cafeq_jax.quantize`` output) of a Llama or
      Gemma 2 model: ``QuantizedLinear`` projections become packed
      ``q_proj``/.../``down_proj`` layers; fp projections, embeddings, norms and
      ``lm_head`` are written dense float32 (a quantized ``unembed`` as its
      effective weight).
    cfg: its ``ModelConfig``.
    out_dir: absent, empty, or an earlier cafeq_jax export (whose added files, e.g.
      a ``tokenizer.json``, are kept).
    provenance: JSON-able record stored in ``.cafeq_export.json``.
    merge_group_sizes: write grouped matrices of one bit width and symmetry with
      the smallest group size among them (exact: scales repeated), so a
      ``group_fallback`` model (SmolLM2 under g128: g64 and g128) needs one config
      group. transformers 5.24's ``dequantize=True`` load decompresses every layer
      with the first config group's scheme, so mixed group sizes only load there
      merged. False writes one config group per group size (vLLM reads either).

  Returns:
    ``out_dir``.

  Raises:
    ValueError: the tree cannot be expressed (see ``compressed_state_dict``);
      nothing is written.
    FileExistsError: ``out_dir`` is a file or a foreign non-empty directory.
    OSError: ``out_dir`` cannot be created (the message names it); nothing is left.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  out_dir = os.fspath(out_dir)
  path = os.path.abspath(out_dir)
  atomic.recover(path)
  carried = (
    hf.carried_files(path, writer='save_compressed_tensors', legacy=False)
    if os.path.lexists(path)
    else []
  )
  sd, schemes = compressed_state_dict(params, cfg, merge_group_sizes=merge_group_sizes)
  config = json.dumps(
    hf.config_to_hf(cfg, quantization_config=quantization_config(schemes, cfg)), indent=2
  )
  record = json.dumps(provenance or {}, default=str)  # fail before writing anything
  try:
    tmp = atomic.make_temp_dir(path)
  except OSError as e:
    raise type(e)(
      e.errno, f'cannot write the export {path!r} (its parent directory): {e.strerror}'
    ) from e
  try:
    save_file(sd, os.path.join(tmp, hf.WEIGHTS_FILE), metadata={'format': 'pt'})
    atomic.apply_umask(os.path.join(tmp, hf.WEIGHTS_FILE))  # safetensors creates it 0600
    with open(os.path.join(tmp, hf.CONFIG_FILE), 'w') as f:
      f.write(config)
    marker = {
      'format': 'cafeq_jax.hf_export',
      'variant': f'{QUANT_METHOD}/{FORMAT}',
      'files': {n: hf.file_sha256(os.path.join(tmp, n)) for n in (hf.WEIGHTS_FILE, hf.CONFIG_FILE)},
      'provenance': json.loads(record),
    }
    with open(os.path.join(tmp, hf.EXPORT_MARKER), 'w') as f:
      json.dump(marker, f, indent=2)
    for name in carried:
      hf.carry(os.path.join(path, name), os.path.join(tmp, name))
    atomic.fsync_tree(tmp)
    atomic.replace_dir(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  atomic.clean_stale(path)
  return out_dir
