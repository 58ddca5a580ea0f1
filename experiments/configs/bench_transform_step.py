"""Default config of ``experiments.bench_transform_step`` (one learned-transform step).

python -m experiments.bench_transform_step
python -m experiments.bench_transform_step --config.layouts=whole:1,2:2 --config.recipe=cafeq
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = 'smollm2_135m'  # as the main job's --config.model
  c.recipe = 'cafeq-single'  # a preset with a learned transform: its config and sharing
  c.column = 'w3g128'  # the quantizer, as the main job's columns
  # Comma list of '<units per chunk>:<threads>' ('whole': the whole stack).
  c.layouts = 'whole:1,2:1,2:2,4:2,8:2'
  c.steps = 6  # timed steps per layout, after one compiled and discarded
  c.output = '/tmp/bench_transform_step.json'
  return c
