"""The quantize-time benchmark: one row per run, stage timings within the wall time."""

from __future__ import annotations

import json
import os

import jax
import pytest

from cafeq_jax import recipes
from cafeq_jax.methods.run_options import RunOptions
from experiments import bench_quantize
from experiments.configs import bench_quantize as bench_config


def _config(tmp_path, methods):
  c = bench_config.get_config()
  c.model = 'tiny_llama'
  c.methods = methods
  c.column = 'w4g32'
  c.repeats = 2
  c.output = str(tmp_path / 'bench.json')
  return c


def test_every_run_is_recorded_with_its_stage_timings(tmp_path):
  out = bench_quantize.run(_config(tmp_path, 'rtn,hadamard'))
  saved = json.loads((tmp_path / 'bench.json').read_text())
  assert [(r['method'], r['repeat']) for r in saved['runs']] == [
    ('rtn', 0),
    ('rtn', 1),
    ('hadamard', 0),
    ('hadamard', 1),
  ]
  for r in out['runs']:
    stages = sum(v for k, v in r['timings'].items() if k != 'total')
    assert 0 < stages <= r['seconds'] + 1e-6
    # Every thread's CPU time, at most all cores for the whole wall time.
    assert 0 < r['cpu_seconds'] <= r['seconds'] * os.cpu_count() + 0.05
  assert 'transforms' in saved['runs'][2]['timings']
  table = bench_quantize.format_table(out)
  assert table.count('\n| hadamard |') == 2 and 'transforms' in table
  assert '| CPU seconds |' in table
  # Whether JAX's persistent compilation cache was on is recorded and shown.
  assert saved['host']['compilation_cache'] == jax.config.jax_compilation_cache_dir
  out['host']['compilation_cache'] = '/tmp/jax-cache'
  header = bench_quantize.format_table(out).splitlines()[0]
  assert header.endswith(', compilation cache /tmp/jax-cache, cpu:'), header


def test_cafeq_options_reach_the_cafeq_recipes_only_and_are_recorded(tmp_path, monkeypatch):
  timed = {}
  quantize = bench_quantize.cafeq_jax.quantize

  def spy(params, cfg, recipe, key, **kwargs):
    timed[recipe.name] = recipe
    return quantize(params, cfg, recipe, key, **kwargs)

  monkeypatch.setattr(bench_quantize.cafeq_jax, 'quantize', spy)
  c = _config(tmp_path, 'hadamard,cafeq-single')
  c.repeats = 1
  c.cafeq.transform.steps = 3
  c.cafeq.transform.block_size = 16
  out = bench_quantize.run(c)
  assert timed['cafeq-single'].transform.config.steps == 3
  assert timed['cafeq-single'].transform.config.block_size == 16
  assert timed['hadamard'] == recipes.get('hadamard', bits=4, group_size=32)
  saved = json.loads((tmp_path / 'bench.json').read_text())
  assert saved['cafeq_options'] == {'transform.block_size': 16, 'transform.steps': 3}
  assert 'transform.steps=3' in bench_quantize.format_table(out).splitlines()[0]


def test_run_options_reach_every_run_and_are_recorded(tmp_path, monkeypatch):
  seen = []
  quantize = bench_quantize.cafeq_jax.quantize

  def spy(params, cfg, recipe, key, *, run_options):
    seen.append((recipe.name, run_options))
    return quantize(params, cfg, recipe, key, run_options=run_options)

  monkeypatch.setattr(bench_quantize.cafeq_jax, 'quantize', spy)
  c = _config(tmp_path, 'rtn,cafeq-single')
  c.repeats = 1
  c.cafeq.transform.steps = 2
  c.threads = 1
  out = bench_quantize.run(c)
  assert seen == [(m, RunOptions(threads=1)) for m in ('rtn', 'cafeq-single')]
  saved = json.loads((tmp_path / 'bench.json').read_text())
  assert saved['run_options'] == {'threads': 1}
  assert ', threads=1, ' in bench_quantize.format_table(out).splitlines()[0]
  # Unset, quantize gets RunOptions' defaults and nothing is recorded.
  seen.clear()
  c.threads = None
  out = bench_quantize.run(c)
  assert [r for _, r in seen] == [RunOptions()] * 2 and out['run_options'] == {}


@pytest.mark.parametrize('methods', ['cafeq-sg', 'cafeq-single,rtn'])
def test_a_cafeq_option_that_changes_no_timed_recipe_fails_before_the_model_loads(
  tmp_path, methods, no_model_load
):
  c = _config(tmp_path, methods)
  # cafeq-sg's transform is a fixed Hadamard; cafeq-single has these steps already.
  c.cafeq.transform.steps = recipes.get('cafeq-single').transform.config.steps
  with pytest.raises(ValueError, match='transform.steps=.*changes none'):
    bench_quantize.run(c)


@pytest.mark.parametrize(
  'methods, match, fields',
  [
    ('gptq', 'calibration', {}),
    ('nope', 'nope', {}),
    ('rtn,rtn', 'repeats', {}),
    ('rtn', 'threads=0', {'threads': 0}),
    ('rtn', 'stack_chunk=1', {'stack_chunk': 1}),
  ],
)
def test_bad_requests_fail_before_the_model_loads(tmp_path, methods, match, fields, no_model_load):
  c = _config(tmp_path, methods)
  c.update(fields)
  with pytest.raises(ValueError, match=match):
    bench_quantize.run(c)
  assert not (tmp_path / 'bench.json').exists()
