"""Equal-size GGUF table: perplexity of our data-free roundings into llama.cpp's mixes
against llama.cpp's own quantizer (no importance matrix), on the same SmolLM2 weights.

For each mix, every file holds the same tensor types (``cafeq_jax.ggml.mixes``
replicates llama.cpp's choice per tensor, checked against llama.cpp's files by
tests/experiments/test_llamacpp.py), so the same bytes. Every file is evaluated
the same way: read back with ``cafeq_jax.loading.load_gguf`` (the ``gguf``
package's dequantizers) and run by our decoder on each evaluation text; the
reference is the source file itself (SmolLM2-135M as its Q4_1 GGUF).

python -m experiments.gguf_table  (writes output_dir/results.json and table.md)
"""

from __future__ import annotations

import os
import time

from absl import logging
import jax

import cafeq_jax
from cafeq_jax import atomic
from cafeq_jax import eval as eval_lib
from cafeq_jax.eval import data as eval_data
from cafeq_jax.ggml import mixes
from cafeq_jax.loading import gguf as gguf_lib
from cafeq_jax.loading import gguf_writer
from cafeq_jax.loading import tokenizer as tokenizer_lib
from experiments import cli
from experiments import quantize_lib
from experiments.configs import quantize as quantize_config

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), 'configs', 'gguf_table.py')


def ours(
  params, cfg, mix: str, method: str, path: str, *, seed: int, clip_search: bool, source: str | None
) -> float:
  """Quantizes ``method`` into ``mix`` and writes ``path`` (metadata and tokenizer
  from the GGUF ``source``); returns the seconds taken (NaN: the file is kept, it
  holds the same recipe run with the same seed)."""
  smap = mixes.spec_map(mix, cfg, clip_search=clip_search)
  recipe = quantize_lib.recipe_for(method, smap, quantize_config.get_config())
  gguf_writer.check_recipe(recipe)
  prov = {'recipe': recipe.to_dict(), 'seed': seed}
  if gguf_writer.read_provenance(path) == prov:
    logging.info('kept %s (same recipe and seed)', path)
    return float('nan')
  t0 = time.perf_counter()
  qparams, _ = cafeq_jax.quantize(params, cfg, recipe, jax.random.PRNGKey(seed))
  seconds = time.perf_counter() - t0
  gguf_writer.save_gguf(qparams, cfg, path, source=source, mix=mix, provenance=prov)
  return seconds


def run(config) -> dict:
  from experiments import llamacpp  # pylint: disable=g-import-not-at-top

  mix_names = [mixes.check_mix(m) for m in cli.split_names(config.mixes)]
  methods = cli.split_names(config.methods)
  texts = {t: eval_data.load_named_text(t) for t in cli.split_names(config.texts)}
  out = config.output_dir
  os.makedirs(out, exist_ok=True)
  src = gguf_lib.smollm2_gguf_path()
  params, cfg = gguf_lib.load_gguf()
  tok = tokenizer_lib.load_gguf_tokenizer()
  windows = {
    t: eval_lib.make_windows(
      tok.encode(x, add_bos=False), config.eval_num_seqs, config.eval_seq_len
    )
    for t, x in texts.items()
  }
  apply_fn = eval_lib.model_apply_fn(cfg)
  results: dict = {'source': os.path.basename(src), 'texts': list(texts), 'mixes': {}}
  for mix in mix_names:
    files, seconds = {}, {}
    if config.llamacpp:
      files['llama.cpp'] = os.path.join(out, f'{mix}_llama.cpp.gguf')
      if not os.path.exists(files['llama.cpp']):
        llamacpp.quantize(src, files['llama.cpp'], mix)
    for m in methods:
      row = f'{m}-clip' if config.clip_search else m
      files[row] = os.path.join(out, f'{mix}_{row}.gguf')
      seconds[row] = ours(
        params,
        cfg,
        mix,
        m,
        files[row],
        seed=config.seed,
        clip_search=config.clip_search,
        source=src,
      )
    rows = {
      name: {
        'file_bytes': os.path.getsize(p),
        'linear_bits_per_weight': llamacpp.linear_bits_per_weight(p),
        'linear_types': sorted(set(llamacpp.linear_types_by_layer(p)['ffn_down']))
        + sorted(set(llamacpp.linear_types_by_layer(p)['attn_q'])),
        'quantize_seconds': seconds.get(name),
      }
      for name, p in files.items()
    }
    cands = {name: gguf_lib.load_gguf(p)[0] for name, p in files.items()}
    for t, toks in windows.items():
      metrics = eval_lib.evaluate(
        apply_fn, params, toks, cands, batch_size=config.eval_batch_size, progress=False
      )
      results.setdefault('fp', {})[t] = metrics['fp']['ppl']
      for name in files:
        rows[name][f'ppl_{t}'] = metrics[name]['ppl']
        rows[name][f'kld_{t}'] = metrics[name]['kld']
        if config.llamacpp_eval:  # the same windows, run by llama.cpp itself
          rows[name][f'llamacpp_ppl_{t}'] = llamacpp.perplexity(files[name], toks)
      if config.llamacpp_eval and f'llamacpp_{t}' not in results['fp']:
        results['fp'][f'llamacpp_{t}'] = llamacpp.perplexity(src, toks)
    del cands
    results['mixes'][mix] = rows
    atomic.write_json(os.path.join(out, 'results.json'), results)
    logging.info('%s: %s', mix, rows)
  table = format_table(results)
  atomic.write_text(os.path.join(out, 'table.md'), table)
  print(table)
  return results


def format_table(results: dict) -> str:
  """Markdown: per mix and file, bits per linear weight and perplexity on each text,
  by our evaluation and (where measured) by llama.cpp running the file."""
  texts, fp = results['texts'], results['fp']
  lc = [t for t in texts if f'llamacpp_{t}' in fp]
  cols = [f'ppl {t}' for t in texts] + [f'llama.cpp ppl {t}' for t in lc]
  lines = ['| mix | file | bits / linear weight | ' + ' | '.join(cols) + ' |']
  lines.append('|' + '---|' * 2 + '---:|' * (1 + len(cols)))
  vals = [f'{fp[t]:.2f}' for t in texts] + [f'{fp[f"llamacpp_{t}"]:.2f}' for t in lc]
  lines.append('| | fp (source Q4_1) | 5.000 | ' + ' | '.join(vals) + ' |')
  for mix, rows in results['mixes'].items():
    for name, r in rows.items():
      vals = [f'{r[f"ppl_{t}"]:.2f}' for t in texts]
      vals += [f'{r[f"llamacpp_ppl_{t}"]:.2f}' for t in lc if f'llamacpp_ppl_{t}' in r]
      bits = r['linear_bits_per_weight']
      lines.append(f'| {mix} | {name} | {bits:.3f} | ' + ' | '.join(vals) + ' |')
  return '\n'.join(lines) + '\n'


if __name__ == '__main__':
  cli.launch(run, _DEFAULT_CONFIG)
