"""experiments/bench_kernels.py runs end to end on CPU and writes its JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.skipif(jax.default_backend() != 'cpu',
                    reason='the CPU smoke configuration is only chosen on CPU')
def test_bench_kernels_cpu_smoke_run_writes_json(tmp_path):
  env = dict(os.environ, PYTHONPATH=_ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
  proc = subprocess.run(
      [sys.executable, '-m', 'experiments.bench_kernels', f'--output_dir={tmp_path}'],
      cwd=_ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'No accelerator found' in proc.stdout
  result = json.loads((tmp_path / 'bench_kernels.json').read_text())
  assert result['backend'] == 'cpu' and result['peak_bw'] is None
  kernels = {r['kernel'] for r in result['rows']}
  assert {'bf16_dot', 'pallas_w4', 'pallas_w3', 'blockdiag_k64'} <= kernels
  for row in result['rows']:
    assert 'error' not in row, row
    assert row['time_us'] > 0 and 'roofline_frac' not in row
    if row['kernel'].startswith('pallas'):
      assert row['max_rel_err'] < 1e-2
