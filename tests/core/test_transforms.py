"""Tests of cafeq_jax.core.transforms against numpy references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cafeq_jax.core import transforms


def _random_transform(key, d_in, k, batch=(), scale=1.0, init='identity', bound=0.5):
  t = transforms.init_transform(key, d_in, k, init=init, batch_shape=batch, log_scale_bound=bound)
  k1, k2, k3 = jax.random.split(jax.random.fold_in(key, 1), 3)
  return t.replace(
    skew=scale * jax.random.normal(k1, t.skew.shape),
    log_row=3 * scale * jax.random.normal(k2, t.log_row.shape),
    log_col=3 * scale * jax.random.normal(k3, t.log_col.shape),
  )


@pytest.mark.parametrize('k', [1, 2, 8, 64])
def test_sylvester_hadamard_rows_are_orthogonal(k):
  h = transforms.hadamard_matrix(k)
  assert set(np.unique(h)) <= {-1.0, 1.0}
  np.testing.assert_array_equal(h @ h.T, k * np.eye(k))


@pytest.mark.parametrize('k', [0, 3, 12, 96])
def test_hadamard_rejects_non_power_of_two(k):
  with pytest.raises(ValueError, match='powers of two'):
    transforms.hadamard_matrix(k)


def test_random_hadamard_blocks_are_orthogonal_with_random_signs():
  m = np.asarray(transforms.random_hadamard_blocks(jax.random.PRNGKey(0), 3, 16, (2,)))
  assert m.shape == (2, 3, 16, 16)
  np.testing.assert_allclose(
    m @ np.swapaxes(m, -1, -2), np.broadcast_to(np.eye(16), m.shape), atol=1e-6
  )
  assert not np.allclose(m[0, 0], m[0, 1])  # independent signs per block


@pytest.mark.parametrize('init', ['identity', 'hadamard'])
def test_closed_form_inverse_matches_numpy_inverse(init):
  t = _random_transform(jax.random.PRNGKey(3), 48, 16, batch=(2,), init=init)
  m, m_inv = (np.asarray(a, np.float64) for a in t.matrix_and_inverse())
  np.testing.assert_allclose(m_inv, np.linalg.inv(m), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(t.inverse()), m_inv, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(t.matrix()), m, rtol=1e-6)


@pytest.mark.parametrize('bound', [0.25, 0.5, 1.0])
def test_condition_number_is_bounded_for_extreme_parameters(bound):
  t = _random_transform(jax.random.PRNGKey(4), 64, 32, batch=(3,), scale=30.0, bound=bound)
  conds = np.linalg.cond(np.asarray(t.matrix(), np.float64))
  assert conds.max() <= t.condition_bound() * (1 + 1e-4)
  assert conds.max() > 1.5  # the parameters do move away from orthogonal


def test_zero_parameters_give_the_base_rotation():
  t = transforms.init_transform(jax.random.PRNGKey(0), 32, 8, init='identity')
  np.testing.assert_allclose(np.asarray(t.matrix()), np.broadcast_to(np.eye(8), (4, 8, 8)))
  th = transforms.init_transform(jax.random.PRNGKey(0), 32, 8, init='hadamard')
  np.testing.assert_allclose(np.asarray(th.matrix()), np.asarray(th.base), atol=1e-6)


def test_apply_left_matches_dense_block_diagonal_product():
  key = jax.random.PRNGKey(5)
  t = _random_transform(key, 24, 8, batch=(2,))
  m = np.asarray(t.matrix(), np.float64)
  w = np.asarray(jax.random.normal(key, (2, 24, 5)), np.float64)
  dense = np.zeros((2, 24, 24))
  for b in range(2):
    for i in range(3):
      dense[b, 8 * i : 8 * i + 8, 8 * i : 8 * i + 8] = m[b, i]
  np.testing.assert_allclose(
    np.asarray(transforms.apply_left(jnp.asarray(m, jnp.float32), w)),
    dense @ w,
    rtol=1e-5,
    atol=1e-5,
  )
  np.testing.assert_allclose(np.asarray(transforms.block_diag(jnp.asarray(m))), dense, atol=1e-7)


def test_online_transform_leaves_the_layer_output_unchanged():
  key = jax.random.PRNGKey(6)
  t = _random_transform(key, 32, 16)
  m, m_inv = t.matrix_and_inverse()
  w = jax.random.normal(jax.random.fold_in(key, 1), (32, 7))
  x = jax.random.normal(jax.random.fold_in(key, 2), (3, 5, 32))
  y = transforms.apply_to_activations(x, m_inv) @ transforms.apply_left(m, w)
  np.testing.assert_allclose(np.asarray(y), np.asarray(x @ w), rtol=1e-4, atol=1e-4)


def test_block_size_must_divide_d_in():
  with pytest.raises(ValueError, match='does not divide d_in=48'):
    transforms.init_transform(jax.random.PRNGKey(0), 48, 32)
  with pytest.raises(ValueError, match='init='):
    transforms.init_transform(jax.random.PRNGKey(0), 48, 16, init='qr')
  with pytest.raises(ValueError, match='cannot act on a matrix with d_in=40'):
    transforms.apply_left(jnp.zeros((3, 16, 16)), jnp.zeros((40, 4)))


def test_online_overhead_is_k_over_d_out():
  assert transforms.online_overhead(576, 1536, 64) == pytest.approx(64 / 1536)


@pytest.mark.parametrize('scale', [0.0, 0.01, 0.3, 3.0, 100.0])
def test_expm_skew_matches_scipy_and_is_orthogonal(scale):
  import scipy.linalg  # pylint: disable=g-import-not-at-top

  p = scale * np.asarray(jax.random.normal(jax.random.PRNGKey(9), (3, 16, 16)), np.float64)
  a = 0.5 * (p - np.swapaxes(p, -1, -2))
  r = np.asarray(transforms.expm_skew(jnp.asarray(a, jnp.float32)), np.float64)
  np.testing.assert_allclose(
    r @ np.swapaxes(r, -1, -2), np.broadcast_to(np.eye(16), r.shape), atol=2e-5
  )
  for x, rx in zip(a, r):
    if np.linalg.norm(x) <= 32:  # beyond, the generator is clipped (still orthogonal)
      np.testing.assert_allclose(rx, scipy.linalg.expm(x), atol=5e-5)


def _random_free(param, key, d_in=48, k=16, batch=(2,), init='identity', scale=0.3):
  """A dense or LU transform moved well away from its init by random parameters."""
  t = transforms.init_transform(key, d_in, k, init=init, batch_shape=batch, parameterization=param)
  leaves = t.trainable()
  keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
  moved = {
    n: v + scale * jax.random.normal(kk, v.shape) for kk, (n, v) in zip(keys, leaves.items())
  }
  return t.with_trainable(moved)


@pytest.mark.parametrize('param', ['dense', 'lu'])
@pytest.mark.parametrize('init', ['identity', 'hadamard'])
def test_free_parameterisations_start_at_the_base_and_invert_exactly(param, init):
  key = jax.random.PRNGKey(11)
  t0 = transforms.init_transform(key, 48, 16, init=init, batch_shape=(2,), parameterization=param)
  base = transforms.init_transform(key, 48, 16, init=init, batch_shape=(2,)).matrix()
  np.testing.assert_allclose(np.asarray(t0.matrix()), np.asarray(base), atol=1e-6)
  t = _random_free(param, key, init=init)
  m, m_inv = (np.asarray(a, np.float64) for a in t.matrix_and_inverse())
  np.testing.assert_allclose(m_inv, np.linalg.inv(m), rtol=1e-3, atol=1e-4)
  assert not np.allclose(m, np.asarray(base), atol=0.05)  # really moved


def test_lu_transform_is_invertible_for_extreme_parameters():
  # det(M_b) = exp(sum u) whatever the parameters: never singular.
  t = _random_free('lu', jax.random.PRNGKey(5), d_in=32, k=8, batch=(3,), scale=1.0)
  m = np.asarray(t.matrix(), np.float64)
  np.testing.assert_allclose(
    np.linalg.slogdet(m)[1], np.asarray(t.log_diag, np.float64).sum(-1), rtol=1e-4, atol=1e-3
  )
  eye = np.broadcast_to(np.eye(8), m.shape)
  np.testing.assert_allclose(m @ np.asarray(t.inverse(), np.float64), eye, atol=5e-3)


def test_condition_numbers_match_numpy():
  t = _random_free('dense', jax.random.PRNGKey(6), scale=0.5)
  ref = np.linalg.cond(np.asarray(t.blocks, np.float64))
  np.testing.assert_allclose(np.asarray(transforms.condition_numbers(t.blocks)), ref, rtol=1e-3)


def test_unknown_parameterisation_is_refused():
  with pytest.raises(ValueError, match="parameterization='qr' is not supported"):
    transforms.init_transform(jax.random.PRNGKey(0), 32, 8, parameterization='qr')


def test_gauss_jordan_inverse_matches_numpy_in_chunks_and_whole():
  # 150 matrices: more than one chunk of _GJ_CHUNK, the last one partial; pivoting
  # needed (zero leading entries).
  rng = np.random.default_rng(0)
  m = rng.standard_normal((3, 50, 16, 16)).astype(np.float32)
  m[..., 0, 0] = 0.0
  got = np.asarray(jax.jit(transforms.gauss_jordan_inverse)(m))
  np.testing.assert_allclose(got, np.linalg.inv(m.astype(np.float64)), rtol=2e-3, atol=2e-3)
  whole = jax.jit(transforms._gauss_jordan)(m)  # one elimination of the whole stack
  np.testing.assert_array_equal(got, np.asarray(whole))  # chunking changes no bit
  grad = jax.grad(lambda a: transforms.inverse_blocks(a).sum())(jnp.asarray(m))
  inv = np.linalg.inv(m.astype(np.float64))
  want = -np.swapaxes(inv, -1, -2) @ np.ones_like(inv) @ np.swapaxes(inv, -1, -2)
  np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-2, atol=1e-2)


def _near_identity(seed: int, shape, scale: float) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return (np.eye(shape[-1]) + scale * rng.standard_normal(shape)).astype(np.float32)


def test_warm_inverse_reaches_the_exact_inverse_from_the_last_steps():
  """From the inverse of a matrix one Adam step away (every entry moved by 2e-2),
  three Newton-Schulz iterations give numpy's inverse; no block falls back."""
  m0 = _near_identity(0, (2, 3, 64, 64), 0.05)
  step = 0.02 * np.sign(np.random.default_rng(1).standard_normal(m0.shape)).astype(np.float32)
  m1 = m0 + step
  x, fell_back = transforms.warm_inverse(jnp.asarray(m1), jnp.asarray(np.linalg.inv(m0)))
  assert not np.asarray(fell_back).any()
  np.testing.assert_allclose(np.asarray(x), np.linalg.inv(m1.astype(np.float64)), atol=2e-5)


@pytest.mark.parametrize(
  'broken',
  [
    [(0, 2)],
    # scattered, more than one elimination takes (_ELIMINATION_BLOCKS)
    [(0, 0), (0, 3), (1, 1), (1, 2), (2, 0), (2, 4)],
    [(a, b) for a in range(3) for b in range(5)],  # all of them
  ],
)
def test_warm_inverse_falls_back_per_block_and_blocks_stay_independent(broken):
  m = jnp.asarray(_near_identity(2, (3, 5, 32, 32), 0.1))
  good = jnp.asarray(np.linalg.inv(np.asarray(m)))
  bad = good
  for ab in broken:  # X = 0 is a fixed point of Newton-Schulz: no convergence
    bad = bad.at[ab].set(0.0)
  x_good, fb_good = jax.jit(transforms.warm_inverse)(m, good)
  x_bad, fb_bad = jax.jit(transforms.warm_inverse)(m, bad)
  assert not np.asarray(fb_good).any()
  want = np.zeros((3, 5), bool)
  want[tuple(zip(*broken))] = True
  np.testing.assert_array_equal(np.asarray(fb_bad), want)
  eliminate = jax.jit(transforms.gauss_jordan_inverse)
  for a in range(3):
    for b in range(5):  # a broken block gets its inverse alone; the others are untouched
      want_ab = eliminate(m[a, b][None])[0] if want[a, b] else x_good[a, b]
      np.testing.assert_array_equal(np.asarray(x_bad[a, b]), np.asarray(want_ab))


def test_inverse_given_has_the_gradient_of_the_matrix_inverse():
  m = jnp.asarray(_near_identity(3, (2, 16, 16), 0.2))
  g = jnp.asarray(np.random.default_rng(4).standard_normal(m.shape).astype(np.float32))
  inv = jnp.linalg.inv(m)
  got = jax.grad(lambda a: jnp.sum(g * transforms.inverse_given(a, inv)))(m)
  want = jax.grad(lambda a: jnp.sum(g * jnp.linalg.inv(a)))(m)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)
