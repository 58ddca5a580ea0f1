"""Which ``QuantSpec`` each matrix gets: one for all, or one per (layer, matrix).

A recipe's ``spec`` is a ``QuantSpec`` (every matrix alike) or a ``SpecMap``: a
default plus per-matrix entries, as llama.cpp's named mixes assign block types
(``cafeq_jax.ggml.mixes``: e.g. ``Q3_K_S`` stores ``ffn_down`` as Q3_K and the
rest as Q4_0). Methods ask ``resolve(spec, layer, name)`` for each matrix and
batch matrices that resolve alike.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping

from cafeq_jax import quantizer

Key = tuple[int, str]  # (layer, matrix name)


@dataclasses.dataclass(frozen=True)
class SpecMap:
  """A ``QuantSpec`` per (layer, matrix).

  Attributes:
    name: a label for reports and result tables (e.g. 'gguf-Q3_K_S').
    default: the spec of matrices without an entry.
    entries: ``((layer, name), spec)`` pairs, sorted.
  """

  name: str
  default: quantizer.QuantSpec
  entries: tuple[tuple[Key, quantizer.QuantSpec], ...] = ()

  def __post_init__(self):
    if not isinstance(self.default, quantizer.QuantSpec):
      raise TypeError(f'SpecMap.default must be a QuantSpec; got {self.default!r}.')
    items = {tuple(k): s for k, s in self.entries}  # lists from to_dict / from_dict
    entries = tuple(sorted(items.items(), key=lambda kv: kv[0]))
    for k, s in entries:
      if not isinstance(s, quantizer.QuantSpec):
        raise TypeError(f'SpecMap entry {k} must be a QuantSpec; got {s!r}.')
    object.__setattr__(self, 'entries', entries)

  @classmethod
  def from_dict(cls, name: str, specs: Mapping[Key, quantizer.QuantSpec]) -> SpecMap:
    """The map of ``specs``; its most common spec becomes the default."""
    counts: dict = {}
    for s in specs.values():
      counts[s] = counts.get(s, 0) + 1
    default = max(counts, key=lambda s: (counts[s], s.name))
    return cls(name, default, tuple((k, s) for k, s in specs.items() if s != default))

  @functools.cached_property
  def _lookup(self) -> dict[Key, quantizer.QuantSpec]:
    return dict(self.entries)

  def for_matrix(self, layer: int, name: str) -> quantizer.QuantSpec:
    return self._lookup.get((layer, name), self.default)

  def shifted(self, offset: int) -> SpecMap:
    """The map seen from a chunk of layers starting at ``offset`` (layer ``l`` of
    the chunk is layer ``l + offset`` of the model)."""
    if not offset:
      return self
    return SpecMap(
      self.name,
      self.default,
      tuple(((l - offset, n), s) for (l, n), s in self.entries if l >= offset),
    )

  def specs(self) -> tuple[quantizer.QuantSpec, ...]:
    """The distinct specs, default first."""
    out = [self.default]
    for _, s in self.entries:
      if s not in out:
        out.append(s)
    return tuple(out)


Spec = quantizer.QuantSpec | SpecMap


def resolve(spec: Spec, layer: int, name: str) -> quantizer.QuantSpec:
  """The ``QuantSpec`` of matrix ``name`` of ``layer``."""
  return spec.for_matrix(layer, name) if isinstance(spec, SpecMap) else spec


def distinct(spec: Spec) -> tuple[quantizer.QuantSpec, ...]:
  """Every ``QuantSpec`` that ``spec`` can resolve to."""
  return spec.specs() if isinstance(spec, SpecMap) else (spec,)


def by_spec(spec: Spec, name: str, layers) -> dict[quantizer.QuantSpec, list[int]]:
  """``layers`` of matrix ``name`` grouped by their spec (order kept)."""
  out: dict[quantizer.QuantSpec, list[int]] = {}
  for l in layers:
    out.setdefault(resolve(spec, l, name), []).append(l)
  return out
