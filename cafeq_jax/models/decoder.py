"""One Flax (Linen) decoder for Gemma 2 and Llama-family models.

Param tree (the ``gemma`` library's Flax layout; ``K`` = num_kv_heads)::

  embedder/input_embedding          (V, D)
  layer_{i}/pre_attention_norm/scale (D,)
  layer_{i}/attn/q_einsum/w          (H, D, hd)
  layer_{i}/attn/kv_einsum/w         (2, K, D, hd)   [0] key, [1] value
  layer_{i}/attn/attn_vec_einsum/w   (H, hd, D)
  layer_{i}/post_attention_norm/scale (D,)           Gemma 2 only
  layer_{i}/pre_ffw_norm/scale       (D,)
  layer_{i}/mlp/gating_einsum        (2, F, D)       [0] gate, [1] up
  layer_{i}/mlp/linear               (F, D)          down
  layer_{i}/post_ffw_norm/scale      (D,)            Gemma 2 only
  final_norm/scale                   (D,)
  unembed/w                          (D, V)          untied models only

Any projection weight may be a ``QuantizedLinear`` instead of an array: all of them
go through ``project``, which dispatches on the leaf type, so fp and quantized params
run through the same module code.

Inputs of the linears: ``Attention`` and ``MLP`` ``sow`` the input of every
projection into the ``'intermediates'`` collection (``LINEAR_INPUTS`` names them per
matrix); the sows cost nothing unless that collection is made mutable. ``Block``
splits into ``attention_input`` / ``attend`` and ``mlp_input`` / ``feed_forward`` so
that sequential quantization (``cafeq_jax.methods.sequential``) can run one
sub-layer at a time, and ``attention_output`` / ``mlp_output`` finish a sub-layer
from the sown input of its last projection once that projection has changed.

KV cache: ``init_cache`` builds ``{'layer_i': {'k': (B, K, T, hd), 'v': (B, K, hd, T)},
'end_index': int32 ()}`` (``T`` slots, ``K`` KV heads). A call with a cache writes the
new keys/values at slots ``end_index .. end_index + L - 1`` and returns the updated
cache. Causality and the sliding window are applied on cache slots (as in
transformers); padding and any other restriction come in through ``attention_mask``.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cafeq_jax.models import qlinear
from cafeq_jax.models.config import ModelConfig

Params = dict[str, Any]
Cache = dict[str, Any]

_MASK_VALUE = -2.3819763e38  # as the gemma library: finite, so fully masked rows stay finite

# Where each per-layer matrix's input is sown: (sub-module of the block, sow name).
LINEAR_INPUTS: dict[str, tuple[str, str]] = {
  'q': ('attn', 'qkv_input'),
  'k': ('attn', 'qkv_input'),
  'v': ('attn', 'qkv_input'),
  'o': ('attn', 'o_input'),
  'gate': ('mlp', 'gating_input'),
  'up': ('mlp', 'gating_input'),
  'down': ('mlp', 'down_input'),
}


def _get_weight(module: nn.Module, name: str, shape: tuple[int, ...], init) -> Any:
  """The param ``name``: created at init, read as-is (array or QuantizedLinear) at apply.

  ``self.param`` would check the stored value's shape against ``shape`` and reject a
  ``QuantizedLinear`` leaf, so existing values are read directly.
  """
  if not module.has_variable('params', name):
    return module.param(name, init, shape, jnp.float32)
  value = module.get_variable('params', name)
  got = value.shape if isinstance(value, qlinear.QuantizedLinear) else getattr(value, 'shape', None)
  if got is None or tuple(got) != tuple(shape):
    path = '/'.join((*module.scope.path, name))
    raise ValueError(
      f'param {path!r} has shape {None if got is None else tuple(got)} but the model '
      f'config expects {tuple(shape)}; do the params and the config match?'
    )
  return value


def project(x: jax.Array, w: Any, kind: str, cfg: ModelConfig, backend: str = 'xla'):
  """Applies one projection weight (fp array or ``QuantizedLinear``) to ``x``.

  Args:
    x: activations; ``(B, L, D)`` for 'q', 'kv', 'gating', 'unembed'; ``(B, L, H, hd)``
      for 'o'; ``(B, L, F)`` for 'down'.
    w: the weight leaf in its tree layout (see module docstring) or a
      ``QuantizedLinear`` holding its matrix view.
    kind: 'q', 'kv', 'o', 'gating', 'down' or 'unembed'.
    cfg: the model config (head counts).
    backend: 'xla' or 'pallas' for quantized leaves.

  Returns:
    'q': (B, L, H, hd); 'kv': (2, B, L, K, hd); 'o': (B, L, D); 'gating': (2, B, L, F);
    'down': (B, L, D); 'unembed': (B, L, V); all in ``x``'s dtype.
  """
  H, K, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  if isinstance(w, qlinear.QuantizedLinear):
    if kind == 'o':
      x = x.reshape(*x.shape[:-2], H * hd)
    y = qlinear.matmul(x, w, backend=backend)
    if kind == 'q':
      return y.reshape(*y.shape[:-1], H, hd)
    if kind == 'kv':
      return y.reshape(*y.shape[:-1], K, hd)
    return y
  if not hasattr(w, 'shape'):
    raise TypeError(f'weight for {kind!r} must be an array or QuantizedLinear; got {type(w)}.')
  w = jnp.asarray(w).astype(x.dtype)
  if kind == 'q':
    return jnp.einsum('bld,hdk->blhk', x, w)
  if kind == 'kv':
    return jnp.einsum('bld,skdh->sblkh', x, w)
  if kind == 'o':
    return jnp.einsum('blhk,hkd->bld', x, w)
  if kind == 'gating':
    return jnp.einsum('bld,sfd->sblf', x, w)
  if kind in ('down', 'unembed'):
    return x @ w
  raise ValueError(f'unknown projection kind {kind!r}.')


def apply_rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
  """Half-split rotary embedding: rotates pairs ``(i, i + hd/2)``.

  Args:
    x: ``(B, L, N, hd)``.
    positions: ``(B, L)`` int.
    base: maximum wavelength.

  Returns:
    ``(B, L, N, hd)`` in ``x``'s dtype (angles computed in float32).
  """
  hd = x.shape[-1]
  inv_freq = 1.0 / (base ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # (B, L, hd/2)
  sin = jnp.sin(angles)[..., None, :]
  cos = jnp.cos(angles)[..., None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def _softcap(x: jax.Array, cap: float | None) -> jax.Array:
  return x if cap is None else jnp.tanh(x / cap) * cap


class RMSNorm(nn.Module):
  """RMSNorm in float32: ``x / rms(x) * (1 + scale)`` (Gemma) or ``* scale`` (Llama)."""

  plus_one: bool
  eps: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    init = nn.initializers.zeros_init() if self.plus_one else nn.initializers.ones_init()
    scale = self.param('scale', init, (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    s = scale.astype(jnp.float32)
    return (normed * (1.0 + s if self.plus_one else s)).astype(self.dtype)


class _Weight(nn.Module):
  """Holds one weight under the param name ``w`` (``{'w': ...}`` sub-dicts)."""

  shape: tuple[int, ...]

  @nn.compact
  def __call__(self):
    return _get_weight(self, 'w', self.shape, nn.initializers.normal(0.02))


class Attention(nn.Module):
  """Grouped-query attention with RoPE, soft-capping and an optional sliding window."""

  config: ModelConfig
  attn_type: str
  dtype: Any = jnp.float32
  backend: str = 'xla'

  @nn.compact
  def __call__(self, x, positions, layer_cache, end_index, attention_mask):
    cfg = self.config
    H, K, hd, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.embed_dim
    B, L, _ = x.shape
    wq = _Weight((H, D, hd), name='q_einsum')()
    wkv = _Weight((2, K, D, hd), name='kv_einsum')()
    wo = _Weight((H, hd, D), name='attn_vec_einsum')()

    self.sow('intermediates', 'qkv_input', x)
    q = project(x, wq, 'q', cfg, self.backend)
    kv = project(x, wkv, 'kv', cfg, self.backend)
    k, v = kv[0], kv[1]
    q = apply_rope(q, positions, cfg.rope_base) * jnp.asarray(cfg.query_scale, self.dtype)
    k = apply_rope(k, positions, cfg.rope_base)

    q_slots = jnp.arange(L) + (0 if layer_cache is None else end_index)
    new_cache = None
    if layer_cache is not None:
      # The cache is kept in the layouts the two attention dots read (keys slot-major,
      # values slot-minor, per head): stored as (B, T, K, hd), XLA:CPU transposed the
      # whole cache of every layer into them at each decoding step. The dots and their
      # bits are unchanged.
      ck = jax.lax.dynamic_update_slice(
        layer_cache['k'],
        jnp.transpose(k, (0, 2, 1, 3)).astype(layer_cache['k'].dtype),
        (0, 0, end_index, 0),
      )
      cv = jax.lax.dynamic_update_slice(
        layer_cache['v'],
        jnp.transpose(v, (0, 2, 3, 1)).astype(layer_cache['v'].dtype),
        (0, 0, 0, end_index),
      )
      new_cache = {'k': ck, 'v': cv}
      k = jnp.transpose(ck.astype(self.dtype), (0, 2, 1, 3))
      v = jnp.transpose(cv.astype(self.dtype), (0, 3, 1, 2))
    S = k.shape[1]
    kv_slots = jnp.arange(S)
    mask = kv_slots[None, :] <= q_slots[:, None]  # (L, S)
    if self.attn_type == 'local':
      mask &= kv_slots[None, :] > q_slots[:, None] - cfg.sliding_window_size
    mask = mask[None]  # (1, L, S)
    if attention_mask is not None:
      am = attention_mask.astype(bool)
      mask = mask & (am[:, None, :] if am.ndim == 2 else am)

    G = H // K
    qg = q.reshape(B, L, K, G, hd)
    logits = jnp.einsum('blkgh,bskh->bkgls', qg, k).astype(jnp.float32)
    logits = _softcap(logits, cfg.attn_logits_softcap)
    logits = jnp.where(mask[:, None, None], logits, _MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum('bkgls,bskh->blkgh', probs, v).reshape(B, L, H, hd)
    self.sow('intermediates', 'o_input', out.reshape(B, L, H * hd))
    return project(out, wo, 'o', cfg, self.backend), new_cache

  def output(self, o_input: jax.Array) -> jax.Array:
    """The ``o`` projection of its input ``(B, L, H * hd)`` (the sown ``'o_input'``):
    ``(B, L, D)``, as ``__call__`` ends. Apply only (reads the bound params)."""
    cfg = self.config
    x = o_input.reshape(*o_input.shape[:-1], cfg.num_heads, cfg.head_dim)
    return project(x, self.variables['params']['attn_vec_einsum']['w'], 'o', cfg, self.backend)


def mlp_activation(x: jax.Array, cfg: ModelConfig) -> jax.Array:
  """The gate activation: tanh-approximate GELU (Gemma) or SiLU (Llama)."""
  if cfg.activation == 'gelu_tanh':
    return jax.nn.gelu(x, approximate=True)
  return jax.nn.silu(x)


class MLP(nn.Module):
  """Gated MLP: ``act(x @ gate) * (x @ up) @ down`` (GeGLU or SwiGLU)."""

  config: ModelConfig
  dtype: Any = jnp.float32
  backend: str = 'xla'

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    init = nn.initializers.normal(0.02)
    w_gating = _get_weight(self, 'gating_einsum', (2, cfg.hidden_dim, cfg.embed_dim), init)
    w_down = _get_weight(self, 'linear', (cfg.hidden_dim, cfg.embed_dim), init)
    self.sow('intermediates', 'gating_input', x)
    gu = project(x, w_gating, 'gating', cfg, self.backend)
    h = mlp_activation(gu[0], cfg) * gu[1]
    self.sow('intermediates', 'down_input', h)
    return project(h, w_down, 'down', cfg, self.backend)

  def output(self, down_input: jax.Array) -> jax.Array:
    """The ``down`` projection of its input ``(B, L, F)`` (the sown ``'down_input'``):
    ``(B, L, D)``, as ``__call__`` ends. Apply only (reads the bound params)."""
    return project(
      down_input, self.get_variable('params', 'linear'), 'down', self.config, self.backend
    )


class Block(nn.Module):
  """Pre-norm transformer block (with Gemma 2's extra post-norms when configured).

  ``__call__`` is ``feed_forward(attend(x))``; the sub-layer methods (and the norms
  that make their first inputs, ``attention_input`` / ``mlp_input``) can be applied
  on their own with ``Block(...).apply(..., method=Block.attend)``.
  """

  config: ModelConfig
  attn_type: str
  dtype: Any = jnp.float32
  backend: str = 'xla'

  def setup(self):
    cfg = self.config
    norm = lambda: RMSNorm(cfg.norm_scale_plus_one, cfg.norm_eps, self.dtype)
    self.pre_attention_norm = norm()
    self.attn = Attention(cfg, self.attn_type, self.dtype, self.backend)
    self.pre_ffw_norm = norm()
    self.mlp = MLP(cfg, self.dtype, self.backend)
    if cfg.use_post_norms:
      self.post_attention_norm = norm()
      self.post_ffw_norm = norm()

  def attention_input(self, x):
    """The normed block input that q, k and v read: ``(B, L, D)``."""
    return self.pre_attention_norm(x)

  def attend(self, x, positions, layer_cache=None, end_index=None, attention_mask=None):
    """Attention sub-layer with its residual: ``(x_mid (B, L, D), new layer cache)``."""
    h, new_cache = self.attn(
      self.attention_input(x), positions, layer_cache, end_index, attention_mask
    )
    return self._attention_residual(x, h), new_cache

  def attention_output(self, x, o_input):
    """``attend(x)[0]`` from the input of ``o`` that ``attend`` sowed (``(B, L, H * hd)``):
    only the ``o`` projection, post-norm and residual run (the same ops as ``attend``)."""
    return self._attention_residual(x, self.attn.output(o_input))

  def _attention_residual(self, x, h):
    if self.config.use_post_norms:
      h = self.post_attention_norm(h)
    return x + h

  def mlp_input(self, x):
    """The normed residual that gate and up read: ``(B, L, D)``."""
    return self.pre_ffw_norm(x)

  def feed_forward(self, x):
    """MLP sub-layer with its residual: ``(B, L, D)``."""
    return self._ffw_residual(x, self.mlp(self.mlp_input(x)))

  def mlp_output(self, x, down_input):
    """``feed_forward(x)`` from the input of ``down`` that it sowed (``(B, L, F)``): only
    the ``down`` projection, post-norm and residual run (the same ops as ``feed_forward``)."""
    return self._ffw_residual(x, self.mlp.output(down_input))

  def _ffw_residual(self, x, h):
    if self.config.use_post_norms:
      h = self.post_ffw_norm(h)
    return x + h

  def __call__(self, x, positions, layer_cache, end_index, attention_mask):
    x, new_cache = self.attend(x, positions, layer_cache, end_index, attention_mask)
    return self.feed_forward(x), new_cache


class Embedder(nn.Module):
  """Token embedding table ``input_embedding: (V, D)``."""

  vocab_size: int
  embed_dim: int

  @nn.compact
  def __call__(self):
    return _get_weight(
      self, 'input_embedding', (self.vocab_size, self.embed_dim), nn.initializers.normal(1.0)
    )


def embed_tokens(
  table: jax.Array, tokens: jax.Array, cfg: ModelConfig, dtype=jnp.float32
) -> jax.Array:
  """Input embeddings ``(B, L, D)`` of ``dtype``: table rows, times ``sqrt(D)`` for Gemma."""
  x = jnp.asarray(table)[tokens].astype(dtype)
  if cfg.scale_embeddings:
    x = x * jnp.sqrt(jnp.float32(cfg.embed_dim)).astype(dtype)
  return x


class Transformer(nn.Module):
  """Decoder-only transformer for ``ModelConfig`` (Gemma 2 or Llama family).

  Attributes:
    config: the model config.
    dtype: activation / compute dtype (float32 default; bfloat16 works). Params stay
      as stored and are cast on use.
    backend: 'xla' or 'pallas' for ``QuantizedLinear`` leaves.
  """

  config: ModelConfig
  dtype: Any = jnp.float32
  backend: str = 'xla'

  @nn.compact
  def __call__(
    self,
    tokens: jax.Array,
    positions: jax.Array | None = None,
    cache: Cache | None = None,
    attention_mask: jax.Array | None = None,
  ) -> tuple[jax.Array, Cache | None]:
    """Forward pass.

    Args:
      tokens: ``(B, L)`` int token ids.
      positions: ``(B, L)`` int RoPE positions; default ``end_index + arange(L)``
        (``arange(L)`` without a cache).
      cache: from ``init_cache`` (or a previous call), or None.
      attention_mask: bool, True = may attend; ``(B, S)`` key mask or ``(B, L, S)``
        with ``S = L`` without a cache and ``S = T`` (cache length) with one. It is
        combined with the causal (and sliding-window) mask on slots.

    Returns:
      ``(logits (B, L, V) float32, updated cache or None)``.
    """
    cfg = self.config
    B, L = tokens.shape
    end_index = None if cache is None else cache['end_index']
    if positions is None:
      start = 0 if cache is None else end_index
      positions = jnp.broadcast_to(start + jnp.arange(L, dtype=jnp.int32), (B, L))
    emb_table = Embedder(cfg.vocab_size, cfg.embed_dim, name='embedder')()
    if isinstance(emb_table, qlinear.QuantizedLinear):
      raise TypeError('the input embedding must stay a float array; got a QuantizedLinear.')
    x = embed_tokens(emb_table, tokens, cfg, self.dtype)

    new_cache = None if cache is None else {'end_index': end_index + L}
    for i, attn_type in enumerate(cfg.attention_types):
      name = f'layer_{i}'
      layer_cache = None if cache is None else cache[name]
      x, c = Block(cfg, attn_type, self.dtype, self.backend, name=name)(
        x, positions, layer_cache, end_index, attention_mask
      )
      if cache is not None:
        new_cache[name] = c
    x = RMSNorm(cfg.norm_scale_plus_one, cfg.norm_eps, self.dtype, name='final_norm')(x)
    if cfg.tie_embeddings:
      logits = x @ jnp.asarray(emb_table).astype(self.dtype).T
    else:
      w = _Weight((cfg.embed_dim, cfg.vocab_size), name='unembed')()
      logits = project(x, w, 'unembed', cfg, self.backend)
    logits = _softcap(logits.astype(jnp.float32), cfg.final_logit_softcap)
    return logits, new_cache


def init_cache(cfg: ModelConfig, batch_size: int, cache_len: int, dtype=jnp.float32) -> Cache:
  """Empty KV cache: per layer ``k`` ``(B, K, T, hd)`` and ``v`` ``(B, K, hd, T)`` zeros
  (``K`` KV heads, ``T = cache_len`` slots); ``end_index`` 0."""
  K, hd = cfg.num_kv_heads, cfg.head_dim
  cache: Cache = {
    f'layer_{i}': {
      'k': jnp.zeros((batch_size, K, cache_len, hd), dtype),
      'v': jnp.zeros((batch_size, K, hd, cache_len), dtype),
    }
    for i in range(cfg.num_layers)
  }
  cache['end_index'] = jnp.zeros((), jnp.int32)
  return cache


@functools.partial(jax.jit, static_argnames=('cfg',))
def init_params(cfg: ModelConfig, key: jax.Array) -> Params:
  """Random float32 params (normal(0.02) projections, N(0, 1) embedding)."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  return Transformer(cfg).init(key, tokens)['params']


@functools.partial(jax.jit, static_argnames=('cfg', 'dtype', 'backend'))
def forward(
  params: Params,
  cfg: ModelConfig,
  tokens: jax.Array,
  *,
  positions: jax.Array | None = None,
  attention_mask: jax.Array | None = None,
  dtype=jnp.float32,
  backend: str = 'xla',
) -> jax.Array:
  """Cache-free forward pass (jitted): ``(B, L)`` tokens -> ``(B, L, V)`` float32 logits.

  ``positions`` and ``attention_mask`` are as for ``Transformer.__call__``.
  """
  logits, _ = Transformer(cfg, dtype, backend).apply(
    {'params': params}, tokens, positions, None, attention_mask
  )
  return logits
