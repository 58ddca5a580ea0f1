"""Each recipe's pairs against the fp model's: the v/o product, and every pair in its sub-layer.

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

Neither weighting sees what the attention does with the values: every token's output
mixes the values of earlier tokens by the attention's weights, and the errors of all
query heads add up in one output. The study therefore also measures each pair where
it acts: per layer, the sub-layer that holds the pair (attention for v/o and q/k, the
MLP for up/down) runs on the fp model's own hidden states of each text's windows (and
of the self-generated sample), once with the fp weights and once with only that pair's
two matrices replaced by the method's effective ones, and the mean over tokens of the
squared output difference is recorded (``sublayer_errors``).

``--config.swaps`` locates a recipe's perplexity loss by layers: each swap
``<method>:<kind>:<layers>`` is the first method's model (RTN by default) with that
pair kind's two matrices taken from ``<method>`` in those layers only (``0-23``,
``27``, ranges joined by ``+``), evaluated on every text (ppl, KLD vs fp).

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
from cafeq_jax import enums
from cafeq_jax import eval as eval_lib
from cafeq_jax import quantizer
from cafeq_jax import recipes
from cafeq_jax.core import pairs as pairs_lib
from cafeq_jax.core import rounding
from cafeq_jax.eval import data as eval_data
from cafeq_jax.methods import paired
from cafeq_jax.methods import selfgen
from cafeq_jax.methods import sequential
from cafeq_jax.models import decoder
from cafeq_jax.models import linears
from experiments import cli
from experiments import quantize_lib
from experiments import transform_study

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


# The sub-layer that holds each pair.
_SUBLAYER = {
  pairs_lib.PairKind.VO: decoder.Block.attend,
  pairs_lib.PairKind.QK: decoder.Block.attend,
  pairs_lib.PairKind.UPDOWN: decoder.Block.feed_forward,
}


def with_pair(layer: dict, cfg, effective: dict, kind, l: int) -> dict:
  """Layer ``l``'s params ``layer`` with ``kind``'s two matrices taken from
  ``effective`` (``{name: (L, d_in, d_out)}``); its other matrices kept."""
  mats = linears.layer_matrices(layer, cfg)
  mats.update({n: effective[n][l] for n in paired.PAIR_MATRICES[kind]})
  return linears.set_layer_matrices(layer, cfg, mats)


def sublayer_errors(params, cfg, tokens, effective: dict, batch_size: int) -> dict:
  """Each pair's error where it acts, on the fp model's hidden states of ``tokens``.

  Per layer and pair kind, the sub-layer that holds the pair (``Block.attend`` for
  v/o and q/k, ``Block.feed_forward`` for up/down) runs on the fp model's input to
  it, with the fp weights and with only the pair's two matrices taken from
  ``effective``; the squared difference of the outputs, summed over ``D`` and
  averaged over the ``N*S`` tokens, is the pair's error in that layer.

  Args:
    params, cfg: the fp model.
    tokens: ``(N, S)`` int token windows.
    effective: ``{method: {name: (L, d_in, d_out)}}`` effective float weights of
      (at least) every pair's matrices.
    batch_size: windows per forward.

  Returns:
    ``{method: {kind: [error per layer]}}`` (floats, kinds as ``PairKind`` values).
  """
  table = params['embedder']['input_embedding']
  tokens = jnp.asarray(tokens, jnp.int32)
  xs = [
    decoder.embed_tokens(table, tokens[i : i + batch_size], cfg)
    for i in range(0, tokens.shape[0], batch_size)
  ]
  out = {m: {str(k): [] for k in pairs_lib.PairKind} for m in effective}
  for l, attn_type in enumerate(cfg.attention_types):
    layer = params[f'layer_{l}']
    mids = [sequential.sublayer(layer, x, cfg, attn_type, decoder.Block.attend) for x in xs]
    ys = [sequential.sublayer(layer, m, cfg, attn_type, decoder.Block.feed_forward) for m in mids]
    for m, eff in effective.items():
      for kind, method in _SUBLAYER.items():
        q_layer = with_pair(layer, cfg, eff, kind, l)
        ins, refs = (xs, mids) if method is decoder.Block.attend else (mids, ys)
        err = sum(
          float(jnp.sum(jnp.square(sequential.sublayer(q_layer, x, cfg, attn_type, method) - r)))
          for x, r in zip(ins, refs)
        )
        out[m][str(kind)].append(err / tokens.size)
    xs = ys
  return out


def parse_swap(text: str) -> tuple[str, pairs_lib.PairKind, tuple[int, ...]]:
  """``'<method>:<kind>:<layers>'`` -> (method, kind, sorted layers); layers are ints
  or inclusive ranges ``a-b`` joined by ``+`` (``'0-23+27'``)."""
  parts = text.split(':')
  if len(parts) != 3:
    raise ValueError(f'swap {text!r} must be <method>:<kind>:<layers>, e.g. cafeq-pairs:vo:0-23.')
  method, kind, spans = parts
  kind = enums.coerce(pairs_lib.PairKind, kind, f'swap {text!r}: kind')
  layers = set()
  for span in spans.split('+'):
    lo, _, hi = span.partition('-')
    try:
      lo, hi = int(lo), int(hi or lo)
    except ValueError:
      raise ValueError(f'swap {text!r}: layers {spans!r} must be like 0-23+27.') from None
    if lo < 0 or hi < lo:
      raise ValueError(f'swap {text!r}: layer range {span!r} is empty or negative.')
    layers.update(range(lo, hi + 1))
  return method, kind, tuple(sorted(layers))


def swapped_params(base: dict, cfg, effective: dict, kind, layers) -> dict:
  """``base`` (float params) with ``kind``'s two matrices from ``effective``
  (``{name: (L, d_in, d_out)}``) in ``layers``; every other leaf is ``base``'s."""
  out = dict(base)
  for l in layers:
    out[f'layer_{l}'] = with_pair(base[f'layer_{l}'], cfg, effective, kind, l)
  return out


def run(config) -> dict:
  spec = quantize_lib.parse_column(config.column)
  if not isinstance(spec, quantizer.QuantSpec):
    raise ValueError(f'config.column={config.column!r}: the study takes a uniform column.')
  methods = cli.split_names(config.methods)
  # Presets and the transform study's rows (e.g. pairs-vo), checked before the model loads.
  chosen = {m: transform_study.recipe_for(m, spec) for m in methods}
  for m, r in chosen.items():
    if not {'v', 'o'} <= set(r.matrices):
      raise ValueError(f'method {m!r} does not quantize both v and o.')
  swaps = {s: parse_swap(s) for s in cli.split_names(config.swaps)}
  for s, (m, _, _) in swaps.items():
    if m not in chosen:
      raise ValueError(f'swap {s!r}: method {m!r} is not one of config.methods={methods}.')
  texts = {t: eval_data.load_named_text(t) for t in cli.split_names(config.texts)}
  model = quantize_lib.load_model(config.model, config.seed)
  cfg = model.config
  for s, (_, _, layers) in swaps.items():
    if layers[-1] >= cfg.num_layers:
      raise ValueError(f'swap {s!r}: the model has layers 0-{cfg.num_layers - 1}.')
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
  pair_names = sorted({n for names in paired.PAIR_MATRICES.values() for n in names})
  errors, effective = {}, {}
  base = None  # the first method's float params (the swaps' base)
  for m, recipe in chosen.items():
    qparams, _ = cafeq_jax.quantize(model.params, cfg, recipe, key)
    dequantized = linears.dequantize_params(qparams, cfg)
    base = dequantized if base is None else base
    eff = linears.get_linears(dequantized, cfg)
    effective[m] = {n: eff[n] for n in pair_names}
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
  sub = {m: {str(k): {} for k in pairs_lib.PairKind} for m in chosen}  # method, kind, text
  for t, x in tokens.items():
    for m, by_kind in sublayer_errors(
      model.params, cfg, x, effective, config.eval_batch_size
    ).items():
      for k, per_layer in by_kind.items():
        sub[m][k][t] = per_layer
  results = {
    'column': config.column,
    'seed': config.seed,
    'per_layer': errors,
    'sublayer_per_layer': sub,
  }
  if swaps:
    models = {methods[0]: base}
    models.update(
      {s: swapped_params(base, cfg, effective[m], k, layers) for s, (m, k, layers) in swaps.items()}
    )
    apply_fn = eval_lib.model_apply_fn(cfg)
    results['swaps'] = {name: {} for name in models}
    for t in texts:
      res = eval_lib.evaluate(
        apply_fn, model.params, tokens[t], models, batch_size=config.eval_batch_size
      )
      for name in models:
        results['swaps'][name].update({f'ppl_{t}': res[name]['ppl'], f'kld_{t}': res[name]['kld']})
  out = config.output_dir
  os.makedirs(out, exist_ok=True)
  atomic.write_json(os.path.join(out, 'results.json'), results)
  table = format_table(errors) + '\n' + format_sublayer_table(sub)
  if swaps:
    table += '\n' + format_swap_table(results['swaps'], list(texts))
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


def format_sublayer_table(sub: dict) -> str:
  """Markdown: per method and pair kind, over the first method's on each text (``a,
  b, c`` in the texts' order): the sub-layer output error summed over layers (the
  last layers' errors are the largest, so they dominate it), the geometric mean of
  the per-layer ratios, and the layers where it is below the first method's."""
  methods = list(sub)
  base = methods[0]
  kinds = list(sub[base])
  texts = list(sub[base][kinds[0]])
  where = {
    str(k): 'attention' if v is decoder.Block.attend else 'MLP' for k, v in _SUBLAYER.items()
  }
  head = ['method'] + [f'{k}: {where[k]} output / {base}' for k in kinds]
  head += [f'{k}: per-layer geometric mean' for k in kinds]
  head += [f'{k}: layers below {base}' for k in kinds]
  lines = [f'Texts in each cell: {", ".join(texts)}.', '']
  lines += ['| ' + ' | '.join(head) + ' |', '|---|' + '---:|' * (len(head) - 1)]
  for m in methods:
    ratios = {
      (k, t): np.asarray(sub[m][k][t]) / np.asarray(sub[base][k][t]) for k in kinds for t in texts
    }
    cells = [m]
    for k in kinds:
      cells.append(', '.join(f'{sum(sub[m][k][t]) / sum(sub[base][k][t]):.3f}' for t in texts))
    for k in kinds:
      cells.append(', '.join(f'{np.exp(np.mean(np.log(ratios[k, t]))):.3f}' for t in texts))
    for k in kinds:
      below = [int(np.sum(ratios[k, t] < 1)) for t in texts]
      cells.append(', '.join(map(str, below)) + f' of {len(sub[m][k][texts[0]])}')
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def format_swap_table(swaps: dict, texts: list[str]) -> str:
  """Markdown: ppl and KLD on each text of the base model and of each swap."""
  head = ['model'] + [f'ppl {t}' for t in texts] + [f'KLD {t}' for t in texts]
  lines = ['| ' + ' | '.join(head) + ' |', '|---|' + '---:|' * (len(head) - 1)]
  for name, r in swaps.items():
    cells = [f'{r[f"ppl_{t}"]:.2f}' for t in texts] + [f'{r[f"kld_{t}"]:.3f}' for t in texts]
    lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


if __name__ == '__main__':
  cli.launch(run, _DEFAULT_CONFIG)
