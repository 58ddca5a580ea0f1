"""Regression record: every preset gives the same quantized codes, bit for bit (and
the same scales, zeros and transforms to ``preset_codes.FLOAT_RTOL`` of their norm:
another CPU's vector instructions reassociate float sums).

``preset_codes.py`` quantizes every preset (small optimisation / sampling
settings) on the tiny models and digests each leaf; ``data/preset_codes.json``
is the committed record. The ``tiny_llama/w3g32asym`` cases run by default, the
others with ``-m slow``.

Across machines: jaxlib's LAPACK calls go through OpenBLAS, whose kernels depend on
the CPU family; ``tests/conftest.py`` pins one family, and with it the default
cases give the recorded codes on AMD AVX2 (where the record was made) and Intel
AVX-512 machines alike. The slow ``tiny_gemma2`` cases are exact on the recording
machine only: that random tiny model's near-uniform logits put its self-generated
tokens on near-ties (an 1e-7 difference in a sum picks another token, hence other
statistics and codes), and a few of its transformed weights sit on rounding ties.

The pin is not enough everywhere: on a 2-core AMD EPYC with AVX-512 the default
``gptq`` and ``gptq-offdomain`` cases flip codes of two layer-1 MLP leaves under it
(and give the record under ``OPENBLAS_CORETYPE=SkylakeX``, ``Sandybridge`` or
``Prescott``; the Intel AVX-512 machine gave it only under the pin): GPTQ's
Cholesky on the tests' 48 calibration tokens is ill-conditioned enough that
OpenBLAS's blocking, which also follows the cache sizes, moves a weight across a
rounding tie. The slow ``tiny_llama/w4pcsym/cafeq-pairs-ar`` case does the same there
through the V/O pair's adaptive rounding: 44 and 96 codes of layer 1's o and k/v leaves
move by one step under the pin (the record under ``SkylakeX`` or ``Prescott``, not under
``Sandybridge``), the alternating error feedback carrying one flip further.
On that EPYC more slow cases flip codes under the pin: ``tiny_gemma2/w4pcsym/cafeq-pairs-ar``
as tiny_llama's (the record under ``SkylakeX`` or ``Prescott``); ``tiny_llama/w4pcsym``
``gptq`` and ``gptq-offdomain`` (layer 0's o leaf) under every core type tried
(``Haswell``, ``SkylakeX``, ``Prescott``, ``Sandybridge``); and the eight ``tiny_gemma2``
cases that round on self-generated tokens (``gptq-selfgen``, ``cafeq-sg``,
``cafeq-sg-rounding``, ``cafeq-pairs-sg`` at both specs; 3 to 13 leaves each) under
``Haswell``, ``SkylakeX`` and ``Prescott`` and with XLA held to AVX2 code
(``XLA_FLAGS=--xla_cpu_max_isa=AVX2``). In each of those eight, layer 0's q and k/v
leaves match the record, so the sampled tokens, whose Gram rounds them, are very likely
the same: the flips come from float sums further on, not from the sampling.
``data/preset_codes_variants.json`` holds, per case, the digests such
a machine gives (``python -m tests.methods.preset_codes --variant
tests/methods/data/preset_codes_variants.json CASE ...`` adds this machine's); a
case passes when it matches the record or one of them. An intended change of the
codes regenerates the record and empties the variants file; a change of one preset
may regenerate that preset's cases only (``cafeq``'s were, on that AMD EPYC, when it
took ``cafeq-single``'s transform).
"""

from __future__ import annotations

import functools
import json
import os
import sys

import jax
import numpy as np
import pytest

from cafeq_jax import methods
from cafeq_jax import quantizer
from cafeq_jax import recipes

HERE = os.path.dirname(os.path.abspath(__file__))
RECORD = os.path.join(HERE, 'data', 'preset_codes.json')
VARIANTS = os.path.join(HERE, 'data', 'preset_codes_variants.json')
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


@functools.cache
def _variants() -> dict[str, list[dict]]:
  """Per case, the digests other CPUs give (see the module docstring)."""
  if not os.path.exists(VARIANTS):
    return {}
  with open(VARIANTS) as f:
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
  variants = _variants()
  assert set(variants) <= set(record)
  for case, digests in variants.items():  # a variant differs from the record, in codes
    assert digests and all(set(d) == set(record[case]) for d in digests), case
    assert all(any(preset_codes.differs(d[k], record[case][k]) for k in d) for d in digests)


def _mismatch_message(case, got, want) -> str:
  missing = sorted(set(want) - set(got))
  extra = sorted(set(got) - set(want))
  differ = sorted(k for k in set(got) & set(want) if preset_codes.differs(got[k], want[k]))
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

  def same(record):
    return set(got) == set(record) and not any(preset_codes.differs(got[k], record[k]) for k in got)

  variants = _variants().get(case, [])
  assert same(want) or any(same(v) for v in variants), _mismatch_message(case, got, want) + (
    f'\n  ({len(variants)} per-CPU variants in {VARIANTS} differ too.)' if variants else ''
  )


def _leaf(exact: str, *floats) -> dict:
  return {'exact': exact, 'floats': [list(f) for f in floats]}


def test_leaves_differ_by_any_code_but_floats_only_past_the_tolerance():
  want = _leaf('ab', (2.0, 0.5))
  assert not preset_codes.differs(_leaf('ab', (2.0 + 1e-6, 0.5 - 1e-6)), want)
  assert preset_codes.differs(_leaf('ab', (2.0, 0.5 + 1e-3)), want)
  assert preset_codes.differs(_leaf('ab', (2.01, 0.5)), want)
  assert preset_codes.differs(_leaf('cd', (2.0, 0.5)), want)
  assert preset_codes.differs(_leaf('ab', (2.0, 0.5), (1.0, 1.0)), want)


def test_float_summary_moves_with_the_array_not_with_its_rounding():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((64, 32)).astype(np.float32)
  want = _leaf('ab', preset_codes._float_summary(x))
  ulp = np.spacing(np.abs(x)) * rng.choice([-1, 1], x.shape)
  assert not preset_codes.differs(_leaf('ab', preset_codes._float_summary(x + ulp)), want)
  y = x.copy()
  y[3, 5] += np.abs(x).max()  # one entry moved by a 3-bit step or so
  assert preset_codes.differs(_leaf('ab', preset_codes._float_summary(y)), want)


def test_mismatch_message_names_the_leaves_and_how_to_regenerate():
  a, b, c, d, e = (_leaf(h, (1.0, 0.0)) for h in '12349')
  msg = _mismatch_message('m/s/p', {'a': a, 'b': b, 'c': c}, {'a': a, 'b': e, 'd': d})
  assert '1 leaves differ: b' in msg
  assert "['d']" in msg and "['c']" in msg
  assert 'python -m tests.methods.preset_codes' in msg
