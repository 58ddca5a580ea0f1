"""Default config of ``experiments.weighted_objective`` (the input-weighted transform
on its own objective, against a plain reference optimiser).

python -m experiments.weighted_objective
python -m experiments.weighted_objective --config.rows=input,reference-600 --config.layers=0,29
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = 'smollm2_135m'  # as the main job's --config.model
  c.column = 'w3g128'  # the quantizer, as the main job's columns
  c.seed = 0  # the recipe's key: self-generated tokens, column subsets
  # Layers whose transform units are optimised ('all', or comma-separated indices).
  c.layers = '0,5,10,15,20,25,29'
  # Rows, in order: frobenius, input, input-all-<steps>, reference-<steps>.
  c.rows = 'frobenius,input,input-all-300,reference-300'
  # The self-generated sample of Σ (None: the recipe's, 32 x 256).
  c.num_seqs = None
  c.seq_len = None
  c.output_dir = 'outputs/weighted_objective'
  return c
