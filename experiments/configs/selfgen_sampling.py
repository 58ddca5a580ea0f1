"""The self-generated sample of cafeq-sg: its shape, temperature and first tokens.

python -m experiments.transform_study --config=experiments/configs/selfgen_sampling.py

Rows are the ``sg-*`` entries of ``transform_study.RECIPES`` beside ``cafeq-sg``
itself (32 sequences of 256 tokens from ``<|endoftext|>`` at temperature 1), each
with seeds 0 and 1 (mean ± std); the table's ``sg loss`` is each recipe's own
objective (the self-generated layer loss over RTN's, under its own sample).
"""

import ml_collections

from experiments.configs import transform_study


def get_config() -> ml_collections.ConfigDict:
  c = transform_study.get_config()
  c.variants = ','.join(
    ['cafeq-sg']
    + [r for r in transform_study.RECIPES if r.startswith('sg-') and not r.startswith('sg-learned')]
  )
  c.seeds = '1'
  c.output_dir = 'outputs/selfgen_sampling'
  return c
