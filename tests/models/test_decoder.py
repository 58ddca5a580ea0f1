"""Decoder behaviour: KV cache, padding, quantized leaves, configs (no transformers here)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cafeq_jax import quantizer
from cafeq_jax.models import config as config_lib
from cafeq_jax.models import decoder
from cafeq_jax.models import linears
from cafeq_jax.models import qlinear

NAMES = ('tiny_gemma2', 'tiny_llama')


@functools.lru_cache(maxsize=None)
def _setup_cached(name, seed):
  cfg = config_lib.get_config(name)
  params = decoder.init_params(cfg, jax.random.key(seed))
  # Norm scales away from their init so (1 + w) vs w matters.
  rng = np.random.default_rng(7)
  params = jax.tree_util.tree_map_with_path(
    lambda p, a: (
      np.asarray(a) + 0.2 * rng.standard_normal(a.shape).astype(np.float32)
      if 'scale' in jax.tree_util.keystr(p)
      else np.asarray(a)
    ),
    params,
  )
  return cfg, params


def _setup(name, seed=0):
  """(cfg, params) of a tiny preset; params are numpy (shared read-only between tests)."""
  return _setup_cached(name, seed)


def _tokens(cfg, b, n, seed=1):
  return jax.random.randint(jax.random.key(seed), (b, n), 0, cfg.vocab_size)


def test_param_tree_has_gemma_layout():
  cfg, params = _setup('tiny_gemma2')
  shapes = jax.tree.map(lambda a: a.shape, params)
  H, K, hd, D, F = 4, 2, 16, 64, 128
  assert shapes['embedder'] == {'input_embedding': (128, D)}
  assert shapes['layer_2'] == {
    'pre_attention_norm': {'scale': (D,)},
    'post_attention_norm': {'scale': (D,)},
    'pre_ffw_norm': {'scale': (D,)},
    'post_ffw_norm': {'scale': (D,)},
    'attn': {
      'q_einsum': {'w': (H, D, hd)},
      'kv_einsum': {'w': (2, K, D, hd)},
      'attn_vec_einsum': {'w': (H, hd, D)},
    },
    'mlp': {'gating_einsum': (2, F, D), 'linear': (F, D)},
  }
  assert set(params) == {'embedder', 'layer_0', 'layer_1', 'layer_2', 'final_norm'}
  llama_cfg, llama = _setup('tiny_llama')
  assert set(llama) == {'embedder', 'layer_0', 'layer_1', 'final_norm', 'unembed'}
  assert 'post_ffw_norm' not in llama['layer_0']


def _numpy_norm(x, s, cfg):
  y = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.norm_eps)
  return y * ((1 + s) if cfg.norm_scale_plus_one else s)


def _numpy_layer(lp, cfg, kind, x):
  """One block in float64 numpy from the architecture notes: the inputs of its linears
  (``qkv``, ``o``, ``gating``, ``down``), the residual after attention and its output."""
  H, K, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  B, L, _ = x.shape

  def rope(x):  # (B, L, N, hd)
    inv = 1.0 / cfg.rope_base ** (np.arange(0, hd, 2) / hd)
    ang = np.arange(L)[:, None] * inv  # (L, hd/2)
    c, s = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]
    a, b = x[..., : hd // 2], x[..., hd // 2 :]
    return np.concatenate([a * c - b * s, b * c + a * s], -1)

  cap = lambda x, c: x if c is None else c * np.tanh(x / c)
  out = {}
  h = out['qkv'] = _numpy_norm(x, lp['pre_attention_norm']['scale'], cfg)
  q = rope(np.einsum('bld,hdk->blhk', h, lp['attn']['q_einsum']['w'])) * cfg.query_scale
  k = rope(np.einsum('bld,hdk->blhk', h, lp['attn']['kv_einsum']['w'][0]))
  v = np.einsum('bld,hdk->blhk', h, lp['attn']['kv_einsum']['w'][1])
  att = np.zeros((B, L, H, hd))
  for head in range(H):
    kv = head // (H // K)
    s = cap(np.einsum('bqd,bkd->bqk', q[:, :, head], k[:, :, kv]), cfg.attn_logits_softcap)
    qi, ki = np.arange(L)[:, None], np.arange(L)[None, :]
    allowed = ki <= qi
    if kind == 'local':
      allowed &= qi - ki < cfg.sliding_window_size
    s = np.where(allowed, s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    att[:, :, head] = np.einsum('bqk,bkd->bqd', w, v[:, :, kv])
  out['o'] = att.reshape(B, L, H * hd)
  h = np.einsum('blhk,hkd->bld', att, lp['attn']['attn_vec_einsum']['w'])
  if cfg.use_post_norms:
    h = _numpy_norm(h, lp['post_attention_norm']['scale'], cfg)
  x = out['mid'] = x + h
  h = out['gating'] = _numpy_norm(x, lp['pre_ffw_norm']['scale'], cfg)
  g = h @ lp['mlp']['gating_einsum'][0].T
  u = h @ lp['mlp']['gating_einsum'][1].T
  if cfg.activation == 'gelu_tanh':
    g = 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g**3)))
  else:
    g = g / (1 + np.exp(-g))
  out['down'] = g * u
  h = out['down'] @ lp['mlp']['linear']
  if cfg.use_post_norms:
    h = _numpy_norm(h, lp['post_ffw_norm']['scale'], cfg)
  out['out'] = x + h
  return out


def _numpy_embed(p, cfg, tokens):
  emb = p['embedder']['input_embedding']
  return emb[np.asarray(tokens)] * (np.sqrt(cfg.embed_dim) if cfg.scale_embeddings else 1.0)


def _numpy_reference(params, cfg, tokens):
  """Straight-line numpy forward pass (float64) written from the architecture notes."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x = _numpy_embed(p, cfg, tokens)
  for i, kind in enumerate(cfg.attention_types):
    x = _numpy_layer(p[f'layer_{i}'], cfg, kind, x)['out']
  x = _numpy_norm(x, p['final_norm']['scale'], cfg)
  emb = p['embedder']['input_embedding']
  logits = x @ (emb.T if cfg.tie_embeddings else p['unembed']['w'])
  c = cfg.final_logit_softcap
  return logits if c is None else c * np.tanh(logits / c)


@pytest.mark.parametrize('name', NAMES)
def test_block_sub_layers_sow_the_inputs_of_every_linear(name):
  """``Block.attend`` / ``Block.feed_forward`` sow the inputs of q/k/v, o, gate/up and
  down (``decoder.LINEAR_INPUTS``), equal to a numpy recomputation, on every layer."""
  cfg, params = _setup(name)
  tokens = _tokens(cfg, 2, 7)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  pos = jnp.broadcast_to(jnp.arange(7), (2, 7))
  x = decoder.embed_tokens(params['embedder']['input_embedding'], tokens, cfg)
  x_np = _numpy_embed(p, cfg, tokens)
  np.testing.assert_allclose(x, x_np, rtol=1e-6)
  for i, kind in enumerate(cfg.attention_types):
    ref = _numpy_layer(p[f'layer_{i}'], cfg, kind, x_np)
    block, v = decoder.Block(cfg, kind), {'params': params[f'layer_{i}']}
    (mid, _), st = block.apply(v, x, pos, method=decoder.Block.attend, mutable=['intermediates'])
    out, st2 = block.apply(v, mid, method=decoder.Block.feed_forward, mutable=['intermediates'])
    sown = {**st['intermediates'], **st2['intermediates']}
    want = {
      'q': ref['qkv'],
      'k': ref['qkv'],
      'v': ref['qkv'],
      'o': ref['o'],
      'gate': ref['gating'],
      'up': ref['gating'],
      'down': ref['down'],
    }
    assert set(decoder.LINEAR_INPUTS) == set(linears.LINEAR_NAMES)
    for n, (module, field) in decoder.LINEAR_INPUTS.items():
      (got,) = sown[module][field]
      np.testing.assert_allclose(got, want[n], atol=2e-5, rtol=1e-4, err_msg=f'{i}/{n}')
    np.testing.assert_allclose(mid, ref['mid'], atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(out, ref['out'], atol=5e-5, rtol=1e-4)
    # The norm methods give the first inputs of each sub-layer.
    np.testing.assert_allclose(
      block.apply(v, x, method=decoder.Block.attention_input), ref['qkv'], atol=2e-5, rtol=1e-4
    )
    np.testing.assert_allclose(
      block.apply(v, mid, method=decoder.Block.mlp_input), ref['gating'], atol=2e-5, rtol=1e-4
    )
    x, x_np = out, ref['out']
  # The whole model sows the same per layer; its logits are the plain forward's.
  (logits, _), state = decoder.Transformer(cfg).apply(
    {'params': params}, tokens, mutable=['intermediates']
  )
  np.testing.assert_allclose(logits, decoder.forward(params, cfg, tokens), atol=1e-5, rtol=1e-5)
  last = state['intermediates'][f'layer_{cfg.num_layers - 1}']
  np.testing.assert_allclose(last['mlp']['down_input'][0], ref['down'], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize('name', NAMES)
def test_sub_layers_finish_from_the_sown_input_of_their_last_projection(name):
  """``attention_output`` / ``mlp_output`` with ``o`` / ``down`` changed after the input
  was sown (as sequential rounding changes them) equal the whole sub-layer run with the
  new projection, and the change shows in the output."""
  cfg, params = _setup(name)
  tokens = _tokens(cfg, 2, 7)
  pos = jnp.broadcast_to(jnp.arange(7), (2, 7))
  x = decoder.embed_tokens(params['embedder']['input_embedding'], tokens, cfg)
  rng = np.random.default_rng(3)
  B = decoder.Block
  for i, kind in enumerate(cfg.attention_types):
    layer, block = params[f'layer_{i}'], decoder.Block(cfg, kind)
    (mid, _), st = block.apply(
      {'params': layer}, x, pos, method=B.attend, mutable=['intermediates']
    )
    out, st2 = block.apply({'params': layer}, mid, method=B.feed_forward, mutable=['intermediates'])
    mats = linears.layer_matrices(layer, cfg)
    changed = {n: mats[n] + 0.1 * rng.standard_normal(mats[n].shape) for n in ('o', 'down')}
    v = {'params': linears.set_layer_matrices(layer, cfg, changed)}
    got = block.apply(v, x, st['intermediates']['attn']['o_input'][0], method=B.attention_output)
    want, _ = block.apply(v, x, pos, method=B.attend)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=f'layer {i} attention')
    assert not np.allclose(got, mid, atol=1e-3)
    got = block.apply(v, mid, st2['intermediates']['mlp']['down_input'][0], method=B.mlp_output)
    np.testing.assert_allclose(
      got,
      block.apply(v, mid, method=B.feed_forward),
      rtol=1e-6,
      atol=1e-6,
      err_msg=f'layer {i} mlp',
    )
    assert not np.allclose(got, out, atol=1e-3)
    x = out


@pytest.mark.parametrize('name', NAMES)
def test_forward_matches_float64_numpy_reference(name):
  cfg, params = _setup(name)
  tokens = _tokens(cfg, 2, 11)
  np.testing.assert_allclose(
    decoder.forward(params, cfg, tokens),
    _numpy_reference(params, cfg, np.asarray(tokens)),
    atol=2e-4,
    rtol=1e-4,
  )


@pytest.mark.parametrize('name', NAMES)
def test_cached_decoding_matches_full_forward(name):
  cfg, params = _setup(name)
  tokens = _tokens(cfg, 2, 12)
  full = decoder.forward(params, cfg, tokens)
  apply = jax.jit(lambda p, t, c: decoder.Transformer(cfg).apply({'params': p}, t, None, c))
  cache = decoder.init_cache(cfg, 2, 16)
  # Prefill 5 tokens, then one token at a time.
  logits, cache = apply(params, tokens[:, :5], cache)
  steps = [logits]
  for t in range(5, 12):
    logits, cache = apply(params, tokens[:, t : t + 1], cache)
    steps.append(logits)
  assert int(cache['end_index']) == 12
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5, rtol=1e-5)


def test_left_padding_with_mask_and_positions_matches_unpadded_row():
  cfg, params = _setup('tiny_gemma2')
  tokens = _tokens(cfg, 1, 9)
  pad = 3
  padded = jnp.concatenate([jnp.zeros((1, pad), tokens.dtype), tokens], axis=1)
  mask = jnp.arange(9 + pad)[None] >= pad
  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
  ref = decoder.forward(params, cfg, tokens)
  out = decoder.forward(params, cfg, padded, positions=positions, attention_mask=mask)
  np.testing.assert_allclose(out[:, pad:], ref, atol=1e-5, rtol=1e-5)
  assert np.isfinite(np.asarray(out)).all()


def test_bfloat16_forward_is_close_to_float32():
  cfg, params = _setup('tiny_llama')
  tokens = _tokens(cfg, 1, 8)
  f32 = decoder.forward(params, cfg, tokens)
  bf16 = decoder.forward(params, cfg, tokens, dtype=jnp.bfloat16)
  assert bf16.dtype == jnp.float32
  assert float(jnp.abs(bf16 - f32).max()) < 0.1 * float(jnp.abs(f32).max())


def _quantize_all(params, cfg, spec, key, with_transform):
  """Every projection leaf -> QuantizedLinear (optionally with a random transform)."""
  out = dict(params)
  for i in range(cfg.num_layers):
    layer = params[f'layer_{i}']
    for lf in linears.LEAVES:
      kind, path = lf.kind, lf.path
      leaf = linears._get_path(layer, path)
      m = linears.leaf_to_matrix(kind, jnp.asarray(leaf), cfg)
      t = None
      if with_transform:
        key, sub = jax.random.split(key)
        d_in, k = m.shape[-2], 16
        t = jnp.eye(k) + 0.2 * jax.random.normal(sub, (d_in // k, k, k))
      ql = qlinear.QuantizedLinear(
        weight=quantizer.quantize(m, spec), transform_inv=t, shape=tuple(leaf.shape)
      )
      layer = linears._set_path(layer, path, ql)
    out[f'layer_{i}'] = layer
  return out


@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('with_transform', [False, True])
def test_quantized_forward_equals_fp_forward_on_effective_weights(name, with_transform):
  cfg, params = _setup(name)
  spec = quantizer.QuantSpec(bits=4, group_size=32)
  qparams = _quantize_all(params, cfg, spec, jax.random.key(3), with_transform)
  tokens = _tokens(cfg, 2, 7)
  out_q = jax.jit(lambda p, t: decoder.forward(p, cfg, t))(qparams, tokens)
  # Reference: dequantize by hand (numpy), fold the transform, run the fp model.
  ref_params = dict(params)
  for i in range(cfg.num_layers):
    layer = qparams[f'layer_{i}']
    for lf in linears.LEAVES:
      kind, path = lf.kind, lf.path
      ql = linears._get_path(layer, path)
      q = ql.weight
      g = spec.group_size
      w = (np.asarray(q.codes, np.float64) - np.repeat(np.asarray(q.zero), g, axis=-2)) * np.repeat(
        np.asarray(q.scale), g, axis=-2
      )
      if ql.transform_inv is not None:
        t = np.asarray(ql.transform_inv, np.float64)
        bd = np.zeros((w.shape[-2],) * 2)
        for b in range(t.shape[0]):
          bd[16 * b : 16 * b + 16, 16 * b : 16 * b + 16] = t[b]
        w = bd @ w
      layer = linears._set_path(
        layer, path, linears.matrix_to_leaf(kind, jnp.asarray(w, jnp.float32), cfg)
      )
    ref_params[f'layer_{i}'] = layer
  ref = decoder.forward(ref_params, cfg, tokens)
  np.testing.assert_allclose(out_q, ref, atol=2e-4, rtol=1e-4)
  np.testing.assert_allclose(
    out_q,
    decoder.forward(linears.dequantize_params(qparams, cfg), cfg, tokens),
    atol=2e-4,
    rtol=1e-4,
  )
  assert float(jnp.abs(out_q - decoder.forward(params, cfg, tokens)).max()) > 1e-3


def test_pallas_backend_without_kernel_raises_clear_error(monkeypatch):
  import sys

  cfg, params = _setup('tiny_llama')
  qparams = _quantize_all(
    params, cfg, quantizer.QuantSpec(bits=4, group_size=32), jax.random.key(0), False
  )
  monkeypatch.setitem(sys.modules, 'kernels_pallas', None)
  with pytest.raises(ImportError, match="backend='xla'"):
    decoder.forward(qparams, cfg, _tokens(cfg, 1, 3), backend='pallas')


def test_quantized_embedding_is_rejected():
  cfg, params = _setup('tiny_llama')
  spec = quantizer.QuantSpec(bits=4, group_size=32)
  emb = params['embedder']['input_embedding']
  bad = {
    **params,
    'embedder': {
      'input_embedding': qlinear.QuantizedLinear(
        weight=quantizer.quantize(emb, spec), transform_inv=None, shape=emb.shape
      )
    },
  }
  with pytest.raises(TypeError, match='embedding'):
    decoder.forward(bad, cfg, _tokens(cfg, 1, 3))


def test_presets_have_public_shapes():
  g2 = config_lib.get_config('gemma2_2b')
  assert g2.attention_types[:3] == ('local', 'global', 'local') and g2.num_layers == 26
  assert 2.5e9 < g2.num_params < 2.7e9  # Gemma 2 2B: 2.61B parameters
  assert 9.1e9 < config_lib.get_config('gemma2_9b').num_params < 9.3e9  # 9.24B
  assert 27.0e9 < config_lib.get_config('gemma2_27b').num_params < 27.4e9  # 27.2B
  smol = config_lib.get_config('smollm2_135m')
  assert 134e6 < smol.num_params < 135e6  # 134.5M
  assert smol.query_scale == 64**-0.5


def test_get_config_unknown_name_lists_presets():
  with pytest.raises(ValueError, match="unknown model preset 'gemma3'.*smollm2_135m"):
    config_lib.get_config('gemma3')


@pytest.mark.parametrize(
  'override, match',
  [
    (dict(num_kv_heads=3), 'num_heads=4 is not a multiple of num_kv_heads=3'),
    (dict(head_dim=15), 'head_dim=15 must be even'),
    (dict(family='gpt2'), "family='gpt2'"),
    (dict(activation='relu'), "activation='relu'"),
    (dict(attention_pattern=('local', 'sliding')), 'attention_pattern'),
    (dict(sliding_window_size=None), 'sliding_window_size=None'),
    (dict(embed_dim=0), 'embed_dim=0'),
    (dict(final_logit_softcap=-1.0), 'final_logit_softcap=-1.0'),
  ],
)
def test_config_validation_names_bad_value(override, match):
  with pytest.raises(ValueError, match=match):
    config_lib.get_config('tiny_gemma2').replace(**override)


def _pack_leaves(qparams):
  from cafeq_jax import packing

  is_ql = lambda x: isinstance(x, qlinear.QuantizedLinear)
  return jax.tree.map(
    lambda x: x.replace(weight=packing.pack(x.weight)) if is_ql(x) else x, qparams, is_leaf=is_ql
  )


@pytest.mark.parametrize('bits', [4, pytest.param(3, marks=pytest.mark.slow)])
def test_packed_leaves_give_same_logits_as_qarray_leaves_on_both_backends(bits):
  cfg, params = _setup('tiny_llama')
  qparams = _quantize_all(
    params, cfg, quantizer.QuantSpec(bits=bits, group_size=32), jax.random.key(3), True
  )
  packed = _pack_leaves(qparams)
  tokens = _tokens(cfg, 1, 5)
  ref = decoder.forward(qparams, cfg, tokens)
  np.testing.assert_allclose(decoder.forward(packed, cfg, tokens), ref, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(
    decoder.forward(packed, cfg, tokens, backend='pallas'), ref, atol=1e-4, rtol=1e-4
  )


def test_params_that_do_not_match_the_config_raise_naming_the_param():
  cfg, params = _setup('tiny_llama')
  with pytest.raises(
    ValueError,
    match=r"'layer_0/attn/q_einsum/w' has shape \(4, 64, 16\).*"
    r'expects \(8, 64, 16\)',
  ):
    decoder.forward(params, cfg.replace(num_heads=8), _tokens(cfg, 1, 3))
