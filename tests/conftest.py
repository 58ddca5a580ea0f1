"""Test-session setup shared by every test module."""

import os
import platform
import shutil
import tempfile

# jaxlib runs its CPU LAPACK calls (the Cholesky of GPTQ-form rounding) through
# scipy's OpenBLAS, which picks its kernels by CPU family: Intel AVX-512 and AMD
# AVX2 kernels round a few sums differently, enough to flip a tied GPTQ code. One
# kernel family on every x86-64 machine (any with AVX2) keeps the regression record
# of quantized codes (tests/methods/data/preset_codes.json) machine-independent.
# OpenBLAS reads this when it loads, so it is set before anything imports jax.
if platform.machine().lower() in ('x86_64', 'amd64'):
  os.environ.setdefault('OPENBLAS_CORETYPE', 'Haswell')

# One persistent XLA compilation cache for the whole test session, shared by the
# pytest-xdist workers and every subprocess the tests start (they inherit the
# environment): much of the suite's time is compiling the same small programs again in
# another worker, process or notebook kernel. The executables are XLA's own, only not
# rebuilt, so no result changes. Made by the first process (the xdist controller, or
# the only one), removed when it ends; a directory the caller set is left alone.
_OWN_CACHE = None
if 'PYTEST_XDIST_WORKER' not in os.environ and 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _OWN_CACHE = tempfile.mkdtemp(prefix='cafeq-jax-test-xla-cache-')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _OWN_CACHE
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')


def pytest_unconfigure(config):
  del config
  if _OWN_CACHE is not None:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)
