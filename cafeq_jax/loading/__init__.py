"""Checkpoint loaders (GGUF, safetensors) and tokenizers."""

from cafeq_jax.loading.gguf import load_gguf
from cafeq_jax.loading.gguf import smollm2_gguf_path
from cafeq_jax.loading.tokenizer import Tokenizer
from cafeq_jax.loading.tokenizer import load_gguf_tokenizer

__all__ = ['load_gguf', 'smollm2_gguf_path', 'Tokenizer', 'load_gguf_tokenizer']
