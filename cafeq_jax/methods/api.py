"""``quantize(params, model_config, recipe, key)``: runs a recipe's stages in order.

1. ``recipe.pairs``: pair transforms folded into the fp weights
   (``methods.paired``); with ``PairAdaptive`` rounding every value/output pair is
   then rounded adaptively.
2. ``recipe.transform``: online single-matrix transforms ``(M, M⁻¹)`` for the
   other matrices (``methods.single.transforms_for``): fixed random Hadamard, or
   learned on the Frobenius proxy, or (``Learned(loss='input')``) on the loss
   weighted by the input second moments on the rounding stage's tokens (drawn
   first; ``methods.sequential.input_moment_blocks``).
3. ``recipe.rounding``: RTN or GPTQ-form rounding under the Frobenius proxy
   (``methods.single.round_matrices``); with self-generated or calibration
   statistics, sequential GPTQ-form rounding layer by layer
   (``methods.sequential``), the tokens drawn by ``methods.selfgen`` from the
   (pair-folded) fp model or given as ``calib_tokens``.

Stages 2 and 3 overlap where the results allow: the learned transforms run on a pool
of threads (``single.start_transforms``) while this thread samples the self-generated
tokens (unless the transform's loss reads them) and rounds layer by layer, each layer
waiting for its own transforms only. The codes are those of one stage after the other.

The result is the same param tree with each quantized weight leaf replaced by a
``QuantizedLinear`` (``transform_inv`` set for online transforms), and a
``QuantReport``. It is a deterministic function of the inputs and the key.

Keys: a recipe with only a Hadamard transform and RTN rounding (the ``hadamard``
baseline) draws its signs from ``key``; every other recipe splits ``key`` into
(pairs, transforms) and folds in 2 for the self-generated sequences. These are
the derivations of the first release, kept so that results stay reproducible.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import jax
import numpy as np

from cafeq_jax import recipes
from cafeq_jax import specs
from cafeq_jax.distributed import memory
from cafeq_jax.methods import layerwise
from cafeq_jax.methods import paired
from cafeq_jax.methods import selfgen
from cafeq_jax.methods import sequential
from cafeq_jax.methods import single
from cafeq_jax.methods import validate
from cafeq_jax.methods.report import QuantReport
from cafeq_jax.methods.run_options import RunOptions
from cafeq_jax.models import linears


def quantize(
  params,
  model_config,
  recipe: recipes.Recipe,
  key: jax.Array | None = None,
  *,
  calib_tokens=None,
  mesh=None,
  checkpoint_dir: str | None = None,
  checkpoint_every: int | None = None,
  layers_per_chunk: int | None = None,
  run_options: RunOptions | None = None,
  progress: bool = False,
) -> tuple[Any, QuantReport]:
  """Quantizes a model's params with ``recipe``.

  The keyword-only run options change where and how the work runs, not what it
  computes: each optimisation step of a sharded or split run equals the plain
  single-device step to float32 rounding (the tests check the codes on tiny
  models). A sharded program may round differently in the last bits, and over
  hundreds of Adam steps through the quantizer such bits can grow (on a
  SmolLM2-sized stack: 8e-5 in the blocks after one step), so on a real model a
  sharded run's figures can differ from a one-device run's by about the seed
  spread, as two CPUs' do.

  Args:
    params: fp param tree (docs/params.md).
    model_config: its ``ModelConfig``.
    recipe: a ``recipes.Recipe`` (e.g. ``recipes.get('cafeq-sg')``).
    key: PRNG key (default ``PRNGKey(0)``).
    calib_tokens: ``(n_seq, seq_len)`` calibration token ids; required by, and
      only accepted with, ``Calibration`` statistics.
    mesh: ``jax.sharding.Mesh`` with an axis ``'stack'``
      (``distributed.make_mesh()``): each stack of same-shape matrices is
      optimised sharded along it (``NamedSharding``, GSPMD). Group / block /
      mesh divisibility is checked before any work.
    checkpoint_dir: resumable Orbax checkpoints of the transform optimisation,
      one sub-directory per stacked unit: a killed run restarted with the same
      arguments resumes where it stopped and ends with the same model.
    checkpoint_every: steps between checkpoints (default 50).
    layers_per_chunk: quantize this many layers at a time, the fp model kept on
      the host (``methods.layerwise``; no pairs, no sequential statistics).
    run_options: a full ``RunOptions`` (padding, kept checkpoints, process
      split, per-step callback); the arguments above override its fields.
      With several processes (``jax.process_count() > 1``) the stacks are split
      over them (``distributed.split_loop``) unless a mesh or checkpoint_dir
      selects the global-mesh path.
    progress: progress bars of the transform optimisation.

  Returns:
    ``(quantized params, report)``; ``report.extra['peak_memory']`` holds the
    process's peak host / device memory (``distributed.peak_memory``).

  Raises:
    ValueError: a param tree that does not match ``model_config`` or holds a
      NaN / inf (``methods.validate``: checked before any work, naming the leaf).
  """
  validate.check_params(params, model_config)
  if not isinstance(recipe, recipes.Recipe):
    raise TypeError(
      f'recipe must be a cafeq_jax.recipes.Recipe (e.g. '
      f"recipes.get('cafeq-sg')); got {type(recipe).__name__}."
    )
  overrides = dict(
    mesh=mesh,
    checkpoint_dir=checkpoint_dir,
    checkpoint_every=checkpoint_every,
    layers_per_chunk=layers_per_chunk,
  )
  run = (run_options or RunOptions()).replace(
    **{k: v for k, v in overrides.items() if v is not None}
  )
  key = jax.random.PRNGKey(0) if key is None else key
  calibrated = isinstance(recipe.statistics, recipes.Calibration)
  if calibrated and calib_tokens is None:
    raise ValueError(
      f'recipe {recipe.name!r} uses Calibration statistics and needs '
      'calib_tokens ((n_seq, seq_len) int token ids); got None.'
    )
  if not calibrated and calib_tokens is not None:
    raise ValueError(
      f'calib_tokens are only used with Calibration statistics; recipe '
      f'{recipe.name!r} is calibration-free.'
    )
  if calibrated and not run.is_default:
    raise ValueError(
      f'recipe {recipe.name!r} (calibration GPTQ) takes no run options '
      f'(mesh, checkpoint_dir, layers_per_chunk, split_processes); got {run}.'
    )
  t0 = time.perf_counter()
  _validate_run(run, model_config, recipe)
  if run.layers_per_chunk is not None:
    out, report = layerwise.quantize_by_chunks(
      run_recipe, params, model_config, recipe, key, run, progress=progress
    )
  else:
    out, report = run_recipe(
      params, model_config, recipe, key, run=run, calib_tokens=calib_tokens, progress=progress
    )
  report.timings['total'] = time.perf_counter() - t0
  report.extra['peak_memory'] = memory.peak_memory()
  return out, report


def _validate_run(run: RunOptions, model_config, recipe: recipes.Recipe) -> None:
  """Up-front checks of the run options against the model (before any work)."""
  if run.layers_per_chunk is not None:
    layerwise.check_supported(recipe)
  if run.mesh is None:
    return
  learn = isinstance(recipe.transform, recipes.Learned)
  shapes = linears.linear_shapes(model_config)
  shapes = {n: shapes[n] for n in recipe.matrices}
  num_layers = min(run.layers_per_chunk or model_config.num_layers, model_config.num_layers)
  # Group and block sizes against every matrix and the mesh's 'stack' axis.
  for spec in specs.distinct(recipe.spec):
    run.validate(
      [(num_layers, *shapes[n]) for n in shapes],
      spec,
      recipe.transform.block_size if learn else None,
      pad=True,
    )
  if learn and recipe.pairs is None:  # the exact stacks (pairs may drop layers)
    layers = {n: list(range(num_layers)) for n in shapes}
    stacks = single.unit_stacks(shapes, layers, recipe.transform.share)
    run.validate(
      [(len(e), *s) for s, e in stacks.items()], recipe.spec, recipe.transform.block_size
    )


def _transform_key(recipe: recipes.Recipe, key: jax.Array) -> jax.Array:
  baseline = (
    recipe.pairs is None
    and isinstance(recipe.rounding, recipes.RTN)
    and not isinstance(recipe.transform, recipes.Learned)
  )
  return key if baseline else jax.random.split(key)[1]


def run_recipe(
  params,
  model_config,
  recipe: recipes.Recipe,
  key: jax.Array,
  *,
  run: RunOptions | None = None,
  calib_tokens=None,
  layer_offset: int = 0,
  progress: bool = False,
) -> tuple[Any, QuantReport]:
  """The stages of ``recipe`` on all layers of ``params`` (``quantize`` without the
  run-option checks; ``layer_offset`` numbers a chunk's layers for keys and names)."""
  run = RunOptions() if run is None else run
  spec, chosen = recipe.spec, recipe.matrices
  if isinstance(spec, specs.SpecMap):  # keyed by the model's layers, not the chunk's
    spec = spec.shifted(layer_offset)
  report = QuantReport(method=recipe.name, spec=spec.name)
  mats0 = linears.selected_linears(params, model_config, chosen)

  ar_q: dict = {}
  if recipe.pairs is not None:
    t0 = time.perf_counter()
    params, report.extra['pairs'] = paired.apply_pair_transforms(
      params, model_config, recipe.pairs, spec, chosen
    )
    report.timings['pair_transforms'] = time.perf_counter() - t0
    if isinstance(recipe.rounding, recipes.PairAdaptive):
      t0 = time.perf_counter()
      ar_q, hist = paired.adaptive_round_pairs(
        params, model_config, recipe.rounding, spec, chosen, return_history=True
      )
      report.timings['pair_rounding'] = time.perf_counter() - t0
      if hist is not None:  # per layer: RTN's product error and the kept candidate's
        report.extra['pair_rounding'] = {
          'rtn_error': hist[:, 0].tolist(),
          'best_error': hist.min(axis=1).tolist(),
          'candidates': hist.tolist(),
        }
  mats = (
    linears.selected_linears(params, model_config, chosen) if recipe.pairs is not None else mats0
  )

  layers = {n: [l for l in range(model_config.num_layers) if (l, n) not in ar_q] for n in mats}
  learned = isinstance(recipe.transform, recipes.Learned)
  weighted = learned and recipe.transform.loss == recipes.TransformLoss.INPUT
  stats = recipe.statistics

  def rounding_tokens():
    if not isinstance(stats, recipes.SelfGenerated):
      return calib_tokens
    t0 = time.perf_counter()
    out = selfgen.sample_tokens(params, model_config, stats, jax.random.fold_in(key, 2))
    report.timings['selfgen'] = time.perf_counter() - t0
    return out

  # A weighted transform reads the rounding's tokens; any other is learned while they
  # are sampled and (layer by layer) while the sequential rounding runs (same results).
  tokens = rounding_tokens() if weighted else None
  sigma = None
  if weighted:
    t0 = time.perf_counter()
    sigma = sequential.input_moment_blocks(
      params,
      model_config,
      tokens,
      block_size=recipe.transform.block_size,
      damp=recipe.rounding.damp,
      matrices=tuple(mats),
      batch_size=stats.batch_size,
    )
    report.timings['input_statistics'] = time.perf_counter() - t0
  pending = contextlib.nullcontext()
  if recipe.transform is not None:
    pending = single.start_transforms(
      mats,
      layers,
      recipe.transform,
      spec,
      _transform_key(recipe, key),
      run=run,
      layer_offset=layer_offset,
      progress=progress,
      sigma=sigma,
      by_layer=recipe.sequential,
    )
  with pending:
    if recipe.sequential:
      tokens = rounding_tokens() if tokens is None else tokens
      t0 = time.perf_counter()
      qarrays, extra = sequential.round_sequential(
        params,
        model_config,
        tokens,
        spec=spec,
        matrices=chosen,
        rounding_stage=recipe.rounding,
        batch_size=stats.batch_size,
        blocks=pending if recipe.transform is not None else None,
      )
      report.timings['rounding'] = time.perf_counter() - t0
      report.extra['sequential'] = {'source': type(stats).__name__, **extra}
    blocks, init_losses = {}, {}
    if recipe.transform is not None:
      blocks, init_losses, shape_t = pending.result()
      report.timings['transforms'] = pending.seconds
      report.extra['transform_seconds_by_shape'] = shape_t
  if recipe.sequential:
    tinvs = {k: (blocks[k][1] if k in blocks else None) for k in qarrays}
  else:
    t0 = time.perf_counter()
    rounding = (
      recipes.RTN() if isinstance(recipe.rounding, recipes.PairAdaptive) else (recipe.rounding)
    )
    qarrays, tinvs = single.round_matrices(mats, layers, blocks, spec, rounding)
    report.timings['rounding'] = time.perf_counter() - t0
  for k, q in ar_q.items():
    qarrays[k], tinvs[k] = q, None
  _fill_report(report, mats0, mats, qarrays, tinvs, spec, recipe)
  for k, v in init_losses.items():
    report.per_matrix[k]['init'] = v
  for k in ar_q:
    report.per_matrix[k]['pair_adaptive_rounding'] = 1.0
  return linears.quantized_params(params, model_config, qarrays, tinvs), report


def _fill_report(report, mats0, mats, qarrays, tinvs, spec, recipe: recipes.Recipe):
  rtn = single.rtn_losses(mats0, spec)
  final = single.proxy_losses(mats, qarrays, tinvs)
  for k in sorted(final):
    report.per_matrix[k] = {'rtn': rtn[k], 'final': final[k]}
  report.extra['online_overhead'] = single.online_overhead(mats, tinvs)
  report.extra['block_size'] = (
    recipe.transform.block_size if any(t is not None for t in tinvs.values()) else None
  )
  report.extra['num_matrices'] = len(final)
  report.extra['rtn_total'] = float(np.sum(list(rtn.values())))
