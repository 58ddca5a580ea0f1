"""XLA:CPU compile options for the optimisers' hot loops, and ``hot_jit`` to apply them.

jaxlib 0.10's XLA:CPU hands chains of reductions and elementwise ops to YNNPACK
fusions. On the quantizer's per-group reductions (min / max over ``g`` rows of a
``(..., G, g, N)`` view, and their gradients) those ran about 2.5x slower than
XLA's own loop fusions on a 2-core Xeon (the straight-through quantizer's
gradient on a ``(60, 576, 256)`` stack: 142 ms vs 54 ms), and a single-transform
step about 1.4x slower end to end. ``hot_jit`` compiles the transform and pair
optimisers' steps without them; the arithmetic is XLA's either way (the
tiny-model preset codes are the same with and without).

The options are passed per jit (``jax.jit(compiler_options=...)``), never through
``XLA_FLAGS``: nothing else in the process changes, and a jaxlib that does not
know an option (it raises when compiling) just runs without it.
"""

from __future__ import annotations

import functools
import threading
from typing import Any
from typing import Callable

import jax
import jax.numpy as jnp

OPTIONS = {'xla_cpu_experimental_ynn_fusion_type': ''}  # '': no YNNPACK fusion type


@functools.cache
def options() -> dict[str, Any]:
  """``OPTIONS`` on a CPU backend whose XLA accepts them, else ``{}`` (decided once,
  at the first call: the backend must be initialised by then)."""
  if jax.default_backend() != 'cpu':
    return {}
  try:
    jax.jit(lambda x: x + 1, compiler_options=OPTIONS).lower(jnp.zeros(())).compile()
  except Exception:  # pylint: disable=broad-except (an XLA without the option)
    return {}
  return dict(OPTIONS)


def hot_jit(fn: Callable, **jit_kwargs) -> Callable:
  """``jax.jit(fn, **jit_kwargs)``, compiled with ``options()`` when called at top level.

  The jit is made at the first call, not at import: ``options()`` needs the
  backend, which must not be initialised at import (``jax.distributed`` has to
  come first on multi-host runs). Called under another transformation (a caller's
  jit, ``lax.cond``, ``shard_map``), ``fn`` is the plain ``jax.jit``: JAX takes
  compile options at the top level only, so there the outer jit's apply.
  """
  jitted: dict[bool, Callable] = {}
  lock = threading.Lock()  # one jit per kind, also when threads call first together

  @functools.wraps(fn)
  def call(*args, **kwargs):
    nested = any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((args, kwargs)))
    if nested not in jitted:
      with lock:
        if nested not in jitted:
          opts = None if nested else (options() or None)
          jitted[nested] = jax.jit(fn, compiler_options=opts, **jit_kwargs)
    return jitted[nested](*args, **kwargs)

  return call
