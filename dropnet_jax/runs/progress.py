"""Progress of a running experiment, for a person watching it and for a log read later.

`ProgressMonitor` is a `driver.Driver` monitor (it takes the driver's event
dicts) and the `log` function of the run's lines. On a terminal it draws a
live bar (rich) with the trial, cycle, epoch, validation accuracy, elapsed time
and ETA, and the run's lines (one per finished cycle; per epoch with
--verbose) scroll above it. Anywhere else (CI, a pipe, a file) there is no
bar and no control code: the same lines are printed plainly, each prefixed
with the elapsed time and the ETA, so a log stays one line per cycle.

The ETA counts cycles. Every trial is expected to run `expected_cycles`
cycles (`expected_cycles()`: the number the floor stop gives; a trial that
stops sooner, on κ, a budget or divergence, counts as complete from then on,
and one that runs longer adds its extra cycles). The cycle being trained
counts in proportion to its epochs against the mean epochs per cycle so far.
The rate is measured from the first training after this invocation's first
record: a resumed run's earlier cycles do not make it look faster, and the
first training's compilation (and the burst of cycle-0 records that share one
dense training) do not skew it.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, Callable, Sequence, TextIO


def expected_cycles(widths: Sequence[int], fraction: float, floor: float) -> int:
  """Records per trial when only the floor stops it: cycle 0 plus one per drop.

  Follows `criteria`'s rule, max(floor(p * remaining), 1) units per drop,
  both over the whole network and per layer, and returns the larger count
  (a bound for either kind of metric).
  """
  def count(layers: list[int]) -> int:
    total, cycles = sum(layers), 1
    while sum(layers) / total > floor and any(n > 1 for n in layers):
      layers = [max(n - max(int(fraction * n), 1), 1) for n in layers]
      cycles += 1
    return cycles

  widths = [int(w) for w in widths]
  return max(count([sum(widths)]), count(widths))


def format_seconds(seconds: float | None) -> str:
  """h:mm:ss (or -:--:-- when unknown)."""
  if seconds is None or not math.isfinite(seconds):
    return '-:--:--'
  s = int(round(max(seconds, 0.0)))
  return f'{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}'


class ProgressMonitor:
  """A `RunIO` monitor and `log` sink: a live bar on a terminal, plain prefixed lines elsewhere.

  Use as a context manager (the live display stops on exit, also on Ctrl-C, so the terminal is left clean):

    with ProgressMonitor(trials=6, expected_cycles=13) as monitor:
      run_experiment(..., io=RunIO(log=monitor.log, monitor=monitor))

  `live`: None decides from `stream.isatty()`. `clock` is injectable for tests.
  """

  def __init__(self, trials: int, expected_cycles: int, *, stream: TextIO | None = None, live: bool | None = None,
               clock: Callable[[], float] = time.monotonic):
    if trials < 0 or expected_cycles < 1:
      raise ValueError(f'need trials >= 0 and expected_cycles >= 1, got {trials}, {expected_cycles}')
    self.stream = stream if stream is not None else sys.stdout
    self.live = bool(getattr(self.stream, 'isatty', lambda: False)()) if live is None else live
    self.clock = clock
    self.trials, self.per_trial = trials, expected_cycles
    self.total = float(trials * expected_cycles)
    self.done = 0.0  # cycles counted as done (finished trials count in full)
    self.anchor: tuple[float, float] | None = None  # (time, cycles done) where the rate is measured from
    self.partial = 0.0  # the share of the cycle(s) being trained
    self.finished = 0
    self.seen_record = False
    self.epochs_per_cycle: list[int] = []
    self.status = {'trial': '', 'label': '', 'cycle': '', 'epoch': '', 'val': ''}
    self.started = clock()
    self._progress = None
    self._task = None

  # -- the numbers ----------------------------------------------------------------------------

  def fraction_done(self) -> float:
    return 0.0 if self.total <= 0 else min((self.done + self.partial) / self.total, 1.0)

  def eta(self) -> float | None:
    """Seconds left at this invocation's rate (None until a cycle after the first was trained)."""
    if self.anchor is None:
      return None
    gained = self.done + self.partial - self.anchor[1]
    if gained <= 0:
      return None
    left = max(self.total - self.done - self.partial, 0.0)
    return (self.clock() - self.anchor[0]) * left / gained

  def elapsed(self) -> float:
    return self.clock() - self.started

  def description(self) -> str:
    s = self.status
    parts = [s['trial'], s['label'], s['cycle'] and f'cycle {s["cycle"]}', s['epoch'] and f'epoch {s["epoch"]}',
             s['val'] and f'val acc {s["val"]}']
    return '  '.join(p for p in parts if p)

  # -- events ---------------------------------------------------------------------------------

  def __call__(self, event: dict[str, Any]) -> None:
    kind = event.get('event')
    if kind == 'start':
      self.trials = int(event['trials'])
      self.finished = int(event['finished'])
      self.total = float(max(self.trials * self.per_trial, self.total))
      self.done = float(min(event['records'], self.total))
      self.started, self.anchor, self.seen_record = self.clock(), None, False
      self.status['trial'] = self._trial_text(1)
      self.start()
    elif kind == 'epoch':
      if self.anchor is None and self.seen_record:  # the first epoch after the first record(s)
        self.anchor = (self.clock(), self.done)
      self._on_epoch(event)
    elif kind == 'record':
      self._on_record(event['record'], bool(event['finished']))
    self._refresh()
    if kind == 'record' and self._progress is not None:
      self._progress.refresh()  # the counts change once a cycle: show them now

  def _trial_text(self, lanes: int) -> str:
    if lanes > 1:
      return f'{lanes} trials at once'
    return f'trial {min(self.finished + 1, self.trials)}/{self.trials}'

  def _on_epoch(self, event: dict[str, Any]) -> None:
    labels, epochs, vals, done = event['labels'], event['epochs'], event['val_accuracy'], event['done']
    n = len(labels)
    self.status['trial'] = self._trial_text(n)
    self.status['label'] = ' '.join(labels[0].split()) if n == 1 else ''
    self.status['cycle'] = str(event['cycle'])
    self.status['epoch'] = str(max(epochs, default=0))
    live_vals = [v for v, d in zip(vals, done) if not d] or list(vals)
    if n == 1:
      self.status['val'] = f'{vals[0]:.4f}'
    elif live_vals:
      self.status['val'] = f'{min(live_vals):.4f}-{max(live_vals):.4f}'
    if self.epochs_per_cycle:
      typical = max(sum(self.epochs_per_cycle) / len(self.epochs_per_cycle), 1.0)
      self.partial = sum(1.0 if d else min(e / typical, 0.9) for e, d in zip(epochs, done))
      self.partial = min(self.partial, max(self.total - self.done, 0.0))

  def _on_record(self, record: dict[str, Any], finished: bool) -> None:
    self.partial, self.seen_record = 0.0, True
    cycles = int(record.get('cycle', 0)) + 1  # the trial's records so far (cycles run 0, 1, ...)
    self.done += 1
    if cycles > self.per_trial:  # a trial longer than expected: its extra cycle adds to the total
      self.total += 1
    if finished:
      self.finished += 1
      self.done += max(self.per_trial - cycles, 0)  # stopped early: the cycles it skips are done
    if 'epochs_trained' in record:
      self.epochs_per_cycle.append(int(record['epochs_trained']))
    self.status['trial'] = self._trial_text(1)

  # -- output ---------------------------------------------------------------------------------

  def log(self, message: str) -> None:
    """One line of the run: above the bar on a terminal, else with elapsed time and ETA in front."""
    if self.live and self._progress is not None:
      # rich redraws the bar below a printed line as last rendered: render it afresh first (else it can
      # lag the line by up to a refresh period, 0.25 s, which is many epochs of a small model).
      self._progress.refresh()
      self._progress.console.print(message, markup=False, highlight=False, soft_wrap=True)
    elif self.live:
      print(message, file=self.stream, flush=True)
    else:
      print(f'[{format_seconds(self.elapsed())} eta {format_seconds(self.eta())}] {message}', file=self.stream,
            flush=True)

  def start(self) -> None:
    if not self.live or self._progress is not None:
      return
    self._progress = _two_line_progress(self.stream)
    self._task = self._progress.add_task(self.description(), total=max(self.total, 1.0), eta=format_seconds(None))
    self._progress.start()

  def _refresh(self) -> None:
    if self._progress is None:
      return
    self._progress.update(self._task, description=self.description(), total=max(self.total, 1.0),
                          completed=self.done + self.partial, eta=format_seconds(self.eta()))

  def close(self) -> None:
    """Draws the final state and stops the live display; the bar's last state stays on screen (idempotent)."""
    if self._progress is not None:
      self._refresh()
      self._progress.stop()
      self._progress = None

  def __enter__(self) -> 'ProgressMonitor':
    self.start()
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _two_line_progress(stream: TextIO):
  """A rich Progress drawn as two lines, so it fits an 80-column terminal: the status (the task's
  description), then the bar with percent, elapsed time and ETA."""
  from rich.console import Console
  from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
  from rich.text import Text

  class TwoLines(Progress):
    def get_renderables(self):
      for task in self.tasks:
        yield Text(task.description, no_wrap=True, overflow='ellipsis')
      yield self.make_tasks_table(self.tasks)

  return TwoLines(BarColumn(bar_width=None), TaskProgressColumn(), TimeElapsedColumn(),
                  TextColumn('eta {task.fields[eta]}'), console=Console(file=stream, force_terminal=True),
                  refresh_per_second=4, expand=True)
