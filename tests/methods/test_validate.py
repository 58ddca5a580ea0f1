"""Up-front checks of ``quantize``'s input tree: non-finite leaves and mismatched trees."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from cafeq_jax import methods
from cafeq_jax import recipes
from cafeq_jax.methods import selfgen
from cafeq_jax.methods import validate
from cafeq_jax.models import PRESETS
from cafeq_jax.models import init_params

CFG = PRESETS['tiny_llama']
SMALL = dict(bits=4, group_size=32, transform__block_size=32)


@pytest.fixture(scope='module')
def params():
  return jax.tree.map(np.asarray, init_params(CFG, jax.random.PRNGKey(0)))


def _with(params, path, index, value=np.nan):
  """Copy of ``params`` with ``value`` at ``index`` of the leaf at ``path``."""
  out = jax.tree.map(np.copy, params)
  node = out
  for p in path[:-1]:
    node = node[p]
  node[path[-1]][index] = value
  return out


def test_nan_in_the_embedding_is_refused_with_its_path_before_self_generation(params, monkeypatch):
  def never(*args, **kwargs):
    raise AssertionError('self-generation ran on a non-finite model')

  monkeypatch.setattr(selfgen, 'sample_tokens', never)
  bad = _with(params, ('embedder', 'input_embedding'), (7, 3))
  recipe = recipes.get('cafeq-sg', **SMALL, statistics__num_seqs=2, statistics__seq_len=8)
  with pytest.raises(
    ValueError,
    match=r"param leaf 'embedder/input_embedding' \(128, 64\) has "
    r'1 non-finite value\(s\) \(first: nan at index \(7, 3\)\)',
  ):
    methods.quantize(bad, CFG, recipe, jax.random.PRNGKey(0))


@pytest.mark.parametrize(
  'path, index, where',
  [
    # q_einsum (H, D, hd): head 2, d 5, j 3 -> row 5, column 2 * 16 + 3 of q (D, H*hd).
    (('layer_1', 'attn', 'q_einsum', 'w'), (2, 5, 3), "layer 1, matrix 'q' .* row 5 .* column 35"),
    # kv_einsum (2, K, D, hd): v, head 1, d 7, j 4 -> row 7, column 20 of v.
    (
      ('layer_0', 'attn', 'kv_einsum', 'w'),
      (1, 1, 7, 4),
      "layer 0, matrix 'v' .* row 7 .* column 20",
    ),
    # gating_einsum (2, F, D): up, f 10, d 3 -> row 3, column 10 of up (D, F).
    (('layer_1', 'mlp', 'gating_einsum'), (1, 10, 3), "layer 1, matrix 'up' .* row 3 .* column 10"),
  ],
)
def test_non_finite_projection_names_layer_matrix_and_original_indices(params, path, index, where):
  bad = _with(params, path, index, np.inf)
  # A rotated method: the indices are those of the input model, not of the rotated matrix.
  with pytest.raises(ValueError, match=f"param leaf '{'/'.join(path)}' .*inf.*; that is {where}"):
    methods.quantize(bad, CFG, recipes.get('hadamard', **SMALL), jax.random.PRNGKey(0))


def test_mismatched_param_tree_is_a_clear_error(params):
  with pytest.raises(ValueError, match=r"num_layers=3; missing \['layer_2'\]"):
    methods.quantize(params, CFG.replace(num_layers=3), recipes.get('rtn', bits=4, group_size=32))
  with pytest.raises(ValueError, match=r"num_layers=1; unexpected \['layer_1'\]"):
    validate.check_structure(params, CFG.replace(num_layers=1))
  broken = dict(params, layer_0={k: v for k, v in params['layer_0'].items() if k != 'mlp'})
  with pytest.raises(ValueError, match="'layer_0/mlp/gating_einsum' is missing"):
    validate.check_structure(broken, CFG)
  with pytest.raises(ValueError, match=r"'layer_0/mlp/linear' has shape \(128, 32\)"):
    validate.check_structure(_reshaped(params), CFG)


def _reshaped(params):
  out = jax.tree.map(np.copy, params)
  out['layer_0']['mlp']['linear'] = np.zeros((128, 32), np.float32)
  return out


def test_finite_trees_pass_and_integer_leaves_are_skipped(params):
  validate.check_params(params, CFG)
  validate.check_finite({'codes': np.full(4, 7, np.int8), 'w': jax.numpy.ones(3)})
