"""The learned-transform ablation runs end to end on a tiny model and resumes."""

from __future__ import annotations

import json
import os

import pytest

from experiments import transform_study
from experiments.configs import transform_study as study_config


def _config(out):
  c = study_config.get_config()
  c.model = 'tiny_llama'
  c.variants = 'rtn,cafeq-single,lu'
  c.column = 'w3g32'
  c.texts = 'pydoc'
  c.eval_num_seqs = 2
  c.eval_seq_len = 16
  c.output_dir = str(out)
  return c


def test_study_records_the_proxy_conditioning_and_quality_of_every_row(tmp_path):
  results = transform_study.run(_config(tmp_path))
  rows = results['rows']
  assert list(rows) == ['rtn', 'cafeq-single', 'lu']
  assert rows['rtn']['proxy_ratio_total'] == pytest.approx(1.0)
  assert 'cond_max' not in rows['rtn']  # no transform
  for v in ('cafeq-single', 'lu'):
    assert rows[v]['proxy_ratio_total'] < 1.0  # keep-best: never above RTN, here below
    assert set(rows[v]['proxy_ratio']) == set(transform_study.MATRICES)
    assert rows[v]['cond_max'] >= 1.0 and 0 < rows[v]['bf16_rel_err_max'] < 0.05
    assert rows[v]['ppl_pydoc'] > 1.0
  table = open(os.path.join(tmp_path, 'table.md')).read()
  assert '| cafeq-single |' in table and '| lu |' in table
  # A second run keeps every finished row (same inputs).
  before = json.load(open(os.path.join(tmp_path, 'results.json')))
  again = transform_study.run(_config(tmp_path))
  assert again['rows'] == before['rows']


def test_unknown_variant_is_refused_before_the_model_loads(tmp_path):
  c = _config(tmp_path)
  c.variants = 'rtn,dense-9000'
  with pytest.raises(ValueError, match="variant 'dense-9000' is unknown"):
    transform_study.run(c)


def test_proxy_only_mode_optimises_one_matrix_and_skips_rtn(tmp_path):
  c = _config(tmp_path)
  c.matrix = 'up'
  results = transform_study.run(c)
  rows = results['proxy_only']['up']
  assert list(rows) == ['cafeq-single', 'lu']
  assert all(0 < r['proxy_ratio'] < 1 for r in rows.values())
  assert 'rows' not in results or not results['rows']  # no perplexity rows
