"""GGUF ``tokenizer.ggml.*`` fields from a Hugging Face byte-level BPE tokenizer dir.

The inverse of ``loading.tokenizer`` (which builds a ``tokenizers`` tokenizer from a
GGUF file's fields), for a GGUF written from a Hugging Face model dir: llama.cpp
needs the tokenizer in the file to load a model. What llama.cpp's
``convert_hf_to_gguf.py`` writes for a GPT-2-style BPE model (``model: 'gpt2'``):

* ``tokenizer.ggml.tokens``: the vocabulary by id (``tokenizer.json``'s
  ``model.vocab`` and its ``added_tokens``), ``token_type``: 3 (control) for
  special added tokens, 4 (user-defined) for other added tokens, 1 (normal)
  otherwise;
* ``merges``, the special token ids (``bos``/``eos``/``unk``/``pad`` from
  ``tokenizer_config.json`` / ``config.json``), ``add_bos_token`` and the chat
  template: ``gguf.SpecialVocab``, the gguf package's own reader of those files;
* ``tokenizer.ggml.pre``: llama.cpp's name for the pre-tokenizer (how text is
  split before BPE). The converter recognises a tokenizer by hashing its
  encoding of a probe text; here the ``pre_tokenizer`` of ``tokenizer.json`` is
  matched against the splits ``loading.tokenizer`` implements ('smollm': single
  digits then GPT-2's byte-level regex; 'gpt2': the regex alone). Any other
  pre-tokenizer is refused, naming it: a wrong name would make llama.cpp split
  text differently from the model's own tokenizer.
"""

from __future__ import annotations

import json
import os
from typing import Any

from cafeq_jax.loading.tokenizer import CONTROL
from cafeq_jax.loading.tokenizer import NORMAL
from cafeq_jax.loading.tokenizer import USER_DEFINED


def _byte_level(p: dict) -> bool:
  return p.get('type') == 'ByteLevel' and p.get('use_regex', True) and not p.get('add_prefix_space')


def pre_tokenizer_name(pre: dict | None) -> str:
  """llama.cpp's ``tokenizer.ggml.pre`` for a ``tokenizer.json`` ``pre_tokenizer``."""
  if pre is not None and _byte_level(pre):
    return 'gpt2'
  if pre is not None and pre.get('type') == 'Sequence':
    parts = pre.get('pretokenizers', [])
    if (
      len(parts) == 2
      and parts[0].get('type') == 'Digits'
      and parts[0].get('individual_digits')
      and _byte_level(parts[1])
    ):
      return 'smollm'
  raise ValueError(
    f'tokenizer.json pre_tokenizer {json.dumps(pre)[:200]} has no llama.cpp name this '
    "writer knows (supported: ByteLevel -> 'gpt2'; Digits(individual) + ByteLevel -> "
    "'smollm'); write the GGUF from a source GGUF instead (save_gguf(source=...))."
  )


def tokenizer_fields(path: str | os.PathLike, vocab_size: int | None = None) -> dict[str, Any]:
  """The tokenizer of the Hugging Face dir ``path`` as GGUF fields.

  Args:
    path: a dir holding ``tokenizer.json`` (and optionally ``tokenizer_config.json``,
      ``config.json`` for the special token ids).
    vocab_size: the model's vocabulary (embedding rows); the tokenizer must have
      exactly that many tokens.

  Returns:
    ``{'model', 'pre', 'tokens', 'token_type', 'special': gguf.SpecialVocab}``.

  Raises:
    FileNotFoundError: no ``tokenizer.json``.
    ValueError: not a byte-level BPE tokenizer, ids with gaps, a vocabulary of
      another size, an unknown pre-tokenizer.
  """
  import gguf  # pylint: disable=g-import-not-at-top

  path = os.fspath(path)
  file = os.path.join(path, 'tokenizer.json')
  if not os.path.isfile(file):
    raise FileNotFoundError(f'{path!r} has no tokenizer.json to write into the GGUF file.')
  try:
    with open(file, encoding='utf-8') as f:
      tj = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f'{file!r} is not a readable tokenizer.json: {e}') from e
  model = tj.get('model') or {}
  decoder = tj.get('decoder') or {}
  if model.get('type') != 'BPE' or model.get('byte_fallback') or decoder.get('type') != 'ByteLevel':
    raise ValueError(
      f'{file!r}: only byte-level BPE tokenizers (GPT-2 style: model BPE, ByteLevel '
      f'decoder) are written; got model {model.get("type")!r}, decoder {decoder.get("type")!r}.'
    )
  by_id: dict[int, tuple[str, int]] = {i: (t, NORMAL) for t, i in model['vocab'].items()}
  for a in tj.get('added_tokens') or []:
    by_id[a['id']] = (a['content'], CONTROL if a.get('special') else USER_DEFINED)
  n = len(by_id)
  if sorted(by_id) != list(range(n)):
    missing = sorted(set(range(max(by_id) + 1)) - set(by_id))[:5]
    raise ValueError(f'{file!r}: token ids are not 0..{n - 1} (missing e.g. {missing}).')
  if vocab_size is not None and n != vocab_size:
    raise ValueError(
      f'{file!r} has {n} tokens but the model has vocab_size={vocab_size} embedding rows.'
    )
  special = gguf.SpecialVocab(path, load_merges=True, n_vocab=n)
  if not special.merges:
    raise ValueError(f'{file!r} has no BPE merges.')
  return {
    'model': 'gpt2',
    'pre': pre_tokenizer_name(tj.get('pre_tokenizer')),
    'tokens': [by_id[i][0] for i in range(n)],
    'token_type': [by_id[i][1] for i in range(n)],
    'special': special,
  }


def add_to_writer(writer, fields: dict[str, Any]) -> None:
  """Writes ``tokenizer_fields`` into a ``gguf.GGUFWriter``."""
  writer.add_tokenizer_model(fields['model'])
  writer.add_tokenizer_pre(fields['pre'])
  writer.add_token_list(fields['tokens'])
  writer.add_token_types(fields['token_type'])
  fields['special'].add_to_gguf(writer, quiet=True)
