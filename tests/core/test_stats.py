"""Tests of cafeq_jax.core.stats (numpy references) and the model-level adapter."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cafeq_jax.core import stats


def _rng(seed=0):
  return np.random.default_rng(seed)


def test_second_moment_matches_numpy_mean_outer_product():
  x = _rng().normal(size=(3, 5, 4)).astype(np.float32)
  ref = np.einsum('ni,nj->ij', x.reshape(-1, 4), x.reshape(-1, 4)) / 15
  np.testing.assert_allclose(stats.second_moment(x), ref, rtol=1e-5, atol=1e-6)


def test_diagonal_blocks_are_the_trace_normalised_damped_blocks():
  x = _rng(3).normal(size=(2, 50, 12))
  h = np.einsum('bni,bnj->bij', x, x)
  out = np.asarray(stats.diagonal_blocks(jnp.asarray(h), 4, damp=0.1))
  assert out.shape == (2, 3, 4, 4)
  for b in range(2):
    ref = h[b] * 12 / np.trace(h[b]) + 0.1 * np.eye(12)
    for j in range(3):
      np.testing.assert_allclose(out[b, j], ref[4 * j : 4 * j + 4, 4 * j : 4 * j + 4], rtol=1e-5)
  assert np.asarray(stats.diagonal_blocks(jnp.asarray(h[0]), 6)).shape == (2, 6, 6)
  with pytest.raises(ValueError, match='block_size=5 must divide d=12'):
    stats.diagonal_blocks(jnp.asarray(h), 5)


def test_second_moment_rejects_empty_input():
  with pytest.raises(ValueError, match='no samples'):
    stats.second_moment(np.zeros((0, 3), np.float32))


def test_top_channel_mass_is_k_over_d_for_identity_and_one_for_spike():
  assert float(stats.top_channel_mass(jnp.eye(8), 2)) == pytest.approx(0.25)
  h = np.diag([100.0, 0, 0, 0]).astype(np.float32)
  assert float(stats.top_channel_mass(h, 1)) == pytest.approx(1.0)
  with pytest.raises(ValueError, match='k=9'):
    stats.top_channel_mass(jnp.eye(8), 9)


def test_effective_rank_is_d_for_identity_and_one_for_rank_one():
  assert float(stats.effective_rank(3.0 * jnp.eye(6))) == pytest.approx(6.0)
  v = _rng(1).normal(size=(6, 1)).astype(np.float32)
  assert float(stats.effective_rank(v @ v.T)) == pytest.approx(1.0, rel=1e-5)


def test_weighted_loss_equals_activation_error_norm():
  r = _rng(2)
  x = r.normal(size=(50, 6)).astype(np.float32)
  w, wh = r.normal(size=(2, 6, 3)).astype(np.float32)
  ref = np.sum((x @ w - x @ wh) ** 2)
  got = stats.weighted_loss(w, wh, x.T @ x)
  np.testing.assert_allclose(got, ref, rtol=1e-4)


def test_diag_from_scale_gives_second_moment_of_scaled_isotropic_input():
  g = np.array([0.5, 2.0, -1.0], np.float32)
  np.testing.assert_allclose(stats.diag_from_scale(g), np.diag(g**2))
  np.testing.assert_allclose(stats.diag_from_scale(g, plus_one=True), np.diag((1 + g) ** 2))


def test_propagate_matches_second_moment_of_projected_samples():
  r = _rng(3)
  x = r.normal(size=(400, 5)).astype(np.float32)
  w = r.normal(size=(5, 3)).astype(np.float32)
  h = stats.second_moment(x)
  np.testing.assert_allclose(
    stats.propagate(h, w), stats.second_moment(x @ w), rtol=1e-4, atol=1e-5
  )


def test_repeat_kv_blocks_puts_group_blocks_on_query_heads():
  r = _rng(4)
  k, hd, heads = 2, 3, 4
  a = r.normal(size=(k * hd, k * hd)).astype(np.float32)
  h = a @ a.T
  out = np.asarray(stats.repeat_kv_blocks(h, heads, k, hd))
  assert out.shape == (heads * hd, heads * hd)
  for i in range(heads):
    j = i // (heads // k)
    blk = out[i * hd : (i + 1) * hd, i * hd : (i + 1) * hd]
    np.testing.assert_allclose(blk, h[j * hd : (j + 1) * hd, j * hd : (j + 1) * hd])
  off = out.copy()
  for i in range(heads):
    off[i * hd : (i + 1) * hd, i * hd : (i + 1) * hd] = 0
  assert np.all(off == 0)
  with pytest.raises(ValueError, match='num_heads=3'):
    stats.repeat_kv_blocks(h, 3, k, hd)


def test_shrink_interpolates_between_normalised_h_and_identity():
  h = np.diag([3.0, 1.0]).astype(np.float32)
  np.testing.assert_allclose(stats.shrink(h, 1.0), np.eye(2))
  np.testing.assert_allclose(stats.shrink(h, 0.0), np.diag([1.5, 0.5]))
  with pytest.raises(ValueError, match='alpha=1.5'):
    stats.shrink(h, 1.5)


def test_proxy_mismatch_flags_uniform_error_on_a_heavy_channel():
  # A spike channel: error on it costs 100x. RTN-like error avoids it, a
  # rotation-like error (same Frobenius norm) spreads onto it.
  h = np.diag([100.0, 1.0, 1.0, 1.0]).astype(np.float32)
  w = np.zeros((4, 1), np.float32)
  e_avoid = np.array([[0.0], [1.0], [1.0], [1.0]], np.float32)
  e_spread = np.full((4, 1), np.sqrt(0.75), np.float32)
  assert np.sum(e_avoid**2) == pytest.approx(np.sum(e_spread**2))
  assert float(stats.proxy_mismatch(w, -e_spread, -e_avoid, h)) > 10


# ---------------------------------------------------------------------------------
# Model-level adapter on a tiny random model.


@pytest.fixture(scope='module')
def tiny():
  from cafeq_jax.models import PRESETS
  from cafeq_jax.models import init_params

  name = min(PRESETS, key=lambda n: PRESETS[n].embed_dim * PRESETS[n].num_layers)
  cfg = PRESETS[name]
  return init_params(cfg, jax.random.PRNGKey(0)), cfg


def test_activation_hessians_match_captured_inputs_of_first_layer(tiny):
  from cafeq_jax.methods import stats_adapter
  from cafeq_jax.models import decoder

  params, cfg = tiny
  toks = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (2, 8), 0, cfg.vocab_size))
  hs = stats_adapter.activation_hessians(params, cfg, toks, batch_size=1)
  x = decoder.embed_tokens(params['embedder']['input_embedding'], jnp.asarray(toks), cfg)
  xn = decoder.Block(cfg, cfg.attention_types[0]).apply(
    {'params': params['layer_0']}, x, method=decoder.Block.attention_input
  )
  ref = stats.second_moment(xn)
  np.testing.assert_allclose(hs['q'][0], ref, rtol=1e-4, atol=1e-6)
  # The normed embedding, in numpy: x / rms(x) * g (Llama) or * (1 + g) (Gemma).
  e = np.asarray(params['embedder']['input_embedding'], np.float64)[toks]
  e = e * (np.sqrt(cfg.embed_dim) if cfg.scale_embeddings else 1.0)
  g = np.asarray(params['layer_0']['pre_attention_norm']['scale'], np.float64)
  xn_np = (
    e
    / np.sqrt(np.mean(e * e, -1, keepdims=True) + cfg.norm_eps)
    * (1 + g if cfg.norm_scale_plus_one else g)
  )
  xn_np = xn_np.reshape(-1, cfg.embed_dim)
  np.testing.assert_allclose(hs['k'][0], xn_np.T @ xn_np / xn_np.shape[0], rtol=1e-4, atol=1e-6)
  assert hs['o'].shape == (
    cfg.num_layers,
    cfg.num_heads * cfg.head_dim,
    cfg.num_heads * cfg.head_dim,
  )
  assert hs['down'].shape == (cfg.num_layers, cfg.hidden_dim, cfg.hidden_dim)


def test_selfgen_hessians_are_deterministic_given_the_key(tiny):
  from cafeq_jax import recipes
  from cafeq_jax.methods import selfgen
  from cafeq_jax.methods import stats_adapter

  params, cfg = tiny
  stage = recipes.SelfGenerated(num_seqs=2, seq_len=6)
  kw = dict(stage=stage, key=jax.random.PRNGKey(3), matrices=('q', 'down'))
  h1, t1 = stats_adapter.selfgen_hessians(params, cfg, return_tokens=True, **kw)
  h2, t2 = stats_adapter.selfgen_hessians(params, cfg, return_tokens=True, **kw)
  assert t1.shape == (2, 6) and np.all(t1[:, 0] == 0)
  np.testing.assert_array_equal(t1, t2)
  np.testing.assert_array_equal(h1['down'], h2['down'])
  # They are the statistics of the sampled tokens, which come from the key.
  np.testing.assert_array_equal(
    t1, selfgen.sample_tokens(params, cfg, stage, jax.random.PRNGKey(3))
  )
  np.testing.assert_allclose(
    h1['q'],
    stats_adapter.activation_hessians(params, cfg, t1, matrices=('q',))['q'],
    rtol=1e-6,
    atol=1e-7,
  )
  _, t3 = stats_adapter.selfgen_hessians(
    params, cfg, return_tokens=True, **{**kw, 'key': jax.random.PRNGKey(4)}
  )
  assert not np.array_equal(t1, t3)
  with pytest.raises(ValueError, match='temperature'):
    recipes.SelfGenerated(num_seqs=1, seq_len=4, temperature=0.0)
  with pytest.raises(ValueError, match=r'start_id=128; expected an id in \[0, 128\)'):
    selfgen.sample_tokens(
      params,
      cfg,
      recipes.SelfGenerated(num_seqs=1, seq_len=4, start_id=cfg.vocab_size),
      jax.random.PRNGKey(0),
    )


def test_quantize_with_identity_hessians_equals_rtn(tiny):
  from cafeq_jax import quantizer as qz
  from cafeq_jax.methods import stats_adapter
  from cafeq_jax.models import linears

  params, cfg = tiny
  spec = qz.QuantSpec(bits=3, group_size=32, group_fallback=True)
  mats = linears.get_linears(params, cfg)
  eye = {
    n: jnp.broadcast_to(jnp.eye(w.shape[-2]), (w.shape[0],) + (w.shape[-2],) * 2)
    for n, w in mats.items()
  }
  _, qa, _ = stats_adapter.quantize_with_hessians(params, cfg, spec, eye, matrices=('q', 'down'))
  for n in ('q', 'down'):
    ref = qz.quantize(jnp.asarray(mats[n][0], jnp.float32), spec.for_rows(mats[n].shape[-2]))
    np.testing.assert_array_equal(np.asarray(qa[(0, n)].codes), np.asarray(ref.codes))


def test_structural_hessians_have_matrix_input_shapes(tiny):
  from cafeq_jax.methods import stats_adapter
  from cafeq_jax.models import linears

  params, cfg = tiny
  hs = stats_adapter.structural_hessians(params, cfg, num_samples=64)
  mats = linears.get_linears(params, cfg)
  for n, w in mats.items():
    assert hs[n].shape == (cfg.num_layers, w.shape[-2], w.shape[-2])
    assert np.all(np.isfinite(np.asarray(hs[n])))
  # Closed forms: diag(g²) of the RMSNorm scale for the normed inputs, and o's
  # blocks W_v,kᵀ diag(g²) W_v,k of its KV group per query head.
  for l in range(cfg.num_layers):
    g = np.asarray(params[f'layer_{l}']['pre_attention_norm']['scale'], np.float64)
    g = 1 + g if cfg.norm_scale_plus_one else g
    np.testing.assert_allclose(hs['q'][l], np.diag(g**2), rtol=1e-6)
    wv = np.asarray(mats['v'][l], np.float64)
    hd, group = cfg.head_dim, cfg.num_heads // cfg.num_kv_heads
    for h in range(cfg.num_heads):
      k = h // group
      blk = wv[:, k * hd : (k + 1) * hd]
      np.testing.assert_allclose(
        hs['o'][l][h * hd : (h + 1) * hd, h * hd : (h + 1) * hd],
        blk.T @ np.diag(g**2) @ blk,
        rtol=1e-4,
        atol=1e-7,
      )


def test_gram_of_chunks_sums_to_one_matmul():
  x = np.random.default_rng(0).normal(size=(3, 10, 16)).astype(np.float32)
  h = sum(stats.gram(jnp.asarray(chunk)) for chunk in x)
  want = x.reshape(-1, 16).astype(np.float64)
  np.testing.assert_allclose(np.asarray(h), want.T @ want, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(
    np.asarray(stats.gram(jnp.asarray(x))), want.T @ want, rtol=1e-5, atol=1e-4
  )


def test_weighted_loss_equals_activation_error():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(50, 16))
  w, w_hat = rng.normal(size=(16, 4)), rng.normal(size=(16, 4))
  got = stats.weighted_loss(jnp.asarray(w), jnp.asarray(w_hat), jnp.asarray(x.T @ x))
  np.testing.assert_allclose(float(got), np.sum((x @ (w - w_hat)) ** 2), rtol=1e-4)
