"""evaluate(): brute-force numpy reference on a bigram model, and the real decoder."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cafeq_jax.eval.evaluate import evaluate
from cafeq_jax.eval.evaluate import format_results
from cafeq_jax.eval.evaluate import model_apply_fn

V = 13


def _bigram_apply(params, tokens):
  """logits[b, t] = w[tokens[b, t]]: (B, T) -> (B, T, V)."""
  return params['w'][tokens]


def _np_reference(w_fp, w_q, tokens):
  """Brute force, float64: (ppl_q, kld, top1) over all next-token predictions."""

  def lsm(x):
    x = np.asarray(x, np.float64)
    return (
      x
      - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))
      - x.max(-1, keepdims=True)
    )

  nll, kl, agree = [], [], []
  for row in tokens:
    for t in range(len(row) - 1):
      lp, lq = lsm(w_fp[row[t]]), lsm(w_q[row[t]])
      nll.append(-lq[row[t + 1]])
      kl.append((np.exp(lp) * (lp - lq)).sum())
      agree.append(lp.argmax() == lq.argmax())
  return np.exp(np.mean(nll)), np.mean(kl), np.mean(agree)


@pytest.fixture
def setup():
  rng = np.random.default_rng(0)
  w = (2 * rng.standard_normal((V, V))).astype(np.float32)
  noisy = w + 0.7 * rng.standard_normal((V, V)).astype(np.float32)
  tokens = rng.integers(0, V, (5, 9)).astype(np.int32)
  return w, noisy, tokens


@pytest.mark.parametrize('batch_size', [1, 2, 5])
def test_evaluate_matches_brute_force(setup, batch_size):
  w, noisy, tokens = setup
  res = evaluate(
    _bigram_apply,
    {'w': jnp.asarray(w)},
    tokens,
    {'noisy': {'w': jnp.asarray(noisy)}, 'same': {'w': jnp.asarray(w)}},
    batch_size=batch_size,
    progress=False,
  )
  assert list(res) == ['fp', 'noisy', 'same']
  ppl_fp, _, _ = _np_reference(w, w, tokens)
  ppl_q, kld, top1 = _np_reference(w, noisy, tokens)
  assert kld > 0.01 and top1 < 1.0  # the candidate really differs
  np.testing.assert_allclose(res['fp']['ppl'], ppl_fp, rtol=1e-5)
  np.testing.assert_allclose(res['noisy']['ppl'], ppl_q, rtol=1e-5)
  np.testing.assert_allclose(res['noisy']['kld'], kld, rtol=1e-4)
  np.testing.assert_allclose(res['noisy']['top1'], top1)
  np.testing.assert_allclose(res['same']['kld'], 0.0, atol=1e-6)
  assert res['same']['top1'] == 1.0
  np.testing.assert_allclose(res['same']['ppl'], res['fp']['ppl'], rtol=1e-6)
  assert res['fp']['tokens'] == 5 * 8
  assert all(r['seconds'] > 0 and r['compile_seconds'] > 0 for r in res.values())
  assert 'noisy' in format_results(res)


def test_evaluate_uses_per_method_apply_fns(setup):
  w, _, tokens = setup
  doubled = lambda p, x: 2.0 * _bigram_apply(p, x)  # sharper distribution, same argmax
  res = evaluate(
    _bigram_apply,
    {'w': jnp.asarray(w)},
    tokens,
    {'sharp': {'w': jnp.asarray(w)}},
    apply_fns={'sharp': doubled},
    progress=False,
  )
  ppl, kld, top1 = _np_reference(w, 2 * w, tokens)
  np.testing.assert_allclose(res['sharp']['ppl'], ppl, rtol=1e-5)
  np.testing.assert_allclose(res['sharp']['kld'], kld, rtol=1e-4)
  assert res['sharp']['top1'] == top1 == 1.0


def test_evaluate_rejects_bad_inputs(setup):
  w, _, tokens = setup
  p = {'w': jnp.asarray(w)}
  with pytest.raises(ValueError, match=r'\(N, T\)'):
    evaluate(_bigram_apply, p, tokens[0], progress=False)
  with pytest.raises(ValueError, match=r'\(N, T\)'):
    evaluate(_bigram_apply, p, tokens[:, :1], progress=False)
  with pytest.raises(ValueError, match='batch_size=0'):
    evaluate(_bigram_apply, p, tokens, batch_size=0, progress=False)
  with pytest.raises(ValueError, match="'fp' collides"):
    evaluate(_bigram_apply, p, tokens, {'fp': p}, progress=False)
  with pytest.raises(ValueError, match=r"\['typo'\]"):
    evaluate(_bigram_apply, p, tokens, {'a': p}, apply_fns={'typo': _bigram_apply}, progress=False)


def test_evaluate_runs_the_decoder_and_matches_direct_forward():
  from cafeq_jax.models import config as config_lib  # pylint: disable=g-import-not-at-top
  from cafeq_jax.models import decoder  # pylint: disable=g-import-not-at-top

  cfg = config_lib.PRESETS['tiny_llama']
  # Random params from the decoder's shapes (cheaper than an eager init on CPU).
  shapes = jax.eval_shape(decoder.init_params, cfg, jax.random.key(0))
  rng = np.random.default_rng(0)
  params = jax.tree.map(
    lambda s: jnp.asarray(0.2 * rng.standard_normal(s.shape), jnp.float32), shapes
  )
  tokens = np.asarray(jax.random.randint(jax.random.key(1), (3, 10), 0, cfg.vocab_size))
  res = evaluate(model_apply_fn(cfg), params, tokens, batch_size=3, progress=False)
  logits = np.asarray(decoder.forward(params, cfg, jnp.asarray(tokens)), np.float64)[:, :-1]
  lp = (
    logits
    - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
    - logits.max(-1, keepdims=True)
  )
  nll = -np.take_along_axis(lp, tokens[:, 1:, None], -1).mean()
  np.testing.assert_allclose(res['fp']['ppl'], np.exp(nll), rtol=1e-4)
