"""Config of ``python -m experiments.pair_rounding_study``."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = 'smollm2_135m'
  # Presets, or rows of the transform study (experiments/configs/transform_study.py:
  # pairs-100 is cafeq-pairs at the quality table's 100 steps), whose effective pairs
  # are compared with the fp model's (the first: the base).
  c.methods = 'rtn,cafeq-pairs,pairs-100,cafeq-pairs-ar,cafeq-single,cafeq-paper'
  c.column = 'w3g128'
  c.texts = 'pydoc,speeches'  # Σ on each text's evaluation windows (and self-generated)
  c.eval_num_seqs = 8
  c.eval_seq_len = 512
  c.eval_batch_size = 2
  c.selfgen_num_seqs = 32  # the model's own sample (as recipes.SelfGenerated samples)
  c.selfgen_seq_len = 256
  c.seed = 0  # every method's key and the self-generated sample's
  # Swaps '<method>:<kind>:<layers>' (comma list; '' = none): the first method's model
  # with that pair kind from <method> in those layers only (e.g. cafeq-pairs:vo:0-23).
  c.swaps = ''
  c.output_dir = 'outputs/pair_rounding_study'
  return c
