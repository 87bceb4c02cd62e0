"""Results I/O, seed statistics, text tables and paper-style figures.

An experiment produces *records*: one dict per (seed, metric, cycle) with at
least `seed`, `metric`, `cycle`, `fraction_remaining` and the accuracy / loss /
early-stopping fields. This module persists them (atomically, so a killed run
never leaves a half-written results file), averages them over seeds with a
Student-t confidence interval and renders them like the DropNet paper's
figures: metric value against the fraction of nodes/filters remaining, on a
log x axis that runs from 1.0 on the left towards sparser networks on the right.

Plotting uses `matplotlib.figure.Figure` with an explicit Agg canvas instead of
pyplot, so importing or calling this module never changes the caller's pyplot
backend or leaves figures open in pyplot's global registry.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

# Accuracies are stored in [0, 1]; only the text table shows them in percent.
ACCURACY_KEYS = ('train_accuracy', 'val_accuracy', 'test_accuracy')

# Fixed style per known metric so figures from different runs can be compared
# at a glance. Layer-wise variants reuse their global counterpart's marker and
# are dashed, so the pairs are easy to match up.
METRIC_STYLES: dict[str, dict[str, Any]] = {
    'min': {'color': 'tab:blue', 'marker': 'o', 'linestyle': '-'},
    'max': {'color': 'tab:orange', 'marker': 's', 'linestyle': '-'},
    'random': {'color': 'tab:green', 'marker': '^', 'linestyle': '-'},
    'min_layer': {'color': 'tab:purple', 'marker': 'o', 'linestyle': '--'},
    'max_layer': {'color': 'tab:brown', 'marker': 's', 'linestyle': '--'},
    'random_layer': {'color': 'tab:olive', 'marker': '^', 'linestyle': '--'},
    'apoz': {'color': 'tab:red', 'marker': 'D', 'linestyle': '-'},
    'oracle': {'color': 'black', 'marker': '*', 'linestyle': ':'},
}
# Handed out, in sorted-name order, to metrics not listed above.
_SPARE_COLORS = ('tab:pink', 'tab:gray', 'tab:cyan', '#1b9e77', '#d95f02',
                 '#7570b3', '#e7298a', '#66a61e', '#e6ab02', '#a6761d')
_SPARE_MARKERS = ('v', 'P', 'X', 'h', '<', '>', 'p', 'd')

# Number of digits used for the fraction in table cells.
_FRACTION_FMT = '{:.3f}'


# ---------------------------------------------------------------------------
# Atomic file writes and JSON lines.


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
  """Writes `data` to `path` so that readers see either the old or new file.

  The bytes go to a temporary file in the same directory (os.replace is only
  atomic within one filesystem), are fsynced, and then renamed over `path`.
  On any failure the temporary file is removed and `path` is untouched.
  """
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix='.' + os.path.basename(path) + '.',
                             suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    # mkstemp creates 0600 files; give the result ordinary umask permissions.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)
  except BaseException:
    # BaseException too: a KeyboardInterrupt must not leave litter behind.
    try:
      os.unlink(tmp)
    except FileNotFoundError:
      pass
    raise
  # Persist the rename itself; best effort since not every OS/filesystem
  # allows opening a directory.
  try:
    dir_fd = os.open(directory, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(dir_fd)
  except OSError:
    pass
  finally:
    os.close(dir_fd)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
  """Atomically writes `text` (UTF-8) to `path`; see `atomic_write_bytes`."""
  atomic_write_bytes(path, text.encode('utf-8'))


def _json_default(obj: Any) -> Any:
  """Converts numpy / JAX scalars and arrays, which json cannot encode."""
  if isinstance(obj, np.generic):
    return obj.item()
  if hasattr(obj, 'tolist'):  # np.ndarray, jax.Array
    return obj.tolist()
  if isinstance(obj, (set, frozenset, tuple)):
    return list(obj)
  raise TypeError(f'Object of type {type(obj).__name__} is not JSON serializable')


def write_jsonl(path: str | os.PathLike[str], records: Iterable[Mapping[str, Any]]) -> None:
  """Atomically writes one JSON object per line.

  NaN/inf are kept (Python's json writes and reads them) because diverged runs
  legitimately produce non-finite losses.
  """
  lines = [json.dumps(dict(r), default=_json_default) for r in records]
  atomic_write_text(path, ''.join(line + '\n' for line in lines))


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
  """Reads a JSON-lines file; blank lines are skipped.

  Raises:
    ValueError: naming the file and 1-based line number of a line that is not
      a JSON object.
  """
  records = []
  with open(path, encoding='utf-8') as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f'{os.fspath(path)}: line {lineno}: corrupt JSON ({e.msg})') from e
      if not isinstance(obj, dict):
        raise ValueError(f'{os.fspath(path)}: line {lineno}: expected a JSON object, '
                         f'got {type(obj).__name__}')
      records.append(obj)
  return records


def write_csv(path: str | os.PathLike[str], records: Iterable[Mapping[str, Any]]) -> None:
  """Atomically writes the records as CSV, for spreadsheets and pandas (results.jsonl stays the source).

  Columns are every key in order of first appearance; a record without a key
  leaves its cell empty, as does None. Lists and dicts (`units`, `mask`) are
  written as JSON text, e.g. `[21, 20]`, so `json.loads` gives them back;
  floats keep full precision (NaN/inf as `nan`/`inf`).
  """
  rows = [dict(r) for r in records]
  columns = list(dict.fromkeys(k for r in rows for k in r))

  def cell(value: Any) -> Any:
    if value is None:
      return ''
    if isinstance(value, np.generic):
      value = value.item()
    if isinstance(value, (list, tuple, dict, np.ndarray)):
      return json.dumps(value, default=_json_default)
    return value

  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator='\n')
  if columns:  # no records: an empty file
    writer.writeheader()
  writer.writerows({k: cell(v) for k, v in r.items()} for r in rows)
  atomic_write_text(path, buffer.getvalue())


# ---------------------------------------------------------------------------
# Statistics over seeds.


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
  """Mean and Student-t confidence-interval half width over `values` (seeds).

  A single value has no spread estimate, so its half width is 0.0.
  """
  x = np.asarray(values, dtype=np.float64).ravel()
  if x.size == 0:
    raise ValueError('mean_ci needs at least one value')
  if not 0.0 < confidence < 1.0:
    raise ValueError(f'confidence must be in (0, 1), got {confidence}')
  mean = float(x.mean())
  if x.size == 1:
    return mean, 0.0
  t = stats.t.ppf(0.5 + confidence / 2.0, df=x.size - 1)
  half = float(t * x.std(ddof=1) / math.sqrt(x.size))
  return mean, half


def metric_order(metrics: Iterable[str]) -> list[str]:
  """Known metrics in the paper's order first, then the others sorted."""
  names = set(metrics)
  known = [m for m in METRIC_STYLES if m in names]
  return known + sorted(names - set(known))


def aggregate(records: Iterable[Mapping[str, Any]], key: str,
              confidence: float = 0.95, x_key: str = 'fraction_remaining'
              ) -> dict[str, list[tuple[float, float, float, int]]]:
  """Averages `key` over seeds per (metric, cycle).

  Returns:
    {metric: [(x_mean, mean, half_width, n), ...]} sorted by cycle, x being `x_key` (the fraction
    remaining, or the compact network's `params` / `macs`);
    metrics in `metric_order`. Records without `key` (or with None) are
    skipped, so optional fields such as `last_test_accuracy` aggregate too.
    The fraction is averaged although deterministic unit counts make it equal
    across seeds, so non-deterministic schedules still plot sensibly.
  """
  groups: dict[str, dict[int, tuple[list[float], list[float]]]] = {}
  for r in records:
    value = r.get(key)
    if value is None:
      continue
    cell = groups.setdefault(str(r['metric']), {}).setdefault(int(r['cycle']), ([], []))
    cell[0].append(float(r[x_key]))
    cell[1].append(float(value))
  out: dict[str, list[tuple[float, float, float, int]]] = {}
  for metric in metric_order(groups):
    rows = []
    for cycle in sorted(groups[metric]):
      fractions, values = groups[metric][cycle]
      mean, half = mean_ci(values, confidence)
      rows.append((float(np.mean(fractions)), mean, half, len(values)))
    out[metric] = rows
  return out


# ---------------------------------------------------------------------------
# Text table.


def _format_value(key: str, mean: float, half: float) -> str:
  if key in ACCURACY_KEYS or 'accuracy' in key:
    return f'{100 * mean:.2f}±{100 * half:.2f}'
  if 'loss' in key:
    return f'{mean:.4f}±{half:.4f}'
  return f'{mean:.2f}±{half:.2f}'


def summary_table(records: Iterable[Mapping[str, Any]], key: str = 'test_accuracy') -> str:
  """Plain-text table: one row per cycle, one column per metric.

  Cells read `mean±half_width (fraction)`, accuracies in percent, e.g.
  `97.12±0.31 (0.640)`. A metric with fewer cycles than another shows `-`.
  The header gives each metric's seed count (the most seeds in any cycle).
  """
  records = list(records)
  agg = aggregate(records, key)
  metrics = list(agg)
  if not metrics:
    return f'{key}: no records'
  # Cycle labels come from the data so gaps (e.g. a metric missing a cycle
  # in every seed) do not silently shift rows.
  cycles_by_metric: dict[str, list[int]] = {}
  for r in records:
    if r.get(key) is not None:
      cycles_by_metric.setdefault(str(r['metric']), []).append(int(r['cycle']))
  all_cycles = sorted({c for cs in cycles_by_metric.values() for c in cs})
  index = {m: {c: i for i, c in enumerate(sorted(set(cycles_by_metric[m])))} for m in metrics}

  header = ['cycle'] + [f'{m} (n={max(row[3] for row in agg[m])})' for m in metrics]
  body = []
  for cycle in all_cycles:
    row = [str(cycle)]
    for m in metrics:
      i = index[m].get(cycle)
      if i is None:
        row.append('-')
      else:
        frac, mean, half, _ = agg[m][i]
        row.append(f'{_format_value(key, mean, half)} ({_FRACTION_FMT.format(frac)})')
    body.append(row)

  widths = [max(len(r[j]) for r in [header] + body) for j in range(len(header))]

  def fmt(row: list[str]) -> str:
    # Cycle number left-aligned, numeric cells right-aligned so digits line up.
    cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
    return '  '.join(cells).rstrip()

  unit = ' [%]' if 'accuracy' in key else ''
  lines = [f'{key}{unit}: mean±95% CI half-width over seeds (fraction remaining)',
           fmt(header), '  '.join('-' * w for w in widths)]
  lines += [fmt(r) for r in body]
  return '\n'.join(lines) + '\n'


# ---------------------------------------------------------------------------
# Figures.


def metric_styles(metrics: Iterable[str]) -> dict[str, dict[str, Any]]:
  """Line style per metric: fixed for known names, spares for the rest."""
  ordered = metric_order(metrics)  # consumes `metrics` once (may be a generator)
  styles = {m: dict(METRIC_STYLES[m]) for m in ordered if m in METRIC_STYLES}
  unknown = [m for m in ordered if m not in METRIC_STYLES]
  for i, m in enumerate(unknown):
    styles[m] = {'color': _SPARE_COLORS[i % len(_SPARE_COLORS)],
                 'marker': _SPARE_MARKERS[i % len(_SPARE_MARKERS)],
                 'linestyle': '-.'}
  return styles


_NICE_TICKS = (1.0, 0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001)


X_AXES = {'fraction': 'fraction_remaining', 'params': 'params', 'macs': 'macs'}
_XLABELS = {'fraction_remaining': 'fraction of nodes/filters remaining',
            'params': 'parameters of the compact network', 'macs': 'multiply-accumulates of the compact network'}


def _style_fraction_axis(ax: Any, fractions: Sequence[float], x_key: str = 'fraction_remaining') -> None:
  """Log x axis, inverted so the dense network (1.0) is on the left."""
  from matplotlib.ticker import FixedLocator, FormatStrFormatter, NullFormatter
  ax.set_xscale('log')
  if x_key != 'fraction_remaining':  # counts: matplotlib's log ticks, still dense on the left
    if fractions:
      ax.set_xlim(max(fractions) * 1.15, min(fractions) / 1.15)
    ax.grid(True, which='major', alpha=0.4)
    ax.set_xlabel(_XLABELS[x_key])
    return
  lo = min(fractions) if fractions else 0.1
  hi = max(max(fractions) if fractions else 1.0, lo)
  # Pad by a few percent in log space; giving left > right inverts the axis.
  pad = 1.08
  ax.set_xlim(hi * pad, lo / pad)
  # Decimal tick labels read better than 10^-1 for fractions.
  ticks = [t for t in _NICE_TICKS if lo / pad <= t <= hi * pad]
  if len(ticks) >= 2:
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FormatStrFormatter('%g'))
    ax.xaxis.set_minor_formatter(NullFormatter())
  ax.grid(True, which='major', alpha=0.4)
  ax.grid(True, which='minor', alpha=0.15)
  ax.set_xlabel('fraction of nodes/filters remaining')


_YLABELS = {
    'train_accuracy': 'train accuracy',
    'val_accuracy': 'validation accuracy',
    'test_accuracy': 'test accuracy',
    'early_stop_epoch': 'early-stopping epoch',
    'oracle_similarity': 'fraction of kept units shared with the oracle',
}


def make_figure(records: Iterable[Mapping[str, Any]], keys: Sequence[str],
                title: str = '', confidence: float = 0.95, x_key: str = 'fraction_remaining',
                xlabel: str | None = None) -> Any:
  """Builds (without saving) a Figure with one panel per key vs `x_key` (default the fraction).

  Each metric is a line with markers at the seed mean and a shaded band of
  mean ± CI half width. Returns a `matplotlib.figure.Figure` with an Agg
  canvas attached; its axes are `fig.axes`, in `keys` order.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  records = list(records)
  fig = Figure(figsize=(5.5 * len(keys), 4.2), layout='constrained')
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, len(keys), squeeze=False)[0]
  styles = metric_styles(str(r['metric']) for r in records)
  for ax, key in zip(axes, keys):
    agg = aggregate(records, key, confidence, x_key)
    all_fractions = []
    for metric, rows in agg.items():
      frac = np.array([r[0] for r in rows])
      mean = np.array([r[1] for r in rows])
      half = np.array([r[2] for r in rows])
      all_fractions.extend(frac.tolist())
      style = styles[metric]
      ax.plot(frac, mean, label=metric, color=style['color'], marker=style['marker'],
              linestyle=style['linestyle'], markersize=4, linewidth=1.4)
      low, high = mean - half, mean + half
      if key.endswith('accuracy'):  # a t interval over few seeds can leave [0, 1]; accuracy cannot
        low, high = np.clip(low, 0, 1), np.clip(high, 0, 1)
      ax.fill_between(frac, low, high, color=style['color'], alpha=0.18, linewidth=0)
    _style_fraction_axis(ax, all_fractions, x_key)
    if xlabel:
      ax.set_xlabel(xlabel)
    ax.set_ylabel(_YLABELS.get(key, key.replace('_', ' ')))
    if agg:
      ax.legend(fontsize='small', loc='best')
  if title:
    fig.suptitle(title)
  return fig


def save_figure(records: Iterable[Mapping[str, Any]], path: str, keys: Sequence[str], title: str = '',
                x_key: str = 'fraction_remaining', xlabel: str | None = None) -> str:
  """One figure of `keys` vs fraction remaining (paper conventions), written atomically to `path`."""
  _save_png(make_figure(list(records), keys, title=title, x_key=x_key, xlabel=xlabel), os.fspath(path))
  return os.fspath(path)


def _save_png(fig: Any, path: str) -> None:
  """Renders to memory first so the file on disk is written atomically."""
  buf = io.BytesIO()
  fig.savefig(buf, format='png', dpi=150)
  atomic_write_bytes(path, buf.getvalue())


def save_figures(records: Iterable[Mapping[str, Any]], out_dir: str | os.PathLike[str],
                 title: str = '', x_axis: str = 'fraction') -> list[str]:
  """Writes the paper-style PNG figures into `out_dir`; returns their paths.

  test_accuracy.png: test accuracy vs fraction remaining.
  accuracy_panels.png: train / val / test accuracy panels.
  early_stopping.png: early-stopping epoch vs fraction remaining.
  `x_axis`: 'fraction' (the paper's), or the compact network's 'params' or 'macs'.
  """
  if x_axis not in X_AXES:
    raise ValueError(f'x_axis must be one of {sorted(X_AXES)}, got {x_axis!r}')
  records = list(records)
  if not records:
    raise ValueError('save_figures: no records to plot')
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  figures = [
      ('test_accuracy.png', ('test_accuracy',)),
      ('accuracy_panels.png', ACCURACY_KEYS),
      ('early_stopping.png', ('early_stop_epoch',)),
  ]
  paths = []
  for name, keys in figures:
    fig = make_figure(records, keys, title=title, x_key=X_AXES[x_axis])
    path = os.path.join(out_dir, name)
    _save_png(fig, path)
    paths.append(path)
  return paths
