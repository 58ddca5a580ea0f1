"""Next-token metrics from logits: NLL, perplexity, KL(fp || quant), top-1 agreement.

Pure jittable functions. Logits ``(..., T, V)`` are those a causal LM produces for
a token window; position t predicts token t + 1, so a window of T tokens gives
T - 1 predictions (``shift_targets``). All work in float32 log-space
(``log_softmax``), so they are stable for large or very negative logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def log_probs(logits: jax.Array) -> jax.Array:
  """Log-softmax over the last (vocab) axis, in float32. (..., V) -> (..., V)."""
  return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


def shift_targets(logits: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Pairs each prediction with its target.

  Args:
    logits: (..., T, V) model output on ``tokens``.
    tokens: (..., T) int token ids.
  Returns:
    (logits[..., :-1, :], tokens[..., 1:]): (..., T-1, V) and (..., T-1).
  """
  return logits[..., :-1, :], tokens[..., 1:]


def nll_from_log_probs(lp: jax.Array, targets: jax.Array) -> jax.Array:
  """-lp[..., targets]: (..., V) log-probs, (...) int -> (...) float32."""
  return -jnp.take_along_axis(lp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Negative log-likelihood of each target: (..., V), (...) int -> (...) float32."""
  return nll_from_log_probs(log_probs(logits), targets)


def perplexity(nll: jax.Array) -> jax.Array:
  """exp(mean NLL) over all entries of ``nll`` (any shape) -> scalar float32."""
  return jnp.exp(jnp.mean(nll.astype(jnp.float32)))


def kl_divergence(logits_p: jax.Array, logits_q: jax.Array) -> jax.Array:
  """KL(p || q) = sum_v p_v (log p_v - log q_v) per position, in nats.

  p is the reference (full-precision) distribution, q the approximation.
  (..., V), (..., V) -> (...) float32, >= 0 (up to rounding).
  """
  return kl_from_log_probs(log_probs(logits_p), log_probs(logits_q))


def kl_from_log_probs(lp: jax.Array, lq: jax.Array) -> jax.Array:
  """KL(p || q) from normalised log-probs: (..., V) x2 -> (...) float32.

  Terms with p_v = 0 (lp = -inf, e.g. masked logits) contribute 0, not NaN.
  """
  terms = jnp.exp(lp) * (lp - lq)
  return jnp.sum(jnp.where(lp > -jnp.inf, terms, 0.0), axis=-1)


def top1_agreement(logits_p: jax.Array, logits_q: jax.Array) -> jax.Array:
  """Whether both distributions have the same argmax: (..., V) x2 -> (...) bool."""
  return jnp.argmax(logits_p, axis=-1) == jnp.argmax(logits_q, axis=-1)
