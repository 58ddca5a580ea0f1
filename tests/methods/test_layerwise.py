"""Layer-by-layer quantization (``layers_per_chunk``) equals the all-at-once run."""

from __future__ import annotations

import os
import sys

import jax
import numpy as np
import pytest

from cafeq_jax import methods
from cafeq_jax.models import qlinear

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import scaleout_worker as worker  # pylint: disable=g-import-not-at-top,wrong-import-position

SPEC = dict(bits=3, group_size=32)


def _assert_same(chunked, whole, atol):
  worker.assert_same_flat(worker.flatten(chunked), worker.flatten(whole), atol)


@pytest.mark.parametrize('name, quant_config, chunk, atol', [
    ('tiny_gemma2', methods.QuantConfig(method='rtn', spec=SPEC), 2, 0.0),
    ('tiny_llama', methods.QuantConfig(method='hadamard', spec=SPEC, block_size=32), 1, 0.0),
    # Learned transforms (Hadamard init, column subsets): stacks of 2 instead of
    # 4 units fuse reductions differently, so transforms agree to rounding.
    ('tiny_llama', worker.QC, 1, 1e-5),
])
def test_layer_by_layer_equals_all_at_once(name, quant_config, chunk, atol):
  cfg, params = worker.tiny_model(name)  # host numpy weights
  whole, rep_w = methods.quantize(params, cfg, quant_config)
  chunked, rep_c = methods.quantize(params, cfg, quant_config, layers_per_chunk=chunk)
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
  for rep in (rep_w, rep_c):
    assert rep.extra['peak_memory']['peak_host_mib'] > 0
