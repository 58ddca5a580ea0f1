"""Metrics against numpy (float64) closed forms."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cafeq_jax.eval import metrics


def _np_log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


@pytest.fixture
def logits():
  rng = np.random.default_rng(0)
  return (3 * rng.standard_normal((2, 5, 7, 11))).astype(np.float32)


def test_token_nll_and_perplexity_match_numpy(logits):
  targets = np.random.default_rng(1).integers(0, 11, logits.shape[:-1])
  nll = np.asarray(metrics.token_nll(logits, targets))
  want = -np.take_along_axis(_np_log_softmax(logits), targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(nll, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(float(metrics.perplexity(nll)), np.exp(want.mean()), rtol=1e-5)


def test_perplexity_of_uniform_logits_is_vocab_size():
  logits = jnp.zeros((3, 4, 50))
  nll = metrics.token_nll(logits, jnp.zeros((3, 4), jnp.int32))
  np.testing.assert_allclose(float(metrics.perplexity(nll)), 50.0, rtol=1e-5)


def test_kl_divergence_matches_numpy(logits):
  q = logits + np.random.default_rng(2).standard_normal(logits.shape).astype(np.float32)
  kl = np.asarray(metrics.kl_divergence(logits, q))
  lp, lq = _np_log_softmax(logits), _np_log_softmax(q)
  want = (np.exp(lp) * (lp - lq)).sum(-1)
  np.testing.assert_allclose(kl, want, rtol=1e-4, atol=1e-6)
  assert (kl > 0).all()
  # Direction: KL(p || q) != KL(q || p) in general.
  assert not np.allclose(np.asarray(metrics.kl_divergence(q, logits)), kl, rtol=1e-3)


def test_kl_is_zero_for_shifted_logits_and_stable_for_huge_values(logits):
  shifted = logits + 1e4  # same distribution; naive exp would overflow
  np.testing.assert_allclose(np.asarray(metrics.kl_divergence(logits, shifted)), 0.0, atol=2e-3)
  big = logits * 1e3  # near one-hot distributions
  kl = np.asarray(metrics.kl_divergence(big, logits))
  lp, lq = _np_log_softmax(big), _np_log_softmax(logits)
  want = (np.exp(lp) * (lp - lq)).sum(-1)
  assert np.isfinite(kl).all()
  np.testing.assert_allclose(kl, want, rtol=1e-4, atol=1e-4)
  nll = np.asarray(metrics.token_nll(big, np.zeros(big.shape[:-1], np.int32)))
  assert np.isfinite(nll).all()


def test_kl_ignores_zero_probability_entries():
  p = jnp.array([[0.0, -jnp.inf, 1.0]])
  q = jnp.array([[0.5, 0.0, 1.0]])
  lp, lq = _np_log_softmax([[0.0, -1e30, 1.0]]), _np_log_softmax(q)
  want = (np.exp(lp) * (lp - lq)).sum(-1)
  got = np.asarray(metrics.kl_divergence(p, q))
  assert np.isfinite(got).all()
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_top1_agreement_matches_argmax(logits):
  q = logits.copy()
  q[0, 0, 0] = -q[0, 0, 0] + 100  # force a specific argmax change at one position
  agree = np.asarray(metrics.top1_agreement(logits, q))
  np.testing.assert_array_equal(agree, logits.argmax(-1) == q.argmax(-1))
  assert agree.mean() < 1.0


def test_shift_targets_pairs_position_t_with_token_t_plus_1():
  tokens = jnp.arange(12).reshape(2, 6)
  logits = jnp.zeros((2, 6, 3))
  lg, tg = metrics.shift_targets(logits, tokens)
  assert lg.shape == (2, 5, 3)
  np.testing.assert_array_equal(np.asarray(tg), np.asarray(tokens)[:, 1:])


def test_metrics_are_jittable(logits):
  f = jax.jit(lambda a, b: (metrics.kl_divergence(a, b), metrics.top1_agreement(a, b)))
  kl, agree = f(logits, logits)
  np.testing.assert_allclose(np.asarray(kl), 0.0, atol=1e-6)
  assert np.asarray(agree).all()
