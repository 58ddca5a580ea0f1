"""Evaluation text and windows."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from cafeq_jax.eval import data


def test_default_text_is_pydoc_topics_in_sorted_key_order():
  from pydoc_data import topics  # pylint: disable=g-import-not-at-top

  text = data.default_text()
  keys = sorted(topics.topics)
  assert text.startswith(topics.topics[keys[0]])
  assert text.endswith(topics.topics[keys[-1]])
  assert len(text) > 400_000
  assert data.load_text(None) == text


def test_make_windows_takes_the_start_of_equal_chunks():
  ids = np.arange(1000)
  w = data.make_windows(ids, num_seqs=4, seq_len=100)
  assert w.shape == (4, 100) and w.dtype == np.int32
  for i in range(4):
    np.testing.assert_array_equal(w[i], np.arange(i * 250, i * 250 + 100))
  # Exactly enough tokens: contiguous tiling.
  np.testing.assert_array_equal(data.make_windows(ids[:400], 4, 100).ravel(), ids[:400])


def test_make_windows_text_too_short_says_how_many_tokens():
  with pytest.raises(ValueError, match=r'99 tokens, but 2 x 50 = 100'):
    data.make_windows(list(range(99)), num_seqs=2, seq_len=50)


@pytest.mark.parametrize('kw', [dict(num_seqs=0), dict(seq_len=1), dict(num_seqs=2.0)])
def test_make_windows_rejects_bad_sizes(kw):
  with pytest.raises(ValueError):
    data.make_windows(np.arange(100), **{'num_seqs': 2, 'seq_len': 10, **kw})


def test_make_windows_rejects_non_integer_ids():
  with pytest.raises(ValueError, match='1-D int'):
    data.make_windows(np.zeros(100, np.float32), 2, 10)


def test_eval_tokens_is_deterministic_and_uses_encode():
  enc = lambda s: [ord(c) for c in s]
  text = 'abcdefghij' * 10
  w = data.eval_tokens(enc, text, num_seqs=2, seq_len=5)
  np.testing.assert_array_equal(w, [[97, 98, 99, 100, 101]] * 2)
  np.testing.assert_array_equal(w, data.eval_tokens(enc, text, num_seqs=2, seq_len=5))


def test_load_text_file_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    data.load_text(tmp_path / 'missing.txt')
  empty = tmp_path / 'empty.txt'
  empty.write_text('  \n')
  with pytest.raises(ValueError, match='empty'):
    data.load_text(empty)
  f = tmp_path / 'ok.txt'
  f.write_text('héllo wörld', encoding='utf-8')
  assert data.load_text(f) == 'héllo wörld'


def test_cli_reports_missing_text_file(tmp_path):
  # Exits 2 with an error line before the model loads (absl + config_flags launcher).
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = {
    **{k: v for k, v in os.environ.items() if not k.startswith(('JAX_', 'XLA_'))},
    'JAX_PLATFORMS': 'cpu',
  }
  proc = subprocess.run(
    [sys.executable, '-m', 'cafeq_jax.eval', f'--config.text={tmp_path / "missing.txt"}'],
    cwd=repo,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert 'error:' in proc.stderr and 'missing.txt' in proc.stderr


def test_cli_run_raises_before_loading_the_model(tmp_path):
  from cafeq_jax.eval import __main__ as cli  # pylint: disable=g-import-not-at-top
  from cafeq_jax.eval import config as eval_config  # pylint: disable=g-import-not-at-top

  config = eval_config.get_config()
  config.text = str(tmp_path / 'missing.txt')
  config.gguf = str(tmp_path / 'not_loaded.gguf')  # never reached
  with pytest.raises(FileNotFoundError, match='missing.txt'):
    cli.run(config)


def test_cli_config_keeps_the_old_defaults():
  from cafeq_jax.eval import config as eval_config  # pylint: disable=g-import-not-at-top

  c = eval_config.get_config()
  assert c.gguf is None and c.text is None and c.json is False
  assert (c.num_seqs, c.seq_len, c.batch_size) == (data.DEFAULT_NUM_SEQS, data.DEFAULT_SEQ_LEN, 1)
