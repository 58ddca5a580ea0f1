"""The transform-step benchmark: one row per layout, over the stacks quantize builds."""

from __future__ import annotations

import json

import pytest

from experiments import bench_transform_step
from experiments.configs import bench_transform_step as bench_config


def _config(tmp_path, layouts='whole:1,2:2'):
  c = bench_config.get_config()
  c.model = 'tiny_llama'
  c.column = 'w4g32'
  c.layouts = layouts
  c.steps = 1
  c.output = str(tmp_path / 'bench.json')
  return c


def test_every_layout_is_timed_over_the_models_stacks(tmp_path):
  out = bench_transform_step.run(_config(tmp_path))
  saved = json.loads((tmp_path / 'bench.json').read_text())
  assert [(r['chunk'], r['threads']) for r in saved['runs']] == [(None, 1), (2, 2)]
  assert all(r['ms_per_step'] > 0 for r in saved['runs'])
  # q / o, k / v, gate / up share shapes; down alone: 7 matrices per layer in all.
  assert sum(saved['stacks'].values()) == 7 * 2
  assert bench_transform_step.format_table(out).count('\n| ') == 3  # header + 2 rows


@pytest.mark.parametrize(
  'field, value, match',
  [('layouts', 'x:2', 'layouts item'), ('layouts', '', 'empty'), ('recipe', 'rtn', 'no learned')],
)
def test_bad_requests_fail_before_the_model_loads(tmp_path, field, value, match, no_model_load):
  c = _config(tmp_path)
  setattr(c, field, value)
  with pytest.raises(ValueError, match=match):
    bench_transform_step.run(c)
