r"""Benchmark: wall time of one learned-transform step over every stack of a model.

For a preset with a learned transform (``--config.recipe``), builds the stacks that
``cafeq_jax.quantize`` optimises (same-shape units of the model's real matrices,
``methods.single.unit_stacks``) and times ``--config.steps`` optimiser steps of all
of them per layout ``<units per chunk>:<threads>`` (``RunOptions.stack_chunk`` /
``threads``): the stacks cut into chunks, each chunk stepped by one of ``threads``
Python threads. The first step of a layout is compiled and not timed. Nothing else
should run on the machine.

    python -m experiments.bench_transform_step
    python -m experiments.bench_transform_step --config.layouts=whole:1,2:2 --config.recipe=cafeq

Writes ``--config.output`` (JSON) and prints a Markdown table.
"""

from __future__ import annotations

import concurrent.futures
import os
import time

import jax
import jax.numpy as jnp

from cafeq_jax import atomic
from cafeq_jax import recipes
from cafeq_jax.core import optimize
from cafeq_jax.methods import run_options
from cafeq_jax.methods import single
from cafeq_jax.models import linears
from experiments import bench_quantize
from experiments import cli
from experiments import quantize_lib

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), 'configs', 'bench_transform_step.py')


def parse_layouts(s) -> list[tuple[int | None, int]]:
  """``'whole:1,2:2'`` -> ``[(None, 1), (2, 2)]`` (None: the whole stack)."""
  out = []
  for item in cli.split_names(s):
    chunk, sep, threads = item.partition(':')
    try:
      out.append((None if chunk == 'whole' else int(chunk), int(threads) if sep else 1))
    except ValueError:
      raise ValueError(
        f"config.layouts item {item!r}: expected '<units per chunk>:<threads>' "
        "(e.g. '2:2' or 'whole:1')."
      ) from None
  if not out:
    raise ValueError('config.layouts is empty.')
  return out


def stacks(model, recipe) -> dict[tuple[int, int, int], jax.Array]:
  """``(T, d_in, d_out) -> (B, T, d_in, d_out)`` stacks of the model's matrices."""
  mats = linears.selected_linears(model.params, model.config, recipe.matrices)
  layers = {n: list(range(model.config.num_layers)) for n in mats}
  by_shape = single.unit_stacks(
    {n: tuple(m.shape[-2:]) for n, m in mats.items()}, layers, recipe.transform.share
  )
  return {
    shape: jnp.stack([jnp.stack([mats[n][l] for n in names]) for names, l in entries])
    for shape, entries in sorted(by_shape.items())
  }


def chunk_states(w, spec, cfg, opts: run_options.RunOptions) -> list[tuple]:
  """``[(state, w_chunk)]``: the initial optimiser state of every chunk of the stack
  ``w`` under ``opts`` (the chunks ``quantize`` steps; keys of this benchmark's own)."""
  out = []
  for a, b in opts.chunks(len(w)):
    state = optimize.init_state(w[a:b], spec, cfg, jax.random.PRNGKey(0))
    out.append((state.replace(key=optimize._typed_key(state.key)), w[a:b]))  # pylint: disable=protected-access
  return out


def time_layout(ws, spec, cfg, chunk, threads, steps) -> float:
  """Seconds per optimiser step of every stack in ``ws`` under one layout."""
  opts = run_options.RunOptions(stack_chunk=chunk or 10**9, threads=threads)
  work = []  # [state, w, step] per chunk
  for w in ws.values():
    step = optimize.make_run_step(spec, cfg, w.shape[-1])
    for state, wc in chunk_states(w, spec, cfg, opts):
      work.append([step(state, wc), wc, step])
  jax.block_until_ready([s for s, _, _ in work])

  def run_share(share):
    for _ in range(steps):
      for item in share:
        item[0] = item[2](item[0], item[1])
    jax.block_until_ready([s for s, _, _ in share])

  n = opts.num_threads(len(work))
  t0 = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(n) as pool:
    list(pool.map(run_share, [work[i::n] for i in range(n)]))
  return (time.perf_counter() - t0) / steps


def run(config) -> dict:
  layouts = parse_layouts(config.layouts)
  spec = quantize_lib.parse_column(config.column)
  recipe = recipes.get(config.recipe, spec=spec)
  if not isinstance(recipe.transform, recipes.Learned):
    raise ValueError(f'config.recipe={config.recipe!r} has no learned transform to time.')
  if isinstance(config.steps, bool) or not isinstance(config.steps, int) or config.steps < 1:
    raise ValueError(f'config.steps={config.steps!r} must be an int >= 1.')
  model = quantize_lib.load_model(config.model)
  ws = stacks(model, recipe)
  out = {
    'host': bench_quantize.host(),
    'model': config.model,
    'recipe': config.recipe,
    'column': config.column,
    'stacks': {'x'.join(map(str, s)): int(w.shape[0]) for s, w in ws.items()},
    'runs': [],
  }
  for chunk, threads in layouts:
    seconds = time_layout(ws, spec, recipe.transform.config, chunk, threads, config.steps)
    out['runs'].append({'chunk': chunk, 'threads': threads, 'ms_per_step': 1e3 * seconds})
    atomic.write_json(config.output, out)
    print(f'chunk {chunk or "whole"}, {threads} threads: {1e3 * seconds:.0f} ms/step', flush=True)
  print(format_table(out))
  return out


def format_table(out: dict) -> str:
  lines = ['| units per chunk | threads | ms per step |', '|---|---:|---:|']
  for r in out['runs']:
    lines.append(f'| {r["chunk"] or "whole stack"} | {r["threads"]} | {r["ms_per_step"]:.0f} |')
  h = out['host']
  return (
    f'{out["model"]} {out["recipe"]} {out["column"]}, stacks {out["stacks"]}, '
    f'{h["cpus"]} CPUs, {h["backend"]}:\n' + '\n'.join(lines)
  )


if __name__ == '__main__':
  cli.launch(run, _DEFAULT_CONFIG)
