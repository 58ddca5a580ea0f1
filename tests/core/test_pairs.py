"""Tests for cafeq_jax.core.pairs: exact invariances (numpy references) and training."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from cafeq_jax import quantizer as qz
from cafeq_jax.core import pairs

D, H, K, HD, F = 32, 4, 2, 8, 64
GEOM = pairs.PairGeometry(num_heads=H, num_kv_heads=K, head_dim=HD, hidden_dim=F)


def _np_rope(x, pos, base=10_000.0):
  """Half-split RoPE on x (L, hd), written independently of the model."""
  hd = x.shape[-1]
  half = hd // 2
  out = np.empty_like(x)
  for t in range(x.shape[0]):
    for i in range(half):
      ang = pos[t] * base ** (-2.0 * i / hd)
      c, s = np.cos(ang), np.sin(ang)
      a, b = x[t, i], x[t, i + half]
      out[t, i], out[t, i + half] = a * c - b * s, a * s + b * c
  return out


def _np_attention(x, q, k, v, o):
  """Causal GQA attention in float64 with per-head RoPE; matrix views as inputs."""
  n = x.shape[0]
  pos = np.arange(n) * 3 + 1
  out = np.zeros((n, o.shape[1]))
  for h in range(H):
    g = h // (H // K)
    qh = _np_rope(x @ q[:, h * HD : (h + 1) * HD], pos)
    kh = _np_rope(x @ k[:, g * HD : (g + 1) * HD], pos)
    vh = x @ v[:, g * HD : (g + 1) * HD]
    s = qh @ kh.T / np.sqrt(HD) + np.triu(np.full((n, n), -np.inf), 1)
    p = np.exp(s - s.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    out += p @ vh @ o[h * HD : (h + 1) * HD]
  return out


def _rand(rng, *shape):
  return rng.normal(size=shape).astype(np.float32)


def test_vo_and_qk_folds_leave_numpy_gqa_rope_attention_unchanged():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(7, D))
  q, k, v, o = (
    _rand(rng, D, H * HD),
    _rand(rng, D, K * HD),
    _rand(rng, D, K * HD),
    _rand(rng, H * HD, D),
  )
  m = jnp.asarray(np.eye(HD) + 0.3 * rng.normal(size=(K, HD, HD)), jnp.float32)
  qk_p = (
    jnp.asarray(0.5 * rng.normal(size=(K, HD // 2)), jnp.float32),
    jnp.asarray(rng.uniform(-3, 3, size=(K, HD // 2)), jnp.float32),
  )
  v2, o2 = pairs.vo_fold(jnp.asarray(v), jnp.asarray(o), m, num_heads=H)
  q2, k2 = pairs.qk_fold(jnp.asarray(q), jnp.asarray(k), qk_p, num_heads=H)
  want = _np_attention(x, q, k, v, o)
  got = _np_attention(x, *(np.asarray(a, np.float64) for a in (q2, k2, v2, o2)))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
  # The transforms are not trivial: the weights changed.
  assert np.abs(np.asarray(v2) - v).max() > 0.1 and np.abs(np.asarray(q2) - q).max() > 0.1


def test_qk_fold_with_a_generic_matrix_would_break_rope_invariance():
  # Control for the test above: a non-commuting transform on the same pair is not exact.
  rng = np.random.default_rng(1)
  x = rng.normal(size=(7, D))
  q, k, v, o = (
    _rand(rng, D, H * HD),
    _rand(rng, D, K * HD),
    _rand(rng, D, K * HD),
    _rand(rng, H * HD, D),
  )
  t = np.eye(HD) + 0.3 * rng.normal(size=(HD, HD))
  q2 = np.concatenate([q[:, h * HD : (h + 1) * HD] @ t for h in range(H)], 1)
  k2 = np.concatenate([k[:, g * HD : (g + 1) * HD] @ np.linalg.inv(t).T for g in range(K)], 1)
  want = _np_attention(x, q, k, v, o)
  got = _np_attention(x, q2, k2, v, o)
  assert np.abs(got - want).max() > 1e-3 * np.abs(want).max()


def test_updown_fold_leaves_gated_mlp_unchanged():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(5, D))
  gate, up, down = _rand(rng, D, F), _rand(rng, D, F), _rand(rng, F, D)
  log_d = jnp.asarray(rng.normal(size=(F,)), jnp.float32)
  up2, down2 = pairs.updown_fold(jnp.asarray(up), jnp.asarray(down), log_d)
  silu = lambda z: z / (1 + np.exp(-z))
  mlp = lambda u, dn: (
    (silu(x @ gate) * (x @ np.asarray(u, np.float64))) @ np.asarray(dn, np.float64)
  )
  np.testing.assert_allclose(mlp(up2, down2), mlp(up, down), rtol=1e-4, atol=1e-3)


def test_folds_are_batched_over_layers():
  rng = np.random.default_rng(3)
  v, o = _rand(rng, 3, D, K * HD), _rand(rng, 3, H * HD, D)
  m = jnp.asarray(np.eye(HD) + 0.2 * rng.normal(size=(3, K, HD, HD)), jnp.float32)
  v2, o2 = pairs.vo_fold(jnp.asarray(v), jnp.asarray(o), m, num_heads=H)
  v1, o1 = pairs.vo_fold(jnp.asarray(v[1]), jnp.asarray(o[1]), m[1], num_heads=H)
  np.testing.assert_allclose(np.asarray(v2[1]), np.asarray(v1), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(o2[1]), np.asarray(o1), rtol=1e-6)


def test_identity_init_folds_to_the_same_weights():
  rng = np.random.default_rng(4)
  a, b = jnp.asarray(_rand(rng, D, H * HD)), jnp.asarray(_rand(rng, D, K * HD))
  for kind, (x, y) in (('qk', (a, b)), ('vo', (b, jnp.asarray(_rand(rng, H * HD, D))))):
    x2, y2 = pairs.fold(kind, GEOM, x, y, pairs.init_params(kind, GEOM))
    np.testing.assert_allclose(np.asarray(x2), np.asarray(x), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(y2), np.asarray(y), rtol=1e-6, atol=1e-6)


def _dense_error(kind, a, b, ah, bh):
  a, b, ah, bh = (np.asarray(t, np.float64) for t in (a, b, ah, bh))
  if kind == 'updown':
    return np.sum((a @ b - ah @ bh) ** 2)
  err = 0.0
  for h in range(H):
    g = h // (H // K)
    if kind == 'vo':
      p = a[:, g * HD : (g + 1) * HD] @ b[h * HD : (h + 1) * HD]
      ph = ah[:, g * HD : (g + 1) * HD] @ bh[h * HD : (h + 1) * HD]
    else:
      p = a[:, h * HD : (h + 1) * HD] @ b[:, g * HD : (g + 1) * HD].T
      ph = ah[:, h * HD : (h + 1) * HD] @ bh[:, g * HD : (g + 1) * HD].T
    err += np.sum((p - ph) ** 2)
  return err


def _pair_mats(kind, rng, layers=2):
  if kind == 'vo':
    a, b = _rand(rng, layers, 64, K * HD), _rand(rng, layers, H * HD, 64)
    a[..., 3] *= 8  # an outlier value channel
  elif kind == 'qk':
    a, b = _rand(rng, layers, 64, H * HD), _rand(rng, layers, 64, K * HD)
    a[..., 2] *= 10
    b[..., HD // 2 + 1] *= 6
  else:
    a, b = _rand(rng, layers, 64, F), _rand(rng, layers, F, 64)
    b[:, 5] *= 20
  return a, b


@pytest.mark.parametrize('kind', ['vo', 'qk', 'updown'])
def test_product_error_matches_dense_numpy(kind):
  rng = np.random.default_rng(5)
  a, b = _pair_mats(kind, rng, layers=1)
  a, b = a[0], b[0]
  ah, bh = a + 0.1 * _rand(rng, *a.shape), b + 0.1 * _rand(rng, *b.shape)
  got = pairs.product_error(kind, GEOM, *(jnp.asarray(t) for t in (a, b, ah, bh)))
  np.testing.assert_allclose(float(got), _dense_error(kind, a, b, ah, bh), rtol=1e-4)


@pytest.mark.parametrize(
  'kind,loss', [('vo', 'lse'), ('vo', 'product'), ('qk', 'both'), ('updown', 'product')]
)
def test_optimised_transform_reduces_quantized_product_error(kind, loss):
  rng = np.random.default_rng(6)
  a, b = _pair_mats(kind, rng)
  spec = qz.QuantSpec(bits=3, group_size=32)
  cfg = pairs.PairOptConfig(loss=loss, steps=40, learning_rate=1e-2, eval_every=4)
  p, e0, e1, losses = pairs.optimize_pair(
    kind, GEOM, jnp.asarray(a), jnp.asarray(b), spec, spec, cfg
  )
  assert losses.shape == (40,)
  e0, e1 = np.asarray(e0), np.asarray(e1)
  assert np.all(e1 <= e0) and e1.sum() < 0.97 * e0.sum(), (e0, e1)
  # The reported error is the actual RTN product error of the folded weights.
  a2, b2 = pairs.fold(kind, GEOM, jnp.asarray(a), jnp.asarray(b), p)
  for l in range(2):
    ah = qz.quant_dequant(a2[l], spec)
    bh = qz.quant_dequant(b2[l], spec)
    np.testing.assert_allclose(_dense_error(kind, a[l], b[l], ah, bh), e1[l], rtol=2e-3)


def test_optimisation_is_deterministic():
  rng = np.random.default_rng(7)
  a, b = _pair_mats('vo', rng)
  spec = qz.QuantSpec(bits=3, group_size=32)
  cfg = pairs.PairOptConfig(loss='product', steps=10)
  r1 = pairs.optimize_pair('vo', GEOM, jnp.asarray(a), jnp.asarray(b), spec, spec, cfg)
  r2 = pairs.optimize_pair('vo', GEOM, jnp.asarray(a), jnp.asarray(b), spec, spec, cfg)
  np.testing.assert_array_equal(np.asarray(r1[0]), np.asarray(r2[0]))


def test_bad_configs_raise():
  with pytest.raises(ValueError, match='loss'):
    pairs.PairOptConfig(loss='mse')
  with pytest.raises(ValueError, match='pair kind'):
    pairs.init_params('ffn', GEOM)
  with pytest.raises(ValueError, match='num_heads'):
    pairs.vo_fold(jnp.zeros((8, 16)), jnp.zeros((24, 8)), jnp.zeros((2, 8, 8)), num_heads=3)
  with pytest.raises(ValueError, match='even'):
    pairs.qk_init(2, 7)


def test_inverse_matches_numpy_with_pivoting():
  rng = np.random.default_rng(0)
  m = rng.normal(size=(3, 4, 16, 16)) + 0.5 * np.eye(16)
  m[0, 0, 0, 0] = 0.0  # needs a row swap
  m[1, 2] = np.eye(16)[::-1]  # a permutation: pivoting on every column
  got = np.asarray(pairs.inv(jnp.asarray(m, jnp.float32)))
  want = np.linalg.inv(m)
  np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())


_STACKED_VO_SCRIPT = """
import jax, jax.numpy as jnp
from cafeq_jax import quantizer as qz
from cafeq_jax.core import pairs
geom = pairs.PairGeometry(num_heads=4, num_kv_heads=2, head_dim=64, hidden_dim=256)
k1, k2 = jax.random.split(jax.random.PRNGKey(0))
v = jax.random.normal(k1, (4, 128, 128))
o = jax.random.normal(k2, (4, 256, 128))
spec = qz.QuantSpec(bits=3, group_size=64)
p, e0, e1, _ = pairs.optimize_pair('vo', geom, v, o, spec, spec,
                                   pairs.PairOptConfig(steps=10, eval_every=5))
assert bool(jnp.all(e1 <= e0)), (e0, e1)
print('ok')
"""


def test_stacked_vo_optimisation_finishes_on_a_two_thread_cpu():
  """Regression: a batched LAPACK inverse inside the optimisation loop deadlocked
  jaxlib's CPU thread pool when the stack had 2+ layers (2-core machines)."""
  import os
  import subprocess
  import sys

  env = dict(os.environ, XLA_FLAGS='--xla_cpu_multi_thread_eigen=true')
  env['JAX_PLATFORMS'] = 'cpu'
  out = subprocess.run(
    [sys.executable, '-c', _STACKED_VO_SCRIPT],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
    cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
  )
  assert out.returncode == 0 and 'ok' in out.stdout, out.stderr[-2000:]
