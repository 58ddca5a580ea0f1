"""Test-session setup shared by every test module."""

import os
import platform

# jaxlib runs its CPU LAPACK calls (the Cholesky of GPTQ-form rounding) through
# scipy's OpenBLAS, which picks its kernels by CPU family: Intel AVX-512 and AMD
# AVX2 kernels round a few sums differently, enough to flip a tied GPTQ code. One
# kernel family on every x86-64 machine (any with AVX2) keeps the regression record
# of quantized codes (tests/methods/data/preset_codes.json) machine-independent.
# OpenBLAS reads this when it loads, so it is set before anything imports jax.
if platform.machine().lower() in ('x86_64', 'amd64'):
  os.environ.setdefault('OPENBLAS_CORETYPE', 'Haswell')
