"""Compare a full-precision model and quantized variants on the same tokens.

For every batch of token windows the full-precision (reference) model runs once;
its next-token log-probabilities stay on device while each candidate param set
runs on the same batch, so all methods see identical tokens and the reference is
never recomputed. Only per-batch sums leave the device, so memory is
``O(batch_size * seq_len * vocab)`` whatever the number of windows.

Metrics per method (over the ``N * (T - 1)`` next-token predictions):
  ppl   exp(mean NLL of the true next token)
  nll   mean NLL (nats)
  kld   mean KL(p_fp || p_method) of the next-token distributions (nats; 0 for fp)
  top1  fraction of positions where argmax p_method == argmax p_fp (1 for fp)
  seconds          wall time of the method's forward passes + metrics, excluding
                   compilation (each call blocks until done)
  compile_seconds  time to compile the method's jitted step
"""

from __future__ import annotations

import time
from typing import Any
from typing import Callable
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from cafeq_jax.eval import metrics

Params = Any
ApplyFn = Callable[[Params, jax.Array], jax.Array]


def model_apply_fn(cfg, *, backend: str = 'xla', dtype=jnp.float32) -> ApplyFn:
  """``(params, tokens (B, T) int32) -> logits (B, T, V) float32`` for ``cfg``'s decoder."""
  from cafeq_jax.models import decoder  # pylint: disable=g-import-not-at-top

  def apply_fn(params, tokens):
    if tokens.shape[-1] > cfg.max_seq_len:
      raise ValueError(
        f"token windows of {tokens.shape[-1]} tokens exceed the model's "
        f'max_seq_len={cfg.max_seq_len}.'
      )
    return decoder.forward(params, cfg, tokens, dtype=dtype, backend=backend)

  apply_fn.max_seq_len = cfg.max_seq_len  # checked by ``evaluate`` before any work
  return apply_fn


def _reference_step(apply_fn: ApplyFn):
  def step(params, tokens):
    logits, targets = metrics.shift_targets(apply_fn(params, tokens), tokens)
    lp = metrics.log_probs(logits)  # (B, T-1, V)
    return lp, jnp.sum(metrics.nll_from_log_probs(lp, targets))

  return step


def _candidate_step(apply_fn: ApplyFn):
  def step(params, tokens, lp_ref):
    logits, targets = metrics.shift_targets(apply_fn(params, tokens), tokens)
    lq = metrics.log_probs(logits)
    nll = metrics.nll_from_log_probs(lq, targets)
    kld = metrics.kl_from_log_probs(lp_ref, lq)
    agree = metrics.top1_agreement(lp_ref, lq)
    return jnp.sum(nll), jnp.sum(kld), jnp.sum(agree.astype(jnp.int32))

  return step


class _Timed:
  """A jitted step, compiled ahead of time per input shape, with timing."""

  def __init__(self, fn):
    self._jit = jax.jit(fn)
    self._compiled = {}
    self.seconds = 0.0
    self.compile_seconds = 0.0

  def __call__(self, *args):
    key = tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(args[1:]))
    if key not in self._compiled:
      t0 = time.perf_counter()
      self._compiled[key] = self._jit.lower(*args).compile()
      self.compile_seconds += time.perf_counter() - t0
    t0 = time.perf_counter()
    out = jax.block_until_ready(self._compiled[key](*args))
    self.seconds += time.perf_counter() - t0
    return out


def evaluate(
  apply_fn: ApplyFn,
  fp_params: Params,
  tokens: np.ndarray | jax.Array,
  candidates: Mapping[str, Params] | None = None,
  *,
  batch_size: int = 1,
  reference_name: str = 'fp',
  progress: bool = True,
  apply_fns: Mapping[str, ApplyFn] | None = None,
) -> dict[str, dict[str, float]]:
  """Perplexity of the reference model and ppl / KLD / top-1 of each candidate.

  Args:
    apply_fn: ``(params, tokens (B, T) int32) -> logits (B, T, V)``; pure and
      jittable (see ``model_apply_fn``). Used for every method not in ``apply_fns``.
    fp_params: the full-precision (reference) params.
    tokens: (N, T) int token windows (``data.eval_tokens``); 2 <= T <= the
      model's ``max_seq_len`` (checked for ``model_apply_fn`` functions).
    candidates: method name -> params (e.g. quantized param trees).
    batch_size: windows per forward pass; the last batch may be smaller.
    reference_name: key of the reference in the result.
    progress: show a tqdm progress bar.
    apply_fns: optional per-method apply functions (e.g. a Pallas backend).
  Returns:
    {name: {'ppl', 'nll', 'kld', 'top1', 'seconds', 'compile_seconds', 'tokens'}},
    reference first, then candidates in the given order; 'tokens' is the number
    of predictions scored (N * (T - 1)).
  """
  candidates = dict(candidates or {})
  apply_fns = dict(apply_fns or {})
  if reference_name in candidates:
    raise ValueError(f'candidate name {reference_name!r} collides with the reference name.')
  unknown = set(apply_fns) - set(candidates) - {reference_name}
  if unknown:
    raise ValueError(
      f'apply_fns has names {sorted(unknown)} that are not methods; '
      f'expected a subset of {[reference_name, *candidates]}.'
    )
  tokens = np.asarray(tokens)
  if tokens.ndim != 2 or tokens.shape[1] < 2 or not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(
      f'tokens must be (N, T) ints with T >= 2; got shape {tokens.shape}, dtype {tokens.dtype}.'
    )
  if not isinstance(batch_size, int) or batch_size <= 0:
    raise ValueError(f'batch_size={batch_size!r}; expected a positive int.')
  tokens = tokens.astype(np.int32)
  n, t = tokens.shape
  for name, fn in [
    (reference_name, apply_fns.get(reference_name, apply_fn)),
    *((m, apply_fns.get(m, apply_fn)) for m in candidates),
  ]:
    limit = getattr(fn, 'max_seq_len', None)
    if limit is not None and t > limit:
      raise ValueError(
        f'token windows of {t} tokens exceed the max_seq_len={limit} of '
        f'the model evaluated as {name!r}; use eval windows of at most '
        f'{limit} tokens.'
      )

  ref = _Timed(_reference_step(apply_fns.get(reference_name, apply_fn)))
  steps = {name: _Timed(_candidate_step(apply_fns.get(name, apply_fn))) for name in candidates}
  sums = {name: np.zeros(3) for name in [reference_name, *candidates]}  # nll, kld, agree

  starts = range(0, n, batch_size)
  bar = tqdm.tqdm(
    total=len(starts) * (1 + len(candidates)), desc='eval', unit='fwd', disable=not progress
  )
  with bar:
    for s in starts:
      batch = jnp.asarray(tokens[s : s + batch_size])
      bar.set_postfix_str(reference_name)
      lp_ref, nll = ref(fp_params, batch)
      sums[reference_name][0] += float(nll)
      bar.update()
      for name, params in candidates.items():
        bar.set_postfix_str(name)
        sums[name] += np.asarray(steps[name](params, batch, lp_ref), dtype=np.float64)
        bar.update()
      del lp_ref

  count = n * (t - 1)
  results = {}
  for name, timed in [(reference_name, ref), *steps.items()]:
    nll, kld, agree = sums[name] / count
    if name == reference_name:
      kld, agree = 0.0, 1.0
    results[name] = {
      'ppl': float(np.exp(nll)),
      'nll': float(nll),
      'kld': float(kld),
      'top1': float(agree),
      'seconds': timed.seconds,
      'compile_seconds': timed.compile_seconds,
      'tokens': count,
    }
  return results


def format_results(results: Mapping[str, Mapping[str, float]]) -> str:
  """A plain-text table of ``evaluate``'s output."""
  lines = [f'{"method":<24} {"ppl":>9} {"kld":>9} {"top1":>7} {"seconds":>8} {"compile":>8}']
  for name, r in results.items():
    lines.append(
      f'{name:<24} {r["ppl"]:>9.3f} {r["kld"]:>9.5f} {r["top1"]:>7.4f} '
      f'{r["seconds"]:>8.2f} {r["compile_seconds"]:>8.2f}'
    )
  return '\n'.join(lines)
