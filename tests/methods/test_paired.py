"""Tests for cafeq_jax.methods.paired on tiny decoder presets (fp32)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cafeq_jax import quantizer as qz
from cafeq_jax import recipes
from cafeq_jax.core import pairs as pairs_lib
from cafeq_jax.core import rounding
from cafeq_jax.methods import paired
from cafeq_jax.models import config as model_config_lib
from cafeq_jax.models import decoder
from cafeq_jax.models import linears

SPEC = qz.QuantSpec(bits=3, group_size=32)
ALL = recipes.LINEAR_NAMES
# The stages of a pairs recipe, as methods.quantize hands them to methods.paired.
RECIPE = recipes.get(
  'cafeq-pairs-ar',
  spec=SPEC,
  pairs__loss='product',
  pairs__steps=20,
  pairs__learning_rate=1e-2,
  rounding__rounds=2,
)
PAIRS, ADAPTIVE = RECIPE.pairs, RECIPE.rounding


def _model(name):
  cfg = model_config_lib.get_config(name)
  params = decoder.init_params(cfg, jax.random.PRNGKey(0))
  # Make the weights far from isotropic so transforms matter (and folds are not ~I).
  rng = np.random.default_rng(0)
  mats = {
    n: np.asarray(w) * (1 + 3 * rng.random(size=(1, 1, w.shape[-1])))
    for n, w in linears.get_linears(params, cfg).items()
  }
  return cfg, linears.set_linears(
    params, cfg, {n: jnp.asarray(w, jnp.float32) for n, w in mats.items()}
  )


def _random_transforms(cfg, rng):
  L, K, hd, F = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_dim
  return {
    'vo': jnp.asarray(np.eye(hd) + 0.3 * rng.normal(size=(L, K, hd, hd)), jnp.float32),
    'qk': (
      jnp.asarray(0.5 * rng.normal(size=(L, K, hd // 2)), jnp.float32),
      jnp.asarray(rng.uniform(-3, 3, size=(L, K, hd // 2)), jnp.float32),
    ),
    'updown': jnp.asarray(0.5 * rng.normal(size=(L, F)), jnp.float32),
  }


@pytest.mark.parametrize('name', ['tiny_llama', 'tiny_gemma2'])
def test_random_pair_transforms_leave_model_logits_unchanged(name):
  cfg, params = _model(name)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, cfg.vocab_size)
  want = decoder.forward(params, cfg, tokens)
  mats = linears.get_linears(params, cfg)
  geom = paired._geometry(cfg)  # pylint: disable=protected-access
  for kind, p in _random_transforms(cfg, np.random.default_rng(2)).items():
    na, nb = paired.PAIR_MATRICES[kind]
    a2, b2 = pairs_lib.fold(kind, geom, mats[na], mats[nb], p)
    assert float(jnp.abs(a2 - mats[na]).max()) > 1e-2
    mats[na], mats[nb] = a2, b2
  got = decoder.forward(linears.set_linears(params, cfg, mats), cfg, tokens)
  scale = float(jnp.abs(want).max())
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-4 * scale)


def test_apply_pair_transforms_is_exact_and_reduces_product_error():
  cfg, params = _model('tiny_llama')
  tokens = jax.random.randint(jax.random.PRNGKey(1), (1, 10), 0, cfg.vocab_size)
  new, report = paired.apply_pair_transforms(params, cfg, PAIRS, SPEC, ALL)
  want, got = decoder.forward(params, cfg, tokens), decoder.forward(new, cfg, tokens)
  np.testing.assert_allclose(
    np.asarray(got), np.asarray(want), atol=2e-4 * float(jnp.abs(want).max())
  )
  assert set(report) == {'vo', 'qk', 'updown'}
  for kind, r in report.items():
    assert len(r['before']) == cfg.num_layers
    assert all(a <= b for a, b in zip(r['after'], r['before'])), (kind, r)
  assert sum(r['total_after'] for r in report.values()) < 0.97 * sum(
    r['total_before'] for r in report.values()
  )


def test_apply_pair_transforms_skips_pairs_of_unquantized_matrices():
  cfg, params = _model('tiny_llama')
  # PAIRS as above: its compiled optimisation steps are reused.
  new, report = paired.apply_pair_transforms(params, cfg, PAIRS, SPEC, ('gate', 'up', 'down'))
  assert set(report) == {'updown'}
  # The attention matrices are left exactly as they were.
  for name, w in linears.get_linears(params, cfg).items():
    if name in ('q', 'k', 'v', 'o', 'gate'):
      np.testing.assert_array_equal(
        np.asarray(linears.get_linears(new, cfg)[name]), np.asarray(w), err_msg=name
      )
  _, report = paired.apply_pair_transforms(params, cfg, PAIRS, SPEC, ('q', 'k', 'v'))
  assert set(report) == {'vo', 'qk'}  # a pair is transformed when either matrix is


def test_adaptive_round_pairs_beats_rtn_per_layer():
  cfg, params = _model('tiny_gemma2')
  out, hist = paired.adaptive_round_pairs(params, cfg, ADAPTIVE, SPEC, ALL, return_history=True)
  assert hist.shape[0] == cfg.num_layers and hist.shape[1] > ADAPTIVE.rounds
  assert set(out) == {(l, n) for l in range(cfg.num_layers) for n in ('v', 'o')}
  mats = linears.get_linears(params, cfg)
  for l in range(cfg.num_layers):
    v, o = mats['v'][l], mats['o'][l]
    assert out[(l, 'v')].codes.shape == v.shape and out[(l, 'o')].codes.shape == o.shape
    err = rounding.pair_product_error(
      v,
      o,
      qz.dequantize(out[(l, 'v')]),
      qz.dequantize(out[(l, 'o')]),
      n1=cfg.num_kv_heads,
      n2=cfg.num_heads,
    )
    rtn = rounding.pair_product_error(
      v,
      o,
      qz.quant_dequant(v, SPEC),
      qz.quant_dequant(o, SPEC),
      n1=cfg.num_kv_heads,
      n2=cfg.num_heads,
    )
    np.testing.assert_allclose(float(rtn), hist[l, 0], rtol=1e-4)
    np.testing.assert_allclose(float(err), hist[l].min(), rtol=1e-4)  # the best candidate
    assert float(err) < 0.95 * float(rtn)


def test_adaptive_round_pairs_needs_both_v_and_o():
  cfg, params = _model('tiny_llama')
  assert paired.adaptive_round_pairs(params, cfg, ADAPTIVE, SPEC, ('q',)) == {}
  assert paired.adaptive_round_pairs(params, cfg, ADAPTIVE, SPEC, ('v', 'k')) == {}
  assert paired.adaptive_round_pairs(params, cfg, ADAPTIVE, SPEC, ('q',), return_history=True) == (
    {},
    None,
  )


def test_quantize_reports_the_kept_product_error_of_every_pair():
  from cafeq_jax import methods  # pylint: disable=g-import-not-at-top

  cfg, params = _model('tiny_llama')
  qparams, report = methods.quantize(params, cfg, RECIPE, jax.random.PRNGKey(0))
  pr = report.extra['pair_rounding']
  assert len(pr['rtn_error']) == len(pr['best_error']) == cfg.num_layers
  assert all(b <= r for b, r in zip(pr['best_error'], pr['rtn_error']))  # never worse than RTN
  # The stored v/o give the reported error (recomputed from the quantized leaves).
  folded, _ = paired.apply_pair_transforms(params, cfg, PAIRS, SPEC, ALL)
  mats = linears.get_linears(folded, cfg)
  deq = linears.get_linears(linears.dequantize_params(qparams, cfg), cfg)
  for l in range(cfg.num_layers):
    err = rounding.pair_product_error(
      mats['v'][l],
      mats['o'][l],
      deq['v'][l],
      deq['o'][l],
      n1=cfg.num_kv_heads,
      n2=cfg.num_heads,
    )
    np.testing.assert_allclose(float(err), pr['best_error'][l], rtol=1e-4)
