"""Runs in a subprocess with 8 forced host CPU devices (see test_mesh.py).

Prints one JSON line of check results; assertions fail the process.
"""

import json
import os
import sys

os.environ['XLA_FLAGS'] = (
  os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import distributed_toy as toy  # pylint: disable=g-import-not-at-top
import jax  # pylint: disable=g-import-not-at-top,g-bad-import-order
from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from cafeq_jax.distributed import mesh as mesh_lib  # pylint: disable=g-import-not-at-top

STEPS = 6


def _plain(tree):
  return jax.tree.map(
    lambda x: jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x,
    tree,
  )


def max_diff(a, b):
  a, b = _plain(a), _plain(b)

  def diff(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    same = (x == y) | (np.isnan(x) & np.isnan(y))
    return float(np.max(np.where(same, 0.0, np.abs(x - y)), initial=0.0))

  return max(diff(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def bitwise_equal(a, b):
  a, b = _plain(a), _plain(b)
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return jax.tree.structure(a) == jax.tree.structure(b) and all(
    np.asarray(x).shape == np.asarray(y).shape
    and np.array_equal(np.asarray(x), np.asarray(y), equal_nan=np.asarray(x).dtype.kind == 'f')
    for x, y in zip(la, lb)
  )


def main():
  results = {'device_count': jax.device_count()}
  mesh = mesh_lib.make_mesh()
  assert mesh.shape == {'stack': 8}, mesh.shape

  # 16 matrices, 2 per device: identical to the single-device run, bit for bit.
  w = toy.make_stack(jax.random.key(0), n=16)
  ref = toy.run(toy.init_state(w), STEPS)
  seen = []

  def check_layout(i, state):
    seen.append(
      (
        i,
        state['blocks'].sharding.spec,
        state['blocks'].addressable_shards[0].data.shape,
        state['step'].sharding.spec,
      )
    )

  out = mesh_lib.sharded_run(toy.step, toy.init_state(w), STEPS, mesh, callback=check_layout)
  results['even_bitwise'] = bitwise_equal(ref, out)
  results['even_codes_equal'] = bool(
    np.array_equal(toy.quantize_result(ref).codes, toy.quantize_result(out).codes)
  )
  results['layout'] = [str(s) for s in seen[-1][1:]]
  assert len(seen) == STEPS and seen[-1][1] == P('stack'), seen[-1]
  assert seen[-1][2] == (2, 4, 16, 16) and seen[-1][3] == P(), seen[-1]

  # 12 matrices padded to 16: the real 12 equal the single-device run.
  w12 = w[:12]
  ref12 = toy.run(toy.init_state(w12), STEPS)
  out12 = mesh_lib.sharded_run(toy.step, toy.init_state(w12), STEPS, mesh, pad=True)
  results['padded_bitwise'] = bitwise_equal(ref12, out12)
  try:
    mesh_lib.sharded_run(toy.step, toy.init_state(w12), 1, mesh)
    results['unpadded_error'] = None
  except ValueError as e:
    results['unpadded_error'] = str(e)

  # The real optimisation loop (core.optimize: Hadamard init, Adam, keep-best),
  # weights as a sharded constant operand; then the same run checkpointed,
  # interrupted and resumed with the state sharded. XLA:CPU compiles the fused
  # reductions of this loss differently inside the partitioned program (and for
  # different batch sizes), so the iterates agree to float32 rounding only; the
  # final quantized codes are compared exactly.
  from cafeq_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from cafeq_jax import quantizer  # pylint: disable=g-import-not-at-top
  from cafeq_jax.core import optimize  # pylint: disable=g-import-not-at-top
  from cafeq_jax.core import transforms  # pylint: disable=g-import-not-at-top

  spec = quantizer.QuantSpec(bits=3, group_size=32)
  config = optimize.TransformConfig(block_size=16, init='hadamard', steps=STEPS)
  w4 = toy.make_stack(jax.random.key(2), n=32)[:, None]
  state0 = optimize.init_state(w4, spec, config, jax.random.key(1))
  step = optimize.make_step(spec, config)

  def final_codes(state):
    state = optimize.make_finalize(spec)(state, w4)
    v = transforms.apply_left(state.best_transform().matrix()[:, None], w4)
    return np.asarray(quantizer.quantize(v, spec).codes)

  ref_opt = state0
  for _ in range(STEPS):
    ref_opt = step(ref_opt, w4)
  out_opt = mesh_lib.sharded_run(step, state0, STEPS, mesh, args=(w4,))
  results['optimize_structure_equal'] = jax.tree.structure(ref_opt) == jax.tree.structure(out_opt)
  results['optimize_max_diff'] = max_diff(ref_opt, out_opt)
  results['optimize_codes_equal'] = bool(np.array_equal(final_codes(ref_opt), final_codes(out_opt)))
  import tempfile  # pylint: disable=g-import-not-at-top

  with tempfile.TemporaryDirectory() as d:
    checkpointing.resumable_run(step, state0, STEPS - 2, d, every=2, args=(w4,), mesh=mesh)
    ck = checkpointing.resumable_run(step, state0, STEPS, d, every=2, args=(w4,), mesh=mesh)
    results['checkpointed_sharded_equal'] = bitwise_equal(out_opt, ck)
    results['checkpointed_diff'] = [
      (jax.tree_util.keystr(p), max_diff(x, y))
      for (p, x), y in zip(
        jax.tree_util.tree_flatten_with_path(_plain(out_opt))[0], jax.tree.leaves(_plain(ck))
      )
      if max_diff(x, y) or np.shape(x) != np.shape(y)
    ]
  print(json.dumps(results))


if __name__ == '__main__':
  main()
