"""Plots of the main job: the drawn data equal the reports' numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import plots

_NAMES = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')


def _report(method, num_layers, factor):
  """A QuantReport.to_dict()-shaped dict with final = factor(layer, name) * rtn."""
  per = {}
  for l in range(num_layers):
    for j, n in enumerate(_NAMES):
      rtn = 0.01 * (j + 1) * (l + 1)
      per[f'layer_{l}/{n}'] = {'rtn': rtn, 'final': factor(l, j) * rtn}
  return {'method': method, 'spec': 'w3g128asym', 'per_matrix': per}


def _results():
  def row(ppl, kld, bits):
    return {
      'ppl': ppl,
      'kld': kld,
      'bits_per_weight': bits,
      'linear_bytes': bits * 1e6 / 8,
      'linear_bf16_bytes': 2e6,
    }

  return {
    'model': 'toy',
    'columns': {
      'w3g128asym': {
        'methods': {
          'fp': {'ppl': 15.0, 'kld': 0.0},
          'rtn': row(52.0, 0.9, 3.25),
          'cafeq': row(30.0, 0.4, 3.4),
        }
      },
      'w4g128asym': {
        'methods': {
          'fp': {'ppl': 15.0, 'kld': 0.0},
          'rtn': row(18.0, 0.1, 4.25),
          'cafeq': row(16.0, 0.05, 4.4),
        }
      },
    },
  }


def _write_reports(out, reports):
  os.makedirs(os.path.join(out, 'reports'), exist_ok=True)
  for name, r in reports.items():
    with open(os.path.join(out, 'reports', f'{name}.json'), 'w') as f:
      json.dump(r, f)


def test_proxy_ratio_lines_are_final_over_rtn_per_layer():
  reports = {
    'rtn': _report('rtn', 3, lambda l, j: 1.0),
    'cafeq': _report('cafeq', 3, lambda l, j: 0.5 + 0.1 * l + 0.01 * j),
  }
  fig = plots.proxy_ratio_figure('w3g128asym', reports)
  axes = {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}
  assert set(axes) == set(_NAMES) | {'all layers'}
  for j, n in enumerate(_NAMES):
    lines = {l.get_label(): l for l in axes[n].get_lines() if not l.get_label().startswith('_')}
    assert set(lines) == {'rtn', 'cafeq'}
    np.testing.assert_array_equal(lines['cafeq'].get_xdata(), [0, 1, 2])
    np.testing.assert_allclose(
      lines['cafeq'].get_ydata(), [0.5 + 0.1 * l + 0.01 * j for l in range(3)], rtol=1e-12
    )
    np.testing.assert_allclose(lines['rtn'].get_ydata(), 1.0)
  # Summary: sum(final) / sum(rtn) over layers; rtn is layer-weighted (l + 1).
  summary = {
    l.get_label(): l for l in axes['all layers'].get_lines() if not l.get_label().startswith('_')
  }
  expected_cafeq = [
    sum((0.5 + 0.1 * l + 0.01 * j) * (l + 1) for l in range(3)) / 6 for j in range(len(_NAMES))
  ]
  np.testing.assert_allclose(summary['cafeq'].get_ydata(), expected_cafeq, rtol=1e-12)
  np.testing.assert_allclose(summary['rtn'].get_ydata(), 1.0)
  assert [t.get_text() for t in axes['all layers'].get_xticklabels()] == list(_NAMES)


def test_ppl_vs_bits_points_are_sorted_per_method_with_fp_at_16_bits():
  fig = plots.ppl_vs_bits_figure(_results())
  ax_ppl, ax_kld = fig.axes[:2]
  lines = {l.get_label(): l for l in ax_ppl.get_lines()}
  np.testing.assert_allclose(lines['rtn'].get_xdata(), [3.25, 4.25])
  np.testing.assert_allclose(lines['rtn'].get_ydata(), [52.0, 18.0])
  np.testing.assert_allclose(lines['cafeq'].get_ydata(), [30.0, 16.0])
  np.testing.assert_allclose(lines['fp (bf16)'].get_xdata(), [16.0])
  np.testing.assert_allclose(lines['fp (bf16)'].get_ydata(), [15.0])
  assert ax_ppl.get_yscale() == 'log'  # 52 / 15 > 2
  kld = {l.get_label(): l for l in ax_kld.get_lines()}
  assert 'fp (bf16)' not in kld  # KLD of fp is 0: not on a log axis
  np.testing.assert_allclose(kld['cafeq'].get_ydata(), [0.4, 0.05])


def test_write_all_writes_pngs_and_ignores_reports_of_other_runs(tmp_path):
  out = str(tmp_path)
  _write_reports(
    out,
    {
      'w3g128asym_rtn': _report('rtn', 2, lambda l, j: 1.0),
      'w3g128asym_cafeq': _report('cafeq', 2, lambda l, j: 0.7),
      'w3g128asym_stale': _report('gptq', 2, lambda l, j: 0.6),  # not in results
      'w8pcsym_rtn': _report('rtn', 2, lambda l, j: 1.0),  # column not in results
    },
  )
  with open(os.path.join(out, 'reports', 'broken_x.json'), 'w') as f:
    f.write('{not json')
  results = _results()
  loaded = plots.load_reports(out, results)
  assert {c: sorted(m) for c, m in loaded.items()} == {'w3g128asym': ['cafeq', 'rtn']}
  paths = plots.write_all(results, out)
  names = sorted(os.path.basename(p) for p in paths)
  assert names == ['ppl_vs_bits.png', 'proxy_loss_w3g128asym.png', 'proxy_w3g128asym.png']
  for p in paths:
    assert os.path.dirname(p) == os.path.join(out, 'plots')
    with open(p, 'rb') as f:
      assert f.read(4) == b'\x89PNG'
  assert sorted(os.listdir(os.path.join(out, 'plots'))) == names  # no temp files left


def test_write_all_with_nothing_to_plot_writes_nothing(tmp_path):
  assert plots.write_all({'columns': {}}, str(tmp_path)) == []
  assert os.listdir(tmp_path / 'plots') == []


@pytest.mark.parametrize('bad', [float('nan'), None])
def test_rows_without_a_finite_ppl_are_skipped(bad):
  results = _results()
  results['columns']['w3g128asym']['methods']['rtn']['ppl'] = bad
  fig = plots.ppl_vs_bits_figure(results)
  lines = {l.get_label(): l for l in fig.axes[0].get_lines()}
  np.testing.assert_allclose(lines['rtn'].get_xdata(), [4.25])


_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cli(*args):
  env = {**os.environ, 'PYTHONPATH': _REPO + os.pathsep + os.environ.get('PYTHONPATH', '')}
  return subprocess.run(
    [sys.executable, '-m', 'experiments.plots', *args],
    cwd=_REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )


def test_cli_redraws_the_plots_of_a_job_dir(tmp_path):
  out = str(tmp_path)
  _write_reports(
    out,
    {
      'w3g128asym_rtn': _report('rtn', 2, lambda l, j: 1.0),
      'w3g128asym_cafeq': _report('cafeq', 2, lambda l, j: 0.7),
    },
  )
  with open(os.path.join(out, 'results.json'), 'w') as f:
    json.dump(_results(), f)
  proc = _cli(f'--config.output_dir={out}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  printed = sorted(os.path.basename(p) for p in proc.stdout.split())
  assert printed == ['ppl_vs_bits.png', 'proxy_loss_w3g128asym.png', 'proxy_w3g128asym.png']
  assert sorted(plots.redraw(out)) == sorted(proc.stdout.split())


def test_cli_requires_an_output_dir_and_knows_only_config_fields(tmp_path):
  proc = _cli()
  assert proc.returncode != 0 and '--config.output_dir is required' in proc.stderr
  proc = _cli(f'--output_dir={tmp_path}')  # the old argparse syntax
  assert proc.returncode != 0 and 'output_dir' in proc.stderr
