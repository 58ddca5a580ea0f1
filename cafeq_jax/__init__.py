"""cafeq-jax: calibration-free post-training weight quantization in JAX/Flax.

Public surface (see README.md):

* quantizer: ``QuantSpec``, ``QArray``, ``quantize_array`` (RTN), ``dequantize``,
  ``fake_quant`` (straight-through).
* packing: ``PackedArray``, ``pack``, ``unpack`` (planar int4 / int3 layouts).
* recipes: ``Recipe`` and its stages, named presets (``recipes.get('cafeq-sg')``);
  ``quantize(params, model_config, recipe, key)`` runs one.
* models: ``ModelConfig``, ``PRESETS``, ``Transformer``, ``QuantizedLinear``.
"""

from cafeq_jax import recipes
from cafeq_jax.methods import QuantReport
from cafeq_jax.methods import RunOptions
from cafeq_jax.methods import quantize
from cafeq_jax.models import PRESETS
from cafeq_jax.models import ModelConfig
from cafeq_jax.models import QuantizedLinear
from cafeq_jax.models import Transformer
from cafeq_jax.packing import PackedArray
from cafeq_jax.packing import pack
from cafeq_jax.packing import unpack
from cafeq_jax.quantizer import QArray
from cafeq_jax.quantizer import QuantSpec
from cafeq_jax.quantizer import dequantize
from cafeq_jax.quantizer import fake_quant
from cafeq_jax.quantizer import quantize as quantize_array
from cafeq_jax.recipes import Recipe

__version__ = '0.1.0'

__all__ = [
  'ModelConfig',
  'PRESETS',
  'PackedArray',
  'QArray',
  'QuantReport',
  'QuantSpec',
  'QuantizedLinear',
  'Recipe',
  'RunOptions',
  'Transformer',
  'dequantize',
  'fake_quant',
  'pack',
  'quantize',
  'quantize_array',
  'recipes',
  'unpack',
]
