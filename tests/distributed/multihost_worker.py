"""One process of the two-process ``jax.distributed`` test (see test_multihost.py).

Usage: python multihost_worker.py OUT.npz  (with JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID in the environment). Optimises the toy stack's
transforms on this process's share, quantizes, gathers, and writes the full
codes/scales to OUT.npz.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cafeq_jax.distributed import multihost  # pylint: disable=g-import-not-at-top

info = multihost.initialize_from_env(initialization_timeout=30)

import jax  # pylint: disable=g-import-not-at-top,g-bad-import-order
import numpy as np  # pylint: disable=g-import-not-at-top

import distributed_toy as toy  # pylint: disable=g-import-not-at-top

N, STEPS = 8, 10


def optimise_and_quantize(w_share):
  state = toy.run(toy.init_state(w_share), STEPS)
  return toy.quantize_result(state)


def main(out_path):
  w = toy.make_stack(jax.random.key(0), n=N)
  q = multihost.map_stack_shares(optimise_and_quantize, w)
  share = multihost.process_share(N)
  np.savez(out_path, codes=q.codes, scale=q.scale, zero=q.zero,
           process_index=info.process_index, process_count=info.process_count,
           share=np.array([share.start, share.stop]))
  jax.distributed.shutdown() if info.initialized else None


if __name__ == '__main__':
  main(sys.argv[1])
