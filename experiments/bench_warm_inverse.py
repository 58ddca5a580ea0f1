r"""Benchmark: how often a dense transform's warm-start inverse falls back to
Gauss-Jordan elimination over a whole run, and what a fallback costs.

A dense transform's step refines the last step's ``M⁻¹`` by Newton-Schulz
(``transforms.warm_inverse``); a block left unconverged is eliminated instead.

* Counts, per recipe of ``--config.recipes`` (presets or rows of
  ``experiments/configs/transform_study.py``): the recipe's whole transform
  optimisation over the model's stacks, in the chunks ``cafeq_jax.quantize`` steps
  (``RunOptions().chunks``; column subsets of its own key), one chunk after the other; after every step the blocks
  that fell back (``TransformOptState.inverse_fallbacks``) and whether any did; and the
  seconds of those steps (on one thread, without ``quantize``'s other stages: the
  recipes' steps compared alone).
* Cost, per stack of the first recipe: ``warm_inverse`` on one chunk after its first
  step, with the guesses of ``--config.broken`` blocks broken (zero, a fixed point of
  Newton-Schulz), against ``gauss_jordan_inverse`` of the whole chunk (the fallback's
  cost when it eliminated every block of the chunk).

    python -m experiments.bench_warm_inverse
    python -m experiments.bench_warm_inverse --config.recipes=cafeq,cafeq-150

Writes ``--config.output`` (JSON, rewritten after each recipe) and prints Markdown
tables. Nothing else should run on the machine while the costs are timed.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from cafeq_jax import atomic
from cafeq_jax import recipes
from cafeq_jax.core import optimize
from cafeq_jax.core import transforms
from cafeq_jax.methods import run_options
from experiments import bench_quantize
from experiments import bench_transform_step
from experiments import cli
from experiments import quantize_lib
from experiments import transform_study

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), 'configs', 'bench_warm_inverse.py')


def _dense_recipe(name: str, spec) -> recipes.Recipe:
  recipe = transform_study.recipe_for(name, spec)
  t = recipe.transform
  if not (
    isinstance(t, recipes.Learned)
    and t.config.parameterization == transforms.Parameterization.DENSE
  ):
    raise ValueError(f'recipe {name!r} learns no dense transform (no warm-start inverse).')
  return recipe


def count_fallbacks(ws, spec, cfg) -> dict[str, dict[str, float]]:
  """Per stack: chunks, chunk-steps, those with any fallback, blocks that fell back
  and block-steps, over ``cfg.steps`` steps of every chunk; and the seconds those
  steps took (one chunk at a time on this thread, read back after every step)."""
  out = {}
  for shape, w in ws.items():
    step = optimize.make_run_step(spec, cfg, w.shape[-1])
    chunks = bench_transform_step.chunk_states(w, spec, cfg, run_options.RunOptions())
    any_fell = blocks_fell = 0
    t0 = time.perf_counter()
    for state, wc in chunks:
      before = 0
      for _ in range(cfg.steps):
        state = step(state, wc)
        total = int(jnp.sum(state.inverse_fallbacks))
        any_fell += total > before
        before = total
      blocks_fell += before
    out['x'.join(map(str, shape))] = {
      'chunks': len(chunks),
      'chunk_steps': len(chunks) * cfg.steps,
      'chunk_steps_with_fallback': any_fell,
      'blocks_fallen_back': blocks_fell,
      'block_steps': len(w) * (shape[-2] // cfg.block_size) * cfg.steps,
      'seconds': time.perf_counter() - t0,
    }
  return out


def _ms(fn, *args, reps: int) -> float:
  """Fastest of three means over ``reps`` calls, in ms."""
  jax.block_until_ready(fn(*args))
  best = float('inf')
  for _ in range(3):
    t0 = time.perf_counter()
    for _ in range(reps):
      jax.block_until_ready(fn(*args))
    best = min(best, (time.perf_counter() - t0) / reps)
  return 1e3 * best


def time_fallbacks(ws, spec, cfg, broken: list[int], reps: int) -> dict[str, dict]:
  """Per stack: ms of ``warm_inverse`` on its first chunk's blocks after one step with
  ``n`` broken guesses for each ``n`` of ``broken``, and of eliminating the whole chunk."""
  warm = jax.jit(transforms.warm_inverse)
  whole = jax.jit(transforms.gauss_jordan_inverse)
  out = {}
  for shape, w in ws.items():
    state, wc = bench_transform_step.chunk_states(w, spec, cfg, run_options.RunOptions())[0]
    state = optimize.make_run_step(spec, cfg, w.shape[-1])(state, wc)
    m, guess = state.transform.trainable()['blocks'], state.inverse
    count = int(np.prod(m.shape[:-2]))
    row = {'blocks': count, 'warm_inverse_ms': {}}
    for n in broken:
      if n > count:
        continue
      flat = guess.reshape(count, *guess.shape[-2:])
      spread = np.linspace(0, count - 1, n).round().astype(int)  # spread over the chunk
      g = flat.at[spread].set(0.0).reshape(guess.shape)
      _, fell = warm(m, g)
      assert int(jnp.sum(fell)) >= n, (shape, n)
      row['warm_inverse_ms'][str(n)] = _ms(warm, m, g, reps=reps)
    row['eliminate_chunk_ms'] = _ms(whole, m, reps=reps)
    out['x'.join(map(str, shape))] = row
  return out


def run(config) -> dict:
  spec = quantize_lib.parse_column(config.column)
  names = cli.split_names(config.recipes)
  if not names:
    raise ValueError('config.recipes is empty.')
  found = {name: _dense_recipe(name, spec) for name in names}  # every name, before loading
  broken = cli.split_ints(config.broken, 'broken')
  if any(b < 0 for b in broken):
    raise ValueError(f'config.broken={config.broken!r} must list counts >= 0.')
  model = quantize_lib.load_model(config.model)
  out = {'host': bench_quantize.host(), 'model': config.model, 'column': config.column}
  out['counts'] = {}
  first_stacks = None
  for name, recipe in found.items():
    ws = bench_transform_step.stacks(model, recipe)
    first_stacks = ws if first_stacks is None else first_stacks
    out['counts'][name] = count_fallbacks(ws, spec, recipe.transform.config)
    atomic.write_json(config.output, out)
  first = found[names[0]].transform.config
  out['costs'] = {
    'recipe': names[0],
    'stacks': time_fallbacks(first_stacks, spec, first, broken, config.reps),
  }
  atomic.write_json(config.output, out)
  print(format_tables(out))
  return out


def format_tables(out: dict) -> str:
  lines = [
    f'{out["model"]} {out["column"]}, {out["host"]["cpus"]} CPUs ({out["host"]["cpu"]}):',
    '',
    '| recipe | stack | chunk-steps with a fallback | blocks fallen back / block-steps '
    '| seconds of the steps |',
    '|---|---|---:|---:|---:|',
  ]
  for name, stacks in out['counts'].items():
    for shape, c in stacks.items():
      lines.append(
        f'| {name} | {shape} | {c["chunk_steps_with_fallback"]} / {c["chunk_steps"]} | '
        f'{c["blocks_fallen_back"]} / {c["block_steps"]} | {c["seconds"]:.1f} |'
      )
  costs = out['costs']
  ns = sorted({n for r in costs['stacks'].values() for n in r['warm_inverse_ms']}, key=int)
  lines += [
    '',
    f'ms per call on one chunk of `{costs["recipe"]}` (`warm_inverse` with n broken blocks):',
    '',
    '| stack | blocks | ' + ' | '.join(f'n = {n}' for n in ns) + ' | whole chunk eliminated |',
    '|---|---:|' + '---:|' * (len(ns) + 1),
  ]
  for shape, r in costs['stacks'].items():
    cells = [f'{r["warm_inverse_ms"][n]:.2f}' if n in r['warm_inverse_ms'] else '' for n in ns]
    lines.append(
      f'| {shape} | {r["blocks"]} | ' + ' | '.join(cells) + f' | {r["eliminate_chunk_ms"]:.2f} |'
    )
  return '\n'.join(lines)


if __name__ == '__main__':
  cli.launch(run, _DEFAULT_CONFIG)
