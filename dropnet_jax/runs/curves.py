"""Learning curves of a run: every trained epoch of every trial and cycle, as JSON lines, TensorBoard
event files and a figure.

What is written (into the run directory, by `CurveWriter`, the `driver.RunIO.curves` of DropNet and
magnitude runs; `output.curves=False` turns it off):

  metrics.jsonl         one row per trial x cycle x epoch: seed, metric (the criterion, or the
                        magnitude trial's label), cycle, epoch (1-based), train_loss, train_accuracy
                        (running means over the epoch's batches), val_loss, val_accuracy (after the
                        epoch) and lr (in force at the epoch's last optimiser step; per lane, so tuner
                        lanes with their own lr show theirs). The shared dense cycle is cycle 0 of
                        every trial of its seed, so its rows appear once per metric: filtering by
                        metric gives a trial's whole history.
  tb/seed<S>_<metric>/  TensorBoard (`tensorboard --logdir <out>/tb`): a run per trial, tags
                        `<quantity>/cycle<CC>` with the epoch as step.
  learning_curves.png   per metric (its lowest seed): validation accuracy and training loss against
                        the epoch, a line per cycle coloured from the dense network to the smallest.

Why this TensorBoard layout. What one compares is the same cycle across criteria (how training of
the 40 % network differs between min and max) and, for one quantity, how the curves change as the
network shrinks. A run per trial keeps the run list short (seeds x metrics; a run per trial-cycle
would be ten times longer and one chart would hold every cycle of every trial), and the trial's runs
overlay on every chart, so each chart is one cycle of one quantity for all criteria. Putting the
quantity first in the tag makes it TensorBoard's section: `val_accuracy` opens cycle00, cycle01, ...
side by side (two-digit cycles sort in order), and `lr` is one section to check the schedule. The
step is the epoch within the cycle, so cycles line up from epoch 1 (a cumulative step would draw a
trial's cycles one after another and no two trials would line up).

Resume. The checkpoint is the truth: when a run continues, `start(keep)` keeps the rows the restored
position accounts for (`driver.Driver` decides: cycles with records, shared dense cycles it holds,
and a mid-cycle state's epochs up to the one it was saved at); rows trained after that checkpoint
are trained again, so they are dropped and written anew, never twice. metrics.jsonl is rewritten
atomically with the kept rows and the TensorBoard files are written again from them (event files
only append, and TensorBoard's own purge works on steps across all tags of a run, which here are
epochs of every cycle). A TensorBoard server that was watching during the resume keeps what it had
read: restart it (or reload with a fresh --logdir) to drop the replaced epochs.

Cost: the rows come from the driver's one host read per epoch (small per-lane scalars, the same read
the progress display uses); nothing is read per step. A row is appended and flushed to the OS when
its epoch ends (before any checkpoint of that epoch, so a checkpoint never gets ahead of the file);
the TensorBoard writer flushes every few seconds in its own thread. On the default digits run
(6 trials, 2,858 epochs) writing the rows took 0.03 s as JSON lines and 0.13 s as TensorBoard events
(one event per row; `add_scalar` per value took 0.8 s), and the figure about 1.2 s once at the end.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import math
import os
import re
import sys
from typing import Any, Callable, Iterator, Sequence

from dropnet_jax.runs import reporting

METRICS_FILE = 'metrics.jsonl'
TENSORBOARD_DIR = 'tb'
FIGURE_FILE = 'learning_curves.png'
# A row's values, in the order of its JSON object; each is a TensorBoard tag prefix.
QUANTITIES = ('train_loss', 'train_accuracy', 'val_loss', 'val_accuracy', 'lr')
ROW_KEYS = ('seed', 'metric', 'cycle', 'epoch') + QUANTITIES
TB_FLUSH_SECONDS = 5


def tensorboard_run(seed: int, metric: str) -> str:
  """The TensorBoard run (subdirectory of tb/) of a trial: 'seed0_min', 'seed1_oneshot_s=0.9'."""
  return re.sub(r'[^A-Za-z0-9_.=-]+', '_', f'seed{seed}_{metric}')


def tensorboard_tag(quantity: str, cycle: int) -> str:
  """A row value's tag: 'val_accuracy/cycle03' (see the module docstring)."""
  return f'{quantity}/cycle{cycle:02d}'


def load(run_dir: str) -> list[dict[str, Any]]:
  """A run's learning-curve rows (its metrics.jsonl), in the order they were written."""
  path = os.path.join(run_dir, METRICS_FILE)
  if not os.path.isfile(path):
    raise ValueError(f'{run_dir}: no {METRICS_FILE} (a run with output.curves=False, or not started)')
  return _read_rows(path)


def _read_rows(path: str) -> list[dict[str, Any]]:
  """The rows of a metrics.jsonl; a last line cut short by a killed process is left out."""
  rows = []
  with open(path, encoding='utf-8') as f:
    lines = f.read().split('\n')
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError as e:
      if number == len(lines):  # no newline after it: the write was cut short
        continue
      raise ValueError(f'{path}: line {number}: corrupt JSON ({e.msg})') from e
  return rows


def _import_tensorboardx() -> None:
  """Imports tensorboardX, without torch. tensorboardX's writer module imports torch whenever it is
  installed, only to accept torch tensors as values (ours are Python floats); that import took 1.8 s
  of a 20 s default digits run where torch is installed (the test environment, PyTorch users). So
  unless torch is loaded already, `import torch` is made to fail for the duration of this import
  (a None entry in sys.modules raises ImportError, which tensorboardX catches) and works again after."""
  if 'tensorboardX' in sys.modules:
    return
  blocked = 'torch' not in sys.modules
  if blocked:
    sys.modules['torch'] = None  # type: ignore[assignment]
  try:
    import tensorboardX  # noqa: F401
  except ImportError:
    raise RuntimeError('learning curves need tensorboardX (pip install tensorboardX, or reinstall '
                       'dropnet_jax); or turn them off with --nocurves') from None
  finally:
    if blocked:
      del sys.modules['torch']


class CurveWriter:
  """Writes a run's learning curves into `directory` (a `driver.CurveSink`; see the module docstring).

  `tensorboard`: also write TensorBoard event files (tensorboardX, no TensorFlow needed)."""

  def __init__(self, directory: str, tensorboard: bool = True):
    self.directory = directory
    self.tensorboard = tensorboard
    if tensorboard:
      _import_tensorboardx()  # a dependency; checked here, before the run trains
    self._file = None
    self._started = False
    self._writers: dict[str, Any] = {}

  @property
  def path(self) -> str:
    return os.path.join(self.directory, METRICS_FILE)

  def start(self, keep: Callable[[dict[str, Any]], bool] | None = None) -> None:
    """Begins writing: keeps the rows of an earlier invocation for which `keep(row)` (None: none) and
    writes the TensorBoard files again from them."""
    self.close()
    kept = []
    if keep is not None and os.path.exists(self.path):
      kept = [r for r in _read_rows(self.path) if keep(r)]
    reporting.write_jsonl(self.path, kept)
    for old in glob.glob(os.path.join(self.directory, TENSORBOARD_DIR, '*', 'events.out.tfevents.*')):
      os.remove(old)
    self._started = True
    self._to_tensorboard(kept)

  def add(self, rows: Sequence[dict[str, Any]]) -> None:
    """Appends one epoch's rows (starting afresh if `start` was not called)."""
    if not self._started:
      self.start()
    if self._file is None:
      self._file = open(self.path, 'a', encoding='utf-8')
    self._file.write(''.join(json.dumps({k: row[k] for k in ROW_KEYS}) + '\n' for row in rows))
    self._file.flush()
    self._to_tensorboard(rows)

  def _to_tensorboard(self, rows: Sequence[dict[str, Any]]) -> None:
    """A row is one event (a summary of its five scalars at step = epoch): what
    `SummaryWriter.add_scalar` writes per value, at a fifth of the cost."""
    if not self.tensorboard:
      return
    from tensorboardX import FileWriter
    from tensorboardX.proto.summary_pb2 import Summary
    for row in rows:
      run = tensorboard_run(row['seed'], row['metric'])
      writer = self._writers.get(run)
      if writer is None:
        writer = self._writers[run] = FileWriter(os.path.join(self.directory, TENSORBOARD_DIR, run),
                                                 flush_secs=TB_FLUSH_SECONDS)
      values = [Summary.Value(tag=tensorboard_tag(q, row['cycle']), simple_value=row[q])
                for q in QUANTITIES if row[q] is not None]
      writer.add_summary(Summary(value=values), row['epoch'])

  def close(self) -> None:
    """Flushes and closes metrics.jsonl and the TensorBoard files (a later `add` appends again)."""
    errors = []
    if self._file is not None:
      try:
        self._file.close()
      except OSError as e:  # a full disk: the flush failed (the file is closed all the same)
        errors.append(OSError(e.errno, e.strerror, self.path))
      self._file = None
    for writer in self._writers.values():
      try:
        _close_event_file(writer)
      except OSError as e:
        errors.append(OSError(e.errno, e.strerror, writer.get_logdir()))
    self._writers = {}
    if errors:
      raise errors[0]  # naming the file (the entry points' one line for a full disk)

  def save_figure(self, title: str = '') -> str | None:
    """learning_curves.png from metrics.jsonl; its path, or None when there are no rows yet."""
    rows = _read_rows(self.path) if os.path.exists(self.path) else []
    if not rows:
      return None
    return save_figure(rows, os.path.join(self.directory, FIGURE_FILE), title)


def _close_event_file(writer) -> None:
  """Closes a tensorboardX FileWriter; when its last flush fails (a full disk) its writer thread is stopped
  and it is marked closed all the same, so that neither its atexit hook nor its thread print a traceback
  after the failure was reported (the OSError is raised)."""
  events = writer.event_writer
  try:
    events.close()
  except OSError:
    events._closed = True  # pylint: disable=protected-access  # its atexit hook: nothing left to do
    with contextlib.suppress(Exception):
      events._worker.stop()  # pylint: disable=protected-access
    with contextlib.suppress(OSError):
      events._ev_writer.close()  # pylint: disable=protected-access  # the file is closed even if its flush fails
    raise


@contextlib.contextmanager
def for_run(run_dir, enabled: bool, title: str = '') -> Iterator[CurveWriter | None]:
  """The `RunIO.curves` of a run in `run_dir` (`runs.run_dir.RunDir`): a CurveWriter, or None when
  curves are off or this process does not write (distributed runs: process 0 writes). Closed on
  exit; the figure is drawn when the run ends without an exception."""
  if not enabled or not run_dir.writes:
    yield None
    return
  writer = CurveWriter(run_dir.path)
  try:
    yield writer
  except BaseException:
    with contextlib.suppress(OSError):  # the run's own error (a full disk, named) is the one to report
      writer.close()
    raise
  writer.close()
  writer.save_figure(title)


# -- the figure ------------------------------------------------------------------------------------

def make_figure(rows: Sequence[dict[str, Any]], title: str = ''):
  """Per metric (its lowest seed), validation accuracy and training loss against the epoch, a line
  per cycle (colour: cycle, from the dense network to the smallest); a matplotlib Figure on an Agg
  canvas (pyplot is not touched)."""
  from matplotlib import cm, colors
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  metrics = list(dict.fromkeys(r['metric'] for r in rows))
  if not metrics:
    raise ValueError('learning curves: no rows to plot')
  seed_of = {m: min(r['seed'] for r in rows if r['metric'] == m) for m in metrics}
  max_cycle = max(r['cycle'] for r in rows)
  norm = colors.Normalize(vmin=0, vmax=max(max_cycle, 1))
  cmap = cm.viridis
  longest = max(sum(1 for r in rows if (r['seed'], r['metric'], r['cycle']) == key)
                for key in {(r['seed'], r['metric'], r['cycle']) for r in rows})
  marker = '.' if longest <= 15 else None  # dots only where a few epochs would hide the points
  pairs_per_row = 1 if len(metrics) == 1 else 2
  nrows = math.ceil(len(metrics) / pairs_per_row)
  fig = Figure(figsize=(4.6 * 2 * pairs_per_row + 1.2, 3.2 * nrows + 0.6), layout='constrained')
  FigureCanvasAgg(fig)
  axes = fig.subplots(nrows, 2 * pairs_per_row, squeeze=False)
  for i, metric in enumerate(metrics):
    seed = seed_of[metric]
    acc_ax, loss_ax = axes[i // pairs_per_row][2 * (i % pairs_per_row):2 * (i % pairs_per_row) + 2]
    mine = [r for r in rows if r['metric'] == metric and r['seed'] == seed]
    for cycle in sorted({r['cycle'] for r in mine}):
      points = sorted((r['epoch'], r['val_accuracy'], r['train_loss']) for r in mine if r['cycle'] == cycle)
      epochs = [p[0] for p in points]
      style = {'color': cmap(norm(cycle)), 'linewidth': 1.4, 'marker': marker}
      acc_ax.plot(epochs, [p[1] for p in points], **style)
      loss_ax.plot(epochs, [p[2] for p in points], **style)
    acc_ax.set_title(f'{metric} (seed {seed}): validation accuracy', fontsize=10)
    loss_ax.set_title(f'{metric} (seed {seed}): training loss', fontsize=10)
    losses = [r['train_loss'] for r in mine]
    if losses and all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in losses):
      loss_ax.set_yscale('log')
    for ax in (acc_ax, loss_ax):
      ax.set_xlabel('epoch')
      ax.grid(True, alpha=0.3)
      ax.xaxis.get_major_locator().set_params(integer=True)
  for j in range(len(metrics), nrows * pairs_per_row):  # an odd number of metrics leaves a pair empty
    for ax in axes[j // pairs_per_row][2 * (j % pairs_per_row):2 * (j % pairs_per_row) + 2]:
      ax.set_visible(False)
  bar = fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=axes, shrink=0.9, pad=0.01)
  bar.set_label('cycle (0: dense network)')
  bar.locator = _integer_ticks()
  bar.update_ticks()
  fig.suptitle(f'{title}: learning curves per cycle' if title else 'learning curves per cycle')
  return fig


def _integer_ticks():
  from matplotlib.ticker import MaxNLocator
  return MaxNLocator(integer=True)


def save_figure(rows: Sequence[dict[str, Any]], path: str, title: str = '') -> str:
  """`make_figure` written atomically to `path` as PNG; returns the path."""
  buf = io.BytesIO()
  make_figure(rows, title).savefig(buf, format='png', dpi=100)
  reporting.atomic_write_bytes(path, buf.getvalue())
  return path
