"""The driver's continuous schedule: lanes that never wait for each other.

Why: under the barrier schedule (`driver.Driver`) a group's lanes start every
cycle together, so a lane whose trial early-stopped idles until the slowest
lane of that cycle stops. On an accelerator all lanes are computed in
lockstep, so the idle lanes are paid for: the default digits run keeps its
lanes about 2/3 busy, 90 trials (15 seeds x 6 metrics) well under half.

Here each lane runs a *job*: one trial's next cycle, or one seed's dense
cycle (cycle 0, shared by the seed's trials). When a lane's job ends (early
stop, epoch limit, divergence) that lane alone is measured, the method's
`advance` records the trial and picks its next mask (or stops it), and the
lane starts its next job at once: the waiting job of the lowest cycle (see
`_next_job`). The other lanes train on. There may be fewer lanes than trials
(e.g. 16 lanes for 90 trials, for memory): trials wait for a lane.

The rest is the driver's: the trials, the method, θ0 and the shuffle key per
(seed, cycle), the lanes' programs, `measure`, the checkpoint format
(`state`), `RunIO`. A cycle's computation does not depend on the lane it
trains in or when it starts, so the records are the sequential run's (masks
exactly, numbers to float rounding). That needs a method whose `advance`
reads only its own trial: DropNet's does; magnitude's lottery_reinit trials
follow their sibling cycle by cycle and keep the barrier.

Nothing recompiles when a lane changes job: the lane count is fixed, a job's
fresh state is written into its lane with `lanes.put_lane` and finished lanes
are measured in gathers of a fixed `MEASURE_WIDTH` lanes (`lanes.take_lanes`);
lane indices are traced arguments. Checkpoints (and `RunIO.on_record`):
every `checkpoint_every_epochs` lockstep epochs and at the end (with 0, after
every epoch in which a lane's cycle ended: with many lanes that is nearly
every epoch, and a save of all lanes can cost more than the epoch); besides,
the position is offered at every lockstep epoch to the checkpointer's time
policy (`runs.checkpoint`). The position is the barrier's, with the lanes' jobs in its meta, so a rerun
continues every lane at its own cycle and epoch.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax.numpy as jnp
import numpy as np

from dropnet_jax.loop import state as state_lib
from dropnet_jax.loop.driver import Driver, Outcome, Trial, dense_start, init_lanes, save_cycle
from dropnet_jax.loop.measure import measure
from dropnet_jax.loop.epoch_report import report_epoch
from dropnet_jax.training.lanes import put_lane, take_lanes
from dropnet_jax.training.trainer import FitState

MEASURE_WIDTH = 8  # finished lanes are measured this many at a time (one compiled evaluation)


@dataclasses.dataclass
class Job:
  """What one lane trains: a trial's current cycle, or a seed's dense cycle (cycle 0, shared)."""
  phase: str  # 'cycle' or 'dense'
  seed: int
  trial: int | None  # index of the trial in the driver's trials ('cycle' jobs)
  cycle: int
  seconds: float = 0.0  # wall-clock so far: every lockstep epoch the lane trained in, as the barrier counts


class Continuous:
  """Runs a `driver.Driver`'s trials to the end on its `lane_count` lanes without a barrier."""

  def __init__(self, driver: Driver):
    self.d = driver
    self.count = driver.lane_count
    self.width = driver.runner.pad(min(self.count, MEASURE_WIDTH))
    self.jobs: list[Job | None] = [None] * self.count
    self.steps = 0  # lockstep epochs of the run, over invocations (for checkpoint_every_epochs)
    self.epochs = np.zeros(self.count, np.int64)  # each lane's epochs trained, as last read

  # -- the loop -------------------------------------------------------------------------------

  def run(self) -> list[dict[str, Any]]:
    d, io = self.d, self.d.io
    state = None
    if d._restore():
      if d.pos.fit is not None:
        self.jobs = [None if j is None else Job(**j) for j in d.pos.fit_meta['lanes']]
        self.steps, state = d.pos.fit_meta['steps'], d.pos.fit
        self.epochs = np.asarray(state.epoch).astype(np.int64)
      d.pos.fit, d.pos.fit_meta = None, None
      io.log(self._resume_note())
      if io.on_record and d.records():
        io.on_record(d.records())
    reported = self.epochs.tolist()  # per lane, the last epoch whose curve rows were given
    if io.curves is not None:
      io.curves.start(state_lib.curve_rows_kept(d.trials, d.pos, [], self._in_flight()))
    if io.monitor:
      io.monitor({'event': 'start', 'trials': len(d.trials), 'finished': sum(t.stopped for t in d.trials),
                  'records': len(d.records())})
    self._advance_from_dense()
    if state is None and any(not t.stopped for t in d.trials):
      state = self._blank()
    state = self._fill(state, reported)
    every, changed = io.checkpoint_every_epochs, False
    while any(j is not None for j in self.jobs):
      started = time.perf_counter()
      running = [i for i, j in enumerate(self.jobs) if j is not None]
      state = d.runner.epoch_step(state, d.data)
      done, epochs = (np.asarray(x) for x in (state.done, state.epoch))
      self.steps += 1
      d.occupancy.useful += int(np.sum(epochs[running] - self.epochs[running]))
      d.occupancy.spent += self.count
      self.epochs = epochs.astype(np.int64)
      if io.log_epochs or io.monitor or io.curves is not None:
        jobs = [self.jobs[i] for i in running]
        report_epoch(io, d.runner, state, running, [self._label(j) for j in jobs], [j.cycle for j in jobs],
                     [self._owners(j) for j in jobs], reported)
      elapsed = time.perf_counter() - started
      for i in running:
        self.jobs[i].seconds += elapsed
      finished = [i for i in running if done[i]]
      if finished:
        self._finish(state, finished)
        state = self._fill(state, reported)
        changed = True
      # Lanes end cycles nearly every epoch: saving (and rewriting the records) each time would cost more
      # than the training, so with checkpoint_every_epochs both happen every that many lockstep epochs.
      # The position is offered at every lockstep epoch (saved when due, else kept for an interrupt's save).
      forced = bool(every) and self.steps % every == 0 or all(j is None for j in self.jobs)
      self._save(state, force=forced, cycle_end=bool(finished) and not every)
      if (finished and not every) or forced:
        if changed and io.on_record:
          io.on_record(d.records())
        changed = False
    return d.records()

  def _fill(self, state: FitState | None, reported: list[int]) -> FitState | None:
    """Gives every idle lane its next job (while there are jobs), starting it from its fresh state."""
    for lane in range(self.count):
      if self.jobs[lane] is not None:
        continue
      job = self._next_job()
      if job is None:
        break
      self.jobs[lane] = job
      state = self._start(state, lane, job)
      self.epochs[lane], reported[lane] = 0, 0
    return state

  def _next_job(self) -> Job | None:
    """The waiting job of the lowest cycle (a dense cycle is cycle 0), the first trial's on a tie.

    Lowest cycle first keeps the trials abreast, so they end close together and few lanes idle at
    the end of the run (a lane that kept its trial to the end would leave the last trials to run
    alone); it starts every seed's dense cycle first, which makes all trials ready early."""
    d = self.d
    busy = {j.trial for j in self.jobs if j is not None and j.phase == 'cycle'}
    dense_busy = {j.seed for j in self.jobs if j is not None and j.phase == 'dense'}
    best = None
    for k, t in enumerate(d.trials):
      if t.stopped or k in busy:
        continue
      if t.cycle > 0:
        job = Job('cycle', t.seed, k, t.cycle)
      elif t.seed not in d.pos.dense and t.seed not in dense_busy:
        job = Job('dense', t.seed, None, 0)
      else:
        continue  # its seed's dense cycle is training
      if best is None or job.cycle < best.cycle:
        best = job
    return best

  def _start(self, state: FitState, lane: int, job: Job) -> FitState:
    d = self.d
    if job.phase == 'dense':
      theta, epochs = dense_start(d.method, job.seed)
      theta, mask = self._theta0(job.seed) if theta is None else theta, d.method.full_mask()
    else:
      trial = d.trials[job.trial]
      theta = self._theta0(trial.seed) if trial.theta is None else trial.theta
      mask, epochs = trial.mask, trial.epochs
    fresh = d.runner.init_one(theta, mask, d.method.shuffle_key(job.seed, job.cycle))
    if epochs is not None:  # 0 epochs: a loaded network, evaluated as given
      fresh = fresh._replace(max_epochs=jnp.asarray(epochs, jnp.int32), done=jnp.asarray(epochs == 0))
    return put_lane(state, jnp.asarray(lane, jnp.int32), fresh)

  def _finish(self, state: FitState, finished: list[int]) -> None:
    """Measures the `finished` lanes, advances their trials (dense: every trial of the seed) and
    frees the lanes; then forgets θ0 and dense outcomes no unstopped trial needs."""
    d = self.d
    outcomes: dict[int, Outcome] = {}
    for at in range(0, len(finished), self.width):
      chunk = finished[at:at + self.width]
      index = jnp.asarray(chunk + chunk[:1] * (self.width - len(chunk)), jnp.int32)
      active = [k < len(chunk) for k in range(self.width)]
      for lane, outcome in zip(chunk, measure(d.runner, take_lanes(state, index), d.data, d.method, 0.0, active)):
        outcome.fields['seconds'] += self.jobs[lane].seconds
        outcomes[lane] = outcome
    for lane in finished:
      if self.jobs[lane].phase == 'dense':
        d.pos.dense[self.jobs[lane].seed] = outcomes[lane]
    self._advance_from_dense()
    for lane in sorted((i for i in finished if self.jobs[i].phase == 'cycle'), key=lambda i: self.jobs[i].trial):
      trial = d.trials[self.jobs[lane].trial]
      assert trial.cycle == self.jobs[lane].cycle and not trial.stopped, (trial, self.jobs[lane])
      self._advance(trial, outcomes[lane])
    for lane in finished:
      self.jobs[lane] = None
    needed = {t.seed for t in d.trials if not t.stopped}
    d.pos.dense = {s: o for s, o in d.pos.dense.items() if s in needed}
    d.pos.theta0 = {s: th for s, th in d.pos.theta0.items() if s in needed}

  def _advance_from_dense(self) -> None:
    """Cycle 0 of every unstopped trial whose seed's dense cycle is trained: that dense outcome."""
    for trial in self.d.trials:
      if not trial.stopped and trial.cycle == 0 and trial.seed in self.d.pos.dense:
        self._advance(trial, self.d.pos.dense[trial.seed])

  def _advance(self, trial: Trial, outcome: Outcome) -> None:
    d = self.d
    d.method.advance(trial, outcome, d.pos.dense[trial.seed])
    if d.io.params_store is not None:
      save_cycle(d.io.params_store, d.method, trial, outcome.best_theta)
    if d.io.monitor:
      d.io.monitor({'event': 'record', 'record': trial.records[-1], 'finished': trial.stopped})

  # -- helpers --------------------------------------------------------------------------------

  def _theta0(self, seed: int):
    if seed not in self.d.pos.theta0:
      self.d.pos.theta0[seed] = self.d.method.theta0(seed)
    return self.d.pos.theta0[seed]

  def _blank(self) -> FitState:
    """`count` idle lanes (done from the start, so frozen and skipped) for `_fill` to write jobs into."""
    d = self.d
    seed = next(t.seed for t in d.trials if not t.stopped)
    state = init_lanes(d.runner, [(self._theta0(seed), d.method.full_mask(), d.method.shuffle_key(seed, 0))],
                       self.count)
    return state._replace(done=jnp.ones_like(state.done))

  def _label(self, job: Job) -> str:
    name = 'dense' if job.phase == 'dense' else self.d.trials[job.trial].metric
    return f'seed {job.seed} {name:>12}'

  def _owners(self, job: Job) -> list[tuple[int, str]]:
    """The (seed, metric) of the trials whose cycle the job is (a dense cycle: all of its seed's)."""
    if job.phase == 'dense':
      return [(t.seed, t.metric) for t in self.d.trials if t.seed == job.seed]
    trial = self.d.trials[job.trial]
    return [(trial.seed, trial.metric)]

  def _in_flight(self) -> dict[tuple[int, str, int], int]:
    """(seed, metric, cycle) -> epochs trained, of every lane's job (what a restored position holds)."""
    out = {}
    for lane, job in enumerate(self.jobs):
      if job is not None:
        out.update({(seed, metric, job.cycle): int(self.epochs[lane]) for seed, metric in self._owners(job)})
    return out

  def _resume_note(self) -> str:
    d = self.d
    count, total = len(d.records()), len(d.trials)
    note = (f'resuming from the checkpoint: {count} record{"s" * (count != 1)} so far, '
            f'{sum(t.stopped for t in d.trials)} of {total} trials finished')
    lanes = [f'{" ".join(self._label(j).split())} cycle {j.cycle} epoch {int(self.epochs[i])}'
             for i, j in enumerate(self.jobs) if j is not None]
    return note + (f'; lanes at {", ".join(lanes)}' if lanes else '')

  def _save(self, state: FitState | None, force: bool = False, cycle_end: bool = False) -> None:
    """Offers the position, with the lanes' state and jobs while any lane trains (`Driver._save`)."""
    d = self.d
    if d.io.checkpointer is None:
      return
    if any(j is not None for j in self.jobs):
      d.pos.fit = state
      d.pos.fit_meta = {'schedule': 'continuous', 'steps': self.steps,
                        'lanes': [None if j is None else dataclasses.asdict(j) for j in self.jobs]}
    d._save(force=force, cycle_end=cycle_end)
    d.pos.fit, d.pos.fit_meta = None, None
