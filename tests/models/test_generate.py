"""Generation with the KV cache vs step-by-step full forward passes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cafeq_jax.models import config as config_lib
from cafeq_jax.models import decoder
from cafeq_jax.models.generate import first_argmax
from cafeq_jax.models.generate import generate
from cafeq_jax.models.generate import sample_logits


@pytest.fixture(scope='module')
def model():
  cfg = config_lib.get_config('tiny_gemma2')
  return cfg, decoder.init_params(cfg, jax.random.key(0))


def test_greedy_generation_matches_full_forward_argmax_and_logits(model):
  cfg, params = model
  prompt = jax.random.randint(jax.random.key(1), (2, 5), 0, cfg.vocab_size)
  toks, logits = generate(params, cfg, prompt, max_new_tokens=8, return_logits=True)
  assert toks.shape == (2, 8) and logits.shape == (2, 8, cfg.vocab_size)
  # One cache-free forward pass over prompt + generated tokens gives, at each position,
  # the logits the cached decoder produced and the token greedy decoding picked.
  full = decoder.forward(params, cfg, jnp.concatenate([prompt, toks[:, :-1]], axis=1))
  np.testing.assert_allclose(logits, full[:, 4:], atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(toks, np.argmax(full[:, 4:], axis=-1))


def test_left_padded_prompt_generates_like_unpadded(model):
  cfg, params = model
  short = jax.random.randint(jax.random.key(2), (1, 4), 0, cfg.vocab_size)
  long = jax.random.randint(jax.random.key(3), (1, 7), 0, cfg.vocab_size)
  batch = jnp.concatenate([jnp.pad(short, ((0, 0), (3, 0))), long], axis=0)
  mask = jnp.array([[False] * 3 + [True] * 4, [True] * 7])
  toks = generate(params, cfg, batch, prompt_mask=mask, max_new_tokens=6)
  np.testing.assert_array_equal(toks[0], generate(params, cfg, short, max_new_tokens=6)[0])
  np.testing.assert_array_equal(toks[1], generate(params, cfg, long, max_new_tokens=6)[0])


def test_sampling_is_deterministic_given_key_and_respects_top_k(model):
  cfg, params = model
  prompt = jax.random.randint(jax.random.key(4), (4, 3), 0, cfg.vocab_size)
  kw = dict(max_new_tokens=6, temperature=50.0, top_k=3, return_logits=True)
  a, logits = generate(params, cfg, prompt, key=jax.random.key(5), **kw)
  b, _ = generate(params, cfg, prompt, key=jax.random.key(5), **kw)
  c, _ = generate(params, cfg, prompt, key=jax.random.key(6), **kw)
  np.testing.assert_array_equal(a, b)
  assert (np.asarray(a) != np.asarray(c)).any()
  top3 = np.argsort(-np.asarray(logits), axis=-1)[..., :3]
  assert (top3 == np.asarray(a)[..., None]).any(-1).all()


def test_sample_logits_top_1_is_argmax_and_distribution_follows_softmax():
  logits = jnp.log(jnp.array([[0.1, 0.6, 0.3]]))
  assert int(sample_logits(logits, jax.random.key(0), 1.0, top_k=1)[0]) == 1
  keys = jax.random.split(jax.random.key(1), 4000)
  draws = jax.vmap(lambda k: sample_logits(logits, k, 1.0)[0])(keys)
  freq = np.bincount(np.asarray(draws), minlength=3) / 4000
  np.testing.assert_allclose(freq, [0.1, 0.6, 0.3], atol=0.03)


def test_first_argmax_is_numpys_argmax_on_ties_nans_and_infinities():
  rng = np.random.default_rng(0)
  x = rng.integers(-3, 4, size=(64, 37)).astype(np.float32)  # many ties
  x[5, [3, 9]] = np.nan
  x[6] = -np.inf
  x[7, [0, 20]] = np.inf
  x[8, 11] = -0.0
  got = np.asarray(jax.jit(first_argmax)(jnp.asarray(x)))
  assert got.dtype == np.int32
  np.testing.assert_array_equal(got, np.argmax(x, axis=-1))  # numpy: NaN wins, first one


def test_sampling_draws_jax_random_categoricals_tokens():
  # The Gumbel-max draw of sample_logits is jax.random.categorical's, token for token.
  logits = 4.0 * jax.random.normal(jax.random.key(7), (16, 1000))
  for i in range(5):
    key = jax.random.key(i)
    np.testing.assert_array_equal(
      jax.jit(sample_logits, static_argnums=2)(logits, key, 0.7),
      jax.random.categorical(key, logits / 0.7, axis=-1),
    )


def test_eos_stops_row_and_pads(model):
  cfg, params = model
  prompt = jax.random.randint(jax.random.key(1), (1, 5), 0, cfg.vocab_size)
  free = np.asarray(generate(params, cfg, prompt, max_new_tokens=6))[0]
  eos = int(free[2])
  first = int(np.argmax(free == eos))
  out = np.asarray(generate(params, cfg, prompt, max_new_tokens=6, eos_id=eos, pad_id=-1))[0]
  np.testing.assert_array_equal(out[: first + 1], free[: first + 1])
  assert (out[first + 1 :] == -1).all()


@pytest.mark.parametrize(
  'kwargs, match',
  [
    (dict(max_new_tokens=0), 'max_new_tokens=0'),
    (dict(max_new_tokens=2, temperature=0.7), 'needs a PRNG key'),
    (dict(max_new_tokens=2, cache_len=3), 'cache_len=3'),
    (dict(max_new_tokens=2, top_k=0, temperature=1.0, key=jax.random.key(0)), 'top_k=0'),
  ],
)
def test_generate_rejects_bad_arguments(model, kwargs, match):
  cfg, params = model
  with pytest.raises(ValueError, match=match):
    generate(params, cfg, jnp.zeros((1, 3), jnp.int32), **kwargs)
