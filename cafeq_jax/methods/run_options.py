"""How a method runs, not what it computes: devices, processes, checkpoints, memory.

``RunOptions`` is the run-level counterpart of a ``Recipe``: it never changes
what is computed (every step equal to float32 rounding; same codes on the tests'
tiny models; on a real model the last bits can grow over many steps, see
``methods.api.quantize``), only where and how the learned-transform
optimisation (``core.optimize.run``) runs. ``RunOptions.loop(unit)`` builds
the ``loop`` handed to ``core.optimize.run`` for one *unit*, a stack of
same-shape matrices optimised together:

* ``mesh``: the stack is laid out along the mesh axis ``'stack'`` with
  ``NamedSharding`` and every step is one GSPMD program
  (``distributed.mesh.sharded_run``); the stack is padded to a multiple of the
  device count (``pad``). ``validate`` checks up front that groups and blocks
  divide ``d_in`` and that the stack divides the mesh (when not padding).
* ``checkpoint_dir``: the optimisation state is saved with Orbax every
  ``checkpoint_every`` steps under ``checkpoint_dir/<unit>``
  (``checkpointing.resumable_run``); a killed run restarted with the same
  arguments resumes each unit where it stopped (finished units restore their
  last step and run 0 steps). ``<unit>/run.json`` records what the unit
  optimises (shapes, quantizer, transform config, key, weight checksums); a
  restart with other inputs is refused instead of resuming a foreign state.
* several processes (``jax.process_count() > 1``, after
  ``distributed.initialize_from_env``): by default each process optimises its
  contiguous share of every stack and the shares are all-gathered
  (``distributed.multihost.split_loop``, optionally over a mesh of its local
  devices). With ``checkpoint_dir`` and no mesh, the global mesh of all
  processes' devices is used instead, so that Orbax saves one globally sharded
  state from all processes (``checkpoint_dir`` must then be a directory every
  process sees: NFS / Filestore).
* ``layers_per_chunk``: ``methods.quantize`` quantizes that many layers at a
  time (``methods.layerwise``).
* ``stack_chunk`` / ``threads`` (plain loops only: no mesh, checkpoints or
  process split): every stack is optimised as independent chunks of
  ``stack_chunk`` units, ``threads`` chunks at a time from Python threads on
  the default device. Each unit's optimisation depends on its own matrix, key
  and the stack's shape key only, so the chunks' results are the whole stack's
  bit for bit. On XLA:CPU this is what uses the cores: the step's batched
  64 x 64 block matmuls run on one core however many the host has, executions
  from two threads run side by side, and a chunk's buffers stay in cache (a
  SmolLM2 step of every stack of ``cafeq-single`` on a 2-core Xeon: 925 ms whole,
  574 ms in chunks of 2 on one thread, 337 ms from 2 threads;
  ``python -m experiments.bench_transform_step``).
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
import dataclasses
import functools
import json
import os
from typing import Any

import jax

from cafeq_jax.core import optimize

PyTree = Any
RUN_FILE = 'run.json'
# Units per chunk of a stack on XLA:CPU (``RunOptions.stack_chunk``): on SmolLM2's
# stacks at 256 columns per step, 2 was the fastest of 2, 4 and 8 with 2 threads on a
# 2-core Xeon (337, 398 and 536 ms per step of every stack of cafeq-single;
# experiments/bench_transform_step.py). A chunk
# of one unit would compile to another program (XLA drops the unit axis, and the
# last float bits differ from the whole stack's), so chunks hold at least two.
CPU_STACK_CHUNK = 2
MIN_STACK_CHUNK = 2


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunOptions:
  """Where and how the transform optimisation of a method runs.

  Attributes:
    mesh: a ``jax.sharding.Mesh`` with an axis ``'stack'`` (e.g.
      ``distributed.make_mesh()``) to shard every stack over; None: one device.
    pad: pad stacks whose size is not a multiple of the mesh size (edge
      padding, results unchanged); False makes that an error.
    checkpoint_dir: directory of resumable Orbax checkpoints (one sub-directory
      per stacked unit); None: no checkpoints.
    checkpoint_every: steps between checkpoints (and after the last step).
    checkpoint_keep: checkpoints kept per unit.
    split_processes: split every stack over the processes of a multi-process
      job (``split_loop``); None: when ``jax.process_count() > 1`` and neither
      ``mesh`` nor ``checkpoint_dir`` is given.
    layers_per_chunk: quantize that many layers at a time, the fp model kept on
      the host (``methods.layerwise``); None: all layers at once.
    callback: ``callback(unit, step, state)`` after every optimisation step
      (progress, logging; the state is the loop's: possibly sharded / padded).
      On a chunked stack ``unit`` names the chunk (``'<unit>[a:b]'``, units ``a``
      to ``b - 1``) and the callback runs on the chunk's thread.
    stack_chunk: units per optimisation program of a plain loop (at least
      ``MIN_STACK_CHUNK``); None: ``CPU_STACK_CHUNK`` on a CPU backend, the whole
      stack elsewhere (accelerators like wide batches).
    threads: chunks optimised at a time (Python threads dispatching to the default
      device); None: ``os.cpu_count()`` on a CPU backend, 1 elsewhere.
  """

  mesh: Any = None
  pad: bool = True
  checkpoint_dir: str | None = None
  checkpoint_every: int = 50
  checkpoint_keep: int | None = 2
  split_processes: bool | None = None
  layers_per_chunk: int | None = None
  callback: Callable[[str, int, PyTree], None] | None = None
  stack_chunk: int | None = None
  threads: int | None = None

  def __post_init__(self):
    if self.mesh is not None and not isinstance(self.mesh, jax.sharding.Mesh):
      raise TypeError(
        f'mesh must be a jax.sharding.Mesh (e.g. '
        f'cafeq_jax.distributed.make_mesh()); got {type(self.mesh).__name__}.'
      )
    if self.checkpoint_dir is not None:
      object.__setattr__(self, 'checkpoint_dir', os.fspath(self.checkpoint_dir))
    if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 1:
      raise ValueError(f'checkpoint_every={self.checkpoint_every!r} must be a positive int.')
    if self.checkpoint_keep is not None and (
      not isinstance(self.checkpoint_keep, int) or self.checkpoint_keep < 1
    ):
      raise ValueError(f'checkpoint_keep={self.checkpoint_keep!r} must be None or an int >= 1.')
    if self.layers_per_chunk is not None and (
      not isinstance(self.layers_per_chunk, int) or self.layers_per_chunk < 1
    ):
      raise ValueError(
        f'layers_per_chunk={self.layers_per_chunk!r} must be None or a positive int.'
      )

    for name, low in (('stack_chunk', MIN_STACK_CHUNK), ('threads', 1)):
      v = getattr(self, name)
      if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
        raise ValueError(f'{name}={v!r} must be None or an int >= {low}.')

  def replace(self, **kwargs) -> RunOptions:
    return dataclasses.replace(self, **kwargs)

  @property
  def is_default(self) -> bool:
    """True when nothing differs from a plain single-process, all-at-once run."""
    return (
      self.mesh is None
      and self.checkpoint_dir is None
      and self.layers_per_chunk is None
      and not self.split_processes
    )

  def validate(
    self,
    stacks: Iterable[tuple[int, ...]],
    spec: Any,
    block_size: int | None,
    *,
    pad: bool | None = None,
  ) -> None:
    """Checks up front that every stack ``(n, ..., d_in, d_out)`` fits the mesh.

    Raises the ``ValueError`` of ``distributed.mesh.validate_sharding`` (naming
    the stack, the sizes and the mesh) for a mesh without a ``'stack'`` axis,
    ``d_in`` not divisible by the group (after ``spec.group_fallback``) or
    block size, or (``pad`` False) a stack size not divisible by the mesh size.
    Only the stack is sharded, so groups and blocks never straddle devices. No-op
    without a mesh.
    """
    if self.mesh is None:
      return
    from cafeq_jax.distributed import mesh as mesh_lib  # pylint: disable=g-import-not-at-top

    pad = self.pad if pad is None else pad
    for shape in stacks:
      rows_spec = spec
      if getattr(spec, 'group_fallback', False):  # the group size actually used
        try:
          rows_spec = spec.for_rows(shape[-2])
        except ValueError:
          pass  # validate_sharding names the stack
      mesh_lib.validate_sharding(shape, rows_spec, block_size, self.mesh, allow_pad=pad)

  def chunks(self, n: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` chunks of a stack of ``n`` units: ``stack_chunk``
    units each, a last single unit joined to the chunk before; one chunk, the whole
    stack, whenever the loop is not the plain one."""
    if not self._plain():
      return [(0, n)]
    size = self.stack_chunk
    if size is None:
      size = CPU_STACK_CHUNK if jax.default_backend() == 'cpu' else n
    bounds = list(range(0, n, max(size, 1))) + [n]
    if len(bounds) > 2 and n - bounds[-2] < MIN_STACK_CHUNK:
      del bounds[-2]
    return list(zip(bounds[:-1], bounds[1:]))

  def num_threads(self, num_chunks: int) -> int:
    """Threads for ``num_chunks`` chunks: ``threads`` (default: the CPU count on a
    CPU backend, else 1), at most one per chunk."""
    t = self.threads
    if t is None:
      t = (os.cpu_count() or 1) if jax.default_backend() == 'cpu' else 1
    return max(1, min(t, num_chunks))

  def _plain(self) -> bool:
    """True when ``loop`` is ``optimize.plain_loop`` (no mesh, checkpoints or split)."""
    return self.mesh is None and self.checkpoint_dir is None and not self._split()

  def _split(self) -> bool:
    if self.split_processes is not None:
      return self.split_processes
    return jax.process_count() > 1 and self.mesh is None and self.checkpoint_dir is None

  def loop(self, unit: str, fingerprint: Mapping[str, Any] | None = None) -> optimize.Loop:
    """The ``core.optimize.run`` loop for the stacked unit named ``unit``.

    Args:
      unit: a name unique within the run (a sub-directory of ``checkpoint_dir``).
      fingerprint: JSON-able description of what the unit optimises; with
        ``checkpoint_dir`` it is written to ``<unit>/run.json`` and a later run
        whose fingerprint differs raises ``checkpointing.CheckpointError``.
    """
    from cafeq_jax.distributed import mesh as mesh_lib  # pylint: disable=g-import-not-at-top

    split = self._split()
    mesh = self.mesh
    ckpt = None
    if self.checkpoint_dir is not None:
      ckpt = os.path.join(os.path.abspath(self.checkpoint_dir), unit)
      if split:
        raise ValueError(
          'split_processes=True cannot checkpoint (Orbax saves one state from all '
          'processes); leave split_processes=None to checkpoint over the global mesh.'
        )
      if mesh is None and jax.process_count() > 1:
        mesh = mesh_lib.make_mesh()  # all processes' devices: one global state
      _check_fingerprint(ckpt, fingerprint)
    if split and mesh is not None:
      remote = [d for d in mesh.devices.flat if d.process_index != jax.process_index()]
      if remote:
        raise ValueError(
          f"split_processes=True needs a mesh of this process's local devices; the "
          f'mesh has {len(remote)} devices of other processes (use '
          f'make_mesh(devices=jax.local_devices())).'
        )

    if ckpt is not None:
      from cafeq_jax import checkpointing  # pylint: disable=g-import-not-at-top

      inner = functools.partial(
        checkpointing.resumable_run,
        ckpt_dir=ckpt,
        every=self.checkpoint_every,
        keep=self.checkpoint_keep,
        mesh=mesh,
        pad=self.pad,
      )
    elif mesh is not None:
      inner = functools.partial(mesh_lib.sharded_run, mesh=mesh, pad=self.pad)
    else:
      inner = optimize.plain_loop

    user = self.callback

    def loop(step_fn, state, num_steps, *, args=(), callback=None):
      def both(i, s):
        if callback is not None:
          callback(i, s)
        user(unit, i, s)

      cb = callback if user is None else both
      if not split:
        return inner(step_fn, state, num_steps, args=args, callback=cb)
      from cafeq_jax.distributed import multihost  # pylint: disable=g-import-not-at-top

      return multihost.split_loop(
        step_fn, state, num_steps, args=args, loop=functools.partial(inner, callback=cb)
      )

    return loop


def _check_fingerprint(ckpt: str, fingerprint: Mapping[str, Any] | None) -> None:
  """Refuses to resume ``ckpt`` if it was written for other inputs; records them."""
  if fingerprint is None:
    return
  fingerprint = json.loads(json.dumps(fingerprint, default=str))
  path = os.path.join(ckpt, RUN_FILE)
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    if saved != fingerprint:
      from cafeq_jax import checkpointing  # pylint: disable=g-import-not-at-top

      diff = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
      raise checkpointing.CheckpointError(
        f'checkpoint directory {ckpt!r} was written for other inputs (differing: '
        f'{diff}; saved {[saved.get(k) for k in diff]}, now '
        f'{[fingerprint.get(k) for k in diff]}); use a fresh checkpoint_dir or delete it.'
      )
    return
  if jax.process_index() == 0:
    from cafeq_jax import atomic  # pylint: disable=g-import-not-at-top

    atomic.write_json(path, fingerprint)
