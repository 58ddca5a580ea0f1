r"""Benchmark: wall time of ``cafeq_jax.quantize`` per recipe on a real model.

Loads the model once, then for every recipe of ``--config.methods`` runs the
whole quantization ``--config.repeats`` times in this process and records the
wall time (to the last quantized array ready), the process's CPU time over it
(user + system, every thread: how full the cores were) and the recipe's own per-stage
timings (``QuantizeReport.timings``: self-generation, input statistics,
transforms, rounding). The first run of a recipe includes its JIT compilation,
as a user's single run does; later repeats show the compiled cost. Nothing else
should run on the machine: the figures are what this host does alone. With JAX's
persistent compilation cache on (``JAX_COMPILATION_CACHE_DIR``, recorded in the
output) a run finds the programs an earlier process compiled there.

    python -m experiments.bench_quantize                      # every default recipe
    python -m experiments.bench_quantize --config.methods=cafeq --config.repeats=2
    python -m experiments.bench_quantize --config.methods=cafeq --config.cafeq.transform.steps=100
    python -m experiments.bench_quantize --config.methods=cafeq --config.threads=1

``--config.cafeq.*`` sets stage fields of the CafeQ recipes as the main job's does
(``experiments/configs/quantize.py``); ``--config.threads`` / ``--config.stack_chunk``
set where the transform chunks run (``RunOptions``: what runs where, not what is
computed). The output records the ones set.

Writes ``--config.output`` (JSON, rewritten after every run, so an interrupted
benchmark keeps its finished rows) and prints a Markdown table.
"""

from __future__ import annotations

import os
import platform
import time

import jax

import cafeq_jax
from cafeq_jax import atomic
from cafeq_jax import quantizer
from cafeq_jax import recipes
from experiments import cli
from experiments import quantize_lib

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), 'configs', 'bench_quantize.py')


def cpu_model() -> str:
  """The CPU's model name, widest x86 vector extension and cache size, as far as
  /proc/cpuinfo says: machines of one kind differ, and so do their timings."""
  try:
    with open('/proc/cpuinfo') as f:
      info = f.read()
  except OSError:
    return platform.processor()
  field = lambda key: next(
    (l.split(':', 1)[1].strip() for l in info.splitlines() if l.startswith(key)), ''
  )
  flags = field('flags').split()
  isa = next((f for f in ('avx512f', 'avx2', 'sse4_2') if f in flags), '')
  cache = field('cache size')
  return ', '.join(x for x in (field('model name'), isa, cache and f'{cache} cache') if x)


def host() -> dict:
  """What the timings ran on."""
  return {
    'cpus': os.cpu_count(),
    'cpu': cpu_model(),
    'machine': platform.machine(),
    'backend': jax.default_backend(),
    'devices': [str(d) for d in jax.devices()],
    'jax': jax.__version__,
    # JAX's persistent compilation cache (JAX_COMPILATION_CACHE_DIR): a run that finds
    # its programs there skips their compilation.
    'compilation_cache': jax.config.jax_compilation_cache_dir,
  }


def run(config) -> dict:
  methods = cli.split_names(config.methods)
  spec = quantize_lib.parse_column(config.column)
  if not isinstance(spec, quantizer.QuantSpec):
    raise ValueError(f'config.column={config.column!r}: the benchmark takes a uniform column.')
  if isinstance(config.repeats, bool) or not isinstance(config.repeats, int) or config.repeats < 1:
    raise ValueError(f'config.repeats={config.repeats!r} must be an int >= 1.')
  repeated = sorted({m for m in methods if methods.count(m) > 1})
  if repeated:
    raise ValueError(f'config.methods={config.methods!r} repeats {repeated} (use config.repeats).')
  # Unknown names and stage fields fail here, before the model loads.
  presets = {m: recipes.get(m, spec=spec) for m in methods}
  plan = {m: quantize_lib.with_cafeq_options(m, r, config.cafeq) for m, r in presets.items()}
  quantize_lib.check_cafeq_options(presets, config.cafeq)
  placement = {k: config[k] for k in ('threads', 'stack_chunk') if config[k] is not None}
  run_options = cafeq_jax.RunOptions(**placement)  # a bad value fails here, before the model loads
  for m, r in plan.items():
    if isinstance(r.statistics, recipes.Calibration):
      raise ValueError(f'{m!r} reads calibration tokens; the benchmark times data-free recipes.')
  t0 = time.perf_counter()
  model = quantize_lib.load_model(config.model, config.seed)
  out = {
    'host': host(),
    'model': config.model,
    'column': config.column,
    'cafeq_options': quantize_lib.cafeq_overrides(config.cafeq),
    'run_options': placement,
    'load_seconds': time.perf_counter() - t0,
    'runs': [],
  }
  for m, recipe in plan.items():
    for i in range(config.repeats):
      t0, c0 = time.perf_counter(), time.process_time()
      qparams, report = cafeq_jax.quantize(
        model.params, model.config, recipe, jax.random.PRNGKey(config.seed), run_options=run_options
      )
      jax.block_until_ready(qparams)
      seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
      out['runs'].append(
        {
          'method': m,
          'repeat': i,
          'seconds': seconds,
          'cpu_seconds': cpu,
          'timings': dict(report.timings),
        }
      )
      atomic.write_json(config.output, out)
      print(f'{m} run {i}: {seconds:.1f} s, CPU {cpu:.1f} s {dict(report.timings)}', flush=True)
  print(format_table(out))
  return out


def format_table(out: dict) -> str:
  """Markdown: one row per run, wall seconds and the recipe's stage seconds."""
  stages = []
  for r in out['runs']:
    stages += [s for s in r['timings'] if s not in stages and s != 'total']
  head = ['method', 'run', 'seconds', 'CPU seconds'] + stages
  lines = ['| ' + ' | '.join(head) + ' |', '|---|---:|' + '---:|' * (len(head) - 2)]
  for r in out['runs']:
    cells = [r['method'], str(r['repeat']), f'{r["seconds"]:.0f}', f'{r["cpu_seconds"]:.0f}']
    cells += [f'{r["timings"][s]:.0f}' if s in r['timings'] else '' for s in stages]
    lines.append('| ' + ' | '.join(cells) + ' |')
  h = out['host']
  cpu = f' ({h["cpu"]})' if h.get('cpu') else ''
  cache = f', compilation cache {h["compilation_cache"]}' if h.get('compilation_cache') else ''
  opts = ''.join(f', {k}={v}' for k, v in out.get('cafeq_options', {}).items())
  opts += ''.join(f', {k}={v}' for k, v in out.get('run_options', {}).items())
  return (
    f'{out["model"]} {out["column"]}{opts}, {h["cpus"]} CPUs{cpu}{cache}, {h["backend"]}:\n'
    + '\n'.join(lines)
  )


if __name__ == '__main__':
  cli.launch(run, _DEFAULT_CONFIG)
