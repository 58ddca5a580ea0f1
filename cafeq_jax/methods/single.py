"""Single-matrix online transforms and rounding over a model (shared by methods).

Matrices are processed in stacks of the same shape: every transform "unit" (one
matrix, or the matrices of one param leaf when the stage's ``share`` is set) becomes one
entry of a ``(B, T, d_in, d_out)`` stack, and all units of one shape are
optimised together in one jitted step (``core.optimize``).
"""

from __future__ import annotations

from collections.abc import Mapping
import concurrent.futures
import dataclasses
import math
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from cafeq_jax import quantizer
from cafeq_jax import recipes
from cafeq_jax import specs
from cafeq_jax.core import optimize
from cafeq_jax.core import proxy
from cafeq_jax.core import rounding
from cafeq_jax.core import transforms
from cafeq_jax.methods import run_options
from cafeq_jax.models import linears

Key = linears.Key


def _units(
  mats: Mapping[str, object], layers: Mapping[str, list[int]], share: bool
) -> list[tuple[tuple[str, ...], int]]:
  """Transform units ``(names sharing the transform, layer)`` (``mats``: its keys)."""
  units = []
  for group in linears.LEAF_GROUPS:
    names = [n for n in group if n in mats]
    if not names:
      continue
    if share and len(names) > 1:
      common = sorted(set.intersection(*(set(layers[n]) for n in names)))
      units += [(tuple(names), l) for l in common]
      rest = {n: [l for l in layers[n] if l not in common] for n in names}
    else:
      rest = {n: list(layers[n]) for n in names}
    units += [((n,), l) for n in names for l in rest[n]]
  return units


def unit_stacks(
  shapes: Mapping[str, tuple[int, int]], layers: Mapping[str, list[int]], share: bool
) -> dict[tuple[int, int, int], list[tuple[tuple[str, ...], int]]]:
  """Units grouped into stacks: ``(T, d_in, d_out) -> [(names, layer), ...]``.

  Args:
    shapes: ``name -> (d_in, d_out)`` of the matrices.
    layers: ``name -> layers`` to transform.
    share: one transform per param leaf (the transform stage's ``share``).
  """
  by_shape: dict[tuple[int, int, int], list] = {}
  for names, layer in _units(shapes, layers, share):
    by_shape.setdefault((len(names), *shapes[names[0]]), []).append((names, layer))
  return by_shape


def _shape_key(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Key of one shape group (column subsets): depends on the shape only."""
  for d in shape:
    key = jax.random.fold_in(key, d)
  return key


def _unit_key(key: jax.Array, names: tuple[str, ...], layer: int) -> jax.Array:
  """Key of one transform unit (init signs): depends on its layer and matrix only."""
  return jax.random.fold_in(jax.random.fold_in(key, layer), linears.LINEAR_NAMES.index(names[0]))


def _fingerprint(unit, w, spec, cfg, key, units, sigma=None) -> dict:
  """What a checkpointed unit optimises (``RunOptions.loop``): refuse foreign resumes."""
  w = jnp.asarray(w, jnp.float32)
  sums = jax.device_get((jnp.sum(w), jnp.sum(jnp.abs(w))))
  if sigma is not None:
    sums += jax.device_get((jnp.sum(sigma), jnp.sum(jnp.abs(sigma))))
  key_data = key if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else jax.random.key_data(key)
  return {
    'unit': unit,
    'shape': list(w.shape),
    'spec': repr(spec),
    'config': repr(cfg),
    'key': np.asarray(key_data).tolist(),
    'units': [f'{l}/{"+".join(n)}' for n, l in units],
    'weights_sum_abs': [f'{float(x):.6e}' for x in sums],
  }


def transforms_for(*args, **kwargs):
  """``start_transforms(...)`` waited for: ``(blocks, init_losses, timings)``
  (``PendingTransforms.result``)."""
  with start_transforms(*args, **kwargs) as pending:
    return pending.result()


def start_transforms(
  mats: Mapping[str, jax.Array],
  layers: Mapping[str, list[int]],
  stage: recipes.Hadamard | recipes.Learned,
  spec: quantizer.QuantSpec,
  key: jax.Array,
  *,
  run: run_options.RunOptions | None = None,
  layer_offset: int = 0,
  progress: bool = False,
  sigma: Mapping[Key, jax.Array] | None = None,
  by_layer: bool = False,
) -> PendingTransforms:
  """Block-diagonal transforms ``(M, M⁻¹)`` for the given matrices, learned on a pool of
  threads: returns at once, every input checked (shapes, group and block sizes, NaN /
  inf, mesh), with a ``PendingTransforms`` whose look-ups wait for their chunk (use it
  as a context manager: an error or Ctrl-C in the caller stops what has not run).

  Randomness (Hadamard signs, column subsets) is keyed per unit ``(layer,
  matrix)`` and per shape, never by position in a stack, so a layer gets the
  same transform whichever other layers are processed with it (layer by layer
  or all at once), and in whatever order the chunks run.

  Args:
    mats: ``name -> (L, d_in, d_out)`` float32 matrix stacks.
    layers: ``name -> layers`` to transform.
    stage: ``Learned`` (optimised, ``core.optimize``) or ``Hadamard`` (fixed
      random block Hadamard rotation, made here): block size, optimiser, sharing.
    spec: the quantizer.
    key: PRNG key.
    run: how the optimisation runs (mesh, checkpoints, processes; see
      ``RunOptions``); None: plain single-device loop.
    layer_offset: model index of layer 0 of ``mats`` (a chunk of layers): keys
      and checkpoint names use model layer indices.
    progress: progress bars of the optimisation.
    sigma: for ``Learned(loss='input')``, ``(layer, name) -> (nb, k, k)`` diagonal
      blocks of the input second moment of every matrix (a shared unit uses its
      first matrix's: they read one input).
    by_layer: run the chunks in layer order (the first layers' transforms first, for a
      consumer that goes through the layers: sequential rounding), not longest first
      (the shortest wall time when all are awaited together).
  """
  started = time.perf_counter()
  run = run_options.RunOptions() if run is None else run
  learn = isinstance(stage, recipes.Learned)
  weighted = learn and stage.loss == recipes.TransformLoss.INPUT
  if weighted and sigma is None:
    raise ValueError("Learned(loss='input') needs sigma (input second-moment blocks).")
  by_shape = unit_stacks({n: tuple(m.shape[-2:]) for n, m in mats.items()}, layers, stage.share)
  if learn:  # every stack checked against the mesh before any work
    run.validate([(len(e), *shape) for shape, e in by_shape.items()], spec, stage.block_size)
  timings: dict[str, float] = {}
  done, jobs = {}, []
  for shape, entries in sorted(by_shape.items()):
    t0 = time.perf_counter()
    # (B, T, d_in, d_out)
    w = jnp.stack([jnp.stack([mats[n][layer] for n in names]) for names, layer in entries])
    unit_keys = jnp.stack([_unit_key(key, names, layer + layer_offset) for names, layer in entries])
    if not learn:
      transforms.check_block_size(shape[-2], stage.block_size)
      nb = shape[-2] // stage.block_size
      m = jax.vmap(lambda k, nb=nb: transforms.random_hadamard_blocks(k, nb, stage.block_size))(
        unit_keys
      )
      m_inv = jnp.swapaxes(m, -1, -2)
      done[shape] = jax.block_until_ready((m, m_inv)) + (None,)
      timings[_shape_name(shape)] = time.perf_counter() - t0
      continue
    optimize.check_stack(w, spec, stage.config)  # every stack, before any optimisation
    unit = 'single_' + 'x'.join(map(str, shape))
    s = jnp.stack([sigma[(layer, names[0])] for names, layer in entries]) if weighted else None
    fingerprint = None
    if run.checkpoint_dir is not None:
      glob = [(names, layer + layer_offset) for names, layer in entries]
      fingerprint = _fingerprint(unit, w, spec, stage.config, key, glob, s)
    jobs.append(
      _Stack(
        shape,
        unit,
        w,
        unit_keys,
        s,
        _shape_key(key, shape),
        fingerprint,
        run.chunks(len(w)),
        tuple(entries),
      )
    )
  pool = _StackPool(jobs, spec, stage.config if learn else None, run, progress, by_layer)
  return PendingTransforms(by_shape, done, pool, timings, started)


class PendingTransforms(Mapping):
  """``(layer, name) -> (M, M⁻¹)`` of transforms still being learned (``start_transforms``).

  A ``Mapping`` whose keys are known at once; looking one up waits for the chunk
  that learns it (and raises its error, if it failed). ``result()`` waits for all.
  """

  def __init__(self, by_shape, done, pool, timings, started):
    self._where = {}  # (layer, name) -> (shape, index in its stack, matrices of its unit)
    for shape, entries in by_shape.items():
      for b, (names, layer) in enumerate(entries):
        self._where.update({(layer, n): (shape, b, len(names)) for n in names})
    self._done, self._pool, self._timings = done, pool, timings
    self._started, self._checked = started, time.perf_counter()

  @property
  def seconds(self) -> float:
    """Wall time from the start to the last chunk's end (the checks and fixed
    transforms alone when nothing is learned); complete after ``result()``."""
    return max(self._checked, self._pool.last_end or 0.0) - self._started

  def __getitem__(self, key: Key) -> tuple[jax.Array, jax.Array]:
    shape, b, _ = self._where[key]
    if shape in self._done:
      m, m_inv, _ = self._done[shape]
      return m[b], m_inv[b]
    m, m_inv, _, off = self._pool.chunk(shape, b)
    return m[b - off], m_inv[b - off]

  def __iter__(self):
    return iter(self._where)

  def __len__(self) -> int:
    return len(self._where)

  def result(
    self,
  ) -> tuple[dict[Key, tuple[jax.Array, jax.Array]], dict[Key, float], dict[str, float]]:
    """``(blocks, init_losses, timings)`` once every chunk has run: ``(layer, name) ->
    (M, M⁻¹)`` blocks ``(nb, k, k)``; for a learned transform the loss of each unit at
    its initialisation (split over the unit's matrices); seconds per shape group."""
    results = dict(self._done)
    results.update(self._pool.results(self._timings))
    out, init_losses = {}, {}
    for key, (shape, b, unit_size) in self._where.items():
      m, m_inv, init = results[shape]
      out[key] = (m[b], m_inv[b])
      if init is not None:
        init_losses[key] = float(init[b]) / unit_size
    return out, init_losses, self._timings

  def __enter__(self) -> PendingTransforms:
    return self

  def __exit__(self, *exc) -> None:
    self._pool.close()


def _shape_name(shape: tuple[int, int, int]) -> str:
  return f'{shape[-2]}x{shape[-1]}' + (f'x{shape[0]}' if shape[0] > 1 else '')


@dataclasses.dataclass(frozen=True)
class _Stack:
  """One stack of units to learn transforms for, and its chunks (``RunOptions.chunks``)."""

  shape: tuple[int, int, int]
  unit: str
  w: jax.Array  # (B, T, d_in, d_out)
  unit_keys: jax.Array  # (B,)
  sigma: jax.Array | None  # (B, nb, k, k)
  key: jax.Array  # the shape's key (column subsets)
  fingerprint: dict | None
  chunks: list[tuple[int, int]]
  units: tuple[tuple[tuple[str, ...], int], ...]  # (names, layer) of each of the B units


@jax.jit
def _matrix_and_inverse(t: transforms.LearnedTransform) -> tuple[jax.Array, jax.Array]:
  return t.matrix_and_inverse()


class _StackPool:
  """Every chunk of every stack of ``jobs`` as one ``optimize.run``, from a pool of
  ``run.num_threads`` threads (one chunk alone runs on the caller's thread, when its
  result is asked for).

  Order: every stack's first chunk first (concurrent first calls of one jit would
  each compile it), then the largest chunks first, so that one stack's compilation
  and last chunks overlap another's steps, or (``by_layer``) in the order a
  sequential consumer asks for them: by the first model layer of the chunk's units,
  then by matrix (``_chunk_position``). Results do not depend on the order: a chunk's
  units are optimised as in the whole stack.
  """

  def __init__(self, jobs, spec, cfg, run, progress, by_layer):
    self._jobs = {j.shape: j for j in jobs}
    self._spec, self._cfg, self._run = spec, cfg, run
    self._progress = progress
    self._tasks = [(j, a, b) for j in jobs for a, b in j.chunks]
    self._futures: dict[tuple, concurrent.futures.Future] = {}
    self._pool = self._bar = None
    self._error: BaseException | None = None  # the first chunk's failure
    self.last_end: float | None = None  # perf_counter() when the last chunk ended
    self._lock = threading.Lock()
    if len(self._tasks) > 1:
      if by_layer:
        order = sorted(self._tasks, key=lambda t: (t[1] > 0, _chunk_position(t), -_chunk_cost(t)))
      else:
        order = sorted(self._tasks, key=lambda t: (t[1] > 0, -_chunk_cost(t)))
      if progress:
        import tqdm  # pylint: disable=g-import-not-at-top

        self._bar = tqdm.tqdm(total=len(self._tasks), desc='transforms (chunks)', leave=False)
      self._pool = concurrent.futures.ThreadPoolExecutor(run.num_threads(len(self._tasks)))
      for t in order:
        try:
          f = self._pool.submit(self._stop_on_error, *t)
        except RuntimeError:
          if self._error is None:
            raise
          break  # a queued chunk failed already and shut the pool down
        if self._bar is not None:
          f.add_done_callback(lambda _: self._bar.update(1))
        self._futures[(t[0].shape, t[1])] = f

  def _one(self, job: _Stack, a: int, b: int):
    t0 = time.perf_counter()
    name = job.unit if len(job.chunks) == 1 else f'{job.unit}[{a}:{b}]'
    best, state = optimize.run(
      job.w[a:b],
      self._spec,
      self._cfg,
      job.key,
      progress=self._progress and len(self._tasks) == 1,
      loop=self._run.loop(name, job.fingerprint),
      unit_keys=job.unit_keys[a:b],
      sigma=None if job.sigma is None else job.sigma[a:b],
    )
    out = jax.block_until_ready((*_matrix_and_inverse(best), state.init_loss))
    end = time.perf_counter()
    with self._lock:
      self.last_end = max(self.last_end or end, end)
    return out, end - t0

  def _stop_on_error(self, job: _Stack, a: int, b: int):
    """``_one`` on a pool thread: a failure stops the chunks not started (the run has
    failed; the caller sees the error when it asks for any result)."""
    try:
      return self._one(job, a, b)
    except BaseException as e:
      with self._lock:
        self._error = self._error or e
      self._pool.shutdown(wait=False, cancel_futures=True)
      raise

  def _result(self, job: _Stack, a: int, b: int):
    key = (job.shape, a)
    if self._pool is None and key not in self._futures:  # a single chunk: run here, once
      f = concurrent.futures.Future()
      try:
        f.set_result(self._one(job, a, b))
      except BaseException as e:  # pylint: disable=broad-except (re-raised below)
        f.set_exception(e)
      self._futures[key] = f
    f = self._futures.get(key)
    if (f is None or f.cancelled()) and self._error is not None:
      raise self._error  # never started: another chunk failed first
    return f.result()

  def chunk(self, shape, index: int):
    """``(M, M⁻¹, init_loss, first index)`` of the chunk holding unit ``index``."""
    job = self._jobs[shape]
    a, b = next((a, b) for a, b in job.chunks if a <= index < b)
    out, _ = self._result(job, a, b)
    return (*out, a)

  def results(self, timings: dict[str, float]) -> dict:
    """``shape -> (M, M⁻¹, init_loss)`` of every stack, once all chunks have run;
    ``timings`` gets, per shape, the seconds its chunks ran (summed: concurrent chunks
    overlap, so over shapes these can exceed the wall time). The first failure stops
    the chunks not yet started and is raised."""
    if self._pool is not None:
      for f in concurrent.futures.as_completed(self._futures.values()):
        f.result()
    results = {}
    for shape, job in self._jobs.items():
      parts = [self._result(job, a, b) for a, b in job.chunks]
      m, m_inv, init = (jnp.concatenate(x) for x in zip(*(p for p, _ in parts)))
      results[shape] = (m, m_inv, np.asarray(init))
      timings[_shape_name(shape)] = sum(t for _, t in parts)
    return results

  def close(self) -> None:
    """Stops the chunks not started (after an error or Ctrl-C in the caller, too) and
    lets the running ones finish in the background."""
    if self._pool is not None:
      self._pool.shutdown(wait=False, cancel_futures=True)
    if self._bar is not None:
      self._bar.close()


def _chunk_position(task) -> tuple[int, int]:
  """Where sequential rounding first needs a chunk: the least ``(layer, matrix index)``
  of its units (``linears.LINEAR_NAMES`` order). Not its place in the stack: one stack
  can hold two matrices of every layer (SmolLM2's q and o are both 576 x 576), and the
  later one's chunks come after all of the first one's."""
  job, a, b = task
  return min((layer, linears.LINEAR_NAMES.index(names[0])) for names, layer in job.units[a:b])


def _chunk_cost(task) -> int:
  """Work of a chunk, for scheduling: units x matrices x d_in x d_out."""
  job, a, b = task
  return (b - a) * math.prod(job.shape)


@jax.jit
def _apply_left(m, w):
  return transforms.apply_left(m, w)


def _rtn_impl(v, spec):
  scale, zero = quantizer.compute_scale_zero(v, spec)
  return quantizer.round_with_scale(v, scale, zero, spec)


_rtn = jax.jit(_rtn_impl, static_argnums=1)
_rtn_loss = jax.jit(proxy.rtn_loss, static_argnums=1)


def round_matrices(
  mats: Mapping[str, jax.Array],
  layers: Mapping[str, list[int]],
  blocks: Mapping[Key, tuple[jax.Array, jax.Array]],
  spec: specs.Spec,
  stage: recipes.RTN | recipes.GPTQ,
) -> tuple[dict[Key, quantizer.QArray], dict[Key, jax.Array | None]]:
  """Quantizes ``V = M W`` (or ``W`` without transform) for each matrix.

  Rounding is RTN, or for a ``GPTQ`` stage with ``Frobenius`` statistics
  GPTQ-form rounding minimising ``||M⁻¹ (V - V̂)||² = tr(Eᵀ H E)``,
  ``H = M⁻ᵀ M⁻¹`` (block diagonal, built from the ``M⁻¹`` blocks; ``I`` without
  a transform), with the stage's damping, block and act order.

  Returns:
    ``(qarrays, transform_invs)`` keyed by ``(layer, name)``.
  """
  if isinstance(stage, recipes.GPTQ) and not isinstance(stage.statistics, recipes.Frobenius):
    raise ValueError(
      f'round_matrices rounds under the Frobenius proxy; {stage.statistics!r} '
      'needs methods.sequential.round_sequential.'
    )
  qarrays, tinvs = {}, {}
  for name, ls_all in layers.items():
    for spec_l, ls in specs.by_spec(spec, name, ls_all).items():
      _round_stack(mats[name], name, ls, blocks, spec_l, stage, qarrays, tinvs)
  return qarrays, tinvs


def _round_stack(mat, name, ls, blocks, spec, stage, qarrays, tinvs):
  """``round_matrices`` for layers ``ls`` of matrix ``name``, all under ``spec``."""
  w = mat[jnp.asarray(ls)]  # (B, d_in, d_out)
  have = [(l, name) in blocks for l in ls]
  if any(have) and not all(have):
    raise ValueError(f'matrix {name!r}: transforms for only some layers.')
  if all(have):
    m = jnp.stack([blocks[(l, name)][0] for l in ls])
    m_inv = jnp.stack([blocks[(l, name)][1] for l in ls])
    v = _apply_left(m, w)
  else:
    m = m_inv = None
    v = w
  quantizer.validate_weight(v, spec)
  if isinstance(stage, recipes.GPTQ):
    if m_inv is None:
      h = jnp.broadcast_to(
        jnp.eye(v.shape[-2], dtype=jnp.float32), (v.shape[0],) + (v.shape[-2],) * 2
      )
    else:
      hb = jnp.swapaxes(m_inv, -1, -2) @ m_inv  # (B, nb, k, k): (M⁻¹)ᵀ M⁻¹ per block
      h = transforms.block_diag(hb)
    q = rounding.gptq_round(
      v, h, spec, damp=stage.damp, block=stage.block, act_order=stage.act_order
    )
  else:
    q = _rtn(v, spec)
  for b, l in enumerate(ls):
    qarrays[(l, name)] = q[b]
    tinvs[(l, name)] = None if m_inv is None else m_inv[b]


@jax.jit
def _effective_loss(w, q, t):
  eff = quantizer.dequantize(q)
  if t is not None:
    eff = transforms.apply_left(t, eff)
  return proxy.frobenius(w, eff)


def proxy_losses(
  ref: Mapping[str, jax.Array],
  qarrays: Mapping[Key, quantizer.QArray],
  tinvs: Mapping[Key, jax.Array | None],
) -> dict[Key, float]:
  """``||W - M⁻¹ dequant(Q)||²`` per matrix, ``W = ref[name][layer]``."""
  out = {}
  names = sorted({n for _, n in qarrays})
  for n in names:
    ls = sorted(l for l, m in qarrays if m == n)
    groups: dict[tuple, list[int]] = {}  # one stack per (spec, has transform)
    for l in ls:
      key = (qarrays[(l, n)].spec, tinvs.get((l, n)) is not None)
      groups.setdefault(key, []).append(l)
    for (_, with_t), subset in groups.items():
      q = quantizer.QArray.stack([qarrays[(l, n)] for l in subset])
      t = jnp.stack([tinvs[(l, n)] for l in subset]) if with_t else None
      losses = np.asarray(_effective_loss(ref[n][jnp.asarray(subset)], q, t))
      out.update({(l, n): float(x) for l, x in zip(subset, losses)})
  return out


def rtn_losses(mats: Mapping[str, jax.Array], spec: specs.Spec) -> dict[Key, float]:
  """``||W - RTN(W)||²`` per matrix (each under its own spec)."""
  out = {}
  for n, w in mats.items():
    groups = specs.by_spec(spec, n, range(w.shape[0]))
    for spec_l, ls in groups.items():
      sub = w if len(groups) == 1 else w[jnp.asarray(ls)]
      losses = np.asarray(_rtn_loss(sub, spec_l))
      out.update({(l, n): float(x) for l, x in zip(ls, losses)})
  return out


def online_overhead(mats: Mapping[str, jax.Array], tinvs: Mapping[Key, jax.Array | None]) -> float:
  """MACs of all ``x M⁻¹`` over MACs of all quantized matmuls (per token)."""
  extra = total = 0
  for (l, n), t in tinvs.items():
    d_in, d_out = mats[n].shape[-2:]
    total += d_in * d_out
    if t is not None:
      extra += d_in * d_out * transforms.online_overhead(d_in, d_out, t.shape[-1])
  return extra / max(total, 1)
