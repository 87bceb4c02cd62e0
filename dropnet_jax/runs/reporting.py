"""Results I/O, seed statistics, text tables and paper-style figures.

An experiment produces *records*: one dict per (seed, metric, cycle) with at
least `seed`, `metric`, `cycle`, `fraction_remaining` and the accuracy / loss /
early-stopping fields. This module persists them (atomically, so a killed run
never leaves a half-written results file), averages them over seeds and renders
them like the DropNet paper's figures: metric value against the fraction of
nodes/filters remaining, on a log x axis that runs from 1.0 on the left towards
sparser networks on the right.

Every mean comes with a spread that a reader can take at face value: with fewer
than `CI_MIN_SEEDS` seeds the min-max of the seeds (a t-interval over 2-4 seeds
is wider than the data and leaves [0, 1]), from there on the 95% t-interval
clipped to the value's range, and 'n/a' for one seed, never a '±0.00' that
reads as a result. Each figure's legend and each table's title line say which
it is and over how many seeds. Legends sit beside the panels, not on the data.

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
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

# Seed statistics, styles and titles live in their own modules; these names stay importable from here.
from dropnet_jax.runs.seed_stats import (CI_MIN_SEEDS, Point, aggregate, band_phrase, mean_ci,  # noqa: F401
                                         spread, value_range)
from dropnet_jax.runs.styles import METRIC_STYLES, metric_order, metric_styles, split_label  # noqa: F401
from dropnet_jax.runs.titles import dataset_title, model_title, run_title  # noqa: F401

# Accuracies are stored in [0, 1]; only the text table shows them in percent.
ACCURACY_KEYS = ('train_accuracy', 'val_accuracy', 'test_accuracy')

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
# Text table.


def _format_value(key: str, mean: float, low: float, high: float) -> str:
  """'91.00 [90.00, 92.00]' (accuracies in percent), '91.00 [n/a]' without a spread (one seed)."""
  scale, digits = (100.0, 2) if 'accuracy' in key else (1.0, 4 if 'loss' in key else 2)
  band = 'n/a' if math.isnan(low) else f'{scale * low:.{digits}f}, {scale * high:.{digits}f}'
  return f'{scale * mean:.{digits}f} [{band}]'


def summary_table(records: Iterable[Mapping[str, Any]], key: str = 'test_accuracy') -> str:
  """Plain-text table: one row per cycle, one column per metric.

  Cells read `mean [low, high] (fraction)`, accuracies in percent, e.g. `97.12 [96.80, 97.40]
  (0.640)`; [low, high] is the min-max of the seeds below CI_MIN_SEEDS seeds, the 95% t-interval
  from there on, `[n/a]` for one seed (the title line says which). A metric with fewer cycles than
  another shows `-`. The header gives each metric's seed count (the most seeds in any cycle).
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

  header = ['cycle'] + [f'{m} (n={max(p.n for p in agg[m])})' for m in metrics]
  body = []
  for cycle in all_cycles:
    row = [str(cycle)]
    for m in metrics:
      i = index[m].get(cycle)
      if i is None:
        row.append('-')
      else:
        p = agg[m][i]
        row.append(f'{_format_value(key, p.mean, p.low, p.high)} ({_FRACTION_FMT.format(p.x)})')
    body.append(row)

  widths = [max(len(r[j]) for r in [header] + body) for j in range(len(header))]

  def fmt(row: list[str]) -> str:
    # Cycle number left-aligned, numeric cells right-aligned so digits line up.
    cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
    return '  '.join(cells).rstrip()

  unit = ' [%]' if 'accuracy' in key else ''
  kinds = [p.kind for points in agg.values() for p in points]
  phrase = band_phrase(kinds, key, scale=100.0 if unit else 1.0)
  lines = [f'{key}{unit}: mean over seeds [{phrase}] (fraction remaining)', fmt(header),
           '  '.join('-' * w for w in widths)]
  lines += [fmt(r) for r in body]
  return '\n'.join(lines) + '\n'


# ---------------------------------------------------------------------------
# Figures.


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


def _legend_title(aggs: Sequence[Mapping[str, Sequence[Point]]], keys: Sequence[str],
                  confidence: float) -> tuple[str, bool]:
  """The legend's title (what a line and a band are, over how many seeds) and whether each label
  must carry its own n (when the metrics' seed counts differ)."""
  counts = {m: max(p.n for p in points) for agg in aggs for m, points in agg.items()}
  kinds = {p.kind for agg in aggs for points in agg.values() for p in points}
  if set(counts.values()) == {1}:
    return 'one seed (n=1): no band', False
  uniform = len(set(counts.values())) == 1
  seeds = f'n={next(iter(counts.values()))} seeds' if uniform else 'seeds'
  # One line per kind of band (wrapped when long), so the legend stays narrow.
  band = ';\n'.join(textwrap.fill(part, 34, subsequent_indent='  ')
                     for part in f'band: {band_phrase(kinds, keys, confidence)}'.split('; '))
  return f'mean over {seeds}\n{band}', not uniform


def make_figure(records: Iterable[Mapping[str, Any]], keys: Sequence[str],
                title: str = '', confidence: float = 0.95, x_key: str = 'fraction_remaining',
                xlabel: str | None = None) -> Any:
  """Builds (without saving) a Figure with one panel per key vs `x_key` (default the fraction).

  Each metric is a line with markers at the seed mean and a shaded band (`spread`: min-max of the
  seeds below CI_MIN_SEEDS, else the clipped t-interval; none for one seed). One legend, right of
  the panels, names the metrics and says what line and band are and n. Returns a
  `matplotlib.figure.Figure` with an Agg canvas attached; its axes are `fig.axes`, in `keys` order.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  records = list(records)
  fig = Figure(figsize=(4.6 * len(keys) + 1.9, 3.8), layout='constrained')
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, len(keys), squeeze=False)[0]
  styles = metric_styles(str(r['metric']) for r in records)
  aggs = [aggregate(records, key, confidence, x_key) for key in keys]
  legend_title, label_n = _legend_title(aggs, keys, confidence) if any(aggs) else ('', False)
  handles: dict[str, Any] = {}
  for ax, key, agg in zip(axes, keys, aggs):
    all_x = []
    for metric, points in agg.items():
      x = np.array([p.x for p in points])
      mean = np.array([p.mean for p in points])
      low = np.array([p.low for p in points])
      high = np.array([p.high for p in points])
      all_x.extend(x.tolist())
      style = styles[metric]
      label = f'{metric} (n={max(p.n for p in points)})' if label_n else metric
      (line,) = ax.plot(x, mean, label=label, markersize=4, linewidth=1.4, **style)
      handles.setdefault(label, line)
      if np.isfinite(low).any():
        ax.fill_between(x, low, high, color=style['color'], alpha=0.15, linewidth=0)
    _style_fraction_axis(ax, all_x, x_key)
    if xlabel:
      ax.set_xlabel(xlabel)
    ax.set_ylabel(_YLABELS.get(key, key.replace('_', ' ')))
  if handles:
    # Beside the last panel, top-aligned with it (below the suptitle), never over the data.
    axes[-1].legend(list(handles.values()), list(handles), loc='upper left', bbox_to_anchor=(1.02, 1.0),
                    borderaxespad=0.0, fontsize='small', title=legend_title, title_fontsize='small',
                    alignment='left', frameon=False)
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
