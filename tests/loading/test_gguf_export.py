"""GGUF export: our GGML-type codes read back by the `gguf` package and transformers.

References: ``gguf.quants.dequantize`` (the numpy port of llama.cpp's
dequantizers) for every block type, and transformers' GGUF loader (it builds a
PyTorch Llama from the file) for the whole model's logits.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cafeq_jax
from cafeq_jax import ggml
from cafeq_jax import quantizer
from cafeq_jax import recipes
from cafeq_jax.core import rounding
from cafeq_jax.ggml import blocks
from cafeq_jax.ggml import mixes
from cafeq_jax.loading import gguf as gguf_lib
from cafeq_jax.loading import gguf_writer
from cafeq_jax.models import config as config_lib
from cafeq_jax.models import decoder
from cafeq_jax.models import init_params
from cafeq_jax.models import linears

gguf = pytest.importorskip('gguf')
ALL_TYPES = list(ggml.GGMLType)


def _weights(d_in=512, d_out=24, seed=0):
  w = jax.random.normal(jax.random.key(seed), (d_in, d_out)) * jnp.linspace(1e-3, 0.3, d_out)
  w = w.at[:, 3].set(0.0)  # an all-zero column: zero scales
  return w.at[7, 5].set(2.0)  # an outlier


@pytest.mark.parametrize('t', ALL_TYPES)
@pytest.mark.parametrize('clip', [False, True])
def test_blocks_dequantize_exactly_in_gguf(t, clip):
  spec = ggml.spec(t, clip_search=clip)
  q = quantizer.quantize(_weights(), spec)
  data, got_t = blocks.to_blocks(q)
  assert got_t == t and data.shape == (
    24,
    512 // ggml.INFO[t].block_size * ggml.INFO[t].block_bytes,
  )
  theirs = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[t.value])
  np.testing.assert_array_equal(theirs, np.asarray(quantizer.dequantize(q)).T)


@pytest.mark.parametrize('t', ALL_TYPES)
def test_rtn_is_nearest_on_the_grid(t):
  """Unclipped weights are within half a step of their dequantized value."""
  spec = ggml.spec(t)
  w = _weights()
  q = quantizer.quantize(w, spec)
  g = spec.group_size
  s = np.repeat(np.abs(np.asarray(q.scale)), g, axis=0)
  err = np.abs(np.asarray(quantizer.dequantize(q)) - np.asarray(w))
  inside = (np.asarray(q.codes) > spec.qmin) & (np.asarray(q.codes) < spec.qmax)
  assert np.all(err[inside] <= 0.5 * s[inside] * (1 + 1e-5) + 1e-7)


@pytest.mark.parametrize('t', ['Q4_K', 'Q3_K', 'Q6_K', 'Q2_K', 'Q4_0', 'Q5_1'])
def test_gptq_rounds_into_the_type(t):
  """GPTQ-form rounding with the type's grid: representable, and beats RTN on its loss."""
  spec = ggml.spec(t)
  w = _weights(seed=1)
  x = jax.random.normal(jax.random.key(2), (1024, 512))
  x = x @ (jnp.eye(512) + 0.02 * jax.random.normal(jax.random.key(3), (512, 512)))
  h = x.T @ x
  q = rounding.gptq_round(w, h, spec)
  blocks.to_blocks(q)  # raises unless exactly on the grid
  loss = lambda qq: float(jnp.sum((x @ (w - quantizer.dequantize(qq))) ** 2))
  assert loss(q) < 0.95 * loss(quantizer.quantize(w, spec))
  eye = rounding.gptq_round(w, jnp.eye(512), spec)  # no error feedback: RTN itself
  np.testing.assert_array_equal(eye.codes, quantizer.quantize(w, spec).codes)


def test_off_grid_scales_are_refused():
  q = quantizer.quantize(_weights(), ggml.spec('Q4_K'))
  bad = q.replace(scale=q.scale.at[0, 0].multiply(1.001))
  with pytest.raises(ValueError, match='not an f16 times integers'):
    blocks.to_blocks(bad)
  with pytest.raises(ValueError, match='not a GGML type'):
    blocks.to_blocks(quantizer.quantize(_weights(), quantizer.QuantSpec(bits=4, group_size=32)))


def test_spec_validation():
  with pytest.raises(ValueError, match=r"cafeq_jax.ggml.spec\('Q4_K'\)"):
    quantizer.QuantSpec(bits=4, group_size=128, ggml_type='Q4_K')
  with pytest.raises(ValueError, match='not supported'):
    ggml.spec('Q7_K')
  with pytest.raises(ValueError, match='Q5_0'):  # 576 rows: llama.cpp's fallback named
    quantizer.quantize(jnp.ones((576, 8)), ggml.spec('Q4_K'))
  with pytest.raises(ValueError, match='unknown'):
    mixes.tensor_types('Q3_K_XL', TINY)


TINY = config_lib.llama_config(
  vocab_size=96,
  num_layers=3,
  embed_dim=256,  # multiples of 256, as Gemma 2's widths: the K-types themselves
  hidden_dim=512,
  num_heads=4,
  num_kv_heads=2,
  head_dim=64,
  rope_base=10_000.0,
  norm_eps=1e-5,
  tie_embeddings=False,
  max_seq_len=64,
)


@pytest.fixture(scope='module')
def tiny_params():
  return init_params(TINY, jax.random.key(0))


def _quantize(params, cfg, preset, mix):
  small = {'statistics.num_seqs': 4, 'statistics.seq_len': 32} if preset == 'gptq-selfgen' else {}
  recipe = recipes.override(recipes.get(preset, spec=mixes.spec_map(mix, cfg)), small)
  return cafeq_jax.quantize(params, cfg, recipe, jax.random.key(0))[0]


@pytest.mark.parametrize(
  'preset,mix', [('rtn', 'Q4_K_M'), ('rtn', 'Q2_K'), ('gptq-selfgen', 'Q3_K_M'), ('rtn', 'Q5_K_M')]
)
def test_file_reads_back_exactly(tmp_path, tiny_params, preset, mix):
  qp = _quantize(tiny_params, TINY, preset, mix)
  path = gguf_writer.save_gguf(qp, TINY, tmp_path / 'm.gguf', mix=mix)
  reader = gguf_lib.open_gguf(path)
  types = {t.name: t.tensor_type.name for t in reader.tensors}
  for (l, n), t in mixes.tensor_types(mix, TINY).items():
    assert types[f'blk.{l}.{mixes.GGUF_NAMES[n]}.weight'] == t.value
  # Every tensor, dequantized by gguf and un-permuted by our loader, is our weight.
  back, cfg = gguf_lib.load_gguf(path)
  # GGUF stores the norm epsilon as float32.
  assert cfg.replace(norm_eps=TINY.norm_eps) == TINY and cfg.norm_eps == pytest.approx(1e-5)
  ours = linears.dequantize_params(qp, TINY)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(back)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_transformers_gguf_logits_match(tmp_path, tiny_params):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  pytest.importorskip('accelerate')  # transformers needs it for GGUF files
  qp = _quantize(tiny_params, TINY, 'rtn', 'Q3_K_M')
  gguf_writer.save_gguf(qp, TINY, tmp_path / 'm.gguf', mix='Q3_K_M')
  model = transformers.AutoModelForCausalLM.from_pretrained(
    str(tmp_path), gguf_file='m.gguf', dtype=torch.float32
  ).eval()
  tokens = (np.arange(48).reshape(3, 16) * 7) % TINY.vocab_size
  with torch.no_grad():
    theirs = model(torch.from_numpy(tokens).long()).logits.numpy()
  ours = np.asarray(decoder.forward(qp, TINY, jnp.asarray(tokens)))
  # float32 on both sides (observed 6e-7 with logits up to ~1).
  np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)


def test_refusals_leave_no_file(tmp_path, tiny_params):
  path = tmp_path / 'out.gguf'
  with pytest.raises(ValueError, match='Hadamard'):
    gguf_writer.check_recipe(recipes.get('cafeq-sg', spec=ggml.spec('Q4_K')))
  with pytest.raises(ValueError, match='not a llama.cpp block type'):
    gguf_writer.check_recipe(recipes.get('rtn', bits=4, group_size=32))
  with pytest.raises(ValueError, match='online transform'):
    recipes.get('hadamard', spec=mixes.spec_map('Q4_K_M', TINY))
  # A quantized tree with an online transform, and one with uniform codes.
  had = cafeq_jax.quantize(
    tiny_params, TINY, recipes.get('hadamard', spec=ggml.spec('Q4_K')), jax.random.key(0)
  )[0]
  with pytest.raises(ValueError, match='online transform x M\\^-1'):
    gguf_writer.save_gguf(had, TINY, path)
  uni = cafeq_jax.quantize(
    tiny_params, TINY, recipes.get('rtn', bits=4, group_size=32), jax.random.key(0)
  )[0]
  with pytest.raises(ValueError, match="layer 0 'q'.*w4g32asym"):
    gguf_writer.save_gguf(uni, TINY, path)
  with pytest.raises(ValueError, match='not quantized'):
    gguf_writer.save_gguf(tiny_params, TINY, path)
  qp = _quantize(tiny_params, TINY, 'rtn', 'Q4_K_S')
  with pytest.raises(ValueError, match='another model'):
    gguf_writer.save_gguf(qp, TINY, path, source=gguf_lib.smollm2_gguf_path())
  ro = tmp_path / 'ro'
  ro.mkdir()
  os.chmod(ro, 0o555)
  try:
    if not os.access(ro, os.W_OK):  # root ignores the mode
      with pytest.raises(PermissionError, match='not writable'):
        gguf_writer.save_gguf(qp, TINY, ro / 'x.gguf')
  finally:
    os.chmod(ro, 0o755)
  assert sorted(os.listdir(tmp_path)) == ['ro']


def test_interrupted_write_keeps_the_old_file(tmp_path, tiny_params, monkeypatch):
  qp = _quantize(tiny_params, TINY, 'rtn', 'Q4_0')
  path = gguf_writer.save_gguf(qp, TINY, tmp_path / 'm.gguf', mix='Q4_0')
  before = open(path, 'rb').read()

  def boom(self):
    raise KeyboardInterrupt

  monkeypatch.setattr(gguf.GGUFWriter, 'write_tensors_to_file', lambda self, **k: boom(self))
  qp2 = _quantize(tiny_params, TINY, 'rtn', 'Q8_0')
  with pytest.raises(KeyboardInterrupt):
    gguf_writer.save_gguf(qp2, TINY, path, mix='Q8_0')
  assert open(path, 'rb').read() == before
  assert os.listdir(tmp_path) == ['m.gguf']


@pytest.mark.slow
def test_smollm2_file_roundtrip_and_transformers(tmp_path):
  """SmolLM2 in the Q3_K_S mix: read back exactly; transformers' logits match ours."""
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  pytest.importorskip('accelerate')
  params, cfg = gguf_lib.load_gguf()
  qp = _quantize(params, cfg, 'rtn', 'Q3_K_S')
  src = gguf_lib.smollm2_gguf_path()
  gguf_writer.save_gguf(qp, cfg, tmp_path / 'm.gguf', source=src, mix='Q3_K_S')
  back, _ = gguf_lib.load_gguf(tmp_path / 'm.gguf')
  ours_fp = linears.dequantize_params(qp, cfg)
  for a, b in zip(jax.tree.leaves(ours_fp), jax.tree.leaves(back)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  reader = gguf_lib.open_gguf(tmp_path / 'm.gguf')
  src_reader = gguf_lib.open_gguf(src)
  assert reader.fields['tokenizer.ggml.tokens'].contents() == (
    src_reader.fields['tokenizer.ggml.tokens'].contents()
  )
  model = transformers.AutoModelForCausalLM.from_pretrained(
    str(tmp_path), gguf_file='m.gguf', dtype=torch.float32
  ).eval()
  tokens = (np.arange(64).reshape(1, 64) * 37) % cfg.vocab_size
  with torch.no_grad():
    theirs = model(torch.from_numpy(tokens).long()).logits.numpy()
  ours = np.asarray(decoder.forward(qp, cfg, jnp.asarray(tokens)))
  np.testing.assert_allclose(theirs, ours, atol=2e-3, rtol=0)
