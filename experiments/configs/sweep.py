"""Default grid of ``experiments.sweep``: methods x bits x group sizes x models.

    python -m experiments.sweep --config=experiments/configs/sweep.py
    python -m experiments.sweep --config=experiments/configs/sweep.py \
        --config.models=tiny_llama --config.methods=rtn,hadamard \
        --config.bits=4,3 --config.group_sizes=32,0 --config.workdir=/tmp/sweep
"""

import ml_collections

from experiments.configs import quantize


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Grid axes (comma-separated strings, so `--config.bits=4,3` works on the command line).
  c.models = 'smollm2_135m'  # 'smollm2_135m', a .gguf / HF dir, or presets ('tiny_llama')
  c.methods = 'rtn,hadamard,cafeq'  # recipe names (cafeq_jax.recipes.PRESETS)
  c.bits = '4,3'  # code widths
  c.group_sizes = '128,0'  # group sizes; 0 = one scale per output channel
  c.symmetric = False  # symmetric codes (no zero point) for every point
  c.clip_search = False  # MSE-optimal clip ratio search for every point
  c.seed = 0  # PRNG seed of every method and of random presets
  # Stage options of every CafeQ recipe (--config.cafeq.transform.steps=100; defaults
  # from the presets, see experiments/configs/quantize.py).
  c.cafeq = quantize.cafeq_options()
  c.selfgen_num_seqs = 32  # recipes with SelfGenerated statistics: sequences sampled
  c.selfgen_seq_len = 256  # ... and tokens per sampled sequence
  # Evaluation (same tokens for every point of a model).
  c.eval_text = ''  # text file; '' = Python's pydoc_data topics
  c.eval_num_seqs = 8  # evaluation windows
  c.eval_seq_len = 512  # tokens per window
  c.eval_batch_size = 2  # windows per forward pass
  c.calib_num_seqs = 16  # GPTQ calibration windows (gptq rows only)
  c.calib_seq_len = 512  # tokens per calibration window
  # Where results go and how points are spread over processes.
  c.workdir = 'outputs/sweep'  # results.jsonl (+ models/ when save_models)
  c.results_file = 'results.jsonl'  # JSONL, one line per finished point, appended atomically
  c.num_shards = 0  # split points over this many runs; 0 = jax.process_count()
  c.shard_index = -1  # this run's share; -1 = jax.process_index()
  c.save_models = False  # save each quantized model with Orbax (single-process only)
  # Formats: comma list of 'ct' (every w4/w8 point as compressed-tensors, workdir/ct/)
  # and gguf:<mix> (adds one point per model x method rounded into llama.cpp's mix,
  # written to workdir/gguf/<point>.gguf).
  c.export = ''
  c.progress = False  # progress bars
  # Multi-process launch (jax.distributed); empty = from env / auto-detect / single process.
  c.coordinator_address = ''  # host:port of process 0 (JAX_COORDINATOR_ADDRESS)
  c.num_processes = 0  # total processes (JAX_NUM_PROCESSES); 0 = env / auto
  c.process_id = -1  # this process (JAX_PROCESS_ID); -1 = env / auto
  return c
