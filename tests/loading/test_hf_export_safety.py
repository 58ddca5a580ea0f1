"""``save_hf`` never deletes others' files nor replaces a file; ``load_hf`` errors name the file.

No torch needed: the exports are read back with ``hf.load_hf``.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from cafeq_jax import atomic
from cafeq_jax.loading import hf
from cafeq_jax.models import PRESETS
from cafeq_jax.models import init_params

CFG = PRESETS['tiny_llama']


@pytest.fixture(scope='module')
def params():
  return init_params(CFG, jax.random.PRNGKey(0))


def _same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_save_hf_refuses_a_foreign_directory_and_a_regular_file(tmp_path, params):
  out = tmp_path / 'export'
  out.mkdir()
  (out / 'tokenizer.json').write_text('{"mine": 1}')
  (out / 'notes.txt').write_text('keep me')
  with pytest.raises(FileExistsError, match=r'not empty .*notes.txt.*not written by save_hf'):
    hf.save_hf(params, CFG, out)
  assert sorted(os.listdir(out)) == ['notes.txt', 'tokenizer.json']
  assert (out / 'notes.txt').read_text() == 'keep me'
  (tmp_path / 'file').write_text('a file')
  with pytest.raises(FileExistsError, match='not a directory; save_hf never replaces a file'):
    hf.save_hf(params, CFG, tmp_path / 'file')
  assert (tmp_path / 'file').read_text() == 'a file'
  assert sorted(os.listdir(tmp_path)) == ['export', 'file']


def test_reexport_replaces_its_own_files_and_keeps_files_added_since(tmp_path, params):
  out = tmp_path / 'export'
  hf.save_hf(params, CFG, out, provenance={'run': 1})
  (out / 'tokenizer.json').write_text('{"added": "later"}')
  other = init_params(CFG, jax.random.PRNGKey(1))
  hf.save_hf(other, CFG, out, provenance={'run': 2})
  assert (out / 'tokenizer.json').read_text() == '{"added": "later"}'
  assert hf.verify_export(out)['provenance'] == {'run': 2}
  loaded, cfg = hf.load_hf(out)
  assert cfg == CFG
  _same(loaded, other)
  assert sorted(os.listdir(tmp_path)) == ['export']


def test_interrupted_export_leaves_the_previous_one(tmp_path, params, monkeypatch):
  out = tmp_path / 'export'
  hf.save_hf(params, CFG, out)

  def interrupt(*args):
    raise KeyboardInterrupt

  monkeypatch.setattr(atomic, 'replace_dir', interrupt)
  with pytest.raises(KeyboardInterrupt):
    hf.save_hf(init_params(CFG, jax.random.PRNGKey(1)), CFG, out)
  monkeypatch.undo()
  _same(hf.load_hf(out)[0], params)
  hf.verify_export(out)
  assert sorted(os.listdir(tmp_path)) == ['export']


def test_load_hf_errors_name_the_file(tmp_path, params):
  out = tmp_path / 'export'
  hf.save_hf(params, CFG, out)
  config = out / 'config.json'
  good = config.read_text()
  config.write_text('[1, 2]')
  with pytest.raises(
    ValueError,
    match=r'config.json: a Hugging Face config must be a JSON '
    r'object \(dict\); got a list',
  ):
    hf.load_hf(out)
  d = json.loads(good)
  d['hidden_size'] = [64]
  config.write_text(json.dumps(d))
  with pytest.raises(
    ValueError, match='config.json: Hugging Face config has a field of the wrong type'
  ):
    hf.load_hf(out)
  config.write_text(good)
  weights = out / 'model.safetensors'
  blob = weights.read_bytes()
  weights.write_bytes(blob[: len(blob) // 2])
  with pytest.raises(ValueError, match=r'model.safetensors.* could not be read as safetensors'):
    hf.load_hf(out)
  with pytest.raises(ValueError, match='does not match the sha256'):
    hf.verify_export(out)
