"""Ablation of the learned single-matrix transform on the paper's Frobenius proxy.

For every row of ``--config.variants`` (``experiments/configs/transform_study.py``:
parameterisation, steps, learning rate, column subsets, block size, STE), quantizes
the model with ``cafeq-single`` under that transform and records

  * the proxy ``||W - M⁻¹ Q(M W)||²`` after / RTN's, summed over layers, per matrix
    type (``q k v o gate up down``) and in total: how far the optimiser got on its
    own objective;
  * the conditioning of the learned blocks (max and 99th percentile of
    ``cond(M_b)``) and the bf16 error of the online ``x M⁻¹``: max over matrices of
    ``||bf16(x) bf16(M⁻¹) - x M⁻¹|| / ||x M⁻¹||`` on Gaussian ``x``;
  * the quantize wall time;
  * perplexity / KLD against fp on every evaluation text;
  * with ``--config.export_check``: the perplexity of the row's HF export
    (``hf.save_hf``, what the main job's ``--config.export_hf`` writes) read back by
    transformers on the same windows (``experiments.hf_readback``), and the largest
    logit difference between that independent forward and ours.

python -m experiments.transform_study  (writes output_dir/results.json and table.md)

A finished row whose inputs (variant fields, quantizer, seed, texts, windows) are
unchanged is kept, so an interrupted study resumes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

import cafeq_jax
from cafeq_jax import atomic
from cafeq_jax import eval as eval_lib
from cafeq_jax import quantizer
from cafeq_jax import recipes
from cafeq_jax.core import transforms
from cafeq_jax.eval import data as eval_data
from cafeq_jax.loading import hf
from cafeq_jax.models import QuantizedLinear
from experiments import cli
from experiments import hf_readback
from experiments import quantize_lib
from experiments.configs import transform_study as study_config

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), 'configs', 'transform_study.py')
MATRICES = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')


def split_row(row: str) -> tuple[str, int | None]:
  """``'<variant>@<seed>'`` -> ``(variant, seed)``; a plain name -> ``(name, None)``."""
  name, at, seed = row.partition('@')
  if at and not seed.isdigit():
    raise ValueError(f'row {row!r}: expected <variant>@<seed> with an int seed.')
  return name, (int(seed) if at else None)


def recipe_for(variant: str, spec) -> recipes.Recipe:
  """``rtn``, ``cafeq-single`` with the variant's fields of the study's ``BASE``, a
  whole recipe of ``RECIPES``, or else a preset of ``recipes.PRESETS``, under the
  quantizer ``spec``."""
  variant, _ = split_row(variant)
  if variant in study_config.RECIPES:
    return study_config.RECIPES[variant].replace(name=variant, spec=spec)
  if variant not in study_config.VARIANTS:
    if variant in recipes.PRESETS:
      return recipes.get(variant, spec=spec)
    known = list(study_config.VARIANTS) + list(study_config.RECIPES) + list(recipes.PRESETS)
    raise ValueError(f'variant {variant!r} is unknown; expected one of {known}.')
  fields = study_config.VARIANTS[variant]
  if fields is None:
    return recipes.get('rtn', spec=spec)
  fields = dict(fields)
  rounding = {'rtn': recipes.RTN(), 'gptq': recipes.GPTQ()}[fields.pop('rounding', 'rtn')]
  preset = recipes.get('cafeq-single', spec=spec)
  cfg = dataclasses.replace(study_config.BASE, **fields)
  return preset.replace(name=variant, transform=recipes.Learned(config=cfg), rounding=rounding)


def transform_health(qparams, key: jax.Array) -> dict[str, float]:
  """Conditioning of the learned ``M⁻¹`` blocks and the bf16 error of ``x M⁻¹``."""
  conds, errs = [], []
  leaves = jax.tree.leaves(qparams, is_leaf=lambda x: isinstance(x, QuantizedLinear))
  for i, leaf in enumerate(leaves):
    if not isinstance(leaf, QuantizedLinear) or leaf.transform_inv is None:
      continue
    inv = jnp.asarray(leaf.transform_inv, jnp.float32)
    inv = inv.reshape(-1, *inv.shape[-3:])  # (L, nb, k, k)
    conds.append(np.asarray(transforms.condition_numbers(inv)).ravel())
    d_in = inv.shape[-3] * inv.shape[-1]
    x = jax.random.normal(jax.random.fold_in(key, i), (16, d_in), jnp.float32)
    for m in inv:
      ref = transforms.apply_to_activations(x, m)
      low = transforms.apply_to_activations(x.astype(jnp.bfloat16), m.astype(jnp.bfloat16))
      err = jnp.linalg.norm(low.astype(jnp.float32) - ref) / jnp.linalg.norm(ref)
      errs.append(float(err))
  if not conds:
    return {}
  c = np.concatenate(conds)
  return {
    'cond_max': float(c.max()),
    'cond_p99': float(np.percentile(c, 99)),
    'bf16_rel_err_max': float(max(errs)),
  }


def rows_of(config) -> list[str]:
  """The study's rows: every variant, then ``<variant>@<seed>`` for each extra seed."""
  variants = cli.split_names(config.variants)
  seeds = [int(s) for s in cli.split_names(config.seeds)] if config.seeds else []
  if config.seed in seeds:
    raise ValueError(f'config.seeds={config.seeds!r} repeats config.seed={config.seed}.')
  return variants + [f'{v}@{s}' for s in seeds for v in variants if v != 'rtn']


def run(config) -> dict:
  variants = rows_of(config)
  spec = quantize_lib.parse_column(config.column)
  if not isinstance(spec, quantizer.QuantSpec):
    raise ValueError(f'config.column={config.column!r}: the study takes a uniform column.')
  for v in variants:  # every row checked before the model loads
    recipe_for(v, spec)
  texts = {t: eval_data.load_named_text(t) for t in cli.split_names(config.texts)}
  out = config.output_dir
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, 'results.json')
  results = {'rows': {}}
  if os.path.exists(path):
    with open(path) as f:
      results = json.load(f)
  model = quantize_lib.load_model(config.model, config.seed)
  windows = {
    t: eval_lib.make_windows(model.encode(x), config.eval_num_seqs, config.eval_seq_len)
    for t, x in texts.items()
  }
  apply_fn = eval_lib.model_apply_fn(model.config)
  inputs = {
    'model': config.model,
    'weights': quantize_lib.weights_fingerprint(model.params, model.config),
    'column': config.column,
    'seed': config.seed,
    'windows': {t: quantize_lib.tokens_fingerprint(w) for t, w in windows.items()},
  }
  if config.export_check:  # rows checked without it lack the read-back figures
    inputs['export_check'] = True
  if config.matrix:
    return _proxy_only(config, model, spec, variants, results, path, inputs)
  if 'fp' not in results or results['fp'].get('hash') != quantize_lib.content_hash(inputs):
    fp = {}
    for t, toks in windows.items():
      m = eval_lib.evaluate(apply_fn, model.params, toks, {}, batch_size=config.eval_batch_size)
      fp[f'ppl_{t}'] = m['fp']['ppl']
    if config.export_check:
      fp.update(_export_check(config, model, model.params, windows, apply_fn))
    results['fp'] = {'hash': quantize_lib.content_hash(inputs), **fp}
  for v in variants:
    recipe = recipe_for(v, spec)
    seed = split_row(v)[1]
    seed = config.seed if seed is None else seed
    h = quantize_lib.content_hash({**inputs, 'seed': seed, 'recipe': recipe.to_dict()})
    if results['rows'].get(v, {}).get('hash') == h:
      logging.info('%s: kept (same inputs)', v)
      continue
    t0 = time.perf_counter()
    qparams, report = cafeq_jax.quantize(
      model.params, model.config, recipe, jax.random.PRNGKey(seed)
    )
    qparams = jax.block_until_ready(qparams)
    seconds = time.perf_counter() - t0
    logging.info('%s\n%s', v, report.summary())
    by_name = report.by_name()
    row = {
      'hash': h,
      'fields': study_config.VARIANTS.get(split_row(v)[0]),
      'seed': seed,
      'quantize_seconds': seconds,
      'timings': dict(report.timings),
      'proxy_ratio': {n: by_name[n]['final'] / by_name[n]['rtn'] for n in MATRICES if n in by_name},
      'proxy_ratio_total': report.total('final') / report.total('rtn'),
      **transform_health(qparams, jax.random.PRNGKey(seed)),
    }
    if 'sequential' in report.extra:  # the objective of the self-generated recipes
      seq = report.extra['sequential']
      row['layer_loss_ratio'] = sum(map(sum, seq['layer_loss'].values())) / sum(
        map(sum, seq['rtn_layer_loss'].values())
      )
    for t, toks in windows.items():
      m = eval_lib.evaluate(
        apply_fn, model.params, toks, {v: qparams}, batch_size=config.eval_batch_size
      )
      row[f'ppl_{t}'], row[f'kld_{t}'], row[f'top1_{t}'] = (m[v][k] for k in ('ppl', 'kld', 'top1'))
    if config.export_check:
      row.update(_export_check(config, model, qparams, windows, apply_fn))
    results['rows'][v] = row
    atomic.write_json(path, results)
    logging.info('%s: %s', v, row)
  table = format_table(results, variants, list(texts))
  atomic.write_text(os.path.join(out, 'table.md'), table)
  print(table)
  return results


def _export_check(config, model, params, windows, apply_fn) -> dict[str, float]:
  """``params`` exported with ``hf.save_hf`` (to a temporary directory beside the
  results) and read back by transformers: ``ppl_hf_<text>`` on every text's windows,
  and ``hf_logit_diff_max``, the largest ``|logit|`` difference from our forward on
  each text's first window."""
  out, diff = {}, 0.0
  with tempfile.TemporaryDirectory(dir=config.output_dir, prefix='.hf_check_') as tmp:
    path = hf.save_hf(params, model.config, os.path.join(tmp, 'hf'))
    theirs = hf_readback.readback(path, windows, batch_size=config.eval_batch_size)
  for t, toks in windows.items():
    ours = np.asarray(apply_fn(params, jnp.asarray(toks[:1], jnp.int32)))[0]
    out[f'ppl_hf_{t}'] = theirs[t]['ppl']
    diff = max(diff, float(np.abs(ours - theirs[t]['first_logits']).max()))
  out['hf_logit_diff_max'] = diff
  return out


def _proxy_only(config, model, spec, variants, results, path, inputs) -> dict:
  """``--config.matrix``: each variant's transform optimised on that matrix of every
  layer only (``core.optimize.run`` on the ``(L, d_in, d_out)`` stack); proxy and time."""
  from cafeq_jax.core import optimize  # pylint: disable=g-import-not-at-top
  from cafeq_jax.models import linears  # pylint: disable=g-import-not-at-top

  if config.matrix not in MATRICES:
    raise ValueError(f'config.matrix={config.matrix!r}; expected one of {MATRICES}.')
  w = jnp.asarray(linears.get_linears(model.params, model.config)[config.matrix], jnp.float32)
  rows = results.setdefault('proxy_only', {}).setdefault(config.matrix, {})
  for v in variants:
    recipe = recipe_for(v, spec)
    if recipe.transform is None:
      continue
    h = quantize_lib.content_hash({**inputs, 'recipe': recipe.to_dict(), 'matrix': config.matrix})
    if rows.get(v, {}).get('hash') == h:
      continue
    t0 = time.perf_counter()
    _, state = optimize.run(w, spec, recipe.transform.config, jax.random.PRNGKey(config.seed))
    ratio = float(state.best_loss.sum() / state.rtn_loss.sum())
    rows[v] = {'hash': h, 'proxy_ratio': ratio, 'seconds': time.perf_counter() - t0}
    atomic.write_json(path, results)
    logging.info('%s %s: proxy / RTN %.4f', config.matrix, v, ratio)
  lines = [f'| variant | {config.matrix}: proxy / RTN | seconds |', '|---|---:|---:|']
  lines += [f'| {v} | {r["proxy_ratio"]:.3f} | {r["seconds"]:.0f} |' for v, r in rows.items()]
  print('\n'.join(lines))
  return results


def _mean_std(xs: list[float], fmt: str) -> str:
  if len(xs) == 1:
    return format(xs[0], fmt)
  return f'{format(np.mean(xs), fmt)} ± {format(np.std(xs, ddof=1), fmt)}'


def format_table(results: dict, variants: list[str], texts: list[str]) -> str:
  """Markdown: per variant, proxy after / RTN per matrix type and in total, the
  self-generated layer loss over RTN's (sequential recipes), conditioning, bf16
  error of ``x M⁻¹``, quantize seconds, ppl on each text. A variant run with
  several seeds (``<variant>@<seed>`` rows) shows mean ± std (n-1) over them,
  and ``n`` the number of seeds."""
  head = ['variant', 'n'] + list(MATRICES) + ['total', 'sg loss', 'cond max', 'bf16 err']
  head += ['quantize s'] + [f'ppl {t}' for t in texts]
  fp = results['fp']
  hf_cols = all(f'ppl_hf_{t}' in fp for t in texts)  # --config.export_check
  if hf_cols:
    head += [f'ppl {t} (HF export)' for t in texts] + ['max Δlogit']
  lines = ['| ' + ' | '.join(head) + ' |', '|---|' + '---:|' * (len(head) - 1)]
  fp_cells = [f'{fp[f"ppl_{t}"]:.2f}' for t in texts]
  if hf_cols:
    fp_cells += [f'{fp[f"ppl_hf_{t}"]:.2f}' for t in texts] + [f'{fp["hf_logit_diff_max"]:.1e}']
  lines.append('| fp |' + ' |' * (len(MATRICES) + 6) + ''.join(f' {c} |' for c in fp_cells))
  groups: dict[str, list[dict]] = {}
  for v in variants:
    if v in results['rows']:
      groups.setdefault(split_row(v)[0], []).append(results['rows'][v])
  for v, rs in groups.items():
    r = rs[0]
    ratios = [
      _mean_std([x['proxy_ratio'].get(n, float('nan')) for x in rs], '.3f') for n in MATRICES
    ]
    cells = [v, str(len(rs)), *ratios, _mean_std([x['proxy_ratio_total'] for x in rs], '.3f')]
    cells += [
      _mean_std([x['layer_loss_ratio'] for x in rs], '.3f') if 'layer_loss_ratio' in r else '-'
    ]
    cells += [f'{max(x["cond_max"] for x in rs):.1f}' if 'cond_max' in r else '-']
    cells += [f'{max(x["bf16_rel_err_max"] for x in rs):.4f}' if 'bf16_rel_err_max' in r else '-']
    cells += [_mean_std([x['quantize_seconds'] for x in rs], '.0f')]
    cells += [_mean_std([x[f'ppl_{t}'] for x in rs], '.2f') for t in texts]
    if hf_cols:
      cells += [_mean_std([x[f'ppl_hf_{t}'] for x in rs], '.2f') for t in texts]
      cells += [f'{max(x["hf_logit_diff_max"] for x in rs):.1e}']
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


if __name__ == '__main__':
  cli.launch(run, _DEFAULT_CONFIG)
