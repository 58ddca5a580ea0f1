"""One process of the two-process ``jax.distributed`` test (see test_multihost.py).

Usage: python multihost_worker.py OUT.npz  (with JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID in the environment). Optimises block-diagonal
transforms (``core.optimize``) for this process's share of a stack of matrices,
quantizes ``M W``, gathers the quantized stack from all processes and writes it
to OUT.npz.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cafeq_jax.distributed import multihost  # pylint: disable=g-import-not-at-top

import jax  # pylint: disable=g-import-not-at-top,g-bad-import-order
import numpy as np  # pylint: disable=g-import-not-at-top

import distributed_toy as toy  # pylint: disable=g-import-not-at-top

N, STEPS = 8, 6


def optimize_share(w, share_index=None, share_count=None):
  """core.optimize on one share of the stack ``w`` (N, d_in, d_out).

  The state is initialised on the full stack and then split, so the random
  (Hadamard) initialisation does not depend on the split. Returns the QArray of
  ``M W`` under each matrix's best transform, for that share (the whole stack
  when ``share_count`` is None).
  """
  from cafeq_jax import quantizer  # pylint: disable=g-import-not-at-top
  from cafeq_jax.core import optimize  # pylint: disable=g-import-not-at-top
  from cafeq_jax.core import transforms  # pylint: disable=g-import-not-at-top
  spec = quantizer.QuantSpec(bits=3, group_size=32)
  config = optimize.TransformConfig(block_size=16, init='hadamard', steps=STEPS)
  w4 = w[:, None]
  state = optimize.init_state(w4, spec, config, jax.random.key(1))
  if share_count is not None:
    state = multihost.local_share(state, N, share_index, share_count)
    w4 = multihost.local_share(w4, N, share_index, share_count)
  step = optimize.make_step(spec, config)
  for _ in range(STEPS):
    state = step(state, w4)
  state = optimize.make_finalize(spec)(state, w4)
  v = transforms.apply_left(state.best_transform().matrix()[:, None], w4)[:, 0]
  return quantizer.quantize(v, spec)


def main(out_path):
  info = multihost.initialize_from_env(initialization_timeout=30)
  w = toy.make_stack(jax.random.key(0), n=N)
  q = multihost.gather_stacks(optimize_share(w, info.process_index, info.process_count), N)
  share = multihost.process_share(N)
  np.savez(out_path, codes=q.codes, scale=q.scale, zero=q.zero,
           process_index=info.process_index, process_count=info.process_count,
           share=np.array([share.start, share.stop]))
  if info.initialized:
    jax.distributed.shutdown()


if __name__ == '__main__':
  main(sys.argv[1])
