r"""How far the input-weighted learned transform gets on its own objective.

``Learned(loss='input')`` (the ``sg-learned-input`` row of the self-generated study,
issue 13 item 4) minimises, per transform unit, ``Σ_t tr(E_tᵀ Σ_bd E_t)`` with
``E_t = W_t - M⁻¹ Q(M W_t)`` and ``Σ_bd`` the ``k x k`` diagonal blocks of the unit's
input second moment on the tokens the model samples itself (k and v, gate and up
share one transform: they read one input). Before saying that this stage loses, this
checks that its optimiser reaches what the loss allows. For the units of
``--config.layers`` every row records that loss over RTN's (``M = I``), per matrix
type (summed over layers) and in total, and the Frobenius proxy ``Σ_t ||E_t||²`` over
RTN's, all evaluated the same way (numpy float64 from the learned blocks, the
library's quantizer):

  frobenius          the transform learned on the Frobenius proxy (``sg-learned``'s),
                     scored on the weighted loss
  input              the library's optimiser of the weighted loss as the recipe runs
                     it (``sg-learned-input``: 150 steps, 256 random columns per step)
  input-all-<N>      the same optimiser, every column every step, N steps
  reference-<N>      a plain optimiser written here: dense blocks from the identity,
                     Adam at peak 2e-2 with cosine decay over N steps, every column
                     every step, autodiff through ``jnp.linalg.inv`` and through the
                     straight-through rounding (scales differentiable); last iterate

    python -m experiments.weighted_objective     # writes output_dir/results.json, table.md

Σ is measured as the recipe measures it (``sequential.input_moment_blocks`` on
``selfgen.sample_tokens`` under the recipe's key). A finished row whose inputs
(model, quantizer, seed, layers, sample) are unchanged is kept, so an interrupted run
resumes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cafeq_jax import atomic
from cafeq_jax import quantizer
from cafeq_jax import recipes
from cafeq_jax.methods import selfgen
from cafeq_jax.methods import sequential
from cafeq_jax.methods import single
from cafeq_jax.models import linears
from experiments import cli
from experiments import quantize_lib
from experiments.configs import transform_study as study_config

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), 'configs', 'weighted_objective.py')
_ROW = re.compile(r'^(frobenius|input)$|^(input-all|reference)-([1-9][0-9]*)$')
_REFERENCE_LR = 2e-2


def parse_rows(s) -> list[str]:
  rows = cli.split_names(s)
  if not rows:
    raise ValueError('config.rows is empty.')
  for r in rows:
    if not _ROW.match(r):
      raise ValueError(
        f'config.rows item {r!r}: expected frobenius, input, input-all-<steps> or '
        'reference-<steps>.'
      )
  if len(set(rows)) != len(rows):
    raise ValueError(f'config.rows={s!r} repeats a row.')
  return rows


def parse_layers(s, num_layers: int | None = None) -> list[int] | None:
  """``'all'`` -> every layer (None before the model is known); else the indices."""
  if str(s).strip() == 'all':
    return None if num_layers is None else list(range(num_layers))
  layers = cli.split_ints(s, 'layers')
  if not layers or len(set(layers)) != len(layers) or min(layers) < 0:
    raise ValueError(f'config.layers={s!r} must be distinct layer indices >= 0, or all.')
  if num_layers is not None and max(layers) >= num_layers:
    raise ValueError(f'config.layers={s!r}: the model has {num_layers} layers.')
  return sorted(layers)


def learned_stage(row: str) -> recipes.Learned:
  """The library's transform stage of a ``frobenius`` / ``input`` / ``input-all-N`` row."""
  if row == 'frobenius':
    return study_config.RECIPES['sg-learned'].transform
  stage = study_config.RECIPES['sg-learned-input'].transform
  if row == 'input':
    return stage
  steps = int(row.rsplit('-', 1)[1])
  cfg = dataclasses.replace(stage.config, columns_per_step=None, steps=steps)
  return dataclasses.replace(stage, config=cfg)


# --------------------------------------------------------------------------------
# The reference optimiser (written here on purpose: it shares no code with
# core.optimize, so agreeing with it is evidence, not a tautology).


def _reference_quant(v: jax.Array, spec: quantizer.QuantSpec) -> jax.Array:
  """Uniform quantize-dequantize of ``v`` ``(..., d_in, d_out)`` per group of rows,
  straight-through on the rounding only (the scale and zero stay differentiable)."""
  *lead, d_in, d_out = v.shape
  g = spec.effective_group_size(d_in)
  vg = v.reshape(*lead, d_in // g, g, d_out)
  lo, hi = vg.min(axis=-2, keepdims=True), vg.max(axis=-2, keepdims=True)
  tiny = jnp.finfo(jnp.float32).tiny
  if spec.symmetric:
    s = jnp.maximum(jnp.maximum(-lo, hi) / spec.qmax, tiny)
    z = 0.0
  else:
    lo, hi = jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)
    s = jnp.maximum((hi - lo) / (spec.qmax - spec.qmin), tiny)
    z = jax.lax.stop_gradient(jnp.clip(jnp.round(-lo / s), spec.qmin, spec.qmax))
  u = vg / s
  u = u + jax.lax.stop_gradient(jnp.round(u) - u)
  return ((jnp.clip(u + z, spec.qmin, spec.qmax) - z) * s).reshape(v.shape)


def reference_blocks(
  w: jax.Array, sigma: jax.Array, spec: quantizer.QuantSpec, steps: int
) -> np.ndarray:
  """Plain minimisation of ``Σ_t tr(E_tᵀ Σ_bd E_t)`` for every unit of a stack.

  Args:
    w: ``(U, T, d_in, d_out)`` float32, the ``T`` matrices of each unit.
    sigma: ``(U, nb, k, k)`` diagonal blocks of each unit's input second moment.
    spec: a plain uniform quantizer (no clip search, no GGML grid).
    steps: Adam steps.

  Returns:
    ``(U, nb, k, k)`` float32 blocks ``M`` of the last iterate.
  """
  U, T, d_in, d_out = w.shape
  nb, k = sigma.shape[1], sigma.shape[-1]
  split = lambda x: x.reshape(U, T, nb, k, d_out)

  def per_unit(m):
    v = jnp.einsum('unij,utnjo->utnio', m, split(w)).reshape(w.shape)
    e = jnp.einsum('unij,utnjo->utnio', jnp.linalg.inv(m), split(_reference_quant(v, spec) - v))
    return jnp.einsum('utnio,unij,utnjo->u', e, sigma, e)

  m0 = jnp.broadcast_to(jnp.eye(k, dtype=jnp.float32), (U, nb, k, k))
  scale = per_unit(m0)  # RTN's loss: every unit's term starts at 1
  opt = optax.adam(optax.cosine_decay_schedule(_REFERENCE_LR, steps))

  @jax.jit
  def step(m, state):
    grad = jax.grad(lambda m: jnp.sum(per_unit(m) / scale))(m)
    updates, state = opt.update(grad, state, m)
    return optax.apply_updates(m, updates), state

  m, state = m0, opt.init(m0)
  for _ in range(steps):
    m, state = step(m, state)
  return np.asarray(m)


# --------------------------------------------------------------------------------
# The evaluation, the same for every row.


def unit_losses(
  w: np.ndarray, sigma: np.ndarray | jax.Array, m: np.ndarray | None, spec: quantizer.QuantSpec
) -> tuple[float, float]:
  """``(Σ_t tr(E_tᵀ Σ_bd E_t), Σ_t ||E_t||²)`` of one unit, in float64.

  Args:
    w: ``(T, d_in, d_out)``; sigma: ``(nb, k, k)``; m: ``(nb, k, k)`` blocks of ``M``
      (None: the identity, plain RTN).
  """
  w = np.asarray(w, np.float64)
  T, d_in, d_out = w.shape
  nb, k = sigma.shape[0], sigma.shape[-1]
  wb = w.reshape(T, nb, k, d_out)
  if m is None:
    v, m_inv = w, None
  else:
    m = np.asarray(m, np.float64)
    v = np.einsum('nij,tnjo->tnio', m, wb).reshape(w.shape)
    m_inv = np.linalg.inv(m)
  q = np.asarray(quantizer.quant_dequant(jnp.asarray(v, jnp.float32), spec), np.float64)
  q = q.reshape(T, nb, k, d_out)
  e = wb - (q if m_inv is None else np.einsum('nij,tnjo->tnio', m_inv, q))
  weighted = np.einsum('tnio,nij,tnjo->', e, np.asarray(sigma, np.float64), e)
  return float(weighted), float(np.sum(e * e))


def row_result(units, mats, sigma, blocks, spec, rtn) -> dict:
  """Ratios over RTN's per unit type (summed over layers) and in total."""
  sums: dict[str, np.ndarray] = {}  # type -> (weighted, RTN's, Frobenius, RTN's)
  for names, layer in units:
    w = np.stack([np.asarray(mats[n][layer]) for n in names])
    weighted, frob = unit_losses(w, sigma[(layer, names[0])], blocks[(names, layer)], spec)
    r_weighted, r_frob = rtn[(names, layer)]
    t = '+'.join(names)
    sums[t] = sums.get(t, 0.0) + np.array([weighted, r_weighted, frob, r_frob])
  total = np.sum(list(sums.values()), axis=0)
  return {
    'weighted_ratio': {t: a[0] / a[1] for t, a in sums.items()},
    'weighted_ratio_total': float(total[0] / total[1]),
    'proxy_ratio_total': float(total[2] / total[3]),
  }


# --------------------------------------------------------------------------------
# The run.


def _load(path: str) -> dict:
  """The results of an earlier run, ``{}`` when absent; a corrupt file is moved aside."""
  if not os.path.exists(path):
    return {}
  try:
    with open(path, encoding='utf-8') as f:
      data = json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    atomic.move_aside(path, f'is not valid JSON ({e})')
    return {}
  if not isinstance(data, dict) or not isinstance(data.get('rows', {}), dict):
    atomic.move_aside(path, 'is not a results file of this experiment')
    return {}
  return data


def _inputs(config, spec, layers, stats, model) -> dict:
  return {
    'model': config.model,
    'weights': quantize_lib.weights_fingerprint(model.params, model.config),
    'spec': repr(spec),
    'seed': int(config.seed),
    'layers': layers,
    'sample': [stats.num_seqs, stats.seq_len, stats.temperature, stats.first.value],
  }


def run(config) -> dict:
  rows = parse_rows(config.rows)
  parse_layers(config.layers)
  spec = quantize_lib.parse_column(config.column)
  if not isinstance(spec, quantizer.QuantSpec) or spec.clip_search or spec.ggml_type is not None:
    raise ValueError(
      f'config.column={config.column!r}: the reference optimiser writes the plain '
      'uniform quantizer (a column such as w3g128 or w4pc).'
    )
  recipe = study_config.RECIPES['sg-learned-input'].replace(spec=spec)
  stats = recipe.rounding.statistics
  sample = {f: config[f] for f in ('num_seqs', 'seq_len') if config[f] is not None}
  stats = dataclasses.replace(stats, **sample)
  model = quantize_lib.load_model(config.model, config.seed)
  layers = parse_layers(config.layers, model.config.num_layers)
  os.makedirs(config.output_dir, exist_ok=True)
  path = os.path.join(config.output_dir, 'results.json')
  inputs = _inputs(config, spec, layers, stats, model)
  out = {'inputs': inputs, 'column': config.column, 'rows': {}}
  old = _load(path)
  if old.get('inputs') == inputs:
    out['rows'] = {r: v for r, v in old.get('rows', {}).items() if r in rows}
  todo = [r for r in rows if r not in out['rows']]
  if todo:
    _compute(model, recipe, spec, stats, layers, config.seed, todo, out, path)
  out['rows'] = {r: out['rows'][r] for r in rows}
  atomic.write_json(path, out)
  table = format_table(out)
  atomic.write_text(os.path.join(config.output_dir, 'table.md'), table + '\n')
  print(table)
  return out


def _compute(model, recipe, spec, stats, layers, seed, todo, out, path) -> None:
  key = jax.random.PRNGKey(seed)
  mats = linears.selected_linears(model.params, model.config, recipe.matrices)
  t0 = time.perf_counter()
  # As methods.api does for this recipe: tokens under fold_in(key, 2), Σ blocks of
  # every matrix through the fp model, the transforms under split(key)[1].
  tokens = selfgen.sample_tokens(model.params, model.config, stats, jax.random.fold_in(key, 2))
  sigma = sequential.input_moment_blocks(
    model.params,
    model.config,
    tokens,
    block_size=recipe.transform.block_size,
    damp=recipe.rounding.damp,
    matrices=tuple(mats),
    batch_size=stats.batch_size,
  )
  print(f'self-generated Σ: {time.perf_counter() - t0:.0f} s', flush=True)
  transform_key = jax.random.split(key)[1]
  layer_map = {n: list(layers) for n in mats}
  shapes = {n: tuple(m.shape[-2:]) for n, m in mats.items()}
  stacks = single.unit_stacks(shapes, layer_map, share=True)
  # Units in model order of their first matrix (q, k+v, o, gate+up, down), then layer.
  order = {n: i for i, n in enumerate(linears.LINEAR_NAMES)}
  units = sorted(
    (u for entries in stacks.values() for u in entries), key=lambda u: (order[u[0][0]], u[1])
  )
  rtn = {}
  for names, layer in units:
    w = np.stack([np.asarray(mats[n][layer]) for n in names])
    rtn[(names, layer)] = unit_losses(w, sigma[(layer, names[0])], None, spec)
  for row in todo:
    t0 = time.perf_counter()
    if row.startswith('reference-'):
      steps = int(row.rsplit('-', 1)[1])
      blocks = {}
      for entries in stacks.values():
        w = jnp.stack([jnp.stack([mats[n][l] for n in names]) for names, l in entries])
        s = jnp.stack([sigma[(l, names[0])] for names, l in entries])
        m = reference_blocks(w, s, spec, steps)
        blocks.update({u: m[i] for i, u in enumerate(entries)})
    else:
      stage = learned_stage(row)
      weighted = stage.loss == recipes.TransformLoss.INPUT
      learned, _, _ = single.transforms_for(
        mats,
        layer_map,
        stage,
        spec,
        transform_key,
        sigma=sigma if weighted else None,
      )
      blocks = {(names, l): np.asarray(learned[(l, names[0])][0]) for names, l in units}
    seconds = time.perf_counter() - t0
    out['rows'][row] = {**row_result(units, mats, sigma, blocks, spec, rtn), 'seconds': seconds}
    atomic.write_json(path, out)
    print(f'{row}: {out["rows"][row]}', flush=True)


def format_table(out: dict) -> str:
  """Markdown: one row per optimiser, the weighted loss over RTN's per unit type."""
  types = []
  for r in out['rows'].values():
    types += [t for t in r['weighted_ratio'] if t not in types]
  head = ['row', *types, 'total', 'proxy total', 'seconds']
  lines = ['| ' + ' | '.join(head) + ' |', '|---|' + '---:|' * (len(head) - 1)]
  for name, r in out['rows'].items():
    cells = [name, *(f'{r["weighted_ratio"].get(t, float("nan")):.3f}' for t in types)]
    cells += [f'{r["weighted_ratio_total"]:.3f}', f'{r["proxy_ratio_total"]:.3f}']
    cells.append(f'{r["seconds"]:.0f}')
    lines.append('| ' + ' | '.join(cells) + ' |')
  i = out['inputs']
  n, length, temperature, first = i['sample']
  return (
    f'{i["model"]} {out["column"]}, seed {i["seed"]}, layers {i["layers"]}, Σ of '
    f'{n} x {length} self-generated tokens (temperature {temperature}, first {first}):\n'
    + '\n'.join(lines)
  )


if __name__ == '__main__':
  cli.launch(run, _DEFAULT_CONFIG)
