"""The learned-transform ablation runs end to end on a tiny model and resumes."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

from cafeq_jax import recipes
from experiments import transform_study
from experiments.configs import transform_study as study_config


def _config(out):
  c = study_config.get_config()
  c.model = 'tiny_llama'
  c.variants = 'rtn,dense,lu'
  c.column = 'w3g32'
  c.texts = 'pydoc'
  c.eval_num_seqs = 2
  c.eval_seq_len = 16
  c.output_dir = str(out)
  return c


def test_study_records_the_proxy_conditioning_and_quality_of_every_row(tmp_path):
  results = transform_study.run(_config(tmp_path))
  rows = results['rows']
  assert list(rows) == ['rtn', 'dense', 'lu']
  assert rows['rtn']['proxy_ratio_total'] == pytest.approx(1.0)
  assert 'cond_max' not in rows['rtn']  # no transform
  for v in ('dense', 'lu'):
    assert rows[v]['proxy_ratio_total'] < 1.0  # keep-best: never above RTN, here below
    assert set(rows[v]['proxy_ratio']) == set(transform_study.MATRICES)
    assert rows[v]['cond_max'] >= 1.0 and 0 < rows[v]['bf16_rel_err_max'] < 0.05
    assert rows[v]['ppl_pydoc'] > 1.0
  table = open(os.path.join(tmp_path, 'table.md')).read()
  assert '| dense |' in table and '| lu |' in table
  # A second run keeps every finished row (same inputs).
  before = json.load(open(os.path.join(tmp_path, 'results.json')))
  again = transform_study.run(_config(tmp_path))
  assert again['rows'] == before['rows']


def test_unknown_variant_is_refused_before_the_model_loads(tmp_path):
  c = _config(tmp_path)
  c.variants = 'rtn,dense-9000'
  with pytest.raises(ValueError, match="variant 'dense-9000' is unknown"):
    transform_study.run(c)


def test_proxy_only_mode_optimises_one_matrix_and_skips_rtn(tmp_path):
  c = _config(tmp_path)
  c.matrix = 'up'
  results = transform_study.run(c)
  rows = results['proxy_only']['up']
  assert list(rows) == ['dense', 'lu']
  assert all(0 < r['proxy_ratio'] < 1 for r in rows.values())
  assert 'rows' not in results or not results['rows']  # no perplexity rows


def test_whole_recipe_rows_run_with_extra_seeds_and_the_table_gives_mean_and_std(
  tmp_path, monkeypatch
):
  small = study_config.RECIPES['sg-learned-input']
  small = recipes.override(
    small,
    {'statistics.num_seqs': 4, 'statistics.seq_len': 16, 'transform.steps': 10},
  )
  monkeypatch.setitem(study_config.RECIPES, 'sg-learned-input', small)
  c = _config(tmp_path)
  c.variants = 'rtn,sg-learned-input'
  c.seeds = '1'
  results = transform_study.run(c)
  rows = results['rows']
  assert list(rows) == ['rtn', 'sg-learned-input', 'sg-learned-input@1']
  assert [rows[v]['seed'] for v in rows] == [0, 0, 1]
  assert rows['sg-learned-input']['ppl_pydoc'] != rows['sg-learned-input@1']['ppl_pydoc']
  for v in ('sg-learned-input', 'sg-learned-input@1'):
    assert 0 < rows[v]['layer_loss_ratio'] < 1  # GPTQ under the transform beats RTN
    assert rows[v]['timings']['input_statistics'] > 0
  table = open(os.path.join(tmp_path, 'table.md')).read()
  line = next(x for x in table.splitlines() if x.startswith('| sg-learned-input |'))
  ppl = [rows[v]['ppl_pydoc'] for v in ('sg-learned-input', 'sg-learned-input@1')]
  assert '| 2 |' in line and f'{np.mean(ppl):.2f} ± {np.std(ppl, ddof=1):.2f}' in line
  c.seeds = '0'
  with pytest.raises(ValueError, match='repeats config.seed=0'):
    transform_study.run(c)


def test_study_rows_are_anchored_to_the_presets_they_measured():
  spec = recipes.get('rtn').spec
  # The preset is a row of the study (dense-180-b0.5-lr4e-2-wu0.1), and cafeq's
  # transform is that one at 150 steps, shared per leaf (row sg-learned-150; 180, 120
  # and 100 steps are rows sg-learned-180, -120 and -100); cafeq-150 is the cafeq of the
  # last release: the base row but for its keep-best evaluation, at the end only (the
  # same quantized SmolLM2 at seeds 0-2). The study's cafeq-learned row was measured
  # with the base row's.
  single = recipes.PRESETS['cafeq-single'].transform
  assert transform_study.recipe_for('dense-180-b0.5-lr4e-2-wu0.1', spec).transform == single
  cafeq = recipes.PRESETS['cafeq']  # (test_recipes pins the preset itself)
  row = study_config.RECIPES['sg-learned-150']
  assert row.transform.config == dataclasses.replace(single.config, steps=150)
  assert row == cafeq.replace(name='sg-learned-150')
  for n in (120, 100):  # fewer steps (quantize time)
    fewer = dataclasses.replace(cafeq.transform.config, steps=n)
    assert study_config.RECIPES[f'sg-learned-{n}'] == cafeq.replace(
      name=f'sg-learned-{n}', transform=dataclasses.replace(cafeq.transform, config=fewer)
    )
  assert study_config.RECIPES['sg-learned-180'] == cafeq.replace(
    name='sg-learned-180', transform=dataclasses.replace(single, share=True)
  )
  base = transform_study.recipe_for('dense', spec).transform.config
  assert base.eval_every == 10
  assert study_config.RECIPES['cafeq-150'] == cafeq.replace(
    name='cafeq-150',
    transform=recipes.Learned(config=dataclasses.replace(base, eval_every=None), share=True),
  )
  assert study_config.RECIPES['cafeq-learned'].transform.config == base
  assert study_config.BASE.steps == 150


def test_pair_kind_rows_are_cafeq_pairs_with_one_kind_and_the_tables_steps():
  from experiments import quantize_lib  # pylint: disable=g-import-not-at-top
  from experiments.configs import pair_kinds
  from experiments.configs import quality_table

  spec = recipes.get('rtn').spec
  preset = recipes.get('cafeq-pairs', spec=spec)
  for kind in recipes.PairKind:
    row = transform_study.recipe_for(f'pairs-{kind}', spec)
    assert row.pairs.kinds == (kind,) and row.pairs.opt == preset.pairs.opt
    assert row.replace(name='cafeq-pairs', pairs=preset.pairs) == preset
  # pairs-100 is the quality table's cafeq-pairs row (its stage override applied).
  table = quantize_lib.recipe_for('cafeq-pairs', spec, quality_table.get_config())
  assert transform_study.recipe_for('pairs-100', spec).replace(name='cafeq-pairs') == table
  assert table.pairs.opt.steps == 100 != preset.pairs.opt.steps
  for row in transform_study.rows_of(pair_kinds.get_config()):
    transform_study.recipe_for(row, spec)


def test_export_check_reads_every_row_back_with_transformers_at_its_own_quality(tmp_path):
  """``--config.export_check``: the HF export of each row (fp too), scored by
  transformers on the same windows, gives the perplexity our forward gives the
  quantized params (online transforms applied at run time)."""
  pytest.importorskip('torch')
  pytest.importorskip('transformers')
  c = _config(tmp_path)
  c.variants = 'rtn,dense'
  c.export_check = True
  results = transform_study.run(c)
  # float32 on both sides: observed |Δlogit| <= 1.5e-7 (the tiny model's quantized
  # logits differ from its fp ones by about 3.5e-3, so exporting the wrong weights fails).
  for r in (results['fp'], *results['rows'].values()):
    assert r['ppl_hf_pydoc'] == pytest.approx(r['ppl_pydoc'], rel=1e-5)
    assert r['hf_logit_diff_max'] < 1e-5
  assert results['rows']['dense']['ppl_pydoc'] != results['rows']['rtn']['ppl_pydoc']
  assert not [n for n in os.listdir(tmp_path) if n.startswith('.hf_check_')]  # removed
  table = open(os.path.join(tmp_path, 'table.md')).read()
  assert 'ppl pydoc (HF export)' in table
  dense = next(x for x in table.splitlines() if x.startswith('| dense |'))
  assert f'{results["rows"]["dense"]["ppl_hf_pydoc"]:.2f} |' in dense


def test_a_preset_name_is_a_row_of_its_own():
  spec = recipes.get('rtn').spec
  assert transform_study.recipe_for('cafeq-paper', spec) == recipes.get('cafeq-paper', spec=spec)
  assert transform_study.recipe_for('cafeq-single', spec) == recipes.get('cafeq-single', spec=spec)
