"""The tokenizer written into a GGUF from a Hugging Face dir (``loading.gguf_tokenizer``).

References: the SmolLM2 GGUF's own tokenizer fields (written by llama.cpp's
converter from the real Hugging Face files), the ``tokenizers`` library that
writes and encodes ``tokenizer.json``, and transformers' GGUF tokenizer reader.
"""

from __future__ import annotations

import json
import os

import jax
import pytest
import tokenizers
from tokenizers import decoders
from tokenizers import models
from tokenizers import pre_tokenizers
from tokenizers import trainers

import cafeq_jax
from cafeq_jax import recipes
from cafeq_jax.ggml import mixes
from cafeq_jax.loading import gguf as gguf_lib
from cafeq_jax.loading import gguf_tokenizer
from cafeq_jax.loading import gguf_writer
from cafeq_jax.loading import hf
from cafeq_jax.loading import tokenizer as tokenizer_lib
from cafeq_jax.models import init_params
from experiments import quantize_lib
from tests.experiments.test_quantize import _tiny_config
from tests.loading import test_gguf_export

TEXTS = [
  'Hello world! x = 12345 + 6.78e-9',
  "don't stop\n\tthe  tab; naïve café",
  '<|im_start|>user\nhi<|im_end|>',
]


def _smollm2_dir(tmp_path):
  """SmolLM2's tokenizer as a Hugging Face dir, written by ``tokenizers`` itself."""
  ours = tokenizer_lib.load_gguf_tokenizer()
  ours.backend.save(str(tmp_path / 'tokenizer.json'))
  special = {'bos_token': '<|im_start|>', 'eos_token': '<|im_end|>'}
  special.update(unk_token='<|endoftext|>', pad_token='<|im_end|>', add_bos_token=False)
  (tmp_path / 'tokenizer_config.json').write_text(json.dumps(special))
  return tmp_path


def test_smollm2_tokenizer_json_gives_the_original_gguf_fields(tmp_path):
  fields = gguf_tokenizer.tokenizer_fields(_smollm2_dir(tmp_path), vocab_size=49152)
  src = gguf_lib.open_gguf(gguf_lib.smollm2_gguf_path()).fields

  def want(name):
    return src[f'tokenizer.ggml.{name}'].contents()

  assert fields['model'] == want('model') == 'gpt2'
  assert fields['pre'] == want('pre') == 'smollm'  # digits split one by one
  assert fields['tokens'] == want('tokens')
  assert fields['token_type'] == want('token_type')  # the 17 special tokens: control
  assert fields['special'].merges == want('merges')
  ids = fields['special'].special_token_ids
  assert (ids['bos'], ids['eos'], ids['unk'], ids['pad']) == tuple(
    want(f'{n}_token_id') for n in ('bos', 'eos', 'unknown', 'padding')
  )
  assert fields['special'].add_special_token['bos'] is want('add_bos_token') is False


def test_bad_tokenizer_dirs_are_refused(tmp_path):
  with pytest.raises(FileNotFoundError, match='no tokenizer.json'):
    gguf_tokenizer.tokenizer_fields(tmp_path)
  d = _smollm2_dir(tmp_path)
  with pytest.raises(ValueError, match='49152 tokens but the model has vocab_size=96'):
    gguf_tokenizer.tokenizer_fields(d, vocab_size=96)
  tj = json.loads((d / 'tokenizer.json').read_text())
  tj['pre_tokenizer'] = {'type': 'Metaspace', 'replacement': '▁'}
  (d / 'tokenizer.json').write_text(json.dumps(tj))
  with pytest.raises(ValueError, match='Metaspace.*no llama.cpp name'):
    gguf_tokenizer.tokenizer_fields(d)
  tj['model']['type'] = 'Unigram'
  (d / 'tokenizer.json').write_text(json.dumps(tj))
  with pytest.raises(ValueError, match='only byte-level BPE'):
    gguf_tokenizer.tokenizer_fields(d)
  (d / 'tokenizer.json').write_text('{not json')
  with pytest.raises(ValueError, match='not a readable tokenizer.json'):
    gguf_tokenizer.tokenizer_fields(d)


VOCAB = 320
# test_gguf_export's tiny Llama (widths multiples of 256) with a real BPE's vocabulary.
TINY = test_gguf_export.TINY.replace(vocab_size=VOCAB, num_layers=2)


def _trained_tokenizer_dir(tmp_path):
  """A GPT-2-style byte-level BPE of exactly ``VOCAB`` tokens, trained here."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=VOCAB,
    special_tokens=['<|endoftext|>'],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  text = [t * 3 for t in TEXTS] + [open(tokenizers.__file__).read()]
  tok.train_from_iterator(text, trainer)
  assert tok.get_vocab_size() == VOCAB
  tok.save(str(tmp_path / 'tokenizer.json'))
  (tmp_path / 'tokenizer_config.json').write_text(
    json.dumps({'bos_token': '<|endoftext|>', 'eos_token': '<|endoftext|>'})
  )
  return tok


def test_tiny_gguf_from_an_hf_dir_carries_its_tokenizer(tmp_path):
  tok = _trained_tokenizer_dir(tmp_path)
  params = init_params(TINY, jax.random.key(0))
  qp, _ = cafeq_jax.quantize(params, TINY, recipes.get('rtn', spec=mixes.spec_map('Q4_0', TINY)))
  path = gguf_writer.save_gguf(qp, TINY, tmp_path / 'm.gguf', tokenizer=tmp_path, mix='Q4_0')
  back = tokenizer_lib.load_gguf_tokenizer(path)  # our reader of the file
  assert (back.vocab_size, back.eos_id) == (VOCAB, 0)
  transformers = pytest.importorskip('transformers')
  theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file='m.gguf')
  for text in TEXTS:
    want = tok.encode(text).ids
    assert back.encode(text, add_bos=False) == want, text
    assert theirs.encode(text, add_special_tokens=False) == want, text
  with pytest.raises(ValueError, match='not both'):
    gguf_writer.save_gguf(
      qp, TINY, tmp_path / 'x.gguf', tokenizer=tmp_path, source=gguf_lib.smollm2_gguf_path()
    )
  assert not os.path.exists(tmp_path / 'x.gguf')


def _hf_model_dir(tmp_path):
  d = tmp_path / 'hf'
  hf.save_hf(init_params(TINY, jax.random.key(0)), TINY, d)
  tok = _trained_tokenizer_dir(d)
  return d, tok


def test_main_job_gguf_of_an_hf_dir_holds_its_tokenizer(tmp_path):
  d, tok = _hf_model_dir(tmp_path)
  config = _tiny_config(tmp_path / 'out', methods='rtn', plots=False)
  config.model, config.columns, config.export = str(d), 'w4g32', 'gguf:Q4_0'
  quantize_lib.run(config)
  back = tokenizer_lib.load_gguf_tokenizer(tmp_path / 'out' / 'gguf' / 'gguf-Q4_0_rtn.gguf')
  assert [back.encode(t, add_bos=False) for t in TEXTS] == [tok.encode(t).ids for t in TEXTS]


def test_main_job_refuses_a_tokenizer_gguf_cannot_hold_before_any_work(tmp_path):
  d, _ = _hf_model_dir(tmp_path)
  tj = json.loads((d / 'tokenizer.json').read_text())
  tj['pre_tokenizer'] = {'type': 'Whitespace'}
  (d / 'tokenizer.json').write_text(json.dumps(tj))
  config = _tiny_config(tmp_path / 'out', methods='rtn', plots=False)
  config.model, config.columns, config.export = str(d), 'w4g32', 'gguf:Q4_0'
  with pytest.raises(ValueError, match='Whitespace.*no llama.cpp name'):
    quantize_lib.run(config)
  assert not (tmp_path / 'out' / 'results.json').exists()
