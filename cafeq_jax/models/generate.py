"""Jit-compiled greedy and sampled generation with a KV cache.

Prefill runs the whole (left-padded) prompt through the model once, filling the cache;
decoding then runs one token per step inside ``lax.scan``. Everything is one jitted
function per (config, shapes, sampling mode); given the PRNG key it is deterministic.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from cafeq_jax.models import decoder
from cafeq_jax.models.config import ModelConfig


def sample_logits(
  logits: jax.Array, key: jax.Array | None, temperature: float | jax.Array, top_k: int | None = None
) -> jax.Array:
  """Next tokens from ``logits`` (B, V): argmax when ``key`` is None, else a sample.

  Sampling divides by ``temperature`` and, with ``top_k``, keeps only the k largest
  logits of each row. Returns (B,) int32.
  """
  if key is None:
    return first_argmax(logits)
  logits = logits.astype(jnp.float32) / temperature
  if top_k is not None:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  # jax.random.categorical's Gumbel-max draw, with its argmax as two plain reductions.
  return first_argmax(jax.random.gumbel(key, logits.shape, logits.dtype) + logits)


def first_argmax(x: jax.Array) -> jax.Array:
  """``jnp.argmax(x, axis=-1)`` as int32: the first index of the largest entry (of the
  first NaN, if any), from a max and a min reduction.

  XLA:CPU runs ``argmax``'s paired (value, index) reduction as one scalar loop (in
  ``sample_logits`` with ``categorical``'s Gumbel noise fused into it), where the two
  plain reductions vectorise. The result is ``argmax``'s, index for index.
  """
  top = jnp.max(x, axis=-1, keepdims=True)
  hit = (x == top) | jnp.isnan(x)
  iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  return jnp.min(jnp.where(hit, iota, x.shape[-1]), axis=-1)


@functools.partial(
  jax.jit,
  static_argnames=(
    'cfg',
    'max_new_tokens',
    'cache_len',
    'top_k',
    'sample',
    'eos_id',
    'pad_id',
    'dtype',
    'backend',
    'return_logits',
  ),
)
def _generate(
  params,
  prompt,
  prompt_mask,
  key,
  temperature,
  *,
  cfg,
  max_new_tokens,
  cache_len,
  top_k,
  sample,
  eos_id,
  pad_id,
  dtype,
  backend,
  return_logits,
):
  B, P = prompt.shape
  model = decoder.Transformer(cfg, dtype, backend)
  prompt_mask = prompt_mask.astype(bool)
  positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0).astype(jnp.int32)
  kv_mask = jnp.zeros((B, cache_len), bool).at[:, :P].set(prompt_mask)
  cache = decoder.init_cache(cfg, B, cache_len, dtype)
  logits, cache = model.apply({'params': params}, prompt, positions, cache, kv_mask)
  last = logits[:, -1]
  keys = jax.random.split(key, max_new_tokens)
  tok = sample_logits(last, keys[0] if sample else None, temperature, top_k)
  done = jnp.zeros((B,), bool) if eos_id is None else tok == eos_id
  next_pos = positions[:, -1] + 1

  def step(carry, step_key):
    cache, kv_mask, tok, pos, done = carry
    kv_mask = jax.lax.dynamic_update_slice(kv_mask, jnp.ones((B, 1), bool), (0, cache['end_index']))
    logits, cache = model.apply({'params': params}, tok[:, None], pos[:, None], cache, kv_mask)
    nxt = sample_logits(logits[:, 0], step_key if sample else None, temperature, top_k)
    nxt = jnp.where(done, pad_id, nxt)
    new_done = done if eos_id is None else done | (nxt == eos_id)
    return (cache, kv_mask, nxt, pos + 1, new_done), (nxt, logits[:, 0] if return_logits else None)

  carry = (cache, kv_mask, tok, next_pos, done)
  _, (toks, step_logits) = jax.lax.scan(step, carry, keys[1:])
  tokens = jnp.concatenate([tok[:, None], toks.T], axis=1)
  if return_logits:
    all_logits = jnp.concatenate([last[:, None], jnp.swapaxes(step_logits, 0, 1)], axis=1)
    return tokens, all_logits
  return tokens


def generate(
  params: dict,
  cfg: ModelConfig,
  prompt: Any,
  *,
  max_new_tokens: int,
  prompt_mask: Any | None = None,
  temperature: float = 0.0,
  top_k: int | None = None,
  key: jax.Array | None = None,
  eos_id: int | None = None,
  pad_id: int = 0,
  cache_len: int | None = None,
  dtype=jnp.float32,
  backend: str = 'xla',
  return_logits: bool = False,
):
  """Generates ``max_new_tokens`` tokens after ``prompt``.

  Args:
    params: model params (fp or with ``QuantizedLinear`` leaves).
    cfg: the model config.
    prompt: ``(B, P)`` int token ids, left-padded when rows differ in length.
    max_new_tokens: number of tokens to generate (>= 1; with the prompt at most
      ``cfg.max_seq_len``).
    prompt_mask: ``(B, P)`` bool, True on real tokens (default all True).
    temperature: 0 for greedy decoding; > 0 samples (needs ``key``).
    top_k: sample only among the k most likely tokens.
    key: PRNG key for sampling.
    eos_id: once a row emits it, the row continues with ``pad_id``.
    pad_id: filler after ``eos_id``.
    cache_len: KV cache length (default ``P + max_new_tokens``).
    dtype: activation dtype; the cache uses it too.
    backend: 'xla' or 'pallas' for quantized leaves.
    return_logits: also return the logits each token was chosen from.

  Returns:
    ``(B, max_new_tokens)`` int32 tokens, and ``(B, max_new_tokens, V)`` float32
    logits when ``return_logits``.
  """
  prompt = jnp.asarray(prompt, jnp.int32)
  if prompt.ndim != 2:
    raise ValueError(f'prompt must be (batch, length) ints; got shape {prompt.shape}.')
  if (
    isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or (max_new_tokens < 1)
  ):
    raise ValueError(f'max_new_tokens={max_new_tokens!r}; expected an int >= 1.')
  B, P = prompt.shape
  if B < 1 or P < 1:
    raise ValueError(
      f'prompt is empty (shape {prompt.shape}); give at least one token (e.g. a BOS id) per row.'
    )
  if P + max_new_tokens > cfg.max_seq_len:
    raise ValueError(
      f'prompt length {P} + max_new_tokens {max_new_tokens} = {P + max_new_tokens} '
      f"exceeds the model's max_seq_len={cfg.max_seq_len}; shorten the prompt or "
      'generate fewer tokens.'
    )
  cache_len = P + max_new_tokens if cache_len is None else cache_len
  if cache_len < P + max_new_tokens:
    raise ValueError(
      f'cache_len={cache_len} < prompt length {P} + max_new_tokens {max_new_tokens}.'
    )
  if temperature < 0:
    raise ValueError(f'temperature={temperature}; expected >= 0.')
  sample = temperature > 0
  if sample and key is None:
    raise ValueError('sampling (temperature > 0) needs a PRNG key.')
  if top_k is not None and not 1 <= top_k <= cfg.vocab_size:
    raise ValueError(f'top_k={top_k}; expected 1 <= top_k <= vocab_size={cfg.vocab_size}.')
  mask = jnp.ones((B, P), bool) if prompt_mask is None else jnp.asarray(prompt_mask, bool)
  if mask.shape != (B, P):
    raise ValueError(f'prompt_mask shape {mask.shape} != prompt shape {(B, P)}.')
  if prompt_mask is not None:
    empty = [int(i) for i in jnp.flatnonzero(~jnp.any(mask, axis=1))]
    if empty:
      raise ValueError(
        f'prompt rows {empty[:8]} are empty (prompt_mask all False); '
        'every row needs at least one real token.'
      )
  key = jax.random.key(0) if key is None else key
  return _generate(
    params,
    prompt,
    mask,
    key,
    jnp.float32(max(temperature, 1e-6)),
    cfg=cfg,
    max_new_tokens=max_new_tokens,
    cache_len=cache_len,
    top_k=top_k,
    sample=sample,
    eos_id=eos_id,
    pad_id=pad_id,
    dtype=dtype,
    backend=backend,
    return_logits=return_logits,
  )
