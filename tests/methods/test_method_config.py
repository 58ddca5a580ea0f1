"""QuantConfig validation: bad configs fail with errors naming the value."""

from __future__ import annotations

import pytest

from cafeq_jax import quantizer
from cafeq_jax.methods import Method, QuantConfig


@pytest.mark.parametrize('kwargs, match', [
    (dict(method='awq'), "method='awq'"),
    (dict(matrices=('q', 'k')), r"\('k', 'v'\) share one param leaf"),
    (dict(matrices=('gate', 'up', 'mlp')), 'unknown'),
    (dict(matrices=()), 'non-empty'),
    (dict(method='hadamard', block_size=48), 'power-of-two block_size'),
    (dict(block_size=0), 'block_size'),
    (dict(optimizer='rmsprop'), "optimizer='rmsprop'"),
    (dict(rounding='ar'), "rounding='ar'"),
    (dict(pairs=('vo', 'xy')), 'unknown kinds'),
    (dict(pair_loss='mse'), "pair_loss='mse'"),
    (dict(use_single_transforms=False), 'plain RTN'),
    (dict(adaptive_rounding=True), 'needs use_pairs=True'),
    (dict(spec=dict(bits=5)), 'bits=5'),
    (dict(gptq_damp=2.0), 'gptq_damp'),
])
def test_bad_configs_raise_value_errors_naming_the_value(kwargs, match):
  with pytest.raises(ValueError, match=match):
    QuantConfig(**kwargs)


def test_matrices_as_a_string_is_a_type_error():
  with pytest.raises(TypeError, match='not the string'):
    QuantConfig(matrices='q')
  with pytest.raises(TypeError, match='spec must be a QuantSpec'):
    QuantConfig(spec='w4g128')


def test_strings_and_mappings_are_normalised_and_round_trip_through_dicts():
  c = QuantConfig(method='rtn', spec=dict(bits=3, group_size=64), matrices=['down', 'q'])
  assert c.method is Method.RTN
  assert c.spec == quantizer.QuantSpec(bits=3, group_size=64)
  assert c.matrices == ('q', 'down')  # canonical order
  assert QuantConfig.from_dict(c.to_dict()) == c
  with pytest.raises(ValueError, match=r"unknown QuantConfig fields \['bitz'\]"):
    QuantConfig.from_dict({'bitz': 3})


def test_transform_config_carries_the_optimiser_settings():
  t = QuantConfig(block_size=32, steps=7, learning_rate=1e-3, schedule='constant',
                  transform_init='hadamard').transform_config()
  assert (t.block_size, t.steps, t.learning_rate, t.schedule, t.init) == (
      32, 7, 1e-3, 'constant', 'hadamard')
