"""llama.cpp itself (through llama-cpp-python) as a reference: its quantizer and its forward.

* ``quantize(src, dst, 'Q3_K_S')``: llama.cpp's own ``llama_model_quantize`` (the
  C API behind ``llama-quantize``) with its default parameters, the named file type
  ('mix'), ``allow_requantize=True`` (the SmolLM2 source file is itself Q4_1) and no
  importance matrix. The tensor types it picks per tensor (``tensor_types``) are
  llama.cpp's mixes: e.g. for SmolLM2-135M (rows of 576 columns, not a multiple of
  the 256 of the K-quants) only ``ffn_down`` (1536 columns) keeps a K-quant and the
  other linears fall back (``tensor_type_fallback`` in src/llama-quant.cpp:
  Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0).
* ``logits(path, windows)``: all-position logits of llama.cpp's CPU forward, one
  window at a time from an empty KV cache, to compare with ``cafeq_jax``'s forward.
* ``tensor_types`` / ``linear_types_by_layer`` / ``linear_bits_per_weight``: what a
  GGUF file holds, read with the ``gguf`` package (no llama.cpp needed).

llama-cpp-python is not a dependency of the project: it compiles llama.cpp from
source on install (10-30 min on 2 cores), ``pip install llama-cpp-python==0.3.36``
(tested version; it needs ``typing-extensions numpy diskcache jinja2``). Only
``quantize`` and ``logits`` need it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
from typing import Iterator

import numpy as np

from cafeq_jax import atomic
from cafeq_jax.ggml import mixes

LLAMA_CPP_PIP = 'pip install llama-cpp-python==0.3.36'

# The file types ('mixes') quantize() accepts -> llama.cpp's enum llama_ftype. 'F32'
# and 'F16' dequantize (every 2-D weight in float): the references for exact checks.
FTYPES = {
  'F32': 0,
  'F16': 1,
  'Q4_0': 2,
  'Q4_1': 3,
  'Q8_0': 7,
  'Q3_K_S': 11,
  'Q3_K_M': 12,
  'Q4_K_S': 14,
  'Q4_K_M': 15,
  'Q5_K_M': 17,
  'Q6_K': 18,
}

# The 7 linear weights of a Llama block, in the GGUF names ``blk.<i>.<kind>.weight``.
LINEAR_KINDS = tuple(mixes.GGUF_NAMES.values())
# KV cache types logits() accepts -> enum ggml_type (llama.cpp's default is F16).
KV_TYPES = {'F32': 0, 'F16': 1}
_LINEAR = re.compile(r'^blk\.(\d+)\.(' + '|'.join(LINEAR_KINDS) + r')\.weight$')


def _import_llama_cpp():
  try:
    import llama_cpp  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
      f'llama_cpp (llama-cpp-python) is not installed: {LLAMA_CPP_PIP} '
      '(it builds llama.cpp from source: 10-30 min on 2 cores).'
    ) from e
  return llama_cpp


@contextlib.contextmanager
def _llama_log(verbose: bool) -> Iterator[None]:
  """llama.cpp's log (routed to llama-cpp-python's logger) on or off for a block.

  llama-cpp-python 0.3.36 maps ggml's log levels off by one (WARN counts as ERROR),
  so 'off' is CRITICAL.
  """
  from llama_cpp import _logger  # pylint: disable=g-import-not-at-top

  old = _logger.logger.level
  _logger.logger.setLevel(logging.DEBUG if verbose else logging.CRITICAL)
  try:
    yield
  finally:
    _logger.logger.setLevel(old)


def quantize(
  src_gguf: str | os.PathLike[str],
  dst_gguf: str | os.PathLike[str],
  ftype: str,
  *,
  nthread: int = 2,
  verbose: bool = False,
) -> str:
  """Quantizes ``src_gguf`` into ``dst_gguf`` with llama.cpp's mix ``ftype``.

  Calls ``llama_cpp.llama_model_quantize`` with ``llama_model_quantize_default_params()``
  (output/embedding types chosen by the mix, no pure mode, no importance matrix),
  ``ftype`` and ``allow_requantize=True``. The file is written to a hidden sibling
  temporary and renamed over ``dst_gguf`` only once complete.

  Args:
    ftype: one of ``FTYPES`` ('Q4_0', 'Q3_K_S', 'Q4_K_M', ..., or 'F32' / 'F16').
    nthread: llama.cpp's quantization threads.
    verbose: show llama.cpp's log (per-tensor types, fallbacks) on stderr.
  Returns:
    ``dst_gguf`` (absolute).
  Raises:
    ImportError: llama-cpp-python is not installed (the message says how).
    ValueError: unknown ``ftype``.
    FileNotFoundError: ``src_gguf`` does not exist.
    RuntimeError: llama.cpp's quantizer failed (its return code).
  """
  if ftype not in FTYPES:
    raise ValueError(f'ftype={ftype!r}; expected one of {", ".join(FTYPES)}.')
  src = os.path.abspath(os.fspath(src_gguf))
  dst = os.path.abspath(os.fspath(dst_gguf))
  if not os.path.isfile(src):
    raise FileNotFoundError(f'source GGUF {src!r} does not exist.')
  if os.path.isdir(dst):
    raise IsADirectoryError(f'{dst!r} is a directory; refusing to replace it with a file.')
  llama_cpp = _import_llama_cpp()
  params = llama_cpp.llama_model_quantize_default_params()
  params.ftype = FTYPES[ftype]
  params.nthread = int(nthread)
  params.allow_requantize = True
  os.makedirs(os.path.dirname(dst), exist_ok=True)
  directory, base = os.path.split(dst)
  tmp = os.path.join(directory, f'.{base}.tmp.{os.getpid()}.{secrets.token_hex(4)}')
  try:
    with _llama_log(verbose):
      llama_cpp.llama_backend_init()
      rc = llama_cpp.llama_model_quantize(src.encode(), tmp.encode(), params)
    if rc != 0:
      raise RuntimeError(
        f'llama_model_quantize({src!r}, ftype={ftype}) failed with code {rc} '
        '(rerun with verbose=True for llama.cpp log).'
      )
    if not os.path.isfile(tmp):
      raise RuntimeError(f'llama_model_quantize returned 0 but wrote no file for {dst!r}.')
    os.replace(tmp, dst)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise
  atomic.clean_stale(dst)
  return dst


def _reader(path: str | os.PathLike[str]):
  import gguf  # pylint: disable=g-import-not-at-top

  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'GGUF file {path!r} does not exist.')
  return gguf.GGUFReader(path)


def tensor_types(path: str | os.PathLike[str]) -> dict[str, str]:
  """Every tensor of the GGUF file ``path``: name -> ggml type name ('Q4_0', 'F32', ...)."""
  return {t.name: t.tensor_type.name for t in _reader(path).tensors}


def linear_types_by_layer(path: str | os.PathLike[str]) -> dict[str, list[str]]:
  """For each of the 7 ``LINEAR_KINDS``: its ggml type name in layers 0, 1, ..."""
  found: dict[str, dict[int, str]] = {k: {} for k in LINEAR_KINDS}
  for name, type_name in tensor_types(path).items():
    m = _LINEAR.match(name)
    if m:
      found[m.group(2)][int(m.group(1))] = type_name
  return {k: [v[i] for i in sorted(v)] for k, v in found.items()}


def linear_bits_per_weight(path: str | os.PathLike[str]) -> float:
  """Bits per weight over the 7 linear weights of every block (bytes * 8 / elements)."""
  n_bytes = n_elements = 0
  for t in _reader(path).tensors:
    if _LINEAR.match(t.name):
      n_bytes += int(t.n_bytes)
      n_elements += int(t.n_elements)
  if not n_elements:
    raise ValueError(f'{os.fspath(path)!r} has no blk.<i>.<linear>.weight tensors.')
  return n_bytes * 8 / n_elements


def logits(
  path: str | os.PathLike[str],
  windows: np.ndarray,
  *,
  n_threads: int = 2,
  kv_type: str = 'F16',
) -> np.ndarray:
  """llama.cpp's logits at every position of each token window.

  One ``llama_cpp.Llama`` context of ``n_ctx = S`` with ``logits_all=True``; for each
  window ``reset()`` (the KV cache is emptied from position 0 by the next ``eval``)
  then ``eval(window)``, whose logits for all S positions are in ``scores[:S]``. No
  BOS token is added: the windows are evaluated exactly as given.

  llama.cpp's CPU matmuls of quantized weights quantize the activations too (to
  Q8_0 / Q8_1 / Q8_K, by weight type), so on a quantized file its logits differ
  from a float forward of the same dequantized weights by more than rounding.

  Args:
    windows: (N, S) int token ids.
    kv_type: KV cache type, 'F16' (llama.cpp's default) or 'F32' (for exact
      comparisons with a float forward).
  Returns:
    (N, S, V) float32.
  """
  if kv_type not in KV_TYPES:
    raise ValueError(f'kv_type={kv_type!r}; expected one of {", ".join(KV_TYPES)}.')
  windows = np.asarray(windows)
  if windows.ndim != 2 or not np.issubdtype(windows.dtype, np.integer) or windows.shape[1] < 1:
    raise ValueError(f'windows must be (N, S) ints; got shape {windows.shape}, {windows.dtype}.')
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'GGUF file {path!r} does not exist.')
  n, s = windows.shape
  out = np.empty((n, s, 0), np.float32)
  for i, scores in enumerate(_window_scores(path, windows, n_threads, kv_type)):
    if i == 0:
      out = np.empty((n, s, scores.shape[-1]), np.float32)
    out[i] = scores
  return out


def perplexity(
  path: str | os.PathLike[str], windows: np.ndarray, *, n_threads: int = 2, kv_type: str = 'F16'
) -> float:
  """Perplexity of the next token over all windows, as llama.cpp runs ``path``.

  Same scoring as ``cafeq_jax.eval`` (positions ``0 .. S-2`` predict ``1 .. S-1``),
  one window at a time (no ``(N, S, V)`` array is kept).
  """
  windows = np.asarray(windows)
  total, count = 0.0, 0
  for i, scores in enumerate(_window_scores(os.fspath(path), windows, n_threads, kv_type)):
    x = scores[:-1].astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    total -= float(np.take_along_axis(logp, windows[i, 1:, None].astype(np.int64), -1).sum())
    count += windows.shape[1] - 1
  return float(np.exp(total / count))


def _window_scores(path: str, windows: np.ndarray, n_threads: int, kv_type: str):
  """Yields llama.cpp's ``(S, V)`` logits of each window (one context, reset per window)."""
  if kv_type not in KV_TYPES:
    raise ValueError(f'kv_type={kv_type!r}; expected one of {", ".join(KV_TYPES)}.')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'GGUF file {path!r} does not exist.')
  llama_cpp = _import_llama_cpp()
  n, s = windows.shape
  llm = llama_cpp.Llama(
    model_path=path,
    n_ctx=s,
    n_batch=s,
    n_ubatch=s,
    logits_all=True,
    n_threads=n_threads,
    n_threads_batch=n_threads,
    type_k=KV_TYPES[kv_type],
    type_v=KV_TYPES[kv_type],
    verbose=False,
  )
  try:
    for i in range(n):
      llm.reset()
      llm.eval([int(t) for t in windows[i]])
      if llm.n_tokens != s:
        raise RuntimeError(
          f'llama.cpp evaluated {llm.n_tokens} tokens of window {i}; expected {s}.'
        )
      yield np.asarray(llm.scores[:s], np.float32)
  finally:
    llm.close()
