"""Where cafeq-pairs loses perplexity: its v/o and up/down pairs in some layers only.

python -m experiments.pair_rounding_study --config=experiments/configs/pair_layer_swaps.py

RTN's model with cafeq-pairs' v/o (or up/down) matrices in all layers (the study's
pairs-vo / pairs-updown models), in the layers where the pair study finds them worse
than RTN at their sub-layer's output, and in the rest (seed 0, w3 g128, both texts).
"""

import ml_collections

from experiments.configs import pair_rounding_study


def get_config() -> ml_collections.ConfigDict:
  c = pair_rounding_study.get_config()
  c.methods = 'rtn,cafeq-pairs'
  c.swaps = ','.join(
    [
      'cafeq-pairs:vo:0-29',
      'cafeq-pairs:vo:0-23',  # worse than RTN at the attention output in most of these
      'cafeq-pairs:vo:24-29',  # better in most of these
      'cafeq-pairs:updown:0-29',
      'cafeq-pairs:updown:27-29',  # the layers whose MLP output error moves most
      'cafeq-pairs:updown:0-26',
    ]
  )
  c.output_dir = 'outputs/pair_layer_swaps'
  return c
