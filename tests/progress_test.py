"""The progress monitor: cycle estimate, ETA arithmetic, plain lines off a terminal, a bar on one."""

from __future__ import annotations

import io
import re

import pytest

from dropnet_jax.runs.progress import ProgressMonitor, expected_cycles, format_seconds


class Clock:
  def __init__(self):
    self.now = 0.0

  def __call__(self) -> float:
    return self.now


def record(metric: str, cycle: int, epochs: int = 10) -> dict:
  return {'seed': 0, 'metric': metric, 'cycle': cycle, 'epochs_trained': epochs, 'val_accuracy': 0.9}


def epoch(cycle: int, label: str, e: int, val: float = 0.5, done: bool = False) -> dict:
  return {'event': 'epoch', 'cycle': cycle, 'labels': [label], 'epochs': [e], 'val_accuracy': [val], 'done': [done]}


def test_expected_cycles_by_hand():
  # 80 units, p=0.2, drop max(floor(0.2 n), 1): 80 64 52 42 34 28 23 19 16 13 11 9 8 -> 8/80 = 0.1 <= floor
  # after 12 drops: 13 records. Per layer (40 each): 40 32 26 21 17 14 12 10 8 7 6 5 4: 13 as well.
  assert expected_cycles([40, 40], 0.2, 0.1) == 13
  # 16 -> 8 (0.5) -> 4 (0.25 <= 0.3): 3 records.
  assert expected_cycles([8, 8], 0.5, 0.3) == 3
  # An unreachable floor: counting stops at 1 unit. Global 4 -> 2 -> 1 (3 records); per layer
  # [2, 2] -> [1, 1] (2 records); the larger count is returned.
  assert expected_cycles([2, 2], 0.5, 0.01) == 3
  # Uneven layers: global 101 -> 81 -> 65 (0.64 <= 0.7), 3 records; per layer 100->80, 1 stays: 81/101 > 0.7,
  # then 64+1 = 65: also 3.
  assert expected_cycles([100, 1], 0.2, 0.7) == 3


def test_format_seconds():
  assert format_seconds(0) == '0:00:00'
  assert format_seconds(3725.4) == '1:02:05'
  assert format_seconds(None) == '-:--:--'
  assert format_seconds(float('nan')) == '-:--:--'


def test_eta_counts_cycles_from_the_first_training_after_the_first_record():
  clock = Clock()
  out = io.StringIO()
  m = ProgressMonitor(2, 3, stream=out, live=False, clock=clock)  # 2 trials x 3 cycles = 6
  m({'event': 'start', 'trials': 2, 'finished': 0, 'records': 0})
  clock.now = 5.0
  m(epoch(0, 'seed 0 dense', 4))
  assert m.eta() is None  # nothing finished yet
  clock.now = 10.0  # the dense cycle (with compilation) is cycle 0 of both trials
  m({'event': 'record', 'record': record('min', 0), 'finished': False})
  m({'event': 'record', 'record': record('max', 0), 'finished': False})
  assert m.eta() is None  # the rate is not measured over the compilation
  m(epoch(1, 'seed 0 min', 1))  # anchors at t=10 with 2 cycles done
  clock.now = 12.0
  m({'event': 'record', 'record': record('min', 1), 'finished': False})
  # 1 cycle in 2 s, 3 left: 6 s.
  assert m.fraction_done() == pytest.approx(3 / 6)
  assert m.eta() == pytest.approx(6.0)
  # Half-way through the next cycle by epochs (10 per cycle so far): 0.5 of a cycle more done.
  m(epoch(2, 'seed 0 min', 5))
  clock.now = 13.0
  assert m.fraction_done() == pytest.approx(3.5 / 6)
  assert m.eta() == pytest.approx(3.0 * 2.5 / 1.5)
  # min stops at cycle 2 as expected; max stops early at cycle 1: its cycle 2 counts as done.
  clock.now = 14.0
  m({'event': 'record', 'record': record('min', 2), 'finished': True})
  m({'event': 'record', 'record': record('max', 1), 'finished': True})
  assert m.fraction_done() == 1.0 and m.eta() == pytest.approx(0.0)
  assert m.finished == 2


def test_a_trial_longer_than_expected_grows_the_total():
  m = ProgressMonitor(1, 2, stream=io.StringIO(), live=False, clock=Clock())
  m({'event': 'start', 'trials': 1, 'finished': 0, 'records': 0})
  for c in range(4):
    m({'event': 'record', 'record': record('min', c), 'finished': c == 3})
  assert m.total == 4 and m.done == 4 and m.fraction_done() == 1.0


def test_resumed_records_count_as_done_but_not_towards_the_rate():
  clock = Clock()
  m = ProgressMonitor(2, 5, stream=io.StringIO(), live=False, clock=clock)
  m({'event': 'start', 'trials': 2, 'finished': 1, 'records': 7})
  assert m.fraction_done() == pytest.approx(0.7)
  assert m.status['trial'] == 'trial 2/2'
  clock.now = 100.0
  assert m.eta() is None


def test_off_a_terminal_only_the_log_lines_are_printed_with_elapsed_and_eta():
  clock = Clock()
  out = io.StringIO()
  with ProgressMonitor(1, 2, stream=out, clock=clock) as m:  # StringIO is no TTY: live is off
    assert not m.live
    m({'event': 'start', 'trials': 1, 'finished': 0, 'records': 0})
    for e in range(1, 30):
      m(epoch(0, 'seed 0 dense', e))
    clock.now = 4.0
    m.log('seed 0 min cycle 0 done')
    m({'event': 'record', 'record': record('min', 0), 'finished': False})
    m(epoch(1, 'seed 0 min', 1))
    clock.now = 6.0
    m.log('seed 0 min cycle 1 done')
    m({'event': 'record', 'record': record('min', 1), 'finished': True})
  lines = out.getvalue().splitlines()
  # At 6 s: 1 epoch of the usual 10 in the 2 s since the rate's anchor, 0.9 cycles left: 18 s.
  assert lines == ['[0:00:04 eta -:--:--] seed 0 min cycle 0 done', '[0:00:06 eta 0:00:18] seed 0 min cycle 1 done']
  assert '\x1b' not in out.getvalue() and '\r' not in out.getvalue()


def test_on_a_terminal_a_bar_shows_trial_cycle_epoch_and_val_accuracy():
  clock = Clock()
  out = io.StringIO()
  with ProgressMonitor(2, 3, stream=out, live=True, clock=clock) as m:
    m({'event': 'start', 'trials': 2, 'finished': 0, 'records': 0})
    m(epoch(0, 'seed 0        dense', 3, val=0.8125))
    m._progress.refresh()
    m.log('a line above the bar')
    clock.now = 2.0
    m({'event': 'record', 'record': record('min', 0), 'finished': False})
    m({'event': 'record', 'record': record('max', 0), 'finished': False})
    m(epoch(1, 'seed 0          min', 7, val=0.9375))
    m._progress.refresh()
  text = re.sub(r'\x1b\[[0-9;?]*[A-Za-z]', '', out.getvalue())
  assert 'trial 1/2  seed 0 dense  cycle 0  epoch 3  val acc 0.8125' in text
  assert 'trial 1/2  seed 0 min  cycle 1  epoch 7  val acc 0.9375' in text
  assert 'a line above the bar' in text
  assert '45%' in text  # 2 of 6 cycles, and 7 of the usual 10 epochs of a third
  assert '\x1b[' in out.getvalue()  # drawn with terminal control codes


def test_batched_lanes_show_the_range_of_val_accuracy():
  m = ProgressMonitor(3, 2, stream=io.StringIO(), live=False, clock=Clock())
  m({'event': 'start', 'trials': 3, 'finished': 0, 'records': 0})
  m({'event': 'epoch', 'cycle': 2, 'labels': ['a', 'b', 'c'], 'epochs': [4, 5, 3], 'val_accuracy': [0.5, 0.75, 0.6],
     'done': [False, False, True]})
  assert m.description() == '3 trials at once  cycle 2  epoch 5  val acc 0.5000-0.7500'


def test_rejects_nonsense():
  with pytest.raises(ValueError):
    ProgressMonitor(1, 0)
