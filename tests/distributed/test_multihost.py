"""Multi-process runs: two local CPU processes through jax.distributed."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from cafeq_jax.distributed import multihost

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
import multihost_worker  # pylint: disable=g-import-not-at-top,wrong-import-position


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _clean_env():
  env = {k: v for k, v in os.environ.items() if not k.startswith(('JAX_', 'XLA_', 'CAFEQ_'))}
  env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
  env['JAX_PLATFORMS'] = 'cpu'
  return env


@pytest.mark.parametrize(
  'n, count, expected',
  [
    (8, 2, [(0, 4), (4, 8)]),
    (7, 3, [(0, 3), (3, 5), (5, 7)]),
    (2, 3, [(0, 1), (1, 2), (2, 2)]),
  ],
)
def test_process_share_is_contiguous_balanced_partition(n, count, expected):
  got = [multihost.process_share(n, i, count) for i in range(count)]
  assert [(s.start, s.stop) for s in got] == expected
  # Same split as numpy's reference.
  ref = np.array_split(np.arange(n), count)
  assert [list(range(n))[s] for s in got] == [r.tolist() for r in ref]


def test_process_share_rejects_bad_index():
  with pytest.raises(ValueError, match='process_index=2'):
    multihost.process_share(4, 2, 2)


def test_local_share_slices_only_stacked_leaves():
  tree = {'w': np.arange(10).reshape(5, 2), 'step': np.int32(3), 'key': np.zeros(2)}
  got = multihost.local_share(tree, 5, 1, 2)
  np.testing.assert_array_equal(got['w'], tree['w'][3:5])
  assert got['step'] == 3 and got['key'].shape == (2,)


def test_initialize_from_env_is_noop_for_single_process(monkeypatch):
  for k in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID', 'CAFEQ_DISTRIBUTED'):
    monkeypatch.delenv(k, raising=False)
  info = multihost.initialize_from_env()
  assert (info.process_index, info.process_count) == (0, 1)
  assert not info.initialized


def test_initialize_from_env_names_missing_values(monkeypatch):
  monkeypatch.setenv('JAX_NUM_PROCESSES', '2')
  monkeypatch.delenv('JAX_COORDINATOR_ADDRESS', raising=False)
  monkeypatch.delenv('JAX_PROCESS_ID', raising=False)
  with pytest.raises(ValueError, match='coordinator_address'):
    multihost.initialize_from_env()
  monkeypatch.setenv('JAX_PROCESS_ID', '5')
  with pytest.raises(ValueError, match='process_id=5'):
    multihost.initialize_from_env()


def test_two_processes_produce_the_same_quantized_stack_as_one(tmp_path):
  port = _free_port()
  procs, outs = [], []
  for pid in range(2):
    env = _clean_env()
    env.update(
      JAX_COORDINATOR_ADDRESS=f'localhost:{port}', JAX_NUM_PROCESSES='2', JAX_PROCESS_ID=str(pid)
    )
    out = tmp_path / f'p{pid}.npz'
    outs.append(out)
    procs.append(
      subprocess.Popen(
        [
          sys.executable,
          os.path.join(HERE, 'multihost_worker.py'),
          str(out),
          str(tmp_path / 'ckpt'),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
      )
    )
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=400)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]

  # core.optimize (Hadamard init, Adam, keep-best) on the whole stack, one process.
  ref = multihost_worker.single_process_reference()
  for pid, out in enumerate(outs):
    got = np.load(out)
    assert int(got['process_count']) == 2 and int(got['process_index']) == pid
    assert got['share'].tolist() == ([0, 4] if pid == 0 else [4, 8])
    assert int(got['mesh_devices']) == 2
    assert got['split_codes'].dtype == np.asarray(ref.codes).dtype
    np.testing.assert_array_equal(got['split_codes'], np.asarray(ref.codes))
    np.testing.assert_array_equal(got['split_scale'], np.asarray(ref.scale))
    np.testing.assert_array_equal(got['split_zero'], np.asarray(ref.zero))
    np.testing.assert_array_equal(got['global_codes'], np.asarray(ref.codes))
    np.testing.assert_array_equal(got['resumed_codes'], np.asarray(ref.codes))
  # Orbax wrote one checkpoint of the global state, from both processes.
  steps = sorted(int(d) for d in os.listdir(tmp_path / 'ckpt') if d.isdigit())
  assert steps == [4, 6]
