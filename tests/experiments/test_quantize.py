"""The main job: one tiny run writes results, table and plots; a rerun resumes."""

from __future__ import annotations

import json
import os

import pytest

from experiments import quantize_lib
from experiments.configs import quantize as quantize_config

_PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def _tiny_config(output_dir, methods='rtn,hadamard'):
  c = quantize_config.get_config()
  c.model = 'tiny_llama'
  c.methods = methods
  c.columns = 'w4g32'
  c.eval_num_seqs = 2
  c.eval_seq_len = 16
  c.eval_batch_size = 2
  c.output_dir = str(output_dir)
  c.save_models = ''
  c.prompt = ''
  c.progress = False
  c.cafeq.steps = 1
  c.cafeq.block_size = 32
  return c


def _assert_png(path):
  assert os.path.getsize(path) > 1000, path
  with open(path, 'rb') as f:
    assert f.read(8) == _PNG_MAGIC, path


def test_tiny_run_writes_results_table_and_plots_then_resumes(tmp_path, monkeypatch):
  config = _tiny_config(tmp_path)
  results = quantize_lib.run(config)

  with open(tmp_path / 'results.json') as f:
    on_disk = json.load(f)
  col = 'w4g32asym'
  assert set(on_disk['columns']) == {col}
  rows = on_disk['columns'][col]['methods']
  assert set(rows) == {'fp', 'rtn', 'hadamard'}
  for m in ('rtn', 'hadamard'):
    assert rows[m]['ppl'] > 1 and rows[m]['kld'] >= 0
    assert 4 < rows[m]['bits_per_weight'] < 32
  assert rows['fp']['kld'] == 0.0
  assert results['columns'][col]['methods']['rtn']['ppl'] == rows['rtn']['ppl']

  table = (tmp_path / 'table.md').read_text()
  assert '| rtn |' in table and '| hadamard |' in table and f'{col} ppl' in table

  for m in ('rtn', 'hadamard'):
    report = json.loads((tmp_path / 'reports' / f'{col}_{m}.json').read_text())
    assert len(report['per_matrix']) == 2 * 7   # tiny_llama: 2 layers x 7 matrices
  plots = sorted(os.listdir(tmp_path / 'plots'))
  assert plots == sorted([f'proxy_{col}.png', f'proxy_loss_{col}.png', 'ppl_vs_bits.png'])
  for p in plots:
    _assert_png(tmp_path / 'plots' / p)

  # Rerun with the same config: every cell is done, nothing is re-quantized.
  def fail(*args, **kwargs):
    raise AssertionError('a finished (column, method) cell was quantized again')
  monkeypatch.setattr(quantize_lib, 'quantize', fail)
  again = quantize_lib.run(config)
  assert again['columns'][col]['methods']['rtn']['ppl'] == rows['rtn']['ppl']
  assert (tmp_path / 'table.md').read_text() == table


def test_unknown_method_fails_before_any_work(tmp_path):
  config = _tiny_config(tmp_path / 'out', methods='rtn,nope')
  with pytest.raises(ValueError, match='nope'):
    quantize_lib.run(config)
  assert not (tmp_path / 'out' / 'results.json').exists()


def test_tiny_run_with_data_free_selfgen_cafeq_saves_and_counts_storage(tmp_path):
  config = _tiny_config(tmp_path, methods='rtn,cafeq-sg')
  config.selfgen_num_seqs = 2
  config.selfgen_seq_len = 16
  config.save_models = 'cafeq-sg'
  results = quantize_lib.run(config)
  rows = results['columns']['w4g32asym']['methods']
  assert rows['cafeq-sg']['ppl'] > 1 and rows['cafeq-sg']['kld'] >= 0
  # Hadamard transforms are stored as sign bits: a small overhead over RTN.
  assert rows['rtn']['bits_per_weight'] < rows['cafeq-sg']['bits_per_weight'] < (
      rows['rtn']['bits_per_weight'] + 1.5)
  assert (tmp_path / 'models').is_dir()


def test_transform_storage_counts_signed_hadamard_blocks_as_sign_bits():
  import numpy as np
  from cafeq_jax.core import transforms
  import jax
  h = np.asarray(transforms.random_hadamard_blocks(jax.random.PRNGKey(0), 3, 64))
  assert quantize_lib.transform_nbytes(h) == 3 * (64 * 64 // 8 + 2)
  dense = h.copy()
  dense[1, 0, 0] *= 1.5
  assert quantize_lib.transform_nbytes(dense) == 2 * (64 * 64 // 8 + 2) + 2 * 64 * 64


@pytest.mark.slow
def test_tiny_run_with_cafeq_saving_and_samples(tmp_path):
  config = _tiny_config(tmp_path, methods='rtn,cafeq-single')
  config.save_models = 'cafeq-single'
  config.prompt = 'abc'
  config.max_new_tokens = 3
  results = quantize_lib.run(config)
  rows = results['columns']['w4g32asym']['methods']
  assert isinstance(rows['cafeq-single']['sample'], str)
  assert (tmp_path / 'models').is_dir()
  _assert_png(tmp_path / 'plots' / 'proxy_w4g32asym.png')
