"""``methods.quantize`` run options: mesh, processes, checkpoints give the same model.

The multi-device and multi-process checks run ``scaleout_worker.py`` in
subprocesses (8 forced host CPU devices; two ``jax.distributed`` processes; a
run SIGKILLed mid-optimisation and restarted), so this process keeps one device.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import signal
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cafeq_jax import checkpointing
from cafeq_jax import methods
from cafeq_jax import models
from cafeq_jax import quantizer
from cafeq_jax import recipes
from cafeq_jax.distributed import make_mesh

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
WORKER = os.path.join(HERE, 'scaleout_worker.py')
sys.path.insert(0, HERE)
import scaleout_worker as worker  # pylint: disable=g-import-not-at-top,wrong-import-position

# Learned transforms agree to float32 rounding across stack layouts (XLA fuses
# the reductions of a per-device batch differently); codes exactly.
ATOL = 1e-5


def _env(**extra):
  env = {k: v for k, v in os.environ.items() if not k.startswith(('JAX_', 'XLA_', 'CAFEQ_'))}
  env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
  env['JAX_PLATFORMS'] = 'cpu'
  env.update(extra)
  return env


def _start(mode, out, *args, **env):
  return subprocess.Popen(
    [sys.executable, WORKER, mode, str(out), *map(str, args)],
    env=_env(**env),
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def _finish(proc, timeout=400):
  try:
    log = proc.communicate(timeout=timeout)[0]
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  return proc.returncode, log


def _model_leaves(npz, prefix: str) -> dict[str, np.ndarray]:
  return {k[len(prefix) :]: npz[k] for k in npz.files if k.startswith(prefix + '[')}


def _assert_same_model(got: dict, ref: dict, atol: float = ATOL):
  quantized = [k for k in ref if '.weight.codes' in k]
  assert len(quantized) == 2  # gating_einsum (gate and up) of both layers
  worker.assert_same_flat(got, ref, atol)


def test_quantize_over_a_mesh_matches_the_single_device_run(tmp_path):
  code, log = _finish(_start('mesh', tmp_path / 'mesh.npz'))
  assert code == 0, log[-4000:]
  r = np.load(tmp_path / 'mesh.npz')
  assert int(r['device_count']) == 8
  # The stack of 4 units laid out along the mesh axis, padded to one per device.
  assert r['layouts'].tolist() == ["single_1x64x128:P('stack',):1"]
  _assert_same_model(_model_leaves(r, 'mesh8'), _model_leaves(r, 'plain'))
  # pad=False: a stack that does not divide the mesh is refused before any work.
  err = str(r['err_unpadded'])
  assert 'stack (4, 1, 64, 128)' in err and "8 devices of mesh axis 'stack'" in err, err
  assert "expected an axis named 'stack'" in str(r['err_axis'])


@pytest.mark.parametrize(
  'change, match',
  [
    (
      {'spec.group_size': 128},
      r'd_in=64 of stack \(2, 64, 128\) is not '
      r'divisible by group_size=128',
    ),
    ({'transform.block_size': 48, 'transform.init': 'identity'}, 'not divisible by block_size=48'),
  ],
)
def test_mesh_with_groups_or_blocks_not_dividing_d_in_fails_up_front(change, match):
  cfg, params = worker.tiny_model()
  recipe = recipes.override(worker.RECIPE, change)
  with pytest.raises(ValueError, match=match):
    methods.quantize(params, cfg, recipe, mesh=make_mesh(devices=jax.devices()[:1]))


def test_mesh_validation_uses_the_group_size_after_fallback():
  opts = methods.RunOptions(mesh=make_mesh(devices=jax.devices()[:1]))
  spec = quantizer.QuantSpec(bits=3, group_size=128, group_fallback=True)
  opts.validate([(2, 1, 64, 128)], spec, 32)  # g64 is used for d_in=64: fine
  with pytest.raises(ValueError, match='group_size=128'):
    opts.validate([(2, 1, 64, 128)], dataclasses.replace(spec, group_fallback=False), 32)


def test_run_options_reject_bad_values_and_unsupported_combinations():
  cfg, params = worker.tiny_model()
  with pytest.raises(TypeError, match='jax.sharding.Mesh'):
    methods.RunOptions(mesh=jax.devices())
  with pytest.raises(ValueError, match='checkpoint_every=0'):
    methods.RunOptions(checkpoint_every=0)
  with pytest.raises(ValueError, match='layers_per_chunk=0'):
    methods.quantize(params, cfg, worker.RECIPE, layers_per_chunk=0)
  with pytest.raises(ValueError, match=r"recipe 'gptq' \(calibration GPTQ\) takes no run options"):
    methods.quantize(
      params, cfg, recipes.get('gptq'), mesh=make_mesh(), calib_tokens=np.zeros((1, 8), np.int32)
    )
  with pytest.raises(ValueError, match='does not support pair transforms'):
    methods.quantize(
      params, cfg, worker.RECIPE.replace(pairs=recipes.PairTransforms()), layers_per_chunk=1
    )
  with pytest.raises(ValueError, match='does not support SelfGenerated statistics'):
    methods.quantize(params, cfg, recipes.get('cafeq-sg'), layers_per_chunk=1)


def test_checkpoint_of_other_inputs_is_refused(tmp_path):
  opts = methods.RunOptions(checkpoint_dir=str(tmp_path), checkpoint_every=1)
  step = jax.jit(lambda s, w: {'x': s['x'] + w, 'step': s['step'] + 1})
  state = {'x': jnp.zeros((2, 3)), 'step': jnp.zeros((), jnp.int32)}
  w = jnp.ones((2, 3))
  out = opts.loop('unit', {'steps': 2})(step, state, 2, args=(w,))
  np.testing.assert_array_equal(out['x'], 2 * np.ones((2, 3)))
  assert checkpointing.finalized_steps(tmp_path / 'unit') == [1, 2]
  again = opts.loop('unit', {'steps': 2})(step, state, 2, args=(w,))  # resumes at the end
  np.testing.assert_array_equal(again['x'], out['x'])
  with pytest.raises(checkpointing.CheckpointError, match=r"other inputs \(differing: \['steps'\]"):
    opts.loop('unit', {'steps': 3})


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def test_two_processes_quantize_the_same_model_as_one(tmp_path):
  port = _free_port()
  procs = [
    _start(
      'multihost',
      tmp_path / f'p{pid}.npz',
      JAX_COORDINATOR_ADDRESS=f'localhost:{port}',
      JAX_NUM_PROCESSES='2',
      JAX_PROCESS_ID=str(pid),
    )
    for pid in range(2)
  ]
  try:
    cfg, params = worker.tiny_model()  # the single-process reference, meanwhile
    ref = worker.flatten(methods.quantize(params, cfg, worker.RECIPE)[0])
  finally:
    results = [_finish(p) for p in procs]
  for code, log in results:
    assert code == 0, log[-4000:]
  for pid in range(2):
    r = np.load(tmp_path / f'p{pid}.npz')
    assert (int(r['process_count']), int(r['process_index'])) == (2, pid)
    # Each process optimised its share: 2 of the 4 gate/up units.
    assert r['shares'].tolist() == ['single_1x64x128:2']
    _assert_same_model(_model_leaves(r, 'split'), ref)
    _assert_same_model(_model_leaves(r, 'global'), ref)


def test_sigkilled_quantize_resumes_to_the_uninterrupted_model(tmp_path):
  # Layer by layer (two chunks of one layer, one stack of gate+up each),
  # checkpoints every 2 of 6 steps; killed after step 3 of the second chunk.
  ckpt = tmp_path / 'ckpt'
  first, second = (f'layers_{i:04d}-{i:04d}/single_1x64x128' for i in (0, 1))
  code, log = _finish(_start('checkpoint', tmp_path / 'never.npz', ckpt, KILL_AT=f'{second}:3'))
  assert code == -signal.SIGKILL, log[-4000:]
  assert not (tmp_path / 'never.npz').exists()
  assert checkpointing.finalized_steps(ckpt / first) == [4, 6]  # done (2 kept)
  assert checkpointing.finalized_steps(ckpt / second) == [2]

  code, log = _finish(_start('checkpoint', tmp_path / 'resumed.npz', ckpt))
  assert code == 0, log[-4000:]
  r = np.load(tmp_path / 'resumed.npz')
  # Nothing of the first chunk was redone; the second resumed after step 2.
  assert r['steps_seen'].tolist() == [f'{second}:{i}' for i in (3, 4, 5, 6)]
  assert checkpointing.finalized_steps(ckpt / second) == [4, 6]
  _assert_same_model(_model_leaves(r, 'resumed'), _model_leaves(r, 'plain'), atol=0)


def _laplace_llama(num_layers: int, seed: int):
  """``tiny_llama`` with ``num_layers`` layers and heavy-tailed weights: ``(cfg, params)``."""
  cfg = dataclasses.replace(models.get_config('tiny_llama'), num_layers=num_layers)
  shapes = jax.eval_shape(lambda: models.init_params(cfg, jax.random.PRNGKey(0)))
  rng = np.random.default_rng(seed)
  return cfg, jax.tree.map(lambda s: (0.02 * rng.laplace(size=s.shape)).astype(np.float32), shapes)


def _small_cafeq(matrices, *, steps: int, num_seqs: int, seq_len: int) -> recipes.Recipe:
  """``cafeq`` at w3 g32 on ``matrices``, with a few steps on every column and a few
  short self-generated sequences."""
  small = {
    'matrices': matrices,
    'transform.block_size': 32,
    'transform.steps': steps,
    'transform.columns_per_step': None,
    'statistics.num_seqs': num_seqs,
    'statistics.seq_len': seq_len,
  }
  return recipes.override(recipes.get('cafeq', bits=3, group_size=32), small)


@pytest.mark.parametrize('share', [False, True])
def test_stacks_in_chunks_on_threads_give_the_whole_stacks_model(share):
  """``RunOptions.stack_chunk`` / ``threads``: a stack optimised as chunks (even and
  uneven, on one thread and side by side on three) gives the whole stack's codes,
  scales and transform losses bit for bit; with ``share`` a unit holds two matrices."""
  cfg, params = _laplace_llama(num_layers=5, seed=3)
  # Two stacks of other lengths each way: unshared, q and o (one shape) make a stack of
  # 10 units beside down's 5; shared, k+v and gate+up units make two stacks of 5.
  matrices = ('k', 'v', 'gate', 'up') if share else ('q', 'o', 'down')
  recipe = recipes.override(worker.RECIPE, {'matrices': matrices, 'transform.share': share})
  whole_opts = methods.RunOptions(stack_chunk=10**6, threads=1)
  assert whole_opts.chunks(10) == [(0, 10)]
  whole, whole_report = methods.quantize(params, cfg, recipe, run_options=whole_opts)
  ref = worker.flatten(whole)
  for chunk, threads in ((2, 1), (3, 3)):
    opts = methods.RunOptions(stack_chunk=chunk, threads=threads)
    q, report = methods.quantize(params, cfg, recipe, run_options=opts)
    got = worker.flatten(q)
    assert got.keys() == ref.keys()
    for k in ref:
      np.testing.assert_array_equal(got[k], ref[k], err_msg=f'{k} chunk={chunk}')
    assert report.per_matrix == whole_report.per_matrix


def test_sequential_rounding_takes_each_layers_transforms_as_they_come(monkeypatch):
  """``cafeq`` (learned transforms, then self-generated sequential rounding): the chunks
  run in layer order from threads while the tokens are sampled and the layers rounded,
  each layer's rounding waiting only for its own transforms; the model is the one of
  whole stacks learned first on one thread, bit for bit."""
  from cafeq_jax.methods import single  # pylint: disable=g-import-not-at-top

  cfg, params = _laplace_llama(num_layers=4, seed=5)
  recipe = _small_cafeq(('k', 'v', 'down'), steps=4, num_seqs=4, seq_len=12)
  whole, whole_report = methods.quantize(
    params, cfg, recipe, run_options=methods.RunOptions(stack_chunk=10**6, threads=1)
  )
  started, looked_up = [], []
  real_run, real_get = single.optimize.run, single.PendingTransforms.__getitem__
  monkeypatch.setattr(
    single.optimize, 'run', lambda w, *a, **k: started.append(w.shape[0]) or real_run(w, *a, **k)
  )
  monkeypatch.setattr(
    single.PendingTransforms,
    '__getitem__',
    lambda self, key: looked_up.append(key) or real_get(self, key),
  )
  q, report = methods.quantize(
    params, cfg, recipe, run_options=methods.RunOptions(stack_chunk=2, threads=2)
  )
  ref, got = worker.flatten(whole), worker.flatten(q)
  assert got.keys() == ref.keys()
  for k in ref:
    np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
  assert report.per_matrix == whole_report.per_matrix
  assert started == [2] * 4  # k+v and down, 2 chunks each
  assert [l for l, _ in looked_up] == sorted(l for l, _ in looked_up)  # layer by layer
  assert {'selfgen', 'transforms', 'rounding'} <= set(report.timings)


def test_sequential_rounding_gets_the_chunks_in_the_order_it_asks_for_them(monkeypatch):
  """``by_layer``: after every stack's first chunk, the chunks start by the first layer
  of their units, then by matrix, whatever their place in the stack. q and o (one
  shape) make one stack, q of every layer before o of any: o of layers 0-1 must still
  come before q of layers 2-3, or rounding layer 0 waits for every q."""
  from cafeq_jax.methods import single  # pylint: disable=g-import-not-at-top

  cfg, params = _laplace_llama(num_layers=4, seed=6)
  recipe = _small_cafeq(('q', 'o', 'down'), steps=2, num_seqs=2, seq_len=8)
  started = []
  real_one = single._StackPool._one  # pylint: disable=protected-access

  def one(self, job, a, b):
    started.append(tuple((names[0], layer) for names, layer in job.units[a:b]))
    return real_one(self, job, a, b)

  monkeypatch.setattr(single._StackPool, '_one', one)  # pylint: disable=protected-access
  opts = methods.RunOptions(stack_chunk=2, threads=1)  # one pool thread: starts in order
  methods.quantize(params, cfg, recipe, run_options=opts)
  assert started == [
    (('q', 0), ('q', 1)),  # the first chunk of each stack (q+o, down) ...
    (('down', 0), ('down', 1)),
    (('o', 0), ('o', 1)),  # ... then as the rounding needs them
    (('q', 2), ('q', 3)),
    (('o', 2), ('o', 3)),
    (('down', 2), ('down', 3)),
  ]


def test_chunks_follow_the_backend_and_the_loop():
  opts = methods.RunOptions()
  if jax.default_backend() == 'cpu':
    assert opts.chunks(6) == [(0, 2), (2, 4), (4, 6)]
  assert methods.RunOptions(stack_chunk=2).chunks(5) == [(0, 2), (2, 5)]  # no chunk of 1
  assert methods.RunOptions(stack_chunk=3).chunks(8) == [(0, 3), (3, 6), (6, 8)]
  assert methods.RunOptions(stack_chunk=2).chunks(1) == [(0, 1)]
  mesh = make_mesh(devices=jax.devices()[:1])
  assert methods.RunOptions(mesh=mesh, stack_chunk=2).chunks(5) == [(0, 5)]
  assert methods.RunOptions(threads=4).num_threads(2) == 2
  for field, bad in (('stack_chunk', 1), ('stack_chunk', True), ('threads', 0), ('threads', 1.5)):
    with pytest.raises(ValueError, match=f'{field}='):
      methods.RunOptions(**{field: bad})


@pytest.mark.parametrize('fails_while_queueing', [False, True])
@pytest.mark.parametrize('sequential', [False, True])
def test_a_failing_chunk_stops_the_chunks_not_started(
  monkeypatch, sequential, fails_while_queueing
):
  """An error in one chunk (a killed step, bad input found late) stops the chunks still
  queued at once, and surfaces where the result is asked for: at once, or (``cafeq``,
  ``sequential``) after the sampling, where the rounding asks for that layer's
  transforms. ``fails_while_queueing``: the first chunk fails before the others are
  queued (the pool is then shut down under the queueing loop), which a busy machine
  can give by chance."""
  from cafeq_jax.core import optimize  # pylint: disable=g-import-not-at-top

  cfg = dataclasses.replace(models.get_config('tiny_llama'), num_layers=8)
  shapes = jax.eval_shape(lambda: models.init_params(cfg, jax.random.PRNGKey(0)))
  params = jax.tree.map(lambda s: np.full(s.shape, 0.01, np.float32), shapes)
  calls = []
  real = optimize.run

  def failing(w, *args, **kwargs):
    calls.append(w.shape[0])
    if len(calls) == 1:
      raise RuntimeError('chunk failed')
    return real(w, *args, **kwargs)

  monkeypatch.setattr(optimize, 'run', failing)
  if fails_while_queueing:
    submit = concurrent.futures.ThreadPoolExecutor.submit
    submitted = []

    def submit_then_wait_for_the_first(pool, *args, **kwargs):
      submitted.append(submit(pool, *args, **kwargs))
      if len(submitted) == 1:
        concurrent.futures.wait(submitted)
      return submitted[-1]

    monkeypatch.setattr(
      concurrent.futures.ThreadPoolExecutor, 'submit', submit_then_wait_for_the_first
    )
  opts = methods.RunOptions(stack_chunk=2, threads=1)
  recipe = recipes.override(worker.RECIPE, {'matrices': ('down',)})
  if sequential:
    cafeq = recipes.get('cafeq', spec=recipe.spec, matrices=('down',))
    recipe = recipes.override(
      dataclasses.replace(cafeq, transform=recipe.transform),
      {'statistics.num_seqs': 2, 'statistics.seq_len': 8},
    )
  with pytest.raises(RuntimeError, match='chunk failed'):
    methods.quantize(params, cfg, recipe, run_options=opts)
  assert len(calls) < len(opts.chunks(cfg.num_layers))
