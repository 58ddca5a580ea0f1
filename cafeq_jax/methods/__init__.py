"""Quantization methods over a model's param tree: RTN, Hadamard, CafeQ, GPTQ."""

from cafeq_jax.methods.api import available_methods, quantize, register
from cafeq_jax.methods.config import MATRICES, Method, QuantConfig
from cafeq_jax.methods.report import QuantReport
from cafeq_jax.methods.run_options import RunOptions

__all__ = [
    'MATRICES', 'Method', 'QuantConfig', 'QuantReport', 'RunOptions', 'available_methods',
    'quantize', 'register',
]
