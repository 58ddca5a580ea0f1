"""Multi-process runs through ``jax.distributed``: init, work split, gather.

On a TPU pod slice (one process per host) or a multi-node GPU job every
process runs the same program. ``initialize_from_env`` connects them. Two ways
to spread a stack of same-shape matrices over the processes:

* ``split_loop`` / ``map_stack_shares``: each process owns a contiguous share of
  the stack (``process_share``), optimises and quantizes it with its local
  devices as an ordinary single-process program, and ``gather_stacks``
  reassembles the full stacks on every process (``process_allgather``).
* ``mesh.sharded_run`` / ``checkpointing.resumable_run(..., mesh=make_mesh())``:
  one GSPMD program over the global mesh (all processes' devices); Orbax
  checkpoints the globally sharded state from all processes.

Either way the quantized model is identical on all processes and equal to the
single-process result (tests/distributed/test_multihost.py).

Environment / flags read by ``initialize_from_env`` (explicit arguments win):
  ``JAX_COORDINATOR_ADDRESS``  host:port of process 0's coordinator service.
  ``JAX_NUM_PROCESSES``        total number of processes.
  ``JAX_PROCESS_ID``           this process's index in [0, num_processes).
  ``JAX_LOCAL_DEVICE_IDS``     optional comma-separated local device ids.
On Cloud TPU, Slurm and Open MPI these are auto-detected by
``jax.distributed.initialize()``; set ``CAFEQ_DISTRIBUTED=1`` (or pass
``force=True``) to call it with no arguments there.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
import dataclasses
import logging
import os
from typing import Any

from absl import logging as absl_logging
import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

_ENV_ADDRESS = 'JAX_COORDINATOR_ADDRESS'
_ENV_NUM = 'JAX_NUM_PROCESSES'
_ENV_ID = 'JAX_PROCESS_ID'
_ENV_LOCAL = 'JAX_LOCAL_DEVICE_IDS'
_ENV_FORCE = 'CAFEQ_DISTRIBUTED'


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
  """Where this process sits in the job (all 1 / 0 for a single process)."""

  process_index: int
  process_count: int
  local_device_count: int
  device_count: int
  initialized: bool  # whether jax.distributed.initialize was called

  def describe(self) -> str:
    return (
      f'process {self.process_index}/{self.process_count}, '
      f'{self.local_device_count} local / {self.device_count} global devices '
      f'({jax.default_backend()})'
    )


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if value in (None, ''):
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f'environment variable {name}={value!r} must be an integer.') from None


def initialize_from_env(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  local_device_ids: list[int] | None = None,
  *,
  force: bool = False,
  initialization_timeout: int = 300,
) -> ProcessInfo:
  """Calls ``jax.distributed.initialize`` when the job has several processes.

  Arguments left as None are read from the environment (see module docstring).
  Nothing is initialised for a single-process run (no address and
  ``num_processes`` in (None, 1)) unless ``force`` or ``CAFEQ_DISTRIBUTED=1``,
  which calls ``jax.distributed.initialize()`` with whatever was given, letting
  JAX auto-detect the rest (Cloud TPU pods, Slurm, Open MPI). Must run before
  any JAX computation. Idempotent.

  Returns:
    The resulting ``ProcessInfo``.
  """
  address = coordinator_address or os.environ.get(_ENV_ADDRESS) or None
  num = num_processes if num_processes is not None else _env_int(_ENV_NUM)
  pid = process_id if process_id is not None else _env_int(_ENV_ID)
  if local_device_ids is None and os.environ.get(_ENV_LOCAL):
    local_device_ids = [int(i) for i in os.environ[_ENV_LOCAL].split(',')]
  force = force or os.environ.get(_ENV_FORCE, '') not in ('', '0')
  if num is not None and num < 1:
    raise ValueError(f'num_processes={num} must be >= 1.')
  if pid is not None and num is not None and not 0 <= pid < num:
    raise ValueError(f'process_id={pid} must be in [0, num_processes={num}).')
  multi = force or address is not None or (num is not None and num > 1)
  if multi and not _is_initialized():
    if not force and (address is None or num is None or pid is None):
      raise ValueError(
        'a multi-process run needs coordinator_address, num_processes and '
        f'process_id (got {address!r}, {num!r}, {pid!r}); set '
        f'{_ENV_ADDRESS}/{_ENV_NUM}/{_ENV_ID} or {_ENV_FORCE}=1 to let JAX '
        'auto-detect them (Cloud TPU, Slurm, Open MPI).'
      )
    kwargs = dict(
      coordinator_address=address,
      num_processes=num,
      process_id=pid,
      local_device_ids=local_device_ids,
      initialization_timeout=initialization_timeout,
    )
    jax.distributed.initialize(**{k: v for k, v in kwargs.items() if v is not None})
  info = process_info()
  logging.info('cafeq_jax: %s', info.describe())
  return info


def _is_initialized() -> bool:
  try:
    from jax._src import distributed as _dist  # pylint: disable=g-import-not-at-top

    return _dist.global_state.client is not None
  except (ImportError, AttributeError):  # pragma: no cover - JAX internals moved
    return jax.process_count() > 1


def process_info() -> ProcessInfo:
  return ProcessInfo(
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    local_device_count=jax.local_device_count(),
    device_count=jax.device_count(),
    initialized=_is_initialized(),
  )


def process_share(
  n: int, process_index: int | None = None, process_count: int | None = None
) -> slice:
  """The contiguous slice of ``range(n)`` owned by one process.

  Shares differ by at most one (the first ``n % process_count`` processes get
  the extra item), like ``np.array_split``; a process may own nothing when
  ``n < process_count``.
  """
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if not 0 <= index < count:
    raise ValueError(f'process_index={index} must be in [0, process_count={count}).')
  base, extra = divmod(n, count)
  start = index * base + min(index, extra)
  return slice(start, start + base + (1 if index < extra else 0))


def _allgather(x: np.ndarray) -> np.ndarray:
  """(…) per process -> (process_count, …) on every process."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  return np.asarray(multihost_utils.process_allgather(x, tiled=False))


def gather_stacks(local: PyTree, n: int, process_count: int | None = None) -> PyTree:
  """Reassembles stacks split by ``process_share`` on every process.

  Args:
    local: pytree whose leaves are this process's share, leading dim
      ``len(process_share(n))`` (leaves with no leading stack dim are not
      allowed; gather those separately).
    n: the full stack size.
    process_count: defaults to ``jax.process_count()``.

  Returns:
    The same pytree with leaves of leading dim ``n`` as numpy arrays, in stack
    order. Single-process: ``local`` itself (as numpy).
  """
  count = jax.process_count() if process_count is None else process_count
  shares = [process_share(n, i, count) for i in range(count)]
  width = max(s.stop - s.start for s in shares)

  def gather(x):
    x = np.asarray(x)
    mine = shares[jax.process_index()] if count > 1 else shares[0]
    if x.shape[:1] != (mine.stop - mine.start,):
      raise ValueError(
        f'leaf of shape {x.shape} is not a share of the stack: expected leading '
        f'dim {mine.stop - mine.start} (process {jax.process_index()} of {count}, n={n}).'
      )
    if count == 1:
      return x
    dtype = x.dtype
    if dtype.itemsize < 1 or dtype.kind not in 'biuf':  # int4 etc.: widen for transport
      x = x.astype(np.int8 if dtype.kind == 'i' else np.uint8)
    padded = np.zeros((width,) + x.shape[1:], x.dtype)
    padded[: x.shape[0]] = x
    allx = _allgather(padded)  # (count, width, ...)
    full = np.concatenate([allx[i, : s.stop - s.start] for i, s in enumerate(shares)])
    return full.astype(dtype)

  return jax.tree.map(gather, local)


def local_share(
  tree: PyTree, n: int, process_index: int | None = None, process_count: int | None = None
) -> PyTree:
  """This process's share of every stacked leaf (leading dim ``n``) of ``tree``.

  Other leaves (step counters, PRNG keys, schedules) are kept whole. Useful to
  split a state initialised on the full stack (so that random initialisations
  do not depend on how the stack is split) before optimising the share.
  """
  share = process_share(n, process_index, process_count)
  return jax.tree.map(lambda x: x[share] if np.ndim(x) >= 1 and np.shape(x)[0] == n else x, tree)


def _is_key(x) -> bool:
  return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def split_loop(
  step_fn: Callable[..., PyTree],
  state: PyTree,
  num_steps: int,
  *,
  args: tuple[PyTree, ...] = (),
  stack: int | None = None,
  loop: Callable[..., PyTree] | None = None,
) -> PyTree:
  """Runs an optimisation loop with each process on its share of the stack.

  The state is built on the full stack by every process (so random inits do
  not depend on the split), sliced to this process's contiguous share
  (``local_share``), stepped ``num_steps`` times, and the stacked leaves are
  gathered back from all processes; unstacked leaves (step counter, shared PRNG
  key, schedule counts) are identical everywhere and kept.

  Args:
    step_fn: ``(state, *args) -> state`` (e.g. ``core.optimize.make_step``).
    state: the full-stack initial state.
    num_steps: steps.
    args: constant stacked operands (e.g. the weights ``(n, ...)``).
    stack: ``n`` (default: leading dim of ``args[0]``).
    loop: optional inner loop ``loop(step_fn, state, num_steps, args=...)`` for
      the share, e.g. ``mesh.sharded_run`` with a mesh of this process's local
      devices, or ``checkpointing.resumable_run`` with a per-process directory
      bound via ``functools.partial`` (single-process Orbax only).

  Returns:
    The full-stack final state, the same on every process, on the default device.
  """
  if stack is None:
    if not args:
      raise ValueError('split_loop needs stack= or a stacked operand in args.')
    stack = int(np.shape(jax.tree.leaves(args[0])[0])[0])
  n = stack
  stacked = jax.tree.map(lambda x: np.ndim(x) >= 1 and np.shape(x)[0] == n, state)
  local = local_share(state, n)
  local_args = tuple(local_share(a, n) for a in args)
  if loop is None:
    for _ in range(num_steps):
      local = step_fn(local, *local_args)
  else:
    local = loop(step_fn, local, num_steps, args=local_args)

  def gather(is_stacked, x):
    if not is_stacked:
      return jnp.asarray(x)
    if _is_key(x):
      data = gather_stacks(jax.random.key_data(x), n)
      return jax.random.wrap_key_data(jnp.asarray(data), impl=jax.random.key_impl(x))
    return jnp.asarray(gather_stacks(x, n))

  return jax.tree.map(gather, stacked, local)


def map_stack_shares(fn: Callable[[PyTree], PyTree], stack: PyTree, n: int | None = None) -> PyTree:
  """Runs ``fn`` on this process's share of ``stack`` and gathers the results.

  Args:
    fn: ``share -> result``, where every leaf of ``share`` (and of the result)
      has the share's length as leading dim (a vmapped optimise-and-quantize
      over a stack of same-shape matrices). Called on every process, also with
      an empty share when ``n < process_count``, so it must handle a leading 0.
    stack: pytree with leaves ``(n, ...)``; each process needs only its own
      share to be real data (pass the full stack if it is cheap to load).
    n: stack size (default: leading dim of the first leaf).

  Returns:
    ``fn``'s results for the whole stack, identical on every process, as numpy.
  """
  leaves = jax.tree.leaves(stack)
  n = int(np.shape(leaves[0])[0]) if n is None else n
  share = process_share(n)
  local = jax.tree.map(lambda x: x[share], stack)
  return gather_stacks(fn(local), n)


def map_named_stacks(
  fn: Callable[[str, PyTree], PyTree], stacks: Mapping[str, PyTree]
) -> dict[str, PyTree]:
  """``map_stack_shares`` over a dict of named stacks (``get_linears`` output)."""
  return {
    name: map_stack_shares(lambda s, name=name: fn(name, s), stack)
    for name, stack in stacks.items()
  }


def to_device(tree: PyTree) -> PyTree:
  """numpy results -> ``jax.Array``s on this process's default device."""
  return jax.tree.map(jnp.asarray, tree)


def log_processes() -> None:
  """Logs this process's index, the process count and the devices (a launcher's first line)."""
  absl_logging.info(
    'JAX process %d / %d, %d devices (%d local): %s',
    jax.process_index(),
    jax.process_count(),
    jax.device_count(),
    jax.local_device_count(),
    jax.local_devices(),
  )
