"""Atomic writes: old or new version only, temporaries cleaned, umask respected, lock."""

from __future__ import annotations

import os
import stat
import threading
import time

import numpy as np
import pytest

from cafeq_jax import atomic


def _mode(path) -> int:
  return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
  """Sets the process umask for a test; restores it after."""
  old = os.umask(0o022)
  yield lambda m: os.umask(m)
  os.umask(old)


def test_interrupted_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
  path = tmp_path / 'results.json'
  atomic.write_json(path, {'v': 1})

  def interrupt(*args):
    raise KeyboardInterrupt

  monkeypatch.setattr(os, 'replace', interrupt)
  with pytest.raises(KeyboardInterrupt):
    atomic.write_json(path, {'v': 2})
  monkeypatch.undo()
  assert path.read_text() == '{\n  "v": 1\n}'
  assert os.listdir(tmp_path) == ['results.json']


def test_temporaries_of_dead_writers_are_cleaned_on_the_next_write(tmp_path):
  path = tmp_path / 'table.md'
  stale = tmp_path / '.table.md.tmp.999999999.abcd1234'  # no such pid
  stale.write_text('torn')
  live = tmp_path / f'.table.md.tmp.{os.getpid()}.abcd1234'
  live.write_text('being written')
  atomic.write_text(path, 'new')
  assert sorted(os.listdir(tmp_path)) == sorted(['table.md', live.name])


@pytest.mark.parametrize('exchange', [True, False])
def test_replace_dir_swaps_a_complete_directory_in(tmp_path, monkeypatch, exchange):
  monkeypatch.setattr(atomic, '_exchange_ok', exchange)
  dest = tmp_path / 'export'
  for version in ('1', '2'):
    tmp = atomic.make_temp_dir(dest)
    with open(os.path.join(tmp, 'f'), 'w') as f:
      f.write(version)
    atomic.replace_dir(tmp, dest)
    assert (dest / 'f').read_text() == version
  assert os.listdir(tmp_path) == ['export']


def test_recover_restores_the_old_directory_after_a_cut_fallback_swap(tmp_path):
  dest = tmp_path / 'm'
  dest.mkdir()
  (dest / 'f').write_text('old')
  # The fallback swap was killed between 'dest -> .m.old.*' and 'tmp -> dest'.
  os.rename(dest, tmp_path / '.m.old.999999999.abcd')
  assert atomic.recover(dest)
  assert (dest / 'f').read_text() == 'old'
  assert not atomic.recover(dest)


def test_outputs_follow_the_umask(tmp_path, umask):
  import jax  # pylint: disable=g-import-not-at-top

  from cafeq_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from cafeq_jax.loading import hf  # pylint: disable=g-import-not-at-top
  from cafeq_jax.models import PRESETS  # pylint: disable=g-import-not-at-top
  from cafeq_jax.models import init_params  # pylint: disable=g-import-not-at-top

  cfg = PRESETS['tiny_llama']
  params = init_params(cfg, jax.random.PRNGKey(0))
  for mask, file_mode, dir_mode in ((0o022, 0o644, 0o755), (0o002, 0o664, 0o775)):
    umask(mask)
    out = tmp_path / f'u{mask:o}'
    atomic.write_json(out / 'results.json', {})
    atomic.write_text(out / 'table.md', '|')
    assert _mode(out / 'results.json') == _mode(out / 'table.md') == file_mode
    with atomic.Lock(out / '.lock'):
      pass
    hf.save_hf(params, cfg, out / 'hf' / 'x')
    checkpointing.save_quantized(out / 'models' / 'x', {'w': np.ones((4, 4), np.float32)})
    for root, dirs, files in os.walk(out):
      for d in dirs:
        assert _mode(os.path.join(root, d)) == dir_mode, (os.path.join(root, d), mask)
      for f in files:
        assert _mode(os.path.join(root, f)) == file_mode, (os.path.join(root, f), mask)


def test_lock_excludes_other_holders(tmp_path):
  lock_file = tmp_path / '.lock'
  events = []

  def hold(name, delay):
    with atomic.Lock(lock_file):
      events.append(('in', name))
      time.sleep(delay)
      events.append(('out', name))

  threads = [threading.Thread(target=hold, args=(n, 0.2)) for n in 'ab']
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  # Never two holders at once: every 'in' is followed by the same holder's 'out'.
  assert [e[0] for e in events] == ['in', 'out', 'in', 'out']
  assert events[0][1] == events[1][1]
  lock = atomic.Lock(lock_file)
  with lock, lock:  # re-entrant within one Lock object
    pass
