"""Tests of cafeq_jax.core.optimize (learned single-matrix transforms)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cafeq_jax import quantizer
from cafeq_jax.core import optimize
from cafeq_jax.core import proxy

SPEC = quantizer.QuantSpec(bits=3, group_size=32)
CFG = optimize.TransformConfig(block_size=32, steps=40, learning_rate=1e-2)
CFG_H = dataclasses.replace(CFG, init='hadamard', steps=25)  # shared: one compile


def _outlier_stack(seed=0, b=2, d_in=64, d_out=32):
  key = jax.random.PRNGKey(seed)
  w = 0.02 * jax.random.normal(key, (b, d_in, d_out))
  return w.at[:, 5, :].mul(15.0).at[:, 40, :].mul(8.0)  # outlier input rows


def _dense_loss_numpy(w, m, m_inv, sigma=None):
  """Σ_b ||W_b - M_b⁻¹ Q(M_b W_b)||² (or tr(Eᵀ Σ_b E) with ``sigma`` ``(B, 64, 64)``)
  with dense numpy block-diagonal matrices."""
  out = []
  for b in range(w.shape[0]):
    dm = np.zeros((64, 64))
    di = np.zeros((64, 64))
    for i in range(2):
      dm[32 * i : 32 * i + 32, 32 * i : 32 * i + 32] = m[b, i]
      di[32 * i : 32 * i + 32, 32 * i : 32 * i + 32] = m_inv[b, i]
    v_hat = quantizer.quant_dequant(jnp.asarray(dm @ np.asarray(w[b]), jnp.float32), SPEC)
    e = np.asarray(w[b]) - di @ np.asarray(v_hat, np.float64)
    out.append((e**2).sum() if sigma is None else np.trace(e.T @ sigma[b] @ e))
  return np.asarray(out)


@pytest.fixture(scope='module')
def identity_run():
  w = _outlier_stack()
  best, state = optimize.run(w, SPEC, CFG, jax.random.PRNGKey(0))
  return w, best, state


def test_learned_transform_beats_rtn_on_matrix_with_outliers(identity_run):
  w, _, state = identity_run
  rtn = np.asarray(proxy.rtn_loss(w, SPEC))
  np.testing.assert_allclose(np.asarray(state.rtn_loss), rtn, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(state.init_loss), rtn, rtol=1e-5)  # identity init
  assert np.all(np.asarray(state.best_loss) < 0.7 * rtn)


def test_best_loss_is_the_actual_quantized_loss_of_the_returned_transform(identity_run):
  w, best, state = identity_run
  m, m_inv = (np.asarray(a, np.float64) for a in best.matrix_and_inverse())
  for b, loss in enumerate(_dense_loss_numpy(w, m, m_inv)):
    assert loss == pytest.approx(float(state.best_loss[b]), rel=1e-3)
  assert np.all(np.asarray(state.best_loss) <= np.asarray(state.init_loss))
  assert int(state.step) == CFG.steps


def test_hadamard_init_then_learning_improves_on_the_rotation():
  w = _outlier_stack(seed=1, b=1)
  _, state = optimize.run(w, SPEC, CFG_H, jax.random.PRNGKey(1))
  assert float(state.init_loss[0]) < float(state.rtn_loss[0])  # rotation helps outliers
  assert float(state.best_loss[0]) < float(state.init_loss[0])


def test_same_key_gives_identical_transforms_and_different_key_differs():
  w = _outlier_stack(seed=2, b=1)
  a, _ = optimize.run(w, SPEC, CFG_H, jax.random.PRNGKey(7))
  b, _ = optimize.run(w, SPEC, CFG_H, jax.random.PRNGKey(7))
  c, _ = optimize.run(w, SPEC, CFG_H, jax.random.PRNGKey(8))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert not np.array_equal(np.asarray(a.matrix()), np.asarray(c.matrix()))


def test_fixed_scales_keep_the_transform_orthogonal_and_shared_stacks_sum_losses():
  w = _outlier_stack(seed=3, b=2).reshape(1, 2, 64, 32)  # two matrices share a transform
  cfg = dataclasses.replace(
    CFG,
    parameterization='rotation',
    learn_scales=False,
    steps=3,
    optimizer='adamw',
    weight_decay=1e-3,
    schedule='constant',
    right_scales=True,
  )
  best, state = optimize.run(w, SPEC, cfg, jax.random.PRNGKey(0))
  m = np.asarray(best.matrix(), np.float64)
  assert m.shape == (1, 2, 32, 32)
  np.testing.assert_allclose(
    m @ np.swapaxes(m, -1, -2), np.broadcast_to(np.eye(32), m.shape), atol=1e-5
  )
  assert float(state.rtn_loss[0]) == pytest.approx(
    float(proxy.rtn_loss(w[0], SPEC).sum()), rel=1e-6
  )


def test_zero_steps_returns_the_initial_transform():
  w = _outlier_stack(seed=4, b=1)
  best, state = optimize.run(w, SPEC, dataclasses.replace(CFG, steps=0), jax.random.PRNGKey(0))
  np.testing.assert_array_equal(
    np.asarray(best.matrix()), np.broadcast_to(np.eye(32), (1, 2, 32, 32))
  )
  assert int(state.step) == 0


def test_step_function_is_resumable_from_the_state_pytree():
  w = _outlier_stack(seed=5)  # same shape and config as the fixture: no recompile
  step = optimize.make_step(SPEC, CFG)
  s = optimize.init_state(w, SPEC, CFG, jax.random.PRNGKey(0))
  for _ in range(2):
    s = step(s, w)
  leaves, treedef = jax.tree.flatten(s)
  s2 = jax.tree.unflatten(treedef, [np.asarray(x) for x in leaves])  # e.g. a checkpoint
  a, b = step(step(s, w), w), step(step(s2, w), w)
  np.testing.assert_array_equal(np.asarray(a.best_loss), np.asarray(b.best_loss))
  assert int(a.step) == 4


@pytest.mark.parametrize(
  'kwargs, match',
  [
    (dict(optimizer='sgd'), 'optimizer='),
    (dict(schedule='linear'), 'schedule='),
    (dict(learning_rate=0.0), 'learning_rate='),
    (dict(steps=-1), 'steps='),
    (dict(init='hadamard', block_size=48), 'power-of-two'),
    (dict(log_scale_bound=0.0), 'log_scale_bound='),
    (dict(ste='none'), 'ste='),
    (dict(warmup_fraction=1.0), 'warmup_fraction=1.0 must be in'),
    (dict(eval_every=0), 'eval_every='),
    (dict(b1=1.0), 'b1=1.0 must be in'),
    (dict(b2=-0.1), 'b2=-0.1 must be in'),
  ],
)
def test_bad_transform_configs_raise_clear_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    optimize.TransformConfig(**kwargs)


@pytest.mark.parametrize('b1, b2, warmup', [(0.9, 0.999, 0.0), (0.5, 0.95, 0.3)])
def test_optimizer_is_adam_with_the_configs_moments_and_schedule(b1, b2, warmup):
  """``make_optimizer`` against Adam written out in numpy: bias-corrected moments, eps
  1e-8, the learning rate rising linearly from 0 over ``round(warmup * steps)`` steps,
  then cosine-decayed from its peak to 0 over the rest."""
  steps, peak = 10, 3e-2
  cfg = optimize.TransformConfig(
    learning_rate=peak, steps=steps, b1=b1, b2=b2, warmup_fraction=warmup
  )
  grads = np.random.default_rng(0).normal(size=(steps, 7)).astype(np.float32)
  opt = optimize.make_optimizer(cfg)
  p = jnp.zeros(7, jnp.float32)
  state = opt.init(p)
  ref, m, v = np.zeros(7), np.zeros(7), np.zeros(7)
  w = round(warmup * steps)
  for t, g in enumerate(grads):
    updates, state = opt.update(jnp.asarray(g), state, p)
    p = p + updates
    m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
    lr = peak * t / w if t < w else peak * 0.5 * (1 + np.cos(np.pi * (t - w) / (steps - w)))
    ref = ref - lr * (m / (1 - b1 ** (t + 1))) / (np.sqrt(v / (1 - b2 ** (t + 1))) + 1e-8)
    np.testing.assert_allclose(np.asarray(p), ref, rtol=1e-5, atol=1e-7)


def test_a_warm_up_fraction_runs_under_a_short_steps_override():
  """The warm-up scales with ``steps`` and leaves at least one decay step, so a preset
  with a warm-up runs with any ``steps`` override (here round(0.9 * 2) = 2, cut to 1)."""
  cfg = dataclasses.replace(CFG, steps=2, warmup_fraction=0.9)
  _, state = optimize.run(_outlier_stack(), SPEC, cfg, jax.random.PRNGKey(0))
  assert int(state.step) == 2 and np.all(np.isfinite(np.asarray(state.best_loss)))


def test_run_rejects_block_size_not_dividing_d_in_and_bad_ranks():
  with pytest.raises(ValueError, match='does not divide d_in=64'):
    optimize.run(
      jnp.ones((1, 64, 8)), SPEC, dataclasses.replace(CFG, block_size=48), jax.random.PRNGKey(0)
    )
  with pytest.raises(ValueError, match=r'\(B, d_in, d_out\)'):
    optimize.run(jnp.ones((64, 8)), SPEC, CFG, jax.random.PRNGKey(0))


def test_column_subsampling_still_lowers_the_full_actual_loss():
  w = _outlier_stack(seed=6)
  cfg = dataclasses.replace(CFG, columns_per_step=8, eval_every=5, steps=30)
  best, state = optimize.run(w, SPEC, cfg, jax.random.PRNGKey(0))
  actual = optimize.stack_loss(best, w, SPEC, ste=False)
  np.testing.assert_allclose(np.asarray(actual), np.asarray(state.best_loss), rtol=1e-5)
  assert np.all(np.asarray(state.best_loss) < 0.8 * np.asarray(state.rtn_loss))


def test_evaluating_only_the_last_iterate_keeps_the_iterates_and_the_better_end():
  """``eval_every=None`` (or past the last step): the same iterates as evaluating
  every 5 steps, and the kept transform is the init or the last iterate, whichever
  has the lower actual loss (numpy reference of the loss)."""
  w = _outlier_stack(seed=6)
  base = dataclasses.replace(CFG, parameterization='dense', columns_per_step=8, steps=12)
  _, every5 = optimize.run(w, SPEC, dataclasses.replace(base, eval_every=5), jax.random.PRNGKey(0))
  for every in (None, 12):
    cfg = dataclasses.replace(base, eval_every=every)
    assert optimize.make_run_step(SPEC, cfg, 32) is optimize.make_step(SPEC, cfg)
    best, state = optimize.run(w, SPEC, cfg, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(
      np.asarray(state.transform.blocks), np.asarray(every5.transform.blocks)
    )
    m = np.asarray(state.transform.matrix(), np.float64)
    last = _dense_loss_numpy(w, m, np.linalg.inv(m))
    init = np.asarray(proxy.rtn_loss(w, SPEC))  # identity init
    np.testing.assert_allclose(np.asarray(state.best_loss), np.minimum(init, last), rtol=1e-4)
    kept = np.where((last < init)[:, None, None, None], m, np.eye(32))
    np.testing.assert_array_equal(np.asarray(best.matrix()), kept.astype(np.float32))


def test_run_hands_its_steps_to_the_loop_hook(identity_run):
  from cafeq_jax.distributed import mesh as mesh_lib  # pylint: disable=g-import-not-at-top

  w, ref, _ = identity_run  # same shapes and config: no recompile of the step
  calls = []

  def recording_loop(step_fn, state, num_steps, *, args=(), callback=None):
    calls.append((num_steps, [a.shape for a in args]))
    return optimize.plain_loop(step_fn, state, num_steps, args=args, callback=callback)

  got, _ = optimize.run(w, SPEC, CFG, jax.random.PRNGKey(0), loop=recording_loop)
  assert calls == [(CFG.steps, [(2, 1, 64, 32)])]
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # A sharded loop (one-device mesh here; tests/methods/test_scaleout.py: 8 devices).
  mesh = mesh_lib.make_mesh(devices=jax.devices()[:1])
  sharded, _ = optimize.run(
    w, SPEC, CFG, jax.random.PRNGKey(0), loop=functools.partial(mesh_lib.sharded_run, mesh=mesh)
  )
  for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(ref)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_unit_keys_make_the_hadamard_init_independent_of_the_stack():
  w = _outlier_stack(seed=7, b=3)
  keys = jnp.stack([jax.random.PRNGKey(i) for i in range(3)])
  whole = optimize.init_state(w, SPEC, CFG_H, jax.random.PRNGKey(0), unit_keys=keys)
  alone = optimize.init_state(w[1:2], SPEC, CFG_H, jax.random.PRNGKey(0), unit_keys=keys[1:2])
  np.testing.assert_array_equal(
    np.asarray(whole.transform.matrix()[1:2]), np.asarray(alone.transform.matrix())
  )
  base = np.asarray(whole.transform.matrix())
  assert not np.array_equal(base[0], base[1])
  with pytest.raises(ValueError, match='unit_keys has 2 keys for a stack of 3'):
    optimize.init_state(w, SPEC, CFG_H, jax.random.PRNGKey(0), unit_keys=keys[:2])


@pytest.mark.parametrize('param', ['dense', 'lu'])
def test_free_parameterisations_lower_the_actual_loss_below_the_rotation(param):
  w = _outlier_stack(seed=8)
  cfg = dataclasses.replace(CFG, parameterization=param)
  best, state = optimize.run(w, SPEC, cfg, jax.random.PRNGKey(0))
  m, m_inv = (np.asarray(a, np.float64) for a in best.matrix_and_inverse())
  np.testing.assert_allclose(m_inv, np.linalg.inv(m), rtol=1e-3, atol=1e-4)
  actual = _dense_loss_numpy(w, m, m_inv)  # independent of the optimiser's loss code
  np.testing.assert_allclose(actual, np.asarray(state.best_loss), rtol=1e-3)
  np.testing.assert_allclose(np.asarray(state.init_loss), np.asarray(state.rtn_loss), rtol=1e-5)
  assert np.all(actual < 0.6 * np.asarray(state.rtn_loss))
  again, _ = optimize.run(w, SPEC, cfg, jax.random.PRNGKey(0))
  for x, y in zip(jax.tree.leaves(best), jax.tree.leaves(again)):  # deterministic
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_rotation_only_options_are_refused_for_free_blocks():
  with pytest.raises(ValueError, match="parameterization='dense' learns its blocks whole"):
    optimize.TransformConfig(parameterization='dense', right_scales=True)
  with pytest.raises(ValueError, match='expected one of'):
    optimize.TransformConfig(parameterization='qr')


def _anisotropic_sigma(seed, b=2, d=64, k=32):
  """Block-diagonal SPD input second moments with a few dominant channels:
  ``(blocks (b, d // k, k, k), dense (b, d, d))``."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(b, 256, d)) * np.where(np.arange(d) % 9 == 0, 10.0, 1.0)
  full = np.einsum('bni,bnj->bij', x, x) / 256
  blocks = np.stack(
    [[full[i, j * k : (j + 1) * k, j * k : (j + 1) * k] for j in range(d // k)] for i in range(b)]
  )
  dense = np.zeros_like(full)
  for j in range(d // k):
    dense[:, j * k : (j + 1) * k, j * k : (j + 1) * k] = blocks[:, j]
  return blocks, dense


def test_input_weighted_loss_matches_numpy_and_its_optimum_beats_the_frobenius_one():
  w = _outlier_stack(seed=3)
  blocks, dense = _anisotropic_sigma(0)
  cfg = dataclasses.replace(CFG, parameterization='dense')
  best, state = optimize.run(w, SPEC, cfg, jax.random.PRNGKey(0), sigma=blocks)
  m, m_inv = (np.asarray(a, np.float64) for a in best.matrix_and_inverse())
  weighted = _dense_loss_numpy(w, m, m_inv, dense)  # independent of the loss code
  np.testing.assert_allclose(weighted, np.asarray(state.best_loss), rtol=1e-3)
  eye = np.broadcast_to(np.eye(32), (2, 2, 32, 32))
  rtn = _dense_loss_numpy(w, eye, eye, dense)
  np.testing.assert_allclose(np.asarray(state.rtn_loss), rtn, rtol=1e-4)
  assert np.all(weighted < 0.8 * rtn)
  # The Frobenius-trained transform is worse on the weighted objective it ignores.
  frob, _ = optimize.run(w, SPEC, cfg, jax.random.PRNGKey(0))
  fm, fm_inv = (np.asarray(a, np.float64) for a in frob.matrix_and_inverse())
  assert np.all(weighted < _dense_loss_numpy(w, fm, fm_inv, dense))
  again, _ = optimize.run(w, SPEC, cfg, jax.random.PRNGKey(0), sigma=blocks)
  for x, y in zip(jax.tree.leaves(best), jax.tree.leaves(again)):  # deterministic
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_identity_sigma_is_the_frobenius_loss_and_bad_sigma_is_refused():
  w = _outlier_stack(seed=4)
  t = optimize.init_state(w, SPEC, CFG_H, jax.random.PRNGKey(0)).transform
  eye = jnp.broadcast_to(jnp.eye(32), (2, 2, 32, 32))
  np.testing.assert_allclose(
    np.asarray(optimize.stack_loss(t, w, SPEC, ste=False, sigma=eye)),
    np.asarray(optimize.stack_loss(t, w, SPEC, ste=False)),
    rtol=1e-5,
  )
  with pytest.raises(ValueError, match=r'sigma must be \(B=2, nb, k, k\)'):
    optimize.run(w, SPEC, CFG, jax.random.PRNGKey(0), sigma=eye[:, :, :16, :16])
  with pytest.raises(ValueError, match='NaN or inf'):
    optimize.run(w, SPEC, CFG, jax.random.PRNGKey(0), sigma=eye.at[0, 0, 0, 0].set(jnp.nan))


@pytest.mark.parametrize('lr, falls_back', [(1e-2, False), (0.5, True)])
def test_dense_steps_on_the_warm_inverse_follow_the_exact_inverse(lr, falls_back):
  """The dense step's Newton-Schulz inverse (warm-started from the last step) against
  the same step on the Gauss-Jordan inverse (a state without a warm start): same
  trajectory to float32 rounding; Adam steps of 0.5 per entry take the fallback."""
  w = _outlier_stack(seed=9)
  cfg = dataclasses.replace(CFG, parameterization='dense', learning_rate=lr, steps=6)
  step = optimize.make_step(SPEC, cfg)
  warm = optimize.init_state(w, SPEC, cfg, jax.random.PRNGKey(0))
  exact = warm.replace(inverse=None, inverse_fallbacks=None)
  np.testing.assert_allclose(
    np.asarray(warm.inverse), np.linalg.inv(np.asarray(warm.transform.blocks)), atol=1e-6
  )
  for _ in range(cfg.steps):
    before = warm.transform.blocks
    warm, exact = step(warm, w), step(exact, w)
  np.testing.assert_allclose(
    np.asarray(warm.inverse), np.linalg.inv(np.asarray(before, np.float64)), atol=5e-5
  )
  np.testing.assert_allclose(
    np.asarray(warm.transform.blocks), np.asarray(exact.transform.blocks), rtol=1e-4, atol=1e-5
  )
  np.testing.assert_allclose(np.asarray(warm.best_loss), np.asarray(exact.best_loss), rtol=1e-4)
  assert warm.inverse_fallbacks.shape == (w.shape[0],)
  assert bool(np.any(np.asarray(warm.inverse_fallbacks) > 0)) == falls_back


def test_finalize_evaluates_on_the_warm_inverse_and_leaves_the_steps_alone():
  """``make_finalize`` on a dense state mid-run: its loss is the Gauss-Jordan loss of
  the iterate (``stack_loss`` without a warm inverse) to float32 rounding, and the
  state's inverse (the next step's warm start) is what it was."""
  w = _outlier_stack(seed=11)
  cfg = dataclasses.replace(CFG, parameterization='dense', columns_per_step=8, steps=7)
  step = optimize.make_step(SPEC, cfg)
  state = optimize.init_state(w, SPEC, cfg, jax.random.PRNGKey(0))
  state = state.replace(key=optimize._typed_key(state.key))
  for _ in range(cfg.steps):
    state = step(state, w)
  done = optimize.make_finalize(SPEC)(state, w)
  exact = optimize.stack_loss(state.transform, w, SPEC, ste=False)
  np.testing.assert_allclose(np.asarray(done.last_loss), np.asarray(exact), rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(done.inverse), np.asarray(state.inverse))
  np.testing.assert_array_equal(
    np.asarray(step(done, w).transform.blocks), np.asarray(step(state, w).transform.blocks)
  )
