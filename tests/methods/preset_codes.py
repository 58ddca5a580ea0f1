"""Digests of every preset's quantized leaves on tiny models (the regression record):
the integer codes exactly, the float parts to ``FLOAT_RTOL`` of their norm.

``python -m tests.methods.preset_codes tests/methods/data/preset_codes.json`` rewrites
the record (``--variant FILE CASE ...`` adds this machine's digests of some cases to
the per-CPU variants file instead); ``test_preset_codes.py`` checks the presets still
give these codes.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys

# The record is made under the OpenBLAS kernel pin of tests/conftest.py (why: there);
# set here too for ``python -m tests.methods.preset_codes``, before jax loads.
if platform.machine().lower() in ('x86_64', 'amd64'):
  os.environ.setdefault('OPENBLAS_CORETYPE', 'Haswell')

import jax
import numpy as np

from cafeq_jax import atomic
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


# Float parts are compared to this fraction of their norm: another CPU's vector
# instructions reassociate float sums (seen: 4e-7 of the norm between SSE4.2 and AVX2
# code on one machine; the integer codes were identical), while any real change of
# a recipe moves them by far more.
FLOAT_RTOL = 1e-4


def _float_summary(a: np.ndarray) -> list[float]:
  """``[‖a‖, ⟨a, r⟩]``, ``r`` a fixed unit pseudo-random direction of ``a``'s size."""
  x = np.asarray(a, np.float64).ravel()
  r = np.random.default_rng(x.size).standard_normal(x.size)
  r /= max(np.linalg.norm(r), 1.0)
  return [float(np.linalg.norm(x)), float(x @ r)]


def digest(qparams) -> dict[str, dict]:
  """Per leaf: ``exact``, sha256 (16 hex digits) of every part's dtype and shape and
  of the integer parts' bytes (the codes), and ``floats``, ``[‖x‖, ⟨x, r⟩]`` of each
  float part (scales, zeros, transforms, unquantized leaves) in order."""
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
    h, floats = hashlib.sha256(), []
    for p in parts:
      if p is not None:
        a = np.asarray(p)
        h.update(f'{a.dtype}{a.shape}'.encode())
        if np.issubdtype(a.dtype, np.integer):
          h.update(a.tobytes())
        else:
          floats.append(_float_summary(a))
    out[jax.tree_util.keystr(path)] = {'exact': h.hexdigest()[:16], 'floats': floats}
  return out


def differs(got: dict, want: dict) -> bool:
  """Whether two leaves' digests differ: any integer code, dtype or shape, or a float
  part by more than ``FLOAT_RTOL`` of its norm."""
  if got['exact'] != want['exact'] or len(got['floats']) != len(want['floats']):
    return True
  for g, w in zip(got['floats'], want['floats']):
    tol = FLOAT_RTOL * max(w[0], 1e-30)
    if abs(g[0] - w[0]) > tol or abs(g[1] - w[1]) > tol:
      return True
  return False


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


def compute(names=None) -> dict[str, dict]:
  """Every case's digest, or only the cases ``names`` (the generator then runs as
  far as the last of them)."""
  wanted, out = None if names is None else set(names), {}
  for case, cfg, params, recipe, tokens in cases():
    if wanted is None or case in wanted:
      q, _ = quantize(params, cfg, recipe, jax.random.PRNGKey(0), calib_tokens=tokens)
      out[case] = digest(q)
      if wanted is not None and len(out) == len(wanted):
        break
  if wanted is not None and (unknown := wanted - set(out)):
    raise SystemExit(f'unknown cases: {sorted(unknown)}')
  return out


def add_variants(path: str, names) -> None:
  """Appends this machine's digests of ``names`` to the per-CPU variants file."""
  variants = {}
  if os.path.exists(path):
    with open(path) as f:
      variants = json.load(f)
  for case, d in compute(names).items():
    if d not in variants.setdefault(case, []):
      variants[case].append(d)
  atomic.write_text(path, json.dumps(variants, indent=1, sort_keys=True))


if __name__ == '__main__':
  if sys.argv[1] == '--variant':  # --variant FILE CASE ...
    add_variants(sys.argv[2], sys.argv[3:])
  else:
    atomic.write_text(sys.argv[1], json.dumps(compute(), indent=1, sort_keys=True))
