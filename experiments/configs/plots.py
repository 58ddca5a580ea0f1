"""Default config of ``experiments.plots``: redraw the plots of a quantize job.

python -m experiments.plots --config.output_dir=outputs/quantize
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # The job's output dir holding results.json and reports/ (required); the PNGs
  # go to its plots/ folder.
  c.output_dir = ''
  return c
