"""``quantize(params, model_config, quant_config, key)``: the method registry.

A method is a pure function of ``(params, model_config, quant_config, key)``
returning ``(quantized params, QuantReport)``: the same param tree with each
selected weight leaf replaced by a ``QuantizedLinear`` (``transform_inv`` set for
online transforms). Registered methods (``Method``):

* ``rtn``: round-to-nearest of every selected matrix.
* ``hadamard``: fixed randomised block-Hadamard rotation ``M`` (online ``x M⁻¹ =
  x Mᵀ``), then RTN of ``M W`` — the data-free baseline.
* ``cafeq``: (1) pair transforms folded into the fp weights (``use_pairs``,
  ``methods.paired``); (2) learned single-matrix online transforms
  (``use_single_transforms``) for the matrices not adaptively rounded as pairs;
  (3) rounding: pair adaptive rounding (``adaptive_rounding``) for pairs, GPTQ-form
  rounding under the transform (``rounding='gptq'``) or RTN for the others. The
  proxy's input statistics: ``Σ ∝ I`` (``statistics='identity'``, the Frobenius
  proxy) or, data-free, ``Σ`` measured on sequences the model samples itself,
  layer by layer (``statistics='selfgen'``, ``_selfgen_rounding``).
* ``gptq``: ``methods.gptq.quantize_gptq`` with calibration tokens (comparison).
"""

from __future__ import annotations

import importlib
import time
from typing import Any, Callable

import jax
import numpy as np

from cafeq_jax.distributed import memory
from cafeq_jax.methods import _tree
from cafeq_jax.methods import layerwise
from cafeq_jax.methods import single
from cafeq_jax.methods.config import Method, QuantConfig
from cafeq_jax.methods.report import QuantReport
from cafeq_jax.methods.run_options import RunOptions

MethodFn = Callable[..., tuple[Any, QuantReport]]
_REGISTRY: dict[Method, MethodFn] = {}


def register(method: Method | str) -> Callable[[MethodFn], MethodFn]:
  """Decorator registering ``fn(params, model_config, quant_config, key, **kw)``."""
  def deco(fn):
    _REGISTRY[Method(method)] = fn
    return fn
  return deco


def available_methods() -> tuple[str, ...]:
  return tuple(m.value for m in Method)


def quantize(params, model_config, quant_config: QuantConfig,
             key: jax.Array | None = None, *, calib_tokens=None, mesh=None,
             checkpoint_dir: str | None = None, checkpoint_every: int | None = None,
             layers_per_chunk: int | None = None,
             run_options: RunOptions | None = None) -> tuple[Any, QuantReport]:
  """Quantizes a model's params with the configured method.

  The keyword-only run options change where and how the work runs, never the
  result: the quantized model has the same codes (learned transforms equal to
  float32 rounding) as a plain single-device run.

  Args:
    params: fp param tree (CONTRACTS.md layout).
    model_config: its ``ModelConfig``.
    quant_config: ``QuantConfig`` (method and options).
    key: PRNG key (default ``PRNGKey(quant_config.seed)``); the result is a
      deterministic function of the inputs and the key.
    calib_tokens: calibration token ids, required by (and only used by) 'gptq'.
    mesh: ``jax.sharding.Mesh`` with an axis ``'stack'``
      (``distributed.make_mesh()``): each stack of same-shape matrices is
      optimised sharded along it (``NamedSharding``, GSPMD). Group / block /
      mesh divisibility is checked before any work.
    checkpoint_dir: resumable Orbax checkpoints of the transform optimisation,
      one sub-directory per stacked unit: a killed run restarted with the same
      arguments resumes where it stopped and ends with the same model.
    checkpoint_every: steps between checkpoints (default 50).
    layers_per_chunk: quantize this many layers at a time, the fp model kept on
      the host (``methods.layerwise``; 'rtn', 'hadamard', 'cafeq' with single
      transforms).
    run_options: a full ``RunOptions`` (padding, kept checkpoints, process
      split, per-step callback); the arguments above override its fields.
      With several processes (``jax.process_count() > 1``) the stacks are split
      over them (``distributed.split_loop``) unless a mesh or checkpoint_dir
      selects the global-mesh path.

  Returns:
    ``(quantized params, report)``; ``report.extra['peak_memory']`` holds the
    process's peak host / device memory (``distributed.peak_memory``).
  """
  if not isinstance(quant_config, QuantConfig):
    raise TypeError(f'quant_config must be a QuantConfig; got {type(quant_config).__name__}.')
  overrides = dict(mesh=mesh, checkpoint_dir=checkpoint_dir,
                   checkpoint_every=checkpoint_every, layers_per_chunk=layers_per_chunk)
  run = (run_options or RunOptions()).replace(
      **{k: v for k, v in overrides.items() if v is not None})
  if key is None:
    key = jax.random.PRNGKey(quant_config.seed)
  fn = _REGISTRY.get(quant_config.method)
  if fn is None:
    raise ValueError(f'method {quant_config.method.value!r} has no implementation; '
                     f'registered: {sorted(m.value for m in _REGISTRY)}.')
  t0 = time.perf_counter()
  if quant_config.method == Method.GPTQ:
    if not run.is_default:
      raise ValueError('method="gptq" takes no run options (mesh, checkpoint_dir, '
                       f'layers_per_chunk, split_processes); got {run}.')
    out, report = fn(params, model_config, quant_config, key, calib_tokens=calib_tokens)
  else:
    if calib_tokens is not None:
      raise ValueError(f'calib_tokens are only used by method="gptq"; method='
                       f'{quant_config.method.value!r} is calibration-free.')
    _validate_run(run, model_config, quant_config)
    if run.layers_per_chunk is not None:
      out, report = layerwise.quantize_by_chunks(fn, params, model_config, quant_config,
                                                 key, run)
    else:
      out, report = fn(params, model_config, quant_config, key, run=run)
  report.timings['total'] = time.perf_counter() - t0
  report.extra['peak_memory'] = memory.peak_memory()
  return out, report


def _validate_run(run: RunOptions, model_config, quant_config: QuantConfig) -> None:
  """Up-front checks of the run options against the model (before any work)."""
  if run.layers_per_chunk is not None:
    layerwise.check_supported(quant_config)
  if run.mesh is None:
    return
  from cafeq_jax.models import linears  # pylint: disable=g-import-not-at-top
  learn = (quant_config.method == Method.CAFEQ and quant_config.use_single_transforms
           and quant_config.single_transform == 'learn')
  shapes = linears.linear_shapes(model_config)
  shapes = {n: shapes[n] for n in quant_config.matrices}
  num_layers = min(run.layers_per_chunk or model_config.num_layers, model_config.num_layers)
  # Group and block sizes against every matrix and the mesh's 'stack' axis.
  run.validate([(num_layers, *shapes[n]) for n in shapes], quant_config.spec,
               quant_config.block_size if learn else None, pad=True)
  if learn and not quant_config.use_pairs:  # the exact stacks (pairs may drop layers)
    layers = {n: list(range(num_layers)) for n in shapes}
    stacks = single.unit_stacks(shapes, layers, quant_config.share_transforms)
    run.validate([(len(e), *s) for s, e in stacks.items()], quant_config.spec,
                 quant_config.block_size)


def _all_layers(mats, model_config):
  return {n: list(range(model_config.num_layers)) for n in mats}


@register(Method.RTN)
def quantize_rtn(params, model_config, quant_config: QuantConfig, key=None, *,
                 run: RunOptions | None = None, layer_offset: int = 0):
  """Round-to-nearest of every selected matrix (nothing to optimise: ``run`` unused)."""
  del key, run, layer_offset
  mats = _tree.selected_linears(params, model_config, quant_config)
  layers = _all_layers(mats, model_config)
  t0 = time.perf_counter()
  qarrays, tinvs = single.round_matrices(mats, layers, {}, quant_config.replace(rounding='rtn'))
  report = QuantReport(method='rtn', spec=quant_config.spec.name)
  report.timings['rounding'] = time.perf_counter() - t0
  _fill_report(report, mats, mats, qarrays, tinvs, quant_config)
  return _tree.build_quantized_params(params, model_config, qarrays, tinvs), report


@register(Method.HADAMARD)
def quantize_hadamard(params, model_config, quant_config: QuantConfig, key, *,
                      run: RunOptions | None = None, layer_offset: int = 0):
  """Random block-Hadamard rotation (online) + RTN (nothing to optimise: ``run`` unused)."""
  del run
  mats = _tree.selected_linears(params, model_config, quant_config)
  layers = _all_layers(mats, model_config)
  t0 = time.perf_counter()
  blocks, _, _ = single.transforms_for(mats, layers, quant_config, key, mode='hadamard',
                                       layer_offset=layer_offset)
  qarrays, tinvs = single.round_matrices(mats, layers, blocks, quant_config.replace(rounding='rtn'))
  report = QuantReport(method='hadamard', spec=quant_config.spec.name)
  report.timings['rounding'] = time.perf_counter() - t0
  _fill_report(report, mats, mats, qarrays, tinvs, quant_config)
  return _tree.build_quantized_params(params, model_config, qarrays, tinvs), report


def _paired():
  try:
    return importlib.import_module('cafeq_jax.methods.paired')
  except ImportError as e:
    raise NotImplementedError(
        f'use_pairs/adaptive_rounding need cafeq_jax.methods.paired, which could not be '
        f'imported ({e}); set use_pairs=False.') from e


@register(Method.CAFEQ)
def quantize_cafeq(params, model_config, quant_config: QuantConfig, key, *,
                   run: RunOptions | None = None, layer_offset: int = 0):
  """CafeQ: folded pair transforms -> online single transforms -> rounding.

  ``run`` (mesh, checkpoints, processes) applies to the single-transform
  optimisation; pair transforms run with their own single-device loop.
  """
  k_pairs, k_single = jax.random.split(key)
  report = QuantReport(method='cafeq', spec=quant_config.spec.name)
  mats0 = _tree.selected_linears(params, model_config, quant_config)

  ar_q: dict = {}
  if quant_config.use_pairs:
    t0 = time.perf_counter()
    params, pair_report = _paired().apply_pair_transforms(
        params, model_config, quant_config, k_pairs)
    report.timings['pair_transforms'] = time.perf_counter() - t0
    report.extra['pairs'] = pair_report
    if quant_config.adaptive_rounding:
      t0 = time.perf_counter()
      ar_q = _paired().adaptive_round_pairs(params, model_config, quant_config)
      ar_q = {k: v for k, v in ar_q.items() if k[1] in quant_config.matrices}
      report.timings['pair_rounding'] = time.perf_counter() - t0
  mats = (_tree.selected_linears(params, model_config, quant_config)
          if quant_config.use_pairs else mats0)

  layers = {n: [l for l in range(model_config.num_layers) if (l, n) not in ar_q]
            for n in mats}
  blocks, init_losses = {}, {}
  if quant_config.use_single_transforms:
    t0 = time.perf_counter()
    blocks, init_losses, shape_t = single.transforms_for(
        mats, layers, quant_config, k_single, mode=quant_config.single_transform, run=run,
        layer_offset=layer_offset)
    report.timings['transforms'] = time.perf_counter() - t0
    report.extra['transform_seconds_by_shape'] = shape_t
  t0 = time.perf_counter()
  if quant_config.statistics == 'selfgen':
    qarrays, tinvs = _selfgen_rounding(params, model_config, quant_config,
                                       jax.random.fold_in(key, 2), blocks, report)
  else:
    qarrays, tinvs = single.round_matrices(mats, layers, blocks, quant_config)
  # The self-generation has its own entry ('selfgen'); rounding is what follows it.
  report.timings['rounding'] = (time.perf_counter() - t0
                                - report.timings.get('selfgen', 0.0))
  for k, q in ar_q.items():
    qarrays[k], tinvs[k] = q, None
  _fill_report(report, mats0, mats, qarrays, tinvs, quant_config)
  for k, v in init_losses.items():
    report.per_matrix[k]['init'] = v
  for k in ar_q:
    report.per_matrix[k]['pair_adaptive_rounding'] = 1.0
  return _tree.build_quantized_params(params, model_config, qarrays, tinvs), report


def _selfgen_rounding(params, model_config, quant_config: QuantConfig, key, blocks,
                      report: QuantReport):
  """GPTQ-form rounding of every matrix under its self-generated ``Σ`` (data-free).

  The fp model samples ``selfgen_num_seqs`` sequences from its start token (id 0);
  the rounding then runs layer by layer (``methods.gptq.gptq_qarrays``): each
  matrix's ``Σ`` is measured on those sequences through the already-quantized
  earlier layers, and transformed matrices are rounded under ``M⁻ᵀ Σ M⁻¹``.
  """
  from cafeq_jax.methods import gptq as gptq_method  # pylint: disable=g-import-not-at-top
  from cafeq_jax.methods import stats_adapter  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  tokens = stats_adapter.selfgen_tokens(
      params, model_config, num_seqs=quant_config.selfgen_num_seqs,
      seq_len=quant_config.selfgen_seq_len, key=key,
      temperature=quant_config.selfgen_temperature)
  report.timings['selfgen'] = time.perf_counter() - t0
  qarrays, extra = gptq_method.gptq_qarrays(params, model_config, quant_config, tokens,
                                            blocks=blocks)
  report.extra['selfgen'] = {'tokens': int(tokens.size), **extra}
  tinvs = {k: (blocks[k][1] if k in blocks else None) for k in qarrays}
  return qarrays, tinvs


@register(Method.GPTQ)
def quantize_gptq(params, model_config, quant_config: QuantConfig, key, *, calib_tokens=None):
  """GPTQ with calibration activations (``methods.gptq``, comparison only)."""
  del key
  if calib_tokens is None:
    raise ValueError('method="gptq" needs calib_tokens (calibration token ids, e.g. '
                     '(n_seq, seq_len) int32); got None.')
  try:
    gptq = importlib.import_module('cafeq_jax.methods.gptq')
  except ImportError as e:
    raise NotImplementedError(f'method="gptq" needs cafeq_jax.methods.gptq ({e}).') from e
  mats0 = _tree.selected_linears(params, model_config, quant_config)
  out = gptq.quantize_gptq(params, model_config, quant_config, calib_tokens)
  extra = None
  if isinstance(out, tuple):
    out, extra = out
  report = QuantReport(method='gptq', spec=quant_config.spec.name)
  if extra is not None:
    report.extra['gptq'] = extra
  qarrays, tinvs = _qarrays_from_tree(out, model_config, quant_config)
  _fill_report(report, mats0, mats0, qarrays, tinvs, quant_config)
  return out, report


def _qarrays_from_tree(qparams, model_config, quant_config):
  """``(layer, name) -> QArray`` / transform of a quantized tree's leaves."""
  qarrays, tinvs = {}, {}
  for group, path in _tree.LEAF_PATHS.items():
    if group[0] not in quant_config.matrices:
      continue
    for l in range(model_config.num_layers):
      node = qparams[f'layer_{l}']
      for p in path:
        node = node[p]
      if not _tree.is_quantized_leaf(node):
        continue
      from cafeq_jax.models import qlinear  # pylint: disable=g-import-not-at-top
      q = qlinear._qarray(node.weight)  # pylint: disable=protected-access
      t = node.transform_inv
      for i, n in enumerate(group):
        qarrays[(l, n)] = q if len(group) == 1 else _tree.slice_qarray(q, i)
        tinvs[(l, n)] = t if (t is None or t.ndim == 3) else t[i]
  return qarrays, tinvs


def _fill_report(report, mats0, mats, qarrays, tinvs, quant_config):
  rtn = single.rtn_losses(mats0, quant_config.spec)
  final = single.proxy_losses(mats, qarrays, tinvs)
  for k in sorted(final):
    report.per_matrix[k] = {'rtn': rtn[k], 'final': final[k]}
  report.extra['online_overhead'] = single.online_overhead(mats, tinvs)
  report.extra['block_size'] = quant_config.block_size if any(
      t is not None for t in tinvs.values()) else None
  report.extra['num_matrices'] = len(final)
  report.extra['rtn_total'] = float(np.sum(list(rtn.values())))
