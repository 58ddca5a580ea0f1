"""Gemma 2 / Llama-family decoder, presets, quantized linears and generation."""

from cafeq_jax.models.config import ModelConfig, PRESETS, get_config
from cafeq_jax.models.decoder import Transformer, forward, init_cache, init_params
from cafeq_jax.models.generate import generate
from cafeq_jax.models.qlinear import QuantizedLinear

__all__ = [
    'ModelConfig', 'PRESETS', 'get_config', 'Transformer', 'forward', 'init_cache',
    'init_params', 'QuantizedLinear', 'generate',
]
