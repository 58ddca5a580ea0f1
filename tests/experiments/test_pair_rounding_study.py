"""The pair adaptive rounding study: its weighted product error against numpy, and a
tiny run end to end."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from experiments import pair_rounding_study
from experiments.configs import pair_rounding_study as study_config


def _numpy_weighted_error(w1, w2, w1_hat, w2_hat, sigma, n1, n2):
  """``Σ_h tr(E_hᵀ Σ E_h)`` with every product formed (float64): head ``h`` pairs
  column block ``h // (n2 / n1)`` of ``W1`` with row block ``h`` of ``W2`` (GQA)."""
  b = w1.shape[1] // n1
  total = 0.0
  for h in range(n2):
    k = h // (n2 // n1)
    cols, rows = slice(k * b, (k + 1) * b), slice(h * b, (h + 1) * b)
    e = w1[:, cols] @ w2[rows] - w1_hat[:, cols] @ w2_hat[rows]
    total += np.trace(e.T @ sigma @ e)
  return total


@pytest.mark.parametrize('n1, n2', [(1, 1), (2, 4)])
def test_weighted_pair_error_is_the_sigma_weighted_error_of_every_head_product(n1, n2):
  rng = np.random.default_rng(0)
  d, b, c = 12, 4, 10
  w1, w1_hat = rng.normal(size=(2, d, n1 * b))
  w2, w2_hat = rng.normal(size=(2, n2 * b, c))
  w1_hat, w2_hat = w1 + 0.1 * w1_hat, w2 + 0.1 * w2_hat
  x = rng.normal(size=(50, d)) * np.linspace(0.2, 3.0, d)  # anisotropic inputs
  sigma = x.T @ x / len(x)
  args = [a.astype(np.float32) for a in (w1, w2, w1_hat, w2_hat)]
  c_t = np.linalg.cholesky(sigma).T.astype(np.float32)
  got = pair_rounding_study.weighted_pair_error(*args, c_t, n1=n1, n2=n2)
  want = _numpy_weighted_error(w1, w2, w1_hat, w2_hat, sigma, n1, n2)
  np.testing.assert_allclose(float(got), want, rtol=1e-4)
  plain = pair_rounding_study.weighted_pair_error(*args, None, n1=n1, n2=n2)
  want_plain = _numpy_weighted_error(w1, w2, w1_hat, w2_hat, np.eye(d), n1, n2)
  np.testing.assert_allclose(float(plain), want_plain, rtol=1e-4)


def test_tiny_study_adaptive_rounding_never_loses_to_its_start_on_its_objective(tmp_path):
  c = study_config.get_config()
  c.model = 'tiny_llama'
  c.methods = 'rtn,cafeq-pairs,cafeq-pairs-ar'
  c.column = 'w3g32'
  c.texts = 'pydoc'
  c.eval_num_seqs, c.eval_seq_len = 2, 16
  c.selfgen_num_seqs, c.selfgen_seq_len = 2, 16
  c.output_dir = str(tmp_path)
  results = pair_rounding_study.run(c)
  errors = results['per_layer']
  assert list(errors) == ['rtn', 'cafeq-pairs', 'cafeq-pairs-ar']
  assert all(set(e) == {'frobenius', 'pydoc', pair_rounding_study.SELF} for e in errors.values())
  # The same folded pairs (identity init: deterministic), rounded by RTN or adaptively;
  # the adaptive one keeps the best candidate, RTN among them: never above it.
  ar, start = errors['cafeq-pairs-ar']['frobenius'], errors['cafeq-pairs']['frobenius']
  assert len(ar) == 2 and all(a <= s for a, s in zip(ar, start))
  assert sum(ar) < sum(start)
  assert all(x > 0 for e in errors.values() for w in e.values() for x in w)
  assert json.load(open(os.path.join(tmp_path, 'results.json')))['per_layer'] == errors
  table = open(os.path.join(tmp_path, 'table.md')).read()
  assert '| rtn | 1.000 |' in table and 'Σ pydoc: / rtn' in table


def test_unknown_method_is_refused_before_the_model_loads(tmp_path):
  c = study_config.get_config()
  c.methods = 'rtn,cafeq-nope'
  c.model = 'no-such-model'
  c.output_dir = str(tmp_path)
  with pytest.raises(ValueError, match="recipe 'cafeq-nope' is unknown"):
    pair_rounding_study.run(c)
