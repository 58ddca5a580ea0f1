"""One process of the two-process ``jax.distributed`` test (see test_multihost.py).

Usage: python multihost_worker.py OUT.npz CKPT_DIR (with JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID in the environment). Optimises block-diagonal
transforms (``core.optimize``) for a stack of matrices (a) split into per-process
shares, (b) as one GSPMD program over the global mesh, (c) as (b) checkpointed
with Orbax and resumed; writes the quantized stacks to OUT.npz.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import distributed_toy as toy  # pylint: disable=g-import-not-at-top
import jax  # pylint: disable=g-import-not-at-top,g-bad-import-order
import numpy as np  # pylint: disable=g-import-not-at-top

from cafeq_jax.distributed import multihost  # pylint: disable=g-import-not-at-top

N, STEPS = 8, 6


def problem():
  """The stack, spec, config and the step/finalize functions of core.optimize."""
  from cafeq_jax import quantizer  # pylint: disable=g-import-not-at-top
  from cafeq_jax.core import optimize  # pylint: disable=g-import-not-at-top

  spec = quantizer.QuantSpec(bits=3, group_size=32)
  config = optimize.TransformConfig(block_size=16, init='hadamard', steps=STEPS)
  w4 = toy.make_stack(jax.random.key(0), n=N)[:, None]
  state0 = optimize.init_state(w4, spec, config, jax.random.key(1))
  return spec, w4, state0, optimize.make_step(spec, config)


def quantized(state, spec, w4):
  """QArray of ``M W`` under each matrix's best transform (after finalize)."""
  from cafeq_jax import quantizer  # pylint: disable=g-import-not-at-top
  from cafeq_jax.core import optimize  # pylint: disable=g-import-not-at-top
  from cafeq_jax.core import transforms  # pylint: disable=g-import-not-at-top

  state = optimize.make_finalize(spec)(state, w4)
  v = transforms.apply_left(state.best_transform().matrix()[:, None], w4)[:, 0]
  return quantizer.quantize(v, spec)


def single_process_reference():
  spec, w4, state, step = problem()
  for _ in range(STEPS):
    state = step(state, w4)
  return quantized(state, spec, w4)


def main(out_path, ckpt_dir):
  info = multihost.initialize_from_env(initialization_timeout=120)
  from cafeq_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from cafeq_jax.distributed import mesh as mesh_lib  # pylint: disable=g-import-not-at-top

  spec, w4, state0, step = problem()
  out = {
    'process_index': info.process_index,
    'process_count': info.process_count,
    'share': np.array([multihost.process_share(N).start, multihost.process_share(N).stop]),
  }
  # (a) each process optimises its contiguous share; results gathered.
  split = multihost.split_loop(step, state0, STEPS, args=(w4,))
  q = quantized(split, spec, w4)
  out.update(split_codes=q.codes, split_scale=q.scale, split_zero=q.zero)
  # (b) one GSPMD program over the global mesh (one device per process).
  mesh = mesh_lib.make_mesh()
  out['mesh_devices'] = mesh.devices.size
  glob = mesh_lib.sharded_run(step, state0, STEPS, mesh, args=(w4,))
  out['global_codes'] = quantized(glob, spec, w4).codes
  # (c) the same, checkpointed by Orbax from both processes, stopped and resumed.
  checkpointing.resumable_run(step, state0, STEPS - 2, ckpt_dir, every=2, args=(w4,), mesh=mesh)
  resumed = checkpointing.resumable_run(
    step, state0, STEPS, ckpt_dir, every=2, args=(w4,), mesh=mesh
  )
  out['resumed_codes'] = quantized(resumed, spec, w4).codes
  np.savez(out_path, **{k: np.asarray(v) for k, v in out.items()})
  if info.initialized:
    jax.distributed.shutdown()


if __name__ == '__main__':
  main(sys.argv[1], sys.argv[2])
