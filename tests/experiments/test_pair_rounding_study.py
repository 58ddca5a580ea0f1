"""The pair adaptive rounding study: its weighted product error against numpy, and a
tiny run end to end."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

import cafeq_jax
from cafeq_jax import eval as eval_lib
from cafeq_jax import models
from cafeq_jax.eval import data as eval_data
from cafeq_jax.models import linears
from experiments import pair_rounding_study
from experiments import quantize_lib
from experiments import transform_study
from experiments.configs import pair_rounding_study as study_config


def _tiny_config(out, methods: str, swaps: str = ''):
  """The study on the tiny Llama: w3 g32, pydoc, 2 x 16 tokens (and self-generated)."""
  c = study_config.get_config()
  c.model = 'tiny_llama'
  c.methods = methods
  c.swaps = swaps
  c.column = 'w3g32'
  c.texts = 'pydoc'
  c.eval_num_seqs, c.eval_seq_len = 2, 16
  c.selfgen_num_seqs, c.selfgen_seq_len = 2, 16
  c.output_dir = str(out)
  return c


def _numpy_weighted_error(w1, w2, w1_hat, w2_hat, sigma, n1, n2):
  """``Σ_h tr(E_hᵀ Σ E_h)`` with every product formed (float64): head ``h`` pairs
  column block ``h // (n2 / n1)`` of ``W1`` with row block ``h`` of ``W2`` (GQA)."""
  b = w1.shape[1] // n1
  total = 0.0
  for h in range(n2):
    k = h // (n2 // n1)
    cols, rows = slice(k * b, (k + 1) * b), slice(h * b, (h + 1) * b)
    e = w1[:, cols] @ w2[rows] - w1_hat[:, cols] @ w2_hat[rows]
    total += np.trace(e.T @ sigma @ e)
  return total


@pytest.mark.parametrize('n1, n2', [(1, 1), (2, 4)])
def test_weighted_pair_error_is_the_sigma_weighted_error_of_every_head_product(n1, n2):
  rng = np.random.default_rng(0)
  d, b, c = 12, 4, 10
  w1, w1_hat = rng.normal(size=(2, d, n1 * b))
  w2, w2_hat = rng.normal(size=(2, n2 * b, c))
  w1_hat, w2_hat = w1 + 0.1 * w1_hat, w2 + 0.1 * w2_hat
  x = rng.normal(size=(50, d)) * np.linspace(0.2, 3.0, d)  # anisotropic inputs
  sigma = x.T @ x / len(x)
  args = [a.astype(np.float32) for a in (w1, w2, w1_hat, w2_hat)]
  c_t = np.linalg.cholesky(sigma).T.astype(np.float32)
  got = pair_rounding_study.weighted_pair_error(*args, c_t, n1=n1, n2=n2)
  want = _numpy_weighted_error(w1, w2, w1_hat, w2_hat, sigma, n1, n2)
  np.testing.assert_allclose(float(got), want, rtol=1e-4)
  plain = pair_rounding_study.weighted_pair_error(*args, None, n1=n1, n2=n2)
  want_plain = _numpy_weighted_error(w1, w2, w1_hat, w2_hat, np.eye(d), n1, n2)
  np.testing.assert_allclose(float(plain), want_plain, rtol=1e-4)


def test_tiny_study_adaptive_rounding_never_loses_to_its_start_on_its_objective(tmp_path):
  results = pair_rounding_study.run(_tiny_config(tmp_path, 'rtn,cafeq-pairs,cafeq-pairs-ar'))
  errors = results['per_layer']
  assert list(errors) == ['rtn', 'cafeq-pairs', 'cafeq-pairs-ar']
  assert all(set(e) == {'frobenius', 'pydoc', pair_rounding_study.SELF} for e in errors.values())
  # The same folded pairs (identity init: deterministic), rounded by RTN or adaptively;
  # the adaptive one keeps the best candidate, RTN among them: never above it.
  ar, start = errors['cafeq-pairs-ar']['frobenius'], errors['cafeq-pairs']['frobenius']
  assert len(ar) == 2 and all(a <= s for a, s in zip(ar, start))
  assert sum(ar) < sum(start)
  assert all(x > 0 for e in errors.values() for w in e.values() for x in w)
  assert json.load(open(os.path.join(tmp_path, 'results.json')))['per_layer'] == errors
  sub = results['sublayer_per_layer']
  assert list(sub) == list(errors) and set(sub['rtn']) == {'vo', 'qk', 'updown'}
  texts = ['pydoc', pair_rounding_study.SELF]
  assert all(list(by_text) == texts for m in sub.values() for by_text in m.values())
  assert all(
    len(e) == 2 and min(e) > 0 for m in sub.values() for k in m.values() for e in k.values()
  )
  # cafeq-pairs-ar differs from cafeq-pairs in the v/o codes only.
  for kind in ('qk', 'updown'):
    assert sub['cafeq-pairs-ar'][kind] == sub['cafeq-pairs'][kind]
  assert json.load(open(os.path.join(tmp_path, 'results.json')))['sublayer_per_layer'] == sub
  table = open(os.path.join(tmp_path, 'table.md')).read()
  assert '| rtn | 1.000 |' in table and 'Σ pydoc: / rtn' in table
  assert '| rtn |' + ' 1.000, 1.000 |' * 6 + ' 0, 0 of 2 |' * 3 in table
  assert 'vo: attention output / rtn' in table and 'updown: MLP output / rtn' in table


def test_unknown_method_is_refused_before_the_model_loads(tmp_path):
  c = study_config.get_config()
  c.methods = 'rtn,cafeq-nope'
  c.model = 'no-such-model'
  c.output_dir = str(tmp_path)
  with pytest.raises(ValueError, match="variant 'cafeq-nope' is unknown"):
    pair_rounding_study.run(c)


def _np_llama_sublayers(layer, cfg, x, mats):
  """A Llama block in float64 numpy: ``(x + attention(x), mid + mlp(mid))`` for
  ``x`` ``(B, S, D)`` and the seven ``(d_in, d_out)`` matrices ``mats``."""
  H, K, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  m = {n: np.asarray(w, np.float64) for n, w in mats.items()}

  def rms(a, scale):
    return a / np.sqrt(np.mean(a * a, -1, keepdims=True) + cfg.norm_eps) * np.asarray(scale)

  def rope(a):  # (B, S, N, hd), half-split pairs (i, i + hd/2)
    inv = 1.0 / cfg.rope_base ** (np.arange(0, hd, 2) / hd)
    ang = np.arange(a.shape[1])[:, None] * inv  # (S, hd/2)
    cos, sin = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]
    a1, a2 = a[..., : hd // 2], a[..., hd // 2 :]
    return np.concatenate([a1 * cos - a2 * sin, a2 * cos + a1 * sin], -1)

  B, S, _ = x.shape
  h = rms(x, layer['pre_attention_norm']['scale'])
  q = rope((h @ m['q']).reshape(B, S, H, hd)) * cfg.query_scale
  k = rope((h @ m['k']).reshape(B, S, K, hd))
  v = (h @ m['v']).reshape(B, S, K, hd)
  kv_head = np.arange(H) // (H // K)
  logits = np.einsum('bshd,bthd->bhst', q, k[:, :, kv_head])
  logits = np.where(np.tril(np.ones((S, S), bool)), logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  att = np.einsum('bhst,bthd->bshd', probs, v[:, :, kv_head]).reshape(B, S, H * hd)
  mid = x + att @ m['o']
  g = rms(mid, layer['pre_ffw_norm']['scale'])
  gate = g @ m['gate']
  return mid, mid + (gate / (1 + np.exp(-gate)) * (g @ m['up'])) @ m['down']


def test_sublayer_errors_match_a_numpy_llama_block_on_the_fp_hidden_states():
  cfg = models.PRESETS['tiny_llama']
  params = models.init_params(cfg, jax.random.PRNGKey(0))
  fp = {n: np.asarray(w, np.float64) for n, w in linears.get_linears(params, cfg).items()}
  rng = np.random.default_rng(0)
  noisy = {n: (w + 0.3 * w.std() * rng.normal(size=w.shape)) for n, w in fp.items()}
  tokens = rng.integers(0, cfg.vocab_size, size=(3, 12))
  effective = {'fp': fp, 'noisy': {n: w.astype(np.float32) for n, w in noisy.items()}}
  got = pair_rounding_study.sublayer_errors(params, cfg, tokens, effective, batch_size=2)

  x = np.asarray(params['embedder']['input_embedding'], np.float64)[tokens]
  for l in range(cfg.num_layers):
    layer = jax.tree.map(np.asarray, params[f'layer_{l}'])
    fp_l = {n: w[l] for n, w in fp.items()}
    mid, y = _np_llama_sublayers(layer, cfg, x, fp_l)
    for kind, names in (('vo', ('v', 'o')), ('qk', ('q', 'k')), ('updown', ('up', 'down'))):
      mats = {**fp_l, **{n: noisy[n][l] for n in names}}
      q_mid, q_y = _np_llama_sublayers(layer, cfg, x, mats)
      # Attention pairs: the attention's output; up/down: the MLP's, on the fp mid state
      # (q_mid == mid there, as the attention's matrices are fp).
      err = np.sum((q_y - y) ** 2) if kind == 'updown' else np.sum((q_mid - mid) ** 2)
      want = err / tokens.size
      assert got['noisy'][kind][l] == pytest.approx(want, rel=2e-4), (kind, l)
      assert got['fp'][kind][l] < 1e-6 * want  # the fp weights give no error
    x = y


def test_swaps_assemble_the_one_kind_recipes_model_and_locate_by_layers(tmp_path):
  """Swapping cafeq-pairs' v/o into RTN's model in every layer gives the pairs-vo
  recipe's quantized model (same perplexity, quantized through its own pipeline)."""
  c = _tiny_config(
    tmp_path, 'rtn,cafeq-pairs', 'cafeq-pairs:vo:0-1,cafeq-pairs:vo:1,cafeq-pairs:updown:0+1'
  )
  swaps = pair_rounding_study.run(c)['swaps']
  assert list(swaps) == ['rtn', *c.swaps.split(',')]

  model = quantize_lib.load_model('tiny_llama', 0)
  toks = eval_lib.make_windows(model.encode(eval_data.load_named_text('pydoc')), 2, 16)
  spec = quantize_lib.parse_column('w3g32')
  candidates = {
    name: cafeq_jax.quantize(
      model.params, model.config, transform_study.recipe_for(name, spec), jax.random.PRNGKey(0)
    )[0]
    for name in ('rtn', 'pairs-vo', 'pairs-updown')
  }
  apply_fn = eval_lib.model_apply_fn(model.config)
  want = eval_lib.evaluate(apply_fn, model.params, toks, candidates, progress=False)
  assert swaps['rtn']['ppl_pydoc'] == pytest.approx(want['rtn']['ppl'], rel=1e-5)
  assert swaps['cafeq-pairs:vo:0-1']['ppl_pydoc'] == pytest.approx(
    want['pairs-vo']['ppl'], rel=1e-5
  )
  assert swaps['cafeq-pairs:updown:0+1']['ppl_pydoc'] == pytest.approx(
    want['pairs-updown']['ppl'], rel=1e-5
  )
  one = swaps['cafeq-pairs:vo:1']['ppl_pydoc']
  assert one not in (swaps['rtn']['ppl_pydoc'], swaps['cafeq-pairs:vo:0-1']['ppl_pydoc'])
  assert '| cafeq-pairs:vo:1 |' in open(os.path.join(tmp_path, 'table.md')).read()


@pytest.mark.parametrize(
  'swap, match',
  [
    ('cafeq-pairs:vo', 'must be <method>:<kind>:<layers>'),
    ('cafeq-pairs:xy:0', "kind='xy' is not supported"),
    ('cafeq-pairs:vo:a-b', 'must be like 0-23\\+27'),
    ('cafeq-pairs:vo:3-1', 'empty or negative'),
    ('cafeq-single:vo:0', "method 'cafeq-single' is not one of"),
  ],
)
def test_bad_swaps_are_refused_before_the_model_loads(tmp_path, swap, match):
  c = study_config.get_config()
  c.methods = 'rtn,cafeq-pairs'
  c.swaps = swap
  c.model = 'no-such-model'
  c.output_dir = str(tmp_path)
  with pytest.raises(ValueError, match=match):
    pair_rounding_study.run(c)


def test_a_swap_past_the_last_layer_is_refused_before_quantizing(tmp_path):
  c = _tiny_config(tmp_path, 'rtn,cafeq-pairs', 'cafeq-pairs:vo:0-2')
  with pytest.raises(ValueError, match='the model has layers 0-1'):
    pair_rounding_study.run(c)
