"""The learned transform inside the self-generated recipes, three seeds.

python -m experiments.transform_study --config=experiments/configs/selfgen_study.py

Rows are ``transform_study.RECIPES`` (whole recipes at the study's column); each
runs with seeds 0, 1 and 2 and the table gives mean ± std over them.
"""

import ml_collections

from experiments.configs import transform_study


def get_config() -> ml_collections.ConfigDict:
  c = transform_study.get_config()
  c.variants = ','.join(transform_study.RECIPES)
  c.seeds = '1,2'
  c.output_dir = 'outputs/selfgen_study'
  return c
