"""Optimisation of block-diagonal transforms for a stack of same-shape matrices.

Minimises, independently for each matrix ``b`` of a stack, the single-matrix
transformed proxy ``L_b(M_b) = Σ_t ||W_bt - M_b⁻¹ Q(M_b W_bt)||²``
(docs/method.md#single-matrix-transforms) through the straight-through quantizer
with an optax optimiser, or, given input second moments ``Σ_b`` (``sigma``), the
input-weighted loss ``Σ_t tr(E_btᵀ Σ_b E_bt)``, ``E = W - M⁻¹ Q(M W)``. The index ``t``
runs over matrices that *share* one transform because they read the same input
(e.g. key and value, gate and up); pass ``w`` as ``(B, T, d_in, d_out)`` for
that, or ``(B, d_in, d_out)`` for one matrix per transform.

All matrices of the stack are optimised in one jitted step (the losses are
summed; parameters are disjoint and Adam is element-wise, so this equals B
independent optimisations). Each matrix's loss is normalised by its RTN loss so
the objective is O(1) whatever the weight scale.

Structure (so the loop can be wrapped for sharding / checkpointing):
  * ``init_state(w, spec, config, key) -> TransformOptState`` (pure);
  * ``make_step(spec, config)`` -> jitted ``step(state, w) -> state``;
  * ``run(w, spec, config, key, loop=...)``: init, the loop, final keep-best.
The state is a pytree of arrays (including the step counter). ``run`` hands its
``loop`` (default ``plain_loop``, the local Python loop) one ``(state, w) ->
state`` step (``make_run_step``), so the same optimisation runs sharded over a
device mesh, split over processes or checkpointed (``methods.run_options``).

Keep-best: the STE loss's forward value *is* the actual quantized loss
``||W - M⁻¹ quant_dequant(M W)||²`` of the current iterate, so with all columns
every step records it and keeps, per matrix, the iterate with the lowest actual
loss (the initial transform included, so the result is never worse than the
init). With ``columns_per_step`` (minibatches of output columns) the full actual
loss is evaluated every ``eval_every`` steps and after the last one instead
(after the last one only with ``eval_every=None``).

Cost notes (CPU): the rotation is ``exp`` of a skew matrix by Taylor scaling and
squaring (matmuls only; batched LAPACK solves were ~5x slower per step), and
without right scales the loss needs a single block matmul ``M W``.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from cafeq_jax import enums
from cafeq_jax import quantizer
from cafeq_jax.core import proxy
from cafeq_jax.core import transforms
from cafeq_jax.core import xla_cpu


class Optimizer(enum.StrEnum):
  ADAM = 'adam'
  ADAMW = 'adamw'


class Schedule(enum.StrEnum):
  COSINE = 'cosine'  # decay to 0 over the steps
  CONSTANT = 'constant'


OPTIMIZERS = tuple(m.value for m in Optimizer)
SCHEDULES = tuple(m.value for m in Schedule)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransformConfig:
  """How a single-matrix transform is parameterised and optimised.

  Attributes:
    block_size: ``k``, size of each diagonal block (must divide ``d_in``).
    parameterization: ``'dense'`` (free blocks, the paper's relaxation; the
      default), ``'lu'`` (``L U R0``, never singular) or ``'rotation'`` (bounded
      scales times a rotation, ``transforms.BlockTransform``); see
      ``transforms.Parameterization``. ``log_scale_bound``, ``learn_scales`` and
      ``right_scales`` apply to ``'rotation'`` only.
    init: ``'identity'`` or ``'hadamard'`` (randomised Sylvester Hadamard blocks;
      ``k`` a power of two).
    optimizer: ``'adam'`` or ``'adamw'``.
    learning_rate: peak learning rate (default 2e-2: ten times the old 2e-3, which
      stopped dense blocks at about 1.4x the proxy they reach; experiments/transform_study.py).
    b1, b2: decay rates of Adam's first and second moment estimates (optax's
      ``b1``, ``b2``; defaults optax's 0.9 and 0.999). Less momentum (``b1=0.5``,
      ``b2=0.95``) lets dense blocks take a larger learning rate and reach a lower
      proxy in fewer steps: the ``cafeq-single`` preset (``recipes``).
    steps: optimisation steps (0 keeps the initial transform).
    schedule: ``'cosine'`` (decay to 0 over ``steps``) or ``'constant'``.
    warmup_fraction: the share of ``steps`` over which the learning rate rises
      linearly from 0 before the cosine decay (cosine schedule only):
      ``round(warmup_fraction * steps)`` steps, at most ``steps - 1``. A fraction,
      not a count, so that a preset's warm-up scales with a ``steps`` override.
    weight_decay: AdamW decoupled weight decay (pulls towards the init).
    log_scale_bound: bound ``c`` on the diagonal log-scales; ``cond(M_b) <=
      exp(4c)``.
    learn_scales: train the diagonal scales (False: orthogonal transforms).
    right_scales: also learn the right diagonal (``M = D1 R D2``). Off (default),
      ``M = D1 R`` and the loss ``||M⁻¹ E||² = ||D1⁻¹ E||²`` costs one block
      matmul instead of two (forward and backward): about 2-3x faster steps.
    columns_per_step: optimise on a random subset of this many output columns
      per step (the loss is a sum over columns, whose quantization groups are
      independent, so this is an unbiased minibatch gradient); ``None`` uses all.
      The actual full loss is then evaluated every ``eval_every`` steps for the
      keep-best rule.
    eval_every: steps between full evaluations when subsampling columns; None
      evaluates the final iterate only (the initial one always is): under the
      cosine schedule the last iterate is nearly always the best, and a full
      evaluation of many columns costs several subsampled steps (``cafeq``'s
      shared transforms; see ``recipes``).
    ste: gradient through the quantizer, ``'round'`` (STE on rounding only,
      scales differentiable: the default, see ``proxy.round_ste_quant``) or
      ``'full'`` (``quantizer.fake_quant``).
  """

  block_size: int = 64
  parameterization: transforms.Parameterization = transforms.Parameterization.DENSE
  init: transforms.TransformInit = transforms.TransformInit.IDENTITY
  optimizer: Optimizer = Optimizer.ADAM
  learning_rate: float = 2e-2
  b1: float = 0.9
  b2: float = 0.999
  steps: int = 150
  schedule: Schedule = Schedule.COSINE
  warmup_fraction: float = 0.0
  weight_decay: float = 0.0
  log_scale_bound: float = 0.5
  learn_scales: bool = True
  right_scales: bool = False
  columns_per_step: int | None = None
  eval_every: int | None = 10
  ste: proxy.Ste = proxy.Ste.ROUND

  def __post_init__(self):
    for name in ('block_size', 'steps', 'eval_every', 'columns_per_step'):
      v = getattr(self, name)
      if isinstance(v, bool) or (v is not None and not isinstance(v, int)):
        raise TypeError(f'{name}={v!r} must be an int, not {type(v).__name__}.')
    for name in ('learning_rate', 'b1', 'b2', 'warmup_fraction', 'weight_decay', 'log_scale_bound'):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f'{name}={v!r} must be a finite number.')
    for name in ('learn_scales', 'right_scales'):
      if not isinstance(getattr(self, name), bool):
        raise TypeError(f'{name}={getattr(self, name)!r} must be a bool (True / False).')
    if not isinstance(self.block_size, int) or self.block_size < 1:
      raise ValueError(f'block_size={self.block_size!r} must be a positive int.')
    for name, cls in (
      ('parameterization', transforms.Parameterization),
      ('init', transforms.TransformInit),
      ('optimizer', Optimizer),
      ('schedule', Schedule),
      ('ste', proxy.Ste),
    ):
      object.__setattr__(self, name, enums.coerce(cls, getattr(self, name), name))
    if self.parameterization != 'rotation' and (self.right_scales or not self.learn_scales):
      raise ValueError(
        f'right_scales / learn_scales=False shape the rotation parameterisation; '
        f'parameterization={self.parameterization.value!r} learns its blocks whole.'
      )
    if self.init == 'hadamard' and self.block_size & (self.block_size - 1):
      raise ValueError(f'init=hadamard needs a power-of-two block_size; got {self.block_size}.')
    if not self.learning_rate > 0:
      raise ValueError(f'learning_rate={self.learning_rate!r} must be > 0.')
    if not isinstance(self.steps, int) or self.steps < 0:
      raise ValueError(f'steps={self.steps!r} must be an int >= 0.')
    for name in ('b1', 'b2', 'warmup_fraction'):
      if not 0 <= getattr(self, name) < 1:
        raise ValueError(f'{name}={getattr(self, name)!r} must be in [0, 1).')
    if self.weight_decay < 0:
      raise ValueError(f'weight_decay={self.weight_decay!r} must be >= 0.')
    if not self.log_scale_bound > 0:
      raise ValueError(f'log_scale_bound={self.log_scale_bound!r} must be > 0.')
    if self.columns_per_step is not None and (
      not isinstance(self.columns_per_step, int) or self.columns_per_step < 1
    ):
      raise ValueError(
        f'columns_per_step={self.columns_per_step!r} must be None or a positive int.'
      )
    if self.eval_every is not None and self.eval_every < 1:
      raise ValueError(f'eval_every={self.eval_every!r} must be None or a positive int.')


def make_optimizer(config: TransformConfig) -> optax.GradientTransformation:
  """The optax optimiser (with schedule) described by ``config``."""
  steps = max(config.steps, 1)
  warmup = min(round(config.warmup_fraction * steps), steps - 1)
  if config.schedule == 'cosine' and not warmup:
    # optax's warm-up variant would log a zero-length linear segment on every call.
    lr = optax.cosine_decay_schedule(config.learning_rate, decay_steps=steps)
  elif config.schedule == 'cosine':
    lr = optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=config.learning_rate,
      warmup_steps=warmup,
      decay_steps=steps,
      end_value=0.0,
    )
  else:
    lr = optax.constant_schedule(config.learning_rate)
  if config.optimizer == 'adamw':
    return optax.adamw(lr, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay)
  return optax.adam(lr, b1=config.b1, b2=config.b2)


@flax.struct.dataclass
class TransformOptState:
  """Optimisation state for a stack of ``B`` transforms (a pytree of arrays).

  Attributes:
    transform: current learned transform (``transforms.LearnedTransform``), batch ``(B,)``.
    opt_state: the optax state of its trainable parameters.
    best: trainable parameters of the best iterate so far, per matrix.
    best_loss: ``(B,)`` actual quantized loss of ``best``.
    init_loss: ``(B,)`` actual quantized loss of the initial transform.
    rtn_loss: ``(B,)`` loss of plain RTN (no transform), the normaliser.
    last_loss: ``(B,)`` loss of the most recently evaluated iterate (on the
      column subset when subsampling).
    key: PRNG key for the column subsets.
    step: int32 scalar, steps taken.
    inverse: for a dense transform, ``(B, nb, k, k)`` inverse blocks of the
      iterate the last step evaluated (at init, of the initial one): the warm start
      of the next step's ``transforms.warm_inverse``. None for closed-form
      inverses (rotation, LU).
    inverse_fallbacks: for a dense transform, ``(B,)`` int32: per matrix, the
      blocks that took the Gauss-Jordan inverse over the steps so far (the warm
      start had not converged); None otherwise.
  """

  transform: transforms.LearnedTransform
  opt_state: optax.OptState
  best: dict[str, jax.Array]
  best_loss: jax.Array
  init_loss: jax.Array
  rtn_loss: jax.Array
  last_loss: jax.Array
  key: jax.Array
  step: jax.Array
  inverse: jax.Array | None = None
  inverse_fallbacks: jax.Array | None = None

  def best_transform(self) -> transforms.LearnedTransform:
    return self.transform.with_trainable(self.best)


def _as_stack(w: jax.Array) -> jax.Array:
  """(B, d_in, d_out) -> (B, 1, d_in, d_out); (B, T, d_in, d_out) unchanged."""
  if w.ndim == 3:
    return w[:, None]
  if w.ndim == 4:
    return w
  raise ValueError(
    f'w must be (B, d_in, d_out) or (B, T, d_in, d_out); got shape {tuple(w.shape)}.'
  )


def _side_by_side(w4: jax.Array) -> jax.Array:
  """``(B, T, d_in, d_out)`` -> ``(B, 1, d_in, T * d_out)``: the ``T`` matrices that
  share one transform as one matrix, their columns side by side in ``t``-major order.

  That is what sharing means: ``M`` acts on the rows, a quantization group runs down
  one column and the losses sum over columns. One matrix per stack entry spares the
  steps the transposes of every intermediate that XLA:CPU's block matmuls need with a
  separate ``T`` axis (a third of a shared stack's step on a 2-core Xeon).
  """
  B, T, d_in, d_out = w4.shape
  if T == 1:
    return w4
  return jnp.swapaxes(w4, 1, 2).reshape(B, 1, d_in, T * d_out)


def _weighted_square(e: jax.Array, sigma: jax.Array | None) -> jax.Array:
  """``Σ_t tr(e_tᵀ Σ e_t)`` per stack entry (``Σ = I`` for None): ``(B,)``.

  Args:
    e: ``(B, T, d_in, d_out)`` errors in the original basis.
    sigma: ``(B, nb, k, k)`` diagonal blocks of each entry's input second moment
      (``nb * k = d_in``), or None.
  """
  if sigma is None:
    return jnp.sum(jnp.square(e), axis=(1, 2, 3))
  return jnp.sum(e * transforms.apply_left(sigma[:, None], e), axis=(1, 2, 3))


def stack_loss(
  transform: transforms.LearnedTransform,
  w: jax.Array,
  spec: quantizer.QuantSpec,
  *,
  ste: str | bool = 'round',
  sigma: jax.Array | None = None,
  inverse: jax.Array | None = None,
) -> jax.Array:
  """Per-transform loss ``Σ_t ||W_bt - M_b⁻¹ Q(M_b W_bt)||²``: ``(B,)`` float32.

  For a dense or LU transform it is ``||M⁻¹ (Q(V) - V)||²``, ``V = M W``. For the
  rotation without right scales (``M = D1 R``, ``R`` orthogonal) it is evaluated as
  ``||D1⁻¹ (Q(V) - V)||²`` with ``V = M W``: same value and gradient (``M⁻¹ M W
  = W`` identically), one block matmul instead of two. With ``sigma`` it is
  ``Σ_t tr(Eᵀ Σ_b E)`` with ``E = M⁻¹ (Q(V) - V)`` (every parameterisation).

  Args:
    transform: batch ``(B,)``.
    w: ``(B, d_in, d_out)`` or ``(B, T, d_in, d_out)``.
    sigma: optional ``(B, nb_s, k_s, k_s)`` diagonal blocks of the input second
      moment of each entry (any block size dividing ``d_in``).
    inverse: optional precomputed ``(B, nb, k, k)`` inverse blocks of a dense
      transform (the optimiser's ``transforms.warm_inverse``), used as ``M⁻¹``
      with its exact gradient (``transforms.inverse_given``).
  """
  w4 = _side_by_side(_as_stack(jnp.asarray(w, jnp.float32)))
  if inverse is not None:
    if not isinstance(transform, transforms.DenseTransform):
      raise ValueError(f'inverse= is for dense transforms; got {type(transform).__name__}.')
    m = transform.matrix()
    m_inv = transforms.inverse_given(m, inverse)
    v = transforms.apply_left(m[:, None], w4)
    e = transforms.apply_left(m_inv[:, None], proxy.ste_quant(v, spec, ste) - v)
    return _weighted_square(e, sigma)
  if sigma is not None or not isinstance(transform, transforms.BlockTransform):
    # ||M⁻¹ (Q(V) - V)||²: the residual form (no W - M⁻¹ M W cancellation).
    m, m_inv = transform.matrix_and_inverse()
    v = transforms.apply_left(m[:, None], w4)
    e = transforms.apply_left(m_inv[:, None], proxy.ste_quant(v, spec, ste) - v)
    return _weighted_square(e, sigma)
  if transform.right_scales:
    m, m_inv = transform.matrix_and_inverse()
    per = proxy.transformed_loss(w4, m[:, None], m_inv[:, None], spec, ste=ste)
    return per.sum(axis=1)
  m = transform.matrix()
  v = transforms.apply_left(m[:, None], w4)
  e = proxy.ste_quant(v, spec, ste) - v
  inv_row = jnp.exp(-transform.left_log_scales()).reshape(w4.shape[0], 1, w4.shape[-2], 1)
  return jnp.sum(jnp.square(e * inv_row), axis=(1, 2, 3))


def weighted_rtn_loss(w: jax.Array, spec: quantizer.QuantSpec, sigma: jax.Array) -> jax.Array:
  """``Σ_t tr(E_tᵀ Σ E_t)`` of plain RTN (``E = W - Q(W)``, ``sigma`` as in
  ``stack_loss``): ``(B,)``. (The Frobenius normaliser is ``proxy.rtn_loss``.)"""
  w4 = _as_stack(jnp.asarray(w, jnp.float32))
  return _weighted_square(quantizer.quant_dequant(w4, spec) - w4, sigma)


def _check_sigma(sigma: jax.Array | None, w4: jax.Array) -> jax.Array | None:
  if sigma is None:
    return None
  sigma = jnp.asarray(sigma, jnp.float32)
  d_in = w4.shape[-2]
  if (
    sigma.ndim != 4
    or sigma.shape[0] != w4.shape[0]
    or sigma.shape[-1] != sigma.shape[-2]
    or sigma.shape[-3] * sigma.shape[-1] != d_in
  ):
    raise ValueError(
      f'sigma must be (B={w4.shape[0]}, nb, k, k) diagonal blocks with nb * k = '
      f'd_in = {d_in}; got shape {tuple(sigma.shape)}.'
    )
  if not bool(jnp.all(jnp.isfinite(sigma))):
    raise ValueError('sigma (input second moments) holds NaN or inf.')
  return sigma


_stack_loss_jit = jax.jit(stack_loss, static_argnames=('spec', 'ste'))
_rtn_loss_jit = jax.jit(proxy.rtn_loss, static_argnames=('spec',))
_weighted_rtn_loss_jit = jax.jit(weighted_rtn_loss, static_argnames=('spec',))
_inverse_jit = jax.jit(lambda t: t.inverse())


def check_stack(w: jax.Array, spec: quantizer.QuantSpec, config: TransformConfig) -> jax.Array:
  """``w`` as a ``(B, T, d_in, d_out)`` stack, or the ValueError naming what ``run``
  cannot take (shape, group size, NaN / inf weights, block size)."""
  w4 = _as_stack(w)
  quantizer.validate_weight(w4, spec)
  transforms.check_block_size(w4.shape[-2], config.block_size)
  return w4


def init_state(
  w: jax.Array,
  spec: quantizer.QuantSpec,
  config: TransformConfig,
  key: jax.Array,
  *,
  unit_keys: jax.Array | None = None,
  sigma: jax.Array | None = None,
) -> TransformOptState:
  """Initial state for the stack ``w`` (``(B, d_in, d_out)`` or ``(B, T, ...)``).

  Args:
    key: PRNG key of the Hadamard init signs (of the whole stack at once) and of
      the column subsets.
    unit_keys: optional ``(B,)`` stack of keys, one per matrix: the Hadamard
      init of matrix ``b`` then depends on ``unit_keys[b]`` only, so it is the
      same whatever other matrices share the stack (layer-by-layer runs).
    sigma: optional ``(B, nb, k, k)`` input second-moment blocks: the losses (and
      the RTN normaliser) are input-weighted (see ``stack_loss``).
  """
  w4 = check_stack(w, spec, config)
  sigma = _check_sigma(sigma, w4)
  init = functools.partial(
    transforms.init_transform,
    d_in=w4.shape[-2],
    block_size=config.block_size,
    init=config.init,
    parameterization=config.parameterization,
    log_scale_bound=config.log_scale_bound,
    right_scales=config.right_scales,
  )
  if unit_keys is None:
    transform = init(key, batch_shape=(w4.shape[0],))
  else:
    if len(unit_keys) != w4.shape[0]:
      raise ValueError(
        f'unit_keys has {len(unit_keys)} keys for a stack of {w4.shape[0]} matrices.'
      )
    transform = jax.vmap(lambda k: init(k, batch_shape=()))(unit_keys)
  opt_state = make_optimizer(config).init(transform.trainable())
  init_loss = _stack_loss_jit(transform, w4, spec, sigma=sigma)
  if sigma is None:  # summed outside the jit, as first released: same bits, same codes
    rtn = _rtn_loss_jit(w4, spec).sum(axis=1)
  else:
    rtn = _weighted_rtn_loss_jit(w4, spec, sigma)
  return TransformOptState(
    transform=transform,
    opt_state=opt_state,
    best=transform.trainable(),
    best_loss=init_loss,
    init_loss=init_loss,
    rtn_loss=rtn,
    last_loss=init_loss,
    key=jax.random.fold_in(key, 1),
    step=jnp.zeros((), jnp.int32),
    **_warm_start(transform),
  )


def _warm_start(transform: transforms.LearnedTransform) -> dict[str, jax.Array]:
  """The state's warm-start inverse of a dense stack (and its fallback counts)."""
  if not isinstance(transform, transforms.DenseTransform):
    return {}
  inverse = _inverse_jit(transform)
  return dict(inverse=inverse, inverse_fallbacks=jnp.zeros(inverse.shape[:1], jnp.int32))


def _keep_best(best, best_loss, cand, cand_loss):
  better = cand_loss < best_loss

  def pick(b, c):
    mask = better.reshape(better.shape + (1,) * (b.ndim - 1))
    return jnp.where(mask, c, b)

  return jax.tree.map(pick, best, cand), jnp.where(better, cand_loss, best_loss)


@functools.lru_cache(maxsize=64)
def make_step(
  spec: quantizer.QuantSpec, config: TransformConfig
) -> Callable[[TransformOptState, jax.Array], TransformOptState]:
  """Jitted ``step(state, w, sigma=None) -> state``: one optimiser update of every
  transform (``sigma``: input-weighted loss, see ``stack_loss``).

  The loss of the iterate *before* the update is recorded and kept if best
  (only when all columns are used; see ``TransformConfig.columns_per_step``).
  """
  opt = make_optimizer(config)

  def objective(params, state, w4, sigma, inverse):
    t = state.transform.with_trainable(params)
    per = stack_loss(t, w4, spec, ste=config.ste, sigma=sigma, inverse=inverse)
    scale = jnp.maximum(state.rtn_loss, jnp.finfo(jnp.float32).tiny)
    return jnp.sum(per / scale), per

  @xla_cpu.hot_jit
  def step(
    state: TransformOptState, w: jax.Array, sigma: jax.Array | None = None
  ) -> TransformOptState:
    w4 = _as_stack(jnp.asarray(w, jnp.float32))
    params = state.transform.trainable()
    key, sub = jax.random.split(state.key)
    d_out = w4.shape[-1]
    c = config.columns_per_step
    subsample = c is not None and c < d_out
    if subsample:
      cols = jax.random.permutation(sub, d_out)[:c]
      w4 = jnp.take(w4, cols, axis=-1)
    inverse, fallbacks = state.inverse, state.inverse_fallbacks
    if inverse is not None:  # dense: the last step's inverse, refined (no elimination)
      inverse, fell_back = transforms.warm_inverse(params['blocks'], inverse)
      fallbacks = fallbacks + jnp.sum(fell_back, axis=-1, dtype=jnp.int32)
    (_, per), grads = jax.value_and_grad(objective, has_aux=True)(params, state, w4, sigma, inverse)
    if not config.learn_scales:  # rotation only (TransformConfig checks)
      grads = dict(
        grads, log_row=jnp.zeros_like(grads['log_row']), log_col=jnp.zeros_like(grads['log_col'])
      )
    if subsample:
      best, best_loss = state.best, state.best_loss
    else:
      best, best_loss = _keep_best(state.best, state.best_loss, params, per)
    updates, opt_state = opt.update(grads, state.opt_state, params)
    params = optax.apply_updates(params, updates)
    return state.replace(
      transform=state.transform.with_trainable(params),
      opt_state=opt_state,
      best=best,
      best_loss=best_loss,
      last_loss=per,
      key=key,
      step=state.step + 1,
      inverse=inverse,
      inverse_fallbacks=fallbacks,
    )

  return step


@functools.lru_cache(maxsize=64)
def make_finalize(
  spec: quantizer.QuantSpec,
) -> Callable[[TransformOptState, jax.Array], TransformOptState]:
  """Jitted ``finalize(state, w, sigma=None)``: evaluates the current iterate with
  the real ``quant_dequant`` (no STE) and keeps it if best.

  A dense iterate's ``M⁻¹`` is the steps' own: ``transforms.warm_inverse`` from
  the state's inverse of the previous iterate (Gauss-Jordan only for blocks where
  Newton-Schulz does not converge), not a fresh elimination of every block, which
  cost more than a whole step. The state's inverse is left as it was, so the
  steps (and so the iterates) are the same whether or when this runs.
  """

  @xla_cpu.hot_jit
  def finalize(
    state: TransformOptState, w: jax.Array, sigma: jax.Array | None = None
  ) -> TransformOptState:
    params = state.transform.trainable()
    inverse = None
    if state.inverse is not None:
      inverse, _ = transforms.warm_inverse(params['blocks'], state.inverse)
    per = stack_loss(state.transform, w, spec, ste=False, sigma=sigma, inverse=inverse)
    best, best_loss = _keep_best(state.best, state.best_loss, params, per)
    return state.replace(best=best, best_loss=best_loss, last_loss=per)

  return finalize


def plain_loop(
  step_fn: Callable[..., TransformOptState],
  state: TransformOptState,
  num_steps: int,
  *,
  args: tuple = (),
  callback: Callable[[int, TransformOptState], None] | None = None,
) -> TransformOptState:
  """The local loop: ``state = step_fn(state, *args)`` ``num_steps`` times.

  The reference of the ``loop`` hook of ``run``: a loop takes ``(step_fn, state,
  num_steps, *, args=(), callback=None)`` and returns the state after
  ``num_steps`` steps, calling ``callback(step, state)`` after every step
  (``step`` counts from 1). ``distributed.mesh.sharded_run`` (stack sharded over
  a mesh), ``checkpointing.resumable_run`` (Orbax, resumable) and
  ``distributed.multihost.split_loop`` (one share per process) fit it once
  their extra arguments are bound (``methods.run_options`` builds them).
  """
  for i in range(num_steps):
    state = step_fn(state, *args)
    if callback is not None:
      callback(i + 1, state)
  return state


Loop = Callable[..., TransformOptState]


@functools.lru_cache(maxsize=64)
def make_run_step(
  spec: quantizer.QuantSpec, config: TransformConfig, d_out: int
) -> Callable[[TransformOptState, jax.Array], TransformOptState]:
  """The step ``run`` hands to its loop, for matrices with ``d_out`` columns.

  With all columns it is ``make_step``. With ``columns_per_step < d_out`` the
  full-loss keep-best evaluation (``make_finalize``) due every ``eval_every``
  steps is folded into the step (``lax.cond`` on ``state.step``), so that the
  whole loop is one ``(state, w) -> state`` function that any loop (sharded,
  checkpointed, split over processes) can drive. When none is due before the
  last step (``eval_every`` None or ``>= steps``) it is ``make_step`` too: the
  same iterates, and no evaluation compiled into every step.
  """
  step = make_step(spec, config)
  every = config.eval_every
  if (
    config.columns_per_step is None
    or config.columns_per_step >= d_out
    or every is None
    or every >= config.steps
  ):
    return step
  finalize = make_finalize(spec)

  @xla_cpu.hot_jit
  def step_with_eval(
    state: TransformOptState, w: jax.Array, sigma: jax.Array | None = None
  ) -> TransformOptState:
    due = (state.step > 0) & (state.step % every == 0)
    state = jax.lax.cond(due, lambda s: finalize(s, w, sigma), lambda s: s, state)
    return step(state, w, sigma)

  return step_with_eval


def _typed_key(key: jax.Array) -> jax.Array:
  """Legacy ``uint32[2]`` key -> typed key (same stream), a scalar pytree leaf.

  A scalar key is never mistaken for a stacked leaf by the sharded / split loops
  (a ``(2,)`` key would be, for a stack of 2 matrices).
  """
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return key
  return jax.random.wrap_key_data(key)


def run(
  w: jax.Array,
  spec: quantizer.QuantSpec,
  config: TransformConfig,
  key: jax.Array,
  *,
  callback: Callable[[int, TransformOptState], None] | None = None,
  callback_every: int = 10,
  progress: bool = False,
  loop: Loop | None = None,
  unit_keys: jax.Array | None = None,
  sigma: jax.Array | None = None,
) -> tuple[transforms.LearnedTransform, TransformOptState]:
  """Optimises one transform per matrix of the stack ``w``.

  Args:
    w: ``(B, d_in, d_out)`` or ``(B, T, d_in, d_out)`` float (T matrices share
      one transform).
    spec: the quantizer.
    config: transform configuration.
    key: PRNG key (Hadamard init signs); the result is a deterministic
      function of ``(w, spec, config, key)``.
    callback: called as ``callback(step, state)`` every ``callback_every`` steps
      and after the last one (e.g. logging; forces a device sync). With a
      sharded ``loop`` the state is the loop's (sharded, possibly padded) one.
    progress: show a tqdm progress bar.
    loop: how to run the steps, a function with ``plain_loop``'s signature
      ``(step_fn, state, num_steps, *, args=(w,), callback=...) -> state``
      (default ``plain_loop``). It must return the state after ``config.steps``
      steps as ordinary arrays; sharded, checkpointed and multi-process loops
      built by ``methods.run_options.RunOptions`` do, each step equal to the
      plain loop's to float32 rounding (see ``methods.api.quantize``).
    unit_keys: optional ``(B,)`` per-matrix init keys (see ``init_state``).
    sigma: optional ``(B, nb, k, k)`` diagonal blocks of each entry's input second
      moment: minimise the input-weighted loss ``tr(Eᵀ Σ E)`` instead (a constant
      operand of every step, like ``w``).

  Returns:
    ``(best_transform, final_state)``: the per-matrix best iterate (batch
    ``(B,)``) and the final state (``state.best_loss``, ``state.init_loss``,
    ``state.rtn_loss`` hold ``(B,)`` losses).
  """
  w4 = jnp.asarray(check_stack(w, spec, config), jnp.float32)
  sigma = None if sigma is None else jnp.asarray(sigma, jnp.float32)  # checked by init_state
  state = init_state(w4, spec, config, key, unit_keys=unit_keys, sigma=sigma)
  state = state.replace(key=_typed_key(state.key))
  args = (w4,) if sigma is None else (w4, sigma)
  step = make_run_step(spec, config, w4.shape[-1])
  bar = None
  if progress:
    import tqdm  # pylint: disable=g-import-not-at-top

    bar = tqdm.tqdm(total=config.steps, desc=f'transforms {tuple(w4.shape)}', leave=False)

  def on_step(i, s):
    if bar is not None:
      bar.update(i - bar.n)
    if callback is not None and (i % callback_every == 0 or i == config.steps):
      callback(i, s)

  loop = plain_loop if loop is None else loop
  try:
    state = loop(
      step,
      state,
      config.steps,
      args=args,
      callback=on_step if (bar is not None or callback is not None) else None,
    )
  finally:
    if bar is not None:
      bar.close()
  if config.steps:
    state = make_finalize(spec)(state, *args)
  return state.best_transform(), state
