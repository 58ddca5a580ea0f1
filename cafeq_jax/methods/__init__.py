"""Running quantization recipes over a model's param tree (``cafeq_jax.recipes``)."""

from cafeq_jax.methods.api import quantize
from cafeq_jax.methods.report import QuantReport
from cafeq_jax.methods.run_options import RunOptions

__all__ = ['QuantReport', 'RunOptions', 'quantize']
