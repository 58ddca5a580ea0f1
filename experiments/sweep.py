r"""Sweep a grid of methods x bits x group sizes x models; one JSONL results table.

Locally the points run one after the other; with several runs (processes of a
TPU pod slice / multi-host job, or independent processes given
``--config.num_shards`` / ``--config.shard_index``) point ``i`` runs where
``i % num_shards == shard_index``. A point whose result is already in the JSONL
(same key: a hash of the point and of every config field that affects its
result) is skipped, so an interrupted sweep is simply relaunched. Each finished
point appends one line atomically (``O_APPEND`` + ``flock``, a single write) to
``workdir/results_file``; every ``*.jsonl`` in ``workdir`` counts as done (so
per-host files copied into one directory merge) and the summary covers them all.

    python -m experiments.sweep --config=experiments/configs/sweep.py \
        --config.models=smollm2_135m --config.methods=rtn,hadamard,cafeq \
        --config.bits=4,3 --config.group_sizes=128,0 --config.workdir=outputs/sweep
"""

from __future__ import annotations

import dataclasses
import fcntl
import glob
import hashlib
import itertools
import json
import os
import time
from typing import Any
from typing import Callable
from typing import Iterable

from absl import app
from absl import logging
import ml_collections
from ml_collections import config_flags

from cafeq_jax.ggml import mixes
from experiments import cli

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), 'configs', 'sweep.py')
_CONFIG = None  # the --config flag, defined only when run as a program (see bottom)

# Config fields that do not change a point's result (left out of its key).
_BOOKKEEPING = (
  'models',
  'methods',
  'bits',
  'group_sizes',
  'workdir',
  'results_file',
  'num_shards',
  'shard_index',
  'save_models',
  'progress',
  'coordinator_address',
  'num_processes',
  'process_id',
)


@dataclasses.dataclass(frozen=True)
class Point:
  """One grid point."""

  model: str
  method: str
  bits: int
  group_size: int | None  # None = per output channel
  mix: str | None = None  # a llama.cpp mix (config.export gguf:<mix>): bits/group unused

  @property
  def name(self) -> str:
    gran = 'pc' if self.group_size is None else f'g{self.group_size}'
    col = f'gguf-{self.mix}' if self.mix else f'w{self.bits}{gran}'
    return f'{os.path.basename(self.model)}/{self.method}/{col}'


def grid(config: ml_collections.ConfigDict) -> list[Point]:
  """All points, models outermost (each process loads a model once)."""
  models, methods = cli.split_names(config.models), cli.split_names(config.methods)
  bits = cli.split_ints(config.bits, 'bits')
  groups = [None if g == 0 else g for g in cli.split_ints(config.group_sizes, 'group_sizes')]
  for name, axis in (
    ('models', models),
    ('methods', methods),
    ('bits', bits),
    ('group_sizes', groups),
  ):
    if not axis:
      raise ValueError(f'config.{name} is empty; give at least one value.')
  points = [
    Point(m, meth, b, g) for m, g, b, meth in itertools.product(models, groups, bits, methods)
  ]
  formats = cli.split_names(config.export)
  mixes_ = []
  for f in formats:
    if f.startswith('gguf:'):
      mixes_.append(mixes.check_mix(f[len('gguf:') :]))
    elif f != 'ct':
      raise ValueError(
        f"config.export={config.export!r}: {f!r} is not a format; expected 'ct' or "
        f'gguf:<mix> with a mix of {list(mixes.MIXES)}.'
      )
  points += [
    Point(m, meth, 0, None, mix) for m, mix, meth in itertools.product(models, mixes_, methods)
  ]
  _check_exports(points, config, 'ct' in formats)
  return points


def _check_exports(points: list[Point], config, ct: bool) -> None:
  """Every point the export formats must hold can be held (before any work)."""
  from cafeq_jax import ggml  # pylint: disable=g-import-not-at-top
  from cafeq_jax.loading import compressed_tensors  # pylint: disable=g-import-not-at-top
  from cafeq_jax.loading import gguf_writer  # pylint: disable=g-import-not-at-top
  from experiments import quantize_lib  # pylint: disable=g-import-not-at-top

  for p in points:
    try:
      if p.mix:  # the spec map needs the model; any GGML spec checks the stages
        gguf_writer.check_recipe(quantize_lib.recipe_for(p.method, ggml.spec('Q4_0'), config))
      elif ct:
        compressed_tensors.check_recipe(quantize_lib.recipe_for(p.method, _spec(p, config), config))
    except ValueError as e:
      raise ValueError(f'config.export={config.export!r}, point {p.name}: {e}') from None


def _spec(point: Point, config, model_config=None):
  """The point's quantizer: a uniform spec, or the mix's spec map for the model."""
  from cafeq_jax import quantizer  # pylint: disable=g-import-not-at-top

  if point.mix:
    return mixes.spec_map(point.mix, model_config, clip_search=config.clip_search)
  return quantizer.QuantSpec(
    bits=point.bits,
    group_size=point.group_size,
    symmetric=config.symmetric,
    clip_search=config.clip_search,
  )


def point_key(point: Point, config: ml_collections.ConfigDict) -> str:
  """Hash of the point and of the config fields that affect its result."""
  relevant = {k: v for k, v in config.to_dict().items() if k not in _BOOKKEEPING}
  blob = json.dumps(
    {'point': dataclasses.asdict(point), 'config': relevant}, sort_keys=True, default=str
  )
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def my_points(points: list[Point], num_shards: int, shard_index: int) -> list[tuple[int, Point]]:
  """The ``(index, point)`` pairs with ``index % num_shards == shard_index``."""
  if num_shards < 1 or not 0 <= shard_index < num_shards:
    raise ValueError(f'shard_index={shard_index} must be in [0, num_shards={num_shards}).')
  return [(i, p) for i, p in enumerate(points) if i % num_shards == shard_index]


def read_results(path: str) -> list[dict[str, Any]]:
  """Rows of a results JSONL; a torn last line (crash mid-write) is ignored."""
  rows = []
  if not os.path.exists(path):
    return rows
  with open(path) as f:
    for n, line in enumerate(f, 1):
      line = line.strip()
      if not line:
        continue
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        logging.warning('%s:%d is not valid JSON (interrupted write?); ignoring it.', path, n)
  return rows


def append_result(path: str, row: dict[str, Any]) -> None:
  """Appends ``row`` as one JSON line, atomically w.r.t. other writers."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  data = (json.dumps(row, sort_keys=True, default=str) + '\n').encode()
  fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
      written = os.write(fd, data)
      if written != len(data):
        raise OSError(f'short write to {path}: {written} of {len(data)} bytes.')
      os.fsync(fd)
    finally:
      fcntl.flock(fd, fcntl.LOCK_UN)
  finally:
    os.close(fd)


class _ModelCache:
  """The current model, its eval tokens and apply function (one model at a time)."""

  def __init__(self):
    self.name = None
    self.value = None

  def get(self, name: str, config):
    if name != self.name:
      from cafeq_jax import eval as eval_lib  # pylint: disable=g-import-not-at-top
      from experiments import quantize_lib  # pylint: disable=g-import-not-at-top

      self.value = None  # free the previous model first
      model = quantize_lib.load_model(name, config.seed)
      text = eval_lib.load_text(config.eval_text or None)
      tokens = eval_lib.make_windows(model.encode(text), config.eval_num_seqs, config.eval_seq_len)
      self.name, self.value = name, (model, tokens, eval_lib.model_apply_fn(model.config))
    return self.value


def run_point(
  point: Point, config: ml_collections.ConfigDict, cache: _ModelCache | None = None
) -> dict[str, Any]:
  """Loads the model, quantizes it with the point's method, evaluates it.

  Returns:
    The result row (JSON-able): ppl / kld / top1 of the quantized model and the
    fp ppl on the same tokens, proxy losses, storage and timings.
  """
  import jax  # pylint: disable=g-import-not-at-top

  from cafeq_jax import eval as eval_lib  # pylint: disable=g-import-not-at-top
  from cafeq_jax import recipes  # pylint: disable=g-import-not-at-top
  from cafeq_jax.methods import quantize  # pylint: disable=g-import-not-at-top
  from experiments import quantize_lib  # pylint: disable=g-import-not-at-top

  cache = cache or _ModelCache()
  model, tokens, apply_fn = cache.get(point.model, config)
  spec = _spec(point, config, model.config)
  recipe = quantize_lib.recipe_for(point.method, spec, config)
  kwargs = {}
  if isinstance(recipe.statistics, recipes.Calibration):
    kwargs['calib_tokens'] = quantize_lib.calibration_tokens(recipe.statistics, model, config)
  t0 = time.perf_counter()
  qparams, report = quantize(
    model.params,
    model.config,
    recipe,
    jax.random.PRNGKey(config.seed),
    progress=config.progress,
    **kwargs,
  )
  qparams = jax.block_until_ready(qparams)
  quant_seconds = time.perf_counter() - t0
  metrics = eval_lib.evaluate(
    apply_fn,
    model.params,
    tokens,
    {'q': qparams},
    batch_size=config.eval_batch_size,
    progress=config.progress,
  )
  row = {
    'ppl': metrics['q']['ppl'],
    'kld': metrics['q']['kld'],
    'top1': metrics['q']['top1'],
    'fp_ppl': metrics['fp']['ppl'],
    'eval_tokens': metrics['q']['tokens'],
    'quantize_seconds': quant_seconds,
    'proxy_rtn': report.total('rtn'),
    'proxy_final': report.total('final'),
    'spec': spec.name,
    'bits_per_weight': quantize_lib.storage(qparams)['bits_per_weight'],
  }
  from cafeq_jax.distributed import memory  # pylint: disable=g-import-not-at-top

  row.update(memory.peak_memory())  # process peaks so far (model load included)
  if config.save_models:
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

    from cafeq_jax import checkpointing  # pylint: disable=g-import-not-at-top
    from cafeq_jax.models import qlinear  # pylint: disable=g-import-not-at-top

    path = os.path.join(config.workdir, 'models', point.name.replace('/', '_'))
    checkpointing.save_quantized(
      path,
      qlinear.pack_params(qparams, scale_dtype=jnp.bfloat16),
      model_config=model.config,
      quant_config=recipe,
      metadata={'point': dataclasses.asdict(point), **row},
      overwrite=True,
    )
    row['model_path'] = path
  base = point.name.replace('/', '_')
  provenance = {'point': dataclasses.asdict(point), 'recipe': recipe.to_dict(), **row}
  if point.mix:
    from cafeq_jax.loading import gguf_writer  # pylint: disable=g-import-not-at-top

    row['gguf_path'] = os.path.join(config.workdir, 'gguf', base + '.gguf')
    gguf_writer.save_gguf(
      qparams,
      model.config,
      row['gguf_path'],
      source=quantize_lib.gguf_source(point.model),
      tokenizer=quantize_lib.gguf_tokenizer_dir(point.model),
      mix=point.mix,
      provenance=provenance,
    )
  elif 'ct' in cli.split_names(config.export):
    from cafeq_jax.loading import compressed_tensors  # pylint: disable=g-import-not-at-top

    row['ct_path'] = os.path.join(config.workdir, 'ct', base)
    compressed_tensors.save_compressed_tensors(
      qparams, model.config, row['ct_path'], provenance=provenance
    )
  return row


def run(
  config: ml_collections.ConfigDict, runner: Callable[..., dict[str, Any]] | None = None
) -> dict[str, Any]:
  """Runs this process's share of the grid; returns counts and this sweep's rows.

  Args:
    config: see experiments/configs/sweep.py.
    runner: ``runner(point, config, cache) -> row`` (default ``run_point``).
  """
  import jax  # pylint: disable=g-import-not-at-top

  runner = runner or run_point
  points = grid(config)
  num_shards = config.num_shards or jax.process_count()
  shard_index = config.shard_index if config.shard_index >= 0 else jax.process_index()
  if config.save_models and jax.process_count() > 1:
    raise ValueError(
      'config.save_models=True needs a single-process run per shard '
      '(Orbax saves synchronise all processes of a jax.distributed job); '
      'launch independent processes with --config.num_shards/shard_index.'
    )
  path = os.path.join(config.workdir, config.results_file)
  keys = {point_key(p, config): p for p in points}
  # Every JSONL in the workdir counts (e.g. per-host files copied together).
  tables = sorted({path, *glob.glob(os.path.join(config.workdir, '*.jsonl'))})
  done = {r['key'] for t in tables for r in read_results(t) if r.get('status') == 'ok'}
  mine = my_points(points, num_shards, shard_index)
  logging.info(
    'sweep: %d points, %d in shard %d/%d, %d already done',
    len(points),
    len(mine),
    shard_index,
    num_shards,
    len(done & set(keys)),
  )
  cache = _ModelCache()
  ran = skipped = 0
  for index, point in mine:
    key = point_key(point, config)
    if key in done:
      skipped += 1
      logging.info('[%d] %s done already (key %s); skipping', index, point.name, key)
      continue
    logging.info('[%d] %s running', index, point.name)
    t0 = time.perf_counter()
    row = runner(point, config, cache)
    row = {
      'key': key,
      'name': point.name,
      'index': index,
      'status': 'ok',
      **dataclasses.asdict(point),
      **row,
      'seconds': time.perf_counter() - t0,
      'shard': shard_index,
      'time': time.strftime('%Y-%m-%dT%H:%M:%S'),
    }
    append_result(path, row)
    ran += 1
  rows = {
    r['key']: r
    for t in tables
    for r in read_results(t)
    if r.get('key') in keys and r.get('status') == 'ok'
  }
  rows = list(rows.values())
  return {
    'points': len(points),
    'mine': len(mine),
    'ran': ran,
    'skipped': skipped,
    'rows': rows,
    'path': path,
  }


def format_summary(rows: Iterable[dict[str, Any]]) -> str:
  """A plain-text table of result rows, one line per point."""
  cols = [
    ('model', 14, 's'),
    ('method', 14, 's'),
    ('spec', 12, 's'),
    ('ppl', 9, '.3f'),
    ('fp_ppl', 9, '.3f'),
    ('kld', 8, '.4f'),
    ('top1', 6, '.3f'),
    ('bits_per_weight', 8, '.3f'),
    ('quantize_seconds', 10, '.1f'),
  ]
  head = ' '.join(f'{n[:w]:>{w}}' for n, w, _ in cols)
  lines = [head, '-' * len(head)]
  for r in sorted(rows, key=lambda r: r.get('index', 0)):
    cells = []
    for n, w, fmt in cols:
      v = r.get(n, '')
      if n == 'model':
        v = os.path.basename(str(v))
      cells.append(
        f'{v:>{w}{fmt}}' if isinstance(v, (int, float)) and fmt != 's' else f'{str(v)[:w]:>{w}}'
      )
    lines.append(' '.join(cells))
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  config = _CONFIG.value
  from cafeq_jax.distributed import multihost  # pylint: disable=g-import-not-at-top

  info = multihost.initialize_from_env(
    config.coordinator_address or None,
    config.num_processes or None,
    config.process_id if config.process_id >= 0 else None,
  )
  logging.info('JAX %s', info.describe())
  print(f'JAX {info.describe()}', flush=True)
  out = run(config)
  print(
    f'sweep: {out["points"]} points, {out["mine"]} in this shard, ran {out["ran"]}, '
    f'skipped {out["skipped"]} already done; results in {out["path"]}'
  )
  print(format_summary(out['rows']))


if __name__ == '__main__':
  # Defined here, not at import, so importing this module (tests, notebooks, other
  # launchers with their own --config) never collides with another --config flag.
  _CONFIG = config_flags.DEFINE_config_file(
    'config',
    _DEFAULT_CONFIG,
    'Sweep configuration (experiments/configs/sweep.py).',
    lock_config=True,
  )
  app.run(main)
