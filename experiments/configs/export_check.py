"""Every kind of preset exported as HF safetensors and read back by transformers.

python -m experiments.transform_study --config=experiments/configs/export_check.py

Rows are the presets (seed 0, w3 g128, both texts); each is quantized, evaluated by
our forward (online transforms applied at run time), exported with ``hf.save_hf``
(what the main job's ``--config.export_hf`` writes: effective weights) and scored
again by transformers on the same windows (``experiments/hf_readback.py``; needs
``pip install -e '.[test]'``).
"""

import ml_collections

from experiments.configs import transform_study


def get_config() -> ml_collections.ConfigDict:
  c = transform_study.get_config()
  c.variants = 'rtn,cafeq-single,cafeq-paper,cafeq-sg,cafeq'
  c.export_check = True
  c.output_dir = 'outputs/export_check'
  return c
