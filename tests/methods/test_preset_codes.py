"""Regression record: every preset gives the same quantized leaves, bit for bit.

``preset_codes.py`` quantizes every preset (small optimisation / sampling
settings) on the tiny models and digests each leaf; ``data/preset_codes.json``
is the committed record. The ``tiny_llama/w3g32asym`` cases run by default, the
others with ``-m slow``.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import pytest

from cafeq_jax import methods
from cafeq_jax import quantizer
from cafeq_jax import recipes

HERE = os.path.dirname(os.path.abspath(__file__))
RECORD = os.path.join(HERE, 'data', 'preset_codes.json')
sys.path.insert(0, HERE)
import preset_codes  # pylint: disable=g-import-not-at-top,wrong-import-position

DEFAULT_PREFIX = 'tiny_llama/w3g32asym/'
REGENERATE = (
  'python -m tests.methods.preset_codes tests/methods/data/preset_codes.json '
  '(only on purpose: when a change of the codes is intended)'
)


def _record() -> dict[str, dict[str, str]]:
  with open(RECORD) as f:
    return json.load(f)


_GENERATED = preset_codes.cases()
_SEEN: dict = {}


def _case(name: str):
  """``(cfg, params, recipe, tokens)`` of a case; the generator runs only as far as
  needed (the default cases come first: tiny_gemma2's params are not made for them)."""
  while name not in _SEEN:
    case, *rest = next(_GENERATED)
    _SEEN[case] = rest
  return _SEEN[name]


def _params():
  out = []
  for case in sorted(_record()):
    marks = () if case.startswith(DEFAULT_PREFIX) else (pytest.mark.slow,)
    out.append(pytest.param(case, marks=marks, id=case))
  return out


def test_record_covers_every_case_the_generator_makes():
  record = _record()
  names = [
    f'{model}/{quantizer.QuantSpec(**spec).name}/{name}'
    for model in preset_codes.MODELS
    for spec in preset_codes.SPECS
    for name in recipes.names()
  ]
  assert sorted(record) == sorted(names)
  assert sum(c.startswith(DEFAULT_PREFIX) for c in record) == len(recipes.PRESETS) == 13


def _mismatch_message(case, got, want) -> str:
  missing = sorted(set(want) - set(got))
  extra = sorted(set(got) - set(want))
  differ = sorted(k for k in set(got) & set(want) if got[k] != want[k])
  lines = [f'{case}: the quantized leaves differ from the record {RECORD}.']
  if differ:
    lines.append(f'  {len(differ)} leaves differ: ' + ', '.join(differ))
  if missing:
    lines.append(f'  leaves in the record but not produced: {missing}')
  if extra:
    lines.append(f'  leaves produced but not in the record: {extra}')
  lines.append(f'  To regenerate the record: {REGENERATE}.')
  return '\n'.join(lines)


@pytest.mark.parametrize('case', _params())
def test_preset_codes_match_the_record(case):
  want = _record()[case]
  cfg, params, recipe, tokens = _case(case)
  assert recipe.spec.name == case.split('/')[1] and recipe.name == case.split('/')[2]
  q, _ = methods.quantize(params, cfg, recipe, jax.random.PRNGKey(0), calib_tokens=tokens)
  got = preset_codes.digest(q)
  assert got == want, _mismatch_message(case, got, want)


def test_mismatch_message_names_the_leaves_and_how_to_regenerate():
  msg = _mismatch_message('m/s/p', {'a': '1', 'b': '2', 'c': '3'}, {'a': '1', 'b': '9', 'd': '4'})
  assert '1 leaves differ: b' in msg
  assert "['d']" in msg and "['c']" in msg
  assert 'python -m tests.methods.preset_codes' in msg
