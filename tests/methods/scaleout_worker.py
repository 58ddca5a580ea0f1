"""Subprocess side of tests/methods/test_scaleout.py: ``methods.quantize`` run options.

Usage: ``python scaleout_worker.py MODE OUT.npz [CKPT_DIR]``; writes the quantized
models (flattened, see ``flatten``) and check results to OUT.npz.

* ``mesh``: 8 forced host CPU devices; the tiny model quantized without a mesh
  and over the 8 devices (the stack of 4 units padded to 8); the divisibility
  errors of ``pad=False`` and of a mesh without a 'stack' axis.
* ``multihost``: one of two processes (``JAX_COORDINATOR_ADDRESS``,
  ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` set): quantized with the stacks split
  over the processes, and sharded over the global mesh of both processes (2
  devices).
* ``checkpoint``: quantized layer by layer (two chunks, one stack each) with
  ``checkpoint_dir=CKPT_DIR``; with ``KILL_AT`` in the environment
  (``unit:step``) it SIGKILLs itself right after that step of that unit
  (checkpoints due by then are finalized); without, it also runs the same
  quantization without checkpoints (the uninterrupted reference).
"""

from __future__ import annotations

import os
import signal
import sys

if len(sys.argv) > 1 and sys.argv[1] == 'mesh':
  os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
  )

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from cafeq_jax import methods  # pylint: disable=g-import-not-at-top,wrong-import-position
from cafeq_jax import models  # pylint: disable=g-import-not-at-top,wrong-import-position
from cafeq_jax import quantizer  # pylint: disable=g-import-not-at-top,wrong-import-position
from cafeq_jax import recipes  # pylint: disable=g-import-not-at-top,wrong-import-position

# The cafeq-single preset (learned single transforms) with Hadamard init (per-unit
# keys) and column subsets (keep-best evaluation folded into the step) of gate and
# up: one stack of 4 units (2 layers x 2 matrices) of 64x128 (one shape: one compile).
RECIPE = recipes.get(
  'cafeq-single',
  spec=quantizer.QuantSpec(bits=3, group_size=32),
  matrices=('gate', 'up'),
  transform__block_size=32,
  transform__steps=6,
  transform__init='hadamard',
  transform__columns_per_step=32,
  transform__eval_every=2,
  transform__learning_rate=1e-2,
)
CHECKPOINT_EVERY = 2


def _leaf(state):
  """The first trainable leaf of a transform optimisation state (any parameterisation)."""
  return jax.tree.leaves(state.transform.trainable())[0]


def tiny_model(name: str = 'tiny_llama', seed: int = 0):
  """A preset with Laplace(0.02) host numpy weights (no Flax init to compile)."""
  cfg = models.get_config(name)
  shapes = jax.eval_shape(lambda: models.init_params(cfg, jax.random.PRNGKey(0)))
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda s: (0.02 * rng.laplace(size=s.shape)).astype(np.float32), shapes)
  return cfg, params


def flatten(tree, prefix: str = '') -> dict[str, np.ndarray]:
  """``{keystr(path): numpy leaf}`` of a (quantized) param tree."""
  return {
    prefix + jax.tree_util.keystr(p): np.asarray(x)
    for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def assert_same_flat(got: dict, ref: dict, atol: float) -> None:
  """Same keys, dtypes and shapes; integer leaves equal, float leaves within ``atol``."""
  assert sorted(got) == sorted(ref)
  for k, r in ref.items():
    g = got[k]
    assert g.dtype == r.dtype and g.shape == r.shape, k
    if r.dtype.kind in 'iub':
      np.testing.assert_array_equal(g, r, err_msg=k)
    else:
      np.testing.assert_allclose(g, r, rtol=0, atol=atol, err_msg=k)


def _error(fn) -> str:
  try:
    fn()
  except (ValueError, TypeError) as e:
    return str(e)
  return ''


def run_mesh(out: dict) -> None:
  from jax.sharding import Mesh  # pylint: disable=g-import-not-at-top

  from cafeq_jax.distributed import make_mesh  # pylint: disable=g-import-not-at-top

  cfg, params = tiny_model()
  out['device_count'] = jax.device_count()
  ref, _ = methods.quantize(params, cfg, RECIPE)
  out.update(flatten(ref, 'plain'))
  layouts = []

  def record(unit, step, state):
    if step == 1:
      layouts.append(
        f'{unit}:{_leaf(state).sharding.spec}:{_leaf(state).addressable_shards[0].data.shape[0]}'
      )

  mesh8 = make_mesh()
  q8, _ = methods.quantize(
    params, cfg, RECIPE, mesh=mesh8, run_options=methods.RunOptions(callback=record)
  )
  out.update(flatten(q8, 'mesh8'))
  out['layouts'] = np.array(layouts)
  out['err_unpadded'] = _error(
    lambda: methods.quantize(
      params, cfg, RECIPE, run_options=methods.RunOptions(mesh=mesh8, pad=False)
    )
  )
  out['err_axis'] = _error(
    lambda: methods.quantize(params, cfg, RECIPE, mesh=Mesh(np.asarray(jax.devices()), ('data',)))
  )


def run_multihost(out: dict) -> None:
  from cafeq_jax.distributed import make_mesh  # pylint: disable=g-import-not-at-top
  from cafeq_jax.distributed import multihost  # pylint: disable=g-import-not-at-top

  info = multihost.initialize_from_env(initialization_timeout=120)
  out['process_count'], out['process_index'] = info.process_count, info.process_index
  cfg, params = tiny_model()
  shares = []

  def record(unit, step, state):
    if step == 1:
      shares.append(f'{unit}:{_leaf(state).shape[0]}')

  split, _ = methods.quantize(params, cfg, RECIPE, run_options=methods.RunOptions(callback=record))
  out.update(flatten(split, 'split'))
  out['shares'] = np.array(shares)
  glob, _ = methods.quantize(params, cfg, RECIPE, mesh=make_mesh())
  out.update(flatten(glob, 'global'))
  if info.initialized:
    jax.distributed.shutdown()


def run_checkpoint(out: dict, ckpt_dir: str) -> None:
  cfg, params = tiny_model()
  kill = os.environ.get('KILL_AT')
  kill_unit, kill_step = kill.rsplit(':', 1) if kill else (None, '-1')
  kill_step = int(kill_step)
  seen = []

  def maybe_die(unit, step, state):
    del state
    seen.append(f'{unit}:{step}')
    if unit == kill_unit and step == kill_step:
      os.kill(os.getpid(), signal.SIGKILL)

  q, _ = methods.quantize(
    params,
    cfg,
    RECIPE,
    checkpoint_dir=ckpt_dir,
    checkpoint_every=CHECKPOINT_EVERY,
    layers_per_chunk=1,
    run_options=methods.RunOptions(callback=maybe_die),
  )
  out.update(flatten(q, 'resumed'))
  out['steps_seen'] = np.array(seen)
  ref, _ = methods.quantize(params, cfg, RECIPE, layers_per_chunk=1)
  out.update(flatten(ref, 'plain'))


def main(mode: str, out_path: str, ckpt_dir: str | None = None) -> None:
  out: dict = {}
  if mode == 'mesh':
    run_mesh(out)
  elif mode == 'multihost':
    run_multihost(out)
  elif mode == 'checkpoint':
    run_checkpoint(out, ckpt_dir)
  else:
    raise ValueError(f'unknown mode {mode!r}; expected mesh, multihost or checkpoint.')
  np.savez(out_path, **{k: np.asarray(v) for k, v in out.items()})


if __name__ == '__main__':
  main(*sys.argv[1:])
