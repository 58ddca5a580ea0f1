"""compressed-tensors pack-quantized export vs its peer readers (transformers + compressed-tensors, CPU).

Each export is read back by ``transformers.AutoModelForCausalLM.from_pretrained`` and
by compressed-tensors' own ``PackedQuantizationCompressor.decompress``: the weights
they dequantize equal ``quantizer.dequantize`` of our QArrays exactly (float32
scales), and the logits equal our quantized forward up to float32 matmul rounding.

transformers 5.24 + compressed-tensors 0.20 load symmetric exports either way, but
asymmetric ones only with ``CompressedTensorsConfig(dequantize=True)``: the default
path builds ``weight_zero_point`` unpacked on the meta device and then refuses the
packed checkpoint tensor (see ``test_asymmetric_default_load_is_refused_upstream``).
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cafeq_jax
from cafeq_jax import atomic
from cafeq_jax import quantizer
from cafeq_jax import recipes
from cafeq_jax.loading import compressed_tensors as ct
from cafeq_jax.loading import hf
from cafeq_jax.models import PRESETS
from cafeq_jax.models import config as config_lib
from cafeq_jax.models import decoder
from cafeq_jax.models import init_params
from cafeq_jax.models import linears
from cafeq_jax.models import qlinear

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
ct_lib = pytest.importorskip('compressed_tensors')
from compressed_tensors.compressors import BaseCompressor  # noqa: E402
from compressed_tensors.compressors.pack_quantized import helpers as ct_helpers  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig  # noqa: E402
from compressed_tensors.utils.match import match_name  # noqa: E402

# Passing CompressedTensorsConfig(dequantize=True) over the checkpoint's own config warns.
pytestmark = pytest.mark.filterwarnings('ignore:You passed `quantization_config`:UserWarning')

# float32 on both sides, weights equal bit for bit: only matmul order differs.
# Observed max |diff| 3e-7 on logits up to ~0.9.
ATOL = 1e-5
# Every d_in (128, 256) divisible by 32, 64 and 128: one group size throughout.
CFG = config_lib.llama_config(
  vocab_size=128,
  num_layers=2,
  embed_dim=128,
  hidden_dim=256,
  num_heads=4,
  num_kv_heads=2,
  head_dim=32,
  rope_base=10_000.0,
  norm_eps=1e-5,
  tie_embeddings=False,
  max_seq_len=64,
)
# d_in = 64 for six matrices and 256 for down: g128 with group_fallback gives g64 and
# g128 (two groups per down_proj row), like SmolLM2 (576 / 1536).
FALLBACK_CFG = PRESETS['tiny_llama'].replace(hidden_dim=256)
TOKENS = np.random.default_rng(1).integers(0, 128, (2, 12))


@pytest.fixture(scope='module')
def params():
  return init_params(CFG, jax.random.PRNGKey(0))


@pytest.fixture(scope='module')
def fallback_params():
  return init_params(FALLBACK_CFG, jax.random.PRNGKey(2))


def _quantize(params, cfg, preset='rtn', **kw):
  kw.setdefault('bits', 4)
  qparams, _ = cafeq_jax.quantize(params, cfg, recipes.get(preset, **kw), jax.random.key(0))
  return qparams


def _load(out, *, dequantize: bool):
  kw = {}
  if dequantize:
    kw['quantization_config'] = transformers.CompressedTensorsConfig(dequantize=True)
  return transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, **kw).eval()


def _logits(model) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(TOKENS)).logits.numpy()


def _ours(qparams, cfg) -> np.ndarray:
  return np.asarray(decoder.forward(qparams, cfg, jnp.asarray(TOKENS)))


def _assert_weights_equal(model, qparams, cfg):
  """Every quantized projection of the loaded (decompressed) model is our dequantize, exactly."""
  qarrays, _ = linears.quantized_matrices(qparams, cfg)
  assert qarrays
  for (l, n), q in qarrays.items():
    w = model.model.layers[l].get_submodule(ct.MODULES[n]).weight.detach().numpy()
    np.testing.assert_array_equal(w, np.asarray(quantizer.dequantize(q)).T, err_msg=f'{l} {n}')


def _scheme_for(qc: QuantizationConfig, module: str):
  for scheme in qc.config_groups.values():
    if any(t == 'Linear' or match_name(module, t) for t in scheme.targets):
      return scheme
  return None


def _decompress_all(out: str) -> dict[str, np.ndarray]:
  """compressed-tensors' own decompressor on every packed module of an export."""
  from safetensors.torch import load_file  # pylint: disable=g-import-not-at-top

  with open(os.path.join(out, 'config.json')) as f:
    qc = QuantizationConfig.model_validate(json.load(f)['quantization_config'])
  sd = load_file(os.path.join(out, 'model.safetensors'))
  modules = sorted({k.rsplit('.', 1)[0] for k in sd if k.endswith('.weight_packed')})
  out_w = {}
  for m in modules:
    scheme = _scheme_for(qc, m)
    assert scheme is not None and not any(match_name(m, i) for i in qc.ignore), m
    local = {k[len(m) + 1 :]: v for k, v in sd.items() if k.startswith(m + '.')}
    compressor = BaseCompressor.get_value_from_registry(scheme.format or qc.format)
    out_w[m] = compressor.decompress(local, scheme)['weight'].numpy()
  return out_w


def test_pack_int32_matches_compressed_tensors_packing():
  rng = np.random.default_rng(0)
  for bits in (4, 8):
    for cols in (64, 40, 7):
      u = rng.integers(0, 2**bits, (5, cols))
      ours = ct.pack_int32(u, bits)
      signed = torch.from_numpy(u - 2 ** (bits - 1)).to(torch.int8)
      theirs = ct_helpers.pack_to_int32(signed, bits).numpy()
      np.testing.assert_array_equal(ours, theirs, err_msg=f'bits={bits} cols={cols}')
      np.testing.assert_array_equal(ct.unpack_int32(ours, bits, cols), u)
      # Packed along dim 0 (the zero points' layout) is the transpose of packing rows.
      theirs0 = ct_helpers.pack_to_int32(signed.T.contiguous(), bits, packed_dim=0).numpy()
      np.testing.assert_array_equal(ours.T, theirs0)


@pytest.mark.parametrize('group_size', [32, 128, None])
@pytest.mark.parametrize('symmetric', [True, False])
def test_transformers_loads_export_with_our_weights_and_logits(
  tmp_path, params, symmetric, group_size
):
  qparams = _quantize(params, CFG, group_size=group_size, symmetric=symmetric)
  out = ct.save_compressed_tensors(qparams, CFG, tmp_path / 'export', provenance={'recipe': 'rtn'})
  assert sorted(os.listdir(out)) == [hf.EXPORT_MARKER, 'config.json', 'model.safetensors']
  assert os.listdir(tmp_path) == ['export']  # no temporary left behind
  assert hf.verify_export(out)['provenance'] == {'recipe': 'rtn'}
  with open(os.path.join(out, 'config.json')) as f:
    qc = json.load(f)['quantization_config']
  assert (qc['quant_method'], qc['format'], qc['quantization_status']) == (
    'compressed-tensors',
    'pack-quantized',
    'compressed',
  )
  (group,) = qc['config_groups'].values()
  assert group['targets'] == ['Linear'] and 'lm_head' in qc['ignore']
  assert group['weights']['group_size'] == group_size
  assert group['weights']['strategy'] == ('channel' if group_size is None else 'group')
  # Symmetric: the default path (compressed on load, decompressed on the first forward).
  model = _load(out, dequantize=not symmetric)
  ours = _ours(qparams, CFG)
  np.testing.assert_allclose(_logits(model), ours, atol=ATOL, rtol=0)
  _assert_weights_equal(model, qparams, CFG)
  # Sanity: quantization changed the model (the test would notice a dense fallback).
  assert np.abs(ours - _ours(params, CFG)).max() > 1e-3


def test_symmetric_export_loads_dequantized_too(tmp_path, params):
  qparams = _quantize(params, CFG, group_size=64, symmetric=True)
  out = ct.save_compressed_tensors(qparams, CFG, tmp_path / 'export')
  model = _load(out, dequantize=True)
  np.testing.assert_allclose(_logits(model), _ours(qparams, CFG), atol=ATOL, rtol=0)
  _assert_weights_equal(model, qparams, CFG)


def test_asymmetric_default_load_is_refused_upstream(tmp_path, params):
  """transformers 5.24 + compressed-tensors 0.20 cannot load asymmetric pack-quantized
  without ``dequantize=True`` (PackedQuantizationCompressor.compress on the meta device
  leaves ``weight_zero_point`` unpacked, (d_out, groups), and the packed checkpoint
  tensor then mismatches). Should a later version load it, it must load it right."""
  qparams = _quantize(params, CFG, group_size=32, symmetric=False)
  out = ct.save_compressed_tensors(qparams, CFG, tmp_path / 'export')
  try:
    model = _load(out, dequantize=False)
  except RuntimeError as e:
    assert 'mismatch' in str(e).lower() or 'ignore_mismatched_sizes' in str(e)
    return
  np.testing.assert_allclose(_logits(model), _ours(qparams, CFG), atol=ATOL, rtol=0)


@pytest.mark.parametrize(
  'bits,group_size,symmetric', [(8, 32, True), (8, None, False), (4, 64, False), (4, None, True)]
)
def test_compressed_tensors_decompressor_reproduces_every_matrix(
  tmp_path, params, bits, group_size, symmetric
):
  qparams = _quantize(params, CFG, bits=bits, group_size=group_size, symmetric=symmetric)
  out = ct.save_compressed_tensors(qparams, CFG, tmp_path / 'export')
  dense = _decompress_all(out)
  qarrays, _ = linears.quantized_matrices(qparams, CFG)
  assert sorted(dense) == sorted(ct.module_name(l, n) for l, n in qarrays)
  for (l, n), q in qarrays.items():
    np.testing.assert_array_equal(
      dense[ct.module_name(l, n)], np.asarray(quantizer.dequantize(q)).T, err_msg=f'{l} {n}'
    )


def test_config_is_what_compressed_tensors_serializes(tmp_path, params):
  qparams = _quantize(params, CFG, group_size=128, symmetric=False)
  out = ct.save_compressed_tensors(qparams, CFG, tmp_path / 'export')
  with open(os.path.join(out, 'config.json')) as f:
    qc = json.load(f)['quantization_config']
  theirs = QuantizationConfig.model_validate(qc).model_dump(mode='json')
  theirs.pop('moe_sparsity_config')
  assert {k: v for k, v in qc.items() if k != 'version'} == theirs


@pytest.mark.parametrize('merge', [True, False])
@pytest.mark.parametrize('symmetric', [True, False])
def test_group_fallback_model(tmp_path, fallback_params, merge, symmetric):
  """g128 with group_fallback: g64 for d_in = 64, g128 for down_proj (d_in = 256).

  Merged (the default), everything is written as g64 (scales repeated: the same
  weights) in one config group, which every load path reads. Unmerged, one config
  group per group size, with regex targets: compressed-tensors' decompressor and
  transformers' default path read it (symmetric), but its ``dequantize=True`` path
  applies the first group's scheme to every layer (not tested: it fails).
  """
  cfg = FALLBACK_CFG
  qparams = _quantize(fallback_params, cfg, group_size=128, symmetric=symmetric)
  qarrays, _ = linears.quantized_matrices(qparams, cfg)
  assert {q.spec.group_size for q in qarrays.values()} == {64, 128}
  out = ct.save_compressed_tensors(qparams, cfg, tmp_path / 'export', merge_group_sizes=merge)
  with open(os.path.join(out, 'config.json')) as f:
    groups = json.load(f)['quantization_config']['config_groups']
  sizes = sorted(g['weights']['group_size'] for g in groups.values())
  assert sizes == ([64] if merge else [64, 128])
  if not merge:
    down = next(g for g in groups.values() if g['weights']['group_size'] == 128)
    assert down['targets'] == ['re:^model\\.layers\\.\\d+\\.mlp\\.down_proj$']
  dense = _decompress_all(out)
  for (l, n), q in qarrays.items():
    np.testing.assert_array_equal(
      dense[ct.module_name(l, n)], np.asarray(quantizer.dequantize(q)).T
    )
  if merge or symmetric:
    model = _load(out, dequantize=not symmetric)
    np.testing.assert_allclose(_logits(model), _ours(qparams, cfg), atol=ATOL, rtol=0)
    _assert_weights_equal(model, qparams, cfg)


def test_dense_projections_are_written_dense_and_ignored(tmp_path, params):
  qparams = _quantize(params, CFG, group_size=32, symmetric=True, matrices=('gate', 'up', 'down'))
  out = ct.save_compressed_tensors(qparams, CFG, tmp_path / 'export')
  with open(os.path.join(out, 'config.json')) as f:
    qc = json.load(f)['quantization_config']
  assert 'model.layers.1.self_attn.q_proj' in qc['ignore']
  (group,) = qc['config_groups'].values()
  assert all(t.startswith('re:') and 'mlp' in t for t in group['targets'])
  model = _load(out, dequantize=False)
  np.testing.assert_allclose(_logits(model), _ours(qparams, CFG), atol=ATOL, rtol=0)
  _assert_weights_equal(model, qparams, CFG)


def test_tied_gemma2_exports(tmp_path):
  cfg = PRESETS['tiny_gemma2']
  qparams = _quantize(init_params(cfg, jax.random.PRNGKey(3)), cfg, group_size=32, symmetric=True)
  out = ct.save_compressed_tensors(qparams, cfg, tmp_path / 'export')
  model = transformers.AutoModelForCausalLM.from_pretrained(
    out, dtype=torch.float32, attn_implementation='eager'
  ).eval()
  np.testing.assert_allclose(_logits(model), _ours(qparams, cfg), atol=1e-4, rtol=0)
  _assert_weights_equal(model, qparams, cfg)


# ---------------------------------------------------------------------------------
# Refusals: each raises before anything is written.


def _assert_nothing_written(tmp_path, before=()):
  assert sorted(os.listdir(tmp_path)) == sorted(before)


def test_online_transform_is_refused_naming_the_matrix(tmp_path, params):
  qparams = _quantize(params, CFG, 'hadamard', group_size=32)
  with pytest.raises(
    ValueError,
    match=r"online transform x M\^-1 on layer 0 'q' .*cannot hold it.*'rtn', 'gptq-selfgen', "
    r"'cafeq-pairs'",
  ):
    ct.save_compressed_tensors(qparams, CFG, tmp_path / 'export')
  _assert_nothing_written(tmp_path)


def test_identity_transform_blocks_are_accepted(tmp_path, params):
  qparams = _quantize(params, CFG, group_size=32, symmetric=True)
  leaf = qparams['layer_0']['mlp']['linear']
  eye = jnp.broadcast_to(jnp.eye(16), (CFG.hidden_dim // 16, 16, 16))
  layer = {**qparams['layer_0'], 'mlp': {**qparams['layer_0']['mlp']}}
  layer['mlp']['linear'] = leaf.replace(transform_inv=eye)
  out = ct.save_compressed_tensors({**qparams, 'layer_0': layer}, CFG, tmp_path / 'export')
  np.testing.assert_allclose(
    _logits(_load(out, dequantize=False)), _ours(qparams, CFG), atol=ATOL, rtol=0
  )


@pytest.mark.parametrize(
  'kw,match',
  [
    (dict(bits=3, group_size=32), r"layer 0 'q' .*bits=3 cannot be exported.*\(4, 8\)"),
    (dict(bits=2, group_size=None), r'bits=2 cannot be exported'),
    (dict(bits=4, group_size=256), r"layer 0 'down' .*group_size=256 cannot be exported"),
  ],
)
def test_unsupported_specs_are_refused(tmp_path, params, kw, match):
  qparams = _quantize(params, CFG, **kw)
  with pytest.raises(ValueError, match=match):
    ct.save_compressed_tensors(qparams, CFG, tmp_path / 'export')
  _assert_nothing_written(tmp_path)


def test_a_spec_with_extra_fields_is_refused(tmp_path, params):
  @dataclasses.dataclass(frozen=True, kw_only=True)
  class BlockSpec(quantizer.QuantSpec):
    block_format: str = 'Q4_0'

  qparams = _quantize(params, CFG, group_size=32, symmetric=True)
  leaf = qparams['layer_1']['attn']['attn_vec_einsum']['w']
  w = leaf.weight
  odd = quantizer.QArray(
    codes=w.codes,
    scale=w.scale,
    zero=w.zero,
    spec=BlockSpec(bits=4, group_size=32, symmetric=True),
  )
  layer = qparams['layer_1']
  attn = {**layer['attn'], 'attn_vec_einsum': {'w': leaf.replace(weight=odd)}}
  bad = {**qparams, 'layer_1': {**layer, 'attn': attn}}
  with pytest.raises(ValueError, match=r"layer 1 'o' .*not a plain uniform integer spec"):
    ct.save_compressed_tensors(bad, CFG, tmp_path / 'export')
  _assert_nothing_written(tmp_path)


def test_out_of_range_codes_are_refused(tmp_path, params):
  qparams = _quantize(params, CFG, group_size=32, symmetric=False)
  leaf = qparams['layer_0']['mlp']['linear']
  codes = leaf.weight.codes.at[0, 0].set(16)
  layer = {**qparams['layer_0'], 'mlp': {**qparams['layer_0']['mlp']}}
  layer['mlp']['linear'] = leaf.replace(weight=leaf.weight.replace(codes=codes))
  with pytest.raises(ValueError, match=r"layer 0 'down' .*codes span \[0, 16\], outside \[0, 15\]"):
    ct.save_compressed_tensors({**qparams, 'layer_0': layer}, CFG, tmp_path / 'export')
  _assert_nothing_written(tmp_path)


def test_q_without_k_v_is_refused_for_vllm_fusion(tmp_path, params):
  qparams = _quantize(params, CFG, group_size=32, matrices=('q',))
  with pytest.raises(ValueError, match=r"layer 0: \('q', 'k', 'v'\) .*q: w4g32asym, k: dense"):
    ct.save_compressed_tensors(qparams, CFG, tmp_path / 'export')
  _assert_nothing_written(tmp_path)


def test_unwritable_path_is_refused_and_leaves_nothing(tmp_path, params):
  qparams = _quantize(params, CFG, group_size=32, symmetric=True)
  (tmp_path / 'file').write_text('a file')
  with pytest.raises(OSError, match=r'cannot write the export .*file/export'):
    ct.save_compressed_tensors(qparams, CFG, tmp_path / 'file' / 'export')
  assert (tmp_path / 'file').read_text() == 'a file'
  _assert_nothing_written(tmp_path, ['file'])


def test_foreign_directory_and_regular_file_are_refused(tmp_path, params):
  qparams = _quantize(params, CFG, group_size=32, symmetric=True)
  out = tmp_path / 'export'
  out.mkdir()
  (out / 'notes.txt').write_text('keep me')
  with pytest.raises(
    FileExistsError, match=r'not empty .*notes.txt.*not written by save_compressed_tensors'
  ):
    ct.save_compressed_tensors(qparams, CFG, out)
  assert os.listdir(out) == ['notes.txt'] and (out / 'notes.txt').read_text() == 'keep me'
  (tmp_path / 'file').write_text('a file')
  with pytest.raises(FileExistsError, match='not a directory'):
    ct.save_compressed_tensors(qparams, CFG, tmp_path / 'file')
  assert (tmp_path / 'file').read_text() == 'a file'
  _assert_nothing_written(tmp_path, ['export', 'file'])


def test_reexport_keeps_added_files_and_interrupt_keeps_the_old_one(tmp_path, params, monkeypatch):
  out = tmp_path / 'export'
  q1 = _quantize(params, CFG, group_size=32, symmetric=True)
  ct.save_compressed_tensors(q1, CFG, out, provenance={'run': 1})
  (out / 'tokenizer.json').write_text('{"added": "later"}')
  q2 = _quantize(params, CFG, group_size=64, symmetric=True)
  ct.save_compressed_tensors(q2, CFG, out, provenance={'run': 2})
  assert (out / 'tokenizer.json').read_text() == '{"added": "later"}'
  assert hf.verify_export(out)['provenance'] == {'run': 2}

  def interrupt(*args):
    raise KeyboardInterrupt

  monkeypatch.setattr(atomic, 'replace_dir', interrupt)
  with pytest.raises(KeyboardInterrupt):
    ct.save_compressed_tensors(q1, CFG, out, provenance={'run': 3})
  monkeypatch.undo()
  assert hf.verify_export(out)['provenance'] == {'run': 2}
  assert sorted(os.listdir(tmp_path)) == ['export']
  np.testing.assert_allclose(
    _logits(_load(out, dequantize=False)), _ours(q2, CFG), atol=ATOL, rtol=0
  )


def test_quantized_unembed_is_written_as_its_effective_weight(tmp_path, params):
  qparams = _quantize(params, CFG, group_size=32, symmetric=True)
  w = jnp.asarray(params['unembed']['w'])
  spec = quantizer.QuantSpec(bits=4, group_size=32, symmetric=True)
  qparams = {
    **qparams,
    'unembed': {'w': qlinear.QuantizedLinear(quantizer.quantize(w, spec), None, tuple(w.shape))},
  }
  out = ct.save_compressed_tensors(qparams, CFG, tmp_path / 'export')
  np.testing.assert_allclose(
    _logits(_load(out, dequantize=False)), _ours(qparams, CFG), atol=ATOL, rtol=0
  )


@pytest.mark.slow
def test_smollm2_logits_match_transformers(tmp_path):
  from cafeq_jax import loading  # pylint: disable=g-import-not-at-top

  params, cfg = loading.load_gguf()
  tok = loading.load_gguf_tokenizer()
  ids = tok.encode('The quick brown fox jumps over the lazy dog. Quantization keeps')
  tokens = np.asarray([ids[:32]])
  # g128 with group_fallback: g64 (d_in = 576) and g128 (down_proj, 1536), merged to g64.
  qparams = _quantize(params, cfg, group_size=128, symmetric=False)
  out = ct.save_compressed_tensors(qparams, cfg, tmp_path / 'smollm2')
  model = _load(out, dequantize=True)
  with torch.no_grad():
    theirs = model(torch.from_numpy(tokens)).logits.numpy()
  ours = np.asarray(decoder.forward(qparams, cfg, jnp.asarray(tokens)))
  # 30 float32 layers, logits up to ~30, the same weights bit for bit: matmul order
  # alone moves them (observed max |diff| 1.1e-4).
  np.testing.assert_allclose(theirs, ours, atol=1e-3, rtol=0)
  assert (theirs.argmax(-1) == ours.argmax(-1)).mean() > 0.95
