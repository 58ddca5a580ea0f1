"""Stack sharding over a device mesh: layout, padding, validation, exactness.

The exactness checks need 8 devices; they run in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` so that the device count
of this test process (and of other test modules) is left alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cafeq_jax import quantizer
from cafeq_jax.distributed import mesh as mesh_lib

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


def _run_eight_device_worker():
  env = {k: v for k, v in os.environ.items() if not k.startswith(('JAX_', 'XLA_'))}
  env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
  env['JAX_PLATFORMS'] = 'cpu'
  proc = subprocess.run(
    [sys.executable, os.path.join(HERE, 'sharded_worker.py')],
    env=env,
    capture_output=True,
    text=True,
    timeout=400,
  )
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_sharding_over_eight_devices_matches_single_device_runs():
  # One subprocess (8 forced host devices) runs every check; one test function so
  # that pytest-xdist does not start it once per worker.
  r = _run_eight_device_worker()
  assert r['device_count'] == 8
  # Toy loop, 16 matrices (2 per device): bit for bit, codes too.
  assert r['even_bitwise'] and r['even_codes_equal']
  # State stays laid out along the stack: blocks P('stack'), 2 matrices per
  # device; step counter replicated.
  assert r['layout'] == ["P('stack',)", '(2, 4, 16, 16)', 'P()']
  # 12 matrices padded to 16: the real 12 equal the single-device run.
  assert r['padded_bitwise']
  err = r['unpadded_error']
  assert err is not None and 'stack size 12' in err and '8 devices' in err
  # core.optimize.make_step (Hadamard init, Adam, keep-best), 32 matrices over 8
  # devices: same final codes; iterates equal to float32 rounding.
  assert r['optimize_structure_equal'] and r['optimize_codes_equal']
  # Dense blocks at lr 2e-2 carry float32 reduction-order differences of the sharded
  # step further than the bounded rotation did (1e-5); the codes above are equal.
  assert r['optimize_max_diff'] < 1e-3
  # The same run checkpointed (state sharded), stopped and resumed = uninterrupted.
  assert r['checkpointed_sharded_equal'], r['checkpointed_diff']


def test_pad_and_unpad_stack_round_trip_with_edge_padding():
  tree = {
    'w': jnp.arange(5 * 2 * 3, dtype=jnp.float32).reshape(5, 2, 3),
    'step': jnp.zeros((), jnp.int32),
  }
  padded = mesh_lib.pad_stack(tree, 4)
  assert padded['w'].shape == (8, 2, 3) and padded['step'].shape == ()
  np.testing.assert_array_equal(padded['w'][5:], np.broadcast_to(tree['w'][4], (3, 2, 3)))
  back = mesh_lib.unpad_stack(padded, 5)
  np.testing.assert_array_equal(back['w'], tree['w'])


def test_sharded_run_on_one_device_equals_plain_loop():
  def step(state):
    return {'x': state['x'] * 0.5 + 1.0, 'i': state['i'] + 1}

  state = {'x': jnp.ones((3, 2, 2)), 'i': jnp.zeros((), jnp.int32)}
  out = mesh_lib.sharded_run(jax.jit(step), state, 3, mesh_lib.make_mesh(devices=jax.devices()[:1]))
  np.testing.assert_array_equal(
    out['x'], np.full((3, 2, 2), 2.0 - 0.5**3)
  )  # x_n = 2 - 2^-n (2 - x_0)
  assert int(out['i']) == 3


@pytest.mark.parametrize(
  'shape, group, block, shards, dim, match',
  [
    ((8, 96, 64), 64, None, 2, 0, 'd_in=96 of stack .* group_size=64'),
    ((8, 128, 64), 32, 48, 2, 0, 'block_size=48'),
    ((6, 128, 64), 32, 32, 4, 0, r'dim 0 \(size 6\).* 4 devices'),
    ((8, 256, 64), 64, 32, 8, -2, 'shards of d_in=32, not divisible by group_size=64'),
    ((8, 256, 64), 32, 64, 8, -2, 'd_in=32, not divisible by block_size=64'),
    ((8, 256, 64), None, None, 2, 1, 'per-channel'),
  ],
)
def test_validate_sharding_names_offending_sizes(shape, group, block, shards, dim, match):
  spec = quantizer.QuantSpec(bits=4, group_size=group)
  with pytest.raises(ValueError, match=match):
    mesh_lib.validate_sharding(shape, spec, block, shards, sharded_dim=dim)


def test_validate_sharding_accepts_valid_layouts():
  spec = quantizer.QuantSpec(bits=3, group_size=32)
  mesh_lib.validate_sharding((16, 256, 64), spec, 64, 8)  # stack
  mesh_lib.validate_sharding((4, 256, 64), spec, 32, 8, sharded_dim=-2)  # d_in
  mesh_lib.validate_sharding((6, 256, 64), spec, 32, 4, allow_pad=True)
  mesh_lib.validate_sharding((4, 256, 64), spec, 32, mesh_lib.make_mesh(devices=jax.devices()[:1]))


def test_peak_memory_reports_host_rss_at_least_a_live_buffer():
  import resource  # pylint: disable=g-import-not-at-top

  from cafeq_jax.distributed import memory  # pylint: disable=g-import-not-at-top

  buf = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
  rss_mib = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**20
  before = rss_mib()
  stats = memory.peak_memory()
  after = rss_mib()
  assert stats['peak_host_mib'] >= 64
  assert before <= stats['peak_host_mib'] <= after  # the OS's figure (Linux: KiB)
  # The device figure: the allocators' largest peak, None where none reports one (CPU).
  peaks = []
  for d in jax.local_devices():
    try:
      device_stats = d.memory_stats() or {}
    except Exception:  # pylint: disable=broad-except  (backends without statistics)
      device_stats = {}
    if 'peak_bytes_in_use' in device_stats:
      peaks.append(device_stats['peak_bytes_in_use'] / 2**20)
  if peaks:
    assert stats['peak_device_mib'] == pytest.approx(max(peaks), rel=1e-3)
  else:
    assert stats['peak_device_mib'] is None
  del buf
