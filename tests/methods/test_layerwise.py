"""Layer-by-layer quantization (``layers_per_chunk``) equals the all-at-once run."""

from __future__ import annotations

import os
import resource
import sys

import jax
import numpy as np
import pytest

from cafeq_jax import methods
from cafeq_jax import quantizer
from cafeq_jax import recipes
from cafeq_jax.models import linears
from cafeq_jax.models import qlinear

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import scaleout_worker as worker  # pylint: disable=g-import-not-at-top,wrong-import-position

SPEC = quantizer.QuantSpec(bits=3, group_size=32)


def _assert_same(chunked, whole, atol):
  worker.assert_same_flat(worker.flatten(chunked), worker.flatten(whole), atol)


def _host_peak_mib() -> float:
  """Peak RSS of this process read from the OS (Linux: ru_maxrss in KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**20


def _device_peak_mib():
  """Largest allocator peak over the local devices, or None (CPU has no statistics)."""
  peaks = []
  for d in jax.local_devices():
    try:
      stats = d.memory_stats() or {}
    except Exception:  # pylint: disable=broad-except  (backends without statistics)
      stats = {}
    if 'peak_bytes_in_use' in stats:
      peaks.append(stats['peak_bytes_in_use'])
  return max(peaks) / 2**20 if peaks else None


@pytest.mark.parametrize(
  'name, recipe, chunk, atol',
  [
    ('tiny_gemma2', recipes.get('rtn', spec=SPEC), 2, 0.0),
    ('tiny_llama', recipes.get('hadamard', spec=SPEC, transform__block_size=32), 1, 0.0),
    # Learned transforms (Hadamard init, column subsets): stacks of 2 instead of
    # 4 units fuse reductions differently, so transforms agree to rounding.
    ('tiny_llama', worker.RECIPE, 1, 1e-5),
  ],
)
def test_layer_by_layer_equals_all_at_once(name, recipe, chunk, atol):
  cfg, params = worker.tiny_model(name)  # host numpy weights
  host_before = _host_peak_mib()
  whole, rep_w = methods.quantize(params, cfg, recipe)
  chunked, rep_c = methods.quantize(params, cfg, recipe, layers_per_chunk=chunk)
  host_after = _host_peak_mib()
  _assert_same(chunked, whole, atol)
  # The quantized layers come back to the host.
  leaf = chunked['layer_0']['mlp']['gating_einsum']
  assert isinstance(leaf, qlinear.QuantizedLinear)
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(chunked['layer_0']))
  # Same report, layers renumbered; peak memory and chunk sizes recorded.
  assert sorted(rep_c.per_matrix) == sorted(rep_w.per_matrix)
  for k, v in rep_w.per_matrix.items():
    assert rep_c.per_matrix[k]['final'] == pytest.approx(v['final'], rel=1e-4)
  assert rep_c.extra['online_overhead'] == pytest.approx(rep_w.extra['online_overhead'])
  assert rep_c.extra['num_matrices'] == rep_w.extra['num_matrices']
  lw = rep_c.extra['layerwise']
  num_chunks = -(-cfg.num_layers // chunk)
  assert lw['layers_per_chunk'] == chunk and lw['num_chunks'] == num_chunks
  assert lw['chunk_fp32_mib'] == pytest.approx(lw['model_fp32_mib'] * chunk / cfg.num_layers)
  assert len(lw['peak_memory_after_chunk']) == num_chunks
  # Peaks as the OS and the device allocator report them, never decreasing.
  peaks = [rep_w.extra['peak_memory'], *lw['peak_memory_after_chunk'], rep_c.extra['peak_memory']]
  hosts = [p['peak_host_mib'] for p in peaks]
  assert host_before <= hosts[0] and hosts == sorted(hosts) and hosts[-1] <= host_after
  device = _device_peak_mib()
  if device is None:
    assert all(p['peak_device_mib'] is None for p in peaks)
  else:
    assert peaks[-1]['peak_device_mib'] == pytest.approx(device, rel=0.1)
  # The chunk and model sizes: float32 bytes of the selected matrices.
  shapes = [s for n, s in linears.linear_shapes(cfg).items() if n in recipe.matrices]
  per_layer = sum(d_in * d_out for d_in, d_out in shapes) * 4 / 2**20
  assert lw['model_fp32_mib'] == pytest.approx(per_layer * cfg.num_layers)
