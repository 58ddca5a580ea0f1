"""ppl / KLD / top-1 recomputed with numpy (float64) from the decoder's logits.

An independent check of the jitted streaming evaluation in ``cafeq_jax.eval``.
"""

from __future__ import annotations

import numpy as np

from cafeq_jax import eval as eval_lib
from cafeq_jax.models import decoder
from cafeq_jax.models import linears


def job_tokens(model, config) -> np.ndarray:
  """The evaluation windows the main job / sweep cut from the default text."""
  text = eval_lib.load_text(config.eval_text or None)
  return np.asarray(
    eval_lib.make_windows(model.encode(text), config.eval_num_seqs, config.eval_seq_len)
  )


def _log_probs(params, cfg, tokens) -> np.ndarray:
  logits = np.asarray(decoder.forward(params, cfg, tokens), np.float64)[:, :-1]
  top = logits.max(-1, keepdims=True)
  return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


def metrics(cfg, fp_params, q_params, tokens) -> dict[str, float]:
  """``fp_ppl``, ``ppl``, ``kld`` (fp || quantized) and ``top1`` agreement on ``tokens``."""
  lp_fp = _log_probs(fp_params, cfg, tokens)
  lp_q = _log_probs(linears.dequantize_params(q_params, cfg), cfg, tokens)
  target = np.asarray(tokens)[:, 1:, None]
  nll = lambda lp: -np.take_along_axis(lp, target, -1).mean()
  return {
    'fp_ppl': float(np.exp(nll(lp_fp))),
    'ppl': float(np.exp(nll(lp_q))),
    'kld': float((np.exp(lp_fp) * (lp_fp - lp_q)).sum(-1).mean()),
    'top1': float((lp_fp.argmax(-1) == lp_q.argmax(-1)).mean()),
  }


def assert_row_matches(row, want, keys=('ppl', 'kld', 'top1')) -> None:
  for k in keys:
    np.testing.assert_allclose(row[k], want[k], rtol=2e-4, atol=1e-6, err_msg=k)
