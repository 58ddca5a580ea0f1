"""The main job: quantize a model with several methods and compare them.

For every column (a quantizer: bits, granularity, symmetry) each method (a row)
quantizes the same fp params; all rows are then evaluated on the same tokens
against the fp model (perplexity, KL divergence, top-1 agreement). Results go to
``output_dir``: ``results.json`` (written atomically after every column, so an
interrupted run resumes at the first unfinished column), ``table.md``, per-method
proxy-loss reports, plots, and the chosen quantized models (Orbax, packed codes)
or Hugging Face exports.
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
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cafeq_jax import atomic
from cafeq_jax import packing
from cafeq_jax import quantizer
from cafeq_jax import eval as eval_lib
from cafeq_jax.methods import QuantConfig, quantize
from cafeq_jax.models import PRESETS, ModelConfig, QuantizedLinear, init_params
from cafeq_jax.models import qlinear
from cafeq_jax.models.generate import generate

# Rows of the quality table: name -> QuantConfig fields (+ 'calib' for GPTQ).
VARIANTS: dict[str, dict[str, Any]] = {
    'rtn': dict(method='rtn'),
    'hadamard': dict(method='hadamard', block_size=64),
    'cafeq-single': dict(method='cafeq', use_single_transforms=True, use_pairs=False),
    'cafeq-pairs': dict(method='cafeq', use_single_transforms=False, use_pairs=True),
    'cafeq-pairs-ar': dict(method='cafeq', use_single_transforms=False, use_pairs=True,
                           adaptive_rounding=True),
    # The data-free proxy with self-generated statistics: fixed Hadamard online
    # transforms (one per param leaf), every matrix rounded (GPTQ form, act order)
    # under the Σ of sequences the model samples itself; reads no text.
    'cafeq-sg': dict(method='cafeq', use_single_transforms=True, single_transform='hadamard',
                     share_transforms=True, use_pairs=False, rounding='gptq',
                     statistics='selfgen', gptq_act_order=True),
    # Ablation of cafeq-sg: the same rounding without the online transforms.
    'cafeq-sg-rounding': dict(method='cafeq', use_single_transforms=False, use_pairs=False,
                              rounding='gptq', statistics='selfgen', gptq_act_order=True),
    # Everything: folded pair transforms, then as cafeq-sg.
    'cafeq': dict(method='cafeq', use_single_transforms=True, single_transform='hadamard',
                  share_transforms=True, use_pairs=True, rounding='gptq',
                  statistics='selfgen', gptq_act_order=True),
    'gptq': dict(method='gptq', calib='in-domain'),
    'gptq-offdomain': dict(method='gptq', calib='code'),
    # GPTQ fed with sequences the model samples itself: reads no text (data-free).
    'gptq-selfgen': dict(method='gptq', calib='selfgen'),
}

# Standard-library modules whose source is the off-domain calibration text (code,
# where the evaluation text is English prose).
_CODE_MODULES = ('argparse', 'textwrap', 'functools', 'collections', 'json.decoder',
                 'json.encoder', 'string', 'dataclasses', 'inspect', 'typing')

_COLUMN = re.compile(r'^w(\d)(pc|g\d+)(sym|asym)?$')


def parse_column(name: str, clip_search: bool = False) -> quantizer.QuantSpec:
  """'w3g128' / 'w4pcsym' / 'w3g64asym' -> ``QuantSpec`` (asymmetric by default)."""
  m = _COLUMN.match(name.strip())
  if not m:
    raise ValueError(f'column {name!r} is not of the form w<bits><pc|g<size>>[sym|asym], '
                     f"e.g. 'w3g128' or 'w4pcsym'.")
  bits, gran, sym = m.groups()
  group = None if gran == 'pc' else int(gran[1:])
  # group_fallback: a matrix whose d_in is not a multiple of the group size (576 in
  # SmolLM2 under g128) uses the largest supported group size dividing it.
  return quantizer.QuantSpec(bits=int(bits), group_size=group, symmetric=sym == 'sym',
                             clip_search=clip_search, group_fallback=True)


def column_name(spec: quantizer.QuantSpec) -> str:
  return spec.name


def split_names(s: str) -> list[str]:
  return [x.strip() for x in s.split(',') if x.strip()]


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
    from cafeq_jax.loading import gguf, tokenizer  # pylint: disable=g-import-not-at-top
    path = None if name == 'smollm2_135m' else name
    params, cfg = gguf.load_gguf(path)
    tok = tokenizer.load_gguf_tokenizer(path)
    return LoadedModel(name, params, cfg, lambda t: tok.encode(t, add_bos=False),
                       tok.decode, tok.eos_id)
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
  raise ValueError(f'model {name!r} is neither smollm2_135m, a .gguf file, a Hugging '
                   f'Face model dir, nor a preset ({sorted(PRESETS)}).')


def _byte_codec(name, params, cfg) -> LoadedModel:
  """Bytes as token ids (mod vocab): enough text handling for random test models."""
  v = cfg.vocab_size
  return LoadedModel(name, params, cfg, lambda t: [b % v for b in t.encode()],
                     lambda ids: bytes(int(i) % 256 for i in ids).decode(errors='replace'))


def code_text() -> str:
  """Off-domain calibration text: Python standard-library source code."""
  return '\n\n'.join(inspect.getsource(importlib.import_module(m)) for m in _CODE_MODULES)


def calibration_tokens(kind: str, model: LoadedModel, config) -> np.ndarray:
  """GPTQ calibration windows: 'in-domain' (eval text, disjoint windows), 'code', a file."""
  n, t = config.calib_num_seqs, config.calib_seq_len
  if kind == 'selfgen':
    from cafeq_jax.methods import stats_adapter  # pylint: disable=g-import-not-at-top
    return np.asarray(stats_adapter.selfgen_tokens(
        model.params, model.config, num_seqs=config.selfgen_num_seqs,
        seq_len=config.selfgen_seq_len, key=jax.random.PRNGKey(config.seed)))
  if kind == 'in-domain':
    text = eval_lib.load_text(config.eval_text or None)
    ids = np.asarray(model.encode(text))
    # The evaluation windows start each of eval_num_seqs equal chunks; calibration
    # windows are taken from the rest of those chunks, so they never overlap.
    stride = ids.size // config.eval_num_seqs
    rest = np.concatenate([ids[i * stride + config.eval_seq_len:(i + 1) * stride]
                           for i in range(config.eval_num_seqs)])
    return eval_lib.make_windows(rest, n, t)
  text = code_text() if kind == 'code' else eval_lib.load_text(kind)
  return eval_lib.make_windows(model.encode(text), n, t)


def quant_config_for(variant: str, spec: quantizer.QuantSpec, config) -> tuple[QuantConfig, str | None]:
  """The ``QuantConfig`` of a table row (and its calibration kind, for GPTQ)."""
  if variant not in VARIANTS:
    raise ValueError(f'method {variant!r} is unknown; expected some of {sorted(VARIANTS)}.')
  fields = dict(VARIANTS[variant])
  calib = fields.pop('calib', None)
  if fields['method'] == 'cafeq':
    fields.update(config.cafeq.to_dict())
    if fields.get('statistics') == 'selfgen':
      fields.update(selfgen_num_seqs=config.selfgen_num_seqs,
                    selfgen_seq_len=config.selfgen_seq_len)
  return QuantConfig(spec=spec, seed=config.seed, progress=config.progress, **fields), calib


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
    if isinstance(leaf, QuantizedLinear):
      p = qlinear.pack_weight(leaf.weight, scale_dtype=jnp.bfloat16)
      packed += packing.nbytes(p)
      if leaf.transform_inv is not None:
        packed += transform_nbytes(leaf.transform_inv)
      bf16 += packing.bf16_nbytes(p.shape)
      n += int(np.prod(p.shape))
  return {'linear_bytes': packed, 'linear_bf16_bytes': bf16,
          'bits_per_weight': 8 * packed / max(n, 1)}


def _row_hash(config, qcfg: QuantConfig, calib: str | None) -> str:
  """Identity of one table cell's inputs: model, evaluation tokens, method config."""
  keep = {k: config[k] for k in ('model', 'eval_text', 'eval_num_seqs', 'eval_seq_len')}
  d = qcfg.to_dict()
  # Baselines read a few fields; a change of the other defaults must not redo them.
  relevant = {'rtn': ('method', 'spec', 'matrices'),
              'hadamard': ('method', 'spec', 'matrices', 'block_size', 'seed'),
              'gptq': ('method', 'spec', 'matrices', 'gptq_damp')}.get(d['method'])
  keep['quant_config'] = {k: v for k, v in d.items()
                          if k != 'progress' and (relevant is None or k in relevant)}
  if calib is not None:
    keep['calib'] = [calib, config.calib_num_seqs, config.calib_seq_len,
                     config.selfgen_num_seqs, config.selfgen_seq_len]
  return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Runs the job described by ``config`` (see experiments/configs/quantize.py).

  Cells (column, method) already in ``output_dir/results.json`` with the same
  inputs (model, evaluation tokens, method config) are kept, not recomputed, so a
  killed run resumes and a new method can be added to an existing table.
  """
  methods, columns = split_names(config.methods), split_names(config.columns)
  if not methods or not columns:
    raise ValueError(f'config.methods={config.methods!r} and config.columns='
                     f'{config.columns!r} must each name at least one entry.')
  specs = [parse_column(c, config.clip_search) for c in columns]
  for m in methods:
    quant_config_for(m, specs[0], config)   # fail fast on bad names/overrides
  os.makedirs(config.output_dir, exist_ok=True)

  t0 = time.perf_counter()
  model = load_model(config.model, config.seed)
  logging.info('loaded %s in %.1fs', config.model, time.perf_counter() - t0)
  text = eval_lib.load_text(config.eval_text or None)
  tokens = eval_lib.make_windows(model.encode(text), config.eval_num_seqs, config.eval_seq_len)
  apply_fn = eval_lib.model_apply_fn(model.config)

  results_path = os.path.join(config.output_dir, 'results.json')
  results = {'model': config.model, 'columns': {}}
  if os.path.exists(results_path):
    with open(results_path) as f:
      results = json.load(f)

  calib_cache: dict[str, np.ndarray] = {}
  save, export = set(split_names(config.save_models)), set(split_names(config.export_hf))
  for spec in specs:
    col = column_name(spec)
    done = results['columns'].setdefault(col, {'spec': dataclasses.asdict(spec), 'methods': {}})
    todo = {}
    for m in methods:
      qcfg, calib = quant_config_for(m, spec, config)
      h = _row_hash(config, qcfg, calib)
      if done['methods'].get(m, {}).get('hash') == h:
        logging.info('[%s] %s already done; keeping its result', col, m)
      else:
        todo[m] = (qcfg, calib, h)
    if not todo:
      continue
    candidates, rows = {}, {}
    for m, (qcfg, calib, h) in todo.items():
      kwargs = {}
      if calib is not None:
        if calib not in calib_cache:
          calib_cache[calib] = calibration_tokens(calib, model, config)
        kwargs['calib_tokens'] = calib_cache[calib]
      logging.info('[%s] quantizing with %s', col, m)
      qparams, report = quantize(model.params, model.config, qcfg,
                                 jax.random.PRNGKey(config.seed), **kwargs)
      qparams = jax.block_until_ready(qparams)
      candidates[m] = qparams
      rows[m] = {'hash': h, 'quantize_seconds': report.timings.get('total', float('nan')),
                 'proxy_rtn': report.total('rtn'), 'proxy_final': report.total('final'),
                 **storage(qparams)}
      atomic.write_json(os.path.join(config.output_dir, 'reports', f'{col}_{m}.json'),
                        report.to_dict())
      logging.info('%s', report.summary())
    metrics = eval_lib.evaluate(apply_fn, model.params, tokens, candidates,
                                batch_size=config.eval_batch_size, progress=config.progress)
    for name, r in metrics.items():
      done['methods'][name] = {**r, **rows.get(name, {})}
      if config.prompt and (name in candidates or 'sample' not in done['methods'][name]):
        done['methods'][name]['sample'] = sample_text(
            model, candidates.get(name, model.params), config)
    for m in candidates:
      if m in save:
        _save_model(config, model, col, m, candidates[m], todo[m][0].to_dict())
      if m in export:
        from cafeq_jax.loading import hf  # pylint: disable=g-import-not-at-top
        hf.save_hf(candidates[m], model.config,
                   os.path.join(config.output_dir, 'hf', f'{col}_{m}'))
    atomic.write_json(results_path, results)
    del candidates
  results['total_seconds'] = time.perf_counter() - t0
  atomic.write_json(results_path, results)
  table = format_table(results, methods, [column_name(s) for s in specs])
  atomic.write_text(os.path.join(config.output_dir, 'table.md'), table + '\n')
  try:
    from experiments import plots  # pylint: disable=g-import-not-at-top
  except ImportError:
    plots = None
  if plots is not None:
    plots.write_all(results, config.output_dir)
  return results


def _save_model(config, model, col, method, qparams, qcfg_dict):
  from cafeq_jax import checkpointing  # pylint: disable=g-import-not-at-top
  path = os.path.join(config.output_dir, 'models', f'{col}_{method}')
  checkpointing.save_quantized(path, qlinear.pack_params(qparams, scale_dtype=jnp.bfloat16),
                               model_config=model.config,
                               metadata={'quant_config': qcfg_dict}, overwrite=True)
  logging.info('saved %s', path)


def sample_text(model: LoadedModel, params, config) -> str:
  """Greedy continuation of ``config.prompt``."""
  prompt = jnp.asarray([model.encode(config.prompt)], jnp.int32)
  out = generate(params, model.config, prompt,
                              max_new_tokens=config.max_new_tokens, eos_id=model.eos_id)
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
