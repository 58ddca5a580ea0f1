"""Default config of ``experiments.bench_warm_inverse`` (Gauss-Jordan fallbacks of
the warm-start inverse: how often over a run, and their cost).

python -m experiments.bench_warm_inverse
python -m experiments.bench_warm_inverse --config.recipes=cafeq,cafeq-150
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = 'smollm2_135m'  # as the main job's --config.model
  # Recipes with a dense learned transform: presets or transform_study rows. The
  # fallback costs are timed on the first one's stacks.
  c.recipes = 'cafeq,cafeq-150'
  c.column = 'w3g128'  # the quantizer, as the main job's columns
  c.broken = '0,1,4,6'  # broken guesses per chunk whose warm_inverse is timed
  c.reps = 200  # calls per timing (the fastest of three means is kept)
  c.output = '/tmp/bench_warm_inverse.json'
  return c
