"""Gemma 2 / Llama-family decoder, presets, quantized linears and generation."""

from cafeq_jax.models.config import PRESETS
from cafeq_jax.models.config import ModelConfig
from cafeq_jax.models.config import get_config
from cafeq_jax.models.decoder import Transformer
from cafeq_jax.models.decoder import forward
from cafeq_jax.models.decoder import init_cache
from cafeq_jax.models.decoder import init_params
from cafeq_jax.models.generate import generate
from cafeq_jax.models.qlinear import QuantizedLinear

__all__ = [
  'ModelConfig',
  'PRESETS',
  'get_config',
  'Transformer',
  'forward',
  'init_cache',
  'init_params',
  'QuantizedLinear',
  'generate',
]
