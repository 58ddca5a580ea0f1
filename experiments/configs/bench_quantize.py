"""Default config of ``experiments.bench_quantize`` (wall time of quantizing a model).

python -m experiments.bench_quantize
python -m experiments.bench_quantize --config.methods=cafeq-single --config.repeats=2
python -m experiments.bench_quantize --config.methods=cafeq --config.threads=1
"""

import ml_collections

from experiments.configs import quantize


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = 'smollm2_135m'  # as the main job's --config.model
  c.methods = 'rtn,gptq-selfgen,cafeq-sg,cafeq-single,cafeq'  # recipe names, in order
  c.column = 'w3g128'  # the quantizer, as the main job's columns
  c.seed = 0
  c.cafeq = quantize.cafeq_options()  # stage fields of the CafeQ recipes, as the main job's
  c.repeats = 1  # runs per method in one process (the first includes compilation)
  # Where the transform chunks run (cafeq_jax.methods.run_options.RunOptions); None: its
  # defaults (chunks of 2 units, one thread per core on a CPU).
  c.threads = ml_collections.config_dict.placeholder(int)
  c.stack_chunk = ml_collections.config_dict.placeholder(int)
  c.output = '/tmp/bench_quantize.json'  # every run's timings, rewritten after each
  return c
