"""Which pair transforms take cafeq-pairs above RTN: each kind folded alone.

python -m experiments.transform_study --config=experiments/configs/pair_kinds.py

Rows (seed 0, w3 g128, both texts; RTN rounding after the folded transforms): RTN,
cafeq-pairs (v/o, q/k and up/down at the preset's 200 steps), the same at the quality
table's 100 steps, then v/o, q/k and up/down alone (200 steps). The pair transforms
start from the identity and draw nothing at random, so one seed is the whole story.
"""

import ml_collections

from experiments.configs import transform_study


def get_config() -> ml_collections.ConfigDict:
  c = transform_study.get_config()
  c.variants = 'rtn,cafeq-pairs,pairs-100,pairs-vo,pairs-qk,pairs-updown'
  c.output_dir = 'outputs/pair_kinds'
  return c
