"""Evaluation: perplexity, KL divergence and top-1 agreement on offline text."""

from cafeq_jax.eval.data import default_text
from cafeq_jax.eval.data import eval_tokens
from cafeq_jax.eval.data import load_text
from cafeq_jax.eval.data import make_windows
from cafeq_jax.eval.evaluate import evaluate
from cafeq_jax.eval.evaluate import format_results
from cafeq_jax.eval.evaluate import model_apply_fn

__all__ = [
  'default_text',
  'eval_tokens',
  'load_text',
  'make_windows',
  'evaluate',
  'format_results',
  'model_apply_fn',
]
