"""Pallas kernels for serving weight-only quantized models (docs/method.md#kernels).

Motivation. Decoding is memory bound: at batch 1 a linear layer's time is the
time to read its weight. Reading packed int4 (int3) codes instead of bf16 moves
4x (5.33x) fewer bytes, but only if the weight is dequantised inside the matmul
kernel, on-chip, and never written back to HBM as bf16. ``quantized_matmul``
does that for the packed layouts of ``cafeq_jax.packing``; ``blockdiag_matmul``
applies the online transform ``x @ blockdiag(M^-1)``
(docs/method.md#single-matrix-transforms).

Terminology. A *block* is what a ``pl.BlockSpec`` maps to one program
(``block_shape``, e.g. the ``(bm, K)`` rows of ``x`` a GPU program owns); a
*tile* is the piece the kernel body multiplies in one step (``(bm, bk)`` of x,
``(bk, bn)`` packed codes, one quantization group when ``bk == group_size``). On
TPU blocks and tiles coincide (the grid iterates K); on GPU a block spans the K
range and the body loops over its tiles.

Layout (``cafeq_jax.packing``). Weights are ``W: (K, N) = (d_in, d_out)``, codes
stored unsigned ``u = q - qmin`` in "planar" uint8 along N: with ``P`` codes per
unit (int4: 2, int3: 8), ``Np = ceil(N / P)``, int4 ``data (K, Np)`` byte
``u[k, c] | u[k, c + Np] << 4``; int3 ``data (3, K, Np)`` bytes of the 24-bit
word holding ``u[k, c + i Np]`` in bits ``3i..3i+2``. A tile of packed columns
``[c0, c0 + bn)`` therefore produces outputs for columns ``i Np + c`` of every
plane ``i``: an ``(M, P, Np)`` output that is a free reshape of ``(M, N)``.
Scales/zeros ``(K // g, N)`` are viewed as ``(K // g, P, Np)`` (free reshape
when ``P`` divides ``N``).

Backends. ``quantized_matmul`` picks the Triton (GPU) or Mosaic (TPU) variant by
``jax.default_backend()`` and runs in interpret mode on CPU; unsupported cases
(``can_use_quantized_matmul``) fall back to the jnp reference with a warning.
"""

from kernels_pallas.blockdiag import blockdiag_matmul
from kernels_pallas.blockdiag import blockdiag_overhead_ratio
from kernels_pallas.blockdiag import can_use_blockdiag_matmul
from kernels_pallas.matmul import QuantizedMatmulConfig
from kernels_pallas.matmul import can_use_quantized_matmul
from kernels_pallas.matmul import quantized_matmul
from kernels_pallas.reference import blockdiag_matmul_reference
from kernels_pallas.reference import quantized_matmul_reference

__all__ = [
  'blockdiag_matmul',
  'blockdiag_matmul_reference',
  'blockdiag_overhead_ratio',
  'can_use_blockdiag_matmul',
  'can_use_quantized_matmul',
  'QuantizedMatmulConfig',
  'quantized_matmul',
  'quantized_matmul_reference',
]
