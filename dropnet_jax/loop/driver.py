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

Checkpoints (after every cycle, and every `checkpoint_every_epochs` epochs
inside one) hold the whole position: the trials' masks, records and stop
flags, θ0 of the current group's seeds, the shared dense outcomes still
needed, and a mid-cycle training state of the group. A rerun continues from
the newest checkpoint and gives the same records (up to wall-clock
`seconds`) as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, NamedTuple, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dropnet_jax.training import trainer as train_lib
from dropnet_jax.runs.checkpoint import CheckpointError
from dropnet_jax.models.layers import StatSums
from dropnet_jax.training.trainer import DeviceData, FitState

CHECKPOINT_VERSION = 2


@dataclasses.dataclass
class Trial:
  """One run of the method as it advances: `mask` and `cycle` are those of its next cycle."""
  seed: int
  metric: str
  mask: Any
  cycle: int = 0
  stopped: bool = False
  records: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  theta: Any = None  # θ the next cycle starts from, for methods that continue training (None: θ0)
  epochs: int | None = None  # the next cycle's epoch limit, for methods that set one (None: the config's)


class Outcome(NamedTuple):
  """A trained cycle of one lane, measured: record fields, scoring sums and the trained θ."""
  fields: dict[str, Any]
  sums: StatSums
  best_theta: Any  # θ at the best-validation-loss epoch (what the record's accuracies are of)
  score_theta: Any  # θ the criteria score (best or last, per the method's config)


class Method(Protocol):
  """What the loop needs from an iterative pruning method (DropNet: `dropnet.DropNetMethod`)."""
  score_from: str
  score_params: str

  def theta0(self, seed: int) -> Any: ...
  def full_mask(self) -> Any: ...
  def shuffle_key(self, seed: int, cycle: int) -> jax.Array: ...
  def mask_fields(self, mask: Any) -> dict[str, Any]: ...
  def sums_template(self) -> StatSums: ...
  def advance(self, trial: Trial, outcome: Outcome, dense: Outcome) -> None: ...


_stack = lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def measure(runner, state: FitState, data: DeviceData, method: Method, seconds: float,
            active: Sequence[bool]) -> list[Outcome | None]:
  """Evaluates a finished group on every split; an `Outcome` per lane (None for inactive lanes).
  `method` gives `score_from`, `score_params` and `mask_fields` (the record's mask encoding)."""
  start = time.perf_counter()
  masks, best, last = state.masks, state.best_params, state.params
  active_arr = jnp.asarray(np.asarray(active)) if runner.batched else None
  ev = lambda theta, images, labels: runner.evaluate(theta, masks, images, labels, active_arr)
  train = ev(best, data.train_images, data.train_labels)
  val = ev(best, data.val_images, data.val_labels)
  test = ev(best, data.test_images, data.test_labels)
  last_test = ev(last, data.test_images, data.test_labels)
  if method.score_from == 'epoch':
    sums = state.best_sums
  elif method.score_params == 'last':
    sums = ev(last, data.train_images, data.train_labels).sums
  else:
    sums = train.sums
  host = jax.device_get({'masks': masks, 'train': train, 'val': val, 'test': test, 'last_test': last_test,
                         'sums': sums, 'state': state._replace(params=None, opt_state=None, best_params=None,
                                                               best_sums=None, key=None, masks=None)})
  if not runner.batched:  # one trial: give every leaf a lane axis of 1
    host = jax.tree.map(lambda x: np.asarray(x)[None], host)
  seconds += time.perf_counter() - start
  s = host['state']
  out = []
  for t, is_active in enumerate(active):
    if not is_active:
      out.append(None)
      continue
    f = lambda x: float(x[t])
    lane_mask = jax.tree.map(lambda x: x[t], host['masks'])
    mask_fields = method.mask_fields(lane_mask)
    fields = {
        **{k: v for k, v in mask_fields.items() if k != 'mask'},
        # At the best-validation-loss epoch (the paper's definition).
        'train_accuracy': f(host['train'].accuracy), 'train_loss': f(host['train'].loss),
        'val_accuracy': f(host['val'].accuracy), 'val_loss': f(host['val'].loss),
        'test_accuracy': f(host['test'].accuracy), 'test_loss': f(host['test'].loss),
        # At the last epoch trained (what the official Keras code reported).
        'last_train_accuracy': f(s.train_accuracy), 'last_train_loss': f(s.train_loss),
        'last_val_accuracy': f(s.val_accuracy), 'last_val_loss': f(s.val_loss),
        'last_test_accuracy': f(host['last_test'].accuracy), 'last_test_loss': f(host['last_test'].loss),
        'early_stop_epoch': int(s.best_epoch[t]), 'epochs_trained': int(s.epoch[t]),
        'diverged': bool(s.diverged[t]),
        **({'mask': mask_fields['mask']} if 'mask' in mask_fields else {}),
        'seconds': seconds,
    }
    lane_sums = jax.tree.map(lambda x: jnp.asarray(x[t]), host['sums'])
    best_theta = runner.lane(best, t)
    score_theta = best_theta if method.score_params == 'best' else runner.lane(last, t)
    out.append(Outcome(fields, lane_sums, best_theta, score_theta))
  return out


@dataclasses.dataclass
class _Position:
  """Everything besides the trials that a rerun needs to continue exactly."""
  group: int = 0
  theta0: dict[int, Any] = dataclasses.field(default_factory=dict)  # seed -> θ0, while a trial needs it
  dense: dict[int, Outcome] = dataclasses.field(default_factory=dict)  # seed -> shared cycle 0
  fit: FitState | None = None  # a partly trained group (mid-cycle checkpoint)
  fit_meta: dict[str, Any] | None = None  # {'phase', 'lanes', 'seconds'} of `fit`


class Driver:
  """Runs `trials` of `method` to the end in groups of `group_size` (None: one group of all)."""

  def __init__(self, method: Method, trials: list[Trial], runner, data: DeviceData, *,
               group_size: int | None = None, checkpointer=None, checkpoint_every_epochs: int = 0,
               params_store=None, on_record: Callable[[list[dict[str, Any]]], None] | None = None,
               log: Callable[[str], None] = print, log_epochs: bool = False,
               monitor: Callable[[dict[str, Any]], None] | None = None, stamp: dict[str, Any] | None = None):
    size = group_size or len(trials)
    if not runner.batched and size != 1:
      raise ValueError('one-trial programs (OneLane) need groups of one trial')
    self.method, self.trials, self.runner, self.data = method, trials, runner, data
    self.groups = [trials[i:i + size] for i in range(0, len(trials), size)]
    self.checkpointer, self.every = checkpointer, checkpoint_every_epochs
    self.params_store, self.on_record, self.log, self.log_epochs = params_store, on_record, log, log_epochs
    # `monitor` sees the run as events (a progress display): {'event': 'start', 'trials', 'finished',
    # 'records'}, {'event': 'epoch', 'cycle', 'labels', 'epochs', 'val_accuracy', 'done'} (one entry per
    # lane being trained) and {'event': 'record', 'record', 'finished'} (after each trial's cycle).
    self.monitor = monitor
    # `stamp`: what the run's results depend on (settings, data fingerprint), stored in every checkpoint
    # and compared on restore, so a checkpoint is never continued under other settings or data.
    self.stamp = stamp
    self.lane_count = runner.pad(size) if runner.batched else 1
    self.pos = _Position()

  def records(self) -> list[dict[str, Any]]:
    return [r for t in self.trials for r in t.records]

  # -- the loop -------------------------------------------------------------------------------

  def run(self) -> list[dict[str, Any]]:
    try:
      records = self._run()
      if self.checkpointer is not None:
        self.checkpointer.wait()  # the final checkpoint is on disk when the run returns
      return records
    except BaseException:
      # A crash or Ctrl-C: let an asynchronous checkpoint save in flight finish, so the newest
      # checkpoint on disk is whole (a second Ctrl-C during the wait abandons it cleanly).
      if self.checkpointer is not None:
        self.checkpointer.wait()
      raise

  def _run(self) -> list[dict[str, Any]]:
    if self._restore():
      self.log(f'resuming: {len(self.records())} records so far, group {self.pos.group}'
               + (f', mid-cycle ({self.pos.fit_meta["phase"]}, epoch {int(np.max(self.pos.fit.epoch))})'
                  if self.pos.fit is not None else ''))
      if self.on_record and self.records():
        self.on_record(self.records())
    if self.monitor:
      self.monitor({'event': 'start', 'trials': len(self.trials), 'finished': sum(t.stopped for t in self.trials),
                    'records': len(self.records())})
    while self.pos.group < len(self.groups):
      group = self.groups[self.pos.group]
      active = [t for t in group if not t.stopped]
      if not active:
        self._next_group()
        self._save()
        continue
      for seed in sorted({t.seed for t in group}):
        if seed not in self.pos.theta0:
          self.pos.theta0[seed] = self.method.theta0(seed)
      cycle = active[0].cycle
      if cycle == 0 and any(t.seed not in self.pos.dense for t in active):
        seeds = sorted({t.seed for t in active if t.seed not in self.pos.dense})
        lanes = [(s, self.method.full_mask(), None, None) for s in seeds]
        for seed, outcome in zip(seeds, self._train('dense', 0, lanes, [f'seed {s} {"dense":>12}' for s in seeds])):
          self.pos.dense[seed] = outcome
      if cycle == 0:
        outcomes = [self.pos.dense[t.seed] for t in active]
      else:
        outcomes = self._train('cycle', cycle, [(t.seed, t.mask, t.theta, t.epochs) for t in active],
                               [f'seed {t.seed} {t.metric:>12}' for t in active])
      for trial, outcome in zip(active, outcomes):
        self.method.advance(trial, outcome, self.pos.dense[trial.seed])
        if self.params_store is not None:
          self.params_store.saved_cycle(trial, outcome.best_theta)
        if self.monitor:
          self.monitor({'event': 'record', 'record': trial.records[-1], 'finished': trial.stopped})
      if all(t.stopped for t in group):
        self._next_group()
      self._save()
      if self.on_record:
        self.on_record(self.records())
    return self.records()

  def _next_group(self) -> None:
    """Moves on; keeps θ0 and dense outcomes only for seeds a later trial still needs."""
    self.pos.group += 1
    needed = {t.seed for g in self.groups[self.pos.group:] for t in g if not t.stopped}
    self.pos.dense = {s: o for s, o in self.pos.dense.items() if s in needed}
    self.pos.theta0 = {s: th for s, th in self.pos.theta0.items() if s in needed}

  def _train(self, phase: str, cycle: int, lanes: list[tuple[int, Any, Any, int | None]],
             labels: list[str]) -> list[Outcome]:
    """Trains (seed, mask, start θ or None for θ0, epoch limit or None) lanes to early stopping;
    an Outcome per lane."""
    started = time.perf_counter()
    n, count = len(lanes), self.lane_count
    resumed = self.pos.fit is not None and self.pos.fit_meta['phase'] == phase
    seconds = self.pos.fit_meta['seconds'] if resumed else 0.0
    if resumed:
      state = self.pos.fit
    else:
      padded = lanes + [lanes[0]] * (count - n)
      start = [self.pos.theta0[s] if theta is None else theta for s, _, theta, _ in padded]
      keys = [self.method.shuffle_key(s, cycle) for s, *_ in padded]
      if self.runner.batched:
        state = self.runner.init_fit(_stack(start), _stack([m for _, m, *_ in padded]), jnp.stack(keys))
        state = state._replace(done=jnp.arange(count) >= n)  # padding lanes are frozen from the start
      else:
        state = self.runner.init_fit(start[0], lanes[0][1], keys[0])
      if any(e is not None for *_, e in lanes):
        limits = [int(state.max_epochs.reshape(-1)[0]) if e is None else e for *_, e in padded]
        state = state._replace(max_epochs=jnp.asarray(limits if self.runner.batched else limits[0], jnp.int32))
    self.pos.fit, self.pos.fit_meta = None, None

    def on_epoch(state: FitState) -> None:
      nonlocal started, seconds
      if self.log_epochs or self.monitor:
        self._report_epoch(state, labels, cycle)
      epoch = int(np.max(np.asarray(state.epoch)))
      if self.every and epoch % self.every == 0 and not np.all(np.asarray(state.done)):
        seconds += time.perf_counter() - started
        started = time.perf_counter()
        self.pos.fit, self.pos.fit_meta = state, {'phase': phase, 'cycle': cycle, 'seconds': seconds}
        self._save()
        self.pos.fit, self.pos.fit_meta = None, None

    state = train_lib.fit(self.runner.epoch_step, state, self.data, on_epoch)
    active = [i < n for i in range(count)]
    return measure(self.runner, state, self.data, self.method, seconds + time.perf_counter() - started,
                   active)[:n]

  def _report_epoch(self, state: FitState, labels: list[str], cycle: int) -> None:
    s = jax.device_get(state._replace(params=None, opt_state=None, best_params=None, best_sums=None, key=None,
                                      masks=None))
    if not self.runner.batched:
      s = jax.tree.map(lambda x: np.asarray(x)[None], s)
    n = len(labels)
    if self.monitor:
      self.monitor({'event': 'epoch', 'cycle': cycle, 'labels': labels, 'epochs': s.epoch[:n].tolist(),
                    'val_accuracy': s.val_accuracy[:n].tolist(), 'done': s.done[:n].tolist()})
    if not self.log_epochs:
      return
    for t, label in enumerate(labels):
      if s.epoch[t] > 0 and (not s.done[t] or s.epoch[t] == np.max(s.epoch)):
        self.log(f'{label} cycle {cycle:2d} epoch {int(s.epoch[t]):3d} train_loss {float(s.train_loss[t]):.4f} '
                 f'val_loss {float(s.val_loss[t]):.4f} val_acc {float(s.val_accuracy[t]):.4f}'
                 + (' (stop)' if s.done[t] else ''))

  # -- checkpoints ------------------------------------------------------------------------------

  def _save(self) -> None:
    if self.checkpointer is None:
      return
    leaves = jax.tree.leaves
    arrays: dict[str, Any] = {
        'cycles': np.asarray([t.cycle for t in self.trials], np.int32),  # never empty (orbax refuses that)
        'masks': {f't{i}': leaves(t.mask) for i, t in enumerate(self.trials) if not t.stopped},
        'thetas': {f't{i}': leaves(t.theta) for i, t in enumerate(self.trials) if not t.stopped and t.theta is not None},
        'theta0': {f's{s}': leaves(th) for s, th in self.pos.theta0.items()},
        'dense': {f's{s}': {'sums': leaves(o.sums), 'best': leaves(o.best_theta), 'score': leaves(o.score_theta)}
                  for s, o in self.pos.dense.items()},
    }
    if self.pos.fit is not None:
      arrays['fit'] = leaves(_key_data(self.pos.fit))
    arrays = {k: v for k, v in arrays.items() if not isinstance(v, dict) or v}  # orbax stores no empty dicts
    meta = {'version': CHECKPOINT_VERSION, 'group': self.pos.group,
            'trials': [{'seed': t.seed, 'metric': t.metric, 'stopped': t.stopped, 'epochs': t.epochs,
                        'has_theta': t.theta is not None, 'records': t.records} for t in self.trials],
            'stamp': self.stamp, 'theta0_seeds': sorted(self.pos.theta0), 'dense': {str(s): o.fields for s, o in self.pos.dense.items()},
            'fit': self.pos.fit_meta}
    self.checkpointer.save(arrays, meta)

  def _templates(self, meta: dict[str, Any]) -> dict[str, Any]:
    """Abstract arrays (shapes and dtypes) of a checkpoint described by `meta`."""
    theta = jax.eval_shape(lambda: self.method.theta0(0))
    mask = jax.eval_shape(self.method.full_mask)
    sums = jax.eval_shape(lambda: self.method.sums_template())
    leaves = jax.tree.leaves
    out: dict[str, Any] = {
        'cycles': jax.ShapeDtypeStruct((len(meta['trials']),), np.int32),
        'masks': {f't{i}': leaves(mask) for i, t in enumerate(meta['trials']) if not t['stopped']},
        'thetas': {f't{i}': leaves(theta) for i, t in enumerate(meta['trials'])
                   if not t['stopped'] and t['has_theta']},
        'theta0': {f's{s}': leaves(theta) for s in meta['theta0_seeds']},
        'dense': {f's{s}': {'sums': leaves(sums), 'best': leaves(theta), 'score': leaves(theta)}
                  for s in meta['dense']},
    }
    if meta['fit'] is not None:
      out['fit'] = leaves(jax.eval_shape(lambda: _key_data(self._fit_template())))
    return {k: v for k, v in out.items() if not isinstance(v, dict) or v}

  def _fit_template(self) -> FitState:
    theta, mask = self.method.theta0(0), self.method.full_mask()
    key = self.method.shuffle_key(0, 0)
    if not self.runner.batched:
      return self.runner.trainer.init_fit(theta, mask, key)
    n = self.lane_count
    return jax.vmap(self.runner.trainer.init_fit)(_stack([theta] * n), _stack([mask] * n), jnp.stack([key] * n))

  def _check_meta(self, meta: dict[str, Any]) -> dict[str, Any]:
    if meta.get('version') != CHECKPOINT_VERSION or [(t['seed'], t['metric']) for t in meta['trials']] != [
        (t.seed, t.metric) for t in self.trials]:
      raise CheckpointError(f'{self.checkpointer.directory} holds a checkpoint of another experiment '
                       '(other seeds, metrics or format); use another output directory')
    differences = stamp_differences(meta.get('stamp'), self.stamp)
    if differences:
      raise CheckpointError(f'{self.checkpointer.directory} holds a checkpoint made with other settings or data '
                       f'({"; ".join(differences)}); use another output directory or the same settings')
    return self._templates(meta)

  def _restore(self) -> bool:
    """Loads the newest readable checkpoint (an unreadable newer one is skipped with a warning)."""
    if self.checkpointer is None:
      return False
    found = self.checkpointer.restore_latest(self._check_meta)
    if found is None:
      return False
    _, meta, arrays = found
    unflatten = lambda like, xs: jax.tree.unflatten(jax.tree.structure(like), [jnp.asarray(x) for x in xs])
    theta, mask, sums = self.method.theta0(0), self.method.full_mask(), self.method.sums_template()
    for i, (trial, saved) in enumerate(zip(self.trials, meta['trials'])):
      trial.cycle, trial.stopped, trial.records = int(arrays['cycles'][i]), saved['stopped'], saved['records']
      trial.epochs = saved['epochs']
      if not trial.stopped:
        trial.mask = unflatten(mask, arrays['masks'][f't{i}'])
        if saved['has_theta']:
          trial.theta = unflatten(theta, arrays['thetas'][f't{i}'])
    self.pos = _Position(group=meta['group'])
    for s in meta['theta0_seeds']:
      self.pos.theta0[s] = unflatten(theta, arrays['theta0'][f's{s}'])
    for s, fields in meta['dense'].items():
      a = arrays['dense'][f's{s}']
      self.pos.dense[int(s)] = Outcome(fields, unflatten(sums, a['sums']), unflatten(theta, a['best']),
                                       unflatten(theta, a['score']))
    if meta['fit'] is not None:
      self.pos.fit = _wrap_key(unflatten(_key_data(self._fit_template()), arrays['fit']))
      self.pos.fit_meta = meta['fit']
    return True


def stamp_differences(saved: dict[str, Any] | None, current: dict[str, Any] | None) -> list[str]:
  """'key: saved X, now Y' for every setting in which two stamps differ (none when either is absent)."""
  if saved is None or current is None:
    return []
  return [f'{k}: saved {saved.get(k)!r}, now {current.get(k)!r}' for k in sorted(set(saved) | set(current))
          if saved.get(k) != current.get(k)]


def _key_data(state: FitState) -> FitState:
  return state._replace(key=jax.random.key_data(state.key))


def _wrap_key(state: FitState) -> FitState:
  return state._replace(key=jax.random.wrap_key_data(state.key))
