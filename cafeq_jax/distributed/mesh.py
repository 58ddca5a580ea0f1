"""Sharding stacks of same-shape matrices over a device mesh (GSPMD, no pmap).

The methods optimise *stacks* of same-shape matrices together: all layers'
``gate`` projections form one ``(L, d_in, d_out)`` stack, all KV groups' value
/ output pairs another. The stack dimension is embarrassingly parallel, so the
natural way to use many devices is to lay the stack out along a 1-D mesh axis
(``'stack'``) with ``NamedSharding(mesh, P('stack'))`` and let ``jax.jit``
(GSPMD) partition the vmapped optimisation step: every device runs the step on
its own slice of the stack, and the result is the same computation as on one
device.

Terminology: the *stack* is the leading dimension of the stacked leaves; a
*shard* is the slice of the stack (or of ``d_in``) held by one device; a
*group* is ``g`` consecutive rows of ``d_in`` sharing one quantization scale; a
*block* is one ``k x k`` diagonal block of a block-diagonal transform.

Which leaves of an optimisation state are stacked: every array leaf whose
leading dimension equals the stack size (params, optimiser moments, per-matrix
best-so-far iterates); every other leaf (step counters, schedules' counts, PRNG
keys) is replicated.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

PyTree = Any

STACK_AXIS = 'stack'


def make_mesh(axis: str = STACK_AXIS, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh named ``axis`` over ``devices`` (default: all global devices).

  On a multi-host pod ``jax.devices()`` lists every process's devices, so the
  mesh spans the whole slice; pass ``jax.local_devices()`` for a per-host mesh.
  """
  devices = list(jax.devices() if devices is None else devices)
  if not devices:
    raise ValueError('make_mesh needs at least one device; got an empty list.')
  return Mesh(np.asarray(devices, dtype=object), (axis,))


def _mesh_axis_size(mesh: Mesh | int, axis: str) -> int:
  if isinstance(mesh, int):
    if mesh < 1:
      raise ValueError(f'number of shards must be >= 1; got {mesh}.')
    return mesh
  if axis not in mesh.shape:
    raise ValueError(f'mesh has axes {tuple(mesh.shape)}; expected an axis named {axis!r}.')
  return int(mesh.shape[axis])


def stack_size(tree: PyTree) -> int:
  """Leading dimension shared by the stacked leaves: the largest leading dim.

  Raises a ValueError if the tree has no array leaf of rank >= 1.
  """
  dims = [np.shape(x)[0] for x in jax.tree.leaves(tree) if np.ndim(x) >= 1]
  if not dims:
    raise ValueError('tree has no array leaf of rank >= 1 to shard along the stack.')
  return int(max(dims))


def _is_stacked(x, n: int) -> bool:
  return np.ndim(x) >= 1 and np.shape(x)[0] == n


def padded_size(n: int, multiple: int) -> int:
  """Smallest multiple of ``multiple`` that is >= ``n``."""
  return int(math.ceil(n / multiple) * multiple)


def pad_stack(tree: PyTree, multiple: int, n: int | None = None) -> PyTree:
  """Pads every stacked leaf's leading dim ``n`` up to a multiple of ``multiple``.

  Padding repeats the last matrix of the stack (edge padding) rather than
  zeros, so that per-matrix losses, scales and inverses stay finite on the
  padding. Only steps that treat the matrices of the stack independently (a
  *sum* of per-matrix losses, per-element optimisers such as Adam) give the
  same result on the real matrices with or without padding; ``unpad_stack``
  removes it.
  """
  n = stack_size(tree) if n is None else n
  target = padded_size(n, multiple)
  if target == n:
    return tree

  def pad(x):
    if not _is_stacked(x, n):
      return x
    x = jnp.asarray(x)
    tail = jnp.repeat(x[-1:], target - n, axis=0)
    return jnp.concatenate([x, tail], axis=0)

  return jax.tree.map(pad, tree)


def unpad_stack(tree: PyTree, n: int, padded: int | None = None) -> PyTree:
  """Inverse of ``pad_stack``: keeps the first ``n`` entries of stacked leaves."""
  padded = stack_size(tree) if padded is None else padded
  if padded == n:
    return tree
  return jax.tree.map(lambda x: x[:n] if _is_stacked(x, padded) else x, tree)


def state_shardings(
  tree: PyTree, mesh: Mesh, axis: str = STACK_AXIS, n: int | None = None
) -> PyTree:
  """``NamedSharding`` per leaf: ``P(axis)`` for stacked leaves, ``P()`` else."""
  n = stack_size(tree) if n is None else n
  stacked = NamedSharding(mesh, P(axis))
  replicated = NamedSharding(mesh, P())
  return jax.tree.map(lambda x: stacked if _is_stacked(x, n) else replicated, tree)


def _put(tree: PyTree, shardings: PyTree) -> PyTree:
  """``device_put`` that also builds arrays spanning several processes.

  In a multi-process job every process passes the same full value (host data);
  each keeps only the shards of its own devices.
  """
  if jax.process_count() == 1:
    return jax.device_put(tree, shardings)

  def put(x, sharding):
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      impl = jax.random.key_impl(x)
      data = put(jax.random.key_data(x), sharding)
      return jax.random.wrap_key_data(data, impl=impl)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

  return jax.tree.map(put, tree, shardings)


def shard_stack(
  tree: PyTree, mesh: Mesh, axis: str = STACK_AXIS, *, pad: bool = False, stack: int | None = None
) -> tuple[PyTree, int]:
  """Lays the stacked leaves of ``tree`` across ``mesh[axis]``.

  Args:
    tree: pytree whose stacked leaves share the leading dimension ``n``
      (``(n, d_in, d_out)`` matrices, their optimiser moments, ...).
    mesh: mesh with an axis named ``axis``.
    axis: mesh axis to shard the stack over.
    pad: when ``n`` is not a multiple of the axis size, pad the stack (see
      ``pad_stack``) instead of raising.
    stack: the stack size ``n`` (default: inferred, see ``stack_size``).

  Returns:
    ``(sharded_tree, n)``: stacked leaves are ``jax.Array``s with sharding
    ``NamedSharding(mesh, P(axis))`` (leading dim ``n`` rounded up to a multiple
    of the axis size when ``pad``), others replicated; ``n`` is the original
    stack size for ``unpad_stack``.
  """
  n = stack_size(tree) if stack is None else stack
  n_dev = _mesh_axis_size(mesh, axis)
  if n % n_dev:
    if not pad:
      raise ValueError(
        f'stack size {n} is not divisible by the {n_dev} devices of mesh axis '
        f'{axis!r}; pass pad=True to pad the stack to {padded_size(n, n_dev)}, '
        f'or use a mesh whose size divides {n}.'
      )
    tree = pad_stack(tree, n_dev, n)
  shardings = state_shardings(tree, mesh, axis, padded_size(n, n_dev))
  return _put(tree, shardings), n


def validate_sharding(
  shape: Sequence[int],
  spec: Any,
  block_size: int | None,
  mesh: Mesh | int,
  *,
  axis: str = STACK_AXIS,
  sharded_dim: int = 0,
  allow_pad: bool = False,
) -> None:
  """Checks up front that a ``(n, d_in, d_out)`` stack can be sharded as asked.

  Args:
    shape: stack shape ``(n, d_in, d_out)`` (more leading dims allowed).
    spec: a ``QuantSpec`` (only ``group_size`` is read) or None.
    block_size: transform block size ``k`` (None: no transform).
    mesh: the mesh (its ``axis`` size is the number of shards) or that number.
    axis: mesh axis name.
    sharded_dim: which dim of ``shape`` is split across the mesh: 0 (the stack),
      ``len(shape) - 2`` / -2 (``d_in``), or -1 (``d_out``).
    allow_pad: accept a stack size not divisible by the shard count (it will be
      padded by ``shard_stack(..., pad=True)``).

  Raises:
    ValueError naming the offending sizes: ``d_in`` not divisible by the group
    size or the block size; when sharding ``d_in``, a shard's ``d_in`` not
    divisible by the group and block sizes (a group or a block would straddle two
    devices); a sharded dim not divisible by the shard count.
  """
  shape = tuple(int(s) for s in shape)
  if len(shape) < 3:
    raise ValueError(f'expected a stack shape (n, d_in, d_out); got {shape}.')
  n_dev = _mesh_axis_size(mesh, axis)
  dim = sharded_dim % len(shape)
  d_in = shape[-2]
  group = getattr(spec, 'group_size', None) if spec is not None else None
  for name, size in (('group_size', group), ('block_size', block_size)):
    if size is not None and d_in % size:
      raise ValueError(f'd_in={d_in} of stack {shape} is not divisible by {name}={size}.')
  if shape[dim] % n_dev:
    if dim == 0 and allow_pad:
      return
    raise ValueError(
      f'dim {dim} (size {shape[dim]}) of stack {shape} is not divisible by the '
      f'{n_dev} devices of mesh axis {axis!r}.'
    )
  if dim == len(shape) - 2:
    shard_d_in = d_in // n_dev
    for name, size in (('group_size', group), ('block_size', block_size)):
      if size is not None and shard_d_in % size:
        raise ValueError(
          f'sharding d_in={d_in} over {n_dev} devices gives shards of '
          f'd_in={shard_d_in}, not divisible by {name}={size}: a '
          f'{"quantization group" if name == "group_size" else "transform block"}'
          f' would straddle two devices. Use fewer devices or shard the stack.'
        )
    if group is None and spec is not None:
      raise ValueError(
        f'per-channel quantization (group_size=None) reduces over all of '
        f'd_in={d_in}; sharding d_in over {n_dev} devices would split that '
        f'reduction. Shard the stack (sharded_dim=0) instead.'
      )


def sharded_run(
  step_fn: Callable[..., PyTree],
  state: PyTree,
  num_steps: int,
  mesh: Mesh | None = None,
  *,
  args: Sequence[PyTree] = (),
  axis: str = STACK_AXIS,
  pad: bool = False,
  stack: int | None = None,
  callback: Callable[[int, PyTree], None] | None = None,
) -> PyTree:
  """Runs ``state = step_fn(state, *args)`` ``num_steps`` times, stack sharded.

  ``step_fn`` is the single-device step (pure, jittable, typically already
  ``jax.jit``-ed over a vmapped loss, e.g. ``core.optimize.make_step``); it is
  re-jitted here with explicit in/out shardings so GSPMD partitions it along the
  stack and the state stays sharded between steps (no gather per step). The
  result is gathered back to the default device and un-padded. For steps that
  treat the matrices independently (a sum of per-matrix losses, element-wise
  optimisers) it is the same computation as the single-device loop: bit for bit
  equal when XLA compiles the per-device batch like the full one (on CPU: with
  >= 4 matrices per device for ``core.optimize``); for batches of 1-2 matrices
  per device XLA may pick other fused-reduction code and results then agree to
  float32 rounding (~1e-7 relative), as two single-device runs of different
  batch sizes do.

  Args:
    step_fn: ``(state, *args) -> state`` with the same structure and shapes.
    state: initial state; stacked leaves share the leading dim ``n``.
    num_steps: number of steps.
    mesh: 1-D mesh (default ``make_mesh(axis)`` over all devices).
    args: constant operands of every step (e.g. the weights ``w``: ``(n, ...)``),
      sharded like the state but not carried.
    axis: mesh axis name.
    pad: pad ``n`` to a multiple of the device count (see ``pad_stack``).
    stack: the stack size ``n`` (default: leading dim of ``args[0]``, else
      inferred from the state, see ``stack_size``). Leaves whose leading dim is
      ``n`` are sharded: use typed keys (``jax.random.key``), not legacy
      ``(2,)`` uint32 keys, in a state whose stack may have size 2.
    callback: called as ``callback(step, state)`` after every step (``step``
      counts from 1) with the sharded, possibly padded state.

  Returns:
    The final state, un-padded, as arrays on the default device.
  """
  mesh = make_mesh(axis) if mesh is None else mesh
  step, sharded, sharded_args, n = shard_step(
    step_fn, state, mesh, args=args, axis=axis, pad=pad, stack=stack
  )
  for i in range(num_steps):
    sharded = step(sharded, *sharded_args)
    if callback is not None:
      callback(i + 1, sharded)
  return gather_to_host(unpad_stack(sharded, n, padded_size(n, _mesh_axis_size(mesh, axis))))


def shard_step(
  step_fn: Callable[..., PyTree],
  state: PyTree,
  mesh: Mesh,
  *,
  args: Sequence[PyTree] = (),
  axis: str = STACK_AXIS,
  pad: bool = False,
  stack: int | None = None,
):
  """Shards ``state`` and ``args`` along the stack and jits ``step_fn`` for them.

  Returns:
    ``(step, sharded_state, sharded_args, n)``: ``step(sharded_state,
    *sharded_args)`` keeps the state's layout; ``n`` is the un-padded stack size.
  """
  if stack is not None:
    n = stack
  elif args:  # the stacked operand (e.g. the weights) fixes n unambiguously
    n = int(np.shape(jax.tree.leaves(args[0])[0])[0])
  else:
    n = stack_size(state)
  n_dev = _mesh_axis_size(mesh, axis)
  if n % n_dev and not pad:
    raise ValueError(
      f'stack size {n} is not divisible by the {n_dev} devices of mesh axis '
      f'{axis!r}; pass pad=True to pad the stack to {padded_size(n, n_dev)}, '
      f'or use a mesh whose size divides {n}.'
    )
  n_pad = padded_size(n, n_dev)
  tree = pad_stack((state, tuple(args)), n_dev, n)
  shardings = state_shardings(tree, mesh, axis, n_pad)
  state, args = _put(tree, shardings)
  state_sh, args_sh = shardings
  step = jax.jit(step_fn, in_shardings=(state_sh, *args_sh), out_shardings=state_sh)
  return step, state, args, n


def gather_to_host(tree: PyTree) -> PyTree:
  """Fully materialises every leaf on the default device (all processes).

  Works for arrays sharded across processes too (``process_allgather``), so
  every process ends with the complete result.
  """
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    def gather(x):
      if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(gather(jax.random.key_data(x)), impl=jax.random.key_impl(x))
      if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jnp.asarray(multihost_utils.process_allgather(x, tiled=True))
      return jnp.asarray(x)

    return jax.tree.map(gather, tree)
  return jax.tree.map(jnp.asarray, jax.device_get(tree))
