"""The equal-size GGUF table's own rows: each file holds that recipe's codes."""

from __future__ import annotations

import math

import jax
import numpy as np

import cafeq_jax
from cafeq_jax import recipes
from cafeq_jax.ggml import mixes
from cafeq_jax.loading import gguf as gguf_lib
from cafeq_jax.models import init_params
from cafeq_jax.models import linears
from experiments import gguf_table
from tests.loading import test_gguf_export

TINY = test_gguf_export.TINY


def _weights(tree):
  return [np.asarray(x) for x in jax.tree.leaves(linears.dequantize_params(tree, TINY))]


def test_rows_hold_their_recipes_codes_with_and_without_clip_search(tmp_path):
  params = init_params(TINY, jax.random.key(0))
  got = {}
  for clip in (False, True):
    path = str(tmp_path / f'{clip}.gguf')
    kw = dict(seed=0, clip_search=clip, source=None)  # no source: TINY's own metadata
    assert gguf_table.ours(params, TINY, 'Q4_0', 'rtn', path, **kw) >= 0
    assert math.isnan(gguf_table.ours(params, TINY, 'Q4_0', 'rtn', path, **kw))  # kept
    # Another seed is another row (the self-generated recipes draw their sample by it).
    assert gguf_table.ours(params, TINY, 'Q4_0', 'rtn', path, **{**kw, 'seed': 1}) >= 0
    assert math.isnan(gguf_table.ours(params, TINY, 'Q4_0', 'rtn', path, **{**kw, 'seed': 1}))
    gguf_table.ours(params, TINY, 'Q4_0', 'rtn', path, **kw)  # back to seed 0
    got[clip] = _weights(gguf_lib.load_gguf(path)[0])
    want, _ = cafeq_jax.quantize(
      params, TINY, recipes.get('rtn', spec=mixes.spec_map('Q4_0', TINY, clip_search=clip))
    )
    for a, b in zip(_weights(want), got[clip]):
      np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in zip(got[False], got[True]))
