"""Layer-by-layer quantization: one chunk of layers on the device at a time.

``methods.quantize(..., layers_per_chunk=c)`` runs the method on layers ``[0, c)``,
then ``[c, 2c)``, ... of the model as if each chunk were a model of its own
(same ``ModelConfig`` with ``num_layers`` = the chunk size), moves each chunk's
quantized layers to the host (numpy) and assembles one quantized param tree.
Randomness is keyed per ``(layer, matrix)`` and per matrix shape, never by the
position in a stack (``methods.single.transforms_for``), so the result is the
same quantized model as the all-at-once run for recipes without pairs and
without sequential statistics (RTN / Frobenius GPTQ rounding, any online
transform): codes equal, learned transforms equal to float32
rounding (stacks of another size may fuse reductions differently).

What it bounds: the *device* holds, at any time, only the float32 matrices of
one chunk (the input leaves of its layers are put on the device when read), its
optimisation state, and its quantized result until it is copied to the host.
With ``params`` given as host numpy arrays (e.g. straight from a loader), a
model whose full-precision weights do not fit one device is quantized on it.

What it does not bound: host memory, which holds the whole fp model (as given)
plus the quantized result; the embedding and final norm are not touched (left as
given, on whatever device they are). ``params`` given as device arrays are
already resident: pass host arrays to get the saving. The chunk size must keep
one chunk's stacks (and, with a mesh, each device's share of them) within device
memory. Not supported: pair transforms / pair adaptive rounding (they are per
layer too, but their chunk invariance is not established) and self-generated or
calibration statistics, which propagate activations through the whole model.

The report merges the chunks' reports (layers renumbered, timings summed) and
records ``extra['layerwise']``: chunk size and count, the float32 bytes of the
selected matrices of the largest chunk (what the device holds) and of the whole
model, and the process's peak memory after every chunk
(``distributed.memory.peak_memory``: host RSS, and the device allocator's
``peak_bytes_in_use`` where the backend reports it, not on CPU; both are peaks
over the process's lifetime, not per chunk).
"""

from __future__ import annotations

from collections.abc import Callable
import functools
import os
from typing import Any

import jax
import numpy as np

from cafeq_jax import recipes
from cafeq_jax.distributed import memory
from cafeq_jax.methods.report import QuantReport
from cafeq_jax.methods.run_options import RunOptions
from cafeq_jax.models import linears


def check_supported(recipe: recipes.Recipe) -> None:
  """Raises a ValueError for recipes the layer-by-layer path does not run."""
  if recipe.pairs is not None:
    raise ValueError(
      f'layers_per_chunk does not support pair transforms (recipe {recipe.name!r}); '
      'quantize all layers at once, or use single transforms only.'
    )
  if recipe.sequential:
    raise ValueError(
      f'layers_per_chunk does not support {type(recipe.statistics).__name__} statistics '
      f'(recipe {recipe.name!r}): its input statistics run the whole model forward; '
      'quantize all layers at once.'
    )


def _fp32_mib(model_config, recipe: recipes.Recipe, num_layers: int) -> float:
  shapes = linears.linear_shapes(model_config)
  return num_layers * sum(int(np.prod(shapes[n])) for n in recipe.matrices) * 4 / 2**20


def quantize_by_chunks(
  fn: Callable[..., tuple[Any, QuantReport]],
  params,
  model_config,
  recipe: recipes.Recipe,
  key: jax.Array,
  run: RunOptions,
  *,
  progress: bool = False,
) -> tuple[Any, QuantReport]:
  """Runs the recipe chunk by chunk (see module docstring).

  Args:
    fn: ``methods.api.run_recipe(params, model_config, recipe, key, *, run,
      layer_offset, progress)``.
    params: fp param tree (leaves preferably host numpy arrays).
    model_config: its ``ModelConfig``.
    recipe: the recipe (see ``check_supported``).
    key: PRNG key.
    run: run options; ``run.layers_per_chunk`` layers per chunk. Chunk ``[a,
      b)`` is named ``layers_<a>-<b-1>`` (4 digits): it checkpoints under
      ``checkpoint_dir/<name>/`` and its units reach ``run.callback`` as
      ``<name>/<unit>``.

  Returns:
    ``(quantized params, report)``: the layers' leaves as host numpy arrays
    (``QuantizedLinear`` nodes included), other top-level entries as given.
  """
  check_supported(recipe)
  num_layers = model_config.num_layers
  chunk = run.layers_per_chunk
  missing = [f'layer_{l}' for l in range(num_layers) if f'layer_{l}' not in params]
  if missing:
    raise ValueError(f'params lack {missing[:3]} (model_config.num_layers={num_layers}).')
  out = dict(params)
  parts, peaks = [], []
  for start in range(0, num_layers, chunk):
    stop = min(start + chunk, num_layers)
    sub_cfg = model_config.replace(num_layers=stop - start)
    sub = {f'layer_{i}': params[f'layer_{l}'] for i, l in enumerate(range(start, stop))}
    name = f'layers_{start:04d}-{stop - 1:04d}'
    sub_run = run.replace(layers_per_chunk=None)
    if run.checkpoint_dir is not None:
      sub_run = sub_run.replace(checkpoint_dir=os.path.join(run.checkpoint_dir, name))
    if run.callback is not None:
      sub_run = sub_run.replace(callback=functools.partial(_scoped, run.callback, name))
    qsub, report = fn(sub, sub_cfg, recipe, key, run=sub_run, layer_offset=start, progress=progress)
    qsub = jax.device_get(qsub)  # the chunk leaves the device
    for i, l in enumerate(range(start, stop)):
      out[f'layer_{l}'] = qsub[f'layer_{i}']
    del qsub, sub
    parts.append((start, stop, report))
    peaks.append(memory.peak_memory())
  report = _merge(parts)
  report.extra['layerwise'] = {
    'layers_per_chunk': chunk,
    'num_chunks': len(parts),
    'chunk_fp32_mib': _fp32_mib(model_config, recipe, min(chunk, num_layers)),
    'model_fp32_mib': _fp32_mib(model_config, recipe, num_layers),
    'peak_memory_after_chunk': peaks,
  }
  return out, report


def _scoped(callback, chunk, unit, step, state):
  callback(f'{chunk}/{unit}', step, state)


def _merge(parts: list[tuple[int, int, QuantReport]]) -> QuantReport:
  """One report from the chunks' reports: layers renumbered, numbers combined."""
  first = parts[0][2]
  out = QuantReport(method=first.method, spec=first.spec)
  layers = [stop - start for start, stop, _ in parts]
  for start, _, rep in parts:
    for (l, n), v in rep.per_matrix.items():
      out.per_matrix[(l + start, n)] = dict(v)
  out.timings = _combine([rep.timings for _, _, rep in parts], layers)
  out.extra = _combine([rep.extra for _, _, rep in parts], layers)
  return out


_MEANS = ('online_overhead',)  # ratios: layer-weighted mean (chunks hold the same matrices)
_FIRST = ('block_size',)


def _combine(dicts: list[dict], weights: list[int]) -> dict:
  out = {}
  for k in dict.fromkeys(k for d in dicts for k in d):
    vals = [d[k] for d in dicts if k in d]
    w = [wt for d, wt in zip(dicts, weights) if k in d]
    if k in _FIRST:
      out[k] = next((v for v in vals if v is not None), None)
    elif all(isinstance(v, dict) for v in vals):
      out[k] = _combine(vals, w)
    elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
      out[k] = sum(v * x for v, x in zip(vals, w)) / sum(w) if k in _MEANS else sum(vals)
    else:
      out[k] = vals[0]
  return out
