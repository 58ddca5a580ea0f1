"""experiments/bench_kernels.py: CPU smoke run, README table, GPU launcher script."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import pytest

from experiments import bench_kernels

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_ON_CPU = jax.default_backend() == 'cpu'


def _run(args, timeout, **env_overrides):
  env = dict(os.environ, PYTHONPATH=_ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''),
             **env_overrides)
  return subprocess.run(args, cwd=_ROOT, env=env, capture_output=True, text=True,
                        timeout=timeout)


@pytest.mark.skipif(not _ON_CPU, reason='the CPU smoke configuration is only chosen on CPU')
def test_bench_kernels_cpu_smoke_run_writes_json_and_table(tmp_path):
  proc = _run([sys.executable, '-m', 'experiments.bench_kernels',
               f'--output_dir={tmp_path}', '--markdown'], timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'No accelerator found' in proc.stdout
  result = json.loads((tmp_path / 'bench_kernels.json').read_text())
  assert result['backend'] == 'cpu' and result['accelerator'] is False
  assert result['peak_bw'] is None and result['jax_version'] == jax.__version__
  kernels = {r['kernel'] for r in result['rows']}
  assert {'bf16_dot', 'xla_dequant_w4', 'pallas_w4', 'pallas_w3', 'blockdiag_k64'} <= kernels
  assert {r['M'] for r in result['rows']} == {1, 8}
  for row in result['rows']:
    assert 'error' not in row, row
    assert row['time_us'] > 0 and 'roofline_frac' not in row
    assert row['copies'] == 2  # the rotation over weight copies is exercised
    if row['kernel'].startswith('pallas'):
      assert row['max_rel_err'] < 1e-2
  table = (tmp_path / 'bench_kernels.md').read_text()
  assert 'No accelerator was found' in table and 'not evaluated' in table
  assert table in proc.stdout  # --markdown prints the same table


def _row(kernel, m, time_us, **kw):
  return dict(model='gemma2_2b', proj='q', K=2304, N=2048, M=m, kernel=kernel,
              time_us=time_us, **kw)


def test_markdown_table_names_device_and_checks_targets():
  result = dict(backend='gpu', device='NVIDIA H100 80GB HBM3', accelerator=True,
                jax_version='0.0.test', peak_bw=3.35e12, peak_flops=989e12, rows=[
                    _row('bf16_dot', 1, 30.0, speedup_vs_bf16=1.0),
                    _row('pallas_w4', 1, 9.0, speedup_vs_bf16=30 / 9, roofline_frac=0.8),
                    _row('pallas_w3', 1, 10.0, speedup_vs_bf16=3.0, roofline_frac=0.5),
                    _row('blockdiag_k64', 1, 3.0, time_frac_of_bf16_dot=0.1),
                    _row('bf16_dot', 64, 40.0, speedup_vs_bf16=1.0),
                    _row('pallas_w4', 64, 35.0, speedup_vs_bf16=40 / 35),
                    dict(_row('pallas_w3', 64, None), error='RuntimeError: boom'),
                ])
  table = bench_kernels.markdown_table(result)
  assert '**NVIDIA H100 80GB HBM3**' in table and '3.35 TB/s' in table
  assert 'not meaningful' not in table
  assert '| gemma2_2b | q | 2304 × 2048 | 1 | 30.0 | 9.0 | 3.33 | 0.80 | 10.0 | 3.00 |' in table
  assert '| 64 | 40.0 | 35.0 | 1.14 |' in table and 'FAILED' in table
  assert '- int4, batch 1: 3.33× (target ≥ 3.0×): met' in table
  assert '- int3, batch 1: 3.00× (target ≥ 3.5×): MISSED' in table
  assert '- int4, batch 64: 1.14× (target ≥ 1.0×): met' in table
  assert 'int3, batch 64' not in table  # failed rows have no speedup


def test_markdown_from_prints_the_table_of_a_saved_json(tmp_path):
  result = dict(backend='cpu', device='cpu', accelerator=False, peak_bw=None,
                peak_flops=None, rows=[_row('bf16_dot', 1, 5.0, speedup_vs_bf16=1.0)])
  path = tmp_path / 'bench_kernels.json'
  path.write_text(json.dumps(result))
  proc = _run([sys.executable, '-m', 'experiments.bench_kernels',
               f'--markdown_from={path}'], timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout == bench_kernels.markdown_table(result)


def test_num_copies_covers_rotate_bytes_within_bounds():
  assert bench_kernels.num_copies(10 << 20, 256 << 20, 32) == 26
  assert bench_kernels.num_copies(1 << 20, 256 << 20, 32) == 32
  assert bench_kernels.num_copies(1 << 30, 256 << 20, 32) == 1


@pytest.mark.skipif(not _ON_CPU, reason='checks the refusal on a host without a GPU')
def test_gpu_script_is_valid_bash_and_refuses_without_a_gpu(tmp_path):
  script = os.path.join(_ROOT, 'experiments', 'bench_kernels_gpu.sh')
  assert subprocess.run(['bash', '-n', script]).returncode == 0
  proc = _run(['bash', script, str(tmp_path)], timeout=120, PYTHON=sys.executable)
  assert proc.returncode != 0
  assert 'no GPU found' in proc.stderr
