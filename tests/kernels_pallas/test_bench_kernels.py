"""experiments/bench_kernels.py: CPU smoke run, README table, GPU launcher script."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import pytest

from experiments import bench_kernels
from experiments.configs import bench_kernels as bench_config

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_ON_CPU = jax.default_backend() == 'cpu'


def _run(args, timeout, **env_overrides):
  env = dict(
    os.environ, PYTHONPATH=_ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''), **env_overrides
  )
  return subprocess.run(args, cwd=_ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(not _ON_CPU, reason='the CPU smoke configuration is only chosen on CPU')
def test_bench_kernels_cpu_smoke_run_writes_json_and_table(tmp_path):
  proc = _run(
    [
      sys.executable,
      '-m',
      'experiments.bench_kernels',
      f'--config.output_dir={tmp_path}',
      '--config.markdown=True',
    ],
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'No accelerator found' in proc.stdout
  result = json.loads((tmp_path / 'bench_kernels.json').read_text())
  assert result['backend'] == 'cpu' and result['accelerator'] is False
  assert result['peak_bw'] is None and result['jax_version'] == jax.__version__
  kernels = {r['kernel'] for r in result['rows']}
  assert {'bf16_dot', 'xla_dequant_w4', 'pallas_w4', 'pallas_w3', 'blockdiag_k64'} <= kernels
  assert {r['M'] for r in result['rows']} == {1, 8}
  assert 'decode_rows' not in result and not result['skipped']
  for row in result['rows']:
    assert 'error' not in row and 'fallback' not in row, row
    assert row['time_us'] > 0 and 'roofline_frac' not in row and 'hbm_frac' not in row
    assert row['copies'] == 2  # the rotation over weight copies is exercised
    if row['kernel'].startswith('pallas'):
      assert row['max_rel_err'] < 1e-2 and row['speedup_vs_xla_dequant'] > 0
  table = (tmp_path / 'bench_kernels.md').read_text()
  assert 'No accelerator was found' in table and 'not evaluated' in table
  assert table in proc.stdout  # --markdown prints the same table


def _row(kernel, m, time_us, **kw):
  return dict(
    model='gemma2_2b',
    proj='q',
    K=2304,
    N=2048,
    M=m,
    kernel=kernel,
    group_size=128,
    time_us=time_us,
    **kw,
  )


def test_markdown_table_names_device_and_checks_targets():
  result = dict(
    backend='gpu',
    device='NVIDIA H100 80GB HBM3',
    accelerator=True,
    jax_version='0.0.test',
    peak_bw=3.35e12,
    peak_flops=989e12,
    rows=[
      _row('bf16_dot', 1, 30.0, speedup_vs_bf16=1.0),
      _row(
        'pallas_w4',
        1,
        9.0,
        speedup_vs_bf16=30 / 9,
        roofline_frac=0.8,
        speedup_vs_xla_dequant=2.0,
        hbm_frac=0.75,
      ),
      _row(
        'pallas_w3',
        1,
        10.0,
        speedup_vs_bf16=3.0,
        roofline_frac=0.5,
        speedup_vs_xla_dequant=1.5,
        hbm_frac=0.45,
      ),
      _row('blockdiag_k64', 1, 3.0, time_frac_of_bf16_dot=0.1),
      _row('bf16_dot', 64, 40.0, speedup_vs_bf16=1.0),
      _row('pallas_w4', 64, 35.0, speedup_vs_bf16=40 / 35),
      dict(_row('pallas_w3', 64, None), error='RuntimeError: boom'),
    ],
  )
  table = bench_kernels.markdown_table(result)
  assert '**NVIDIA H100 80GB HBM3**' in table and '3.35 TB/s' in table
  assert 'not meaningful' not in table
  assert (
    '| gemma2_2b | q | 2304 × 2048 | 128 | 1 | 30.0 | 9.0 | 3.33 | 2.00 | 0.75 | 0.80 '
    '| 10.0 | 3.00 | 1.50 | 0.45 | 0.50 | 0.10 |'
  ) in table
  assert '| 64 | 40.0 | 35.0 | 1.14 |' in table and 'FAILED' in table
  assert '**asym**' not in table  # one scheme: one table, no scheme headings
  assert '- int4, batch 1: 3.33× (target ≥ 3.0×): met' in table
  assert '- int3, batch 1: 3.00× (target ≥ 3.5×): MISSED' in table
  assert '- int4, batch 64: 1.14× (target ≥ 1.0×): met' in table
  assert 'int3, batch 64' not in table  # failed rows have no speedup


def test_markdown_from_prints_the_table_of_a_saved_json(tmp_path):
  result = dict(
    backend='cpu',
    device='cpu',
    accelerator=False,
    peak_bw=None,
    peak_flops=None,
    rows=[_row('bf16_dot', 1, 5.0, speedup_vs_bf16=1.0)],
  )
  path = tmp_path / 'bench_kernels.json'
  path.write_text(json.dumps(result))
  proc = _run(
    [sys.executable, '-m', 'experiments.bench_kernels', f'--config.markdown_from={path}'],
    timeout=120,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout == bench_kernels.markdown_table(result)


def test_num_copies_covers_rotate_bytes_within_bounds():
  assert bench_kernels.num_copies(10 << 20, 256 << 20, 32) == 26
  assert bench_kernels.num_copies(1 << 20, 256 << 20, 32) == 32
  assert bench_kernels.num_copies(1 << 30, 256 << 20, 32) == 1


_SCRIPT = os.path.join(_ROOT, 'experiments', 'bench_kernels_gpu.sh')


@pytest.mark.skipif(not _ON_CPU, reason='checks the refusal on a host without a GPU')
def test_gpu_script_is_valid_bash_and_refuses_without_a_gpu(tmp_path):
  assert subprocess.run(['bash', '-n', _SCRIPT]).returncode == 0
  proc = _run(['bash', _SCRIPT, str(tmp_path)], timeout=120, PYTHON=sys.executable)
  assert proc.returncode != 0
  assert 'no GPU found' in proc.stderr and '--interpret' in proc.stderr


@pytest.mark.slow
def test_gpu_script_runs_end_to_end_in_interpret_mode(tmp_path):
  # About 2 min on 2 CPU cores: the interpret-mode kernel tests and a small benchmark.
  proc = _run(['bash', _SCRIPT, '--interpret', str(tmp_path)], timeout=900, PYTHON=sys.executable)
  assert proc.returncode == 0, proc.stdout[-3000:]
  assert 'interpret-mode kernel tests passed' in proc.stdout
  result = json.loads((tmp_path / 'bench_kernels.json').read_text())
  assert result['interpret'] is True and result['decode_rows']
  assert not [r for r in result['rows'] + result['decode_rows'] if 'error' in r]
  assert (tmp_path / 'bench_kernels.md').read_text() in proc.stdout


def test_markdown_table_has_one_table_per_scheme_the_decode_step_and_skips():
  result = dict(
    backend='gpu',
    device='NVIDIA H200',
    accelerator=True,
    peak_bw=4.8e12,
    peak_flops=989e12,
    group_size=128,
    time_budget_s=300,
    skipped=['gemma2_9b/down'],
    rows=[
      _row('bf16_dot', 1, 30.0, speedup_vs_bf16=1.0),
      _row('pallas_w4', 1, 9.0, speedup_vs_bf16=30 / 9),
      _row('pallas_w4sym', 1, 8.0, speedup_vs_bf16=30 / 8, fallback='no kernel'),
    ],
    decode_rows=[
      dict(
        model='smollm2_135m',
        variant='bf16',
        batch=1,
        cache_len=256,
        group_size='64/128',
        time_ms=2.0,
        tokens_per_s=500.0,
        speedup_vs_bf16=1.0,
      ),
      dict(
        model='smollm2_135m',
        variant='pallas_w4',
        batch=1,
        cache_len=256,
        group_size='64/128',
        time_ms=1.0,
        tokens_per_s=1000.0,
        speedup_vs_bf16=2.0,
        max_rel_err=1e-3,
      ),
      dict(model='smollm2_135m', variant='pallas_w3', batch=16, error='boom'),
    ],
  )
  table = bench_kernels.markdown_table(result)
  assert '**asym** (g128, zero points)' in table and '**sym** (g128, no zero point)' in table
  assert '| 128 | 1 | 30.0 | 8.0 (fallback) | 3.75 |' in table
  assert 'Not run (time budget of 300 s spent): gemma2_9b/down.' in table
  assert 'Partial result' not in table
  assert 'Partial result' in bench_kernels.markdown_table(dict(result, partial=True))
  assert 'Decode step of **smollm2_135m**' in table and 'g64/128' in table
  assert '| pallas_w4 | 1 | 1.000 | 1000 | 2.00 | 1.0e-03 |' in table
  assert '| pallas_w3 | 16 | FAILED | | | |' in table
  assert '- int4, batch 1: 3.33× (target ≥ 3.0×): met' in table


def test_config_keeps_the_old_flag_defaults():
  c = bench_config.get_config()
  assert (c.output_dir, c.models, c.batches, c.bits) == (
    '/tmp/bench_kernels',
    'gemma2_2b,gemma2_9b',
    '1,8,64,512',
    '4,3',
  )
  assert (c.group_size, c.iters, c.rotate_mb, c.max_copies, c.transform_k) == (128, 50, 256, 32, 64)
  assert c.block_m is None and c.block_n is None and c.split_k is None
  assert c.markdown is False and c.markdown_from is None
  # New options default to the old behaviour: asym only, no decode step, no budget.
  assert (c.schemes, c.decode_batches, c.interpret, c.time_budget_s) == ('asym', '', False, 0)


def test_group_for_falls_back_to_a_group_dividing_d_in():
  assert bench_kernels.group_for(2304, 128) == 128
  assert bench_kernels.group_for(576, 128) == 64  # SmolLM2's d_in
  assert bench_kernels.group_for(96, 128) == 32
  with pytest.raises(ValueError, match='d_in=100'):
    bench_kernels.group_for(100, 128)


def test_random_packed_symmetric_and_stacked_shapes():
  key = jax.random.PRNGKey(0)
  p = bench_kernels.random_packed(key, 256, 200, 3, 64, symmetric=True, lead=(2,))
  assert p.shape == (2, 256, 200) and p.data.shape == (2, 3, 256, 25) and p.symmetric
  assert p.scale.shape == p.zero.shape == (2, 4, 200)
  assert float(p.zero.min()) == float(p.zero.max()) == 4.0  # 2^(bits-1), as pack()


def test_interpret_run_of_chosen_shapes_with_sym_and_decode_step(tmp_path):
  proc = _run(
    [
      sys.executable,
      '-m',
      'experiments.bench_kernels',
      f'--config.output_dir={tmp_path}',
      '--config.interpret=True',
      '--config.models=tiny',
      '--config.batches=2',
      '--config.bits=4',
      '--config.schemes=asym,sym',
      '--config.iters=1',
      '--config.decode_model=tiny_llama',
      '--config.decode_batches=2',
    ],
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'No accelerator found' not in proc.stdout  # not the smoke configuration
  result = json.loads((tmp_path / 'bench_kernels.json').read_text())
  assert result['interpret'] is True and result['partial'] is False
  kernels = {r['kernel'] for r in result['rows']}
  assert kernels == {
    'bf16_dot',
    'xla_dequant_w4',
    'pallas_w4',
    'xla_dequant_w4sym',
    'pallas_w4sym',
    'blockdiag_k64',
  }
  for row in result['rows']:
    assert 'error' not in row and row['M'] == 2, row
  blockdiag = [r for r in result['rows'] if r['kernel'] == 'blockdiag_k64'][0]
  assert blockdiag['time_frac_of_pallas_w4'] > 0
  decode = {r['variant']: r for r in result['decode_rows']}
  assert set(decode) == {
    'bf16',
    'xla_dequant_w4',
    'pallas_w4',
    'xla_dequant_w4_t64',
    'pallas_w4_t64',
  }
  for name, r in decode.items():
    assert 'error' not in r and r['batch'] == 2 and r['time_ms'] > 0, r
    if name.startswith('pallas'):
      assert r['max_rel_err'] < 2e-2, r  # bf16 activations, same packed weights
  table = (tmp_path / 'bench_kernels.md').read_text()
  assert '**sym**' in table and 'Decode step of **tiny_llama**' in table


def test_time_budget_skips_the_remaining_shapes(tmp_path):
  c = bench_config.get_config()
  c.output_dir = str(tmp_path)
  c.interpret = True
  c.models = 'tiny,tiny'
  c.batches = '1'
  c.bits = '4'
  c.iters = 1
  c.time_budget_s = 1e-9  # spent after the first check
  result = bench_kernels.run(c)
  assert result['rows'] == [] and result['skipped'] == ['tiny/proj', 'tiny/proj']
  assert 'Not run (time budget' in (tmp_path / 'bench_kernels.md').read_text()
