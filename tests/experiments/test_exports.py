"""The main job's and the sweep's --config.export: GGUF mixes and compressed-tensors."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from cafeq_jax import quantize
from cafeq_jax.ggml import mixes
from cafeq_jax.loading import gguf as gguf_lib
from cafeq_jax.models import linears
from experiments import quantize_lib
from experiments import sweep
from experiments.configs import sweep as sweep_config
from tests.experiments import reference_metrics
from tests.experiments.test_quantize import _tiny_config


def test_main_job_writes_gguf_and_compressed_tensors_then_keeps_them(tmp_path):
  config = _tiny_config(tmp_path, methods='rtn', plots=False)
  config.export = 'gguf:Q4_0,ct'
  quantize_lib.run(config)
  with open(tmp_path / 'results.json') as f:
    cols = json.load(f)['columns']
  assert set(cols) == {'w4g32asym', 'gguf-Q4_0'}
  model = quantize_lib.load_model(config.model, config.seed)
  smap = mixes.spec_map('Q4_0', model.config)
  recipe = quantize_lib.recipe_for('rtn', smap, config)
  qparams, _ = quantize(model.params, model.config, recipe, jax.random.PRNGKey(config.seed))
  # The GGUF column's metrics are those of the mix's codes, evaluated independently.
  tokens = reference_metrics.job_tokens(model, config)
  reference_metrics.assert_row_matches(
    cols['gguf-Q4_0']['methods']['rtn'],
    reference_metrics.metrics(model.config, model.params, qparams, tokens),
  )
  path = tmp_path / 'gguf' / 'gguf-Q4_0_rtn.gguf'
  back, _ = gguf_lib.load_gguf(path)
  for a, b in zip(
    jax.tree.leaves(linears.dequantize_params(qparams, model.config)), jax.tree.leaves(back)
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  ct = tmp_path / 'ct' / 'w4g32asym_rtn'
  with open(ct / 'config.json') as f:
    assert json.load(f)['quantization_config']['format'] == 'pack-quantized'
  assert not (tmp_path / 'ct' / 'gguf-Q4_0_rtn').exists()
  stamps = {p: os.stat(p).st_mtime_ns for p in (path, ct / 'model.safetensors')}
  quantize_lib.run(config)  # same inputs: every file kept
  assert stamps == {p: os.stat(p).st_mtime_ns for p in stamps}


@pytest.mark.parametrize(
  'methods,columns,export,match',
  [
    ('rtn,hadamard', 'w4g32', 'gguf:Q4_0', "row 'hadamard'.*Hadamard"),
    ('rtn', 'w3g32', 'ct', 'bits=3'),
    ('rtn', 'w4g32', 'gguf:Q9_K', 'unknown'),
    ('rtn', 'w4g32', 'onnx', 'not a format'),
  ],
)
def test_bad_exports_fail_before_any_work(tmp_path, methods, columns, export, match):
  config = _tiny_config(tmp_path / 'out', methods=methods, plots=False)
  config.columns, config.export = columns, export
  with pytest.raises(ValueError, match=match):
    quantize_lib.run(config)
  assert not (tmp_path / 'out' / 'results.json').exists()


def test_sweep_export_adds_mix_points_and_refuses_online_transforms(tmp_path):
  c = sweep_config.get_config()
  c.models, c.methods, c.bits, c.group_sizes = 'tiny_llama', 'rtn', '4', '32'
  c.workdir = str(tmp_path)
  c.eval_num_seqs, c.eval_seq_len = 2, 16
  c.export = 'gguf:Q4_K_M,ct'
  points = sweep.grid(c)
  assert [p.name for p in points] == ['tiny_llama/rtn/w4g32', 'tiny_llama/rtn/gguf-Q4_K_M']
  row = sweep.run_point(points[1], c)
  back, _ = gguf_lib.load_gguf(row['gguf_path'])
  assert set(back) >= {'embedder', 'layer_0'}
  c.methods = 'hadamard'
  with pytest.raises(ValueError, match='Hadamard'):
    sweep.grid(c)
