"""cafeq-jax: calibration-free post-training weight quantization in JAX/Flax.

Public surface (see README.md):

* quantizer: ``QuantSpec``, ``QArray``, ``quantize_array`` (RTN), ``dequantize``,
  ``fake_quant`` (straight-through).
* packing: ``PackedArray``, ``pack``, ``unpack`` (planar int4 / int3 layouts).
* methods: ``QuantConfig``, ``Method``, ``quantize`` (RTN, Hadamard, CafeQ, GPTQ).
* models: ``ModelConfig``, ``PRESETS``, ``Transformer``, ``QuantizedLinear``.
"""

from cafeq_jax.methods import Method, QuantConfig, QuantReport, quantize
from cafeq_jax.models import PRESETS, ModelConfig, QuantizedLinear, Transformer
from cafeq_jax.packing import PackedArray, pack, unpack
from cafeq_jax.quantizer import QArray, QuantSpec, dequantize, fake_quant
from cafeq_jax.quantizer import quantize as quantize_array

__version__ = '0.1.0'

__all__ = [
    'Method', 'ModelConfig', 'PRESETS', 'PackedArray', 'QArray', 'QuantConfig',
    'QuantReport', 'QuantSpec', 'QuantizedLinear', 'Transformer', 'dequantize',
    'fake_quant', 'pack', 'quantize', 'quantize_array', 'unpack',
]
