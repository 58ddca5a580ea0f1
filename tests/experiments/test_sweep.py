"""The sweep launcher: a tiny model over a 2x2 grid completes, then is skipped."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from experiments import sweep
from experiments.configs import sweep as sweep_config
from tests.experiments import reference_metrics

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tiny_config(workdir):
  c = sweep_config.get_config()
  c.models = 'tiny_llama'
  c.methods = 'rtn'
  c.bits = '4,3'
  c.group_sizes = '32,0'
  c.eval_num_seqs = 2
  c.eval_seq_len = 16
  c.eval_batch_size = 2
  c.workdir = str(workdir)
  return c


def _numpy_metrics(config, bits, group):
  """ppl / KLD / top-1 of the RTN point recomputed with numpy from the logits."""
  import jax

  from cafeq_jax import quantize
  from cafeq_jax import recipes
  from experiments import quantize_lib

  model = quantize_lib.load_model(config.models, config.seed)
  recipe = recipes.get('rtn', bits=bits, group_size=group, group_fallback=False)
  qparams, _ = quantize(model.params, model.config, recipe, jax.random.PRNGKey(config.seed))
  tokens = reference_metrics.job_tokens(model, config)
  return reference_metrics.metrics(model.config, model.params, qparams, tokens)


def test_grid_is_the_cartesian_product_with_per_channel_as_zero():
  c = _tiny_config('/unused')
  c.methods = 'rtn,hadamard'
  points = sweep.grid(c)
  assert len(points) == 2 * 2 * 2
  assert {(p.method, p.bits, p.group_size) for p in points} == {
    (m, b, g) for m in ('rtn', 'hadamard') for b in (4, 3) for g in (32, None)
  }
  assert points[0].name == 'tiny_llama/rtn/w4g32'


def test_points_are_split_round_robin_over_shards():
  points = list(range(7))
  shards = [[i for i, _ in sweep.my_points(points, 3, s)] for s in range(3)]
  assert shards == [[0, 3, 6], [1, 4], [2, 5]]
  with pytest.raises(ValueError, match='shard_index=3'):
    sweep.my_points(points, 3, 3)


def test_point_key_changes_with_result_affecting_fields_only():
  c = _tiny_config('/a')
  p = sweep.grid(c)[0]
  key = sweep.point_key(p, c)
  c2 = _tiny_config('/b')  # different workdir: same result
  c2.progress = True
  assert sweep.point_key(p, c2) == key
  c3 = _tiny_config('/a')
  c3.seed = 1
  assert sweep.point_key(p, c3) != key
  assert sweep.point_key(sweep.grid(c)[1], c) != key


def test_append_result_is_whole_lines_under_concurrent_writers(tmp_path):
  path = str(tmp_path / 'r.jsonl')

  def write(t):
    for i in range(50):
      sweep.append_result(path, {'key': f'{t}-{i}', 'pad': 'x' * 5000})

  threads = [threading.Thread(target=write, args=(t,)) for t in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  rows = sweep.read_results(path)
  assert sorted(r['key'] for r in rows) == sorted(f'{t}-{i}' for t in range(4) for i in range(50))
  with open(path, 'a') as f:
    f.write('{"key": "torn"')  # a crash mid-line is ignored on read
  assert len(sweep.read_results(path)) == 200


def test_tiny_sweep_over_2x2_grid_completes_and_is_skipped_on_rerun(tmp_path):
  config = _tiny_config(tmp_path)
  calls = []

  def counting_runner(point, cfg, cache):
    calls.append(point.name)
    return sweep.run_point(point, cfg, cache)

  out = sweep.run(config, runner=counting_runner)
  assert (out['points'], out['ran'], out['skipped']) == (4, 4, 0)
  assert sorted(calls) == sorted(p.name for p in sweep.grid(config))
  rows = out['rows']
  assert len(rows) == 4
  by = {(r['bits'], r['group_size']): r for r in rows}
  assert all(r['status'] == 'ok' for r in rows)
  # Each row's metrics against an independent numpy evaluation of the same point.
  for (bits, group), r in by.items():
    want = _numpy_metrics(config, bits, group)
    for k in ('fp_ppl', 'ppl', 'kld', 'top1'):
      np.testing.assert_allclose(r[k], want[k], rtol=2e-4, atol=1e-6, err_msg=k)
  # 3-bit codes lose more than 4-bit ones, per-channel more than g32 (an
  # independent check that each point ran its own spec).
  for g in (32, None):
    assert by[(3, g)]['proxy_final'] > by[(4, g)]['proxy_final']
  for b in (4, 3):
    assert by[(b, None)]['proxy_final'] > by[(b, 32)]['proxy_final']
  # Storage: b bits per code + 2 x 16 bits (scale, zero) per group of 32 rows.
  assert by[(4, 32)]['bits_per_weight'] == pytest.approx(4 + 32 / 32)
  assert by[(3, 32)]['bits_per_weight'] == pytest.approx(3 + 32 / 32)

  calls.clear()
  again = sweep.run(config, runner=counting_runner)
  assert (again['ran'], again['skipped']) == (0, 4) and not calls
  assert len(sweep.read_results(out['path'])) == 4

  # The command line (absl + config_flags overrides) sees the same points as done.
  proc = subprocess.run(
    [
      sys.executable,
      '-m',
      'experiments.sweep',
      f'--config={os.path.join(REPO, "experiments", "configs", "sweep.py")}',
      '--config.models=tiny_llama',
      '--config.methods=rtn',
      '--config.bits=4,3',
      '--config.group_sizes=32,0',
      '--config.eval_num_seqs=2',
      '--config.eval_seq_len=16',
      f'--config.workdir={tmp_path}',
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=400,
    env={
      **{k: v for k, v in os.environ.items() if not k.startswith(('JAX_', 'XLA_'))},
      'JAX_PLATFORMS': 'cpu',
    },
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'ran 0, skipped 4 already done' in proc.stdout
  assert 'process 0/1' in proc.stdout
  assert proc.stdout.count('tiny_llama') >= 4  # the summary table


def test_empty_grid_axis_is_an_error():
  c = _tiny_config('/unused')
  c.bits = ''
  with pytest.raises(ValueError, match='config.bits is empty'):
    sweep.grid(c)
