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


def readback(model_dir: str, windows: np.ndarray, *, batch_size: int = 2) -> dict[str, object]:
  """Perplexity of the HF model in ``model_dir`` on ``windows`` and its logits on the first.

  Args:
    model_dir: a directory ``transformers`` loads (``save_hf``'s output).
    windows: ``(N, T)`` int token windows (``cafeq_jax.eval.make_windows``).
    batch_size: windows per forward pass.

  Returns:
    ``{'ppl': float, 'nll': float, 'first_logits': (T, V) float32}``.
  """
  torch, transformers = _import_torch()
  windows = np.asarray(windows)
  if windows.ndim != 2 or windows.shape[1] < 2:
    raise ValueError(f'windows must be (N, T) with T >= 2; got shape {windows.shape}.')
  model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
  total, first = 0.0, None
  with torch.no_grad():
    for s in range(0, len(windows), batch_size):
      batch = torch.from_numpy(windows[s : s + batch_size].astype(np.int64))
      logits = model(batch).logits.float()
      if first is None:
        first = logits[0].numpy()
      lp = torch.log_softmax(logits[:, :-1], dim=-1)
      nll = -torch.gather(lp, -1, batch[:, 1:, None])[..., 0]
      total += float(nll.double().sum())
  nll = total / (windows.shape[0] * (windows.shape[1] - 1))
  return {'ppl': float(np.exp(nll)), 'nll': nll, 'first_logits': first}
