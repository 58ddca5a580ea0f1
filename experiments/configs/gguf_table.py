"""Config of the equal-size GGUF table: our data-free roundings vs llama.cpp's quantizer.

python -m experiments.gguf_table
python -m experiments.gguf_table --config.mixes=Q3_K_S --config.methods=gptq-selfgen
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # llama.cpp mixes (cafeq_jax.ggml.mixes.MIXES): each file of a mix has the same
  # tensor types, so the same size, whoever rounded it.
  c.mixes = 'Q3_K_S,Q3_K_M,Q4_K_S,Q4_K_M,Q4_0'
  # Our rows (recipe names without online transforms; defaults of the main job):
  # cafeq-sg-rounding is cafeq-sg's act-order rounding without its online transform.
  c.methods = 'rtn,gptq-selfgen,cafeq-sg-rounding'
  c.texts = 'pydoc,speeches'  # evaluation texts (cafeq_jax.eval.data.TEXTS)
  c.eval_num_seqs = 8
  c.eval_seq_len = 512
  c.eval_batch_size = 2
  c.seed = 0
  # MSE-optimal clipping of every group's range (rows named '<method>-clip'); llama.cpp's
  # own quantizer does no such search without an importance matrix for Q4_0 / Q4_1.
  c.clip_search = False
  c.llamacpp = True  # also quantize with llama.cpp (needs llama-cpp-python)
  c.llamacpp_eval = True  # also run every file in llama.cpp on the same windows
  c.output_dir = 'outputs/gguf_table'
  return c
