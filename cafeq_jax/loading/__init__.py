"""Checkpoint loaders (GGUF, safetensors), tokenizers and exporters (GGUF, compressed-tensors)."""

from cafeq_jax.loading.compressed_tensors import save_compressed_tensors
from cafeq_jax.loading.gguf import load_gguf
from cafeq_jax.loading.gguf import smollm2_gguf_path
from cafeq_jax.loading.gguf_writer import save_gguf
from cafeq_jax.loading.tokenizer import Tokenizer
from cafeq_jax.loading.tokenizer import load_gguf_tokenizer

__all__ = [
  'load_gguf',
  'smollm2_gguf_path',
  'save_compressed_tensors',
  'save_gguf',
  'Tokenizer',
  'load_gguf_tokenizer',
]
