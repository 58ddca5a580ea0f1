r"""Default config of ``experiments.bench_kernels`` (packed int4/int3 kernels vs bf16).

    python -m experiments.bench_kernels --config.output_dir=/tmp/bench_kernels
    python -m experiments.bench_kernels --config.models=gemma2_2b --config.batches=1,64 \
        --config.schemes=asym,sym --config.decode_batches=1,16

On a host without an accelerator the defaults switch to one tiny shape in Pallas
interpret mode (a smoke run) unless ``--config.interpret=True`` is given, which
runs exactly the configured shapes in interpret mode.
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.output_dir = '/tmp/bench_kernels'  # where bench_kernels.json and .md are written
  # Comma-separated strings, so `--config.batches=1,64` works on the command line.
  c.models = 'gemma2_2b,gemma2_9b'  # shape sets (keys of bench_kernels.SHAPES)
  c.batches = '1,8,64,512'  # token batch sizes (rows of x)
  c.bits = '4,3'  # code widths of the packed kernels
  c.schemes = 'asym'  # 'asym' (zero points) and/or 'sym' (no zero point)
  # Group size; a d_in it does not divide (SmolLM2's 576) uses the largest of 64 / 32
  # that does.
  c.group_size = 128
  c.iters = 50  # timed iterations (median reported)
  # Accelerator: enough distinct weight copies to move at least this many MB per
  # timed program (defeats the L2 cache).
  c.rotate_mb = 256
  c.max_copies = 32  # upper bound on the weight copies per program
  c.block_m = config_dict.placeholder(int)  # override QuantizedMatmulConfig.block_m
  c.block_n = config_dict.placeholder(int)  # override QuantizedMatmulConfig.block_n
  c.split_k = config_dict.placeholder(int)  # override QuantizedMatmulConfig.split_k (GPU)
  c.transform_k = 64  # block size of the online transform kernel (x M^-1)
  # Pallas interpret mode with the configured shapes, also on CPU (False: compiled
  # kernels; on a CPU-only host the tiny smoke run instead).
  c.interpret = False
  # Decode step of a whole model (random weights of a cafeq_jax.models preset; bf16
  # activations and KV cache): bf16 weights vs packed weights through the XLA
  # dequant path and through the kernels.
  c.decode_batches = ''  # e.g. '1,16'; '' = no decode step
  c.decode_model = 'smollm2_135m'  # preset name (cafeq_jax.models.PRESETS)
  c.decode_cache_len = 256  # KV cache slots; the step decodes at slot len // 2
  # Stop starting new shapes of the grid after this many seconds (the rows so far
  # are kept and the rest listed as skipped); 0 = no limit.
  c.time_budget_s = 0.0
  c.markdown = False  # print the Markdown (README) table at the end
  # Only print the Markdown table of this bench_kernels.json (no benchmark is run).
  c.markdown_from = config_dict.placeholder(str)
  return c
