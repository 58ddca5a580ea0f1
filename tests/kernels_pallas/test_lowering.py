"""The compiled (non-interpret) kernels lower for GPU (Triton) and TPU (Mosaic) on CPU.

``jax.export`` with ``platforms=['cuda'|'tpu']`` runs the Pallas lowering
(jaxpr -> Triton IR / Mosaic MLIR, with their block-shape and op checks) without
the accelerator. It does not run the final device compilers (PTX / libtpu) nor
execute anything: numerical checks are the interpret-mode tests, and
``experiments/bench_kernels.py`` checks the compiled kernel on a device.
"""

from __future__ import annotations

import jax
from jax import export
import jax.numpy as jnp
import pytest

from cafeq_jax import packing
from cafeq_jax import quantizer
import kernels_pallas

_TARGETS = {'cuda': ('gpu', '__gpu$xla.gpu.triton'), 'tpu': ('tpu', 'tpu_custom_call')}


def _export(fn, platform, *args):
  _, target = _TARGETS[platform]
  exp = export.export(
    jax.jit(fn),
    platforms=[platform],
    disabled_checks=[export.DisabledSafetyCheck.custom_call(target)],
  )(*args)
  return exp.mlir_module()


@pytest.mark.parametrize('platform', ['cuda', 'tpu'])
@pytest.mark.parametrize(
  'bits,group_size,symmetric,batch',
  [(4, 128, False, 1), (3, 128, True, 5), (3, None, False, 2), (4, 64, False, 24)],
)
def test_quantized_matmul_lowers_to_a_device_kernel(platform, bits, group_size, symmetric, batch):
  k, n = 256, 320
  w = jnp.linspace(-1.0, 1.0, k * n).reshape(k, n)
  p = packing.pack(
    quantizer.quantize(
      w, quantizer.QuantSpec(bits=bits, group_size=group_size, symmetric=symmetric)
    )
  )
  x = jnp.ones((batch, k), jnp.bfloat16)
  backend, target = _TARGETS[platform]
  text = _export(
    lambda x, p: kernels_pallas.quantized_matmul(x, p, backend=backend, interpret=False),
    platform,
    x,
    p,
  )
  assert target.split('.')[-1] in text
  if platform == 'cuda':
    assert 'xla.gpu.triton' in text  # Triton, not the Mosaic GPU lowering


@pytest.mark.parametrize('platform', ['cuda', 'tpu'])
def test_blockdiag_matmul_lowers_to_a_device_kernel(platform):
  x = jnp.ones((3, 256), jnp.bfloat16)
  minv = jnp.ones((4, 64, 64), jnp.float32)
  backend, target = _TARGETS[platform]
  text = _export(
    lambda x, m: kernels_pallas.blockdiag_matmul(x, m, backend=backend, interpret=False),
    platform,
    x,
    minv,
  )
  assert target.split('.')[-1] in text
