"""A small stand-in for the method's optimisation loop, used by the scale-out tests.

Learns a block-diagonal transform ``M`` per matrix of a stack ``W: (n, d_in,
d_out)`` minimising the Frobenius proxy ``||W - M^-1 Q(M W)||_F^2`` through the
straight-through quantizer, with Adam. Same structure as the real loop in
``cafeq_jax.core.optimize``: ``init_state`` (pure), ``step`` (jitted, state ->
state), plain Python loop. The per-matrix losses are summed so the matrices of
the stack are optimised independently (what makes sharding/splitting exact).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from cafeq_jax import quantizer

SPEC = quantizer.QuantSpec(bits=3, group_size=32)
BLOCK = 16
LR = 2e-3


def make_stack(key, n: int = 8, d_in: int = 64, d_out: int = 48) -> jax.Array:
  """Laplace-distributed random stack (n, d_in, d_out) float32."""
  return jax.random.laplace(key, (n, d_in, d_out), jnp.float32) * 0.02


def _blockdiag_apply(blocks, w):
  """blockdiag(blocks) @ w; blocks (nb, k, k), w (nb * k, d_out)."""
  nb, k, _ = blocks.shape
  return jnp.einsum('bij,bjo->bio', blocks, w.reshape(nb, k, -1)).reshape(w.shape)


def matrix_loss(blocks, w, spec=SPEC):
  v = _blockdiag_apply(blocks, w)
  v_hat = quantizer.fake_quant(v, spec)
  w_hat = _blockdiag_apply(jnp.linalg.inv(blocks), v_hat)
  return jnp.sum((w - w_hat) ** 2)


_OPT = optax.adam(LR)


def init_state(w: jax.Array, block: int = BLOCK):
  n, d_in, _ = w.shape
  eye = jnp.broadcast_to(jnp.eye(block, dtype=jnp.float32), (n, d_in // block, block, block))
  return {'w': w, 'blocks': eye, 'opt': _OPT.init(eye), 'step': jnp.zeros((), jnp.int32)}


@jax.jit
def step(state):
  def total(blocks):
    return jnp.sum(jax.vmap(matrix_loss)(blocks, state['w']))

  grads = jax.grad(total)(state['blocks'])
  updates, opt = _OPT.update(grads, state['opt'], state['blocks'])
  return {
    'w': state['w'],
    'blocks': optax.apply_updates(state['blocks'], updates),
    'opt': opt,
    'step': state['step'] + 1,
  }


def run(state, num_steps: int):
  for _ in range(num_steps):
    state = step(state)
  return state


@functools.partial(jax.jit, static_argnames='spec')
def quantize_result(state, spec=SPEC):
  """Final quantized codes of M W per matrix: QArray with (n, d_in, d_out) codes."""
  v = jax.vmap(_blockdiag_apply)(state['blocks'], state['w'])
  return quantizer.round_with_scale(v, *quantizer.compute_scale_zero(v, spec), spec)
