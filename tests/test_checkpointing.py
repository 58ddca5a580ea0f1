"""Orbax checkpointing: kill-and-resume bit-exactness, atomicity, quantized models."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cafeq_jax import checkpointing
from cafeq_jax import quantizer

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(HERE, 'distributed'))
import distributed_toy as toy  # pylint: disable=g-import-not-at-top,wrong-import-position

NUM_STEPS, EVERY, KILL_AT = 12, 3, 7


def _worker(ckpt_dir: str, out_path: str, kill_at: int) -> None:
  """Runs the toy optimisation resumably; SIGKILLs itself after step ``kill_at``."""
  w = toy.make_stack(jax.random.key(0), n=4)

  def maybe_die(step, state):
    if step == kill_at:
      os.kill(os.getpid(), signal.SIGKILL)

  state = checkpointing.resumable_run(
    toy.step, toy.init_state(w), NUM_STEPS, ckpt_dir, EVERY, keep=2, callback=maybe_die
  )
  np.savez(
    out_path,
    **{k: np.asarray(v) for k, v in state.items() if k != 'opt'},
    mu=np.asarray(state['opt'][0].mu),
    nu=np.asarray(state['opt'][0].nu),
    codes=np.asarray(toy.quantize_result(state).codes),
  )


def _run_worker(ckpt_dir, out_path, kill_at):
  env = {k: v for k, v in os.environ.items() if not k.startswith(('JAX_', 'XLA_'))}
  env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
  env['JAX_PLATFORMS'] = 'cpu'
  return subprocess.run(
    [sys.executable, os.path.abspath(__file__), str(ckpt_dir), str(out_path), str(kill_at)],
    env=env,
    capture_output=True,
    text=True,
    timeout=400,
  )


def test_sigkilled_run_resumes_to_the_uninterrupted_result_bit_for_bit(tmp_path):
  ckpt = tmp_path / 'ckpt'
  killed = _run_worker(ckpt, tmp_path / 'never.npz', KILL_AT)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert not (tmp_path / 'never.npz').exists()
  # Checkpoints at steps 3 and 6 were finalized before the kill at step 7.
  assert checkpointing.finalized_steps(ckpt) == [3, 6]

  resumed = _run_worker(ckpt, tmp_path / 'resumed.npz', -1)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert checkpointing.finalized_steps(ckpt) == [9, 12]  # keep=2

  # Uninterrupted reference, computed in this process without checkpoints.
  w = toy.make_stack(jax.random.key(0), n=4)
  ref = toy.run(toy.init_state(w), NUM_STEPS)
  got = np.load(tmp_path / 'resumed.npz')
  assert int(got['step']) == NUM_STEPS
  np.testing.assert_array_equal(got['blocks'], np.asarray(ref['blocks']))
  np.testing.assert_array_equal(got['mu'], np.asarray(ref['opt'][0].mu))
  np.testing.assert_array_equal(got['nu'], np.asarray(ref['opt'][0].nu))
  np.testing.assert_array_equal(got['codes'], np.asarray(toy.quantize_result(ref).codes))


def _counter_step(state):
  return {'x': state['x'] * 1.5 + 1.0, 'step': state['step'] + 1}


_COUNTER0 = {'x': jnp.ones((2, 3)), 'step': jnp.zeros((), jnp.int32)}


def test_resumable_run_skips_unfinalized_tmp_and_step_dirs(tmp_path):
  ckpt = tmp_path / 'ckpt'
  checkpointing.resumable_run(jax.jit(_counter_step), _COUNTER0, 4, ckpt, every=2)
  assert checkpointing.finalized_steps(ckpt) == [2, 4]
  # A save killed mid-write leaves a tmp dir; a truncated copy leaves a step dir
  # without Orbax's finalisation marker. Neither may be loaded.
  (ckpt / '8.orbax-checkpoint-tmp-1700000000').mkdir()
  (ckpt / '6' / 'default').mkdir(parents=True)
  state = checkpointing.resumable_run(jax.jit(_counter_step), _COUNTER0, 6, ckpt, every=2)
  assert int(state['step']) == 6
  x = 1.0
  for _ in range(6):
    x = 1.5 * x + 1.0
  np.testing.assert_array_equal(state['x'], np.full((2, 3), x, np.float32))
  assert checkpointing.finalized_steps(ckpt) == [4, 6]


def test_corrupt_checkpoint_gives_clear_error(tmp_path):
  ckpt = tmp_path / 'ckpt'
  checkpointing.resumable_run(jax.jit(_counter_step), _COUNTER0, 2, ckpt, every=2)
  data_dirs = [os.path.join(r, d) for r, ds, _ in os.walk(ckpt / '2') for d in ds if d == 'd']
  assert data_dirs
  for d in data_dirs:
    shutil.rmtree(d)
  with pytest.raises(checkpointing.CheckpointError, match=r"checkpoint .*2' could not be restored"):
    checkpointing.resumable_run(jax.jit(_counter_step), _COUNTER0, 4, ckpt, every=2)


def test_restore_state_rejects_missing_step(tmp_path):
  with pytest.raises(checkpointing.CheckpointError, match='no finalized checkpoint'):
    checkpointing.restore_state(tmp_path / 'nothing', _COUNTER0)


def _tiny_quantized_tree():
  from cafeq_jax.models import qlinear  # pylint: disable=g-import-not-at-top

  key = jax.random.key(3)
  w = jax.random.normal(key, (2, 64, 40), jnp.float32)
  q_asym = quantizer.quantize(w, quantizer.QuantSpec(bits=3, group_size=32))
  q_sym = quantizer.quantize(w[0], quantizer.QuantSpec(bits=4, group_size=None, symmetric=True))
  leaves = {
    'layer_0': {
      'mlp': {
        'gating_einsum': qlinear.QuantizedLinear(
          weight=q_asym,
          transform_inv=jnp.eye(16).reshape(1, 16, 16).repeat(4, 0),
          shape=(2, 40, 64),
        )
      },
      'attn': {
        'q_einsum': {
          'w': qlinear.QuantizedLinear(weight=q_sym, transform_inv=None, shape=(2, 64, 20))
        }
      },
      'pre_ffw_norm': {'scale': jnp.arange(64, dtype=jnp.bfloat16)},
    },
    'nibbles': jnp.arange(16, dtype=jnp.uint8).astype(jnp.uint4),
    'signed_nibbles': (jnp.arange(16) - 8).astype(jnp.int4),
    'packed': np.arange(256, dtype=np.uint8).reshape(16, 16),
  }
  return leaves


def _assert_trees_identical(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape, (x.dtype, y.dtype, x.shape, y.shape)
    np.testing.assert_array_equal(
      np.asarray(x).astype(np.float64)
      if x.dtype.itemsize < 1 or str(x.dtype) in ('int4', 'uint4')
      else np.asarray(x),
      np.asarray(y).astype(np.float64) if str(y.dtype) in ('int4', 'uint4') else np.asarray(y),
    )


def test_quantized_model_round_trips_codes_specs_and_configs(tmp_path):
  params = _tiny_quantized_tree()
  spec = quantizer.QuantSpec(bits=3, group_size=32)
  path = checkpointing.save_quantized(
    tmp_path / 'model',
    params,
    model_config=spec,
    quant_config={'method': 'rtn', 'bits': 3, 'groups': (32, None)},
    metadata={'ppl': 12.5},
  )
  restored, info = checkpointing.restore_quantized(path)
  _assert_trees_identical(params, restored)
  ql = restored['layer_0']['mlp']['gating_einsum']
  assert type(ql).__name__ == 'QuantizedLinear' and ql.shape == (2, 40, 64)
  assert ql.weight.spec == spec and ql.weight.codes.dtype == jnp.int8
  assert restored['layer_0']['attn']['q_einsum']['w'].transform_inv is None
  assert restored['nibbles'].dtype == jnp.uint4
  np.testing.assert_array_equal(np.asarray(restored['nibbles']).astype(np.int32), np.arange(16))
  assert info['model_config'] == spec
  assert info['quant_config'] == {'method': 'rtn', 'bits': 3, 'groups': (32, None)}
  assert info['metadata'] == {'ppl': 12.5}
  # Dequantized weights equal too (codes, scales and zeros all intact).
  np.testing.assert_array_equal(
    quantizer.dequantize(ql.weight),
    quantizer.dequantize(params['layer_0']['mlp']['gating_einsum'].weight),
  )


def test_packed_quantized_model_round_trips(tmp_path):
  from cafeq_jax import packing  # pylint: disable=g-import-not-at-top

  w = jax.random.normal(jax.random.key(1), (64, 48), jnp.float32)
  q = quantizer.quantize(w, quantizer.QuantSpec(bits=3, group_size=32))
  params = {'w': packing.pack(q)}
  restored, _ = checkpointing.restore_quantized(
    checkpointing.save_quantized(tmp_path / 'packed', params)
  )
  _assert_trees_identical(params, restored)
  np.testing.assert_array_equal(packing.unpack(restored['w']).codes, q.codes)


def test_restore_quantized_refuses_missing_unfinalized_and_corrupt(tmp_path):
  with pytest.raises(FileNotFoundError, match='no checkpoint at'):
    checkpointing.restore_quantized(tmp_path / 'absent')
  half = tmp_path / 'model.orbax-checkpoint-tmp-123'
  half.mkdir()
  with pytest.raises(checkpointing.CheckpointError, match='not a finalized'):
    checkpointing.restore_quantized(half)
  path = checkpointing.save_quantized(tmp_path / 'model', {'a': jnp.ones((4, 4))})
  with pytest.raises(FileExistsError, match='already exists'):
    checkpointing.save_quantized(path, {'a': jnp.ones((4, 4))})
  for root, dirs, _ in os.walk(os.path.join(path, 'arrays')):
    for d in dirs:
      if d == 'd':
        shutil.rmtree(os.path.join(root, d))
  with pytest.raises(checkpointing.CheckpointError, match='could not be restored'):
    checkpointing.restore_quantized(path)


def test_restore_refuses_classes_outside_cafeq_jax(tmp_path):
  path = checkpointing.save_quantized(tmp_path / 'm', {'a': jnp.ones(2)})
  meta_dir = os.path.join(path, 'metadata')
  meta_file = [os.path.join(meta_dir, f) for f in os.listdir(meta_dir) if not f.startswith('_')][0]
  with open(meta_file) as f:
    meta = json.load(f)
  meta['tree'] = {'__dataclass__': 'subprocess:Popen', 'children': {}, 'static': {}}
  with open(meta_file, 'w') as f:
    json.dump(meta, f)
  with pytest.raises(checkpointing.CheckpointError, match='only classes from modules'):
    checkpointing.restore_quantized(path)


# ---------------------------------------------------------------------------
# Overwriting a saved model is atomic (issue 14, defect 1); bit rot is detected
# (defect 6); raw errors of foreign metadata are clear (defect 10).


def _model(value: float):
  """A small model tree whose every array is filled from ``value``."""
  rng = np.random.default_rng(int(value))
  return {
    'w': np.full((64, 48), value, np.float32) + rng.standard_normal((64, 48), np.float32),
    'codes': np.full((16,), int(value), np.int8),
  }


def _assert_is(restored, value):
  ref = _model(value)
  np.testing.assert_array_equal(np.asarray(restored['w']), ref['w'])
  np.testing.assert_array_equal(np.asarray(restored['codes']), ref['codes'])


def _visible(directory):
  """Entries of ``directory`` that are not temporaries of the atomic module."""
  from cafeq_jax import atomic  # pylint: disable=g-import-not-at-top

  return sorted(n for n in os.listdir(directory) if not atomic.is_temporary(n))


def _overwrite_worker(directory: str, point: str) -> None:
  """Saves model 1, then overwrites it with model 2, SIGKILLing itself at ``point``."""
  from cafeq_jax import atomic  # pylint: disable=g-import-not-at-top

  path = os.path.join(directory, 'm')
  checkpointing.save_quantized(path, _model(1))
  die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
  if point == 'orbax':  # inside Orbax's write of the new model (its first rename)
    os.rename = die
  elif point == 'swap':  # new model complete, not yet swapped in
    atomic.replace_dir = die
  elif point == 'fallback':  # no RENAME_EXCHANGE: between 'old -> aside' and 'new -> path'
    atomic._exchange_ok = False  # pylint: disable=protected-access
    real_rename = os.rename

    def rename(src, dst):
      real_rename(src, dst)
      if os.path.basename(dst).startswith('.m.old.'):
        die()

    atomic.os.rename = rename
  checkpointing.save_quantized(path, _model(2), overwrite=True)


def _run_overwrite_worker(directory, point):
  env = {k: v for k, v in os.environ.items() if not k.startswith(('JAX_', 'XLA_'))}
  env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
  env['JAX_PLATFORMS'] = 'cpu'
  return subprocess.run(
    [sys.executable, os.path.abspath(__file__), 'overwrite', str(directory), point],
    env=env,
    capture_output=True,
    text=True,
    timeout=400,
  )


@pytest.mark.parametrize('point', ['orbax', 'swap', 'fallback'])
def test_sigkill_during_overwrite_keeps_the_old_model_restorable(tmp_path, point):
  killed = _run_overwrite_worker(tmp_path, point)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  # The old model is still there, complete (the new one never got swapped in).
  restored, _ = checkpointing.restore_quantized(tmp_path / 'm')
  _assert_is(restored, 1)
  # The next save removes the dead writer's temporaries and replaces the model.
  checkpointing.save_quantized(tmp_path / 'm', _model(3), overwrite=True)
  _assert_is(checkpointing.restore_quantized(tmp_path / 'm')[0], 3)
  assert os.listdir(tmp_path) == ['m']


@pytest.mark.parametrize('point', ['encode', 'orbax', 'swap', 'exchanged'])
def test_ctrl_c_during_overwrite_leaves_the_old_or_the_new_model(tmp_path, monkeypatch, point):
  from cafeq_jax import atomic  # pylint: disable=g-import-not-at-top

  path = tmp_path / 'm'
  checkpointing.save_quantized(path, _model(1))

  def interrupt(*args, **kwargs):
    raise KeyboardInterrupt

  if point == 'encode':
    monkeypatch.setattr(checkpointing, '_meta_checksum', interrupt)
  elif point == 'orbax':
    monkeypatch.setattr(os, 'rename', interrupt)
  elif point == 'swap':
    monkeypatch.setattr(atomic, 'replace_dir', interrupt)
  else:  # after the atomic exchange, while the old model is being deleted
    real = shutil.rmtree

    def rmtree(p, *args, **kwargs):
      if '.m.tmp.' in os.fspath(p):
        raise KeyboardInterrupt
      return real(p, *args, **kwargs)

    monkeypatch.setattr(atomic.shutil, 'rmtree', rmtree)
  with pytest.raises(KeyboardInterrupt):
    checkpointing.save_quantized(path, _model(2), overwrite=True)
  monkeypatch.undo()
  restored, _ = checkpointing.restore_quantized(path)
  _assert_is(restored, 2 if point == 'exchanged' else 1)
  if point != 'exchanged':
    assert _visible(tmp_path) == os.listdir(tmp_path) == ['m']


def test_save_quantized_never_replaces_a_file_or_a_foreign_directory(tmp_path):
  (tmp_path / 'file').write_text('notes')
  with pytest.raises(FileExistsError, match='not a checkpoint directory'):
    checkpointing.save_quantized(tmp_path / 'file', _model(1), overwrite=True)
  assert (tmp_path / 'file').read_text() == 'notes'
  (tmp_path / 'dir').mkdir()
  (tmp_path / 'dir' / 'keep.txt').write_text('mine')
  with pytest.raises(FileExistsError, match='not a checkpoint directory'):
    checkpointing.save_quantized(tmp_path / 'dir', _model(1), overwrite=True)
  assert (tmp_path / 'dir' / 'keep.txt').read_text() == 'mine'


def _largest_array_file(path):
  files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(path, 'arrays')) for f in fs]
  return max(files, key=os.path.getsize)


def test_flipped_byte_in_array_data_is_a_clear_error_naming_the_leaf(tmp_path):
  path = checkpointing.save_quantized(tmp_path / 'm', _model(1))
  data = _largest_array_file(path)
  blob = bytearray(open(data, 'rb').read())
  blob[len(blob) // 2] ^= 0x10
  with open(data, 'wb') as f:
    f.write(bytes(blob))
  with pytest.raises(
    checkpointing.CheckpointError, match=r"leaf 'w' .*does not match its sha256 checksum"
  ):
    checkpointing.restore_quantized(path)


def _rewrite_metadata(path, edit):
  meta_file = os.path.join(path, 'metadata', 'metadata')
  with open(meta_file) as f:
    meta = json.load(f)
  edit(meta)
  with open(meta_file, 'w') as f:
    json.dump(meta, f)


def test_edited_metadata_and_unknown_classes_are_clear_errors(tmp_path):
  spec = quantizer.QuantSpec(bits=3, group_size=32)
  path = checkpointing.save_quantized(tmp_path / 'm', _model(1), model_config=spec)
  # A value changed in place (still valid JSON): caught by the metadata checksum.
  _rewrite_metadata(path, lambda m: m['model_config']['static'].update(bits=4))
  with pytest.raises(checkpointing.CheckpointError, match='does not match its sha256'):
    checkpointing.restore_quantized(path)
  # A class this version does not have: a CheckpointError naming it, not AttributeError.
  _rewrite_metadata(
    path, lambda m: m['model_config'].update(__dataclass__='cafeq_jax.quantizer:NoSuchSpec')
  )
  with pytest.raises(checkpointing.CheckpointError, match='NoSuchSpec.*does not have'):
    checkpointing.restore_quantized(path)
  _rewrite_metadata(
    path, lambda m: m['model_config'].update(__dataclass__='cafeq_jax.no_such_module:Spec')
  )
  with pytest.raises(checkpointing.CheckpointError, match='no_such_module'):
    checkpointing.read_metadata(path)


if __name__ == '__main__':
  if sys.argv[1] == 'overwrite':
    _overwrite_worker(sys.argv[2], sys.argv[3])
  else:
    _worker(sys.argv[1], sys.argv[2], int(sys.argv[3]))
