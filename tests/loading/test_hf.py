"""Our decoder vs transformers (PyTorch, CPU, float32) on the same tiny random weights."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cafeq_jax import quantizer
from cafeq_jax.loading import hf
from cafeq_jax.models import decoder
from cafeq_jax.models import linears
from cafeq_jax.models import qlinear

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

# float32 on both sides; observed max |diff| 4.5e-6 (Gemma 2, logits up to ~10) and
# 4e-7 (Llama, logits up to ~1.2).
ATOL = 1e-4
SEQ_LEN = 16  # > 3x the Gemma 2 sliding window (4), so local layers differ from global


def _randomize(model: 'torch.nn.Module', seed: int) -> None:
  """Every parameter random (norm weights too, so (1 + w) vs w matters)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      std = 0.3 if 'norm' in name else (0.4 if 'embed' in name else 0.15)
      p.copy_(torch.randn(p.shape, generator=g) * std)


def tiny_gemma2(seed: int = 0):
  config = transformers.Gemma2Config(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    query_pre_attn_scalar=24,
    sliding_window=4,
    attn_logit_softcapping=5.0,
    final_logit_softcapping=10.0,
    rope_theta=10_000.0,
    max_position_embeddings=64,
    attn_implementation='eager',
  )
  torch.manual_seed(seed)
  model = transformers.Gemma2ForCausalLM(config).eval()
  _randomize(model, seed)
  return model


def tiny_llama(seed: int = 0, tie: bool = False):
  config = transformers.LlamaConfig(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rope_theta=50_000.0,
    rms_norm_eps=1e-5,
    max_position_embeddings=64,
    tie_word_embeddings=tie,
  )
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(config).eval()
  _randomize(model, seed)
  return model


def _ours(model):
  cfg = hf.config_from_hf(model.config.to_dict())
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  return hf.params_from_hf(sd, cfg), cfg


def _hf_logits(model, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(tokens).long()).logits.numpy()


def _tokens(batch: int, length: int, vocab: int, seed: int = 1) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, vocab, (batch, length))


def test_config_from_hf_gemma2_reads_window_softcaps_and_pattern():
  cfg = hf.config_from_hf(tiny_gemma2().config.to_dict())
  assert cfg.family == 'gemma2'
  assert cfg.attention_types == ('local', 'global', 'local')
  assert (cfg.sliding_window_size, cfg.attn_logits_softcap, cfg.final_logit_softcap) == (
    4,
    5.0,
    10.0,
  )
  assert cfg.query_pre_attn_scalar == 24 and cfg.norm_scale_plus_one and cfg.use_post_norms


def test_gemma2_logits_match_transformers_beyond_sliding_window():
  model = tiny_gemma2()
  params, cfg = _ours(model)
  tokens = _tokens(2, SEQ_LEN, cfg.vocab_size)
  ref = _hf_logits(model, tokens)
  ours = np.asarray(decoder.forward(params, cfg, jnp.asarray(tokens)))
  np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)
  # The window matters: treating local layers as global changes the late logits.
  glob = np.asarray(
    decoder.forward(params, cfg.replace(attention_pattern=('global',)), jnp.asarray(tokens))
  )
  assert np.abs(glob[:, 8:] - ref[:, 8:]).max() > 100 * ATOL
  # So does the attention-logit soft-cap.
  uncapped = np.asarray(
    decoder.forward(params, cfg.replace(attn_logits_softcap=None), jnp.asarray(tokens))
  )
  assert np.abs(uncapped - ref).max() > 100 * ATOL


@pytest.mark.parametrize('tie', [False, True])
def test_llama_gqa_logits_match_transformers(tie):
  model = tiny_llama(tie=tie)
  params, cfg = _ours(model)
  assert cfg.tie_embeddings == tie and ('unembed' in params) == (not tie)
  tokens = _tokens(2, 12, cfg.vocab_size)
  np.testing.assert_allclose(
    np.asarray(decoder.forward(params, cfg, jnp.asarray(tokens))),
    _hf_logits(model, tokens),
    atol=ATOL,
    rtol=0,
  )


def test_params_to_hf_inverts_params_from_hf():
  model = tiny_gemma2()
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  cfg = hf.config_from_hf(model.config.to_dict())
  back = hf.params_to_hf(hf.params_from_hf(sd, cfg), cfg)
  assert set(back) == set(sd) - {'lm_head.weight'}
  for k, v in back.items():
    np.testing.assert_array_equal(v, sd[k], err_msg=k)


@pytest.mark.parametrize('family', ['gemma2', 'llama', 'llama_tied'])
def test_save_hf_loads_in_transformers_with_same_logits(tmp_path, family):
  model = tiny_gemma2() if family == 'gemma2' else tiny_llama(tie=family == 'llama_tied')
  params, cfg = _ours(model)
  out = hf.save_hf(params, cfg, tmp_path / 'export')
  # save_hf's record of what it wrote (sha256s) sits beside the two HF files.
  assert sorted(os.listdir(out)) == [hf.EXPORT_MARKER, 'config.json', 'model.safetensors']
  assert os.listdir(tmp_path) == ['export']  # no temporary left behind
  loaded = transformers.AutoModelForCausalLM.from_pretrained(
    out, attn_implementation='eager', dtype=torch.float32
  ).eval()
  tokens = _tokens(1, SEQ_LEN, cfg.vocab_size, seed=3)
  np.testing.assert_allclose(
    _hf_logits(loaded, tokens), _hf_logits(model, tokens), atol=ATOL, rtol=0
  )
  # And our own loader reads it back exactly.
  params2, cfg2 = hf.load_hf(out)
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, params2, jax.tree.map(np.asarray, params))


def test_save_hf_exports_quantized_params_as_effective_weights(tmp_path):
  model = tiny_llama()
  params, cfg = _ours(model)
  spec = quantizer.QuantSpec(bits=4, group_size=32)
  rng = np.random.default_rng(0)
  k = 16
  qparams = dict(params)
  layer = dict(params['layer_0'])
  w = linears.leaf_to_matrix('gating_einsum', jnp.asarray(layer['mlp']['gating_einsum']), cfg)
  minv = jnp.asarray(np.eye(k) + 0.1 * rng.standard_normal((cfg.embed_dim // k, k, k)), jnp.float32)
  ql = qlinear.QuantizedLinear(
    weight=quantizer.quantize(w, spec),
    transform_inv=minv,
    shape=tuple(layer['mlp']['gating_einsum'].shape),
  )
  layer['mlp'] = {**layer['mlp'], 'gating_einsum': ql}
  qparams['layer_0'] = layer
  out = hf.save_hf(qparams, cfg, tmp_path / 'q')
  loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  tokens = _tokens(1, 10, cfg.vocab_size, seed=4)
  ours_q = np.asarray(decoder.forward(qparams, cfg, jnp.asarray(tokens)))
  np.testing.assert_allclose(_hf_logits(loaded, tokens), ours_q, atol=ATOL, rtol=0)
  # Sanity: quantization did change the model.
  assert np.abs(ours_q - np.asarray(decoder.forward(params, cfg, jnp.asarray(tokens)))).max() > 1e-3


def test_params_from_hf_names_tensor_and_both_shapes_on_mismatch():
  model = tiny_llama()
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  cfg = hf.config_from_hf(model.config.to_dict())
  sd['model.layers.1.mlp.up_proj.weight'] = np.zeros((95, 64), np.float32)
  with pytest.raises(
    ValueError, match=r'model.layers.1.mlp.up_proj.weight.*\(95, 64\).*\(96, 64\)'
  ):
    hf.params_from_hf(sd, cfg)


def test_params_from_hf_reports_missing_and_unexpected_tensors():
  model = tiny_llama()
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  cfg = hf.config_from_hf(model.config.to_dict())
  with pytest.raises(ValueError, match='missing.*model.layers.1.self_attn.q_proj.weight'):
    hf.params_from_hf({k: v for k, v in sd.items() if 'layers.1.self_attn.q_proj' not in k}, cfg)
  with pytest.raises(ValueError, match='unexpected.*model.layers.1'):
    hf.params_from_hf(sd, cfg.replace(num_layers=1))


def test_load_hf_errors_name_the_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    hf.load_hf(tmp_path / 'nope')
  with pytest.raises(FileNotFoundError, match='config.json'):
    hf.load_hf(tmp_path)
  (tmp_path / 'config.json').write_text(json.dumps(tiny_llama().config.to_dict()))
  with pytest.raises(FileNotFoundError, match='model.safetensors'):
    hf.load_hf(tmp_path)


def test_config_from_hf_rejects_unsupported_models():
  with pytest.raises(ValueError, match="model_type='mistral'"):
    hf.config_from_hf({'model_type': 'mistral'})
  d = tiny_llama().config.to_dict()
  d['rope_scaling'] = {'rope_type': 'llama3', 'factor': 8.0}
  with pytest.raises(ValueError, match='RoPE scaling'):
    hf.config_from_hf(d)


def test_default_transformers_gemma2_config_is_our_gemma2_2b_preset():
  from cafeq_jax.models import config as config_lib

  ours = hf.config_from_hf(transformers.Gemma2Config().to_dict())
  assert ours == config_lib.get_config('gemma2_2b')


@pytest.mark.parametrize('preset', ['cafeq-single', 'cafeq-paper', 'cafeq-sg', 'cafeq'])
def test_every_kind_of_preset_exports_to_transformers_with_its_quantized_logits(tmp_path, preset):
  """``--config.export_hf`` of a preset carries its quality: transformers, reading the
  exported effective weights, computes our quantized forward (online transforms, pair
  transforms, adaptive and sequential rounding; cheap settings)."""
  from cafeq_jax import methods  # pylint: disable=g-import-not-at-top
  from cafeq_jax import recipes  # pylint: disable=g-import-not-at-top

  model = tiny_llama()
  params, cfg = _ours(model)
  fields = {
    'transform.block_size': 16,
    'transform.steps': 5,
    'pairs.steps': 5,
    'statistics.num_seqs': 2,
    'statistics.seq_len': 8,
  }
  recipe = recipes.override(recipes.get(preset, bits=3, group_size=32), fields, strict=False)
  qparams, _ = methods.quantize(params, cfg, recipe, jax.random.PRNGKey(0))
  out = hf.save_hf(qparams, cfg, tmp_path / preset)
  loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  tokens = _tokens(1, 10, cfg.vocab_size, seed=5)
  ours_q = np.asarray(decoder.forward(qparams, cfg, jnp.asarray(tokens)))
  np.testing.assert_allclose(_hf_logits(loaded, tokens), ours_q, atol=ATOL, rtol=0)
  assert np.abs(ours_q - np.asarray(decoder.forward(params, cfg, jnp.asarray(tokens)))).max() > 1e-3
