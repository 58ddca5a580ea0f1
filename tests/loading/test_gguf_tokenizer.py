"""The GGUF-built tokenizer against transformers' tokenizer read from the same file."""

from __future__ import annotations

import os

import pytest

from cafeq_jax.loading import gguf as gguf_loading
from cafeq_jax.loading import tokenizer as tokenizer_lib

STRINGS = [
  'Hello world!',
  'x = 12345 + 6.78e-9 and 2024-11-25',  # SmolLM splits digits one by one
  '<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n',
  'naïve café, 東京, Ελληνικά, emoji 🙂👍🏽',
  '  two  spaces\n\n\tTab\r\nCRLF   trailing   ',
  "don't I'll we've they're SHOUTING's",
  'def f(x):\n    return x ** 2  # square\n',
  '',
]


@pytest.fixture(scope='module')
def ours():
  return tokenizer_lib.load_gguf_tokenizer()


@pytest.fixture(scope='module')
def theirs():
  transformers = pytest.importorskip('transformers')
  path = gguf_loading.smollm2_gguf_path()
  return transformers.AutoTokenizer.from_pretrained(
    os.path.dirname(path), gguf_file=os.path.basename(path)
  )


def test_smollm2_special_ids_and_size(ours):
  assert (ours.bos_id, ours.eos_id, ours.add_bos) == (1, 2, False)
  assert ours.vocab_size == 49152
  assert ours.encode('<|im_start|>') == [1]


@pytest.mark.parametrize('text', STRINGS)
def test_encode_matches_transformers(ours, theirs, text):
  assert ours.encode(text) == theirs.encode(text, add_special_tokens=False)


@pytest.mark.parametrize('text', STRINGS)
def test_decode_round_trips(ours, theirs, text):
  ids = ours.encode(text)
  assert ours.decode(ids) == text
  assert ours.decode(ids) == theirs.decode(ids)


def test_encode_matches_transformers_on_pydoc_text(ours, theirs):
  from pydoc_data import topics  # pylint: disable=g-import-not-at-top

  text = '\n'.join(topics.topics[k] for k in sorted(topics.topics))[:40_000]
  ids = ours.encode(text)
  assert len(ids) > 5000
  assert ids == theirs.encode(text, add_special_tokens=False)


def test_encode_add_bos(ours):
  assert ours.encode('hi', add_bos=True) == [1] + ours.encode('hi')


def test_unsupported_tokenizer_model_and_pre_are_rejected():
  with pytest.raises(ValueError, match="tokenizer.ggml.model='llama'"):
    tokenizer_lib.tokenizer_from_gguf_fields(['a'], [], model='llama')
  with pytest.raises(ValueError, match="tokenizer.ggml.pre='qwen2'"):
    tokenizer_lib.tokenizer_from_gguf_fields(['a'], [], pre='qwen2')
  with pytest.raises(ValueError, match="merge 'abc'"):
    tokenizer_lib.tokenizer_from_gguf_fields(['a', 'b'], ['abc'])


def test_missing_tokenizer_in_file_is_reported(tmp_path):
  import gguf  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  path = tmp_path / 'no_tok.gguf'
  w = gguf.GGUFWriter(str(path), 'llama')
  w.add_tensor('token_embd.weight', np.zeros((4, 4), np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(ValueError, match='tokenizer.ggml.tokens is missing'):
    tokenizer_lib.load_gguf_tokenizer(path)
