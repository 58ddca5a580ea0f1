"""The README's quality table: every method x {w4, w3} x {per-channel, g128}, asym.

python -m experiments.quantize --config=experiments/configs/quality_table.py
"""

import ml_collections

from experiments.configs import quantize


def get_config() -> ml_collections.ConfigDict:
  c = quantize.get_config()
  c.methods = (
    'rtn,hadamard,cafeq-single,cafeq-pairs,cafeq-pairs-ar,cafeq-sg,cafeq,gptq,gptq-offdomain'
  )
  c.columns = 'w3g128,w4g128,w3pc,w4pc'
  c.cafeq.pairs.steps = 100  # half the default: 4 columns x 3 pair rows on 2 cores
  c.output_dir = 'outputs/quality_table'
  c.save_models = ''  # the table only; the default job saves a model
  c.prompt = ''  # no generation samples
  return c
