"""Recipes: stage validation, overrides by name, dict round trips, the presets."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from cafeq_jax import quantizer
from cafeq_jax import recipes
from cafeq_jax.core import optimize
from cafeq_jax.core import pairs as pairs_lib
from cafeq_jax.core import proxy
from cafeq_jax.core import transforms

R = recipes


# --------------------------------------------------------------------------------
# Stage validation.


@pytest.mark.parametrize(
  'make, match',
  [
    (lambda: R.Recipe(spec=dict(bits=5)), 'bits=5'),
    (lambda: R.Recipe(spec=dict(bits=3, group_size=100)), 'group_size=100'),
    (lambda: R.Recipe(matrices=('q', 'k')), r"\('k', 'v'\) share one param leaf"),
    (lambda: R.Recipe(matrices=('gate', 'up', 'mlp')), r"unknown: \['mlp'\]"),
    (lambda: R.Recipe(matrices=()), 'non-empty'),
    (lambda: R.Recipe(matrices=('q', 'q')), 'without repeats'),
    (lambda: R.Hadamard(block_size=48), 'power-of-two block_size; got 48'),
    (lambda: R.Hadamard(block_size=0), 'block_size=0'),
    (lambda: R.Hadamard(block_size=True), 'block_size=True'),
    (lambda: optimize.TransformConfig(block_size=0), 'block_size=0'),
    (lambda: optimize.TransformConfig(block_size=48, init='hadamard'), 'power-of-two'),
    (lambda: optimize.TransformConfig(optimizer='rmsprop'), "optimizer='rmsprop'"),
    (lambda: optimize.TransformConfig(schedule='linear'), "schedule='linear'"),
    (lambda: optimize.TransformConfig(steps=-1), 'steps=-1'),
    (lambda: R.PairTransforms(kinds=('vo', 'xy')), r"pairs.kinds='xy'.*'vo', 'qk', 'updown'"),
    (lambda: R.PairTransforms(kinds=()), 'non-empty without repeats'),
    (lambda: R.PairTransforms(kinds=('vo', 'vo')), 'non-empty without repeats'),
    (lambda: pairs_lib.PairOptConfig(loss='mse'), "loss='mse'"),
    (lambda: pairs_lib.PairOptConfig(ste='half'), "ste='half'"),
    (lambda: pairs_lib.PairOptConfig(learning_rate=0.0), 'learning_rate=0.0'),
    (lambda: R.PairAdaptive(solver='ar'), "solver='ar'.*'rtn', 'gptq'"),
    (lambda: R.PairAdaptive(rounds=-1), 'rounds=-1'),
    (lambda: R.PairAdaptive(damp=1.0), 'damp=1.0'),
    (lambda: R.GPTQ(damp=2.0), r'damp=2.0 must be in \[0, 1\)'),
    (lambda: R.GPTQ(block=0), 'block=0'),
    (lambda: R.SelfGenerated(num_seqs=0), 'num_seqs=0'),
    (lambda: R.SelfGenerated(seq_len=1), 'seq_len=1 must be an int >= 2'),
    (lambda: R.SelfGenerated(temperature=0.0), 'temperature=0.0'),
    (lambda: R.SelfGenerated(start_id=-1), 'start_id=-1'),
    (lambda: R.SelfGenerated(batch_size=0), 'batch_size=0'),
    (lambda: R.Calibration(num_seqs=0), 'num_seqs=0'),
    (lambda: R.Calibration(seq_len=1), 'seq_len=1'),
  ],
)
def test_bad_stage_values_raise_value_errors_naming_the_value(make, match):
  with pytest.raises(ValueError, match=match):
    make()


@pytest.mark.parametrize(
  'make, match',
  [
    (lambda: R.Recipe(matrices='q'), 'not the string'),
    (lambda: R.Recipe(spec='w4g128'), 'spec must be a QuantSpec'),
    (lambda: R.Recipe(transform='random'), 'transform must be Hadamard | Learned | None'),
    (lambda: R.Recipe(transform=R.RTN()), 'transform must be'),
    (lambda: R.Recipe(pairs=R.Hadamard()), 'pairs must be PairTransforms | None'),
    (lambda: R.Recipe(rounding=R.Frobenius()), 'rounding must be RTN | GPTQ | PairAdaptive'),
    (lambda: R.Recipe(rounding='gptq'), 'rounding must be'),
    (lambda: R.GPTQ(statistics='selfgen'), 'GPTQ.statistics must be'),
    (lambda: R.GPTQ(statistics=R.RTN()), 'GPTQ.statistics must be'),
    (lambda: R.GPTQ(act_order=1), 'act_order=1 must be a bool'),
    (lambda: R.PairTransforms(kinds='vo'), 'sequence of pair kinds'),
  ],
)
def test_wrong_stage_types_raise_type_errors(make, match):
  with pytest.raises(TypeError, match=match):
    make()


def test_pair_adaptive_rounding_without_pairs_is_refused():
  with pytest.raises(ValueError, match=r'PairAdaptive\(\) .* needs pairs=PairTransforms'):
    R.Recipe(rounding=R.PairAdaptive())
  with pytest.raises(ValueError, match='needs pairs'):
    R.PRESETS['cafeq-pairs-ar'].replace(pairs=None)
  ok = R.Recipe(pairs=R.PairTransforms(), rounding=R.PairAdaptive())
  assert ok.statistics is None and not ok.sequential


def test_input_weighted_transforms_need_the_roundings_token_statistics():
  with pytest.raises(ValueError, match=r"Learned\(loss='input'\) weights .* needs rounding=GPTQ"):
    R.Recipe(transform=R.Learned(loss='input'))
  with pytest.raises(ValueError, match=r"Learned\(loss='input'\)"):
    R.Recipe(transform=R.Learned(loss='input'), rounding=R.GPTQ())  # Frobenius: no tokens
  with pytest.raises(ValueError, match="transform.loss='sigma' is not supported"):
    R.Learned(loss='sigma')
  sg = R.GPTQ(statistics=R.SelfGenerated())
  r = R.Recipe(transform=R.Learned(loss='input', share=True), rounding=sg)
  assert r.transform.loss is R.TransformLoss.INPUT and r.sequential
  assert R.Recipe.from_dict(r.to_dict()) == r
  assert R.Recipe(transform=R.Learned(), rounding=sg).transform.loss == 'frobenius'


def test_hadamard_refuses_every_non_power_of_two_block_size():
  for k in (3, 6, 12, 24, 48, 96):
    with pytest.raises(ValueError, match=f'power-of-two block_size; got {k}'):
      R.Hadamard(block_size=k)
  assert [R.Hadamard(block_size=k).block_size for k in (1, 2, 16, 64, 256)] == [1, 2, 16, 64, 256]
  with pytest.raises(ValueError, match='power-of-two'):
    R.get('hadamard', transform__block_size=48)


def test_statistics_with_rtn_rounding_cannot_be_written():
  # Σ exists only inside GPTQ: no RTN field takes it, no override reaches it.
  with pytest.raises(TypeError):
    R.RTN(statistics=R.SelfGenerated())  # pylint: disable=unexpected-keyword-arg
  with pytest.raises(ValueError, match="rounding=RTN\\(\\), which has no field 'num_seqs'"):
    R.get('rtn', statistics__num_seqs=4)


def test_strings_and_mappings_are_normalised_to_their_types():
  r = R.Recipe(
    spec=dict(bits=3, group_size=64),
    matrices=['down', 'q'],
    pairs=R.PairTransforms(kinds=['updown', 'vo']),
    rounding=R.PairAdaptive(solver='rtn'),
  )
  assert r.spec == quantizer.QuantSpec(bits=3, group_size=64)
  assert r.matrices == ('q', 'down')  # canonical order
  assert r.pairs.kinds == (R.PairKind.UPDOWN, R.PairKind.VO)
  assert all(type(k) is R.PairKind for k in r.pairs.kinds)
  assert r.rounding.solver is R.Solver.RTN
  t = optimize.TransformConfig(schedule='constant', init='hadamard', optimizer='adamw', ste='full')
  assert t.schedule is optimize.Schedule.CONSTANT
  assert t.init is transforms.TransformInit.HADAMARD
  assert t.optimizer is optimize.Optimizer.ADAMW
  assert t.ste is proxy.Ste.FULL
  # A StrEnum member equals its string: configs from strings and members agree.
  assert t == optimize.TransformConfig(
    schedule=optimize.Schedule.CONSTANT,
    init=transforms.TransformInit.HADAMARD,
    optimizer=optimize.Optimizer.ADAMW,
    ste=proxy.Ste.FULL,
  )


def test_statistics_and_sequential_follow_the_rounding_stage():
  expected = {
    'rtn': (None, False),
    'cafeq-single': (None, False),
    'cafeq-pairs-ar': (None, False),
    'cafeq-paper': (None, False),
    'cafeq-sg': (R.SelfGenerated, True),
    'gptq': (R.Calibration, True),
    'gptq-selfgen': (R.SelfGenerated, True),
  }
  for name, (stats_type, sequential) in expected.items():
    r = R.PRESETS[name]
    assert (r.statistics is None) == (stats_type is None), name
    if stats_type is not None:
      assert type(r.statistics) is stats_type, name
    assert r.sequential == sequential, name
  frob = R.Recipe(rounding=R.GPTQ())
  assert frob.statistics == R.Frobenius() and not frob.sequential


# --------------------------------------------------------------------------------
# Overrides by name.


def test_get_sets_the_quantizer_and_overrides_reach_nested_core_configs():
  r = R.get(
    'cafeq-single',
    bits=2,
    group_size=None,
    symmetric=True,
    transform__block_size=32,
    transform__steps=7,
    transform__learning_rate=1e-3,
    transform__schedule='constant',
    transform__init='hadamard',
  )
  assert r.spec == quantizer.QuantSpec(bits=2, group_size=None, symmetric=True, group_fallback=True)
  t = r.transform.config
  assert (t.block_size, t.steps, t.learning_rate, t.schedule, t.init) == (
    32,
    7,
    1e-3,
    'constant',
    'hadamard',
  )
  assert t.schedule is optimize.Schedule.CONSTANT
  assert t.columns_per_step == 256  # the preset's own value is kept
  assert r.transform.block_size == 32
  p = R.get(
    'cafeq-pairs-sg',
    pairs__steps=3,
    pairs__loss='product',
    pairs__kinds=('vo',),
    statistics__num_seqs=5,
    rounding__damp=0.1,
    transform__share=False,
  )
  assert (p.pairs.opt.steps, p.pairs.opt.loss, p.pairs.kinds) == (3, 'product', ('vo',))
  assert p.statistics.num_seqs == 5 and p.statistics.seq_len == 256
  assert p.rounding.damp == 0.1 and p.rounding.act_order
  assert p.transform == R.Hadamard(block_size=64, share=False)
  spec = quantizer.QuantSpec(bits=4, group_size=32, clip_search=True)
  assert R.get('rtn', spec=spec, bits=2).spec is spec  # a full spec wins


def test_override_equals_get_and_is_validated_again():
  base = R.PRESETS['cafeq-sg']
  a = R.override(
    base,
    {
      'transform.block_size': 32,
      'statistics.seq_len': 16,
      'spec.bits': 2,
      'matrices': ('gate', 'up', 'down'),
    },
  )
  assert a.transform == R.Hadamard(block_size=32, share=True)
  assert a.statistics.seq_len == 16 and a.spec.bits == 2
  assert a.matrices == ('gate', 'up', 'down')
  assert base.transform.block_size == 64  # presets are not modified
  b = R.get(
    'cafeq-sg',
    spec=base.spec,
    transform__block_size=32,
    statistics__seq_len=16,
    spec__bits=2,
    matrices=('gate', 'up', 'down'),
  )
  assert a == b
  with pytest.raises(ValueError, match='seq_len=1'):
    R.override(base, {'statistics.seq_len': 1})
  with pytest.raises(ValueError, match='share one param leaf'):
    R.override(base, {'matrices': ('gate',)})
  with pytest.raises(TypeError, match='not the string'):
    R.get('rtn', matrices='q')


def test_overrides_of_one_stage_are_applied_together_whatever_their_order():
  base = R.get('cafeq-single', transform__init='hadamard', transform__block_size=32)
  for order in (
    (('transform.block_size', 48), ('transform.init', 'identity')),
    (('transform.init', 'identity'), ('transform.block_size', 48)),
  ):
    r = R.override(base, dict(order))
    assert (r.transform.config.block_size, r.transform.config.init) == (48, 'identity')
  # Spec fields too, and a bad combination is still refused as a whole.
  r = R.override(base, {'spec.group_size': None, 'spec.symmetric': True, 'spec.bits': 2})
  assert r.spec == quantizer.QuantSpec(bits=2, group_size=None, symmetric=True, group_fallback=True)
  with pytest.raises(ValueError, match='power-of-two'):
    R.override(base, {'transform.block_size': 48})
  # A whole core config and one of its fields: the field applies to the new config.
  r = R.override(
    base, {'transform.config': optimize.TransformConfig(block_size=16), 'transform.steps': 5}
  )
  assert r.transform.config == optimize.TransformConfig(block_size=16, steps=5)


@pytest.mark.parametrize(
  'key, match',
  [
    ('transform.stepz', r"no transform stage has a field 'stepz'; known: \[.*'steps'"),
    ('pairs.bogus', "no pairs stage has a field 'bogus'"),
    ('rounding.bogus', "no rounding stage has a field 'bogus'"),
    ('statistics.bogus', "no rounding stage has a field 'bogus'"),
    ('spec.bitz', "QuantSpec has no field 'bitz'"),
    ('foo.bar', 'expected <slot>.<field>'),
    ('transform', 'expected <slot>.<field>'),
  ],
)
def test_unknown_override_fields_are_errors_even_when_not_strict(key, match):
  for strict in (True, False):
    with pytest.raises(ValueError, match=match):
      R.override(R.PRESETS['cafeq-pairs-sg'], {key: 1}, strict=strict)


@pytest.mark.parametrize(
  'name, key',
  [
    ('hadamard', 'transform.steps'),  # a Learned field on a Hadamard transform
    ('rtn', 'transform.block_size'),  # no transform at all
    ('rtn', 'pairs.steps'),  # no pairs
    ('cafeq-sg', 'rounding.rounds'),  # a PairAdaptive field on GPTQ
    ('gptq', 'statistics.temperature'),  # a SelfGenerated field on Calibration
    ('cafeq-pairs-ar', 'statistics.num_seqs'),  # no statistics
  ],
)
def test_fields_of_another_stage_type_are_errors_only_when_strict(name, key):
  recipe = R.get(name)
  with pytest.raises(ValueError, match=f"override '{re.escape(key)}': the recipe '{name}'"):
    R.override(recipe, {key: 3})
  assert R.override(recipe, {key: 3}, strict=False) == recipe
  assert R.get(name, strict=False, **{key.replace('.', '__'): 3}) == recipe


def test_non_strict_overrides_apply_where_the_field_exists():
  opts = {'transform.steps': 5, 'transform.block_size': 32, 'statistics.num_seqs': 4}
  got = {n: R.override(R.get(n), opts, strict=False) for n in R.names()}
  assert got['rtn'] == R.get('rtn')
  assert got['hadamard'].transform == R.Hadamard(block_size=32)
  assert got['cafeq-single'].transform.config.steps == 5
  assert got['cafeq-single'].transform.block_size == 32
  assert got['cafeq-sg'].statistics.num_seqs == 4
  assert got['gptq'].statistics.num_seqs == 4  # Calibration has num_seqs too


def test_unknown_preset_lists_the_names():
  with pytest.raises(ValueError, match=r"recipe 'awq' is unknown; expected one of \['rtn'"):
    R.get('awq')


# --------------------------------------------------------------------------------
# Dicts and presets.


@pytest.mark.parametrize('name', list(R.PRESETS))
def test_every_preset_round_trips_through_json_dicts(name):
  r = R.get(name, bits=4, group_size=64, clip_search=True)
  d = json.loads(json.dumps(r.to_dict()))
  back = R.Recipe.from_dict(d)
  assert back == r
  for slot in ('spec', 'pairs', 'transform', 'rounding'):
    assert type(getattr(back, slot)) is type(getattr(r, slot)), slot
  if r.statistics is not None:
    assert type(back.statistics) is type(r.statistics)
  assert R.Recipe.from_dict(R.PRESETS[name].to_dict()) == R.PRESETS[name]


def test_to_dict_names_each_stage_type_and_plain_values():
  d = R.PRESETS['cafeq-pairs-sg'].to_dict()
  assert d['type'] == 'Recipe' and d['name'] == 'cafeq-pairs-sg'
  assert d['pairs']['type'] == 'PairTransforms' and d['pairs']['kinds'] == ['vo', 'qk', 'updown']
  assert d['pairs']['opt'] == {
    'type': 'PairOptConfig',
    'loss': 'lse',
    'steps': 200,
    'learning_rate': 5e-3,
    'temperature': 0.05,
    'eval_every': 5,
    'ste': 'round',
  }
  assert d['transform'] == {'type': 'Hadamard', 'block_size': 64, 'share': True}
  assert d['rounding']['statistics']['type'] == 'SelfGenerated'
  assert d['spec']['type'] == 'QuantSpec' and d['spec']['bits'] == 4


@pytest.mark.parametrize(
  'd, match',
  [
    ({'type': 'Recipe', 'bitz': 3}, r"Recipe has no fields \['bitz'\]"),
    (
      {'type': 'Recipe', 'transform': {'type': 'Hadamard', 'k': 3}},
      r"Hadamard has no fields \['k'\]",
    ),
    ({'type': 'Recipe', 'transform': {'type': 'Rotation'}}, "unknown recipe component 'Rotation'"),
    ({'type': 'Hadamard', 'block_size': 64}, "expected a dict with type 'Recipe'.*'Hadamard'"),
    ({'name': 'rtn'}, "expected a dict with type 'Recipe'"),
    ({'type': 'Recipe', 'transform': {'type': 'Hadamard', 'block_size': 48}}, 'power-of-two'),
  ],
)
def test_from_dict_refuses_unknown_types_and_fields(d, match):
  with pytest.raises(ValueError, match=match):
    R.Recipe.from_dict(d)


def _docstring_presets() -> dict[str, str]:
  doc = R.__doc__
  section = doc[doc.index('Presets') :]
  out = {}
  for line in section.splitlines()[1:]:
    m = re.match(r'^  (\S+)\s{2,}(\S.*)$', line)
    if m:
      out[m.group(1)] = m.group(2)
  return out


def test_every_preset_has_a_one_line_entry_in_the_module_docstring():
  entries = _docstring_presets()
  assert sorted(entries) == sorted(R.PRESETS)
  assert list(entries) == list(R.PRESETS)  # same order as PRESETS


def test_presets_are_named_after_their_keys_and_names_lists_them():
  assert R.names() == tuple(R.PRESETS)
  for name, r in R.PRESETS.items():
    assert r.name == name
    assert R.get(name).name == name
  assert R.get('rtn').spec == quantizer.QuantSpec(bits=3, group_size=128, group_fallback=True)


def test_presets_have_the_stages_their_docstring_entries_name():
  p = R.PRESETS
  assert (p['rtn'].pairs, p['rtn'].transform, p['rtn'].rounding) == (None, None, R.RTN())
  assert p['hadamard'].transform == R.Hadamard(block_size=64)
  assert isinstance(p['cafeq-single'].transform, R.Learned)
  assert p['cafeq-pairs'].pairs.kinds == ('vo', 'qk', 'updown')
  assert p['cafeq-pairs'].pairs.opt.loss == 'lse' and p['cafeq-pairs'].rounding == R.RTN()
  assert isinstance(p['cafeq-pairs-ar'].rounding, R.PairAdaptive)
  paper = p['cafeq-paper']  # the paper's data-free recipe: nothing self-generated
  assert paper.pairs.kinds == ('vo',) and isinstance(paper.rounding, R.PairAdaptive)
  assert paper.transform == p['cafeq-single'].transform and paper.statistics is None
  for name in ('cafeq-sg', 'cafeq-sg-rounding', 'cafeq-pairs-sg', 'cafeq'):
    assert p[name].rounding == R.GPTQ(statistics=R.SelfGenerated(), act_order=True), name
  assert p['cafeq-sg'].transform == R.Hadamard(block_size=64, share=True)
  assert p['cafeq-sg-rounding'].transform is None and p['cafeq-sg-rounding'].pairs is None
  old = p['cafeq-pairs-sg']  # the cafeq of earlier releases
  assert old.pairs == R.PairTransforms() and old.transform == p['cafeq-sg'].transform
  assert p['cafeq'].pairs is None  # the best data-free recipe
  single = p['cafeq-single'].transform.config  # 180 steps, less momentum, lr 4e-2 ...
  assert (single.steps, single.learning_rate, single.b1, single.b2) == (180, 4e-2, 0.5, 0.95)
  assert single.warmup_fraction == 0.1 and single.eval_every is None
  # ... and cafeq's is the same at 150 steps (quantize time), one per param leaf.
  assert p['cafeq'].transform == R.Learned(
    config=dataclasses.replace(single, steps=150), share=True
  )
  assert p['cafeq'].transform.loss == 'frobenius'
  assert p['gptq'].statistics == R.Calibration(source='in-domain')
  assert p['gptq-offdomain'].statistics == R.Calibration(source='code')
  assert p['gptq-selfgen'].rounding == R.GPTQ(statistics=R.SelfGenerated())  # natural order
  for r in p.values():
    assert dataclasses.replace(r) == r  # frozen, comparable
