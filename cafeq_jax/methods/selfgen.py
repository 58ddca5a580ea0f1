"""Self-generated token sequences: the data-free source of input statistics.

The one place where a recipe's ``SelfGenerated`` stage becomes tokens; the key is
derived once, by the caller (``methods.api``: ``fold_in(key, 2)``), so every recipe
with the same stage and key sees the same sequences.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cafeq_jax import recipes
from cafeq_jax.models.config import ModelConfig
from cafeq_jax.models.generate import generate


def sample_tokens(
  params: dict,
  cfg: ModelConfig,
  stage: recipes.SelfGenerated,
  key: jax.Array,
  *,
  top_k: int | None = None,
) -> np.ndarray:
  """Sequences sampled from the model itself: ``(num_seqs, seq_len)`` int32.

  Each row is ``stage.start_id`` (or, with ``first='uniform'``, an id drawn
  uniformly from the vocabulary) followed by ``seq_len - 1`` tokens sampled at
  ``stage.temperature`` (deterministic given ``key``). For SmolLM2 ``start_id=0``
  is ``<|endoftext|>``, the document separator of its pretraining stream, so
  samples look like the start of a pretraining document. Nothing external is read.
  """
  if not stage.start_id < cfg.vocab_size:
    raise ValueError(f'start_id={stage.start_id}; expected an id in [0, {cfg.vocab_size}).')
  if stage.first == recipes.FirstToken.UNIFORM:
    key, sub = jax.random.split(key)
    prompt = jax.random.randint(sub, (stage.num_seqs, 1), 0, cfg.vocab_size, jnp.int32)
  else:
    prompt = jnp.full((stage.num_seqs, 1), stage.start_id, jnp.int32)
  gen = generate(
    params,
    cfg,
    prompt,
    max_new_tokens=stage.seq_len - 1,
    temperature=float(stage.temperature),
    top_k=top_k,
    key=key,
  )
  return np.concatenate([np.asarray(prompt), np.asarray(gen)], axis=1).astype(np.int32)
