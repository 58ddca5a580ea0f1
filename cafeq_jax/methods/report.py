"""Per-matrix proxy-loss report of a quantization run."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class QuantReport:
  """What a method did, measured by the data-free proxy (docs/method.md#the-data-free-proxy-loss).

  Attributes:
    method: the method's name.
    spec: the quantizer's short name (e.g. 'w3g128asym').
    per_matrix: ``(layer, name) -> {'rtn': ||W - RTN(W)||², 'final': ||W' - Ŵ||²,
      ...}`` with ``W`` the original fp matrix and ``W'`` the matrix the
      quantized one approximates (``W`` itself unless pair transforms were
      folded into it). Learned transforms also record 'init' (loss at the
      transform's initialisation).
    timings: seconds per phase ('total', 'transforms', 'rounding', ...); phases that
      overlap (a sequential rounding beside the transforms) sum to more than 'total'.
    extra: method-specific results (pair report, online overhead, ...).
  """

  method: str
  spec: str
  per_matrix: dict[tuple[int, str], dict[str, float]] = dataclasses.field(default_factory=dict)
  timings: dict[str, float] = dataclasses.field(default_factory=dict)
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)

  def total(self, key: str = 'final') -> float:
    """Sum over matrices of one loss."""
    return float(sum(v[key] for v in self.per_matrix.values() if key in v))

  def by_name(self) -> dict[str, dict[str, float]]:
    """Losses summed over layers, per matrix name."""
    out: dict[str, dict[str, float]] = {}
    for (_, name), losses in sorted(self.per_matrix.items()):
      acc = out.setdefault(name, {})
      for k, v in losses.items():
        acc[k] = acc.get(k, 0.0) + float(v)
    return out

  def summary(self) -> str:
    """A small text table: per matrix name, RTN and final proxy and their ratio."""
    lines = [
      f'{self.method} {self.spec}: proxy ||W - Ŵ||² summed over layers',
      f'{"matrix":>8} {"rtn":>12} {"final":>12} {"final/rtn":>10}',
    ]
    for name, v in self.by_name().items():
      ratio = v['final'] / v['rtn'] if v.get('rtn') else float('nan')
      lines.append(f'{name:>8} {v["rtn"]:12.5g} {v["final"]:12.5g} {ratio:10.3f}')
    rtn, fin = self.total('rtn'), self.total('final')
    lines.append(f'{"total":>8} {rtn:12.5g} {fin:12.5g} {fin / rtn if rtn else float("nan"):10.3f}')
    if self.timings:
      lines.append('time: ' + ', '.join(f'{k} {v:.1f}s' for k, v in self.timings.items()))
    return '\n'.join(lines)

  def to_dict(self) -> dict[str, Any]:
    """JSON-friendly dict (matrix keys as 'layer_{i}/{name}')."""
    return {
      'method': self.method,
      'spec': self.spec,
      'per_matrix': {f'layer_{l}/{n}': dict(v) for (l, n), v in sorted(self.per_matrix.items())},
      'by_name': self.by_name(),
      'total_rtn': self.total('rtn'),
      'total_final': self.total('final'),
      'timings': dict(self.timings),
      'extra': _jsonable(self.extra),
    }


def _jsonable(x):
  if isinstance(x, dict):
    return {
      str(k) if not isinstance(k, tuple) else '/'.join(map(str, k)): _jsonable(v)
      for k, v in x.items()
    }
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if hasattr(x, 'to_dict'):
    return _jsonable(x.to_dict())
  if hasattr(x, 'tolist'):
    return x.tolist()
  if isinstance(x, (str, int, float, bool)) or x is None:
    return x
  return repr(x)
