"""The proxy-study launcher: absl + config_flags, the old flag defaults kept."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from experiments import proxy_study
from experiments.configs import proxy_study as proxy_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cli(*args):
  env = {
    **{k: v for k, v in os.environ.items() if not k.startswith(('JAX_', 'XLA_'))},
    'JAX_PLATFORMS': 'cpu',
  }
  return subprocess.run(
    [sys.executable, '-m', 'experiments.proxy_study', *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )


def test_config_keeps_the_old_flag_defaults():
  c = proxy_config.get_config()
  assert c.to_dict() == {
    'methods': 'rtn,hadamard,gptq_pydoc,selfgen_seq,selfgen_h,struct_h',
    'column': 'w3g128',
    'eval_num_seqs': 8,
    'eval_seq_len': 512,
    'calib_num_seqs': 16,
    'calib_seq_len': 512,
    'gen_num_seqs': 16,
    'gen_seq_len': 256,
    'temperature': 1.0,
    'start_id': 0,
    'diagnose': True,
    'seed': 0,
    'out': 'outputs/proxy_study.json',
  }
  for m in c.methods.split(','):
    assert m in proxy_study.CANDIDATES


def test_unknown_candidate_fails_before_anything_runs(tmp_path):
  c = proxy_config.get_config()
  c.methods = 'rtn,bogus'
  c.out = str(tmp_path / 'never.json')
  with pytest.raises(ValueError, match="unknown method 'bogus'"):
    proxy_study.run(c)
  assert not os.listdir(tmp_path)


def test_cli_overrides_reach_the_study_and_old_flags_are_gone(tmp_path):
  proc = _cli('--config.methods=selfgen_h,nope', f'--config.out={tmp_path}/x.json')
  assert proc.returncode != 0
  assert "unknown method 'nope'" in proc.stderr
  proc = _cli('--methods=rtn')  # the old raw-flag syntax
  assert proc.returncode != 0 and 'methods' in proc.stderr
  proc = _cli('--config.no_such_field=1')
  assert proc.returncode != 0 and 'no_such_field' in proc.stderr
  # A stray positional argument (cli.launch) is refused, not ignored.
  proc = _cli('rtn', f'--config.out={tmp_path}/y.json')
  assert proc.returncode != 0 and "Too many command-line arguments: ['rtn']" in proc.stderr
  assert not os.listdir(tmp_path)
