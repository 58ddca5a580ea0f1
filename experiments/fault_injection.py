r"""Fault injection: the main job under random SIGKILLs never leaves a torn or lost output.

    python -m experiments.fault_injection --trials=20 --seed=0

The main job (``experiments.quantize``) runs on the tiny random model
``tiny_llama`` (rows rtn and hadamard, columns w4g32 and w3g32, the rtn models
saved with Orbax, the hadamard rows exported as HF safetensors). Two reference
runs, one per job seed A and B, run uninterrupted in their own directories and
record every output of each version: the cells of ``results.json`` (by row
hash), the saved models (array digests), the exports (file sha256s) and the
proxy-loss reports. The output dir under test starts as a copy of version A.

Each trial then restarts the job on that directory with the other seed (so every
cell, model and export is overwritten by a different version) and SIGKILLs it
after a random delay drawn over the working part of a run (from the "loaded"
log line to the end, as timed by the reference run). After every trial the
directory is checked:

* ``results.json`` parses, was never moved aside, and every cell that existed
  before still exists and equals the reference cell of its hash (old or new);
* every saved model restores (checksums verified) and equals the reference
  model of the row hash it records; every export verifies and equals the
  reference export of its row hash; every report equals its reference;
* ``table.md`` shows the metrics of one of the two versions.

A final uninterrupted run must then finish with version-complete outputs of its
seed. Prints a tally; exit status 1 if any check failed. Trials are bounded
(``--trials`` at most 1000, each run at most ``--timeout`` seconds).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLUMNS = ('w4g32', 'w3g32')
METHODS = ('rtn', 'hadamard')
SAVED, EXPORTED = 'rtn', 'hadamard'
SEEDS = (0, 1)
MAX_TRIALS = 1000
# Row fields that are timings (differ between runs of one version).
_TIMINGS = ('seconds', 'compile_seconds', 'quantize_seconds')
_TABLE_ROW = re.compile(r'^\| (\S+) \|(.*)\|$')


def job_command(output_dir: str, seed: int, columns=COLUMNS) -> list[str]:
  """The main job on the tiny model, as a subprocess command line."""
  return [
    sys.executable,
    '-m',
    'experiments.quantize',
    '--logtostderr',
    '--config.model=tiny_llama',
    f'--config.methods={",".join(METHODS)}',
    f'--config.columns={",".join(columns)}',
    '--config.eval_num_seqs=2',
    '--config.eval_seq_len=16',
    '--config.eval_batch_size=2',
    f'--config.save_models={SAVED}',
    f'--config.export_hf={EXPORTED}',
    '--config.prompt=',
    '--config.progress=False',
    '--config.plots=False',
    f'--config.seed={seed}',
    f'--config.output_dir={output_dir}',
  ]


def _env(cache_dir: str) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if not k.startswith(('JAX_', 'XLA_'))}
  env.update(
    PYTHONPATH=REPO + os.pathsep + env.get('PYTHONPATH', ''),
    JAX_PLATFORMS='cpu',
    JAX_COMPILATION_CACHE_DIR=cache_dir,
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0',
  )
  return env


def _start(
  output_dir: str, seed: int, log_path: str, cache_dir: str, columns=COLUMNS
) -> subprocess.Popen:
  log = open(log_path, 'w')  # pylint: disable=consider-using-with
  proc = subprocess.Popen(
    job_command(output_dir, seed, columns),
    cwd=REPO,
    env=_env(cache_dir),
    stdout=log,
    stderr=subprocess.STDOUT,
  )
  proc.log = log
  return proc


def _wait(proc: subprocess.Popen, timeout: float) -> int:
  try:
    return proc.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
    raise
  finally:
    proc.log.close()


def _log_text(log_path: str) -> str:
  try:
    with open(log_path, errors='replace') as f:
      return f.read()
  except OSError:
    return ''


def _phase(log: str) -> str:
  """Where a killed run was, from its last log lines."""
  lines = [l for l in log.splitlines() if '] ' in l]
  for line in reversed(lines):
    for key, name in (
      ('exported ', 'after an export'),
      ('saved ', 'after a model save'),
      ('] wrote ', 'after a results write'),
      ('] evaluating ', 'evaluating'),
      ('] quantizing with', 'quantizing'),
      (': computing', 'planning'),
      (': kept', 'planning'),
      ('loaded ', 'after the model load'),
    ):
      if key in line:
        return name
  return 'start-up'


# ---------------------------------------------------------------------------
# Snapshots of an output dir: what each output is, by content.


def _file_sha(path: str) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      h.update(chunk)
  return h.hexdigest()


def _cell(row: dict) -> dict:
  return {k: v for k, v in row.items() if k not in _TIMINGS}


def _model_digest(path: str) -> tuple[str | None, str]:
  """``(row hash, digest of every array)`` of a saved model (restored, verified)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from cafeq_jax import checkpointing  # pylint: disable=g-import-not-at-top

  params, info = checkpointing.restore_quantized(path)
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(params):
    a = np.asarray(leaf)
    h.update(f'{a.dtype}{a.shape}'.encode() + np.ascontiguousarray(a).tobytes())
  return info['metadata'].get('row_hash'), h.hexdigest()


def _export_digest(path: str) -> tuple[str | None, str]:
  from cafeq_jax.loading import hf  # pylint: disable=g-import-not-at-top

  marker = hf.verify_export(path)
  return marker['provenance'].get('row_hash'), json.dumps(marker['files'], sort_keys=True)


def _table_cells(text: str) -> dict[str, str]:
  """method -> its ppl / KLD cells (the timing column dropped)."""
  out = {}
  for line in text.splitlines():
    m = _TABLE_ROW.match(line)
    if m and m.group(1) not in ('method',) and not line.startswith('|---'):
      out[m.group(1)] = '|'.join(m.group(2).split('|')[:-1])
  return out


def snapshot(output_dir: str) -> dict[str, Any]:
  """Every output of the job in ``output_dir``, read back and verified.

  Raises on any unreadable or corrupt output (that is a failed check).
  """
  with open(os.path.join(output_dir, 'results.json')) as f:
    results = json.load(f)
  cells = {
    (c, m): _cell(r) for c, col in results['columns'].items() for m, r in col['methods'].items()
  }
  models, exports, reports = {}, {}, {}
  for col in results['columns']:
    path = os.path.join(output_dir, 'models', f'{col}_{SAVED}')
    if os.path.exists(path):
      models[col] = _model_digest(path)
    path = os.path.join(output_dir, 'hf', f'{col}_{EXPORTED}')
    if os.path.exists(path):
      exports[col] = _export_digest(path)
    for m in METHODS:
      path = os.path.join(output_dir, 'reports', f'{col}_{m}.json')
      if os.path.exists(path):
        with open(path) as f:
          r = json.load(f)
        reports[(col, m)] = (r['row_hash'], json.dumps(r['per_matrix'], sort_keys=True))
  with open(os.path.join(output_dir, 'table.md')) as f:
    table = _table_cells(f.read())
  aside = sorted(n for n in os.listdir(output_dir) if '.corrupt-' in n)
  return {
    'cells': cells,
    'models': models,
    'exports': exports,
    'reports': reports,
    'table': table,
    'aside': aside,
  }


class Reference:
  """The outputs of every version (reference runs), indexed by row hash."""

  def __init__(self, snaps: list[dict[str, Any]]):
    self.cells: dict[str, dict] = {}
    self.models: dict[str, str] = {}
    self.exports: dict[str, str] = {}
    self.reports: dict[str, str] = {}
    self.tables = [s['table'] for s in snaps]
    for s in snaps:
      for cell in s['cells'].values():
        self.cells[cell['hash']] = cell
      self.models.update(dict(s['models'].values()))
      self.exports.update(dict(s['exports'].values()))
      self.reports.update(dict(s['reports'].values()))

  def problems(self, snap: dict[str, Any], before: dict[str, Any] | None) -> list[str]:
    """What in ``snap`` is not an old or new complete version (empty: consistent)."""
    out = []
    if snap['aside']:
      out.append(f'results.json was moved aside as corrupt: {snap["aside"]}')
    for key, cell in snap['cells'].items():
      ref = self.cells.get(cell.get('hash'))
      if ref != cell:
        out.append(f'cell {key} (hash {cell.get("hash")}) is no reference version')
    for what, got, ref in (
      ('model', snap['models'], self.models),
      ('export', snap['exports'], self.exports),
      ('report', snap['reports'], self.reports),
    ):
      for key, (h, digest) in got.items():
        if ref.get(h) != digest:
          out.append(f'{what} {key} (row hash {h}) is no reference version')
    if snap['table'] not in self.tables:
      out.append('table.md shows neither version')
    if before is not None:
      for kind in ('cells', 'models', 'exports'):
        lost = sorted(set(before[kind]) - set(snap[kind]))
        if lost:
          out.append(f'{kind} lost: {lost}')
    return out


def _copy(src: str, dst: str) -> None:
  shutil.rmtree(dst, ignore_errors=True)
  shutil.copytree(src, dst, symlinks=True)
  # The copy's own lock; a lock file is no output.


def run_trials(
  trials: int,
  seed: int = 0,
  workdir: str | None = None,
  timeout: float = 300.0,
  verbose: bool = True,
  columns=COLUMNS,
  cache_dir: str | None = None,
) -> dict[str, Any]:
  """Runs the reference runs, ``trials`` killed restarts and a final run; checks each.

  Args:
    trials: killed restarts (1 .. MAX_TRIALS).
    seed: seed of the random kill delays.
    workdir: where the runs write (default: a new temporary directory).
    timeout: bound on the seconds of each run.
    verbose: print a line per run.
    columns: the job's columns (fewer: faster runs).
    cache_dir: JAX persistent compilation cache of the runs (default in workdir).

  Returns:
    The tally: trials, killed, finished (before the kill landed), failed runs,
    kill phases, problems (a list of strings; empty when every check passed),
    final_ok, and the seconds taken.
  """
  if not 1 <= trials <= MAX_TRIALS:
    raise ValueError(f'trials={trials} must be in [1, {MAX_TRIALS}].')
  t_start = time.perf_counter()
  rng = random.Random(seed)
  workdir = workdir or tempfile.mkdtemp(prefix='fault_injection_')
  cache = cache_dir or os.path.join(workdir, 'jax_cache')
  say = print if verbose else (lambda *a, **k: None)

  # Reference runs (the second one, with a warm compile cache, times a run).
  refs, work_seconds = [], 0.0
  for s in SEEDS:
    out, log = os.path.join(workdir, f'ref_{s}'), os.path.join(workdir, f'ref_{s}.log')
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    proc = _start(out, s, log, cache, columns)
    loaded = None
    while proc.poll() is None:
      if loaded is None and 'loaded tiny_llama' in _log_text(log):
        loaded = time.perf_counter()
      time.sleep(0.02)
    rc = _wait(proc, timeout)
    if rc != 0:
      raise RuntimeError(
        f'reference run (seed {s}) failed with status {rc}:\n{_log_text(log)[-3000:]}'
      )
    work_seconds = time.perf_counter() - (loaded or t0)
    refs.append(snapshot(out))
    say(f'reference run seed={s}: {time.perf_counter() - t0:.1f}s')
  reference = Reference(refs)

  out = os.path.join(workdir, 'out')
  _copy(os.path.join(workdir, f'ref_{SEEDS[0]}'), out)
  tally = {
    'trials': trials,
    'killed': 0,
    'finished': 0,
    'failed_runs': 0,
    'phases': collections.Counter(),
    'problems': [],
    'final_ok': False,
  }
  before = snapshot(out)
  log = os.path.join(workdir, 'trial.log')
  for i in range(trials):
    s = SEEDS[(i + 1) % 2]
    delay = rng.uniform(0.0, 1.1 * work_seconds)
    proc = _start(out, s, log, cache, columns)
    deadline = time.perf_counter() + timeout
    while proc.poll() is None and 'loaded tiny_llama' not in _log_text(log):
      if time.perf_counter() > deadline:
        break
      time.sleep(0.02)
    t_kill = time.perf_counter() + delay
    while proc.poll() is None and time.perf_counter() < t_kill:
      time.sleep(0.005)
    if proc.poll() is None:
      proc.send_signal(signal.SIGKILL)
    rc = _wait(proc, timeout)
    text = _log_text(log)
    if rc == -signal.SIGKILL:
      tally['killed'] += 1
      phase = _phase(text)
    elif rc == 0:
      tally['finished'] += 1
      phase = 'finished'
    else:
      tally['failed_runs'] += 1
      phase = 'failed'
      tally['problems'].append(f'trial {i}: the job failed (status {rc}): {text[-2000:]}')
    tally['phases'][phase] += 1
    try:
      snap = snapshot(out)
      problems = reference.problems(snap, before)
    except Exception as e:  # pylint: disable=broad-except  # unreadable output: a failure
      snap, problems = before, [f'an output could not be read back: {type(e).__name__}: {e}']
    tally['problems'] += [f'trial {i} (seed {s}, killed {phase}): {p}' for p in problems]
    say(
      f'trial {i}: seed={s} delay={delay:.2f}s -> {phase}; '
      f'{"consistent" if not problems else "; ".join(problems)}'
    )
    before = snap

  # A final uninterrupted run completes the version of its seed.
  s = SEEDS[trials % 2]
  proc = _start(out, s, log, cache, columns)
  rc = _wait(proc, timeout)
  final_problems = []
  if rc != 0:
    final_problems.append(f'final run failed (status {rc}): {_log_text(log)[-2000:]}')
  else:
    final = snapshot(out)
    final_problems += reference.problems(final, before)
    want = refs[SEEDS.index(s)]
    for kind in ('models', 'exports', 'reports'):
      if final[kind] != want[kind]:
        final_problems.append(f'final {kind} are not those of seed {s}')
    if {k: c['hash'] for k, c in final['cells'].items()} != {
      k: c['hash'] for k, c in want['cells'].items()
    }:
      final_problems.append(f'final cells are not those of seed {s}')
  tally['problems'] += final_problems
  tally['final_ok'] = not final_problems
  tally['phases'] = dict(tally['phases'])
  tally['seconds'] = time.perf_counter() - t_start
  tally['workdir'] = workdir
  tally['columns'] = len(columns)
  return tally


def format_tally(t: dict[str, Any]) -> str:
  phases = ', '.join(f'{k}: {v}' for k, v in sorted(t['phases'].items()))
  n_models = t['columns']
  n_cells = n_models * (len(METHODS) + 1)
  verdict = 'all consistent' if not t['problems'] else f'{len(t["problems"])} INCONSISTENT'
  return (
    f'fault injection: {t["trials"]} trials, {t["killed"]} SIGKILLed mid-run, '
    f'{t["finished"]} finished before the kill, {t["failed_runs"]} failed; kill points '
    f'({phases}); after every trial each of {n_cells} cells, {n_models} saved models, '
    f'{n_models} exports and reports was the old or the new complete version: '
    f'{verdict}; final run {"ok" if t["final_ok"] else "NOT ok"} '
    f'({t["seconds"]:.0f}s)'
  )


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument(
    '--trials', type=int, default=20, help=f'killed restarts (1..{MAX_TRIALS}; default 20)'
  )
  parser.add_argument('--seed', type=int, default=0, help='seed of the kill delays')
  parser.add_argument(
    '--workdir', default=None, help='directory for the runs (default: a new temporary one)'
  )
  parser.add_argument('--timeout', type=float, default=300.0, help='seconds per run (bound)')
  parser.add_argument(
    '--columns', default=','.join(COLUMNS), help="the job's columns (default %(default)s)"
  )
  parser.add_argument('--keep', action='store_true', help='keep the workdir')
  args = parser.parse_args(argv)
  columns = tuple(c.strip() for c in args.columns.split(',') if c.strip())
  tally = run_trials(args.trials, args.seed, args.workdir, args.timeout, columns=columns)
  for p in tally['problems']:
    print('PROBLEM:', p)
  print(format_tally(tally))
  if not args.keep and args.workdir is None:
    shutil.rmtree(tally['workdir'], ignore_errors=True)
  return 0 if not tally['problems'] and tally['final_ok'] else 1


if __name__ == '__main__':
  sys.exit(main())
