"""Orbax checkpoints: resumable optimisation runs and quantized models.

Two uses, both atomic:

* ``resumable_run``: the optimisation state (a pytree of arrays plus a step
  counter, as built by ``cafeq_jax.core.optimize``) is saved every ``every``
  steps with an Orbax ``CheckpointManager`` keeping the last ``keep`` (Orbax
  writes into ``<step>.orbax-checkpoint-tmp`` and renames on finalisation, so a
  killed writer leaves only a tmp dir that is never read). A run killed at any
  point (even SIGKILL during a save) and restarted with the same arguments
  resumes from the newest *finalized* step and, the step being deterministic,
  ends bit for bit where an uninterrupted run ends.
* ``save_quantized`` / ``restore_quantized``: a quantized model's param tree
  (``QuantizedLinear`` leaves holding ``QArray`` / ``PackedArray``, full
  precision leaves elsewhere) with its codes, scales, zero points and transforms
  intact, plus the model / quant configs and any metadata as JSON. The model is
  written to a hidden sibling temporary and swapped in by ``atomic.replace_dir``
  only when complete, so overwriting a model never loses the previous one: at
  every instant (Ctrl-C and SIGKILL included) ``path`` holds the old complete
  model or the new one. Every array leaf carries a sha256 of its bytes and the
  metadata a sha256 of itself, verified on restore: a corrupt file (bit rot, a
  partial copy) is a ``CheckpointError`` naming the leaf, never garbage.

Layout of a quantized-model checkpoint directory::

  <path>/_CHECKPOINT_METADATA  (Orbax; present only once finalized)
  <path>/arrays/               every array leaf, keys leaf_00000, leaf_00001, ...
  <path>/metadata/             JSON: tree structure (dicts, lists, dataclass
                               nodes by class name with their static fields),
                               leaf dtypes/shapes/paths/sha256, configs, user
                               metadata, and the sha256 of all of it.

Sub-byte dtypes (``int4``/``uint4``/``int2``/``uint2``) are stored in their 8-bit
container and cast back on restore: Orbax round-trips ``int4`` but not ``uint4``.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
import dataclasses
import hashlib
import importlib
import json
import logging
import os
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from cafeq_jax import atomic

PyTree = Any

# 2: per-leaf and metadata sha256 checksums (version 1 checkpoints are read
# without verification).
FORMAT_VERSION = 2
_FINALIZED_MARKER = '_CHECKPOINT_METADATA'
_TMP_MARKER = '.orbax-checkpoint-tmp'
_ALLOWED_MODULE_PREFIXES = ('cafeq_jax.',)
_SUB_BYTE = {'int4': 'int8', 'uint4': 'uint8', 'int2': 'int8', 'uint2': 'uint8'}


class CheckpointError(ValueError):
  """A checkpoint is missing, unfinalized, corrupt or does not match the state."""


def is_finalized(path: str | os.PathLike) -> bool:
  """Whether ``path`` is a complete Orbax checkpoint directory.

  True only for a directory that is not an Orbax tmp dir and holds the
  ``_CHECKPOINT_METADATA`` file Orbax writes when it finalises a save.
  """
  path = os.fspath(path)
  return (
    os.path.isdir(path)
    and _TMP_MARKER not in os.path.basename(path)
    and os.path.isfile(os.path.join(path, _FINALIZED_MARKER))
  )


# ---------------------------------------------------------------------------
# Resumable optimisation runs.


def _key_leaf(x) -> bool:
  return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _to_savable(state: PyTree) -> PyTree:
  """Typed PRNG keys -> their uint32 key data (Orbax saves plain arrays)."""
  return jax.tree.map(lambda x: jax.random.key_data(x) if _key_leaf(x) else x, state)


def _from_savable(saved: PyTree, like: PyTree) -> PyTree:
  return jax.tree.map(
    lambda s, l: jax.random.wrap_key_data(s, impl=jax.random.key_impl(l)) if _key_leaf(l) else s,
    saved,
    like,
  )


def _abstract(tree: PyTree) -> PyTree:
  def one(x):
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    x = np.asarray(x)
    return jax.ShapeDtypeStruct(x.shape, x.dtype)

  return jax.tree.map(one, tree)


def make_manager(
  ckpt_dir: str | os.PathLike, every: int, keep: int | None = 2, *, async_save: bool = False
) -> ocp.CheckpointManager:
  """An Orbax ``CheckpointManager`` saving every ``every`` steps, keeping ``keep``."""
  if every < 1:
    raise ValueError(f'checkpoint interval every={every} must be >= 1.')
  if keep is not None and keep < 1:
    raise ValueError(f'keep={keep} must be >= 1 (or None to keep all).')
  options = ocp.CheckpointManagerOptions(
    save_interval_steps=every, max_to_keep=keep, create=True, enable_async_checkpointing=async_save
  )
  return ocp.CheckpointManager(os.path.abspath(os.fspath(ckpt_dir)), options=options)


def finalized_steps(ckpt_dir: str | os.PathLike) -> list[int]:
  """Steps under ``ckpt_dir`` whose checkpoint is finalized, ascending."""
  ckpt_dir = os.fspath(ckpt_dir)
  if not os.path.isdir(ckpt_dir):
    return []
  steps = []
  for name in os.listdir(ckpt_dir):
    if name.isdigit() and is_finalized(os.path.join(ckpt_dir, name)):
      steps.append(int(name))
  return sorted(steps)


def _quarantine_incomplete_steps(ckpt_dir: str) -> None:
  """Renames step dirs lacking Orbax's finalisation marker out of the way.

  Orbax lists any directory named like a step; one without the marker (a copy
  cut short, a file system that lost the rename) must never be restored nor
  block a later save of the same step. Renamed to ``<step>.incomplete-<time>``.
  """
  if not os.path.isdir(ckpt_dir) or jax.process_index() != 0:
    return
  for name in os.listdir(ckpt_dir):
    path = os.path.join(ckpt_dir, name)
    if name.isdigit() and os.path.isdir(path) and not is_finalized(path):
      dest = f'{path}.incomplete-{time.time_ns()}'
      logging.warning('checkpoint %s is not finalized; moving it to %s', path, dest)
      os.rename(path, dest)


def restore_state(
  ckpt_dir: str | os.PathLike, like: PyTree, step: int | None = None
) -> tuple[PyTree, int]:
  """Restores the state saved at ``step`` (default: newest finalized step).

  Args:
    ckpt_dir: a ``resumable_run`` checkpoint directory.
    like: a state with the structure, shapes, dtypes (and shardings) to restore.
    step: which step; None for the newest finalized one.

  Returns:
    ``(state, step)``.

  Raises:
    CheckpointError: no finalized checkpoint, or the chosen one is corrupt or
      does not match ``like`` (message names the directory and the cause).
  """
  ckpt_dir = os.path.abspath(os.fspath(ckpt_dir))
  steps = finalized_steps(ckpt_dir)
  if step is None:
    if not steps:
      raise CheckpointError(f'no finalized checkpoint under {ckpt_dir!r}.')
    step = steps[-1]
  elif step not in steps:
    raise CheckpointError(
      f'step {step} has no finalized checkpoint under {ckpt_dir!r}; finalized steps: {steps}.'
    )
  manager = ocp.CheckpointManager(
    ckpt_dir, options=ocp.CheckpointManagerOptions(read_only=True, create=False)
  )
  try:
    saved = manager.restore(step, args=ocp.args.StandardRestore(_abstract(_to_savable(like))))
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(
      f'checkpoint {os.path.join(ckpt_dir, str(step))!r} could not be restored '
      f'(corrupt, or saved from a state of a different structure/shape): '
      f'{type(e).__name__}: {str(e)[:500]}. Delete that step directory to resume '
      f'from the previous one.'
    ) from e
  finally:
    manager.close()
  return _from_savable(saved, like), step


def resumable_run(
  step_fn: Callable[..., PyTree],
  init_state: PyTree,
  num_steps: int,
  ckpt_dir: str | os.PathLike,
  every: int,
  *,
  args: tuple[PyTree, ...] = (),
  keep: int | None = 2,
  mesh: Any = None,
  pad: bool = False,
  async_save: bool = False,
  callback: Callable[[int, PyTree], None] | None = None,
) -> PyTree:
  """``state = step_fn(state, *args)`` ``num_steps`` times, checkpointed, resumable.

  Saves after every ``every``-th step and after the last one; on start, resumes
  from the newest finalized checkpoint under ``ckpt_dir`` (if any). With a
  deterministic ``step_fn`` the result does not depend on how often the run was
  interrupted.

  Args:
    step_fn: pure ``(state, *args) -> state`` (typically jitted, e.g.
      ``core.optimize.make_step(spec, config)``).
    init_state: the step-0 state; also the template (structure, shapes, dtypes)
      for restoring.
    num_steps: total number of steps of the run.
    ckpt_dir: checkpoint directory (one per run; steps are subdirectories).
    every: checkpoint interval in steps.
    args: constant operands of every step (e.g. the weights), not checkpointed:
      pass the same ones when resuming.
    keep: number of most recent checkpoints to keep (None: all).
    mesh: optional ``jax.sharding.Mesh`` with a ``'stack'`` axis: the state is
      sharded along the stack (``cafeq_jax.distributed.mesh``) while running and
      saved/restored sharded.
    pad: pad the stack to a multiple of the mesh size (see ``shard_stack``).
    async_save: write checkpoints in a background thread (Orbax async).
    callback: ``callback(step, state)`` after every step (``step`` counts from 1).

  Returns:
    The state after ``num_steps`` steps (un-padded; gathered to the default
    device when ``mesh`` is given).
  """
  if num_steps < 0:
    raise ValueError(f'num_steps={num_steps} must be >= 0.')
  ckpt_dir = os.path.abspath(os.fspath(ckpt_dir))
  n = None
  step, state, args = step_fn, init_state, tuple(args)
  if mesh is not None:
    from cafeq_jax.distributed import mesh as mesh_lib  # pylint: disable=g-import-not-at-top

    step, state, args, n = mesh_lib.shard_step(step_fn, init_state, mesh, args=args, pad=pad)

  _quarantine_incomplete_steps(ckpt_dir)
  start = 0
  if finalized_steps(ckpt_dir):
    state, start = restore_state(ckpt_dir, state)
    if start > num_steps:
      raise CheckpointError(
        f'{ckpt_dir!r} holds step {start}, beyond num_steps={num_steps}; '
        'use a fresh directory for a shorter run.'
      )
    logging.info('resuming from step %d of %d (%s)', start, num_steps, ckpt_dir)

  manager = make_manager(ckpt_dir, every, keep, async_save=async_save)
  try:
    for i in range(start, num_steps):
      state = step(state, *args)
      if (i + 1) % every == 0 or i + 1 == num_steps:
        manager.save(
          i + 1, args=ocp.args.StandardSave(_to_savable(state)), force=i + 1 == num_steps
        )
      if callback is not None:
        callback(i + 1, state)
    manager.wait_until_finished()
  finally:
    manager.close()

  if mesh is not None:
    from cafeq_jax.distributed import mesh as mesh_lib  # pylint: disable=g-import-not-at-top

    n_pad = mesh_lib.padded_size(n, mesh.shape[mesh_lib.STACK_AXIS])
    state = mesh_lib.gather_to_host(mesh_lib.unpad_stack(state, n, n_pad))
  return state


# ---------------------------------------------------------------------------
# Quantized models.


def _class_name(obj_or_cls) -> str:
  cls = obj_or_cls if isinstance(obj_or_cls, type) else type(obj_or_cls)
  return f'{cls.__module__}:{cls.__qualname__}'


def _load_class(name: str):
  """The dataclass ``'module:Qualname'`` (only from ``cafeq_jax`` modules)."""
  if not isinstance(name, str) or ':' not in name:
    raise CheckpointError(f'checkpoint names class {name!r}; expected "module:Qualname".')
  module, _, qualname = name.partition(':')
  if not module.startswith(_ALLOWED_MODULE_PREFIXES):
    raise CheckpointError(
      f'checkpoint names class {name!r}; only classes from modules starting with '
      f'{_ALLOWED_MODULE_PREFIXES} are restored.'
    )
  try:
    obj = importlib.import_module(module)
    for part in qualname.split('.'):
      obj = getattr(obj, part)
  except (ImportError, AttributeError) as e:
    raise CheckpointError(
      f'checkpoint names class {name!r}, which this version of cafeq_jax does not '
      f'have ({type(e).__name__}: {e}); it was written by another version or is '
      'corrupt.'
    ) from None
  if not isinstance(obj, type) or not dataclasses.is_dataclass(obj):
    raise CheckpointError(f'checkpoint class {name!r} is not a dataclass.')
  return obj


def _build(cls, kwargs: dict, where: str):
  try:
    return cls(**kwargs)
  except (TypeError, ValueError) as e:
    raise CheckpointError(
      f'checkpoint node {where or "<root>"!r} of class {_class_name(cls)} could not be '
      f'rebuilt from its saved fields {sorted(kwargs)}: {type(e).__name__}: {e}'
    ) from None


def _encode_static(value):
  """JSON encoding of static (non-array) values: configs, specs, shapes."""
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  if isinstance(value, (np.integer, np.floating, np.bool_)):
    return value.item()
  if isinstance(value, tuple):
    return {'__tuple__': [_encode_static(v) for v in value]}
  if isinstance(value, list):
    return [_encode_static(v) for v in value]
  if isinstance(value, ml_collections.ConfigDict):
    return {'__configdict__': _encode_static(value.to_dict())}
  if isinstance(value, Mapping):
    if not all(isinstance(k, str) for k in value):
      raise TypeError(f'metadata dict keys must be str; got {list(value)!r}.')
    return {'__dict__': {k: _encode_static(v) for k, v in value.items()}}
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    return {
      '__dataclass__': _class_name(value),
      'static': {
        f.name: _encode_static(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init
      },
    }
  raise TypeError(
    f'cannot store {type(value).__name__} value {value!r} as checkpoint metadata; '
    'expected JSON scalars, tuples, lists, dicts, ConfigDicts or dataclasses.'
  )


def _decode_static(obj, where: str = ''):
  if isinstance(obj, list):
    return [_decode_static(v, where) for v in obj]
  if not isinstance(obj, dict):
    return obj
  if '__tuple__' in obj:
    return tuple(_decode_static(v, where) for v in obj['__tuple__'])
  if '__dict__' in obj:
    return {k: _decode_static(v, f'{where}/{k}') for k, v in obj['__dict__'].items()}
  if '__configdict__' in obj:
    return ml_collections.ConfigDict(_decode_static(obj['__configdict__'], where))
  if '__dataclass__' in obj:
    cls = _load_class(obj['__dataclass__'])
    return _build(
      cls, {k: _decode_static(v, f'{where}/{k}') for k, v in obj['static'].items()}, where
    )
  raise CheckpointError(f'unrecognised metadata entry {str(obj)[:200]!r} at {where!r}.')


def _is_array(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic))


def _sha256(a: np.ndarray) -> str:
  """sha256 of an array's bytes in C order (any dtype, bf16 and sub-byte containers too)."""
  a = np.ascontiguousarray(a).reshape(-1)
  return hashlib.sha256(a.view(np.uint8) if a.size else b'').hexdigest()


def _encode_tree(node, arrays: dict[str, Any], where: str = ''):
  """Tree -> JSON structure; array leaves go to ``arrays`` (leaf_00000, ...).

  Each array entry records the leaf's tree path (``where``) and the sha256 of
  the bytes stored, checked by ``restore_quantized``.
  """
  if node is None:
    return None
  if _is_array(node):
    key = f'leaf_{len(arrays):05d}'
    dtype = str(node.dtype)
    if _key_leaf(node):
      raise TypeError(f'leaf {where!r}: typed PRNG keys are not model parameters; store key_data.')
    # Host numpy copies: written once (by the primary process) whatever devices
    # held them; sub-byte dtypes widened to their 8-bit container.
    node = np.asarray(node)
    if dtype in _SUB_BYTE:
      node = node.astype(_SUB_BYTE[dtype])
    arrays[key] = node
    return {
      '__array__': key,
      'dtype': dtype,
      'shape': list(np.shape(node)),
      'path': where,
      'sha256': _sha256(node),
    }
  if isinstance(node, (bool, int, float, str)):
    return {'__value__': node}
  if isinstance(node, Mapping):
    if not all(isinstance(k, str) for k in node):
      raise TypeError(f'param dict keys must be str; got {list(node)!r} at {where!r}.')
    return {
      '__dict__': {
        k: _encode_tree(v, arrays, f'{where}/{k}' if where else k) for k, v in node.items()
      }
    }
  if isinstance(node, (list, tuple)):
    tag = '__tuple__' if isinstance(node, tuple) else '__list__'
    return {
      tag: [
        _encode_tree(v, arrays, f'{where}/{i}' if where else str(i)) for i, v in enumerate(node)
      ]
    }
  if dataclasses.is_dataclass(node) and not isinstance(node, type):
    children, static = {}, {}
    for f in dataclasses.fields(node):
      if not f.init:
        continue
      value = getattr(node, f.name)
      if f.metadata.get('pytree_node', True):
        children[f.name] = _encode_tree(value, arrays, f'{where}/{f.name}' if where else f.name)
      else:
        static[f.name] = _encode_static(value)
    return {'__dataclass__': _class_name(node), 'children': children, 'static': static}
  raise TypeError(
    f'cannot checkpoint a {type(node).__name__} node at {where!r}; expected arrays, '
    'dicts, lists/tuples, None, Python scalars or (flax.struct) dataclasses.'
  )


def _decode_tree(obj, arrays: Mapping[str, Any], where: str = ''):
  if obj is None:
    return None
  if not isinstance(obj, dict):
    raise CheckpointError(f'unrecognised tree entry {str(obj)[:200]!r} at {where!r}.')
  if '__array__' in obj:
    x = arrays[obj['__array__']]
    x = jnp.asarray(x)
    if obj['dtype'] in _SUB_BYTE:
      x = x.astype(obj['dtype'])
    if list(np.shape(x)) != obj['shape'] or str(x.dtype) != obj['dtype']:
      raise CheckpointError(
        f'leaf {obj.get("path", where)!r} ({obj["__array__"]}) restored as '
        f'{x.dtype}{list(np.shape(x))}, expected {obj["dtype"]}{obj["shape"]}.'
      )
    return x
  if '__value__' in obj:
    return obj['__value__']
  sub = lambda k: f'{where}/{k}' if where else str(k)
  if '__dict__' in obj:
    return {k: _decode_tree(v, arrays, sub(k)) for k, v in obj['__dict__'].items()}
  if '__list__' in obj:
    return [_decode_tree(v, arrays, sub(i)) for i, v in enumerate(obj['__list__'])]
  if '__tuple__' in obj:
    return tuple(_decode_tree(v, arrays, sub(i)) for i, v in enumerate(obj['__tuple__']))
  if '__dataclass__' in obj:
    cls = _load_class(obj['__dataclass__'])
    kwargs = {k: _decode_tree(v, arrays, sub(k)) for k, v in obj['children'].items()}
    kwargs.update({k: _decode_static(v, sub(k)) for k, v in obj['static'].items()})
    return _build(cls, kwargs, where)
  raise CheckpointError(f'unrecognised tree entry {str(obj)[:200]!r} at {where!r}.')


def _composite_checkpointer() -> ocp.Checkpointer:
  return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def _meta_checksum(meta: Mapping[str, Any]) -> str:
  """sha256 of the metadata (without its own ``checksum`` field), canonical JSON."""
  body = {k: v for k, v in meta.items() if k != 'checksum'}
  return hashlib.sha256(json.dumps(body, sort_keys=True, allow_nan=True).encode()).hexdigest()


def _replaceable(path: str) -> bool:
  """Whether the existing ``path`` may be replaced by a model (empty or a checkpoint)."""
  if os.path.islink(path) or not os.path.isdir(path):
    return False
  names = set(os.listdir(path))
  return (
    not names
    or _FINALIZED_MARKER in names
    or {'arrays', 'metadata'} & names == {'arrays', 'metadata'}
  )


def check_overwritable(path: str | os.PathLike) -> None:
  """Raises FileExistsError unless ``save_quantized(path, ..., overwrite=True)`` may
  write ``path`` (absent, an empty directory or a checkpoint); nothing is written."""
  path = os.path.abspath(os.fspath(path))
  if os.path.lexists(path) and not _replaceable(path):
    raise FileExistsError(
      f'{path!r} exists and is not a checkpoint directory (a file, or a directory '
      'holding other files); refusing to replace it. Choose another path.'
    )


def _sync(tag: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    multihost_utils.sync_global_devices(tag)


def save_quantized(
  path: str | os.PathLike,
  params: PyTree,
  *,
  model_config: Any = None,
  quant_config: Any = None,
  metadata: Mapping[str, Any] | None = None,
  overwrite: bool = False,
) -> str:
  """Atomically saves a (quantized) model's params and configs with Orbax.

  The checkpoint is written to a hidden sibling temporary and swapped in only
  when complete (``atomic.replace_dir``): an existing model at ``path`` stays
  restorable until then, whatever interrupts the save (an exception, Ctrl-C,
  SIGKILL), and is deleted only after the swap.

  Args:
    path: destination directory (created; must not exist unless ``overwrite``).
    params: param tree; leaves may be arrays of any dtype (packed ``uint8``,
      ``int8`` codes, ``int4``/``uint4``, bf16/f32), and nodes ``QuantizedLinear``
      / ``QArray`` / ``PackedArray`` or any dataclass from ``cafeq_jax``.
    model_config: e.g. a ``ModelConfig`` dataclass (restored as one).
    quant_config: e.g. a ``Recipe.to_dict()`` or a ConfigDict.
    metadata: extra JSON-able metadata (method report, git revision, ...).
    overwrite: replace an existing checkpoint at ``path`` (never a regular file
      nor a non-empty directory that is not a checkpoint).

  In a multi-process job every process must call it (Orbax synchronises them);
  the arrays are taken as host numpy copies (gather sharded ones first, e.g.
  with ``distributed.multihost.gather_stacks``) and written by process 0.

  Returns:
    The absolute path written.

  Raises:
    FileExistsError: ``path`` exists and ``overwrite`` is False, or it is not a
      checkpoint directory (nothing is replaced).
  """
  path = os.path.abspath(os.fspath(path))
  primary = jax.process_index() == 0
  if primary:
    atomic.recover(path)
  if os.path.lexists(path):
    if not overwrite:
      raise FileExistsError(f'{path!r} already exists; pass overwrite=True to replace it.')
    check_overwritable(path)
  arrays: dict[str, Any] = {}
  tree = _encode_tree(params, arrays)
  meta = {
    'format': 'cafeq_jax.quantized_model',
    'format_version': FORMAT_VERSION,
    'tree': tree,
    'model_config': _encode_static(model_config),
    'quant_config': _encode_static(quant_config),
    'metadata': _encode_static(dict(metadata or {})),
  }
  meta['checksum'] = _meta_checksum(meta)
  if jax.process_count() > 1:  # one temporary name shared by every process
    digest = hashlib.sha256(path.encode()).hexdigest()[:8]
    directory, base = os.path.split(path)
    tmp = os.path.join(directory, f'.{base}.tmp.0.{digest}')
    if primary:
      shutil.rmtree(tmp, ignore_errors=True)
      shutil.rmtree(tmp + _TMP_MARKER, ignore_errors=True)
    _sync(f'cafeq_save_quantized_start:{path}')
  else:
    tmp = atomic.make_temp_dir(path)
    os.rmdir(tmp)  # Orbax creates it (and refuses an existing one)
  checkpointer = _composite_checkpointer()
  try:
    checkpointer.save(
      tmp,
      args=ocp.args.Composite(
        arrays=ocp.args.StandardSave(arrays), metadata=ocp.args.JsonSave(meta)
      ),
    )
    if primary:
      atomic.fsync_tree(tmp)
      atomic.replace_dir(tmp, path)
  except BaseException:
    if primary:
      shutil.rmtree(tmp, ignore_errors=True)
      shutil.rmtree(tmp + _TMP_MARKER, ignore_errors=True)
    raise
  finally:
    checkpointer.close()
  _sync(f'cafeq_save_quantized_done:{path}')
  if primary:
    atomic.clean_stale(path)
  return path


def _metadata_file(path: str) -> str:
  return os.path.join(path, 'metadata', 'metadata')


def _check_classes(obj, path: str) -> None:
  """Every class the metadata names is an importable ``cafeq_jax`` dataclass."""
  if isinstance(obj, dict):
    if '__dataclass__' in obj:
      _load_class(obj['__dataclass__'])
    for v in obj.values():
      _check_classes(v, path)
  elif isinstance(obj, list):
    for v in obj:
      _check_classes(v, path)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
  """The raw JSON metadata of a ``save_quantized`` checkpoint (checksum verified).

  Raises:
    FileNotFoundError: nothing at ``path``.
    CheckpointError: unfinalized, foreign, newer-format or corrupt metadata; a
      class outside ``cafeq_jax`` or unknown to this version.
  """
  path = _check_model_dir(path)
  checkpointer = _composite_checkpointer()
  try:
    meta = checkpointer.restore(path, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))[
      'metadata'
    ]
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(
      f'metadata of checkpoint {path!r} ({_metadata_file(path)}) could not be read '
      f'(corrupt?): {type(e).__name__}: {str(e)[:500]}'
    ) from e
  finally:
    checkpointer.close()
  if not isinstance(meta, dict) or meta.get('format') != 'cafeq_jax.quantized_model':
    raise CheckpointError(f'{path!r} is not a cafeq_jax quantized-model checkpoint.')
  version = meta.get('format_version', 0)
  if not isinstance(version, int) or version > FORMAT_VERSION:
    raise CheckpointError(
      f'{path!r} has format_version {version!r}; this code reads <= {FORMAT_VERSION}.'
    )
  _check_classes(meta, path)
  if version >= 2:
    if meta.get('checksum') != _meta_checksum(meta):
      raise CheckpointError(
        f'metadata of checkpoint {path!r} ({_metadata_file(path)}) does not match its '
        'sha256 checksum: the file is corrupt (bit rot, a partial copy or an edit); '
        're-save the model.'
      )
  else:
    logging.warning(
      'checkpoint %s has format_version %s: its arrays carry no checksums '
      'and are restored unverified.',
      path,
      version,
    )
  return meta


def read_info(path: str | os.PathLike) -> dict[str, Any]:
  """``restore_quantized``'s ``info`` (configs, metadata) without reading the arrays."""
  meta = read_metadata(path)
  return {k: _decode_static(meta[k], k) for k in ('model_config', 'quant_config', 'metadata')}


def _check_model_dir(path) -> str:
  path = os.path.abspath(os.fspath(path))
  if not os.path.exists(path):
    atomic.recover(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f'no checkpoint at {path!r}.')
  if not is_finalized(path):
    raise CheckpointError(
      f'{path!r} is not a finalized Orbax checkpoint (no {_FINALIZED_MARKER}: the '
      'save was interrupted or the directory is not a checkpoint); refusing to load it.'
    )
  return path


def _array_entries(tree) -> dict[str, dict]:
  leaves: dict[str, dict] = {}

  def collect(obj):
    if isinstance(obj, dict):
      if '__array__' in obj:
        leaves[obj['__array__']] = obj
        return
      for v in obj.values():
        collect(v)
    elif isinstance(obj, list):
      for v in obj:
        collect(v)

  collect(tree)
  return leaves


def restore_quantized(path: str | os.PathLike) -> tuple[PyTree, dict[str, Any]]:
  """Restores ``save_quantized``'s params with codes and static specs intact.

  Every array is checked against the sha256 recorded when it was saved.

  Returns:
    ``(params, info)``: params with the saved node types (``QuantizedLinear``,
    ``QArray``, ``PackedArray``, ...) and ``jax.Array`` leaves of the saved dtypes
    on the default device; ``info`` holds ``model_config``, ``quant_config`` (as
    saved: dataclasses rebuilt) and ``metadata``.

  Raises:
    FileNotFoundError: nothing at ``path``.
    CheckpointError: unfinalized, corrupt (the message names the leaf whose
      bytes do not match their checksum) or foreign checkpoint.
  """
  path = _check_model_dir(path)
  meta = read_metadata(path)
  leaves = _array_entries(meta['tree'])
  # numpy targets (pages allocated lazily): read on the host, then put on the
  # default device by _decode_tree, the same on every process.
  try:
    abstract = {
      k: np.zeros(tuple(v['shape']), _SUB_BYTE.get(v['dtype'], v['dtype']))
      for k, v in leaves.items()
    }
  except (KeyError, TypeError, ValueError) as e:
    raise CheckpointError(
      f'metadata of checkpoint {path!r} has a malformed array entry: {type(e).__name__}: {e}'
    ) from None
  checkpointer = _composite_checkpointer()
  try:
    arrays = (
      checkpointer.restore(
        path, args=ocp.args.Composite(arrays=ocp.args.StandardRestore(abstract))
      )['arrays']
      if abstract
      else {}
    )
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(
      f'arrays of checkpoint {path!r} could not be restored (corrupt or '
      f'incomplete): {type(e).__name__}: {str(e)[:500]}'
    ) from e
  finally:
    checkpointer.close()
  for key, entry in leaves.items():
    if 'sha256' not in entry:
      continue
    got = _sha256(np.asarray(arrays[key]))
    if got != entry['sha256']:
      raise CheckpointError(
        f'checkpoint {path!r}: leaf {entry.get("path", key)!r} ({key}, '
        f'{entry["dtype"]}{entry["shape"]}) does not match its sha256 checksum (got '
        f'{got[:12]}..., saved {entry["sha256"][:12]}...): the array data under '
        f'{os.path.join(path, "arrays")} is corrupt (bit rot or a partial copy); '
        're-save the model.'
      )
  params = _decode_tree(meta['tree'], arrays)
  info = {k: _decode_static(meta[k], k) for k in ('model_config', 'quant_config', 'metadata')}
  return params, info
