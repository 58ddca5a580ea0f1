"""experiments/llamacpp.py: llama.cpp's quantizer and forward against ours.

The tests that run llama.cpp are slow (``-m slow``) and skip without llama-cpp-python
(``pip install llama-cpp-python==0.3.36``, a 10-30 min build); the GGUF readers and
the argument checks run always.
"""

from __future__ import annotations

import os
import sys

import jax
import numpy as np
import pytest

from cafeq_jax.eval import data
from cafeq_jax.loading import load_gguf
from cafeq_jax.loading import load_gguf_tokenizer
from cafeq_jax.loading import smollm2_gguf_path
from cafeq_jax.models import decoder
from experiments import llamacpp

N_LAYERS = 30  # SmolLM2-135M
# Bits per weight of the ggml block types (block bytes * 8 / block weights).
_BITS = {
  'Q4_0': 4.5,
  'Q4_1': 5.0,
  'Q5_0': 5.5,
  'Q5_1': 6.0,
  'Q8_0': 8.5,
  'Q3_K': 3.4375,
  'Q4_K': 4.5,
  'Q5_K': 5.5,
  'Q6_K': 6.5625,
}
# Weights per layer of each linear (576 hidden, 192 = 3 KV heads x 64, 1536 MLP).
_WEIGHTS = {
  'attn_q': 576 * 576,
  'attn_k': 576 * 192,
  'attn_v': 576 * 192,
  'attn_output': 576 * 576,
  'ffn_gate': 576 * 1536,
  'ffn_up': 576 * 1536,
  'ffn_down': 1536 * 576,
}


def _use_more_bits(i: int, n: int = N_LAYERS) -> bool:
  """llama-quant.cpp's use_more_bits (first/last eighth and every third layer between)."""
  return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _all(t: str) -> list[str]:
  return [t] * N_LAYERS


def _first(k: int, t: str, rest: str) -> list[str]:
  return [t] * k + [rest] * (N_LAYERS - k)


def _more_bits(more: str, rest: str) -> list[str]:
  return [more if _use_more_bits(i) else rest for i in range(N_LAYERS)]


# llama.cpp's mixes on SmolLM2-135M, measured with llama-cpp-python 0.3.36 (no
# imatrix). Rows of 576 columns cannot hold the 256-weight K-quant blocks, so
# tensor_type_fallback turns Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0;
# ffn_down (1536 columns) keeps the K-quant the mix asks for.
EXPECTED_MIXES = {
  'Q3_K_S': dict(
    attn_q=_all('Q4_0'),
    attn_k=_all('Q4_0'),
    attn_v=_all('Q4_0'),
    attn_output=_all('Q4_0'),
    ffn_gate=_all('Q4_0'),
    ffn_up=_all('Q4_0'),
    ffn_down=_all('Q3_K'),
  ),
  'Q3_K_M': dict(
    attn_q=_all('Q4_0'),
    attn_k=_all('Q4_0'),
    attn_v=_first(2, 'Q5_1', 'Q5_0'),  # Q5_K for the first 2, else Q4_K
    attn_output=_all('Q5_0'),  # Q4_K
    ffn_gate=_all('Q4_0'),
    ffn_up=_all('Q4_0'),
    ffn_down=_first(1, 'Q5_K', 'Q4_K'),  # Q5_K below n_layer/16
  ),
  'Q4_K_S': dict(
    attn_q=_all('Q5_0'),
    attn_k=_all('Q5_0'),
    attn_v=_first(4, 'Q5_1', 'Q5_0'),  # Q5_K for the first 4
    attn_output=_all('Q5_0'),
    ffn_gate=_all('Q5_0'),
    ffn_up=_all('Q5_0'),
    ffn_down=_first(3, 'Q5_K', 'Q4_K'),  # Q5_K below n_layer/8
  ),
  'Q4_K_M': dict(
    attn_q=_all('Q5_0'),
    attn_k=_all('Q5_0'),
    attn_v=_more_bits('Q8_0', 'Q5_0'),  # Q6_K on use_more_bits layers
    attn_output=_all('Q5_0'),
    ffn_gate=_all('Q5_0'),
    ffn_up=_all('Q5_0'),
    ffn_down=_more_bits('Q6_K', 'Q4_K'),
  ),
  'Q4_0': {k: _all('Q4_0') for k in llamacpp.LINEAR_KINDS},
}
# linear_bits_per_weight measured on the files (the same as computed from the table).
EXPECTED_BITS = {
  'Q3_K_S': 4.234375,
  'Q3_K_M': 4.634375,
  'Q4_K_S': 5.277083,
  'Q4_K_M': 5.534375,
  'Q4_0': 4.5,
}


def _bits_from_table(table: dict[str, list[str]]) -> float:
  bits = sum(_BITS[t] * _WEIGHTS[k] for k, types in table.items() for t in types)
  return bits / (N_LAYERS * sum(_WEIGHTS.values()))


def _windows() -> np.ndarray:
  return data.eval_tokens(load_gguf_tokenizer().encode, None, num_seqs=2, seq_len=64)


def _log_softmax(x: np.ndarray) -> np.ndarray:
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


# ---------------------------------------------------------------------------
# Always run: GGUF readers, argument checks.


def test_readers_on_the_smollm2_source_file():
  src = smollm2_gguf_path()
  types = llamacpp.tensor_types(src)
  assert types['token_embd.weight'] == 'Q8_0' and types['output_norm.weight'] == 'F32'
  assert 'output.weight' not in types  # tied embeddings
  assert llamacpp.linear_types_by_layer(src) == {k: _all('Q4_1') for k in llamacpp.LINEAR_KINDS}
  assert llamacpp.linear_bits_per_weight(src) == 5.0
  assert _bits_from_table({k: _all('Q4_1') for k in llamacpp.LINEAR_KINDS}) == 5.0


def test_expected_mix_bits_follow_from_the_tables():
  for mix, table in EXPECTED_MIXES.items():
    assert _bits_from_table(table) == pytest.approx(EXPECTED_BITS[mix], abs=1e-6), mix


def test_quantize_and_logits_check_their_arguments(tmp_path):
  src = smollm2_gguf_path()
  with pytest.raises(ValueError, match=r"ftype='Q2_K'; expected one of .*Q3_K_S"):
    llamacpp.quantize(src, tmp_path / 'x.gguf', 'Q2_K')
  with pytest.raises(FileNotFoundError, match='nope.gguf'):
    llamacpp.quantize(tmp_path / 'nope.gguf', tmp_path / 'x.gguf', 'Q4_0')
  with pytest.raises(ValueError, match=r'\(N, S\) ints'):
    llamacpp.logits(src, np.zeros(8, np.int32))
  with pytest.raises(ValueError, match='kv_type'):
    llamacpp.logits(src, np.zeros((1, 8), np.int32), kv_type='Q8_0')
  with pytest.raises(FileNotFoundError, match='nope.gguf'):
    llamacpp.tensor_types(tmp_path / 'nope.gguf')


def test_without_llama_cpp_the_error_says_how_to_install(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, 'llama_cpp', None)  # import llama_cpp -> ImportError
  with pytest.raises(ImportError, match=r'pip install llama-cpp-python==0\.3\.36.*10-30 min'):
    llamacpp.quantize(smollm2_gguf_path(), tmp_path / 'x.gguf', 'Q4_0')
  with pytest.raises(ImportError, match=r'pip install llama-cpp-python'):
    llamacpp.logits(smollm2_gguf_path(), np.zeros((1, 8), np.int32))
  assert not os.listdir(tmp_path)


# ---------------------------------------------------------------------------
# llama.cpp itself (slow; skipped without llama-cpp-python).


@pytest.fixture(scope='module')
def smollm2_forward():
  params, cfg = load_gguf()
  fwd = jax.jit(lambda p, x: decoder.forward(p, cfg, x))
  return lambda p, x: np.asarray(fwd(p, x)), params


@pytest.mark.slow
def test_llamacpp_logits_match_our_forward_on_smollm2(smollm2_forward, tmp_path):
  pytest.importorskip('llama_cpp')
  forward, params = smollm2_forward
  windows = _windows()
  ours = forward(params, windows)

  # The Q4_1 file as llama.cpp runs it: its Q4_1 matmuls quantize the activations
  # to Q8_1 and the KV cache is F16, so it is close to our float forward of the
  # dequantized weights, not equal. Measured (2 x 64 pydoc tokens): max |dlogit|
  # 1.87 (logits up to 38), mean 0.170, top-1 agreement 0.953 (122/128), mean KL
  # 0.0043 nats, perplexity 41.85 (llama.cpp) vs 42.38 (ours).
  theirs = llamacpp.logits(smollm2_gguf_path(), windows)
  assert theirs.shape == ours.shape == (2, 64, 49152) and theirs.dtype == np.float32
  d = np.abs(theirs - ours)
  assert d.max() < 3.0 and d.mean() < 0.3, (d.max(), d.mean())
  assert (theirs.argmax(-1) == ours.argmax(-1)).mean() >= 0.9
  lo, lt = _log_softmax(ours), _log_softmax(theirs)
  assert (np.exp(lo) * (lo - lt)).sum(-1).mean() < 0.01

  # The same weights dequantized by llama.cpp ('F32') with an F32 KV cache: no
  # activation quantization left, so the two forwards agree to float32 rounding
  # (measured max |dlogit| 1.2e-4, mean 9e-6): the harness (windows, positions,
  # no BOS, fresh KV cache per window) is exact.
  f32 = llamacpp.quantize(smollm2_gguf_path(), tmp_path / 'f32.gguf', 'F32')
  assert set(llamacpp.tensor_types(f32).values()) == {'F32'}
  exact = llamacpp.logits(f32, windows, kv_type='F32')
  np.testing.assert_allclose(exact, ours, atol=2e-3, rtol=0)
  np.testing.assert_array_equal(exact.argmax(-1), ours.argmax(-1))


@pytest.mark.slow
def test_quantize_q3_k_s_falls_back_to_q4_0_on_576_columns_and_loads(tmp_path):
  pytest.importorskip('llama_cpp')
  dst = tmp_path / 'out' / 'q3_k_s.gguf'
  assert llamacpp.quantize(smollm2_gguf_path(), dst, 'Q3_K_S') == str(dst)
  assert os.listdir(dst.parent) == ['q3_k_s.gguf']  # no temporary left behind
  by_layer = llamacpp.linear_types_by_layer(dst)
  assert by_layer['ffn_down'] == _all('Q3_K')
  for kind in ('attn_q', 'attn_k', 'attn_v', 'attn_output', 'ffn_gate', 'ffn_up'):
    assert by_layer[kind] == _all('Q4_0'), kind
  assert llamacpp.tensor_types(dst)['token_embd.weight'] == 'Q8_0'
  assert llamacpp.linear_bits_per_weight(dst) == pytest.approx(4.234375, abs=1e-9)
  params, cfg = load_gguf(dst)
  assert cfg.num_layers == N_LAYERS
  logits = np.asarray(decoder.forward(params, cfg, _windows()[:1, :16]))
  assert logits.shape == (1, 16, 49152) and np.isfinite(logits).all()


@pytest.mark.slow
def test_llamacpp_mixes_on_smollm2(tmp_path):
  """The per-layer types of llama.cpp's mixes (the table another replication uses)."""
  pytest.importorskip('llama_cpp')
  for mix, expected in EXPECTED_MIXES.items():
    dst = llamacpp.quantize(smollm2_gguf_path(), tmp_path / f'{mix}.gguf', mix)
    assert llamacpp.linear_types_by_layer(dst) == expected, mix
    assert llamacpp.linear_bits_per_weight(dst) == pytest.approx(EXPECTED_BITS[mix], abs=1e-6)
    assert llamacpp.tensor_types(dst)['token_embd.weight'] == 'Q8_0', mix
    os.unlink(dst)


@pytest.mark.slow
@pytest.mark.parametrize('mix', ['Q3_K_S', 'Q4_K_M'])
def test_our_gguf_runs_in_llamacpp(smollm2_forward, tmp_path, mix):
  """A file written by save_gguf: llama.cpp's own dequantizers give our weights, and
  llama.cpp's forward gives our logits (within its activation quantization)."""
  pytest.importorskip('llama_cpp')
  import cafeq_jax  # pylint: disable=g-import-not-at-top
  from cafeq_jax import recipes  # pylint: disable=g-import-not-at-top
  from cafeq_jax.ggml import mixes  # pylint: disable=g-import-not-at-top
  from cafeq_jax.loading import save_gguf  # pylint: disable=g-import-not-at-top
  from cafeq_jax.models import linears  # pylint: disable=g-import-not-at-top

  forward, params = smollm2_forward
  _, cfg = load_gguf()
  recipe = recipes.get('rtn', spec=mixes.spec_map(mix, cfg))
  qparams, _ = cafeq_jax.quantize(params, cfg, recipe, jax.random.key(0))
  path = save_gguf(qparams, cfg, tmp_path / 'ours.gguf', source=smollm2_gguf_path(), mix=mix)
  assert llamacpp.linear_types_by_layer(path) == EXPECTED_MIXES[mix]
  # llama.cpp dequantizes every tensor of our file (its C to_float, 'F32' target):
  # the weights we evaluate, up to float rounding of its compiled code.
  f32 = llamacpp.quantize(path, tmp_path / 'f32.gguf', 'F32')
  back, _ = load_gguf(f32)
  ours_fp = linears.dequantize_params(qparams, cfg)
  for a, b in zip(jax.tree.leaves(ours_fp), jax.tree.leaves(back)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7)
  windows = _windows()
  ours = forward(qparams, windows)
  # llama.cpp's forward of its own F32 dequantization of our file, F32 KV cache:
  # our forward to float rounding (the bytes mean what we evaluate).
  exact = llamacpp.logits(f32, windows, kv_type='F32')
  np.testing.assert_allclose(exact, ours, atol=2e-3, rtol=0)
  # The quantized file as llama.cpp runs it (activations quantized to Q8_0 / Q8_K
  # in its matmuls, F16 KV cache). Measured on these 2 x 64 tokens: Q4_K_M max
  # |dlogit| < 3, mean KL 0.004-0.01, top-1 >= 0.9, as for the source file above.
  # Q3_K_S: one position (window 2, token 2, just after the window start, where
  # SmolLM2 builds its attention sink) derails in llama.cpp's activation-quantized
  # path (max |dlogit| 34, KL 3.7 there; mean KL 0.041, top-1 0.875), while the F32
  # path above is exact. The same happens when llama.cpp re-quantizes our
  # dequantized weights itself, and with GPTQ-form codes (29, KL 0.045), not with
  # llama.cpp's own Q3_K_S file (2.7, KL 0.010): a sensitivity of these Q3_K
  # ffn_down values (layers 0-14) to activation quantization, not of the encoding.
  # Over 8 x 512-token windows it costs little: docs/export.md#gguf.
  theirs = llamacpp.logits(path, windows)
  lo, lt = _log_softmax(ours), _log_softmax(theirs)
  kl = (np.exp(lo) * (lo - lt)).sum(-1)
  top1 = (theirs.argmax(-1) == ours.argmax(-1)).mean()
  if mix == 'Q4_K_M':
    d = np.abs(theirs - ours)
    assert d.max() < 3.0 and d.mean() < 0.3, (d.max(), d.mean())
    assert top1 >= 0.9 and kl.mean() < 0.01, (top1, kl.mean())
  else:
    assert top1 >= 0.85 and kl.mean() < 0.06, (top1, kl.mean())
    # Every other position as for llama.cpp's own file (measured median KL 0.0102;
    # llama.cpp's own Q3_K_S file: mean 0.010).
    assert np.median(kl) < 0.02, np.median(kl)
