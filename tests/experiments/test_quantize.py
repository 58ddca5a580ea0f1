"""The main job: one tiny run writes results, table and plots; a rerun resumes."""

from __future__ import annotations

import json
import os

import jax
import pytest

from cafeq_jax import quantize
from cafeq_jax import recipes
from cafeq_jax.core import optimize
from experiments import quantize_lib
from experiments.configs import quantize as quantize_config
from tests.experiments import reference_metrics

_PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def _tiny_config(output_dir, methods='rtn,hadamard', plots=True):
  c = quantize_config.get_config()
  c.model = 'tiny_llama'
  c.methods = methods
  c.columns = 'w4g32'
  c.eval_num_seqs = 2
  c.eval_seq_len = 16
  c.eval_batch_size = 2
  c.output_dir = str(output_dir)
  c.save_models = ''
  c.prompt = ''
  c.progress = False
  c.cafeq.transform.steps = 1
  c.cafeq.transform.block_size = 32
  c.plots = plots
  return c


def _assert_png(path):
  assert os.path.getsize(path) > 1000, path
  with open(path, 'rb') as f:
    assert f.read(8) == _PNG_MAGIC, path


def test_tiny_run_writes_results_table_and_plots_then_resumes(tmp_path, monkeypatch):
  config = _tiny_config(tmp_path)
  results = quantize_lib.run(config)

  with open(tmp_path / 'results.json') as f:
    on_disk = json.load(f)
  col = 'w4g32asym'
  assert set(on_disk['columns']) == {col}
  rows = on_disk['columns'][col]['methods']
  assert set(rows) == {'fp', 'rtn', 'hadamard'}
  model = quantize_lib.load_model(config.model, config.seed)
  tokens = reference_metrics.job_tokens(model, config)
  for m in ('rtn', 'hadamard'):
    recipe = quantize_lib.recipe_for(m, quantize_lib.parse_column(config.columns), config)
    qparams, _ = quantize(model.params, model.config, recipe, jax.random.PRNGKey(config.seed))
    reference_metrics.assert_row_matches(
      rows[m], reference_metrics.metrics(model.config, model.params, qparams, tokens)
    )
    assert 4 < rows[m]['bits_per_weight'] < 32
  assert rows['fp']['kld'] == 0.0
  assert results['columns'][col]['methods']['rtn']['ppl'] == rows['rtn']['ppl']

  table = (tmp_path / 'table.md').read_text()
  assert '| rtn |' in table and '| hadamard |' in table and f'{col} ppl' in table

  for m in ('rtn', 'hadamard'):
    report = json.loads((tmp_path / 'reports' / f'{col}_{m}.json').read_text())
    assert len(report['per_matrix']) == 2 * 7  # tiny_llama: 2 layers x 7 matrices
  plots = sorted(os.listdir(tmp_path / 'plots'))
  assert plots == sorted([f'proxy_{col}.png', f'proxy_loss_{col}.png', 'ppl_vs_bits.png'])
  for p in plots:
    _assert_png(tmp_path / 'plots' / p)

  # Rerun with the same config: every cell is done, nothing is re-quantized.
  def fail(*args, **kwargs):
    raise AssertionError('a finished (column, method) cell was quantized again')

  monkeypatch.setattr(quantize_lib, 'quantize', fail)
  again = quantize_lib.run(config)
  assert again['columns'][col]['methods']['rtn']['ppl'] == rows['rtn']['ppl']
  assert (tmp_path / 'table.md').read_text() == table


def test_cafeq_options_left_unset_keep_every_presets_own_stages(monkeypatch):
  config = quantize_config.get_config()
  spec = quantize_lib.parse_column('w3g128')
  for name in recipes.names():  # the job's defaults change no recipe
    want = recipes.get(name, spec=spec)
    assert quantize_lib.recipe_for(name, spec, config) == want, name
  # A preset whose learned transform differs from cafeq-single's keeps it ...
  other = recipes.PRESETS['cafeq'].replace(
    transform=recipes.Learned(
      config=optimize.TransformConfig(steps=7, learning_rate=3e-3, parameterization='lu')
    )
  )
  monkeypatch.setitem(recipes.PRESETS, 'cafeq', other)
  got = quantize_lib.recipe_for('cafeq', spec, config).transform.config
  assert (got.steps, got.learning_rate, got.parameterization) == (7, 3e-3, 'lu')
  # ... and a field the command line sets reaches it (and only that field).
  config.cafeq.transform.steps = 11
  got = quantize_lib.recipe_for('cafeq', spec, config).transform.config
  assert (got.steps, got.learning_rate, got.parameterization) == (11, 3e-3, 'lu')
  assert quantize_lib.recipe_for('cafeq-single', spec, config).transform.config.steps == 11
  config.lock()  # as on the command line: only declared fields can be set
  config.cafeq.transform.warmup_fraction = 0.25
  got = quantize_lib.recipe_for('cafeq-single', spec, config).transform.config
  assert (got.steps, got.warmup_fraction, got.b1) == (11, 0.25, 0.5)
  assert quantize_lib.recipe_for('rtn', spec, config) == recipes.get('rtn', spec=spec)


def test_unknown_method_fails_before_any_work(tmp_path):
  config = _tiny_config(tmp_path / 'out', methods='rtn,nope')
  with pytest.raises(ValueError, match='nope'):
    quantize_lib.run(config)
  assert not (tmp_path / 'out' / 'results.json').exists()


def test_tiny_run_with_data_free_selfgen_cafeq_saves_and_counts_storage(tmp_path):
  config = _tiny_config(tmp_path, methods='rtn,cafeq-sg')
  config.selfgen_num_seqs = 2
  config.selfgen_seq_len = 16
  config.save_models = 'cafeq-sg'
  results = quantize_lib.run(config)
  rows = results['columns']['w4g32asym']['methods']
  # The row's metrics: the same recipe and seed again (deterministic), scored with numpy.
  model = quantize_lib.load_model(config.model, config.seed)
  recipe = quantize_lib.recipe_for('cafeq-sg', quantize_lib.parse_column(config.columns), config)
  qparams, _ = quantize(model.params, model.config, recipe, jax.random.PRNGKey(config.seed))
  want = reference_metrics.metrics(
    model.config, model.params, qparams, reference_metrics.job_tokens(model, config)
  )
  reference_metrics.assert_row_matches(rows['cafeq-sg'], want)
  # Hadamard transforms are stored as sign bits: a small overhead over RTN.
  assert (
    rows['rtn']['bits_per_weight']
    < rows['cafeq-sg']['bits_per_weight']
    < (rows['rtn']['bits_per_weight'] + 1.5)
  )
  assert (tmp_path / 'models').is_dir()


def test_transform_storage_counts_signed_hadamard_blocks_as_sign_bits():
  import jax
  import numpy as np

  from cafeq_jax.core import transforms

  h = np.asarray(transforms.random_hadamard_blocks(jax.random.PRNGKey(0), 3, 64))
  assert quantize_lib.transform_nbytes(h) == 3 * (64 * 64 // 8 + 2)
  dense = h.copy()
  dense[1, 0, 0] *= 1.5
  assert quantize_lib.transform_nbytes(dense) == 2 * (64 * 64 // 8 + 2) + 2 * 64 * 64


@pytest.mark.slow
def test_tiny_run_with_cafeq_saving_and_samples(tmp_path):
  config = _tiny_config(tmp_path, methods='rtn,cafeq-single')
  config.save_models = 'cafeq-single'
  config.prompt = 'abc'
  config.max_new_tokens = 3
  results = quantize_lib.run(config)
  rows = results['columns']['w4g32asym']['methods']
  assert isinstance(rows['cafeq-single']['sample'], str)
  assert (tmp_path / 'models').is_dir()
  _assert_png(tmp_path / 'plots' / 'proxy_w4g32asym.png')


# ---------------------------------------------------------------------------
# Reliability (issue 14): content-keyed resume, concurrent runs, up-front
# validation, save/export requests, metrics before exports.

_COL = 'w4g32asym'


def _count_quantize(monkeypatch):
  """Wraps ``quantize_lib.quantize``; returns the list of method names it ran."""
  calls = []
  real = quantize_lib.quantize

  def counted(params, cfg, recipe, *args, **kwargs):
    calls.append(recipe.name)
    return real(params, cfg, recipe, *args, **kwargs)

  monkeypatch.setattr(quantize_lib, 'quantize', counted)
  return calls


def _write_text(path, seed):
  import numpy as np  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)
  path.write_text(' '.join(''.join(rng.choice(list('abcdefghij'), 5)) for _ in range(200)))


def test_edited_eval_text_replaced_weights_and_changed_seed_recompute(
  tmp_path, monkeypatch, caplog
):
  import jax  # pylint: disable=g-import-not-at-top

  from cafeq_jax.loading import hf  # pylint: disable=g-import-not-at-top
  from cafeq_jax.models import PRESETS  # pylint: disable=g-import-not-at-top
  from cafeq_jax.models import init_params  # pylint: disable=g-import-not-at-top

  cfg = PRESETS['tiny_llama']
  model_dir, text = tmp_path / 'model', tmp_path / 'eval.txt'
  hf.save_hf(init_params(cfg, jax.random.PRNGKey(0)), cfg, model_dir)
  _write_text(text, 0)
  config = _tiny_config(tmp_path / 'out', methods='rtn', plots=False)
  config.model, config.eval_text = str(model_dir), str(text)
  calls = _count_quantize(monkeypatch)

  def run():
    calls.clear()
    rows = quantize_lib.run(config)['columns'][_COL]['methods']
    return len(calls), rows['fp']['ppl'], rows['rtn']['hash']

  n, ppl0, h0 = run()
  assert n == 1
  assert run() == (0, ppl0, h0)  # same inputs: kept
  _write_text(text, 1)  # eval text edited in place (same path)
  n, ppl1, h1 = run()
  assert n == 1 and ppl1 != ppl0 and h1 != h0
  hf.save_hf(init_params(cfg, jax.random.PRNGKey(1)), cfg, model_dir)  # weights replaced
  n, ppl2, h2 = run()
  assert n == 1 and ppl2 != ppl1 and h2 not in (h0, h1)
  config.seed = 1  # seed changed
  n, _, h3 = run()
  assert n == 1 and h3 not in (h0, h1, h2)
  rows = json.loads((tmp_path / 'out' / 'results.json').read_text())['columns'][_COL]['methods']
  assert rows['rtn']['hash'] == h3 and rows['rtn']['inputs']['seed'] == 1
  # A kept cell says why it was kept; a recomputed one what changed.
  with caplog.at_level('INFO'):
    assert run()[0] == 0
    config.seed = 2
    assert run()[0] == 1
  logs = [r.getMessage() for r in caplog.records]
  assert any('rtn: kept (results.json holds it with the same inputs: weights' in m for m in logs), (
    logs[-8:]
  )
  assert any('rtn: computing (inputs changed since its result: seed)' in m for m in logs)


def test_two_concurrent_runs_on_one_output_dir_keep_both_cells(tmp_path, monkeypatch):
  import threading  # pylint: disable=g-import-not-at-top

  real = quantize_lib.quantize
  # Both runs have read results.json before either writes (the losing interleaving).
  barrier = threading.Barrier(2, timeout=120)

  def meet(*args, **kwargs):
    barrier.wait()
    return real(*args, **kwargs)

  monkeypatch.setattr(quantize_lib, 'quantize', meet)
  errors = []

  def run(methods):
    try:
      quantize_lib.run(_tiny_config(tmp_path, methods=methods, plots=False))
    except BaseException as e:  # pylint: disable=broad-except
      errors.append(e)
      barrier.abort()

  threads = [threading.Thread(target=run, args=(m,)) for m in ('rtn', 'hadamard')]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors, errors
  rows = json.loads((tmp_path / 'results.json').read_text())['columns'][_COL]['methods']
  assert set(rows) == {'fp', 'rtn', 'hadamard'}
  table = (tmp_path / 'table.md').read_text()
  assert '| rtn |' in table and '| hadamard |' in table


def _fail(what):
  def fail(*args, **kwargs):
    raise AssertionError(f'{what} ran before the bad option was reported')

  return fail


@pytest.mark.parametrize(
  'change, match, loads',
  [
    (dict(prompt='abc', max_new_tokens=0), 'max_new_tokens=0', False),
    (dict(eval_batch_size=0), 'eval_batch_size=0', False),
    (dict(export_hf='rtn', hf_is_a_file=True), 'hf.* exists and is not a directory', False),
    (dict(save_models='rtx'), r"save_models='rtx' names \['rtx'\]", False),
    (dict(export_hf='rtn,hadamardd'), r"\['hadamardd'\], which are not rows", False),
    (dict(eval_seq_len=100), 'eval_seq_len=100 exceeds the max_seq_len=64', True),
    (dict(prompt='x' * 60, max_new_tokens=8), r'max_new_tokens=8 exceeds the max_seq_len', True),
  ],
)
def test_late_failing_options_fail_before_any_expensive_work(
  tmp_path, monkeypatch, change, match, loads
):
  config = _tiny_config(tmp_path, plots=False)
  change = dict(change)
  if change.pop('hf_is_a_file', False):
    (tmp_path / 'hf').write_text('not a directory')
  for k, v in change.items():
    config[k] = v
  monkeypatch.setattr(quantize_lib, 'quantize', _fail('quantize'))
  if not loads:
    monkeypatch.setattr(quantize_lib, 'load_model', _fail('the model load'))
  with pytest.raises(ValueError, match=match):
    quantize_lib.run(config)
  assert not (tmp_path / 'results.json').exists()


@pytest.mark.parametrize('content', ['', '{"columns": {"w4g32asym": {"metho', '{}', '[]'])
def test_corrupt_results_json_is_moved_aside_with_a_warning(tmp_path, content, caplog):
  (tmp_path / 'results.json').write_text(content)
  with caplog.at_level('WARNING'):
    results = quantize_lib.run(_tiny_config(tmp_path, methods='rtn', plots=False))
  assert set(results['columns'][_COL]['methods']) == {'fp', 'rtn'}
  aside = [p for p in os.listdir(tmp_path) if p.startswith('results.json.corrupt-')]
  assert len(aside) == 1 and (tmp_path / aside[0]).read_text() == content
  assert any('moved it aside' in r.getMessage() for r in caplog.records)


def test_done_rows_named_in_save_or_export_are_saved_on_a_rerun(tmp_path, monkeypatch):
  from cafeq_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from cafeq_jax.loading import hf  # pylint: disable=g-import-not-at-top

  config = _tiny_config(tmp_path, methods='rtn', plots=False)
  first = quantize_lib.run(config)['columns'][_COL]['methods']['rtn']
  assert not (tmp_path / 'models').exists() and not (tmp_path / 'hf').exists()
  # Rerun asking for a save and an export: params recomputed, metrics kept.
  calls = _count_quantize(monkeypatch)
  monkeypatch.setattr(quantize_lib.eval_lib, 'evaluate', _fail('evaluate'))
  config.save_models, config.export_hf = 'rtn', 'rtn'
  again = quantize_lib.run(config)['columns'][_COL]['methods']['rtn']
  assert calls == ['rtn'] and again == first
  _, info = checkpointing.restore_quantized(tmp_path / 'models' / f'{_COL}_rtn')
  assert info['metadata']['row_hash'] == first['hash']
  assert (
    hf.verify_export(tmp_path / 'hf' / f'{_COL}_rtn')['provenance']['row_hash'] == (first['hash'])
  )
  # Once saved and exported, a rerun does nothing.
  calls.clear()
  quantize_lib.run(config)
  assert calls == []


def test_failing_export_keeps_the_metrics(tmp_path, monkeypatch):
  from cafeq_jax.loading import hf  # pylint: disable=g-import-not-at-top

  config = _tiny_config(tmp_path, methods='rtn', plots=False)
  config.export_hf = 'rtn'

  def broken(*args, **kwargs):
    raise OSError('disk full')

  monkeypatch.setattr(hf, 'save_hf', broken)
  with pytest.raises(OSError, match='disk full'):
    quantize_lib.run(config)
  rows = json.loads((tmp_path / 'results.json').read_text())['columns'][_COL]['methods']
  model = quantize_lib.load_model(config.model, config.seed)
  recipe = quantize_lib.recipe_for('rtn', quantize_lib.parse_column(config.columns), config)
  qparams, _ = quantize(model.params, model.config, recipe, jax.random.PRNGKey(config.seed))
  want = reference_metrics.metrics(
    model.config, model.params, qparams, reference_metrics.job_tokens(model, config)
  )
  reference_metrics.assert_row_matches(rows['rtn'], want)


def test_a_report_of_other_inputs_beside_a_kept_cell_is_rewritten(tmp_path):
  # A run killed during its evaluation has written its report but not its cell: the
  # next run, which keeps the old cell, must not leave the other version's report.
  config = _tiny_config(tmp_path, methods='rtn', plots=False)
  quantize_lib.run(config)
  col = 'w4g32asym'
  path = tmp_path / 'reports' / f'{col}_rtn.json'
  good = json.loads(path.read_text())
  cell = json.loads((tmp_path / 'results.json').read_text())['columns'][col]['methods']['rtn']
  assert good['row_hash'] == cell['hash']
  for stale in ({**good, 'row_hash': 'another-version', 'per_matrix': {}}, None):
    if stale is None:
      path.unlink()
    else:
      path.write_text(json.dumps(stale))
    quantize_lib.run(config)
    again = json.loads(path.read_text())
    assert again['row_hash'] == cell['hash'] and again['per_matrix'] == good['per_matrix']
    kept = json.loads((tmp_path / 'results.json').read_text())['columns'][col]['methods']['rtn']
    assert kept == cell  # the metrics were kept, not recomputed
