"""Clear errors for over-long contexts, empty prompts and loosely typed options (issue 14, 10)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cafeq_jax import quantizer
from cafeq_jax import recipes
from cafeq_jax.core import optimize
from cafeq_jax.core import pairs
from cafeq_jax.eval import evaluate
from cafeq_jax.eval import model_apply_fn
from cafeq_jax.models import PRESETS
from cafeq_jax.models import init_params
from cafeq_jax.models.generate import generate

CFG = PRESETS['tiny_llama']  # max_seq_len=64


@pytest.fixture(scope='module')
def params():
  return init_params(CFG, jax.random.PRNGKey(0))


def test_contexts_beyond_max_seq_len_and_empty_prompts_are_refused(params):
  with pytest.raises(
    ValueError,
    match=r'prompt length 60 \+ max_new_tokens 8 = 68 exceeds '
    r"the model's max_seq_len=64",
  ):
    generate(params, CFG, jnp.ones((1, 60), jnp.int32), max_new_tokens=8)
  with pytest.raises(ValueError, match=r'prompt is empty \(shape \(1, 0\)\)'):
    generate(params, CFG, jnp.zeros((1, 0), jnp.int32), max_new_tokens=2)
  with pytest.raises(ValueError, match=r'prompt rows \[1\] are empty'):
    generate(
      params,
      CFG,
      jnp.ones((2, 3), jnp.int32),
      max_new_tokens=2,
      prompt_mask=jnp.asarray([[1, 1, 1], [0, 0, 0]], bool),
    )
  with pytest.raises(ValueError, match='max_new_tokens=2.0; expected an int'):
    generate(params, CFG, jnp.ones((1, 3), jnp.int32), max_new_tokens=2.0)
  with pytest.raises(ValueError, match='windows of 65 tokens exceed the max_seq_len=64'):
    evaluate(model_apply_fn(CFG), params, np.zeros((1, 65), np.int32), progress=False)


@pytest.mark.parametrize(
  'make, error, match',
  [
    (lambda: quantizer.QuantSpec(symmetric='no'), TypeError, "symmetric='no' must be a bool"),
    (lambda: quantizer.QuantSpec(bits=4.0), TypeError, 'bits=4.0 must be an int'),
    (lambda: quantizer.QuantSpec(group_size=True), TypeError, 'group_size=True must be an int'),
    (lambda: quantizer.QuantSpec(clip_search=1), TypeError, 'clip_search=1 must be a bool'),
    (
      lambda: optimize.TransformConfig(learning_rate=math.inf),
      ValueError,
      'learning_rate=inf must be a finite number',
    ),
    (lambda: optimize.TransformConfig(steps=10.0), TypeError, 'steps=10.0 must be an int'),
    (lambda: optimize.TransformConfig(block_size=True), TypeError, 'block_size=True must be'),
    (lambda: optimize.TransformConfig(learn_scales=1), TypeError, 'learn_scales=1 must be a bool'),
    (
      lambda: pairs.PairOptConfig(learning_rate=math.nan),
      ValueError,
      'learning_rate=nan must be a finite number',
    ),
    (lambda: pairs.PairOptConfig(steps=True), TypeError, 'steps=True must be an int'),
    (lambda: recipes.Hadamard(share='yes'), TypeError, "share='yes' must be a bool"),
    (lambda: recipes.Learned(share=0), TypeError, 'share=0 must be a bool'),
    (
      lambda: recipes.SelfGenerated(temperature=math.inf),
      ValueError,
      'temperature=inf must be a finite number',
    ),
    (lambda: recipes.GPTQ(damp=False), ValueError, r'damp=False must be in \[0, 1\)'),
    (lambda: recipes.Calibration(source=3), TypeError, 'source=3 must be a non-empty str'),
  ],
)
def test_options_are_strictly_typed(make, error, match):
  with pytest.raises(error, match=match):
    make()


def test_well_typed_options_still_construct():
  spec = quantizer.QuantSpec(bits=np.int64(3), group_size=64, symmetric=np.bool_(True))
  assert spec.symmetric is True and spec.qmin == -4
  assert optimize.TransformConfig(learning_rate=1, steps=0).learning_rate == 1
  assert recipes.get('cafeq-single', transform__learning_rate=0.01).transform.config.steps > 0
