"""An HF export read back by an independent forward: transformers (PyTorch, CPU).

``--config.export_hf`` writes a quantized model's *effective* weights (dequantized
codes, online transforms folded in; ``cafeq_jax.loading.hf.save_hf``). Whether the
export carries the quality measured here is a question for another implementation:
``readback`` loads the directory with ``transformers.AutoModelForCausalLM`` in
float32 and scores the same token windows as ``cafeq_jax.eval.evaluate`` (mean
next-token NLL over every window, ``ppl = exp(nll)``).

Needs the test extra (``pip install -e '.[test]'``: torch, transformers).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def _import_torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
      "reading an HF export back needs torch and transformers: pip install -e '.[test]'"
    ) from e
  return torch, transformers


def readback(
  model_dir: str, windows: Mapping[str, np.ndarray], *, batch_size: int = 2
) -> dict[str, dict[str, object]]:
  """Perplexity of the HF model in ``model_dir`` on each text's windows, and its logits
  on the first window (the model is loaded once).

  Args:
    model_dir: a directory ``transformers`` loads (``save_hf``'s output).
    windows: text name -> ``(N, T)`` int token windows (``cafeq_jax.eval.make_windows``).
    batch_size: windows per forward pass.

  Returns:
    text name -> ``{'ppl': float, 'nll': float, 'first_logits': (T, V) float32}``.
  """
  torch, transformers = _import_torch()
  windows = {t: np.asarray(w) for t, w in windows.items()}
  for t, w in windows.items():
    if w.ndim != 2 or w.shape[1] < 2:
      raise ValueError(f'windows of {t!r} must be (N, T) with T >= 2; got shape {w.shape}.')
  model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
  out = {}
  for t, w in windows.items():
    total, first = 0.0, None
    with torch.no_grad():
      for s in range(0, len(w), batch_size):
        batch = torch.from_numpy(w[s : s + batch_size].astype(np.int64))
        logits = model(batch).logits.float()
        if first is None:
          first = logits[0].numpy()
        lp = torch.log_softmax(logits[:, :-1], dim=-1)
        nll = -torch.gather(lp, -1, batch[:, 1:, None])[..., 0]
        total += float(nll.double().sum())
    nll = total / (w.shape[0] * (w.shape[1] - 1))
    out[t] = {'ppl': float(np.exp(nll)), 'nll': nll, 'first_logits': first}
  return out
