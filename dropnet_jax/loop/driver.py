"""The one resumable loop: groups of trials advanced cycle by cycle, one checkpoint format.

A *trial* is one run of an iterative pruning method (DropNet: a seed and a
criterion). Every cycle of a trial restarts from its seed's θ0 with the
trial's current mask, trains with early stopping, is measured, and the
method's `advance` records it and picks the next mask (or stops the trial).
The loop knows masks only as opaque pytrees and criteria only through
`advance`.

Trials run in *groups*: all trials of a group train their cycle together as
lanes of one program (`lanes.Lanes`); a group of one trial uses the one-trial
programs (`lanes.OneLane`). A group of one is the sequential mode, one group
of everything is `--batch_trials`; the records are the same either way (the
masks exactly, the numbers to float rounding). Cycle 0 trains the full
network from θ0, the same computation for every trial of a seed, so it is
trained once per seed (in the group that first needs it) and shared
(`dense`). A group's lane count never changes between cycles (stopped trials
and padding are frozen "done" lanes), so nothing recompiles.

That is the *barrier* schedule: every lane of a group starts cycle c together
and waits for the group's slowest early stop before cycle c+1. The
*continuous* schedule (`continuous.Continuous`, `schedule='continuous'`) runs
the same trials through the same method, lanes and checkpoints without the
barrier: a lane whose cycle ends is measured alone, its trial advances and
the lane restarts at once with the trial's next cycle (or the next waiting
trial), while the others train on; `lanes` may be fewer than the trials. At
the end of a batched run one log line gives the lanes' occupancy (useful
lane-epochs / lane-epochs spent: what lockstep lanes on an accelerator pay).

Checkpoints (the position is offered at every epoch and cycle end; the
checkpointer saves it when due, see `runs.checkpoint`, and on an interrupt
and at the end) hold the whole position: the trials' masks, records and stop
flags, θ0 of the current group's seeds, the shared dense outcomes still
needed, and a mid-cycle training state of the group. A rerun continues from
the newest checkpoint and gives the same records (up to wall-clock
`seconds`) as an uninterrupted run. The format is `state`'s; what a run
writes and reports (checkpoints, saved params, records, log, progress,
learning curves) is its `RunIO`. Everything reported per epoch comes from one
host read of the lanes' small scalars after the epoch, none per step.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from dropnet_jax.loop import state as state_lib
from dropnet_jax.loop.epoch_report import report_epoch
from dropnet_jax.loop.measure import measure
# Trial, Outcome and the checkpoint format live in `state`; importable from here as before.
from dropnet_jax.loop.state import CHECKPOINT_VERSION, Outcome, Position, Trial, stack  # noqa: F401
from dropnet_jax.models.layers import StatSums
from dropnet_jax.training import trainer as train_lib
from dropnet_jax.training.trainer import DeviceData, FitState


def log_info(line: str) -> None:
  """RunIO's default `log`: the line through absl logging at INFO, so a library call is quiet unless
  logging asks for it (`-v` / `logging.set_verbosity(logging.INFO)`); entry points pass their own."""
  logging.info('%s', line)


@dataclasses.dataclass
class RunIO:
  """What a run writes and reports as it goes; a bare RunIO() runs in memory and logs at INFO."""
  checkpointer: Any = None  # runs.checkpoint.Checkpointer, offered the position at epoch and cycle ends (None: none)
  checkpoint_every_epochs: int = 0  # also force a checkpoint every N epochs inside a cycle (0: policy only)
  params_store: Any = None  # runs.saved_params.ParamsStore: the trained θ of finished cycles (None: nothing saved)
  # All records so far, after every cycle (and once on resume, with the restored ones).
  on_record: Callable[[list[dict[str, Any]]], None] | None = None
  log: Callable[[str], None] = log_info  # the run's lines: one per cycle, resume notes, per-epoch lines
  log_epochs: bool = False  # also a `log` line per trained epoch of every lane
  # The run as events, for a progress display: {'event': 'start', 'trials', 'finished', 'records'},
  # {'event': 'epoch', 'cycle', 'labels', 'epochs', 'val_accuracy', 'done'} (one entry per lane being
  # trained) and {'event': 'record', 'record', 'finished'} (after each trial's cycle).
  monitor: Callable[[dict[str, Any]], None] | None = None
  # Learning curves (`CurveSink`, e.g. runs.curves.CurveWriter): a row per trial x cycle x trained epoch.
  curves: 'CurveSink | None' = None
  # What the run's results depend on (settings, data fingerprint): stored in every checkpoint and
  # compared on restore, so a checkpoint is never continued under other settings or data.
  stamp: dict[str, Any] | None = None


class CurveSink(Protocol):
  """Where the learning curves go. `start(keep)` comes first, once per run: of the rows an earlier
  invocation wrote, keep those with keep(row) true (the restored checkpoint accounts for them; the
  others are trained again). Then `add(rows)` after every epoch: one row per trial of each lane that
  trained it, {'seed', 'metric', 'cycle', 'epoch', 'train_loss', 'train_accuracy', 'val_loss',
  'val_accuracy', 'lr'} (lr: in force at the epoch's last step; None when the optimiser has none)."""

  def start(self, keep: Callable[[dict[str, Any]], bool]) -> None: ...
  def add(self, rows: list[dict[str, Any]]) -> None: ...


class Method(Protocol):
  """What the loop needs from an iterative pruning method (DropNet: `dropnet.DropNetMethod`)."""
  score_from: str
  score_params: str

  def theta0(self, seed: int) -> Any: ...
  def full_mask(self) -> Any: ...
  def shuffle_key(self, seed: int, cycle: int) -> jax.Array: ...
  def mask_fields(self, mask: Any) -> dict[str, Any]: ...
  def sums_template(self) -> StatSums: ...
  # Records `outcome` (the trial's current cycle) and sets the trial's next mask or stops it. The
  # continuous schedule calls it whenever a lane's cycle ends, so it must read only its own trial.
  def advance(self, trial: Trial, outcome: Outcome, dense: Outcome) -> None: ...
  # Optional: `dense_start(seed) -> (θ, epochs)` (a loaded dense network, `dense_start` below) and
  # `recorded_weight_mask(trial)` (the weight mask saved with θ, `save_cycle` below).


SCHEDULES = ('barrier', 'continuous')


@dataclasses.dataclass
class Occupancy:
  """Lane-epochs of this invocation: `useful` (a lane training its trial), `spent` (every lane of
  every lockstep epoch, as an accelerator computing all lanes together pays)."""
  schedule: str
  lanes: int
  useful: int = 0
  spent: int = 0

  def line(self) -> str:
    share = self.useful / self.spent if self.spent else 1.0
    return (f'lanes: {self.schedule} schedule, {self.lanes} lanes, occupancy {100 * share:.1f}% '
            f'({self.useful} useful lane-epochs of {self.spent} spent)')


class Driver:
  """Runs `trials` of `method` to the end in groups of `group_size` (None: one group of all), or with
  `schedule='continuous'` on `lanes` lanes (None: one per trial) without a barrier between cycles."""

  def __init__(self, method: Method, trials: list[Trial], runner, data: DeviceData, *,
               group_size: int | None = None, io: RunIO | None = None, schedule: str = 'barrier',
               lanes: int | None = None):
    if schedule not in SCHEDULES:
      raise ValueError(f'schedule must be one of {SCHEDULES}, got {schedule!r}')
    if schedule == 'continuous':
      if not runner.batched:
        raise ValueError('the continuous schedule trains lanes: it needs batched programs (Lanes)')
      group_size = lanes
    if group_size is not None and group_size < 1:
      raise ValueError(f'lanes / group size must be positive, got {group_size}')
    size = max(1, min(group_size or len(trials), len(trials)))  # never more lanes than trials
    if not runner.batched and size != 1:
      raise ValueError('one-trial programs (OneLane) need groups of one trial')
    self.method, self.trials, self.runner, self.data, self.schedule = method, trials, runner, data, schedule
    self.groups = [trials[i:i + size] for i in range(0, len(trials), size)]
    self.io = io or RunIO()
    self.lane_count = runner.pad(size) if runner.batched else 1
    self.pos = Position()
    self.occupancy = Occupancy(schedule, self.lane_count)

  def records(self) -> list[dict[str, Any]]:
    return [r for t in self.trials for r in t.records]

  # -- the loop -------------------------------------------------------------------------------

  def run(self) -> list[dict[str, Any]]:
    checkpointer = self.io.checkpointer
    try:
      records = self._run()
      if checkpointer is not None:
        checkpointer.save_unsaved()  # the final position, unless it was saved when offered
        checkpointer.wait()  # the final checkpoint is on disk when the run returns
      return records
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: save the newest position offered (an epoch or cycle end)
      if checkpointer is not None:
        try:
          if jax.process_count() == 1:  # several processes: only the save in flight (they may not all stop)
            checkpointer.save_unsaved()
        finally:
          checkpointer.wait()
      raise
    except BaseException:
      # A crash: let an asynchronous checkpoint save in flight finish, so the newest checkpoint on disk
      # is whole.
      if checkpointer is not None:
        checkpointer.wait()
      raise

  def _run(self) -> list[dict[str, Any]]:
    if self.schedule == 'continuous':
      from dropnet_jax.loop.continuous import Continuous  # it builds on this module
      records = Continuous(self).run()
    else:
      records = self._run_barrier()
    if self.runner.batched:
      self.io.log(self.occupancy.line())
    return records

  def _run_barrier(self) -> list[dict[str, Any]]:
    io = self.io
    if self._restore():
      io.log(self._resume_note())
      if io.on_record and self.records():
        io.on_record(self.records())
    if io.curves is not None:
      current = self.groups[self.pos.group] if self.pos.group < len(self.groups) else []
      io.curves.start(state_lib.curve_rows_kept(self.trials, self.pos, [t for t in current if not t.stopped]))
    if io.monitor:
      io.monitor({'event': 'start', 'trials': len(self.trials), 'finished': sum(t.stopped for t in self.trials),
                  'records': len(self.records())})
    while self.pos.group < len(self.groups):
      group = self.groups[self.pos.group]
      active = [t for t in group if not t.stopped]
      if not active:
        self._next_group()
        self._save(cycle_end=True)
        continue
      for seed in sorted({t.seed for t in group}):
        if seed not in self.pos.theta0:
          self.pos.theta0[seed] = self.method.theta0(seed)
      cycle = active[0].cycle
      if cycle == 0 and any(t.seed not in self.pos.dense for t in active):
        seeds = sorted({t.seed for t in active if t.seed not in self.pos.dense})
        lanes = [(s, self.method.full_mask(), *dense_start(self.method, s)) for s in seeds]
        # The shared dense cycle is cycle 0 of every trial of its seed: its curves go to each of them.
        owners = [[(t.seed, t.metric) for t in self.trials if t.seed == s] for s in seeds]
        for seed, outcome in zip(seeds, self._train('dense', 0, lanes, [f'seed {s} {"dense":>12}' for s in seeds],
                                                    owners)):
          self.pos.dense[seed] = outcome
      if cycle == 0:
        outcomes = [self.pos.dense[t.seed] for t in active]
      else:
        outcomes = self._train('cycle', cycle, [(t.seed, t.mask, t.theta, t.epochs) for t in active],
                               [f'seed {t.seed} {t.metric:>12}' for t in active], [[(t.seed, t.metric)] for t in active])
      for trial, outcome in zip(active, outcomes):
        self.method.advance(trial, outcome, self.pos.dense[trial.seed])
        if io.params_store is not None:
          save_cycle(io.params_store, self.method, trial, outcome.best_theta)
        if io.monitor:
          io.monitor({'event': 'record', 'record': trial.records[-1], 'finished': trial.stopped})
      if all(t.stopped for t in group):
        self._next_group()
      self._save(cycle_end=True)
      if io.on_record:
        io.on_record(self.records())
    return self.records()

  def _resume_note(self) -> str:
    """Where a resumed run continues, in the user's terms: trials (seed x metric), cycles, epochs."""
    count = len(self.records())
    note = f'resuming from the checkpoint: {count} record{"s" * (count != 1)} so far'
    if self.pos.group >= len(self.groups):
      return f'{note}; every trial has finished'
    group, total = self.groups[self.pos.group], len(self.trials)
    first = sum(len(g) for g in self.groups[:self.pos.group]) + 1
    if len(group) == 1:
      where = f'trial {first} of {total} (seed {group[0].seed}, {group[0].metric})'
    else:
      where = f'trials {first}-{first + len(group) - 1} of {total} (trained together)'
    if self.pos.fit is not None:
      cycle = self.pos.fit_meta['cycle']
      dense = ' (the dense network)' if self.pos.fit_meta['phase'] == 'dense' else ''
      return f'{note}; {where}, cycle {cycle}{dense} at epoch {int(np.max(self.pos.fit.epoch))}'
    active = [t for t in group if not t.stopped]
    return f'{note}; {where}' + (f', from cycle {active[0].cycle}' if active else '')

  def _next_group(self) -> None:
    """Moves on; keeps θ0 and dense outcomes only for seeds a later trial still needs."""
    self.pos.group += 1
    needed = {t.seed for g in self.groups[self.pos.group:] for t in g if not t.stopped}
    self.pos.dense = {s: o for s, o in self.pos.dense.items() if s in needed}
    self.pos.theta0 = {s: th for s, th in self.pos.theta0.items() if s in needed}

  def _train(self, phase: str, cycle: int, lanes: list[tuple[int, Any, Any, int | None]],
             labels: list[str], owners: list[list[tuple[int, str]]]) -> list[Outcome]:
    """Trains (seed, mask, start θ or None for θ0, epoch limit or None) lanes to early stopping;
    an Outcome per lane. `owners`: per lane, the (seed, metric) of the trials whose cycle it is."""
    started = time.perf_counter()
    n, count = len(lanes), self.lane_count
    resumed = self.pos.fit is not None and self.pos.fit_meta['phase'] == phase
    seconds = self.pos.fit_meta['seconds'] if resumed else 0.0
    if resumed:
      state = self.pos.fit
    else:
      state = init_lanes(self.runner, [(self.pos.theta0[s] if theta is None else theta, mask,
                                        self.method.shuffle_key(s, cycle)) for s, mask, theta, _ in lanes], count)
      if any(e is not None for *_, e in lanes):
        limits = [int(state.max_epochs.reshape(-1)[0]) if e is None else e for *_, e in lanes]
        limits += limits[:1] * (count - n)  # padding lanes copy the first lane
        state = state._replace(max_epochs=jnp.asarray(limits if self.runner.batched else limits[0], jnp.int32))
        state = state._replace(done=state.done | (state.max_epochs == 0))  # 0 epochs: evaluated as given
    self.pos.fit, self.pos.fit_meta = None, None
    # Per lane, the last epoch whose curve rows were given (a resumed state's epochs were given before).
    reported = np.asarray(state.epoch).reshape(-1).tolist() if resumed else [0] * count
    previous = np.asarray(state.epoch).reshape(-1)[:n]

    def on_epoch(state: FitState) -> None:
      nonlocal started, seconds, previous
      if self.io.log_epochs or self.io.monitor or self.io.curves is not None:
        report_epoch(self.io, self.runner, state, range(n), labels, [cycle] * n, owners, reported)
      epochs = np.asarray(state.epoch).reshape(-1)
      self.occupancy.useful += int(np.sum(epochs[:n] - previous))
      self.occupancy.spent += count
      previous = epochs[:n]
      epoch = int(np.max(epochs))
      every = self.io.checkpoint_every_epochs
      # Offered at every epoch end (saved when due or forced, else kept for an interrupt's save).
      if self.io.checkpointer is not None and not np.all(np.asarray(state.done)):
        seconds += time.perf_counter() - started
        started = time.perf_counter()
        self.pos.fit, self.pos.fit_meta = state, {'phase': phase, 'cycle': cycle, 'seconds': seconds}
        self._save(force=bool(every) and epoch % every == 0)
        self.pos.fit, self.pos.fit_meta = None, None

    state = train_lib.fit(self.runner.epoch_step, state, self.data, on_epoch)
    active = [i < n for i in range(count)]
    return measure(self.runner, state, self.data, self.method, seconds + time.perf_counter() - started,
                   active)[:n]

  # -- checkpoints (the format: `state`) ------------------------------------------------------

  def _save(self, force: bool = False, cycle_end: bool = False) -> None:
    """Offers the position to the checkpointer (`state.save`), which saves it when due or forced."""
    if self.io.checkpointer is not None:
      state_lib.save(self.io.checkpointer, self.trials, self.pos, self.io.stamp, force=force, cycle_end=cycle_end)

  def _restore(self) -> bool:
    """Continues from the newest readable checkpoint, if there is one."""
    if self.io.checkpointer is None:
      return False
    pos = state_lib.restore(self.io.checkpointer, self.method, self.runner, self.lane_count, self.trials,
                            self.io.stamp)
    if pos is None:
      return False
    saved = (pos.fit_meta or {}).get('schedule', 'barrier') if pos.fit is not None else self.schedule
    if saved != self.schedule:
      raise state_lib.CheckpointError(f'{self.io.checkpointer.directory} holds a checkpoint of the {saved} '
                                      f'schedule; resume it with that schedule or use another output directory')
    self.pos = pos
    return True


def dense_start(method: Method, seed: int) -> tuple[Any, int | None]:
  """(θ the seed's dense cycle starts from, its epoch limit): the method's `dense_start` if it has one
  (a loaded network: (θ, 0), evaluated as given), else (None, None): trained from θ0 for the config's."""
  start = getattr(method, 'dense_start', None)
  return start(seed) if start is not None else (None, None)


def save_cycle(store, method: Method, trial: Trial, theta: Any) -> None:
  """`store.saved_cycle` for the trial's newest record, with the weight mask it was trained under for
  methods that prune weights (`recorded_weight_mask`; their mask and sparse form are saved too)."""
  recorded = getattr(method, 'recorded_weight_mask', None)
  mask = recorded(trial) if recorded is not None else None
  if mask is None:
    store.saved_cycle(trial, theta)
  else:
    store.saved_cycle(trial, theta, weight_mask=mask)


def init_lanes(runner, lanes: Sequence[tuple[Any, Any, jax.Array]], count: int = 1) -> FitState:
  """The training state that starts `lanes` ((start θ, mask, shuffle key) each) on `runner`.

  `OneLane`: the one trial's state. `Lanes`: `count` lanes (`runner.pad`ed by the caller); the ones
  past `lanes` are padding, copies of the first lane marked done from the start, so they are frozen
  and cost nothing while the lane count, and so the compiled programs, stay the same."""
  if not runner.batched:
    if len(lanes) != 1:
      raise ValueError(f'one-trial programs (OneLane) start one trial, got {len(lanes)}')
    return runner.init_fit(*lanes[0])
  n = len(lanes)
  padded = list(lanes) + [lanes[0]] * (count - n)
  state = runner.init_fit(stack([t for t, _, _ in padded]), stack([m for _, m, _ in padded]),
                          jnp.stack([k for *_, k in padded]))
  return state._replace(done=jnp.arange(count) >= n)
