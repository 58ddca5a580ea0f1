"""The main job: quantize a model with several methods and compare them.

For every column (a quantizer: bits, granularity, symmetry) each method (a row)
quantizes the same fp params; all rows are then evaluated on the same tokens
against the fp model (perplexity, KL divergence, top-1 agreement). Results go to
``output_dir``: ``results.json`` (written atomically after every column, so an
interrupted run resumes at the first unfinished column), ``table.md``, per-method
proxy-loss reports, plots, and the chosen quantized models (Orbax, packed codes)
or Hugging Face exports.

Reliability (README "Reliability"): every option is checked before the model
loads; a cell is resumed only if its inputs have the same content (weights,
token windows, seed, recipe); runs sharing ``output_dir`` merge their cells
under a lock; every output is replaced atomically (old or new, never torn).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import json
import os
import re
import time
from typing import Any
from typing import Callable
from typing import Mapping

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cafeq_jax import atomic
from cafeq_jax import eval as eval_lib
from cafeq_jax import packing
from cafeq_jax import quantizer
from cafeq_jax import recipes
from cafeq_jax import specs as specs_lib
from cafeq_jax.ggml import mixes
from cafeq_jax.methods import quantize
from cafeq_jax.models import PRESETS
from cafeq_jax.models import ModelConfig
from cafeq_jax.models import QuantizedLinear
from cafeq_jax.models import init_params
from cafeq_jax.models import qlinear
from cafeq_jax.models.generate import generate
from experiments import cli

# Standard-library modules whose source is the off-domain calibration text (code,
# where the evaluation text is English prose).
_CODE_MODULES = (
  'argparse',
  'textwrap',
  'functools',
  'collections',
  'json.decoder',
  'json.encoder',
  'string',
  'dataclasses',
  'inspect',
  'typing',
)

_COLUMN = re.compile(r'^w(\d)(pc|g\d+)(sym|asym)?$')


GGUF_PREFIX = 'gguf-'


@dataclasses.dataclass(frozen=True)
class GGUFColumn:
  """A column quantized into llama.cpp's mix ``mix`` (its spec map needs the model)."""

  mix: str
  clip_search: bool = False

  @property
  def name(self) -> str:
    return GGUF_PREFIX + self.mix

  def spec_map(self, cfg: ModelConfig) -> specs_lib.SpecMap:
    return mixes.spec_map(self.mix, cfg, clip_search=self.clip_search)


def parse_column(name: str, clip_search: bool = False) -> quantizer.QuantSpec | GGUFColumn:
  """'w3g128' / 'w4pcsym' / 'w3g64asym' -> ``QuantSpec`` (asymmetric by default);
  'gguf-Q3_K_S' -> the llama.cpp mix ``GGUFColumn`` (cafeq_jax.ggml.mixes.MIXES)."""
  name = name.strip()
  if name.startswith(GGUF_PREFIX):
    return GGUFColumn(mixes.check_mix(name[len(GGUF_PREFIX) :]), clip_search)
  m = _COLUMN.match(name)
  if not m:
    raise ValueError(
      f'column {name!r} is not of the form w<bits><pc|g<size>>[sym|asym], '
      f"e.g. 'w3g128' or 'w4pcsym', or gguf-<mix> with a mix of {list(mixes.MIXES)}."
    )
  bits, gran, sym = m.groups()
  group = None if gran == 'pc' else int(gran[1:])
  # group_fallback: a matrix whose d_in is not a multiple of the group size (576 in
  # SmolLM2 under g128) uses the largest supported group size dividing it.
  return quantizer.QuantSpec(
    bits=int(bits),
    group_size=group,
    symmetric=sym == 'sym',
    clip_search=clip_search,
    group_fallback=True,
  )


def column_name(spec) -> str:
  return spec.name


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  """Params, config and text codec of the model under study."""

  name: str
  params: Any
  config: ModelConfig
  encode: Callable[[str], list[int]]
  decode: Callable[[list[int]], str]
  eos_id: int | None = None


def load_model(name: str, seed: int = 0) -> LoadedModel:
  """The embedded SmolLM2, a .gguf file, a Hugging Face dir, or a random preset."""
  if name == 'smollm2_135m' or name.endswith('.gguf'):
    from cafeq_jax.loading import gguf  # pylint: disable=g-import-not-at-top
    from cafeq_jax.loading import tokenizer  # pylint: disable=g-import-not-at-top

    path = None if name == 'smollm2_135m' else name
    params, cfg = gguf.load_gguf(path)
    tok = tokenizer.load_gguf_tokenizer(path)
    return LoadedModel(
      name, params, cfg, lambda t: tok.encode(t, add_bos=False), tok.decode, tok.eos_id
    )
  if os.path.isdir(name):
    from cafeq_jax.loading import hf  # pylint: disable=g-import-not-at-top

    params, cfg = hf.load_hf(name)
    try:
      import tokenizers  # pylint: disable=g-import-not-at-top

      tok = tokenizers.Tokenizer.from_file(os.path.join(name, 'tokenizer.json'))
      return LoadedModel(name, params, cfg, lambda t: tok.encode(t).ids, tok.decode)
    except Exception:  # pylint: disable=broad-except
      logging.warning('%s has no usable tokenizer.json; using byte tokens.', name)
      return _byte_codec(name, params, cfg)
  if name in PRESETS:
    cfg = PRESETS[name]
    return _byte_codec(name, init_params(cfg, jax.random.PRNGKey(seed)), cfg)
  raise ValueError(
    f'model {name!r} is neither smollm2_135m, a .gguf file, a Hugging '
    f'Face model dir, nor a preset ({sorted(PRESETS)}).'
  )


def _byte_codec(name, params, cfg) -> LoadedModel:
  """Bytes as token ids (mod vocab): enough text handling for random test models."""
  v = cfg.vocab_size
  return LoadedModel(
    name,
    params,
    cfg,
    lambda t: [b % v for b in t.encode()],
    lambda ids: bytes(int(i) % 256 for i in ids).decode(errors='replace'),
  )


def code_text() -> str:
  """Off-domain calibration text: Python standard-library source code."""
  return '\n\n'.join(inspect.getsource(importlib.import_module(m)) for m in _CODE_MODULES)


def calibration_tokens(stage: recipes.Calibration, model: LoadedModel, config) -> np.ndarray:
  """GPTQ calibration windows of ``stage.source``: 'in-domain' (eval text, windows
  disjoint from the evaluation windows), 'code' (standard-library source) or a file."""
  n, t = stage.num_seqs, stage.seq_len
  if stage.source == 'in-domain':
    text = eval_lib.load_text(config.eval_text or None)
    ids = np.asarray(model.encode(text))
    # The evaluation windows start each of eval_num_seqs equal chunks; calibration
    # windows are taken from the rest of those chunks, so they never overlap.
    stride = ids.size // config.eval_num_seqs
    rest = np.concatenate(
      [
        ids[i * stride + config.eval_seq_len : (i + 1) * stride]
        for i in range(config.eval_num_seqs)
      ]
    )
    return eval_lib.make_windows(rest, n, t)
  text = code_text() if stage.source == 'code' else eval_lib.load_text(stage.source)
  return eval_lib.make_windows(model.encode(text), n, t)


def _flat(d: dict, prefix: str = '') -> dict[str, Any]:
  """Nested options -> ``{'slot.field': value}``, leaving out unset (None) ones."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f'{prefix}{k}.'))
    elif v is not None:
      out[f'{prefix}{k}'] = v
  return out


def cafeq_overrides(options) -> dict[str, Any]:
  """The set fields of a ``configs.quantize.cafeq_options()`` ConfigDict, as
  ``recipes.override`` keys (``{'transform.steps': 100}``)."""
  return _flat(options.to_dict())


def with_cafeq_options(name: str, recipe: recipes.Recipe, options) -> recipes.Recipe:
  """``recipe`` (the preset ``name``) with every set field of ``options``
  (``configs.quantize.cafeq_options()``) where its stage has that field, if it is a
  CafeQ recipe (a name starting with 'cafeq'); any other recipe as it is."""
  return _with_overrides(name, recipe, cafeq_overrides(options))


def _with_overrides(name: str, recipe: recipes.Recipe, overrides: dict[str, Any]) -> recipes.Recipe:
  if not name.startswith('cafeq'):
    return recipe
  return recipes.override(recipe, overrides, strict=False)


def check_cafeq_options(presets: Mapping[str, recipes.Recipe], options) -> None:
  """Refuses a set field of ``options`` that changes none of ``presets`` (name ->
  preset recipe): no CafeQ recipe among them has that stage field, or each has that
  value already. Applied nowhere, it would be ignored without a word."""
  for key, value in cafeq_overrides(options).items():
    if all(_with_overrides(m, r, {key: value}) == r for m, r in presets.items()):
      raise ValueError(
        f'config.cafeq.{key}={value!r} changes none of the recipes {list(presets)} '
        '(no CafeQ recipe among them has that stage field, or it is already that value).'
      )


def recipe_for(name: str, spec: specs_lib.Spec, config) -> recipes.Recipe:
  """The recipe of a table row: the preset ``name`` with the job's quantizer and options.

  Each *set* field of ``config.cafeq`` (stage fields, e.g. ``transform.steps``;
  unset ones are None) applies to every CafeQ recipe (names starting with 'cafeq')
  whose stage has that field, and every other field keeps the preset's value; the
  self-generation and calibration sizes apply to every recipe with such statistics.
  """
  recipe = with_cafeq_options(name, recipes.get(name, spec=spec), config.cafeq)
  sizes = {
    recipes.SelfGenerated: (config.selfgen_num_seqs, config.selfgen_seq_len),
    recipes.Calibration: (config.calib_num_seqs, config.calib_seq_len),
  }
  if type(recipe.statistics) in sizes:
    n, t = sizes[type(recipe.statistics)]
    recipe = recipes.override(recipe, {'statistics.num_seqs': n, 'statistics.seq_len': t})
  return recipe


def transform_nbytes(t: jax.Array) -> int:
  """Bytes to store online-transform blocks ``(..., k, k)``: a block whose entries
  are all ``±c`` (a signed Hadamard rotation) as one sign bit per entry plus ``c``
  in bf16; any other block in bf16."""
  t = np.asarray(t, np.float32).reshape(-1, t.shape[-2], t.shape[-1])
  k2 = t.shape[-1] * t.shape[-2]
  a = np.abs(t).reshape(t.shape[0], -1)
  signed = np.all(np.isclose(a, a[:, :1], rtol=1e-6, atol=0), axis=1)
  return int(np.sum(np.where(signed, -(-k2 // 8) + 2, 2 * k2)))


def storage(qparams) -> dict[str, float]:
  """Bytes on disk of the quantized linears (packed codes + bf16 scales) vs bf16."""
  packed = bf16 = n = 0
  for leaf in jax.tree.leaves(qparams, is_leaf=lambda x: isinstance(x, QuantizedLinear)):
    if not isinstance(leaf, QuantizedLinear):
      continue
    for q in qlinear.qarrays(leaf.weight):
      size = int(np.prod(q.shape))
      if q.spec.ggml_type is not None:  # the GGUF block bytes
        packed += int(round(size * quantizer.bits_per_weight(q.spec, q.shape[-2]) / 8))
      else:
        packed += packing.nbytes(qlinear.pack_weight(q, scale_dtype=jnp.bfloat16))
      bf16 += 2 * size
      n += size
    if leaf.transform_inv is not None:
      packed += transform_nbytes(leaf.transform_inv)
  return {
    'linear_bytes': packed,
    'linear_bf16_bytes': bf16,
    'bits_per_weight': 8 * packed / max(n, 1),
  }


RESULTS_FILE = 'results.json'
TABLE_FILE = 'table.md'
LOCK_FILE = '.lock'


def weights_fingerprint(params, model_config: ModelConfig) -> str:
  """sha256 of a model's content: its config and every leaf (path, dtype, shape, bytes).

  Computed once per run (about a second per GB on one core); a replaced or edited
  checkpoint at the same path gets another fingerprint.
  """
  h = hashlib.sha256()
  h.update(json.dumps(dataclasses.asdict(model_config), sort_keys=True, default=str).encode())
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  for path, leaf in sorted(flat, key=lambda kv: jax.tree_util.keystr(kv[0])):
    a = np.ascontiguousarray(np.asarray(leaf)).reshape(-1)
    h.update(f'{jax.tree_util.keystr(path)}:{a.dtype}:{np.shape(leaf)}'.encode())
    h.update(a.view(np.uint8) if a.size else b'')
  return h.hexdigest()


def tokens_fingerprint(tokens) -> str | None:
  """sha256 of ``(N, T)`` token windows (shape and int32 values); None for None."""
  if tokens is None:
    return None
  a = np.ascontiguousarray(np.asarray(tokens, np.int32))
  return hashlib.sha256(f'{a.shape}'.encode() + a.tobytes()).hexdigest()


def content_hash(obj) -> str:
  """sha256 hex digest of ``obj`` as canonical JSON (sorted keys; str() for the rest)."""
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _row_inputs(
  recipe: recipes.Recipe,
  *,
  seed: int,
  weights: str,
  eval_tokens: str,
  calib_tokens: str | None = None,
) -> dict[str, Any]:
  """The content fingerprints a cell's result depends on (short, for logs and diffs)."""
  return {
    'weights': weights[:16],
    'eval_tokens': eval_tokens[:16],
    'calib_tokens': None if calib_tokens is None else calib_tokens[:16],
    'seed': int(seed),
    'recipe': content_hash(recipe.to_dict())[:16],
  }


def _row_hash(
  recipe: recipes.Recipe,
  *,
  seed: int,
  weights: str,
  eval_tokens: str,
  calib_tokens: str | None = None,
) -> str:
  """Identity of one table cell's inputs, by content (the resume key).

  Args:
    recipe: the row's recipe (``recipe.to_dict()``: stages, quantizer, sizes).
    seed: the PRNG seed of the quantization.
    weights: ``weights_fingerprint`` of the fp model.
    eval_tokens: ``tokens_fingerprint`` of the evaluation windows.
    calib_tokens: ``tokens_fingerprint`` of the calibration windows (GPTQ rows).
  """
  return content_hash(
    {
      'recipe': recipe.to_dict(),
      'seed': int(seed),
      'weights': weights,
      'eval_tokens': eval_tokens,
      'calib_tokens': calib_tokens,
    }
  )[:16]


def _fp_hash(weights: str, eval_tokens: str) -> str:
  """Identity of the fp row's inputs (its metrics depend on the model and tokens only)."""
  return content_hash({'weights': weights, 'eval_tokens': eval_tokens})[:16]


def _why(prev, inputs: dict[str, Any]) -> str:
  """Why a cell is (re)computed, for the log."""
  if not isinstance(prev, dict):
    return 'no result yet'
  old = prev.get('inputs')
  if not isinstance(old, dict):
    return 'its result has no content fingerprint (written by an older version)'
  changed = [k for k in inputs if old.get(k) != inputs[k]]
  return f'inputs changed since its result: {", ".join(changed) or "recipe details"}'


def _describe(inputs: dict[str, Any]) -> str:
  return ', '.join(f'{k} {v}' for k, v in inputs.items() if v is not None)


# ---------------------------------------------------------------------------
# Validation: everything that needs no model runs before it loads.


@dataclasses.dataclass
class _Plan:
  """The checked options of a run."""

  methods: list[str]
  specs: list[quantizer.QuantSpec | GGUFColumn | specs_lib.SpecMap]
  cells: dict[tuple[str, str], recipes.Recipe]  # (column, method) -> recipe
  text: str
  save: set[str]
  export: set[str]
  gguf: set[str] = dataclasses.field(default_factory=set)  # columns written as GGUF
  ct: bool = False  # write every row of the uniform columns as compressed-tensors


def _check_int(config, name: str, least: int) -> int:
  v = config[name]
  if isinstance(v, bool) or not isinstance(v, int) or v < least:
    raise ValueError(f'config.{name}={v!r} must be an int >= {least}.')
  return v


def _check_dir(path: str, what: str) -> None:
  """Creates ``path`` if needed and checks that files can be created in it."""
  if os.path.lexists(path) and not os.path.isdir(path):
    raise ValueError(f'{what} {path!r} exists and is not a directory.')
  try:
    os.makedirs(path, exist_ok=True)
    probe = os.path.join(path, f'.write_probe.{os.getpid()}.{time.time_ns()}')
    os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    os.unlink(probe)
  except OSError as e:
    raise ValueError(f'{what} {path!r} is not writable: {e}') from None


def _check_options(config) -> _Plan:
  """Checks every option that needs no model (before it loads).

  Raises:
    ValueError: the first bad option, naming it, its value and what is expected.
  """
  methods, columns = cli.split_names(config.methods), cli.split_names(config.columns)
  if not methods or not columns:
    raise ValueError(
      f'config.methods={config.methods!r} and config.columns='
      f'{config.columns!r} must each name at least one entry.'
    )
  for what, names in (('methods', methods), ('columns', columns)):
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
      raise ValueError(f'config.{what}={config[what]!r} repeats {repeated}.')
  if 'fp' in methods:
    raise ValueError(
      "config.methods names 'fp': that row is the unquantized reference, "
      'always present; list only quantization recipes.'
    )
  for name, least in (
    ('eval_num_seqs', 1),
    ('eval_seq_len', 2),
    ('eval_batch_size', 1),
    ('calib_num_seqs', 1),
    ('calib_seq_len', 2),
    ('selfgen_num_seqs', 1),
    ('selfgen_seq_len', 2),
  ):
    _check_int(config, name, least)
  if isinstance(config.seed, bool) or not isinstance(config.seed, int):
    raise ValueError(f'config.seed={config.seed!r} must be an int.')
  if not isinstance(config.prompt, str):
    raise ValueError(f'config.prompt={config.prompt!r} must be a str ("" for no sample).')
  if config.prompt:
    _check_int(config, 'max_new_tokens', 1)
  if not isinstance(config.output_dir, str) or not config.output_dir:
    raise ValueError(f'config.output_dir={config.output_dir!r} must be a directory path.')
  formats = cli.split_names(config.export)
  gguf_cols = []
  for f in formats:
    if f == 'ct':
      continue
    if not f.startswith('gguf:'):
      raise ValueError(
        f"config.export={config.export!r}: {f!r} is not a format; expected 'ct' "
        f'(compressed-tensors) or gguf:<mix> with a mix of {list(mixes.MIXES)}.'
      )
    col = GGUF_PREFIX + mixes.check_mix(f[len('gguf:') :])
    gguf_cols.append(col)
    if col not in columns:
      columns.append(col)
  specs = [parse_column(c, config.clip_search) for c in columns]
  for s in specs:  # a GGUF column's rows must be holdable in GGUF (checked on a probe spec)
    if isinstance(s, GGUFColumn):
      from cafeq_jax import ggml  # pylint: disable=g-import-not-at-top
      from cafeq_jax.loading import gguf_writer  # pylint: disable=g-import-not-at-top

      for m in methods:
        try:
          gguf_writer.check_recipe(recipe_for(m, ggml.spec('Q4_0'), config))
        except ValueError as e:
          raise ValueError(f'column {s.name}, row {m!r}: {e}') from None
  plan_recipes = {
    (column_name(s), m): recipe_for(m, s, config)
    for s in specs
    if not isinstance(s, GGUFColumn)
    for m in methods
  }
  if 'ct' in formats:
    from cafeq_jax.loading import compressed_tensors  # pylint: disable=g-import-not-at-top

    for (col, m), r in plan_recipes.items():
      try:
        compressed_tensors.check_recipe(r)
      except ValueError as e:
        raise ValueError(f'config.export=ct, column {col}, row {m!r}: {e}') from None
  save, export = cli.split_names(config.save_models), cli.split_names(config.export_hf)
  for what, names in (('save_models', save), ('export_hf', export)):
    unknown = [n for n in names if n not in methods]
    if unknown:
      raise ValueError(
        f'config.{what}={config[what]!r} names {unknown}, which are not '
        f'rows of this run; expected some of config.methods={methods}.'
      )
  text = eval_lib.load_text(config.eval_text or None)
  for r in plan_recipes.values():
    stage = r.statistics
    if isinstance(stage, recipes.Calibration) and stage.source not in ('in-domain', 'code'):
      eval_lib.load_text(stage.source)
  out = config.output_dir
  _check_dir(out, 'config.output_dir')
  _check_dir(os.path.join(out, 'reports'), 'the reports directory')
  if save:
    from cafeq_jax import checkpointing  # pylint: disable=g-import-not-at-top

    _check_dir(os.path.join(out, 'models'), 'the models directory')
    for s in specs:
      for m in save:
        checkpointing.check_overwritable(_model_path(config, column_name(s), m))
  if export:
    from cafeq_jax.loading import hf  # pylint: disable=g-import-not-at-top

    _check_dir(os.path.join(out, 'hf'), 'the Hugging Face export directory')
    for s in specs:
      for m in export:
        hf.check_export_dir(_export_path(config, column_name(s), m))
  if gguf_cols:
    _check_dir(os.path.join(out, 'gguf'), 'the GGUF export directory')
  if 'ct' in formats:
    _check_dir(os.path.join(out, 'ct'), 'the compressed-tensors export directory')
  return _Plan(
    methods, specs, plan_recipes, text, set(save), set(export), set(gguf_cols), 'ct' in formats
  )


def _resolve_gguf_columns(plan: _Plan, cfg: ModelConfig, config) -> None:
  """GGUF columns get the model's spec map (llama.cpp's fallbacks depend on shapes)."""
  for i, s in enumerate(plan.specs):
    if isinstance(s, GGUFColumn):
      smap = s.spec_map(cfg)
      plan.specs[i] = smap
      for m in plan.methods:
        plan.cells[(s.name, m)] = recipe_for(m, smap, config)


def _check_with_model(plan: _Plan, model: LoadedModel, config) -> None:
  """Checks that need the model (lengths, prompt, export), before any quantization."""
  limit = model.config.max_seq_len
  if config.eval_seq_len > limit:
    raise ValueError(
      f'config.eval_seq_len={config.eval_seq_len} exceeds the max_seq_len='
      f'{limit} of model {config.model!r}.'
    )
  for (col, m), r in plan.cells.items():
    stage = r.statistics
    if isinstance(stage, (recipes.SelfGenerated, recipes.Calibration)) and (stage.seq_len > limit):
      option = 'selfgen_seq_len' if isinstance(stage, recipes.SelfGenerated) else ('calib_seq_len')
      raise ValueError(
        f'row {m!r} ({col}) uses sequences of {stage.seq_len} tokens '
        f'(config.{option}) but model {config.model!r} has max_seq_len='
        f'{limit}.'
      )
  if config.prompt:
    n = len(model.encode(config.prompt))
    if n == 0:
      raise ValueError(f'config.prompt={config.prompt!r} encodes to no tokens.')
    if n + config.max_new_tokens > limit:
      raise ValueError(
        f'config.prompt ({n} tokens) + config.max_new_tokens='
        f'{config.max_new_tokens} exceeds the max_seq_len={limit} of model '
        f'{config.model!r}.'
      )
  if plan.export:
    from cafeq_jax.loading import hf  # pylint: disable=g-import-not-at-top

    hf.check_exportable(model.config)
  if plan.gguf and gguf_tokenizer_dir(config.model) is not None:
    from cafeq_jax.loading import gguf_tokenizer  # pylint: disable=g-import-not-at-top

    # A tokenizer the GGUF files cannot hold fails here, not after quantizing.
    gguf_tokenizer.tokenizer_fields(config.model, vocab_size=model.config.vocab_size)


# ---------------------------------------------------------------------------
# results.json: read, validated, merged under the output dir's lock.


def _fresh_results(config) -> dict[str, Any]:
  return {'model': config.model, 'columns': {}}


def _valid_results(data) -> bool:
  if not isinstance(data, dict) or not isinstance(data.get('columns'), dict):
    return False
  for col in data['columns'].values():
    if not isinstance(col, dict) or not isinstance(col.get('methods'), dict):
      return False
    if not all(isinstance(r, dict) for r in col['methods'].values()):
      return False
  return True


def _load_results(path: str, config) -> dict[str, Any]:
  """``results.json``, or a fresh table when absent; a corrupt one is moved aside."""
  if not os.path.exists(path):
    return _fresh_results(config)
  try:
    with open(path, encoding='utf-8') as f:
      data = json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    atomic.move_aside(path, f'is not valid JSON ({e})')
    return _fresh_results(config)
  except OSError as e:
    raise ValueError(f'{path!r} cannot be read: {e}') from None
  if not _valid_results(data):
    atomic.move_aside(
      path,
      'is not a results table of this job (expected {"columns": '
      '{column: {"methods": {method: row}}}})',
    )
    return _fresh_results(config)
  return data


def _commit(
  path: str,
  config,
  col: str,
  spec: quantizer.QuantSpec,
  rows: dict[str, dict],
  patches: dict[str, tuple[str, dict]],
) -> dict[str, Any]:
  """Re-reads ``results.json``, merges this run's cells of ``col``, writes it back.

  Call with the output dir's lock held. ``rows`` replace whole cells; ``patches``
  (method -> (hash, fields)) update a cell only if it still has that hash.
  """
  results = _load_results(path, config)
  column = results['columns'].setdefault(col, {'spec': dataclasses.asdict(spec), 'methods': {}})
  column['spec'] = dataclasses.asdict(spec)
  column['methods'].update(rows)
  for m, (h, fields) in patches.items():
    row = column['methods'].get(m)
    if row is not None and row.get('hash') == h:
      row.update(fields)
  results['model'] = config.model
  atomic.write_json(path, results)
  return results


def _report_path(config, col: str, method: str) -> str:
  return os.path.join(config.output_dir, 'reports', f'{col}_{method}.json')


def _report_hash(path: str) -> str | None:
  """The row hash a report was written for (None: absent, unreadable, other).

  A report is written before its cell is committed to ``results.json`` (the
  evaluation comes between), so a run killed in between leaves a report of the
  new inputs beside the old cell; a later run that keeps the cell rewrites it.
  """
  try:
    with open(path, encoding='utf-8') as f:
      report = json.load(f)
  except (OSError, ValueError):
    return None
  return report.get('row_hash') if isinstance(report, dict) else None


def _model_path(config, col: str, method: str) -> str:
  return os.path.join(config.output_dir, 'models', f'{col}_{method}')


def _export_path(config, col: str, method: str) -> str:
  return os.path.join(config.output_dir, 'hf', f'{col}_{method}')


def _saved_hash(path: str) -> str | None:
  """The row hash a saved model was written for (None: absent, unreadable, other)."""
  from cafeq_jax import checkpointing  # pylint: disable=g-import-not-at-top

  try:
    meta = checkpointing.read_info(path)['metadata']
  except (FileNotFoundError, checkpointing.CheckpointError):
    return None
  return meta.get('row_hash') if isinstance(meta, dict) else None


def _writes_ct(plan: _Plan, col: str) -> bool:
  return plan.ct and not col.startswith(GGUF_PREFIX)


def _ct_path(config, col: str, method: str) -> str:
  return os.path.join(config.output_dir, 'ct', f'{col}_{method}')


def _gguf_path(config, col: str, method: str) -> str:
  return os.path.join(config.output_dir, 'gguf', f'{col}_{method}.gguf')


def gguf_source(model: str) -> str | None:
  """The GGUF file whose metadata and tokenizer an export copies (None: HF / preset)."""
  if model == 'smollm2_135m':
    from cafeq_jax.loading import gguf  # pylint: disable=g-import-not-at-top

    return gguf.smollm2_gguf_path()
  return model if model.endswith('.gguf') else None


def gguf_tokenizer_dir(model: str) -> str | None:
  """The Hugging Face dir whose ``tokenizer.json`` a GGUF export of ``model`` holds
  (None: the tokenizer comes from the source GGUF, or there is none)."""
  if os.path.isdir(model) and os.path.isfile(os.path.join(model, 'tokenizer.json')):
    return model
  return None


def _gguf_hash(path: str) -> str | None:
  """The row hash a GGUF export was written for (None: absent or unreadable)."""
  from cafeq_jax.loading import gguf_writer  # pylint: disable=g-import-not-at-top

  prov = gguf_writer.read_provenance(path)
  return prov.get('row_hash') if isinstance(prov, dict) else None


def _exported_hash(path: str) -> str | None:
  from cafeq_jax.loading import hf  # pylint: disable=g-import-not-at-top

  marker = hf.read_export_marker(path)
  prov = (marker or {}).get('provenance')
  return prov.get('row_hash') if isinstance(prov, dict) else None


def run(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Runs the job described by ``config`` (see experiments/configs/quantize.py).

  Every option (and the output directories, and ``results.json``) is checked
  before the model loads; lengths against the model before any quantization.
  A cell (column, method) already in ``output_dir/results.json`` whose inputs
  have the same content (weights, token windows, seed, recipe: ``_row_hash``) is
  kept, not recomputed, and the log says so; a changed input recomputes it. So a
  killed run resumes, a new method can be added to an existing table, and rows
  named in ``save_models`` / ``export_hf`` are saved / exported even when
  already done (their params recomputed, deterministically; the metrics kept).

  Several runs may share ``output_dir``: each write of ``results.json`` re-reads
  it and merges under an exclusive lock (``output_dir/.lock``), so no run drops
  another's cells. Metrics are written before models and exports; every file is
  replaced atomically (``cafeq_jax.atomic``).
  """
  t0 = time.perf_counter()
  plan = _check_options(config)
  lock = atomic.Lock(os.path.join(config.output_dir, LOCK_FILE))
  results_path = os.path.join(config.output_dir, RESULTS_FILE)
  with lock:
    _load_results(results_path, config)  # a corrupt one is moved aside now

  model = load_model(config.model, config.seed)
  logging.info('loaded %s in %.1fs', config.model, time.perf_counter() - t0)
  _resolve_gguf_columns(plan, model.config, config)
  _check_with_model(plan, model, config)
  tokens = eval_lib.make_windows(model.encode(plan.text), config.eval_num_seqs, config.eval_seq_len)
  weights = weights_fingerprint(model.params, model.config)
  eval_fp = tokens_fingerprint(tokens)
  fp_hash = _fp_hash(weights, eval_fp)
  calib: dict[recipes.Calibration, tuple[np.ndarray, str]] = {}
  for r in plan.cells.values():
    stage = r.statistics
    if isinstance(stage, recipes.Calibration) and stage not in calib:
      toks = calibration_tokens(stage, model, config)
      calib[stage] = (toks, tokens_fingerprint(toks))
  logging.info(
    'inputs: weights %s, eval tokens %s, seed %d', weights[:16], eval_fp[:16], config.seed
  )
  apply_fn = eval_lib.model_apply_fn(model.config)
  sample_for = {'prompt': config.prompt, 'max_new_tokens': config.max_new_tokens}

  for spec in plan.specs:
    col = column_name(spec)
    with lock:
      done = _load_results(results_path, config)['columns'].get(col, {}).get('methods', {})
    todo: dict[str, tuple[recipes.Recipe, str, dict]] = {}
    wants: dict[str, tuple[recipes.Recipe, str, list[str]]] = {}
    for m in plan.methods:
      recipe = plan.cells[(col, m)]
      stage = recipe.statistics
      c_fp = calib[stage][1] if isinstance(stage, recipes.Calibration) else None
      key = dict(seed=config.seed, weights=weights, eval_tokens=eval_fp, calib_tokens=c_fp)
      h, inputs = _row_hash(recipe, **key), _row_inputs(recipe, **key)
      prev = done.get(m)
      if isinstance(prev, dict) and prev.get('hash') == h:
        need = []
        if _report_hash(_report_path(config, col, m)) != h:
          need.append('report')  # killed between its report and its cell: rewrite it
        if m in plan.save and _saved_hash(_model_path(config, col, m)) != h:
          need.append('save')
        if m in plan.export and _exported_hash(_export_path(config, col, m)) != h:
          need.append('export')
        if col in plan.gguf and _gguf_hash(_gguf_path(config, col, m)) != h:
          need.append('gguf')
        if _writes_ct(plan, col) and _exported_hash(_ct_path(config, col, m)) != h:
          need.append('ct')
        if config.prompt and prev.get('sample_for') != sample_for:
          need.append('sample')
        if need:
          wants[m] = (recipe, h, need)
          logging.info(
            '[%s] %s: kept its metrics (same inputs: %s); recomputing its params to %s',
            col,
            m,
            _describe(inputs),
            ' and '.join(need),
          )
        else:
          logging.info(
            '[%s] %s: kept (results.json holds it with the same inputs: %s)',
            col,
            m,
            _describe(inputs),
          )
      else:
        logging.info('[%s] %s: computing (%s)', col, m, _why(prev, inputs))
        todo[m] = (recipe, h, inputs)
    fp_prev = done.get('fp')
    fp_kept = isinstance(fp_prev, dict) and fp_prev.get('hash') == fp_hash
    fp_sample = bool(config.prompt) and not (fp_kept and fp_prev.get('sample_for') == sample_for)
    if not todo and not wants and fp_kept and not fp_sample:
      continue

    candidates, rows = {}, {}
    for m in plan.methods:
      if m not in todo and m not in wants:
        continue
      recipe, h = (todo.get(m) or wants[m])[:2]
      kwargs = {}
      if isinstance(recipe.statistics, recipes.Calibration):
        kwargs['calib_tokens'] = calib[recipe.statistics][0]
      logging.info('[%s] quantizing with %s', col, m)
      qparams, report = quantize(
        model.params,
        model.config,
        recipe,
        jax.random.PRNGKey(config.seed),
        progress=config.progress,
        **kwargs,
      )
      qparams = jax.block_until_ready(qparams)
      candidates[m] = qparams
      if m in todo:
        rows[m] = {
          'hash': h,
          'inputs': todo[m][2],
          'quantize_seconds': report.timings.get('total', float('nan')),
          'proxy_rtn': report.total('rtn'),
          'proxy_final': report.total('final'),
          **storage(qparams),
        }
        logging.info('%s', report.summary())
      if m in todo or 'report' in wants[m][2]:
        atomic.write_json(_report_path(config, col, m), {**report.to_dict(), 'row_hash': h})

    new_rows: dict[str, dict] = {}
    patches: dict[str, tuple[str, dict]] = {}
    if todo or not fp_kept:
      logging.info('[%s] evaluating fp and %s', col, ', '.join(todo) or 'no other row')
      metrics = eval_lib.evaluate(
        apply_fn,
        model.params,
        tokens,
        {m: candidates[m] for m in todo},
        batch_size=config.eval_batch_size,
        progress=config.progress,
      )
      new_rows['fp'] = {**metrics['fp'], 'hash': fp_hash}
      for m in todo:
        new_rows[m] = {**metrics[m], **rows[m]}
    if config.prompt:

      def add_sample(name, params, h):
        fields = {'sample': sample_text(model, params, config), 'sample_for': sample_for}
        if name in new_rows:
          new_rows[name].update(fields)
        else:
          patches[name] = (h, fields)

      if 'fp' in new_rows or fp_sample:
        add_sample('fp', model.params, fp_hash)
      for m in candidates:
        if m in todo or 'sample' in wants[m][2]:
          add_sample(m, candidates[m], (todo.get(m) or wants[m])[1])
    with lock:  # metrics first: a failing save or export never costs the evaluation
      _commit(results_path, config, col, spec, new_rows, patches)
    logging.info('[%s] wrote %s', col, results_path)
    for m in candidates:
      recipe, h = (todo.get(m) or wants[m])[:2]
      need = ['save', 'export', 'gguf', 'ct'] if m in todo else wants[m][2]
      provenance = {'row_hash': h, 'recipe': recipe.to_dict(), 'model': config.model}
      if m in plan.save and 'save' in need:
        with lock:
          _save_model(config, model, col, m, candidates[m], recipe.to_dict(), h)
      if m in plan.export and 'export' in need:
        from cafeq_jax.loading import hf  # pylint: disable=g-import-not-at-top

        path = _export_path(config, col, m)
        with lock:
          hf.save_hf(
            candidates[m],
            model.config,
            path,
            provenance=provenance,
          )
        logging.info('exported %s', path)
      if col in plan.gguf and 'gguf' in need:
        from cafeq_jax.loading import gguf_writer  # pylint: disable=g-import-not-at-top

        path = _gguf_path(config, col, m)
        with lock:
          gguf_writer.save_gguf(
            candidates[m],
            model.config,
            path,
            source=gguf_source(config.model),
            tokenizer=gguf_tokenizer_dir(config.model),
            mix=col[len(GGUF_PREFIX) :],
            provenance=provenance,
          )
        logging.info('wrote %s (run it with llama.cpp: llama-cli -m %s)', path, path)
      if _writes_ct(plan, col) and 'ct' in need:
        from cafeq_jax.loading import compressed_tensors  # pylint: disable=g-import-not-at-top

        path = _ct_path(config, col, m)
        with lock:
          compressed_tensors.save_compressed_tensors(
            candidates[m],
            model.config,
            path,
            provenance=provenance,
          )
        logging.info('exported %s (compressed-tensors: vLLM / transformers)', path)
    del candidates

  with lock:
    results = _load_results(results_path, config)
    results['model'] = config.model
    results['total_seconds'] = time.perf_counter() - t0
    atomic.write_json(results_path, results)
    columns = [column_name(s) for s in plan.specs]
    columns += sorted(c for c in results['columns'] if c not in columns)
    others = sorted(
      {m for c in columns if c in results['columns'] for m in results['columns'][c]['methods']}
      - {'fp', *plan.methods}
    )
    table = format_table(results, [*plan.methods, *others], columns)
    atomic.write_text(os.path.join(config.output_dir, TABLE_FILE), table + '\n')
    if config.get('plots', True):
      try:
        from experiments import plots  # pylint: disable=g-import-not-at-top
      except ImportError:
        plots = None
      if plots is not None:
        plots.write_all(results, config.output_dir)
  return results


def _save_model(config, model, col, method, qparams, recipe_dict, row_hash=None):
  """Saves a row's quantized model (packed, bf16 scales) atomically with its provenance."""
  from cafeq_jax import checkpointing  # pylint: disable=g-import-not-at-top

  path = _model_path(config, col, method)
  checkpointing.save_quantized(
    path,
    qlinear.pack_params(qparams, scale_dtype=jnp.bfloat16),
    model_config=model.config,
    metadata={'recipe': recipe_dict, 'row_hash': row_hash, 'model': config.model},
    overwrite=True,
  )
  logging.info('saved %s', path)


def sample_text(model: LoadedModel, params, config) -> str:
  """Greedy continuation of ``config.prompt``."""
  prompt = jnp.asarray([model.encode(config.prompt)], jnp.int32)
  out = generate(
    params, model.config, prompt, max_new_tokens=config.max_new_tokens, eos_id=model.eos_id
  )
  return model.decode([int(t) for t in np.asarray(out)[0]])


def format_table(results: dict[str, Any], methods: list[str], columns: list[str]) -> str:
  """Markdown table: one row per method, ppl / KLD per column, and wall time."""
  cols = [c for c in columns if c in results['columns']]
  head = '| method | ' + ' | '.join(f'{c} ppl | {c} KLD' for c in cols) + ' | quantize s |'
  sep = '|---|' + '---:|---:|' * len(cols) + '---:|'
  lines = [head, sep]
  for m in ['fp', *methods]:
    cells, secs = [], []
    for c in cols:
      r = results['columns'][c]['methods'].get(m)
      if r is None:
        cells += ['', '']
        continue
      cells += [f'{r["ppl"]:.2f}', f'{r["kld"]:.4f}']
      if 'quantize_seconds' in r:
        secs.append(f'{r["quantize_seconds"]:.0f}')
    lines.append(f'| {m} | ' + ' | '.join(cells) + f' | {" / ".join(secs)} |')
  return '\n'.join(lines)
