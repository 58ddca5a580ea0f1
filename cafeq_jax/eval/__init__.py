"""Evaluation: perplexity, KL divergence and top-1 agreement on offline text."""

from cafeq_jax.eval.data import default_text, eval_tokens, load_text, make_windows
from cafeq_jax.eval.evaluate import evaluate, format_results, model_apply_fn

__all__ = ['default_text', 'eval_tokens', 'load_text', 'make_windows', 'evaluate',
           'format_results', 'model_apply_fn']
