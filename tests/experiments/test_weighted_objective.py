"""The input-weighted objective check: its evaluation against the library's losses, its
reference optimiser, a tiny end-to-end run that resumes, and bad requests."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cafeq_jax import quantizer
from cafeq_jax.core import optimize
from cafeq_jax.core import proxy
from experiments import weighted_objective
from experiments.configs import weighted_objective as wo_config

SPEC = quantizer.QuantSpec(bits=3, group_size=32)


def _problem(seed=0, units=2, t=2, d_in=64, d_out=48, k=16):
  rng = np.random.default_rng(seed)
  w = rng.standard_normal((units, t, d_in, d_out)).astype(np.float32)
  w[:, :, 3] *= 8.0  # an outlier row: something for the transform to fix
  x = rng.standard_normal((units, 256, d_in)).astype(np.float32)
  x[:, :, :8] *= 4.0  # uneven input energy: Σ is far from I
  h = np.einsum('uti,utj->uij', x, x) / x.shape[1]
  nb = d_in // k
  idx = np.arange(nb)
  sigma = h.reshape(units, nb, k, nb, k)[:, idx, :, idx, :].transpose(1, 0, 2, 3)
  return w, np.ascontiguousarray(sigma, np.float32)


def test_evaluation_matches_the_librarys_weighted_loss_and_rtn():
  w, sigma = _problem()
  rng = np.random.default_rng(1)
  m = np.eye(16, dtype=np.float32) + 0.1 * rng.standard_normal((2, 4, 16, 16)).astype(np.float32)
  t = optimize.init_state(w, SPEC, optimize.TransformConfig(block_size=16), jax.random.PRNGKey(0))
  t = t.transform.with_trainable({'blocks': jnp.asarray(m)})
  lib = optimize.stack_loss(t, w, SPEC, ste=False, sigma=jnp.asarray(sigma))
  lib_rtn = optimize.weighted_rtn_loss(w, SPEC, jnp.asarray(sigma))
  lib_frob = proxy.rtn_loss(jnp.asarray(w), SPEC).sum(axis=1)
  for u in range(2):
    weighted, _ = weighted_objective.unit_losses(w[u], sigma[u], m[u], SPEC)
    assert weighted == pytest.approx(float(lib[u]), rel=1e-4)
    rtn_weighted, rtn_frob = weighted_objective.unit_losses(w[u], sigma[u], None, SPEC)
    assert rtn_weighted == pytest.approx(float(lib_rtn[u]), rel=1e-4)
    assert rtn_frob == pytest.approx(float(lib_frob[u]), rel=1e-4)


def test_reference_quantizer_is_the_librarys_in_value():
  w, _ = _problem()
  for spec in (SPEC, quantizer.QuantSpec(bits=4, group_size=32, symmetric=True)):
    got = weighted_objective._reference_quant(jnp.asarray(w), spec)  # pylint: disable=protected-access
    np.testing.assert_allclose(got, quantizer.quant_dequant(jnp.asarray(w), spec), atol=1e-5)


def test_reference_optimiser_lowers_the_weighted_loss_and_is_deterministic():
  w, sigma = _problem()
  m = weighted_objective.reference_blocks(jnp.asarray(w), jnp.asarray(sigma), SPEC, steps=40)
  again = weighted_objective.reference_blocks(jnp.asarray(w), jnp.asarray(sigma), SPEC, steps=40)
  np.testing.assert_array_equal(m, again)
  for u in range(2):
    start, _ = weighted_objective.unit_losses(w[u], sigma[u], None, SPEC)
    end, _ = weighted_objective.unit_losses(w[u], sigma[u], m[u], SPEC)
    assert end < 0.9 * start


def _config(out, rows='input,reference-10'):
  c = wo_config.get_config()
  c.model = 'tiny_llama'
  c.column = 'w3g32'
  c.layers = 'all'
  c.rows = rows
  c.num_seqs = 2
  c.seq_len = 16
  c.output_dir = str(out)
  return c


def test_rows_of_a_tiny_model_and_a_resumed_run(tmp_path, monkeypatch):
  out = weighted_objective.run(_config(tmp_path))
  assert list(out['rows']) == ['input', 'reference-10']
  for r in out['rows'].values():
    assert set(r['weighted_ratio']) == {'q', 'k+v', 'o', 'gate+up', 'down'}
    assert 0 < r['weighted_ratio_total'] and 0 < r['proxy_ratio_total']
  # The weighted optimisers start at M = I (ratio 1) and keep their best / descend.
  assert out['rows']['input']['weighted_ratio_total'] < 1.0
  assert out['rows']['reference-10']['weighted_ratio_total'] < 1.0
  table = (tmp_path / 'table.md').read_text()
  assert '| input |' in table and '| reference-10 |' in table
  # Same inputs: the finished rows are kept, nothing is optimised again.
  saved = json.loads((tmp_path / 'results.json').read_text())

  def no_work(*a, **k):
    raise AssertionError('a finished row was computed again')

  monkeypatch.setattr(weighted_objective, '_compute', no_work)
  again = weighted_objective.run(_config(tmp_path, rows='reference-10,input'))
  assert again['rows'] == {r: saved['rows'][r] for r in ('reference-10', 'input')}


def test_a_corrupt_results_file_is_moved_aside(tmp_path):
  (tmp_path / 'results.json').write_text('{"rows": ')
  out = weighted_objective.run(_config(tmp_path, rows='reference-2'))
  assert list(out['rows']) == ['reference-2']
  assert len(list(tmp_path.glob('results.json.corrupt-*'))) == 1


@pytest.mark.parametrize(
  'field, value, match',
  [
    ('rows', 'input,adam-9', 'rows item'),
    ('rows', 'input,input', 'repeats'),
    ('rows', '', 'empty'),
    ('layers', '0,x', 'comma-separated integers'),
    ('layers', '1,1', 'distinct'),
    ('column', 'gguf-Q3_K_S', 'plain uniform quantizer'),
  ],
)
def test_bad_requests_fail_before_the_model_loads(tmp_path, no_model_load, field, value, match):
  c = _config(tmp_path)
  setattr(c, field, value)
  with pytest.raises(ValueError, match=match):
    weighted_objective.run(c)


def test_layers_beyond_the_model_are_refused():
  with pytest.raises(ValueError, match='has 2 layers'):
    weighted_objective.parse_layers('0,2', num_layers=2)


def test_rows_name_the_librarys_stages():
  frob = weighted_objective.learned_stage('frobenius')
  assert frob.loss == 'frobenius' and frob.share
  recipe_stage = weighted_objective.learned_stage('input')
  assert recipe_stage.loss == 'input' and recipe_stage.config.columns_per_step == 256
  every = weighted_objective.learned_stage('input-all-300')
  assert every.loss == 'input' and every.share
  assert every.config.columns_per_step is None and every.config.steps == 300
  assert every.config.learning_rate == recipe_stage.config.learning_rate
  # The whole-model rows of the README's comparison learn exactly these stages.
  recipes_ = weighted_objective.study_config.RECIPES
  assert recipes_['sg-learned-input-all-300'].transform == every
  frob_all = recipes_['sg-learned-all-300'].transform
  assert frob_all.loss == 'frobenius' and frob_all.config == every.config
