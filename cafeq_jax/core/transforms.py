"""Block-diagonal invertible transforms for online single-matrix quantization.

Conventions (docs/method.md#single-matrix-transforms). A linear layer computes
``y = x @ W`` with ``W`` of shape ``(d_in, d_out)``. An online transform rewrites it exactly as
``y = (x @ M⁻¹) @ (M @ W)``: the stored matrix is ``V = M W`` (quantized) and the
activations are multiplied by ``M⁻¹`` at inference. ``M`` is block diagonal with
``nb = d_in // k`` blocks of size ``k x k``; a *block stack* is an array
``(..., nb, k, k)`` holding the diagonal blocks (``M = blockdiag(blocks)``).

Parameterisation (our choice; invertible and well conditioned by construction).
Each block is

    M_b = diag(exp(α)) · R0 · C(A) · diag(exp(β)),
    M_b⁻¹ = diag(exp(-β)) · C(A)ᵀ · R0ᵀ · diag(exp(-α)),

with
  * ``R0`` a fixed orthogonal block: the identity, or a randomised Hadamard block
    ``H_k diag(s) / sqrt(k)`` (Sylvester ``H_k``, random signs ``s``);
  * ``C(A) = exp(A)`` the matrix exponential of the skew-symmetric
    ``A = (P - Pᵀ) / 2`` (orthogonal for every parameter ``P``; ``P = 0`` gives
    ``C = I``). It is computed with matmuls only (batched small LAPACK solves,
    e.g. a Cayley transform, are several times slower on CPU): degree-8 Taylor
    on ``A / 2^s`` with a per-block ``s`` making ``||A / 2^s||_F <= 1/2``
    (truncation error < 1e-8) and ``s`` masked squarings (at most 6;
    ``||A||_F`` is clipped at 32, far beyond the ``π`` needed for any rotation
    angle), so ``C`` is orthogonal to float32 precision;
  * ``α = c · tanh(a / c)`` and ``β = c · tanh(b / c)``, log-scales softly bounded
    by ``c = log_scale_bound``.

So ``M`` is never orthogonal-constrained, its inverse is closed form (no
generic inverse), and ``cond(M_b) <= exp(4 c)`` for every parameter value
(``c = 0.5``: ``cond <= e² ≈ 7.4``; ``exp(2c)`` without the right diagonal,
``right_scales=False``). All parameters zero is ``M = R0``.

Block size and quantization groups: the transform is exact for any ``k``
dividing ``d_in``; we recommend ``k | g`` or ``g | k`` (``g`` the group size) so
that every transform block maps whole quantization groups to whole groups, and a
kernel tiled over ``d_in`` by whole groups can apply ``x M⁻¹`` tile by tile. The
online cost is ``d_in · k`` MACs per token beside ``d_in · d_out`` for the matmul
(ratio ``k / d_out``, see ``online_overhead``).
"""

from __future__ import annotations

import enum
import functools
import math
from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


class TransformInit(enum.StrEnum):
  """Initialisation of a learned block transform."""

  IDENTITY = 'identity'  # M = I: starts at RTN
  HADAMARD = 'hadamard'  # randomised Sylvester Hadamard blocks (k a power of two)


INITS = tuple(m.value for m in TransformInit)


class Parameterization(enum.StrEnum):
  """How a learned block ``M_b`` is parameterised (all start at ``R0``)."""

  ROTATION = 'rotation'  # diag(e^α) R0 C(A) [diag(e^β)], bounded log-scales: cond <= e^4c
  DENSE = 'dense'  # a free k x k block (the paper's relaxation): M_b = B, B0 = R0
  LU = 'lu'  # M_b = L U R0, unit lower L, upper U with diagonal e^u: never singular


PARAMETERIZATIONS = tuple(m.value for m in Parameterization)


def _is_power_of_two(k: int) -> bool:
  return k >= 1 and (k & (k - 1)) == 0


def check_block_size(d_in: int, block_size: int) -> None:
  """Raises a ValueError unless ``block_size`` is a positive divisor of ``d_in``."""
  if not isinstance(block_size, (int, np.integer)) or block_size < 1:
    raise ValueError(f'block_size={block_size!r} must be a positive integer.')
  if d_in % block_size:
    raise ValueError(
      f'block_size={block_size} does not divide d_in={d_in}; a block-diagonal '
      f'transform needs d_in % block_size == 0 (divisors of {d_in} up to 256: '
      f'{[k for k in range(1, min(d_in, 256) + 1) if d_in % k == 0]}).'
    )


@functools.lru_cache(maxsize=None)
def hadamard_matrix(k: int) -> np.ndarray:
  """Sylvester Hadamard matrix ``(k, k)`` with ±1 entries (``H Hᵀ = k I``).

  Raises:
    ValueError: ``k`` is not a power of two.
  """
  if not _is_power_of_two(k):
    raise ValueError(f'Sylvester Hadamard matrices exist for powers of two; got k={k}.')
  h = np.ones((1, 1), np.float32)
  while h.shape[0] < k:
    h = np.block([[h, h], [h, -h]])
  return h


def random_hadamard_blocks(
  key: jax.Array, nb: int, k: int, batch_shape: tuple[int, ...] = ()
) -> jax.Array:
  """Randomised orthogonal Hadamard blocks ``H diag(s) / sqrt(k)``.

  Returns:
    ``(*batch_shape, nb, k, k)`` float32, each block orthogonal; independent
    random signs ``s`` per block.
  """
  h = jnp.asarray(hadamard_matrix(k)) / np.sqrt(k)
  signs = jax.random.rademacher(key, (*batch_shape, nb, k), dtype=jnp.float32)
  return h * signs[..., None, :]


def identity_blocks(nb: int, k: int, batch_shape: tuple[int, ...] = ()) -> jax.Array:
  """``(*batch_shape, nb, k, k)`` float32 identity blocks."""
  return jnp.broadcast_to(jnp.eye(k, dtype=jnp.float32), (*batch_shape, nb, k, k))


_MAX_SQUARINGS = 6
_TAYLOR_DEGREE = 8


def expm_skew(a: jax.Array) -> jax.Array:
  """``exp(A)`` for skew-symmetric ``a`` ``(..., k, k)``: orthogonal, matmuls only.

  Scaling and squaring with a per-matrix number of squarings ``s`` (masked, at
  most ``_MAX_SQUARINGS``) so that ``||A / 2^s||_F <= 1/2``, then a degree-8
  Taylor polynomial (Horner form). ``||A||_F`` is clipped at
  ``2^_MAX_SQUARINGS / 2 = 32`` to keep the bound.
  """
  k = a.shape[-1]
  eye = jnp.eye(k, dtype=a.dtype)
  limit = 0.5 * 2.0**_MAX_SQUARINGS
  # + tiny keeps the gradient finite at A = 0 (the identity init).
  norm = jnp.sqrt(jnp.sum(a * a, axis=(-2, -1), keepdims=True) + 1e-30)
  a = a * jnp.minimum(1.0, limit / jnp.maximum(norm, 1e-30))
  norm = jax.lax.stop_gradient(jnp.minimum(norm, limit))
  s = jnp.clip(jnp.ceil(jnp.log2(jnp.maximum(norm, 1e-30) / 0.5)), 0, _MAX_SQUARINGS)
  x = a * jnp.exp2(-s)
  out = eye + x / _TAYLOR_DEGREE
  for i in range(_TAYLOR_DEGREE - 1, 0, -1):
    out = eye + jnp.matmul(x, out) / i
  for i in range(_MAX_SQUARINGS):
    out = jnp.where(i < s, jnp.matmul(out, out), out)
  return out


class _LearnedBlocks:
  """What the learned transforms share: block shape and the trainable parameters.

  A subclass names its trainable fields (``_TRAINABLE``) and one field of shape
  ``(..., nb, k, k)`` (``_BLOCKS``).
  """

  _TRAINABLE: ClassVar[tuple[str, ...]]
  _BLOCKS: ClassVar[str]

  @property
  def block_size(self) -> int:
    return getattr(self, self._BLOCKS).shape[-1]

  @property
  def num_blocks(self) -> int:
    return getattr(self, self._BLOCKS).shape[-3]

  def trainable(self) -> dict[str, jax.Array]:
    return {n: getattr(self, n) for n in self._TRAINABLE}

  def with_trainable(self, p: dict[str, jax.Array]):
    return self.replace(**{n: p[n] for n in self._TRAINABLE})


@flax.struct.dataclass
class BlockTransform(_LearnedBlocks):
  """Learnable block-diagonal transform (see module docstring).

  Attributes:
    skew: ``(..., nb, k, k)`` float32, raw rotation parameter ``P``.
    log_row: ``(..., nb, k)`` float32, raw left log-scales ``a``.
    log_col: ``(..., nb, k)`` float32, raw right log-scales ``b``.
    base: ``(..., nb, k, k)`` float32 fixed orthogonal ``R0`` (not trained).
    log_scale_bound: static bound ``c`` on the log-scales.
    right_scales: static; when False the right diagonal is fixed to ``I``
      (``log_col`` ignored): ``M = diag(e^α) R`` and ``||M⁻¹ E||² = ||diag(e^-α)
      E||²`` needs no second matmul (see ``core.optimize.stack_loss``).
  """

  skew: jax.Array
  log_row: jax.Array
  log_col: jax.Array
  base: jax.Array
  log_scale_bound: float = flax.struct.field(pytree_node=False, default=0.5)
  right_scales: bool = flax.struct.field(pytree_node=False, default=True)
  _TRAINABLE: ClassVar[tuple[str, ...]] = ('skew', 'log_row', 'log_col')
  _BLOCKS: ClassVar[str] = 'skew'

  def _parts(self):
    c = self.log_scale_bound
    alpha = c * jnp.tanh(self.log_row / c)
    beta = c * jnp.tanh(self.log_col / c) if self.right_scales else jnp.zeros_like(alpha)
    a = 0.5 * (self.skew - jnp.swapaxes(self.skew, -1, -2))
    rot = self.base @ expm_skew(a)
    return alpha, rot, beta

  def matrix(self) -> jax.Array:
    """Blocks of ``M``: ``(..., nb, k, k)`` float32."""
    alpha, rot, beta = self._parts()
    return jnp.exp(alpha)[..., :, None] * rot * jnp.exp(beta)[..., None, :]

  def inverse(self) -> jax.Array:
    """Blocks of ``M⁻¹`` in closed form: ``(..., nb, k, k)`` float32."""
    alpha, rot, beta = self._parts()
    return jnp.exp(-beta)[..., :, None] * jnp.swapaxes(rot, -1, -2) * jnp.exp(-alpha)[..., None, :]

  def matrix_and_inverse(self) -> tuple[jax.Array, jax.Array]:
    alpha, rot, beta = self._parts()
    m = jnp.exp(alpha)[..., :, None] * rot * jnp.exp(beta)[..., None, :]
    minv = jnp.exp(-beta)[..., :, None] * jnp.swapaxes(rot, -1, -2) * jnp.exp(-alpha)[..., None, :]
    return m, minv

  def rotation(self) -> jax.Array:
    """The orthogonal factor ``R0 C(A)``: ``(..., nb, k, k)``."""
    return self._parts()[1]

  def left_log_scales(self) -> jax.Array:
    """``α``: ``(..., nb, k)``, so that ``M = diag(e^α) R diag(e^β)``."""
    return self._parts()[0]

  def condition_bound(self) -> float:
    """Upper bound on ``cond(M_b)`` valid for every parameter value."""
    return float(np.exp((4.0 if self.right_scales else 2.0) * self.log_scale_bound))


# Matrices eliminated together by gauss_jordan_inverse: a chunk's (64, k, 2k) float32
# working array (2 MB at k = 64) stays in cache over the k elimination steps, where
# the whole stack would be streamed from memory k times (about 2x faster on CPU for
# SmolLM2's 540-block stacks; the arithmetic, hence every bit, is unchanged).
_GJ_CHUNK = 64


def gauss_jordan_inverse(m: jax.Array) -> jax.Array:
  """Inverse of ``m`` ``(..., n, n)`` by Gauss-Jordan elimination with partial pivoting.

  Plain XLA ops on purpose: ``jnp.linalg.inv`` (and ``solve_triangular``) lower to
  jaxlib's LAPACK custom calls, which split a batch over the CPU intra-op thread
  pool and wait for it; inside a jitted optimisation two such calls can run
  concurrently and, with as many pool threads as calls (2-core machines), each
  waits on work the other's thread should run: a deadlock (seen with jaxlib 0.10
  on 30-matrix stacks). Stacks of more than ``_GJ_CHUNK`` matrices are eliminated
  in chunks of that many (``lax.map``), each chunk's elimination in cache.
  """
  *lead, n, _ = m.shape
  count = math.prod(lead)
  if count > _GJ_CHUNK:
    flat = m.reshape(count, n, n)
    return jax.lax.map(_gauss_jordan, flat, batch_size=_GJ_CHUNK).reshape(m.shape)
  return _gauss_jordan(m)


def _gauss_jordan(m: jax.Array) -> jax.Array:
  """``gauss_jordan_inverse`` of a whole stack at once."""
  n = m.shape[-1]
  a = jnp.concatenate([m, jnp.broadcast_to(jnp.eye(n, dtype=m.dtype), m.shape)], axis=-1)
  idx = jnp.arange(n)

  def body(j, a):
    col = jnp.where(idx >= j, jnp.abs(a[..., :, j]), -1.0)
    p = jnp.argmax(col, axis=-1)[..., None]  # (..., 1) pivot row
    perm = jnp.where(idx == j, p, jnp.where(idx == p, j, idx))
    a = jnp.take_along_axis(a, perm[..., None], axis=-2)
    piv = a[..., j, :] / a[..., j, j][..., None]  # (..., 2n)
    a = a - a[..., :, j][..., None] * piv[..., None, :]
    return a.at[..., j, :].set(piv)

  return jax.lax.fori_loop(0, n, body, a)[..., n:]


@jax.custom_vjp
def inverse_blocks(m: jax.Array) -> jax.Array:
  """``M_b⁻¹`` of every block ``(..., k, k)`` (``gauss_jordan_inverse``), with the
  closed-form gradient ``d(M⁻¹) = -M⁻¹ dM M⁻¹`` (matmuls, not the elimination's tape)."""
  return gauss_jordan_inverse(m)


def _inverse_fwd(m):
  x = gauss_jordan_inverse(m)
  return x, x


def _inverse_bwd(x, g):
  xt = jnp.swapaxes(x, -1, -2)
  return (-(xt @ g @ xt),)


inverse_blocks.defvjp(_inverse_fwd, _inverse_bwd)


# Newton-Schulz refinement of a warm-start inverse (``warm_inverse``): the fixed
# number of iterations and the residual ``max |I - M X|`` a block must reach, else
# it takes the Gauss-Jordan inverse. An optimiser step moves each entry of a block by
# at most about the learning rate (Adam); from the previous step's inverse, three
# iterations reach Gauss-Jordan's own residual (~1e-6 at k = 64) after a first
# Adam step of 2e-2 on every entry.
NS_ITERATIONS = 3
NS_TOLERANCE = 1e-5


def warm_inverse(
  m: jax.Array, guess: jax.Array, *, iterations: int = NS_ITERATIONS, tol: float = NS_TOLERANCE
) -> tuple[jax.Array, jax.Array]:
  """``M_b⁻¹`` of every block from a nearby inverse ``guess`` (e.g. the previous step's).

  ``iterations`` Newton-Schulz steps ``X <- X + X (I - M X)`` (matmuls, quadratic
  convergence while ``||I - M X|| < 1``), then every block whose residual ``max
  |I - M X|`` exceeds ``tol`` (or is not finite) takes its Gauss-Jordan inverse
  instead (``gauss_jordan_inverse``'s bits), eliminated only for those blocks, a
  few at a time (``_ELIMINATION_BLOCKS``). Each block's result depends on its own ``m`` and
  ``guess`` only, never on the other blocks of the stack.

  Args:
    m: ``(..., k, k)`` blocks.
    guess: ``(..., k, k)`` approximate inverses.

  Returns:
    ``(inverse (..., k, k), fell_back (...))``: bool, the blocks that took
    Gauss-Jordan.
  """
  eye = jnp.eye(m.shape[-1], dtype=m.dtype)
  x = guess
  for _ in range(iterations):
    x = x + jnp.matmul(x, eye - jnp.matmul(m, x))
  resid = jnp.max(jnp.abs(eye - jnp.matmul(m, x)), axis=(-2, -1))
  ok = resid <= tol  # False for NaN
  return _eliminate(m, x, ~ok), ~ok


# ``warm_inverse`` eliminates the blocks Newton-Schulz left unconverged, gathered out
# of the stack, this many at a time (or a sixteenth of the stack, if more: a stack
# learned whole, as on an accelerator, never takes more than 16 rounds). The
# elimination's cost grows with the blocks it takes, and a step of cafeq's transform
# that leaves any unconverged (about 1 in 15) leaves a few of its chunk's 18 or 48.
# (One elimination sized to them by a ``lax.switch`` over 1, 2, 4, ... 64 blocks
# compiled every size into each step and ran slower.)
_ELIMINATION_BLOCKS = 4


def _eliminate(m: jax.Array, x: jax.Array, redo: jax.Array) -> jax.Array:
  """``x`` ``(..., k, k)`` with the blocks where ``redo`` ``(...)`` holds replaced by
  their Gauss-Jordan inverse of ``m``, eliminated a few at a time
  (``_ELIMINATION_BLOCKS``), none when no block needs it. Elimination is block by
  block, so each block gets the bits ``gauss_jordan_inverse`` gives it in any stack."""
  *lead, n, _ = m.shape
  count = math.prod(lead)
  mf, xf = m.reshape(count, n, n), x.reshape(count, n, n)
  size = min(count, max(_ELIMINATION_BLOCKS, -(-count // 16)))

  def body(carry):
    xf, todo = carry
    idx = jnp.argsort(~todo, stable=True)[:size]  # blocks still to do come first
    take = todo[idx][:, None, None]
    xf = xf.at[idx].set(jnp.where(take, _gauss_jordan(mf[idx]), xf[idx]))
    return xf, todo.at[idx].set(False)

  xf, _ = jax.lax.while_loop(lambda c: jnp.any(c[1]), body, (xf, redo.reshape(count)))
  return xf.reshape(x.shape)


@jax.custom_vjp
def inverse_given(m: jax.Array, inverse: jax.Array) -> jax.Array:
  """``inverse`` (precomputed ``M⁻¹`` blocks of ``m``) with the gradient of ``M⁻¹``
  with respect to ``m``, ``d(M⁻¹) = -M⁻¹ dM M⁻¹`` (none to ``inverse``)."""
  del m
  return inverse


def _inverse_given_fwd(m, inverse):
  return inverse, inverse


def _inverse_given_bwd(x, g):
  return _inverse_bwd(x, g)[0], jnp.zeros_like(x)


inverse_given.defvjp(_inverse_given_fwd, _inverse_given_bwd)


def condition_numbers(blocks: jax.Array) -> jax.Array:
  """2-norm condition number of every block ``(..., nb, k, k)`` -> ``(..., nb)``."""
  sv = jnp.linalg.svd(jnp.asarray(blocks, jnp.float32), compute_uv=False)
  return sv[..., 0] / jnp.maximum(sv[..., -1], jnp.finfo(jnp.float32).tiny)


@flax.struct.dataclass
class DenseTransform(_LearnedBlocks):
  """Free block-diagonal transform: ``M_b = B_b``, trained from ``B = R0``.

  The paper's relaxation (no orthogonality, no scale bound): the largest set of
  transforms, so the lowest reachable proxy. ``M⁻¹`` is a generic (batched LU)
  inverse; nothing bounds the conditioning, so ``methods`` measure it
  (``condition_numbers``) and the optimiser's keep-best only accepts iterates
  within ``TransformConfig.max_condition``.

  Attributes:
    blocks: ``(..., nb, k, k)`` float32, the blocks of ``M``.
  """

  blocks: jax.Array
  _TRAINABLE: ClassVar[tuple[str, ...]] = ('blocks',)
  _BLOCKS: ClassVar[str] = 'blocks'

  def matrix(self) -> jax.Array:
    return self.blocks

  def inverse(self) -> jax.Array:
    return inverse_blocks(self.blocks)

  def matrix_and_inverse(self) -> tuple[jax.Array, jax.Array]:
    return self.blocks, inverse_blocks(self.blocks)


@flax.struct.dataclass
class LUTransform(_LearnedBlocks):
  """``M_b = L U R0``: ``L`` unit lower triangular, ``U`` upper triangular with
  diagonal ``e^u`` (``det M_b = e^{Σu} ≠ 0``: invertible for every parameter).

  As expressive as a dense block near ``R0`` (any matrix with nonzero leading
  minors and positive pivots, times ``R0``), but never singular. Its inverse is
  ``R0ᵀ (L U)⁻¹`` (``inverse_blocks``: LAPACK's batched triangular solves deadlock
  on 2-core CPUs, see ``gauss_jordan_inverse``). All parameters zero is ``M = R0``.

  Attributes:
    lower: ``(..., nb, k, k)`` float32, strictly lower part of ``L`` (upper part ignored).
    upper: ``(..., nb, k, k)`` float32, strictly upper part of ``U`` (lower part ignored).
    log_diag: ``(..., nb, k)`` float32, ``u``.
    base: ``(..., nb, k, k)`` fixed orthogonal ``R0`` (not trained).
  """

  lower: jax.Array
  upper: jax.Array
  log_diag: jax.Array
  base: jax.Array
  _TRAINABLE: ClassVar[tuple[str, ...]] = ('lower', 'upper', 'log_diag')
  _BLOCKS: ClassVar[str] = 'base'

  def _factors(self):
    k = self.block_size
    eye = jnp.eye(k, dtype=jnp.float32)
    low = jnp.tril(self.lower, -1) + eye
    up = jnp.triu(self.upper, 1) + jnp.exp(self.log_diag)[..., :, None] * eye
    return low, up

  def matrix(self) -> jax.Array:
    low, up = self._factors()
    return low @ up @ self.base

  def inverse(self) -> jax.Array:
    low, up = self._factors()
    return jnp.swapaxes(self.base, -1, -2) @ inverse_blocks(low @ up)

  def matrix_and_inverse(self) -> tuple[jax.Array, jax.Array]:
    low, up = self._factors()
    lu = low @ up
    return lu @ self.base, jnp.swapaxes(self.base, -1, -2) @ inverse_blocks(lu)


LearnedTransform = BlockTransform | DenseTransform | LUTransform


def init_transform(
  key: jax.Array,
  d_in: int,
  block_size: int,
  *,
  init: str = 'identity',
  batch_shape: tuple[int, ...] = (),
  log_scale_bound: float = 0.5,
  right_scales: bool = True,
  parameterization: str = 'rotation',
) -> LearnedTransform:
  """A learnable transform equal to ``R0`` (identity or randomised Hadamard).

  Args:
    key: PRNG key (used for the Hadamard signs).
    d_in: rows of the matrices the transform acts on.
    block_size: ``k``, must divide ``d_in`` (power of two for Hadamard).
    init: ``'identity'`` or ``'hadamard'``.
    batch_shape: leading dims (one independent transform per entry).
    log_scale_bound: ``c`` (> 0), bound on each log-scale (rotation only).
    right_scales: learnable right diagonal ``diag(e^β)`` (rotation only; see
      ``BlockTransform``).
    parameterization: ``'rotation'`` (``BlockTransform``), ``'dense'``
      (``DenseTransform``) or ``'lu'`` (``LUTransform``).
  """
  check_block_size(d_in, block_size)
  if init not in INITS:
    raise ValueError(f'init={init!r} is not supported; expected one of {INITS}.')
  if parameterization not in PARAMETERIZATIONS:
    raise ValueError(
      f'parameterization={parameterization!r} is not supported; expected one of '
      f'{PARAMETERIZATIONS}.'
    )
  if not log_scale_bound > 0:
    raise ValueError(f'log_scale_bound={log_scale_bound!r} must be > 0.')
  nb, k = d_in // block_size, block_size
  if init == 'hadamard':
    base = random_hadamard_blocks(key, nb, k, batch_shape)
  else:
    base = identity_blocks(nb, k, batch_shape)
  base = jnp.asarray(base, jnp.float32)
  zeros_sq = jnp.zeros((*batch_shape, nb, k, k), jnp.float32)
  zeros_v = jnp.zeros((*batch_shape, nb, k), jnp.float32)
  if parameterization == 'dense':
    return DenseTransform(blocks=base)
  if parameterization == 'lu':
    return LUTransform(lower=zeros_sq, upper=zeros_sq, log_diag=zeros_v, base=base)
  return BlockTransform(
    skew=zeros_sq,
    log_row=zeros_v,
    log_col=zeros_v,
    base=base,
    log_scale_bound=float(log_scale_bound),
    right_scales=bool(right_scales),
  )


def apply_left(blocks: jax.Array, w: jax.Array) -> jax.Array:
  """``blockdiag(blocks) @ w``.

  Args:
    blocks: ``(..., nb, k, k)``.
    w: ``(..., d_in, d_out)`` with ``d_in = nb * k``; leading dims broadcast
      against those of ``blocks``.

  Returns:
    ``(..., d_in, d_out)``.
  """
  nb, k = blocks.shape[-3], blocks.shape[-1]
  *lead, d_in, d_out = w.shape
  if d_in != nb * k:
    raise ValueError(
      f'transform with {nb} blocks of size {k} (d_in={nb * k}) cannot act on a '
      f'matrix with d_in={d_in} (shape {tuple(w.shape)}).'
    )
  wb = w.reshape(*lead, nb, k, d_out)
  out = jnp.matmul(blocks, wb)
  return out.reshape(*out.shape[:-3], d_in, d_out)


def apply_to_activations(x: jax.Array, inv_blocks: jax.Array) -> jax.Array:
  """Online transform ``x @ blockdiag(inv_blocks)``.

  Args:
    x: ``(..., d_in)`` activations.
    inv_blocks: ``(nb, k, k)`` blocks of ``M⁻¹``.

  Returns:
    ``(..., d_in)`` in ``x``'s dtype.
  """
  nb, k = inv_blocks.shape[-3], inv_blocks.shape[-1]
  if x.shape[-1] != nb * k:
    raise ValueError(
      f'activations with last dim {x.shape[-1]} do not match a transform of '
      f'{nb} blocks of size {k}.'
    )
  xb = x.reshape(*x.shape[:-1], nb, k)
  out = jnp.einsum('...bi,bij->...bj', xb, inv_blocks.astype(x.dtype))
  return out.reshape(x.shape)


def block_diag(blocks: jax.Array) -> jax.Array:
  """Dense ``(..., d_in, d_in)`` matrix from ``(..., nb, k, k)`` blocks."""
  nb, k = blocks.shape[-3], blocks.shape[-1]
  eye = jnp.eye(nb, dtype=blocks.dtype)
  dense = jnp.einsum('...bij,bc->...bicj', blocks, eye)
  return dense.reshape(*blocks.shape[:-3], nb * k, nb * k)


def online_overhead(d_in: int, d_out: int, block_size: int) -> float:
  """MACs of ``x M⁻¹`` over MACs of ``x W``: ``(d_in k) / (d_in d_out) = k / d_out``."""
  return block_size / d_out
