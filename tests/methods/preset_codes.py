"""Digests of every preset's quantized leaves on tiny models (the regression record).

``python -m tests.methods.preset_codes tests/methods/data/preset_codes.json`` rewrites
the record; ``test_preset_codes.py`` checks the presets still give these codes.
"""

from __future__ import annotations

import hashlib
import json
import sys

import jax
import numpy as np

from cafeq_jax import recipes
from cafeq_jax.methods import quantize
from cafeq_jax.models import PRESETS
from cafeq_jax.models import QuantizedLinear
from cafeq_jax.models import init_params

MODELS = ('tiny_llama', 'tiny_gemma2')
SPECS = (dict(bits=3, group_size=32), dict(bits=4, group_size=None, symmetric=True))
# Small optimisation / sampling settings so that every preset runs in seconds.
SMALL = {
  'transform.block_size': 32,
  'transform.steps': 6,
  'transform.eval_every': 3,
  'transform.columns_per_step': None,
  'pairs.steps': 6,
  'pairs.eval_every': 3,
  'rounding.rounds': 2,
  'statistics.num_seqs': 4,
  'statistics.seq_len': 12,
}


def digest(qparams) -> dict[str, str]:
  """sha256 (16 hex digits) of every leaf: codes, scales, zeros, transforms."""
  out = {}
  flat = jax.tree_util.tree_flatten_with_path(
    qparams, is_leaf=lambda x: isinstance(x, QuantizedLinear)
  )[0]
  for path, leaf in flat:
    if isinstance(leaf, QuantizedLinear):
      w = leaf.weight
      parts = [w.codes, w.scale, w.zero, leaf.transform_inv]
    else:
      parts = [leaf]
    h = hashlib.sha256()
    for p in parts:
      if p is not None:
        a = np.asarray(p)
        h.update(f'{a.dtype}{a.shape}'.encode())
        h.update(a.tobytes())
    out[jax.tree_util.keystr(path)] = h.hexdigest()[:16]
  return out


def cases():
  """``(case name, model config, params, recipe, calib tokens or None)``."""
  for model in MODELS:
    cfg = PRESETS[model]
    params = init_params(cfg, jax.random.PRNGKey(1))
    calib = np.asarray(
      jax.random.randint(jax.random.PRNGKey(7), (4, 12), 0, cfg.vocab_size), np.int32
    )
    for spec in SPECS:
      for name in recipes.names():
        recipe = recipes.get(
          name,
          spec=recipes.quantizer.QuantSpec(**spec),
          strict=False,
          **{k.replace('.', '__'): v for k, v in SMALL.items()},
        )
        tokens = calib if isinstance(recipe.statistics, recipes.Calibration) else None
        yield f'{model}/{recipe.spec.name}/{name}', cfg, params, recipe, tokens


def compute() -> dict[str, dict[str, str]]:
  out = {}
  for case, cfg, params, recipe, tokens in cases():
    q, _ = quantize(params, cfg, recipe, jax.random.PRNGKey(0), calib_tokens=tokens)
    out[case] = digest(q)
  return out


if __name__ == '__main__':
  with open(sys.argv[1], 'w') as f:
    json.dump(compute(), f, indent=1, sort_keys=True)
