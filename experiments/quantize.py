r"""Quantize a model with several methods and print the quality table.

    python -m experiments.quantize                       # SmolLM2-135M, w3 g128
    python -m experiments.quantize --config=experiments/configs/quality_table.py
    python -m experiments.quantize --config.methods=rtn,cafeq --config.columns=w4g128

Results land in ``--config.output_dir`` (results.json, table.md, plots, models).
"""

from absl import app
from ml_collections import config_flags

from cafeq_jax import distributed
from experiments import cli
from experiments import quantize_lib

_CONFIG = config_flags.DEFINE_config_file(
  'config', 'experiments/configs/quantize.py', 'Job configuration.', lock_config=True
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Too many command-line arguments: {argv[1:]}')
  distributed.log_processes()
  config = _CONFIG.value
  results = quantize_lib.run(config)
  columns = [quantize_lib.parse_column(c).name for c in cli.split_names(config.columns)]
  print(quantize_lib.format_table(results, cli.split_names(config.methods), columns))
  print(f'\nwrote {config.output_dir}/results.json (this run: {results["total_seconds"]:.0f}s)')


if __name__ == '__main__':
  app.run(main)
