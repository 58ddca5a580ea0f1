"""Why the Frobenius proxy fails on SmolLM2, and data-free second-moment estimates.

    python -m experiments.proxy_study --config.out=outputs/proxy_study.json
    python -m experiments.proxy_study --config.methods=rtn,selfgen_seq --config.eval_num_seqs=4

Options: experiments/configs/proxy_study.py (``--config.<field>=<value>``).

(a) Diagnosis (pydoc activations, diagnosis only): per matrix, the fraction of
    ``tr(Σ)`` on the top-1 / top-8 input channels, ``eff_rank/d``, and the true-loss
    ratio ``L_Σ(Hadamard+RTN) / L_Σ(RTN)`` next to the Frobenius ratio; correlation of
    ``diag Σ`` with the data-free estimates (RMSNorm ``g²``, self-generated ``Σ``).
(b)/(c) Candidates (w<bits> g<group> asym, group_fallback), evaluated on the same
    pydoc windows (ppl, KLD, top-1):
      rtn, hadamard                 data-free baselines
      gptq_pydoc                    sequential GPTQ, in-domain calibration (comparison)
      selfgen_seq                   sequential GPTQ on self-generated tokens (data-free)
      selfgen_h                     GPTQ rounding under fp self-generated Σ (data-free)
      random_h                      same with uniformly random token ids (data-free)
      struct_h                      GPTQ rounding under weights-only Σ (data-free)
      pydoc_h                       GPTQ rounding under fp pydoc Σ (comparison)
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cafeq_jax import atomic
from experiments import cli

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), 'configs', 'proxy_study.py')

# Candidates of --config.methods (see the module docstring).
CANDIDATES = (
  'rtn',
  'hadamard',
  'gptq_pydoc',
  'selfgen_seq',
  'selfgen_h',
  'random_h',
  'struct_h',
  'pydoc_h',
)

# Fields recorded under 'flags' in the results JSON.
_RECORDED = (
  'eval_num_seqs',
  'eval_seq_len',
  'calib_num_seqs',
  'calib_seq_len',
  'gen_num_seqs',
  'gen_seq_len',
  'temperature',
  'start_id',
  'seed',
)


def _log(msg):
  print(f'[{time.strftime("%H:%M:%S")}] {msg}', flush=True)


def _corr(a, b):
  a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
  return float(np.corrcoef(a, b)[0, 1])


def _spearman(a, b):
  ra = np.argsort(np.argsort(np.asarray(a).ravel()))
  rb = np.argsort(np.argsort(np.asarray(b).ravel()))
  return _corr(ra, rb)


def diagnose(params, cfg, spec, h_pydoc, h_est: dict, key, seed: int = 0) -> dict:
  """Per-matrix isotropy diagnostics under the pydoc Σ (diagnosis only)."""
  from cafeq_jax import quantizer as qz
  from cafeq_jax import recipes
  from cafeq_jax.core import stats
  from cafeq_jax.methods import quantize
  from cafeq_jax.models import linears

  del seed  # the key carries it
  mats = linears.get_linears(params, cfg)
  qh, _ = quantize(params, cfg, recipes.get('hadamard', spec=spec), key)
  had = linears.get_linears(qh, cfg)  # effective weights M⁻¹ dequant(Q(M W))
  out = {}
  for n, w in mats.items():
    w = jnp.asarray(w, jnp.float32)
    h = h_pydoc[n]
    d = w.shape[-2]
    w_rtn = qz.quant_dequant(w, spec.for_rows(d))
    w_had = jnp.asarray(had[n], jnp.float32)
    eye = jnp.broadcast_to(jnp.eye(d, dtype=jnp.float32), h.shape)
    true_ratio = stats.weighted_loss(w, w_had, h) / stats.weighted_loss(w, w_rtn, h)
    frob_ratio = stats.weighted_loss(w, w_had, eye) / stats.weighted_loss(w, w_rtn, eye)
    diag = jnp.diagonal(h, axis1=-2, axis2=-1)
    r = {
      'd_in': d,
      'top1_mass': np.asarray(stats.top_channel_mass(h, 1)).round(4).tolist(),
      'top8_mass': np.asarray(stats.top_channel_mass(h, 8)).round(4).tolist(),
      'eff_rank_frac': np.asarray(stats.effective_rank(h) / d).round(4).tolist(),
      'max_over_median_diag': np.asarray(jnp.max(diag, -1) / jnp.median(diag, -1))
      .round(1)
      .tolist(),
      'loss_ratio_hadamard_vs_rtn_true': float(
        jnp.sum(stats.weighted_loss(w, w_had, h)) / jnp.sum(stats.weighted_loss(w, w_rtn, h))
      ),
      'loss_ratio_hadamard_vs_rtn_frob': float(
        jnp.sum(stats.weighted_loss(w, w_had, eye)) / jnp.sum(stats.weighted_loss(w, w_rtn, eye))
      ),
      'per_layer_true_ratio': np.asarray(true_ratio).round(3).tolist(),
      'per_layer_frob_ratio': np.asarray(frob_ratio).round(3).tolist(),
    }
    for src, hs in h_est.items():
      de = jnp.diagonal(hs[n], axis1=-2, axis2=-1)
      r[f'spearman_diag_{src}'] = float(
        np.mean([_spearman(diag[l], de[l]) for l in range(cfg.num_layers)])
      )
      # Cosine similarity of the full normalised matrices (1 = same up to scale).
      a, b = stats.normalize_trace(h), stats.normalize_trace(hs[n])
      cos = jnp.sum(a * b, (-2, -1)) / jnp.sqrt(jnp.sum(a * a, (-2, -1)) * jnp.sum(b * b, (-2, -1)))
      r[f'cosine_{src}'] = float(jnp.mean(cos))
    out[n] = r
    _log(
      f'diag {n:5s} d={d} top1={np.mean(r["top1_mass"]):.3f} '
      f'top8={np.mean(r["top8_mass"]):.3f} effrank/d={np.mean(r["eff_rank_frac"]):.3f} '
      f'had/rtn true={r["loss_ratio_hadamard_vs_rtn_true"]:.2f} '
      f'frob={r["loss_ratio_hadamard_vs_rtn_frob"]:.3f} '
      + ' '.join(f'{k}={v:.2f}' for k, v in r.items() if k.startswith(('spearman', 'cosine')))
    )
  # Model-only: residual-stream channels with large RMSNorm weights.
  g = np.stack(
    [np.asarray(params[f'layer_{l}']['pre_attention_norm']['scale']) for l in range(cfg.num_layers)]
  )
  emb = np.asarray(params['embedder']['input_embedding'], np.float32)
  out['model_only'] = {
    'attn_norm_g_max_over_median': (np.max(np.abs(g), 1) / np.median(np.abs(g), 1))
    .round(1)
    .tolist(),
    'embedding_channel_rms_max_over_median': float(
      np.max(np.sqrt((emb**2).mean(0))) / np.median(np.sqrt((emb**2).mean(0)))
    ),
  }
  return out


def run(config: ml_collections.ConfigDict) -> dict:
  """The study of ``config`` (experiments/configs/proxy_study.py); writes ``config.out``.

  Returns:
    The results dict written to ``config.out`` (JSON).

  Raises:
    ValueError: an unknown candidate in ``config.methods`` (before anything runs).
  """
  unknown = [
    m.strip() for m in config.methods.split(',') if m.strip() and m.strip() not in CANDIDATES
  ]
  if unknown:
    raise ValueError(
      f'unknown method {unknown[0]!r} in config.methods; expected some of {CANDIDATES}.'
    )
  from cafeq_jax import eval as eval_lib
  from cafeq_jax import recipes
  from cafeq_jax.methods import quantize
  from cafeq_jax.methods import stats_adapter
  from experiments import quantize_lib

  t_all = time.perf_counter()
  methods = [m.strip() for m in config.methods.split(',') if m.strip()]
  spec = quantize_lib.parse_column(config.column)
  model = quantize_lib.load_model('smollm2_135m')
  params, cfg = model.params, model.config
  key = jax.random.PRNGKey(config.seed)
  text = eval_lib.load_text(None)
  tokens = eval_lib.make_windows(model.encode(text), config.eval_num_seqs, config.eval_seq_len)
  ccfg = ml_collections.ConfigDict(
    dict(
      eval_text='',
      eval_num_seqs=config.eval_num_seqs,
      eval_seq_len=config.eval_seq_len,
      calib_num_seqs=config.calib_num_seqs,
      calib_seq_len=config.calib_seq_len,
    )
  )
  res = {
    'column': config.column,
    'flags': {k: config[k] for k in _RECORDED},
    'timings': {},
    'methods': {},
  }

  need_pydoc = config.diagnose or any(m in methods for m in ('gptq_pydoc', 'pydoc_h'))
  calib_stage = recipes.Calibration(
    source='in-domain', num_seqs=config.calib_num_seqs, seq_len=config.calib_seq_len
  )
  calib = quantize_lib.calibration_tokens(calib_stage, model, ccfg) if need_pydoc else None
  need_gen = config.diagnose or any(m in methods for m in ('selfgen_seq', 'selfgen_h'))
  h_gen = gen_toks = None
  if need_gen:
    t0 = time.perf_counter()
    stage = recipes.SelfGenerated(
      num_seqs=config.gen_num_seqs,
      seq_len=config.gen_seq_len,
      temperature=config.temperature,
      start_id=config.start_id,
    )
    h_gen, gen_toks = stats_adapter.selfgen_hessians(
      params, cfg, stage=stage, key=jax.random.fold_in(key, 1), return_tokens=True
    )
    jax.block_until_ready(h_gen)
    res['timings']['selfgen_hessians'] = time.perf_counter() - t0
    res['selfgen_sample'] = model.decode([int(t) for t in gen_toks[0, :64]])
    _log(
      f'selfgen_hessians {config.gen_num_seqs}x{config.gen_seq_len}: '
      f'{res["timings"]["selfgen_hessians"]:.1f}s; sample: {res["selfgen_sample"]!r}'
    )
  h_struct = None
  if config.diagnose or 'struct_h' in methods:
    t0 = time.perf_counter()
    h_struct = jax.block_until_ready(stats_adapter.structural_hessians(params, cfg))
    res['timings']['structural_hessians'] = time.perf_counter() - t0
  h_pydoc = None
  if config.diagnose or 'pydoc_h' in methods:
    t0 = time.perf_counter()
    h_pydoc = jax.block_until_ready(stats_adapter.activation_hessians(params, cfg, calib))
    res['timings']['pydoc_hessians'] = time.perf_counter() - t0
  if config.diagnose:
    res['diagnosis'] = diagnose(
      params, cfg, spec, h_pydoc, {'selfgen': h_gen, 'struct': h_struct}, key, config.seed
    )
    _dump(res, config.out)

  cands = {}
  for m in methods:
    t0 = time.perf_counter()
    if m in ('rtn', 'hadamard'):
      qp, _ = quantize(params, cfg, recipes.get(m, spec=spec), key)
    elif m in ('gptq_pydoc', 'selfgen_seq'):
      # Sequential GPTQ on these tokens (calibration windows or self-generated ones).
      qp, _ = quantize(
        params,
        cfg,
        recipes.get('gptq', spec=spec),
        key,
        calib_tokens=calib if m == 'gptq_pydoc' else gen_toks,
      )
    elif m in ('selfgen_h', 'struct_h', 'pydoc_h', 'random_h'):
      if m == 'random_h':
        rt = jax.random.randint(
          jax.random.fold_in(key, 2), (config.gen_num_seqs, config.gen_seq_len), 0, cfg.vocab_size
        )
        hs = stats_adapter.activation_hessians(params, cfg, rt)
      else:
        hs = {'selfgen_h': h_gen, 'struct_h': h_struct, 'pydoc_h': h_pydoc}[m]
      qp, _, _ = stats_adapter.quantize_with_hessians(params, cfg, spec, hs)
    else:
      raise ValueError(f'unknown method {m!r}')
    jax.block_until_ready(jax.tree.leaves(qp))
    res['timings'][m] = time.perf_counter() - t0
    _log(f'quantized {m} in {res["timings"][m]:.1f}s')
    cands[m] = qp
  t0 = time.perf_counter()
  metrics = eval_lib.evaluate(
    eval_lib.model_apply_fn(cfg), params, tokens, cands, batch_size=2, progress=False
  )
  res['timings']['eval'] = time.perf_counter() - t0
  res['methods'] = metrics
  res['timings']['total'] = time.perf_counter() - t_all
  _log('\n' + eval_lib.format_results(metrics))
  _dump(res, config.out)
  return res


def _dump(res, out):
  os.makedirs(os.path.dirname(out) or '.', exist_ok=True)
  atomic.write_text(out, json.dumps(res, indent=1, default=float))


if __name__ == '__main__':
  cli.launch(run, _DEFAULT_CONFIG)
