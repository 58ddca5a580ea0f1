"""Offline evaluation text and its deterministic cut into token windows.

The default text is the reference documentation that CPython ships in
``pydoc_data.topics`` (~465k characters of real English technical prose, ~110k
SmolLM2 tokens): the ``topics`` dict's values joined in sorted-key order. Any
UTF-8 text file can be used instead.
"""

from __future__ import annotations

import os
from typing import Callable
from typing import Sequence

import numpy as np

DEFAULT_NUM_SEQS = 8
DEFAULT_SEQ_LEN = 512


def default_text() -> str:
  """Python's ``pydoc_data.topics`` texts joined (blank line between) in key order."""
  from pydoc_data import topics  # pylint: disable=g-import-not-at-top

  return '\n\n'.join(topics.topics[k] for k in sorted(topics.topics))


def load_text(path: str | os.PathLike[str] | None = None) -> str:
  """The text of the UTF-8 file ``path``, or ``default_text()`` when None."""
  if path is None:
    return default_text()
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'evaluation text file {path!r} does not exist.')
  with open(path, encoding='utf-8') as f:
    text = f.read()
  if not text.strip():
    raise ValueError(f'evaluation text file {path!r} is empty.')
  return text


def make_windows(
  ids: Sequence[int] | np.ndarray, num_seqs: int = DEFAULT_NUM_SEQS, seq_len: int = DEFAULT_SEQ_LEN
) -> np.ndarray:
  """Cuts a token stream into ``num_seqs`` windows of ``seq_len`` tokens.

  The stream is split into ``num_seqs`` equal consecutive chunks and each window is
  the start of one chunk, so the windows are disjoint, spread over the whole text
  and fully determined by (ids, num_seqs, seq_len).

  Args:
    ids: (n,) int token ids.
  Returns:
    (num_seqs, seq_len) int32.
  """
  for name, v in (('num_seqs', num_seqs), ('seq_len', seq_len)):
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
      raise ValueError(f'{name}={v!r}; expected a positive int.')
  if seq_len < 2:
    raise ValueError(f'seq_len={seq_len}; need >= 2 tokens per window (one prediction).')
  ids = np.asarray(ids)
  if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
    raise ValueError(f'ids must be a 1-D int sequence; got shape {ids.shape}, dtype {ids.dtype}.')
  needed = num_seqs * seq_len
  if ids.size < needed:
    raise ValueError(
      f'text too short: {ids.size} tokens, but {num_seqs} x {seq_len} = {needed} are '
      f'needed; pass a longer text or fewer/shorter windows.'
    )
  stride = ids.size // num_seqs
  return np.stack([ids[i * stride : i * stride + seq_len] for i in range(num_seqs)]).astype(
    np.int32
  )


def eval_tokens(
  encode: Callable[[str], Sequence[int]],
  text: str | None = None,
  num_seqs: int = DEFAULT_NUM_SEQS,
  seq_len: int = DEFAULT_SEQ_LEN,
) -> np.ndarray:
  """Tokenizes ``text`` (default: ``default_text()``) and cuts it with ``make_windows``.

  Args:
    encode: text -> token ids (e.g. ``Tokenizer.encode`` from
      ``cafeq_jax.loading.tokenizer``).
  Returns:
    (num_seqs, seq_len) int32.
  """
  if text is None:
    text = default_text()
  return make_windows(encode(text), num_seqs, seq_len)
