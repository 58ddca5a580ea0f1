"""The value/output products of each recipe: pair adaptive rounding against the rest.

Pair adaptive rounding (``recipes.PairAdaptive``) rounds each layer's value/output
pair for the product: it keeps, per layer, the candidate (RTN first) with the
lowest Frobenius product error ``Σ_h ||W_v W_o^h - Ŵ_v Ŵ_o^h||²`` (one term per
query head ``h``; ``W_v`` its KV group's columns). That objective treats every
input direction alike. What a token's attention output sees is ``x (W_v W_o^h -
Ŵ_v Ŵ_o^h)`` for the value projection's input ``x`` (up to the attention's mixing
of tokens), so its expected size is ``Σ_h tr(E_hᵀ Σ E_h)`` with ``Σ = E[x xᵀ]``.

Every method of ``--config.methods`` quantizes the model (``cafeq_jax.quantize``,
seed ``--config.seed``); its effective ``Ŵ_v``, ``Ŵ_o`` (codes dequantized, online
transforms applied, pair transforms folded) are compared per layer with the fp
product ``W_v W_o^h``, which a folded pair transform leaves unchanged, so every
method is measured against the same target: under the Frobenius objective and
under ``Σ`` measured on each evaluation text's windows and on the model's own
sample (``recipes.SelfGenerated``, 32 x 256 tokens as the self-generated recipes
sample: reads no data). Prints, summed over layers, each method's error over the
first method's (RTN by default) under each weighting, and in how many layers it is
below it.

python -m experiments.pair_rounding_study  (writes output_dir/results.json, table.md)
"""

from __future__ import annotations

import os

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

import cafeq_jax
from cafeq_jax import atomic
from cafeq_jax import eval as eval_lib
from cafeq_jax import quantizer
from cafeq_jax import recipes
from cafeq_jax.core import rounding
from cafeq_jax.eval import data as eval_data
from cafeq_jax.methods import selfgen
from cafeq_jax.methods import sequential
from cafeq_jax.models import linears
from experiments import cli
from experiments import quantize_lib

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), 'configs', 'pair_rounding_study.py')
SELF = 'self-generated'


def weighted_pair_error(w1, w2, w1_hat, w2_hat, c_t, *, n1: int, n2: int) -> jax.Array:
  """``Σ_h tr(E_hᵀ Σ E_h)``, ``E_h = W1_h W2_h - Ŵ1_h Ŵ2_h`` (``rounding.pair_product_error``'s
  blocks), given ``Cᵀ`` with ``Σ = C Cᵀ``: the plain product error of ``(Cᵀ W1, W2)``.

  Args:
    w1, w1_hat: ``(d, n1*b)``; w2, w2_hat: ``(n2*b, c)``.
    c_t: ``(d, d)`` transposed Cholesky factor of ``Σ``, or None for ``Σ = I``.
  """
  if c_t is not None:
    w1, w1_hat = c_t @ w1, c_t @ w1_hat
  return rounding.pair_product_error(w1, w2, w1_hat, w2_hat, n1=n1, n2=n2)


_weighted_pair_error = jax.jit(weighted_pair_error, static_argnames=('n1', 'n2'))


def value_input_factors(params, cfg, tokens, batch_size: int) -> jax.Array:
  """``Cᵀ`` per layer, ``C Cᵀ = E[x xᵀ] + εI`` for the value projection's input ``x``:
  ``(L, D, D)`` float32 (``ε``: ``1e-6`` of the mean diagonal, for a rank-deficient
  estimate)."""
  h = sequential.input_second_moments(params, cfg, tokens, batch_size=batch_size, matrices=('v',))
  h = h['v']
  eps = 1e-6 * jnp.mean(jnp.diagonal(h, axis1=-2, axis2=-1), axis=-1)
  h = h + eps[:, None, None] * jnp.eye(h.shape[-1], dtype=h.dtype)
  return jnp.swapaxes(jnp.linalg.cholesky(h), -1, -2)


def run(config) -> dict:
  spec = quantize_lib.parse_column(config.column)
  if not isinstance(spec, quantizer.QuantSpec):
    raise ValueError(f'config.column={config.column!r}: the study takes a uniform column.')
  methods = cli.split_names(config.methods)
  chosen = {m: recipes.get(m, spec=spec) for m in methods}  # checked before the model loads
  for m, r in chosen.items():
    if not {'v', 'o'} <= set(r.matrices):
      raise ValueError(f'method {m!r} does not quantize both v and o.')
  texts = {t: eval_data.load_named_text(t) for t in cli.split_names(config.texts)}
  model = quantize_lib.load_model(config.model, config.seed)
  cfg = model.config
  fp = linears.get_linears(model.params, cfg)
  tokens = {
    t: eval_lib.make_windows(model.encode(x), config.eval_num_seqs, config.eval_seq_len)
    for t, x in texts.items()
  }
  key = jax.random.PRNGKey(config.seed)
  stage = recipes.SelfGenerated(num_seqs=config.selfgen_num_seqs, seq_len=config.selfgen_seq_len)
  tokens[SELF] = selfgen.sample_tokens(model.params, cfg, stage, key)
  factors = {'frobenius': None}  # weighting -> Cᵀ per layer (None: Σ = I)
  factors.update(
    {
      t: value_input_factors(model.params, cfg, x, config.eval_batch_size)
      for t, x in tokens.items()
    }
  )
  n1, n2 = cfg.num_kv_heads, cfg.num_heads
  errors = {}
  for m, recipe in chosen.items():
    qparams, _ = cafeq_jax.quantize(model.params, cfg, recipe, key)
    eff = linears.get_linears(linears.dequantize_params(qparams, cfg), cfg)
    errors[m] = {w: [] for w in factors}
    for l in range(cfg.num_layers):
      v, o = (jnp.asarray(fp[n][l], jnp.float32) for n in ('v', 'o'))
      v_hat, o_hat = (jnp.asarray(eff[n][l], jnp.float32) for n in ('v', 'o'))
      for w, c_t in factors.items():
        err = _weighted_pair_error(
          v, o, v_hat, o_hat, None if c_t is None else c_t[l], n1=n1, n2=n2
        )
        errors[m][w].append(float(err))
    logging.info('%s: %s', m, {w: sum(e) for w, e in errors[m].items()})
  results = {'column': config.column, 'seed': config.seed, 'per_layer': errors}
  out = config.output_dir
  os.makedirs(out, exist_ok=True)
  atomic.write_json(os.path.join(out, 'results.json'), results)
  table = format_table(errors)
  atomic.write_text(os.path.join(out, 'table.md'), table)
  print(table)
  return results


def format_table(errors: dict) -> str:
  """Markdown: per method, its summed product error over the first method's under
  each weighting, and the layers where it is below the first method's."""
  methods = list(errors)
  base = methods[0]
  weights = list(errors[base])
  label = {w: 'Frobenius' if w == 'frobenius' else f'Σ {w}' for w in weights}
  head = ['method'] + [f'{label[w]}: / {base}' for w in weights]
  head += [f'{label[w]}: layers below {base}' for w in weights]
  lines = ['| ' + ' | '.join(head) + ' |', '|---|' + '---:|' * (len(head) - 1)]
  for m in methods:
    cells = [m]
    for w in weights:
      cells.append(f'{sum(errors[m][w]) / sum(errors[base][w]):.3f}')
    for w in weights:
      below = sum(e < b for e, b in zip(errors[m][w], errors[base][w]))
      cells.append(f'{below} of {len(errors[m][w])}')
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


if __name__ == '__main__':
  cli.launch(run, _DEFAULT_CONFIG)
