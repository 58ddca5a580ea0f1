"""Single-matrix online transforms and rounding over a model (shared by methods).

Matrices are processed in stacks of the same shape: every transform "unit" (one
matrix, or the matrices of one param leaf when ``share_transforms``) becomes one
entry of a ``(B, T, d_in, d_out)`` stack, and all units of one shape are
optimised together in one jitted step (``core.optimize``).
"""

from __future__ import annotations

import time
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from cafeq_jax import quantizer
from cafeq_jax.core import optimize
from cafeq_jax.core import proxy
from cafeq_jax.core import transforms
from cafeq_jax.methods import config as config_lib

Key = tuple[int, str]  # (layer, matrix name)


def _units(mats: Mapping[str, jax.Array], layers: Mapping[str, list[int]],
           share: bool) -> list[tuple[tuple[str, ...], int]]:
  """Transform units ``(names sharing the transform, layer)``."""
  units = []
  for group in config_lib.LEAF_GROUPS:
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


def transforms_for(mats: Mapping[str, jax.Array], layers: Mapping[str, list[int]],
                   quant_config: config_lib.QuantConfig, key: jax.Array, *,
                   mode: str) -> tuple[dict[Key, tuple[jax.Array, jax.Array]],
                                       dict[Key, float], dict[str, float]]:
  """Block-diagonal transforms ``(M, M⁻¹)`` for the given matrices.

  Args:
    mats: ``name -> (L, d_in, d_out)`` float32 matrix stacks.
    layers: ``name -> layers`` to transform.
    quant_config: the config (block size, optimiser, sharing).
    key: PRNG key.
    mode: 'learn' (optimise, ``core.optimize``) or 'hadamard' (fixed random
      block Hadamard rotation).

  Returns:
    ``(blocks, init_losses, timings)``: ``(layer, name) -> (M, M⁻¹)`` blocks
    ``(nb, k, k)``; for 'learn' the per-unit loss at init (attributed to each
    matrix of the unit); seconds per shape group.
  """
  units = _units(mats, layers, quant_config.share_transforms)
  by_shape: dict[tuple[int, ...], list] = {}
  for names, layer in units:
    w = jnp.stack([mats[n][layer] for n in names])  # (T, d_in, d_out)
    by_shape.setdefault(tuple(w.shape), []).append(((names, layer), w))
  out, init_losses, timings = {}, {}, {}
  for idx, (shape, entries) in enumerate(sorted(by_shape.items())):
    t0 = time.perf_counter()
    w = jnp.stack([w for _, w in entries])  # (B, T, d_in, d_out)
    k = jax.random.fold_in(key, idx)
    if mode == 'hadamard':
      transforms.check_block_size(shape[-2], quant_config.block_size)
      nb = shape[-2] // quant_config.block_size
      m = transforms.random_hadamard_blocks(k, nb, quant_config.block_size, (w.shape[0],))
      m_inv = jnp.swapaxes(m, -1, -2)
      init = None
    elif mode == 'learn':
      cfg = quant_config.transform_config()
      best, state = optimize.run(w, quant_config.spec, cfg, k,
                                 progress=quant_config.progress)
      m, m_inv = jax.jit(lambda t: t.matrix_and_inverse())(best)
      init = np.asarray(state.init_loss)
    else:
      raise ValueError(f'mode={mode!r}; expected "learn" or "hadamard".')
    m, m_inv = jax.block_until_ready((m, m_inv))
    timings[f'{shape[-2]}x{shape[-1]}' + (f'x{shape[0]}' if shape[0] > 1 else '')] = (
        time.perf_counter() - t0)
    for b, ((names, layer), _) in enumerate(entries):
      for n in names:
        out[(layer, n)] = (m[b], m_inv[b])
        if init is not None:
          init_losses[(layer, n)] = float(init[b]) / len(names)
  return out, init_losses, timings


def _gptq_round_fn():
  try:
    from cafeq_jax.core import rounding  # pylint: disable=g-import-not-at-top
    return rounding.gptq_round
  except (ImportError, AttributeError) as e:
    raise NotImplementedError(
        "rounding='gptq' needs cafeq_jax.core.rounding.gptq_round(w, h, spec), which "
        f"could not be imported ({e}); use rounding='rtn'.") from e


@jax.jit
def _apply_left(m, w):
  return transforms.apply_left(m, w)


def _rtn_impl(v, spec):
  scale, zero = quantizer.compute_scale_zero(v, spec)
  return quantizer.round_with_scale(v, scale, zero, spec)


_rtn = jax.jit(_rtn_impl, static_argnums=1)
_rtn_loss = jax.jit(proxy.rtn_loss, static_argnums=1)


def round_matrices(mats: Mapping[str, jax.Array], layers: Mapping[str, list[int]],
                   blocks: Mapping[Key, tuple[jax.Array, jax.Array]],
                   quant_config: config_lib.QuantConfig
                   ) -> tuple[dict[Key, quantizer.QArray], dict[Key, jax.Array | None]]:
  """Quantizes ``V = M W`` (or ``W`` without transform) for each matrix.

  Rounding is RTN, or with ``quant_config.rounding == 'gptq'`` GPTQ-form
  rounding minimising ``||M⁻¹ (V - V̂)||² = tr(Eᵀ H E)``, ``H = M⁻ᵀ M⁻¹``
  (block diagonal, built from the ``M⁻¹`` blocks).

  Returns:
    ``(qarrays, transform_invs)`` keyed by ``(layer, name)``.
  """
  spec = quant_config.spec
  qarrays, tinvs = {}, {}
  for name, ls in layers.items():
    if not ls:
      continue
    w = mats[name][jnp.asarray(ls)]  # (B, d_in, d_out)
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
    if quant_config.rounding == 'gptq':
      gptq_round = _gptq_round_fn()
      if m_inv is None:
        h = jnp.broadcast_to(jnp.eye(v.shape[-2], dtype=jnp.float32), (v.shape[0],) + (v.shape[-2],) * 2)
      else:
        hb = jnp.swapaxes(m_inv, -1, -2) @ m_inv  # (B, nb, k, k): (M⁻¹)ᵀ M⁻¹ per block
        h = transforms.block_diag(hb)
      q = gptq_round(v, h, spec, damp=quant_config.gptq_damp)
    else:
      q = _rtn(v, spec)
    for b, l in enumerate(ls):
      qarrays[(l, name)] = quantizer.QArray(
          codes=q.codes[b], scale=q.scale[b], zero=None if q.zero is None else q.zero[b],
          spec=q.spec)
      tinvs[(l, name)] = None if m_inv is None else m_inv[b]
  return qarrays, tinvs


@jax.jit
def _effective_loss(w, q, t):
  eff = quantizer.dequantize(q)
  if t is not None:
    eff = transforms.apply_left(t, eff)
  return proxy.frobenius(w, eff)


def proxy_losses(ref: Mapping[str, jax.Array], qarrays: Mapping[Key, quantizer.QArray],
                 tinvs: Mapping[Key, jax.Array | None]) -> dict[Key, float]:
  """``||W - M⁻¹ dequant(Q)||²`` per matrix, ``W = ref[name][layer]``."""
  from cafeq_jax.methods import _tree  # pylint: disable=g-import-not-at-top
  out = {}
  names = sorted({n for _, n in qarrays})
  for n in names:
    ls = sorted(l for l, m in qarrays if m == n)
    with_t = [l for l in ls if tinvs.get((l, n)) is not None]
    for subset in (with_t, [l for l in ls if l not in with_t]):
      if not subset:
        continue
      q = _tree.stack_qarrays([qarrays[(l, n)] for l in subset])
      t = jnp.stack([tinvs[(l, n)] for l in subset]) if subset is with_t else None
      losses = np.asarray(_effective_loss(ref[n][jnp.asarray(subset)], q, t))
      out.update({(l, n): float(x) for l, x in zip(subset, losses)})
  return out


def rtn_losses(mats: Mapping[str, jax.Array], spec: quantizer.QuantSpec) -> dict[Key, float]:
  """``||W - RTN(W)||²`` per matrix."""
  out = {}
  for n, w in mats.items():
    losses = np.asarray(_rtn_loss(w, spec))
    out.update({(l, n): float(x) for l, x in enumerate(losses)})
  return out


def online_overhead(mats: Mapping[str, jax.Array], tinvs: Mapping[Key, jax.Array | None]
                    ) -> float:
  """MACs of all ``x M⁻¹`` over MACs of all quantized matmuls (per token)."""
  extra = total = 0
  for (l, n), t in tinvs.items():
    d_in, d_out = mats[n].shape[-2:]
    total += d_in * d_out
    if t is not None:
      extra += d_in * t.shape[-1]
  return extra / max(total, 1)
