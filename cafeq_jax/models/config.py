"""Model configuration for the one decoder that serves Gemma 2 and Llama-family models.

A ``ModelConfig`` is a frozen, hashable dataclass (usable as a static argument of
``jax.jit``). ``PRESETS`` holds the public shapes of Gemma 2 2B/9B/27B, SmolLM2-135M
and two tiny test configurations; ``get_config(name)`` looks one up.
"""

from __future__ import annotations

import dataclasses

FAMILIES = ('gemma2', 'llama')
ACTIVATIONS = ('gelu_tanh', 'silu')
ATTENTION_TYPES = ('local', 'global')


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
  """Shapes and architectural switches of a decoder-only transformer.

  Attributes:
    vocab_size: number of tokens V.
    num_layers: number of transformer blocks.
    embed_dim: model width D.
    hidden_dim: MLP width F.
    num_heads: query heads H.
    num_kv_heads: key/value heads K (grouped-query attention; H % K == 0).
    head_dim: per-head width hd (even, for RoPE).
    family: 'gemma2' or 'llama' (used by loaders and exporters).
    rope_base: RoPE maximum wavelength (``rope_theta``).
    norm_eps: RMSNorm epsilon.
    activation: 'gelu_tanh' (GeGLU) or 'silu' (SwiGLU).
    norm_scale_plus_one: RMSNorm multiplies by ``1 + scale`` (Gemma) instead of
      ``scale`` (Llama).
    use_post_norms: extra RMSNorms after attention and after the MLP (Gemma 2).
    query_pre_attn_scalar: queries are multiplied by ``query_pre_attn_scalar ** -0.5``;
      ``None`` means ``head_dim``.
    attn_logits_softcap: ``c * tanh(logits / c)`` on attention logits, or None.
    final_logit_softcap: the same on the output logits, or None.
    sliding_window_size: window of 'local' layers (a query at slot i sees keys at
      slots j with ``i - window < j <= i``), or None when no layer is local.
    attention_pattern: attention types repeated cyclically over the layers, e.g.
      ``('local', 'global')`` for Gemma 2 (layer 0 local).
    tie_embeddings: the output projection is the transposed input embedding.
    scale_embeddings: embeddings are multiplied by ``sqrt(embed_dim)`` (Gemma).
    max_seq_len: longest sequence the model is meant for (default cache length).
  """

  vocab_size: int
  num_layers: int
  embed_dim: int
  hidden_dim: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  family: str = 'gemma2'
  rope_base: float = 10_000.0
  norm_eps: float = 1e-6
  activation: str = 'gelu_tanh'
  norm_scale_plus_one: bool = True
  use_post_norms: bool = True
  query_pre_attn_scalar: float | None = None
  attn_logits_softcap: float | None = None
  final_logit_softcap: float | None = None
  sliding_window_size: int | None = None
  attention_pattern: tuple[str, ...] = ('global',)
  tie_embeddings: bool = True
  scale_embeddings: bool = True
  max_seq_len: int = 8192

  def __post_init__(self):
    for name in (
      'vocab_size',
      'num_layers',
      'embed_dim',
      'hidden_dim',
      'num_heads',
      'num_kv_heads',
      'head_dim',
      'max_seq_len',
    ):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f'ModelConfig.{name}={value!r}; expected a positive int.')
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
        f'num_heads={self.num_heads} is not a multiple of num_kv_heads='
        f'{self.num_kv_heads} (grouped-query attention needs H % K == 0).'
      )
    if self.head_dim % 2:
      raise ValueError(f'head_dim={self.head_dim} must be even for RoPE.')
    if self.family not in FAMILIES:
      raise ValueError(f'family={self.family!r}; expected one of {FAMILIES}.')
    if self.activation not in ACTIVATIONS:
      raise ValueError(f'activation={self.activation!r}; expected one of {ACTIVATIONS}.')
    if not self.rope_base > 0:
      raise ValueError(f'rope_base={self.rope_base!r}; expected a positive number.')
    if not self.norm_eps > 0:
      raise ValueError(f'norm_eps={self.norm_eps!r}; expected a positive number.')
    pattern = tuple(self.attention_pattern)
    object.__setattr__(self, 'attention_pattern', pattern)
    if not pattern or any(t not in ATTENTION_TYPES for t in pattern):
      raise ValueError(
        f'attention_pattern={pattern!r}; expected a non-empty tuple of {ATTENTION_TYPES}.'
      )
    if 'local' in self.attention_types:
      if not isinstance(self.sliding_window_size, int) or self.sliding_window_size <= 0:
        raise ValueError(
          f'sliding_window_size={self.sliding_window_size!r}; local attention layers '
          f'need a positive int window.'
        )
    for name in ('query_pre_attn_scalar', 'attn_logits_softcap', 'final_logit_softcap'):
      value = getattr(self, name)
      if value is not None and not value > 0:
        raise ValueError(f'ModelConfig.{name}={value!r}; expected None or a positive number.')

  @property
  def attention_types(self) -> tuple[str, ...]:
    """Attention type ('local'/'global') of each layer, length ``num_layers``."""
    p = self.attention_pattern
    return tuple(p[i % len(p)] for i in range(self.num_layers))

  @property
  def query_scale(self) -> float:
    """Factor applied to queries before the q.k product."""
    s = self.head_dim if self.query_pre_attn_scalar is None else self.query_pre_attn_scalar
    return float(s) ** -0.5

  @property
  def num_params(self) -> int:
    """Parameter count of the fp model."""
    d, f, v = self.embed_dim, self.hidden_dim, self.vocab_size
    attn = d * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
    norms = d * (4 if self.use_post_norms else 2)
    per_layer = attn + 3 * d * f + norms
    return v * d * (1 if self.tie_embeddings else 2) + self.num_layers * per_layer + d

  def replace(self, **kwargs) -> ModelConfig:
    return dataclasses.replace(self, **kwargs)


def _gemma2(**kw) -> ModelConfig:
  base = dict(
    vocab_size=256_000,
    family='gemma2',
    rope_base=10_000.0,
    norm_eps=1e-6,
    activation='gelu_tanh',
    norm_scale_plus_one=True,
    use_post_norms=True,
    attn_logits_softcap=50.0,
    final_logit_softcap=30.0,
    sliding_window_size=4096,
    attention_pattern=('local', 'global'),
    tie_embeddings=True,
    scale_embeddings=True,
    max_seq_len=8192,
  )
  base.update(kw)
  return ModelConfig(**base)


def llama_config(**kw) -> ModelConfig:
  """A Llama-family config: SiLU MLP, plain RMSNorm, global attention, no soft-caps.

  ``kw`` gives the sizes (and may override any field); the loaders and presets use it.
  """
  base = dict(
    family='llama',
    activation='silu',
    norm_scale_plus_one=False,
    use_post_norms=False,
    query_pre_attn_scalar=None,
    attn_logits_softcap=None,
    final_logit_softcap=None,
    sliding_window_size=None,
    attention_pattern=('global',),
    scale_embeddings=False,
  )
  base.update(kw)
  return ModelConfig(**base)


PRESETS: dict[str, ModelConfig] = {
  # Public shapes of google/gemma-2-{2b,9b,27b}.
  'gemma2_2b': _gemma2(
    num_layers=26,
    embed_dim=2304,
    hidden_dim=9216,
    num_heads=8,
    num_kv_heads=4,
    head_dim=256,
    query_pre_attn_scalar=256,
  ),
  'gemma2_9b': _gemma2(
    num_layers=42,
    embed_dim=3584,
    hidden_dim=14336,
    num_heads=16,
    num_kv_heads=8,
    head_dim=256,
    query_pre_attn_scalar=256,
  ),
  'gemma2_27b': _gemma2(
    num_layers=46,
    embed_dim=4608,
    hidden_dim=36864,
    num_heads=32,
    num_kv_heads=16,
    head_dim=128,
    query_pre_attn_scalar=4608 // 32,
  ),
  # HuggingFaceTB/SmolLM2-135M(-Instruct).
  'smollm2_135m': llama_config(
    vocab_size=49_152,
    num_layers=30,
    embed_dim=576,
    hidden_dim=1536,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    rope_base=100_000.0,
    norm_eps=1e-5,
    tie_embeddings=True,
    max_seq_len=8192,
  ),
  # Tiny test configurations (random weights).
  'tiny_gemma2': _gemma2(
    vocab_size=128,
    num_layers=3,
    embed_dim=64,
    hidden_dim=128,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    query_pre_attn_scalar=24,
    sliding_window_size=4,
    max_seq_len=64,
  ),
  'tiny_llama': llama_config(
    vocab_size=128,
    num_layers=2,
    embed_dim=64,
    hidden_dim=128,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    rope_base=10_000.0,
    norm_eps=1e-5,
    tie_embeddings=False,
    max_seq_len=64,
  ),
}


def get_config(name: str) -> ModelConfig:
  """The preset called ``name`` (see ``PRESETS``)."""
  try:
    return PRESETS[name]
  except KeyError:
    raise ValueError(f'unknown model preset {name!r}; expected one of {sorted(PRESETS)}.') from None
