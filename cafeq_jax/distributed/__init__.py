"""Scale-out: stacks sharded over a device mesh, multi-process runs, peak memory."""

from cafeq_jax.distributed.memory import peak_memory
from cafeq_jax.distributed.mesh import make_mesh
from cafeq_jax.distributed.mesh import shard_stack
from cafeq_jax.distributed.mesh import sharded_run
from cafeq_jax.distributed.mesh import validate_sharding
from cafeq_jax.distributed.multihost import gather_stacks
from cafeq_jax.distributed.multihost import initialize_from_env
from cafeq_jax.distributed.multihost import local_share
from cafeq_jax.distributed.multihost import log_processes
from cafeq_jax.distributed.multihost import map_stack_shares
from cafeq_jax.distributed.multihost import process_share
from cafeq_jax.distributed.multihost import split_loop

__all__ = [
  'log_processes',
  'gather_stacks',
  'initialize_from_env',
  'local_share',
  'make_mesh',
  'map_stack_shares',
  'peak_memory',
  'process_share',
  'shard_stack',
  'sharded_run',
  'split_loop',
  'validate_sharding',
]
