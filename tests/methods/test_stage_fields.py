"""Every stage field changes the quantized codes where it should (no silent no-ops).

Each case quantizes the tiny Llama model with a base recipe and with one field
changed, and compares the codes of every quantized matrix. The bases keep the
optimisation and sampling small; where the field's default is cheap the base uses
it. ``GPTQ.damp`` and ``GPTQ.act_order`` are checked with Frobenius statistics
under a learned transform with right scales (``M = D1 R D2``: ``H = M⁻ᵀ M⁻¹`` is
not diagonal; with ``M = D1 R`` or a Hadamard rotation it is, and GPTQ-form
rounding is RTN whatever its damping or order) and with self-generated statistics.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
import pytest

from cafeq_jax import methods
from cafeq_jax import models
from cafeq_jax import quantizer
from cafeq_jax import recipes as R
from cafeq_jax.core import optimize
from cafeq_jax.core import pairs as pairs_lib
from cafeq_jax.models import linears

SPEC = quantizer.QuantSpec(bits=3, group_size=32)
ATTENTION = ('q', 'k', 'v')


def _learned(**kw):
  config = dict(
    block_size=32, steps=3, learning_rate=1e-2, parameterization='rotation', right_scales=True
  )
  return R.Learned(config=optimize.TransformConfig(**{**config, **kw}))


def _selfgen(**kw):
  return R.SelfGenerated(**{'num_seqs': 2, 'seq_len': 8, **kw})


def _pairs(**kw):
  opt = pairs_lib.PairOptConfig(steps=kw.pop('steps', 4))
  return R.PairTransforms(opt=opt, **kw)


_HADAMARD = R.Recipe(spec=SPEC, matrices=('gate', 'up'), transform=R.Hadamard())
_LEARNED = R.Recipe(spec=SPEC, matrices=('down',), transform=_learned(), rounding=R.GPTQ())
_SELFGEN = R.Recipe(spec=SPEC, matrices=ATTENTION, rounding=R.GPTQ(statistics=_selfgen()))
_PAIRS = R.Recipe(spec=SPEC, matrices=('k', 'v', 'o', 'gate', 'up', 'down'), pairs=_pairs())
_VO = _PAIRS.replace(pairs=_pairs(kinds=('vo',)))
_ADAPTIVE = R.Recipe(
  spec=SPEC, matrices=('k', 'v', 'o'), pairs=_pairs(kinds=('vo',)), rounding=R.PairAdaptive()
)

# (field, base, changed recipe, matrices allowed to change (None: any)).
CASES = [
  ('Hadamard.block_size', _HADAMARD, _HADAMARD.replace(transform=R.Hadamard(block_size=32)), None),
  (
    'Hadamard.share',
    _HADAMARD,
    _HADAMARD.replace(transform=R.Hadamard(share=True)),
    {'gate', 'up'},
  ),
  ('Learned.config.steps', _LEARNED, _LEARNED.replace(transform=_learned(steps=6)), None),
  (
    'Learned.config.learning_rate',
    _LEARNED,
    _LEARNED.replace(transform=_learned(learning_rate=3e-2)),
    None,
  ),
  ('Learned.config.b1', _LEARNED, _LEARNED.replace(transform=_learned(b1=0.5)), None),
  ('Learned.config.b2', _LEARNED, _LEARNED.replace(transform=_learned(b2=0.9)), None),
  (
    'Learned.config.warmup_fraction',
    _LEARNED,
    _LEARNED.replace(transform=_learned(warmup_fraction=0.5)),
    None,
  ),
  ('GPTQ.damp/Frobenius', _LEARNED, _LEARNED.replace(rounding=R.GPTQ(damp=0.5)), None),
  ('GPTQ.act_order/Frobenius', _LEARNED, _LEARNED.replace(rounding=R.GPTQ(act_order=True)), None),
  (
    'GPTQ.damp/SelfGenerated',
    _SELFGEN,
    _SELFGEN.replace(rounding=R.GPTQ(statistics=_selfgen(), damp=0.5)),
    None,
  ),
  (
    'GPTQ.act_order/SelfGenerated',
    _SELFGEN,
    _SELFGEN.replace(rounding=R.GPTQ(statistics=_selfgen(), act_order=True)),
    None,
  ),
  (
    'SelfGenerated.num_seqs',
    _SELFGEN,
    _SELFGEN.replace(rounding=R.GPTQ(statistics=_selfgen(num_seqs=3))),
    None,
  ),
  (
    'SelfGenerated.seq_len',
    _SELFGEN,
    _SELFGEN.replace(rounding=R.GPTQ(statistics=_selfgen(seq_len=10))),
    None,
  ),
  (
    'SelfGenerated.temperature',
    _SELFGEN,
    _SELFGEN.replace(rounding=R.GPTQ(statistics=_selfgen(temperature=0.5))),
    None,
  ),
  ('PairTransforms.kinds', _PAIRS, _VO, None),
  ('PairTransforms.opt.steps', _VO, _VO.replace(pairs=_pairs(kinds=('vo',), steps=8)), {'v', 'o'}),
  (
    'PairAdaptive.rounds',
    _ADAPTIVE,
    _ADAPTIVE.replace(rounding=R.PairAdaptive(rounds=1)),
    {'v', 'o'},
  ),
  (
    'PairAdaptive.solver',
    _ADAPTIVE,
    _ADAPTIVE.replace(rounding=R.PairAdaptive(solver='rtn')),
    {'v', 'o'},
  ),
]


@functools.lru_cache(maxsize=None)
def _model():
  cfg = models.PRESETS['tiny_llama']
  return cfg, models.init_params(cfg, jax.random.PRNGKey(0))


@functools.lru_cache(maxsize=None)
def _codes(recipe: R.Recipe) -> dict[tuple[int, str], np.ndarray]:
  cfg, params = _model()
  qparams, _ = methods.quantize(params, cfg, recipe, jax.random.PRNGKey(0))
  qarrays, _ = linears.quantized_matrices(qparams, cfg)
  return {k: np.asarray(q.codes) for k, q in qarrays.items()}


def test_the_cases_change_one_field_of_one_stage_each():
  for field, base, changed, _ in CASES:
    stage = field.split('.')[0]
    slot = {
      'Hadamard': 'transform',
      'Learned': 'transform',
      'GPTQ': 'rounding',
      'SelfGenerated': 'rounding',
      'PairTransforms': 'pairs',
      'PairAdaptive': 'rounding',
    }[stage]
    diff = [
      f.name
      for f in dataclasses.fields(R.Recipe)
      if getattr(base, f.name) != getattr(changed, f.name)
    ]
    assert diff == [slot], field
  assert _HADAMARD.transform == R.Hadamard(block_size=64, share=False)  # the defaults
  assert _PAIRS.pairs.kinds == R.PairTransforms().kinds
  assert _ADAPTIVE.rounding == R.PairAdaptive(rounds=3, solver='gptq')
  assert _SELFGEN.rounding.damp == 0.01 and not _SELFGEN.rounding.act_order
  assert _SELFGEN.statistics.temperature == 1.0


@pytest.mark.parametrize('field, base, changed, allowed', CASES, ids=[c[0] for c in CASES])
def test_changing_a_stage_field_changes_the_codes(field, base, changed, allowed):
  a, b = _codes(base), _codes(changed)
  assert sorted(a) == sorted(b)
  differ = sorted({n for l, n in a if not np.array_equal(a[(l, n)], b[(l, n)])})
  assert differ, f'{field}: no code changed (a silent no-op)'
  if allowed is not None:
    assert set(differ) <= allowed, f'{field} changed {differ}, expected only {sorted(allowed)}'
