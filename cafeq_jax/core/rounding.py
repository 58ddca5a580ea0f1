"""Error-feedback (GPTQ-form) rounding and adaptive rounding of matrix pairs.

Pure math on arrays (docs/method.md#adaptive-rounding); nothing here knows about models.

Terminology. ``W`` is ``(d_in, d_out)`` (Flax kernel layout, ``y = x @ W``) and its
quantization groups are ``g`` consecutive rows of one column (``quantizer``).

* ``gptq_round(w, h, spec)`` minimises the *input-side* quadratic
  ``tr((W - Ŵ)ᵀ H (W - Ŵ))`` (``H = XᵀX``, i.e. ``||X (W - Ŵ)||²``), sweeping over the
  rows of ``W`` (along ``d_in``) with the standard GPTQ update: quantize row ``i``,
  spread its error over the later rows through the upper Cholesky factor ``U`` of
  ``H⁻¹`` (``H⁻¹ = UᵀU``). Group scales are computed when the sweep reaches a
  group's first row, from the error-updated weights (as GPTQ with groups does);
  per-channel scales are computed once from the input weights.
* ``gptq_round_output(w, h, spec)`` minimises the *output-side* quadratic
  ``tr((W - Ŵ) H (W - Ŵ)ᵀ)`` (``H = AAᵀ``, i.e. ``||(W - Ŵ) A||²``), which is GPTQ on
  ``Wᵀ``: the sweep runs over the columns of ``W``, each column is quantized as a
  whole with its own group scales, and its error is spread over the later columns.
  This is the rounding of the *left* factor of a product ``W A``.
* ``adaptive_round_pair`` alternates these for a product ``W1 W2``
  (docs/method.md#pair-adaptive-rounding).

Blocking. The sweep processes ``block`` rows at a time: rank-1 updates stay inside
the block and the rest of the matrix is updated by one matmul per block (GPTQ's
"lazy batch" trick). Rows are padded with zeros (and ``H⁻¹`` with identity) up to a
multiple of the block; padding sits at the end of the sweep so it never feeds
error back into real rows.
"""

from __future__ import annotations

import functools
from typing import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from cafeq_jax import quantizer as qz
from cafeq_jax.core import transforms
from cafeq_jax.ggml import types as ggml_types

_HI = jax.lax.Precision.HIGHEST


def _scale_zero(x: jax.Array, spec: qz.QuantSpec):
  """Scales/zeros of the groups of ``x`` (d, n): each (d // g, n) float32."""
  s, z = qz.compute_scale_zero(x, spec)
  return s, jnp.zeros_like(s) if z is None else z


def _round_row(row, s, z, spec: qz.QuantSpec):
  q = qz.round_codes(row, s, z, spec)
  return q, qz.dequant_codes(q, s, z, spec)


def _scale_run(spec: qz.QuantSpec) -> int:
  """Rows whose group scales are set together when the sweep reaches the first:
  one group, or a GGML K-type's super-block (its f16 scale spans 256 rows)."""
  if spec.ggml_type is not None:
    return ggml_types.INFO[spec.ggml_type].block_size
  return spec.group_size


def hinv_cholesky(h: jax.Array, damp: float = 0.01) -> tuple[jax.Array, jax.Array]:
  """Upper Cholesky factor of the damped inverse Hessian, as in GPTQ.

  Args:
    h: ``(d, d)`` symmetric PSD float.
    damp: added to the diagonal as ``damp * mean(diag(H))`` (relative damping).

  Returns:
    ``(u, dead)``: ``u`` ``(d, d)`` float32 upper triangular with ``H⁻¹ = uᵀu``;
    ``dead`` ``(d,)`` bool, rows with ``H_ii == 0`` (their weights carry no signal;
    GPTQ zeroes them and sets ``H_ii = 1``).
  """
  h = jnp.asarray(h, jnp.float32)
  h = 0.5 * (h + h.T)
  d = h.shape[-1]
  diag = jnp.diagonal(h)
  dead = diag <= 0
  h = h + jnp.diag(jnp.where(dead, 1.0 - diag, 0.0))
  h = h + damp * jnp.mean(jnp.diagonal(h)) * jnp.eye(d, dtype=h.dtype)
  l = jnp.linalg.cholesky(h)
  eye = jnp.eye(d, dtype=h.dtype)
  linv = jax.scipy.linalg.solve_triangular(l, eye, lower=True)
  hinv = jnp.matmul(linv.T, linv, precision=_HI)
  u = jnp.linalg.cholesky(0.5 * (hinv + hinv.T)).T
  return u, dead


def _sweep(
  w: jax.Array, u: jax.Array, *, block: int, sub: int, start_group: Callable, quant_row: Callable
):
  """Blocked GPTQ sweep over the rows of ``w`` (d, n); ``d % block == block % sub == 0``.

  ``start_group(rows (sub, n), first) -> (s, z)`` is called at the first row
  (index ``first``) of every run of ``sub`` rows on the error-updated rows;
  ``quant_row(row (n,), s, z, r) -> (q, dq)`` rounds row ``r`` of the run. Returns codes ``(d, n)`` float32 and the stacked ``s``, ``z``
  ``(d // sub, ...)``.
  """
  d, n = w.shape
  n_blocks, n_sub = d // block, block // sub
  s0, z0 = jax.eval_shape(
    start_group, jax.ShapeDtypeStruct((sub, n), jnp.float32), jax.ShapeDtypeStruct((), jnp.int32)
  )
  codes = jnp.zeros((d, n), jnp.float32)
  s_buf = jnp.zeros((d // sub,) + s0.shape, jnp.float32)
  z_buf = jnp.zeros((d // sub,) + z0.shape, jnp.float32)
  cols = jnp.arange(d)

  def block_body(bi, carry):
    w, codes, s_buf, z_buf = carry
    i1 = bi * block
    wb = jax.lax.dynamic_slice_in_dim(w, i1, block, 0)
    ub = jax.lax.dynamic_slice(u, (i1, i1), (block, block))

    def sub_body(si, c):
      wb, errb, qb, s_blk, z_blk = c
      s, z = start_group(jax.lax.dynamic_slice_in_dim(wb, si * sub, sub, 0), i1 + si * sub)

      def row_body(r, c2):
        wb, errb, qb = c2
        j = si * sub + r
        row = wb[j]
        q, dq = quant_row(row, s, z, r)
        e = (row - dq) / ub[j, j]
        wb = wb - ub[j][:, None] * e[None, :]  # ub[j, :j] == 0: only rows >= j move
        return wb, errb.at[j].set(e), qb.at[j].set(q)

      wb, errb, qb = jax.lax.fori_loop(0, sub, row_body, (wb, errb, qb))
      return wb, errb, qb, s_blk.at[si].set(s), z_blk.at[si].set(z)

    init = (
      wb,
      jnp.zeros_like(wb),
      jnp.zeros_like(wb),
      jnp.zeros((n_sub,) + s0.shape, jnp.float32),
      jnp.zeros((n_sub,) + z0.shape, jnp.float32),
    )
    _, errb, qb, s_blk, z_blk = jax.lax.fori_loop(0, n_sub, sub_body, init)
    urows = jax.lax.dynamic_slice_in_dim(u, i1, block, 0)  # (block, d)
    urows = jnp.where(cols[None, :] >= i1 + block, urows, 0.0)
    w = w - jnp.matmul(urows.T, errb, precision=_HI)
    codes = jax.lax.dynamic_update_slice_in_dim(codes, qb, i1, 0)
    s_buf = jax.lax.dynamic_update_slice_in_dim(s_buf, s_blk, bi * n_sub, 0)
    z_buf = jax.lax.dynamic_update_slice_in_dim(z_buf, z_blk, bi * n_sub, 0)
    return w, codes, s_buf, z_buf

  _, codes, s_buf, z_buf = jax.lax.fori_loop(0, n_blocks, block_body, (w, codes, s_buf, z_buf))
  return codes, s_buf, z_buf


def _pad_to(w, u, block):
  d = w.shape[0]
  pad = -d % block
  if pad:
    w = jnp.pad(w, ((0, pad), (0, 0)))
    u = jax.scipy.linalg.block_diag(u, jnp.eye(pad, dtype=u.dtype))
  return w, u


def _block_size(d: int, block: int, sub: int) -> int:
  if d <= block:
    return -(-d // sub) * sub
  return max(sub, (block // sub) * sub)


def _check_h(h, d: int, name: str):
  if h.shape[-2:] != (d, d):
    raise ValueError(f'{name} has shape {tuple(h.shape)}; expected (..., {d}, {d}).')


def _batched(fn, w, h):
  lead = w.shape[:-2]
  if lead != h.shape[:-2]:
    raise ValueError(f'leading dims of w {tuple(w.shape)} and h {tuple(h.shape)} differ.')
  for _ in lead:
    fn = jax.vmap(fn)
  return fn(w, h)


@functools.partial(jax.jit, static_argnames=('spec', 'damp', 'block', 'act_order'))
def _gptq_round_jit(w, h, spec, damp, block, act_order):
  def one(w, h):
    d_in, d_out = w.shape
    w = w.astype(jnp.float32)
    if act_order:
      # Static groups: scales from the input weights in natural row order, so
      # the stored groups stay ``g`` consecutive rows whatever the sweep order.
      s_st, z_st = qz.compute_scale_zero(w, spec)
      z_st = jnp.zeros_like(s_st) if z_st is None else z_st
      g = d_in if spec.group_size is None else spec.group_size
      rows_s = jnp.repeat(s_st, g, axis=0, total_repeat_length=d_in)
      rows_z = jnp.repeat(z_st, g, axis=0, total_repeat_length=d_in)
      # Largest H_ii first: rows carrying most signal are rounded before the
      # error of the others is fed back into them (GPTQ's "act order").
      perm = jnp.argsort(-jnp.diagonal(h), stable=True)
      w, h = w[perm], h[perm][:, perm]
      rows_s, rows_z = rows_s[perm], rows_z[perm]
    u, dead = hinv_cholesky(h, damp)
    w = jnp.where(dead[:, None], 0.0, w)
    g = spec.group_size
    quant_row = lambda row, s, z, r: _round_row(row, s, z, spec)
    if act_order:
      sub = 1
      bs = _block_size(d_in, block, 1)
      start = lambda rows, i: (rows_s[jnp.minimum(i, d_in - 1)], rows_z[jnp.minimum(i, d_in - 1)])
    elif g is None:
      s_pc, z_pc = _scale_zero(w, spec)
      sub = _block_size(d_in, block, 1)
      bs = sub
      start = lambda rows, i: (s_pc[0], z_pc[0])
    else:
      sub = _scale_run(spec)
      bs = _block_size(d_in, block, sub)
      start = lambda rows, i: _scale_zero(rows, spec)  # (sub // g, n)
      quant_row = lambda row, s, z, r: _round_row(row, s[r // g], z[r // g], spec)
    wp, up = _pad_to(w, u, bs)
    codes, s_buf, z_buf = _sweep(wp, up, block=bs, sub=sub, start_group=start, quant_row=quant_row)
    codes = codes[:d_in]
    if act_order:
      codes = codes[jnp.argsort(perm)]
      scale, zero = s_st, z_st
    elif g is None:
      scale, zero = s_buf[:1], z_buf[:1]
    else:
      n_groups = d_in // g
      scale = s_buf.reshape(-1, d_out)[:n_groups]
      zero = z_buf.reshape(-1, d_out)[:n_groups]
    return codes, scale, zero

  codes, scale, zero = _batched(one, w, h)
  return qz.QArray(
    codes=codes.astype(qz.code_dtype(spec)),
    scale=scale,
    zero=None if spec.symmetric else zero,
    spec=spec,
  )


def gptq_round(
  w: jax.Array,
  h: jax.Array,
  spec: qz.QuantSpec,
  *,
  damp: float = 0.01,
  block: int = 128,
  act_order: bool = False,
) -> qz.QArray:
  """GPTQ rounding of ``w`` along ``d_in`` for the input-side Hessian ``h``.

  Minimises (greedily, with optimal error feedback) ``tr((W-Ŵ)ᵀ H (W-Ŵ))``. With
  ``H = I`` (any multiple) the feedback vanishes and the result equals RTN exactly.

  Args:
    w: ``(..., d_in, d_out)`` float weights; leading dims are batched.
    h: ``(..., d_in, d_in)`` symmetric PSD float, e.g. ``XᵀX``.
    spec: the quantizer.
    damp: relative diagonal damping ``damp * mean(diag(H))``.
    block: rows per lazy-update block (rounded to a multiple of the group size).
    act_order: sweep the rows in order of decreasing ``H_ii`` (GPTQ's act order)
      with static group scales computed from ``w`` before the sweep (so groups
      stay ``g`` consecutive rows); off: natural order, scales from the
      error-updated rows at each group's first row.

  Returns:
    A ``QArray`` with codes ``(..., d_in, d_out)``.
  """
  qz.validate_weight(w, spec)
  _check_h(h, w.shape[-2], 'h')
  spec = spec.for_rows(w.shape[-2])  # the group size actually used (group_fallback)
  return _gptq_round_jit(
    jnp.asarray(w, jnp.float32),
    jnp.asarray(h, jnp.float32),
    spec,
    float(damp),
    int(block),
    bool(act_order),
  )


@functools.partial(jax.jit, static_argnames=('spec', 'damp', 'block'))
def _gptq_round_output_jit(w, h, spec, damp, block):
  def one(w, h):
    d_in, d_out = w.shape
    g = spec.effective_group_size(d_in)
    u, dead = hinv_cholesky(h, damp)
    v = jnp.where(dead[:, None], 0.0, w.T.astype(jnp.float32))  # (d_out, d_in)

    def start(rows, first):  # rows (1, d_in): one column of W, its own groups
      del first
      s, z = qz.compute_scale_zero(rows[0][:, None], spec)  # (G, 1)
      z = jnp.zeros_like(s) if z is None else z
      return s[:, 0], z[:, 0]

    def quant_row(row, s, z, r):
      del r
      q, dq = _round_row(row.reshape(-1, g), s[:, None], z[:, None], spec)
      return q.reshape(-1), dq.reshape(-1)

    bs = _block_size(d_out, block, 1)
    vp, up = _pad_to(v, u, bs)
    codes, s_buf, z_buf = _sweep(vp, up, block=bs, sub=1, start_group=start, quant_row=quant_row)
    return codes[:d_out].T, s_buf[:d_out].T, z_buf[:d_out].T

  codes, scale, zero = _batched(one, w, h)
  return qz.QArray(
    codes=codes.astype(qz.code_dtype(spec)),
    scale=scale,
    zero=None if spec.symmetric else zero,
    spec=spec,
  )


def gptq_round_output(
  w: jax.Array, h: jax.Array, spec: qz.QuantSpec, *, damp: float = 0.01, block: int = 128
) -> qz.QArray:
  """GPTQ rounding of ``w`` along ``d_out`` for the output-side Hessian ``h``.

  Minimises ``tr((W-Ŵ) H (W-Ŵ)ᵀ)``, e.g. ``||(W - Ŵ) A||²`` with ``H = AAᵀ``: the
  error of the left factor of a product ``W A``. Equivalent to GPTQ on ``Wᵀ`` where
  each swept "row" is a whole column of ``W`` quantized with its own groups.

  Args:
    w: ``(..., d_in, d_out)`` float; leading dims batched.
    h: ``(..., d_out, d_out)`` symmetric PSD float.
    spec, damp, block: as in ``gptq_round``.
  """
  qz.validate_weight(w, spec)
  _check_h(h, w.shape[-1], 'h')
  spec = spec.for_rows(w.shape[-2])  # the group size actually used (group_fallback)
  return _gptq_round_output_jit(
    jnp.asarray(w, jnp.float32), jnp.asarray(h, jnp.float32), spec, float(damp), int(block)
  )


# ----------------------------------------------------------------------------------
# Adaptive rounding of a pair.


def _pair_index(n1: int, n2: int):
  """Block indices ``(i1, i2)`` of the ``max(n1, n2)`` products of a blocked pair."""
  r = max(n1, n2)
  if r % n1 or r % n2:
    raise ValueError(
      f'block counts n1={n1}, n2={n2}: the larger must be a multiple of the smaller.'
    )
  idx = np.arange(r)
  return idx // (r // n1), idx // (r // n2)


def _blocks1(w1, n1):  # (a, n1*b) -> (n1, a, b)
  a, nb = w1.shape
  return w1.reshape(a, n1, nb // n1).transpose(1, 0, 2)


def _unblocks1(b1):  # (n1, a, b) -> (a, n1*b)
  n1, a, b = b1.shape
  return b1.transpose(1, 0, 2).reshape(a, n1 * b)


def _blocks2(w2, n2):  # (n2*b, c) -> (n2, b, c)
  nb, c = w2.shape
  return w2.reshape(n2, nb // n2, c)


def _mm(a, b):
  return jnp.matmul(a, b, precision=_HI)


def _t(x):
  return jnp.swapaxes(x, -1, -2)


def pair_product_error(
  w1: jax.Array, w2: jax.Array, w1_hat: jax.Array, w2_hat: jax.Array, *, n1: int = 1, n2: int = 1
) -> jax.Array:
  """``Σ_r ||W1_i W2_j - Ŵ1_i Ŵ2_j||²_F`` over the products of a blocked pair.

  ``w1`` ``(a, n1*b)`` holds ``n1`` column blocks, ``w2`` ``(n2*b, c)`` holds ``n2`` row
  blocks; there are ``max(n1, n2)`` products and the smaller side is shared by
  consecutive products (GQA: ``n1 = K`` value groups, ``n2 = H`` output heads). With
  ``n1 = n2 = 1`` it is ``||W1 W2 - Ŵ1 Ŵ2||²``. Never forms a product: with
  ``E = W - Ŵ``, ``W1W2 - Ŵ1Ŵ2 = E1 W2 + Ŵ1 E2`` and every term is a ``(b, b)``
  Gram contraction (accurate: no cancellation of large terms). Returns f32 scalar.
  """
  i1, i2 = _pair_index(n1, n2)
  w1, w2 = _blocks1(w1, n1), _blocks2(w2, n2)
  w1h, w2h = _blocks1(w1_hat, n1), _blocks2(w2_hat, n2)
  e1, e2 = w1 - w1h, w2 - w2h
  a_ee = _mm(_t(e1), e1)[i1]  # E1ᵀE1
  a_eh = _mm(_t(e1), w1h)[i1]  # E1ᵀŴ1
  a_hh = _mm(_t(w1h), w1h)[i1]  # Ŵ1ᵀŴ1
  b_ww = _mm(w2, _t(w2))[i2]  # W2W2ᵀ
  b_we = _mm(w2, _t(e2))[i2]  # W2E2ᵀ
  b_ee = _mm(e2, _t(e2))[i2]  # E2E2ᵀ
  return jnp.sum(a_ee * b_ww) + 2.0 * jnp.sum(a_eh * b_we) + jnp.sum(a_hh * b_ee)


def _segment_sum(x, ids, n):
  return jax.ops.segment_sum(x, jnp.asarray(ids), num_segments=n)


Rounding = Literal['rtn', 'gptq']


@functools.partial(
  jax.jit, static_argnames=('spec1', 'spec2', 'n1', 'n2', 'rounds', 'rounding', 'damp', 'rcond')
)
def _adaptive_round_pair_jit(w1, w2, spec1, spec2, n1, n2, rounds, rounding, damp, rcond):
  i1, i2 = _pair_index(n1, n2)
  b1, b2 = _blocks1(w1, n1), _blocks2(w2, n2)
  deq = qz.dequantize
  err = lambda q1, q2: pair_product_error(w1, w2, deq(q1), deq(q2), n1=n1, n2=n2)

  def round1(w1_target, w2_hat):
    if rounding == 'rtn':
      return qz.quantize(w1_target, spec1)
    bh = _blocks2(w2_hat, n2)
    h1 = _segment_sum(_mm(bh, _t(bh))[i2], i1, n1)  # Σ_j Ŵ2_j Ŵ2_jᵀ per W1 block
    return gptq_round_output(w1_target, transforms.block_diag(h1), spec1, damp=damp)

  def round2(w2_target, w1_hat):
    if rounding == 'rtn':
      return qz.quantize(w2_target, spec2)
    bh = _blocks1(w1_hat, n1)
    h2 = _segment_sum(_mm(_t(bh), bh)[i1], i2, n2)  # Σ_i Ŵ1_iᵀŴ1_i per W2 block
    return gptq_round(w2_target, transforms.block_diag(h2), spec2, damp=damp)

  def resolve2(w1_hat):
    # W2_j* = argmin Σ_{i~j} ||W1_i W2_j - Ŵ1_i X||² = (Σ Ŵ1ᵀŴ1)⁺ (Σ Ŵ1ᵀW1) W2_j.
    bh = _blocks1(w1_hat, n1)
    g = _segment_sum(_mm(_t(bh), bh)[i1], i2, n2)
    c = _segment_sum(_mm(_t(bh), b1)[i1], i2, n2)
    r = _mm(jnp.linalg.pinv(g, rtol=rcond, hermitian=True), c)
    return _mm(r, b2).reshape(w2.shape)

  def resolve1(w2_hat):
    # W1_i* = argmin Σ_{j~i} ||W1_i W2_j - X Ŵ2_j||² = W1_i (Σ W2Ŵ2ᵀ)(Σ Ŵ2Ŵ2ᵀ)⁺.
    bh = _blocks2(w2_hat, n2)
    g = _segment_sum(_mm(bh, _t(bh))[i2], i1, n1)
    c = _segment_sum(_mm(b2, _t(bh))[i2], i1, n1)
    s = _mm(c, jnp.linalg.pinv(g, rtol=rcond, hermitian=True))
    return _unblocks1(_mm(b1, s))

  q1_rtn, q2_rtn = qz.quantize(w1, spec1), qz.quantize(w2, spec2)
  best = (q1_rtn, q2_rtn)
  best_err = err(q1_rtn, q2_rtn)
  history = [best_err]
  q1 = round1(w1, w2) if rounding == 'gptq' else q1_rtn
  if rounding == 'gptq':
    e = err(q1, q2_rtn)
    history.append(e)
    best = jax.tree.map(lambda a, b: jnp.where(e < best_err, a, b), (q1, q2_rtn), best)
    best_err = jnp.minimum(e, best_err)
  for _ in range(rounds):
    q2 = round2(resolve2(deq(q1)), deq(q1))
    e = err(q1, q2)
    history.append(e)
    best = jax.tree.map(lambda a, b: jnp.where(e < best_err, a, b), (q1, q2), best)
    best_err = jnp.minimum(e, best_err)
    q1 = round1(resolve1(deq(q2)), deq(q2))
    e = err(q1, q2)
    history.append(e)
    best = jax.tree.map(lambda a, b: jnp.where(e < best_err, a, b), (q1, q2), best)
    best_err = jnp.minimum(e, best_err)
  return best[0], best[1], jnp.stack(history)


def adaptive_round_pair(
  w1: jax.Array,
  w2: jax.Array,
  spec1: qz.QuantSpec,
  spec2: qz.QuantSpec,
  *,
  rounds: int = 3,
  rounding: Rounding = 'rtn',
  n1: int = 1,
  n2: int = 1,
  damp: float = 0.01,
  rcond: float = 1e-6,
) -> tuple[qz.QArray, qz.QArray, jax.Array]:
  """Alternating re-solve-and-round of a pair for its product ``W1 W2``.

  See docs/method.md#pair-adaptive-rounding.

  Start from ``Ŵ1 = Q(W1)``; then ``rounds`` times: re-solve the right factor for
  the product, ``W2* = Ŵ1⁺ W1 W2`` (``P = W1W2`` is never formed: only the ``(b, b)``
  matrix ``Ŵ1⁺W1``), round it; re-solve the left factor ``W1* = W1 W2 Ŵ2⁺`` and round
  it. The candidate with the lowest product error ``pair_product_error`` is
  returned; plain RTN of both factors is always a candidate, so the result is never
  worse than RTN.

  Rounding of a re-solved factor: ``'rtn'`` (the paper's form) or ``'gptq'``: the
  right factor with the input-side ``H = Ŵ1ᵀŴ1`` (its error is ``||Ŵ1 (W2*-Ŵ2)||²``
  plus a constant), the left factor with the output-side ``H = Ŵ2Ŵ2ᵀ``
  (``gptq_round_output``: error ``||(W1*-Ŵ1) Ŵ2||²``, columns swept, each column keeps
  its own group scales). With ``'gptq'`` the first ``Ŵ1`` is also GPTQ-rounded
  against the fp ``W2``.

  Blocked pairs (attention heads): ``w1`` ``(a, n1*b)``, ``w2`` ``(n2*b, c)``; products
  ``W1_i W2_j`` for the ``max(n1, n2)`` pairs where the smaller side is shared by
  consecutive products (value/output with GQA: ``n1 = K``, ``n2 = H``). The
  quantization groups always follow the full matrices' layout.

  Args:
    w1: ``(a, n1*b)`` float. w2: ``(n2*b, c)`` float.
    spec1, spec2: quantizers of ``w1`` and ``w2``.
    rounds: alternations (each re-solves and rounds both factors).
    rounding: ``'rtn'`` or ``'gptq'``.
    damp: GPTQ relative damping. rcond: relative cutoff of the pseudo-inverse.

  Returns:
    ``(q1, q2, history)``: best ``QArray`` pair and the product error of every
    candidate in order (RTN first), ``(n_candidates,)`` float32.
  """
  if rounding not in ('rtn', 'gptq'):
    raise ValueError(f"rounding={rounding!r}; expected 'rtn' or 'gptq'.")
  if rounds < 0:
    raise ValueError(f'rounds={rounds!r}; expected >= 0.')
  if w1.ndim != 2 or w2.ndim != 2:
    raise ValueError(f'w1 {tuple(w1.shape)} and w2 {tuple(w2.shape)} must be 2-D.')
  if w1.shape[1] * n2 != w2.shape[0] * n1 or w1.shape[1] % n1:
    raise ValueError(
      f'w1 {tuple(w1.shape)} with n1={n1} blocks and w2 {tuple(w2.shape)} with '
      f'n2={n2} blocks do not share an inner block size.'
    )
  _pair_index(n1, n2)
  qz.validate_weight(w1, spec1)
  qz.validate_weight(w2, spec2)
  return _adaptive_round_pair_jit(
    jnp.asarray(w1, jnp.float32),
    jnp.asarray(w2, jnp.float32),
    spec1,
    spec2,
    int(n1),
    int(n2),
    int(rounds),
    rounding,
    float(damp),
    float(rcond),
  )
