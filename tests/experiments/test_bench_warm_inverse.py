"""The warm-start inverse benchmark: fallback counts over a run, and their cost."""

from __future__ import annotations

import json

import pytest

from cafeq_jax import recipes
from experiments import bench_warm_inverse
from experiments.configs import bench_warm_inverse as bench_config


def _config(tmp_path):
  c = bench_config.get_config()
  c.model = 'tiny_llama'
  c.column = 'w4g32'
  c.recipes = 'cafeq'
  c.broken = '0,2,30'
  c.reps = 1
  c.output = str(tmp_path / 'bench.json')
  return c


def test_counts_cover_every_step_of_every_chunk_and_costs_every_stack(tmp_path):
  out = bench_warm_inverse.run(_config(tmp_path))
  saved = json.loads((tmp_path / 'bench.json').read_text())
  steps = recipes.PRESETS['cafeq'].transform.config.steps
  counts = saved['counts']['cafeq']
  assert set(counts) == set(saved['costs']['stacks'])  # q / o, k / v, gate / up, down
  assert len(counts) == 4
  for c in counts.values():
    assert c['chunk_steps'] == c['chunks'] * steps
    assert 0 <= c['chunk_steps_with_fallback'] <= c['chunk_steps']
    assert c['chunk_steps_with_fallback'] <= c['blocks_fallen_back'] <= c['block_steps']
    assert c['seconds'] > 0
  for r in saved['costs']['stacks'].values():
    # 30 broken blocks exceed every chunk of the tiny model: not timed
    assert list(r['warm_inverse_ms']) == ['0', '2'] and r['eliminate_chunk_ms'] > 0
  assert bench_warm_inverse.format_tables(out).count('\n| ') == 2 * (1 + 4)  # headers + rows


@pytest.mark.parametrize(
  'field, value, match',
  [
    ('recipes', 'cafeq-sg', 'no dense transform'),
    ('recipes', 'nope', 'unknown'),
    ('recipes', '', 'empty'),
    ('broken', '1,-2', 'counts >= 0'),
    ('broken', 'x', 'broken'),
  ],
)
def test_bad_requests_fail_before_the_model_loads(tmp_path, field, value, match, no_model_load):
  c = _config(tmp_path)
  setattr(c, field, value)
  with pytest.raises(ValueError, match=match):
    bench_warm_inverse.run(c)
