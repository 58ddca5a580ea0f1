"""Plots of a quantization job's outputs (``experiments.quantize``).

``write_all(results, output_dir)`` reads ``results`` (the job's ``results.json``)
and the per-method proxy-loss reports ``output_dir/reports/<column>_<method>.json``
(``QuantReport.to_dict()``) and writes PNGs to ``output_dir/plots/``:

  proxy_<column>.png   per matrix name (q, k, v, o, gate, up, down): the proxy
                       loss ratio final / RTN per layer, one line per method
                       (below 1 = better than round-to-nearest), and a last
                       panel with the ratio summed over layers.
  proxy_loss_<column>.png  the absolute proxy ``||W - Ŵ||²`` per layer (log
                       scale when it spans a decade), a line per method, RTN
                       without transform dashed.
  ppl_vs_bits.png      perplexity and KL divergence against bits per weight of
                       the quantized linears (packed codes + bf16 scales/zeros +
                       online transforms; the top axis gives their megabytes on
                       disk); fp is drawn at 16 bits.

A method keeps its color in every figure. Missing or partial inputs (a run still
going, a column without reports) are skipped, never an error.

Figures are built with the object-oriented ``matplotlib.figure.Figure`` (Agg
canvas): no pyplot state, safe in threads and notebooks.

    python -m experiments.plots --config.output_dir=outputs/quantize   # redraw from disk

(options: experiments/configs/plots.py).
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
from typing import Any
from typing import Iterable
from typing import Mapping

from absl import app
from absl import logging
import matplotlib
from matplotlib import figure as mpl_figure
from matplotlib import ticker
from matplotlib.backends import backend_agg
from ml_collections import config_flags

# Matrix names in model order; others (if any) follow alphabetically.
_MATRIX_ORDER = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')
_MARKERS = ('o', 's', '^', 'D', 'v', 'P', 'X', '*', '<', '>')
_BIT_TICKS = (1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32)
_COLUMN_FAMILY = re.compile(r'^w\d+')  # 'w3g128asym' -> family 'g128asym'
_KEY = re.compile(r'^layer_(\d+)/(.+)$')

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), 'configs', 'plots.py')
_CONFIG = None  # the --config flag, defined only when run as a program (see bottom)


def _new_figure(width: float, height: float) -> mpl_figure.Figure:
  fig = mpl_figure.Figure(figsize=(width, height), dpi=110, layout='constrained')
  backend_agg.FigureCanvasAgg(fig)
  return fig


def _save(fig: mpl_figure.Figure, path: str) -> str:
  tmp = path + '.tmp.png'
  fig.savefig(tmp, dpi=110)
  os.replace(tmp, path)
  return path


def _colors(methods: Iterable[str], given: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """A tab10 color per method; ``given`` colors win (same method, same color)."""
  cmap = matplotlib.colormaps['tab10']
  out = {m: cmap(i % 10) for i, m in enumerate(methods)}
  out.update({m: c for m, c in (given or {}).items() if m in out})
  return out


def method_colors(results: Mapping[str, Any]) -> dict[str, Any]:
  """One color per method of ``results`` (order of first appearance, fp excluded)."""
  methods = dict.fromkeys(
    m for c in results.get('columns', {}).values() for m in c.get('methods', {}) if m != 'fp'
  )
  return _colors(methods)


def _finite(x: Any) -> bool:
  return isinstance(x, (int, float)) and math.isfinite(x)


def _fmt(v, _=None) -> str:
  return f'{v:.3g}'


class _PlainFormatter(ticker.Formatter):
  """Decimal tick labels with just enough digits for the axis range (no offset or
  '1e-7' multiplier text, which would collide with a top axis)."""

  def __call__(self, x, pos=None):
    lo, hi = self.axis.get_view_interval()
    span = abs(hi - lo) or abs(hi) or 1.0
    scale = max(abs(lo), abs(hi), 1e-300)
    digits = max(2, int(math.ceil(math.log10(scale / span))) + 2)
    return f'{x:.{min(digits, 12)}g}'


def _auto_log(ax, values: Iterable[float], axis: str = 'y', min_ratio: float = 10.0) -> None:
  """Log scale (plain decimal tick labels) when the positive ``values`` span more
  than ``min_ratio``; linear otherwise."""
  vals = [v for v in values if _finite(v) and v > 0]
  log = bool(vals) and max(vals) / min(vals) > min_ratio
  a = ax.yaxis if axis == 'y' else ax.xaxis
  if log:
    (ax.set_yscale if axis == 'y' else ax.set_xscale)('log')
    if max(vals) / min(vals) < 1e3:  # a few decades: label 1, 2, 5 of each
      a.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    a.set_major_formatter(ticker.FuncFormatter(_fmt))
    a.set_minor_formatter(ticker.NullFormatter())
  else:
    a.set_major_formatter(_PlainFormatter())


def _matrix_names(names: Iterable[str]) -> list[str]:
  names = set(names)
  return [n for n in _MATRIX_ORDER if n in names] + sorted(
    n for n in names if n not in _MATRIX_ORDER
  )


def load_reports(
  output_dir: str, results: Mapping[str, Any] | None = None
) -> dict[str, dict[str, dict[str, Any]]]:
  """``{column: {method: report dict}}`` from ``output_dir/reports/*.json``.

  With ``results``, only the (column, method) cells present in
  ``results['columns']`` are kept (stale reports of other runs are ignored).
  File names are ``<column>_<method>.json``; columns contain no underscore.
  """
  report_dir = os.path.join(output_dir, 'reports')
  out: dict[str, dict[str, dict[str, Any]]] = collections.defaultdict(dict)
  if not os.path.isdir(report_dir):
    return {}
  cols = (results or {}).get('columns')
  for fname in sorted(os.listdir(report_dir)):
    if not fname.endswith('.json') or '_' not in fname:
      continue
    col, method = fname[: -len('.json')].split('_', 1)
    if cols is not None and method not in cols.get(col, {}).get('methods', {}):
      continue
    try:
      with open(os.path.join(report_dir, fname)) as f:
        report = json.load(f)
    except (OSError, ValueError):
      continue
    if isinstance(report.get('per_matrix'), dict):
      out[col][method] = report
  if cols is not None:  # methods in the job's order (the order of the table rows)
    out = {c: {m: out[c][m] for m in cols[c]['methods'] if m in out[c]} for c in out}
  return dict(out)


def _per_layer(report: Mapping[str, Any], key: str) -> dict[str, dict[int, float]]:
  """``{matrix name: {layer: loss}}`` of one loss (e.g. 'rtn', 'final')."""
  out: dict[str, dict[int, float]] = collections.defaultdict(dict)
  for k, losses in report['per_matrix'].items():
    m = _KEY.match(k)
    if m and _finite(losses.get(key)):
      out[m.group(2)][int(m.group(1))] = float(losses[key])
  return dict(out)


def proxy_ratio_figure(
  column: str, reports: Mapping[str, Mapping[str, Any]], colors: Mapping[str, Any] | None = None
) -> mpl_figure.Figure:
  """Per matrix name: final / RTN proxy loss per layer, a line per method.

  Args:
    column: the quantizer's name (title only).
    reports: ``{method: QuantReport.to_dict()}``.
    colors: optional ``{method: color}`` (e.g. ``method_colors(results)``).

  Returns:
    A figure with one axes per matrix name (title = name; a line per method,
    x = layer, y = final / rtn) and a last panel 'all layers' (a marker per
    method and matrix name: summed final / summed rtn).
  """
  methods = list(reports)
  colors = _colors(methods, colors)
  per = {m: (_per_layer(r, 'final'), _per_layer(r, 'rtn')) for m, r in reports.items()}
  names = _matrix_names(n for fin, _ in per.values() for n in fin)
  ncols = min(4, len(names) + 1)
  nrows = max(1, math.ceil((len(names) + 1) / ncols))
  fig = _new_figure(3.2 * ncols, 2.6 * nrows + 0.4)
  axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
  for ax, name in zip(axes, names):
    for i, m in enumerate(methods):
      fin, rtn = per[m][0].get(name, {}), per[m][1].get(name, {})
      layers = sorted(l for l in fin if rtn.get(l, 0) > 0)
      if layers:
        ax.plot(
          layers,
          [fin[l] / rtn[l] for l in layers],
          marker=_MARKERS[i % len(_MARKERS)],
          ms=3.5,
          lw=1.2,
          color=colors[m],
          label=m,
        )
    ax.axhline(1.0, color='0.4', lw=0.8, ls='--')
    ax.set_title(name)
    ax.set_xlabel('layer')
    ax.set_ylabel('final / RTN proxy')
    ax.grid(alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)
  # Summary panel: ratio of the losses summed over layers, per matrix name (dots,
  # offset per method: the interesting range is near 1, not down to 0).
  ax = axes[len(names)]
  width = 0.6 / max(len(methods), 1)
  for i, m in enumerate(methods):
    fin, rtn = per[m]
    xs, ys = [], []
    for j, name in enumerate(names):
      layers = [l for l in fin.get(name, {}) if l in rtn.get(name, {})]
      total_rtn = sum(rtn[name][l] for l in layers)
      if layers and total_rtn > 0:
        xs.append(j + (i - (len(methods) - 1) / 2) * width)
        ys.append(sum(fin[name][l] for l in layers) / total_rtn)
    ax.plot(xs, ys, ls='none', marker=_MARKERS[i % len(_MARKERS)], ms=6, color=colors[m], label=m)
  ax.axhline(1.0, color='0.4', lw=0.8, ls='--')
  ax.set_xticks(range(len(names)), names)
  ax.set_title('all layers')
  ax.set_ylabel('Σ final / Σ RTN')
  ax.grid(alpha=0.3)
  for ax in axes[len(names) + 1 :]:
    ax.set_visible(False)
  handles, labels = axes[len(names)].get_legend_handles_labels()
  fig.legend(handles, labels, loc='outside lower center', ncols=min(len(methods), 6), frameon=False)
  fig.suptitle(
    f'{column}: proxy loss ||W - Ŵ||² relative to round-to-nearest (< 1 is better)', fontsize=11
  )
  return fig


def proxy_loss_figure(
  column: str, reports: Mapping[str, Mapping[str, Any]], colors: Mapping[str, Any] | None = None
) -> mpl_figure.Figure:
  """Per matrix name: absolute proxy loss per layer (log scale); RTN dashed."""
  methods = list(reports)
  colors = _colors(methods, colors)
  finals = {m: _per_layer(r, 'final') for m, r in reports.items()}
  rtn = {}
  for r in reports.values():  # RTN loss is the same in every report: take the first
    for name, by_layer in _per_layer(r, 'rtn').items():
      rtn.setdefault(name, by_layer)
  names = _matrix_names(set(rtn) | {n for f in finals.values() for n in f})
  ncols = max(1, min(4, len(names)))
  nrows = max(1, math.ceil(len(names) / ncols))
  fig = _new_figure(3.2 * ncols, 2.6 * nrows + 0.4)
  axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
  for ax, name in zip(axes, names):
    if name in rtn:
      layers = sorted(rtn[name])
      ax.plot(
        layers,
        [rtn[name][l] for l in layers],
        color='k',
        ls='--',
        lw=1.0,
        label='RTN (no transform)',
        zorder=5,
      )
    for i, m in enumerate(methods):
      fin = finals[m].get(name, {})
      layers = sorted(l for l in fin if fin[l] > 0)
      if layers:
        ax.plot(
          layers,
          [fin[l] for l in layers],
          marker=_MARKERS[i % len(_MARKERS)],
          ms=3.5,
          lw=1.2,
          color=colors[m],
          label=m,
        )
    _auto_log(ax, [y for line in ax.get_lines() for y in line.get_ydata()])
    ax.set_title(name)
    ax.set_xlabel('layer')
    ax.set_ylabel('||W - Ŵ||²')
    ax.grid(alpha=0.3, which='both')
    ax.xaxis.get_major_locator().set_params(integer=True)
  for ax in axes[len(names) :]:
    ax.set_visible(False)
  if names:
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(
      handles, labels, loc='outside lower center', ncols=min(len(labels), 6), frameon=False
    )
  fig.suptitle(f'{column}: per-matrix proxy loss', fontsize=11)
  return fig


def ppl_vs_bits_figure(results: Mapping[str, Any]) -> mpl_figure.Figure | None:
  """Perplexity and KLD against bits per weight, one series per method.

  Returns None when ``results`` has no evaluated method. Axes 0 is perplexity,
  axes 1 KLD. A method's points are joined, sorted by bits per weight, within
  each quantizer family (columns equal up to their bit width, e.g. w3g128asym
  and w4g128asym); each point is labelled with its column.
  """
  series: dict[str, list[tuple[float, float, float, str]]] = collections.defaultdict(list)
  fp_ppl, num_weights = None, None
  for col, col_result in results.get('columns', {}).items():
    for m, r in col_result.get('methods', {}).items():
      if m == 'fp':
        if _finite(r.get('ppl')):
          fp_ppl = r['ppl']
        continue
      if not (_finite(r.get('bits_per_weight')) and _finite(r.get('ppl'))):
        continue
      series[m].append((r['bits_per_weight'], r['ppl'], r.get('kld', float('nan')), col))
      if _finite(r.get('linear_bf16_bytes')) and r['linear_bf16_bytes'] > 0:
        num_weights = r['linear_bf16_bytes'] / 2
  if not series and fp_ppl is None:
    return None
  methods = list(series)
  colors = _colors(methods, method_colors(results))
  fig = _new_figure(11, 4.4)
  ax_ppl, ax_kld = fig.subplots(1, 2)
  for i, m in enumerate(methods):
    # One line per quantizer family (same granularity and symmetry, different bits).
    families: dict[str, list] = collections.defaultdict(list)
    for p in series[m]:
      families[_COLUMN_FAMILY.sub('', p[3])].append(p)
    for f, (family, fpts) in enumerate(sorted(families.items())):
      fpts = sorted(fpts)
      kw = dict(
        color=colors[m],
        marker=_MARKERS[i % len(_MARKERS)],
        ms=6,
        lw=1.2,
        label=m if f == 0 else '_nolegend_',
      )
      ax_ppl.plot([p[0] for p in fpts], [p[1] for p in fpts], **kw)
      kpts = [p for p in fpts if _finite(p[2]) and p[2] > 0]
      if kpts:
        ax_kld.plot([p[0] for p in kpts], [p[2] for p in kpts], **kw)
    for b, ppl, kld, col in series[m]:
      ax_ppl.annotate(
        col, (b, ppl), textcoords='offset points', xytext=(4, 3), fontsize=7, color=colors[m]
      )
      if _finite(kld) and kld > 0:
        ax_kld.annotate(
          col, (b, kld), textcoords='offset points', xytext=(4, 3), fontsize=7, color=colors[m]
        )
  if fp_ppl is not None:
    ax_ppl.plot([16.0], [fp_ppl], color='k', marker='*', ms=11, ls='none', label='fp (bf16)')
    ax_ppl.axhline(fp_ppl, color='k', lw=0.8, ls=':')
    ax_ppl.annotate(
      f'fp {fp_ppl:.2f}',
      (16.0, fp_ppl),
      textcoords='offset points',
      xytext=(-10, 6),
      fontsize=8,
      ha='right',
    )
  _auto_log(ax_ppl, [y for line in ax_ppl.get_lines() for y in line.get_ydata()], min_ratio=2)
  _auto_log(ax_kld, [y for line in ax_kld.get_lines() for y in line.get_ydata()])
  ax_ppl.set_ylabel('perplexity' + (' (log scale)' if ax_ppl.get_yscale() == 'log' else ''))
  ax_ppl.set_title('perplexity vs bits per weight')
  ax_kld.set_ylabel(
    'KL(fp || method), nats/token' + (' (log scale)' if ax_kld.get_yscale() == 'log' else '')
  )
  ax_kld.set_title('KL divergence vs bits per weight')
  for ax in (ax_ppl, ax_kld):
    ax.set_xscale('log', base=2)
    ax.set_xlabel('bits per weight of the quantized linears (log scale)')
    bits = [p[0] for pts in series.values() for p in pts] or [16.0]
    if ax is ax_ppl and fp_ppl is not None:
      bits.append(16.0)
    ticks = (
      _BIT_TICKS
      if max(bits) / min(bits) > 1.5
      else [t / 4 for t in range(int(4 * min(bits)), int(4 * max(bits)) + 2)]
    )
    ax.xaxis.set_major_locator(ticker.FixedLocator(ticks))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f'{v:g}'))
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    ax.grid(alpha=0.3, which='both')
    if num_weights:
      mb = num_weights / 8 / 1e6
      top = ax.secondary_xaxis('top', functions=(lambda b, mb=mb: b * mb, lambda y, mb=mb: y / mb))
      top.set_xlabel('MB on disk of the quantized linears', fontsize=8)
      top.xaxis.set_major_locator(ticker.FixedLocator([b * mb for b in ticks]))
      top.xaxis.set_major_formatter(ticker.FuncFormatter(_fmt))
      top.xaxis.set_minor_locator(ticker.NullLocator())
      top.tick_params(labelsize=7)
  ax_ppl.legend(fontsize=8)
  model = results.get('model', '')
  fig.suptitle(f'{model}: quality vs size' if model else 'quality vs size', fontsize=11)
  return fig


def write_all(results: Mapping[str, Any], output_dir: str) -> list[str]:
  """Writes every plot of a job's outputs to ``output_dir/plots``.

  Args:
    results: the job's results dict (``results.json``): ``{'model', 'columns':
      {column: {'methods': {method: {'ppl', 'kld', 'bits_per_weight',
      'linear_bytes', ...}}}}}``.
    output_dir: the job's output dir (reports are read from ``reports/``).

  Returns:
    Paths of the PNGs written (missing inputs are skipped, never an error).
  """
  plot_dir = os.path.join(output_dir, 'plots')
  os.makedirs(plot_dir, exist_ok=True)
  written = []
  colors = method_colors(results)
  for col, reports in sorted(load_reports(output_dir, results).items()):
    written.append(
      _save(proxy_ratio_figure(col, reports, colors), os.path.join(plot_dir, f'proxy_{col}.png'))
    )
    written.append(
      _save(
        proxy_loss_figure(col, reports, colors), os.path.join(plot_dir, f'proxy_loss_{col}.png')
      )
    )
  fig = ppl_vs_bits_figure(results)
  if fig is not None:
    written.append(_save(fig, os.path.join(plot_dir, 'ppl_vs_bits.png')))
  return written


def redraw(output_dir: str) -> list[str]:
  """Redraws every plot of the job in ``output_dir`` from its ``results.json``.

  Returns:
    Paths of the PNGs written (see ``write_all``).
  """
  with open(os.path.join(output_dir, 'results.json')) as f:
    results = json.load(f)
  return write_all(results, output_dir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Too many command-line arguments: {argv[1:]}')
  config = _CONFIG.value
  if not config.output_dir:
    raise app.UsageError(
      '--config.output_dir is required: the job output dir holding results.json and reports/.'
    )
  # Host-only job: JAX is not initialised, so redrawing next to a running job on an
  # accelerator takes none of its memory.
  logging.info('plots: one host process (pid %d), no accelerator used', os.getpid())
  for p in redraw(config.output_dir):
    print(p)


if __name__ == '__main__':
  # Defined here, not at import: experiments.quantize imports this module and has
  # its own --config flag.
  _CONFIG = config_flags.DEFINE_config_file(
    'config',
    _DEFAULT_CONFIG,
    'Plots configuration (experiments/configs/plots.py).',
    lock_config=True,
  )
  app.run(main)
