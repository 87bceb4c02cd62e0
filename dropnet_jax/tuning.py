"""Hyperparameter search with Optuna over TrainConfig and DropNet settings, trials batched as lanes.

What a study searches (`SearchSpace`, from flags or a small JSON file): the optimiser, learning rate
(log scale), momentum (for the optimisers that take one), weight decay (log), batch size, schedule
kind and its parameters, augmentation, and for the DropNet objective the fraction p and the
criterion. A field with one choice (or an empty range) is not searched: its value is fixed.

Objectives (never the test split):
  'train'    the best validation accuracy over the epochs of one training run (the project's
             early stopping on validation loss still ends a run), reported to the pruner every
             epoch (`trial.report(val_accuracy, epoch)`, `trial.should_prune()`).
  'dropnet'  the best validation accuracy among DropNet cycles with at most X of the units
             remaining (`dropnet.run_experiment` with the trial's p, criterion and training
             settings, floor X), reported every cycle; 0 when X is never reached (divergence).

Every trial starts from the same θ0 and shuffle order (`--trial_seed`, DropNet's seed keys), so
trials differ only by their hyperparameters (common random numbers).

Batched trials. What fixes a compiled training program (`optim` module docstring): the optimiser
kind, batch size, schedule kind and its parameters, augmentation, and which optimiser terms exist.
What does not: the values of the learning rate, momentum and weight decay, which live in the
optimiser state (`optim.with_hyperparams`). `run_worker` asks a *leader* trial, lets the sampler
choose all its parameters, then asks the rest of the batch with the leader's static parameters
pinned (`PinnedSampler`), so the sampler chooses only their dynamic ones. Trials
with the same static parameters (`template_config`) train as lanes of one compiled program
(`lanes.Lanes`, lane count fixed per batch so nothing recompiles between batches of the same
static shape); each lane reports every epoch and is pruned on its own (its `done` flag is set, a
frozen lane is not computed on CPU), and each result is told separately. With `batch=1` every trial
runs alone with the one-trial programs, which are cached per static shape in the same way. The
price: a batch of K explores the static parameters with one draw, so they are searched K times
more slowly per trial (use a small batch when the static space is large, or fix static settings).

Storage and workers. `make_storage` opens an Optuna RDB storage (an SQLite file by default,
PostgreSQL for clusters) with a heartbeat: each worker beats for its running trials from a thread,
and every worker fails the trials whose heartbeat is older than the grace period
(`fail_stale_trials`) and re-enqueues them with the same parameters (`RetryFailedTrialCallback`).
`run_worker` stops once `n_trials` trials are complete or pruned, counting trials that other
workers are running or that wait in the queue, so several workers (threads of one `--workers` run,
or separate processes) share the work without losing or repeating a trial; with simultaneous asks
a study can end up to (workers - 1) x batch trials over `n_trials`.
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import json
import math
import os
import random
import socket
import sqlite3
import threading
import time
import warnings
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

try:
  import optuna
  from optuna.trial import TrialState
except ImportError as e:  # an optional extra
  raise ImportError("dropnet_jax.tuning needs Optuna: pip install -e '.[tune]'") from e

from dropnet_jax import criteria
from dropnet_jax.config import AUGMENTATIONS, DropNetConfig, TrainConfig
from dropnet_jax.dropnet import SeedKeys, run_experiment
from dropnet_jax.lanes import Lanes
from dropnet_jax.layers import full_masks
from dropnet_jax.models import init_params
from dropnet_jax.optim import DEFAULT_MOMENTUM, OPTIMIZERS, SCHEDULES, with_hyperparams
from dropnet_jax.train import DATA_AXIS, DeviceData, FitState, Trainer, fit, steps_per_epoch

warnings.filterwarnings('ignore', category=optuna.exceptions.ExperimentalWarning)
# Heartbeats are recorded by this module's own thread (`Heartbeat`), not by Study.optimize's.
warnings.filterwarnings('ignore', message='Heartbeat of storage is supposed to be used with Study.optimize')

DYNAMIC = ('lr', 'momentum', 'weight_decay')  # per-lane values; everything else is static
_OPTAX_NAME = {'lr': 'learning_rate', 'momentum': 'momentum', 'weight_decay': 'weight_decay'}
# Static stand-ins for searched dynamic values in a lane program's config (each lane sets its own):
# non-zero so the momentum and weight-decay terms exist in the program.
_PLACEHOLDER = {'lr': 1.0, 'momentum': 0.5, 'weight_decay': 1e-3}
_SCHEDULES_WITH_FLOOR = ('cosine', 'linear', 'cyclic', 'warmup_cosine')


# -- the search space -----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SearchSpace:
  """What a study searches. Ranges are (low, high); a None range or one choice is not searched."""
  optimizers: tuple[str, ...] = ('sgd', 'momentum', 'adam')
  lr: tuple[float, float] | None = (1e-5, 1e-1)  # log scale
  momentum: tuple[float, float] | None = (0.5, 0.99)  # for 'momentum' and 'rmsprop'
  weight_decay: tuple[float, float] | None = None  # log scale; None: the base config's
  batch_sizes: tuple[int, ...] = (64, 128, 256)
  schedules: tuple[str, ...] = ('constant', 'cosine', 'step')
  min_lr_factor: tuple[float, float] | None = (0.0, 0.1)  # cosine/linear/cyclic/warmup_cosine floor
  step_epochs: tuple[int, int] | None = (2, 10)  # step
  gamma: tuple[float, float] | None = (0.1, 0.5)  # step, log scale
  cyclic_half_epochs: tuple[int, int] | None = (1, 4)  # cyclic
  warmup_epochs: tuple[int, int] | None = (1, 3)  # warmup_cosine (capped below max_epochs)
  augments: tuple[str, ...] = ('none',)
  fractions: tuple[float, float] | None = None  # DropNet p (objective 'dropnet')
  metrics: tuple[str, ...] | None = None  # DropNet criteria (objective 'dropnet')

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> 'SearchSpace':
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f'search space: unknown fields {unknown}; known: {sorted(names)}')
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}).validate()

  @classmethod
  def load(cls, path: str) -> 'SearchSpace':
    with open(path) as f:
      return cls.from_dict(json.load(f))

  def to_dict(self) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

  def validate(self) -> 'SearchSpace':
    """Raises ValueError naming the field; returns self."""
    for name, known in (('optimizers', OPTIMIZERS), ('schedules', SCHEDULES), ('augments', AUGMENTATIONS)):
      choices = getattr(self, name)
      if not choices or any(c not in known for c in choices):
        raise ValueError(f'{name}: {list(choices)} must be a non-empty subset of {list(known)}')
    if not self.batch_sizes or any(int(b) != b or b < 1 for b in self.batch_sizes):
      raise ValueError(f'batch_sizes: positive integers, got {list(self.batch_sizes)}')
    for name, low, high, log in (('lr', 0, None, True), ('momentum', 0, 1, False), ('weight_decay', 0, None, True),
                                 ('min_lr_factor', 0, 1, False), ('gamma', 0, None, True), ('fractions', 0, 1, False),
                                 ('step_epochs', 1, None, False), ('cyclic_half_epochs', 1, None, False),
                                 ('warmup_epochs', 1, None, False)):
      r = getattr(self, name)
      if r is None:
        continue
      if len(r) != 2 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in r) or r[0] > r[1]:
        raise ValueError(f'{name}: expected [low, high] with low <= high, got {r}')
      if r[0] < low or (log and r[0] <= 0) or (high is not None and r[1] > high):
        raise ValueError(f'{name}: {list(r)} must lie in [{low}, {high if high is not None else "inf"}]'
                         + (' with low > 0 (log scale)' if log else ''))
    if self.momentum is not None and self.momentum[1] >= 1:
      raise ValueError(f'momentum: high must be < 1, got {self.momentum[1]}')
    if self.fractions is not None and self.fractions[0] <= 0:
      raise ValueError(f'fractions: low must be > 0, got {self.fractions[0]}')
    if self.metrics is not None:
      if not self.metrics:
        raise ValueError('metrics: at least one criterion, or None')
      for m in self.metrics:
        criteria.get(m)
    return self


def suggest(trial, space: SearchSpace, base: TrainConfig, dropnet: DropNetConfig | None = None) -> dict[str, Any]:
  """Samples the trial's searched parameters (define-by-run, conditional on optimiser and schedule)
  and returns every setting, the fixed ones included (`complete`)."""
  int_range = lambda r: r is not None and int(r[0]) < int(r[1])

  def pick(name, choices):
    if len(choices) > 1:
      trial.suggest_categorical(name, list(choices))

  def real(name, r, log=False):
    if r is not None and r[0] < r[1]:
      trial.suggest_float(name, float(r[0]), float(r[1]), log=log)

  pick('optimizer', space.optimizers)
  optimizer = trial.params.get('optimizer', space.optimizers[0])
  real('lr', space.lr, log=True)
  if optimizer in DEFAULT_MOMENTUM:
    real('momentum', space.momentum)
  real('weight_decay', space.weight_decay, log=True)
  pick('batch_size', space.batch_sizes)
  pick('schedule', space.schedules)
  schedule = trial.params.get('schedule', space.schedules[0])
  if schedule in _SCHEDULES_WITH_FLOOR:
    real('min_lr_factor', space.min_lr_factor)
  if schedule == 'step':
    if int_range(space.step_epochs):
      trial.suggest_int('step_epochs', int(space.step_epochs[0]), int(space.step_epochs[1]))
    real('gamma', space.gamma, log=True)
  if schedule == 'cyclic' and int_range(space.cyclic_half_epochs):
    trial.suggest_int('cyclic_half_epochs', int(space.cyclic_half_epochs[0]), int(space.cyclic_half_epochs[1]))
  if schedule == 'warmup_cosine' and space.warmup_epochs is not None:
    high = min(int(space.warmup_epochs[1]), base.max_epochs - 1)
    if int(space.warmup_epochs[0]) < high:
      trial.suggest_int('warmup_epochs', int(space.warmup_epochs[0]), high)
  pick('augment', space.augments)
  if dropnet is not None:
    real('fraction', space.fractions)
    if space.metrics is not None:
      pick('metric', space.metrics)
  return complete(trial.params, space, base, dropnet)


def complete(params: dict[str, Any], space: SearchSpace, base: TrainConfig,
             dropnet: DropNetConfig | None = None) -> dict[str, Any]:
  """All settings of a trial: its searched `params` plus the fixed ones (one choice, an empty
  range, or the base config's value for what the space does not search)."""
  o = base.optim
  fixed = lambda r, default: r[0] if r is not None else default
  s = {'optimizer': params.get('optimizer', space.optimizers[0]),
       'lr': params.get('lr', fixed(space.lr, o.lr)),
       'batch_size': int(params.get('batch_size', space.batch_sizes[0])),
       'schedule': params.get('schedule', space.schedules[0]),
       'augment': params.get('augment', space.augments[0])}
  if s['optimizer'] in DEFAULT_MOMENTUM:
    base_momentum = o.momentum if o.momentum is not None else DEFAULT_MOMENTUM[s['optimizer']]
    s['momentum'] = params.get('momentum', fixed(space.momentum, base_momentum))
  s['weight_decay'] = params.get('weight_decay', fixed(space.weight_decay, o.weight_decay))
  if s['schedule'] in _SCHEDULES_WITH_FLOOR:
    s['min_lr_factor'] = params.get('min_lr_factor', fixed(space.min_lr_factor, o.min_lr_factor))
  if s['schedule'] == 'step':
    s['step_epochs'] = params.get('step_epochs', fixed(space.step_epochs, o.step_epochs))
    s['gamma'] = params.get('gamma', fixed(space.gamma, o.gamma))
  if s['schedule'] == 'cyclic':
    s['cyclic_half_epochs'] = params.get('cyclic_half_epochs', fixed(space.cyclic_half_epochs, o.cyclic_half_epochs))
  if s['schedule'] == 'warmup_cosine':
    s['warmup_epochs'] = params.get('warmup_epochs', min(fixed(space.warmup_epochs, o.warmup_epochs),
                                                         base.max_epochs - 1))
  if dropnet is not None:
    s['fraction'] = params.get('fraction', fixed(space.fractions, dropnet.fraction))
    s['metric'] = params.get('metric', space.metrics[0] if space.metrics else dropnet.metrics[0])
  return s


def train_config(settings: dict[str, Any], base: TrainConfig) -> TrainConfig:
  """The TrainConfig of a trial's settings (`complete`'s output) over `base`."""
  kind = settings['optimizer']
  optim = dataclasses.replace(
      base.optim, optimizer=kind, lr=float(settings['lr']),
      momentum=float(settings['momentum']) if kind in DEFAULT_MOMENTUM else None,
      nesterov=base.optim.nesterov and kind == 'momentum', weight_decay=float(settings['weight_decay']),
      schedule=settings['schedule'],
      **{k: type(getattr(base.optim, k))(settings[k]) for k in
         ('min_lr_factor', 'step_epochs', 'gamma', 'cyclic_half_epochs', 'warmup_epochs') if k in settings})
  config = dataclasses.replace(base, batch_size=int(settings['batch_size']), augment=settings['augment'], optim=optim)
  config.validate()
  return config


def searched_dynamic(space: SearchSpace, settings: dict[str, Any]) -> tuple[str, ...]:
  """The dynamic settings that vary between lanes of this static shape (always the learning rate)."""
  out = ['lr']
  if 'momentum' in settings and space.momentum is not None:
    out.append('momentum')
  if space.weight_decay is not None:
    out.append('weight_decay')
  return tuple(out)


def template_config(settings: dict[str, Any], space: SearchSpace, base: TrainConfig) -> TrainConfig:
  """The config of the compiled program a trial trains with: its settings with the per-lane values
  replaced by fixed stand-ins. Trials with equal templates can share one program as lanes."""
  stand_in = {k: _PLACEHOLDER[k] for k in searched_dynamic(space, settings)}
  return train_config({**settings, **stand_in}, base)


def lane_hyperparams(settings: dict[str, Any], space: SearchSpace) -> dict[str, float]:
  """The optax names and values `optim.with_hyperparams` sets for one lane."""
  return {_OPTAX_NAME[k]: float(settings[k]) for k in searched_dynamic(space, settings)}


# -- training lanes -------------------------------------------------------------------------------

@dataclasses.dataclass
class LaneResult:
  """One trained (or pruned) lane."""
  val_accuracies: list[float]  # per epoch, of the epochs whose loss was finite
  epochs: int
  best_epoch: int  # the lowest validation loss's (the early-stopping rule's)
  diverged: bool
  pruned: bool

  @property
  def best_val_accuracy(self) -> float:
    return max(self.val_accuracies, default=0.0)


_stack = lambda tree, n: jax.tree.map(lambda x: jnp.stack([x] * n), tree)


class LaneRunner:
  """Trains groups of trials that share a template config: one trial with the one-trial programs
  (`lane_count=None`) or several as lanes. Compiled programs are cached per (template, lanes)."""

  def __init__(self, model, image_shape: Sequence[int], data: DeviceData, *, seed: int = 0,
               lanes_per_chunk: int | None = None, cache_size: int = 8):
    self.model, self.image_shape, self.data = model, tuple(image_shape), data
    keys = SeedKeys.for_seed(seed)
    self.theta0 = init_params(model, keys.init, self.image_shape)
    self.shuffle_key = keys.shuffle_key(0)
    self.masks = full_masks(model)
    self.lanes_per_chunk = lanes_per_chunk
    self.steps = lambda bs: steps_per_epoch(int(data.train_labels.shape[0]), bs)
    self._cache: collections.OrderedDict = collections.OrderedDict()
    self._cache_size = cache_size
    self._replicated = None

  def _programs(self, template: TrainConfig, lane_count: int | None):
    key = (template, lane_count)
    if key not in self._cache:
      trainer = Trainer(self.model, template, steps_per_epoch=self.steps(template.batch_size))
      self._cache[key] = (trainer, None if lane_count is None else Lanes(trainer, self.lanes_per_chunk))
      while len(self._cache) > self._cache_size:
        self._cache.popitem(last=False)
    self._cache.move_to_end(key)
    return self._cache[key]

  def run(self, template: TrainConfig, hypers: list[dict[str, float]], lane_count: int | None = None,
          on_epoch: Callable[[int, int, float], bool] | None = None) -> list[LaneResult]:
    """Trains one lane per `hypers` entry (optax names -> values) from θ0 until each early-stops,
    diverges, reaches max_epochs or is stopped: `on_epoch(lane, epoch, val_accuracy)` returning True
    stops (prunes) that lane. `lane_count=None`: one trial, one-trial programs."""
    n = len(hypers)
    trainer, lanes = self._programs(template, lane_count)
    if lanes is None:
      if n != 1:
        raise ValueError(f'one-trial programs train one trial, got {n}')
      state = trainer.init_fit(self.theta0, self.masks, self.shuffle_key)
      state = state._replace(opt_state=with_hyperparams(state.opt_state, **hypers[0]))
      step, count = trainer.epoch_step, 1
    else:
      count = lanes.pad(max(lane_count, n))
      state = lanes.init_fit(_stack(self.theta0, count), _stack(self.masks, count), _stack(self.shuffle_key, count))
      values = {k: np.asarray([h[k] for h in hypers] + [hypers[0][k]] * (count - n), np.float32) for k in hypers[0]}
      state = state._replace(opt_state=with_hyperparams(state.opt_state, **values),
                             done=jnp.arange(count) >= n)  # padding lanes are frozen from the start
      step = lanes.epoch_step
    # Inputs placed as the program's outputs will be, so the second epoch does not compile again
    # (a committed sharding differs from the first call's uncommitted arrays).
    split = lanes is not None and trainer.num_devices > 1 and count % trainer.num_devices == 0
    state = jax.device_put(state, NamedSharding(trainer.mesh, P(DATA_AXIS)) if split else trainer.replicated)
    if self._replicated is None:
      self._replicated = trainer.replicate(self.data)
    data = self._replicated
    results = [LaneResult([], 0, 0, False, False) for _ in range(n)]
    open_lanes = set(range(n))
    while open_lanes:
      state = step(state, data)
      s = jax.device_get((state.epoch, state.val_accuracy, state.done, state.diverged, state.best_epoch))
      s = [np.reshape(np.asarray(x), (-1,)) for x in s]
      stop = []
      for i in sorted(open_lanes):
        epoch, acc, done, diverged, best = int(s[0][i]), float(s[1][i]), bool(s[2][i]), bool(s[3][i]), int(s[4][i])
        r = results[i]
        if epoch == r.epochs:  # frozen: nothing new
          open_lanes.discard(i)
          continue
        r.epochs, r.best_epoch, r.diverged = epoch, best, diverged
        prune = False
        if not diverged:
          r.val_accuracies.append(acc)
          prune = bool(on_epoch(i, epoch, acc)) if on_epoch is not None else False
        if done or prune:
          r.pruned = prune and not done
          open_lanes.discard(i)
          if prune and not done:
            stop.append(i)
      if stop and open_lanes:
        state = _set_done(state, stop, lanes is None)
    return results


def _set_done(state: FitState, lanes: list[int], single: bool) -> FitState:
  """`state` with these lanes marked done (frozen), on the same devices/sharding as before."""
  if single:
    return state._replace(done=jnp.ones_like(state.done))
  done = np.asarray(jax.device_get(state.done)).copy()
  done[lanes] = True
  return state._replace(done=jax.device_put(done, state.done.sharding))


# -- storage and studies --------------------------------------------------------------------------

def sqlite_url(directory: str) -> str:
  return f'sqlite:///{os.path.abspath(os.path.join(directory, "study.db"))}'


def make_storage(url: str, *, heartbeat_interval: int = 10, grace_period: int | None = None,
                 max_retry: int | None = 2) -> 'optuna.storages.RDBStorage':
  """An Optuna RDB storage with heartbeats and retries of stale trials. SQLite files are switched to
  WAL (readers do not block the writer) and wait up to 60 s for a lock."""
  engine_kwargs: dict[str, Any] = {'pool_pre_ping': True}
  if url.startswith('sqlite:///'):
    path = url[len('sqlite:///'):]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with sqlite3.connect(path, timeout=60) as con:  # persistent in the file
      con.execute('PRAGMA journal_mode=WAL')
    engine_kwargs = {'connect_args': {'timeout': 60}}
  # optuna >= 4.9 renamed the callback and its argument.
  retry = getattr(optuna.storages, 'RetryHeartbeatStaleTrialCallback', None) or optuna.storages.RetryFailedTrialCallback
  callback = retry(max_retry=max_retry)
  name = ('heartbeat_stale_trial_callback' if 'heartbeat_stale_trial_callback' in
          inspect.signature(optuna.storages.RDBStorage).parameters else 'failed_trial_callback')
  import sqlalchemy.exc
  for attempt in range(6):
    try:
      return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval,
                                        grace_period=grace_period, **{name: callback})
    except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError, sqlalchemy.exc.OperationalError):
      # Workers started together on a fresh database race to create the schema; the loser retries.
      if attempt == 5:
        raise
      time.sleep(0.5 * (attempt + 1) * (1 + random.random()))


def make_pruner(kind: str, max_epochs: int, warmup_epochs: int = 2, startup_trials: int = 5):
  if kind == 'median':
    return optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=warmup_epochs)
  if kind == 'hyperband':
    return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max_epochs, reduction_factor=3)
  if kind == 'none':
    return optuna.pruners.NopPruner()
  raise ValueError(f'pruner: unknown {kind!r}; choose median, hyperband or none')


def open_study(storage, name: str, settings: dict[str, Any], *, pruner=None, seed: int = 0, worker_id: int = 0,
               startup_trials: int = 10) -> 'optuna.Study':
  """Creates the study or loads it (load_if_exists). `settings` are stored with it; a rerun with other
  settings is refused. The TPE sampler's seed mixes `seed`, the worker and the trials so far, so
  workers and resumed runs draw different startup points."""
  study = _retry(lambda: optuna.create_study(storage=storage, study_name=name, direction='maximize',
                                             pruner=pruner, load_if_exists=True))
  saved = study.user_attrs.get('settings')
  if saved is None:
    _retry(lambda: study.set_user_attr('settings', settings))
  elif saved != json.loads(json.dumps(settings)):
    diff = [f'{k}: saved {saved.get(k)!r}, now {settings.get(k)!r}' for k in sorted(set(saved) | set(settings))
            if saved.get(k) != json.loads(json.dumps(settings.get(k)))]
    raise ValueError(f'study {name!r} holds other settings ({"; ".join(diff)}); use another --study_name or --out')
  mixed = hash((seed, worker_id, len(study.get_trials(deepcopy=False)))) & 0x7FFFFFFF
  study.sampler = PinnedSampler(optuna.samplers.TPESampler(seed=mixed, n_startup_trials=startup_trials,
                                                           constant_liar=True))
  return study


def _retry(fn, attempts: int = 8):
  """A storage call, retried on lock contention (SQLite answers concurrent writers with errors)."""
  for i in range(attempts):
    try:
      return fn()
    except optuna.exceptions.StorageInternalError:
      if i == attempts - 1:
        raise
      time.sleep(0.1 * 2 ** i * (1 + random.random()))


class Heartbeat:
  """Records heartbeats for this worker's running trials from a thread (Optuna's own heartbeat runs
  only inside `study.optimize`)."""

  def __init__(self, storage):
    self.storage = storage
    self.interval = storage.get_heartbeat_interval() if hasattr(storage, 'get_heartbeat_interval') else None
    self.ids: set[int] = set()
    self._lock, self._stop = threading.Lock(), threading.Event()
    self._thread = threading.Thread(target=self._loop, daemon=True) if self.interval else None

  def __enter__(self):
    if self._thread:
      self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    if self._thread:
      self._thread.join()

  def add(self, trial_id: int) -> None:
    if self.interval:
      _retry(lambda: self.storage.record_heartbeat(trial_id))
    with self._lock:
      self.ids.add(trial_id)

  def discard(self, trial_id: int) -> None:
    with self._lock:
      self.ids.discard(trial_id)

  def _loop(self) -> None:
    while not self._stop.wait(self.interval):
      with self._lock:
        ids = list(self.ids)
      for i in ids:
        try:
          self.storage.record_heartbeat(i)
        except Exception:  # a failed beat is retried next interval; a stale trial is retried by others
          pass


def state_counts(study) -> collections.Counter:
  return collections.Counter(t.state for t in _retry(lambda: study.get_trials(deepcopy=False)))


# -- the worker loop ------------------------------------------------------------------------------

def dropnet_value(records: Sequence[dict[str, Any]], units_remaining: float) -> float:
  """The objective of a DropNet trial: the best validation accuracy among cycles with at most
  `units_remaining` of the units left (0 when none got there)."""
  vals = [r['val_accuracy'] for r in records if r['fraction_remaining'] <= units_remaining + 1e-9
          and not r['diverged'] and math.isfinite(r['val_accuracy'])]
  return max(vals, default=0.0)


class DropNetObjective:
  """A trial = DropNet (one seed, the trial's criterion and p) down to `units_remaining`."""

  def __init__(self, model, image_shape, data: DeviceData, base: DropNetConfig, units_remaining: float,
               seed: int = 0, log: Callable[[str], None] = lambda s: None):
    self.model, self.image_shape, self.data, self.base = model, image_shape, data, base
    self.units_remaining, self.seed, self.log = units_remaining, seed, log
    self._trainers: collections.OrderedDict = collections.OrderedDict()  # exact TrainConfig -> Trainer

  def _trainer(self, config: TrainConfig) -> Trainer:
    if config not in self._trainers:
      self._trainers[config] = Trainer(self.model, config, steps_per_epoch=steps_per_epoch(
          int(self.data.train_labels.shape[0]), config.batch_size))
      while len(self._trainers) > 4:
        self._trainers.popitem(last=False)
    return self._trainers[config]

  def config(self, settings: dict[str, Any]) -> DropNetConfig:
    config = dataclasses.replace(self.base, metrics=(settings['metric'],), fraction=float(settings['fraction']),
                                 floor=self.units_remaining, train=train_config(settings, self.base.train))
    config.validate()
    return config

  def run(self, settings: dict[str, Any], seeds: Sequence[int] | None = None,
          on_cycle: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    each = (lambda records: on_cycle(records[-1])) if on_cycle else None
    config = self.config(settings)
    return run_experiment(self.model, self.image_shape, self.data, list(seeds or [self.seed]), config,
                          self._trainer(config.train), on_record=each, log=self.log, log_epochs=False)

  def __call__(self, trial, settings: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    def on_cycle(record):
      trial.report(float(record['val_accuracy']), int(record['cycle']))
      if trial.should_prune():
        raise optuna.TrialPruned()
    records = self.run(settings, on_cycle=on_cycle)
    return dropnet_value(records, self.units_remaining), {'cycles': len(records), 'epochs': sum(
        r['epochs_trained'] for r in records), 'fraction_remaining': records[-1]['fraction_remaining']}


@dataclasses.dataclass
class WorkerReport:
  trials: list[int]  # numbers of the trials this worker ran to an end
  seconds: float


def worker_name(worker_id: int) -> str:
  return f'{socket.gethostname()}:{os.getpid()}:{worker_id}'


def machine_id() -> str:
  """This host and PID namespace (hostname, boot id, /proc/self/ns/pid): processes with the same id see
  each other's PIDs. '' where unknown (then no trial is judged by its PID)."""
  try:
    with open('/proc/sys/kernel/random/boot_id') as f:
      boot = f.read().strip()
    return f'{socket.gethostname()}|{boot}|{os.readlink("/proc/self/ns/pid")}'
  except OSError:
    return ''


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, another user's
    return True
  return True


def fail_dead_local_trials(study) -> list[int]:
  """Fails the running trials of worker processes on this machine that no longer exist (killed, crashed)
  without waiting for their heartbeat to go stale, and hands each to the storage's stale-trial callback
  (the retry). A reused PID only delays this to the heartbeat's grace period."""
  me, storage = machine_id(), study._storage
  if not me:
    return []
  failed = []
  for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
    pid = t.user_attrs.get('worker_pid')
    if t.user_attrs.get('worker_machine') != me or pid is None or pid == os.getpid() or _alive(pid):
      continue
    try:
      if storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
        failed.append(t)
    except optuna.exceptions.UpdateFinishedTrialError:  # another worker got there first
      continue
  get = getattr(storage, 'get_heartbeat_stale_trial_callback', None) or getattr(storage, 'get_failed_trial_callback',
                                                                                   lambda: None)
  callback = get()
  for t in failed:
    if callback is not None:
      callback(study, storage.get_trial(t._trial_id))
  return [t.number for t in failed]


def run_worker(study, space: SearchSpace, base: TrainConfig, n_trials: int, *, runner: LaneRunner | None = None,
               dropnet: DropNetObjective | None = None, batch: int = 1, worker_id: int = 0,
               log: Callable[[str], None] = print, poll_seconds: float = 1.0) -> WorkerReport:
  """Asks, trains and tells trials until the study has `n_trials` complete or pruned ones (see the
  module docstring). `runner` trains the 'train' objective; `dropnet` replaces it for DropNet."""
  if (runner is None) == (dropnet is None):
    raise ValueError('give exactly one of runner (train objective) and dropnet')
  if batch < 1 or (dropnet is not None and batch != 1):
    raise ValueError(f'batch must be 1 with the dropnet objective and >= 1 otherwise, got {batch}')
  storage = study._storage
  interval = getattr(storage, 'get_heartbeat_interval', lambda: None)()
  heartbeat_on = interval is not None
  # A killed worker's trial goes stale `grace` seconds after its last beat: waiting that long (and a
  # few beats) for nothing to do is enough to see it failed and re-enqueued before leaving.
  backend = getattr(storage, '_backend', storage)  # optuna wraps an RDBStorage in a cache
  wait_limit = ((getattr(backend, 'grace_period', None) or 2 * interval) + 3 * interval) if heartbeat_on else 0
  name, machine, ran, start = worker_name(worker_id), machine_id(), [], time.perf_counter()
  base_dropnet = dropnet.base if dropnet else None
  waited_since = None
  with Heartbeat(storage) as beat:
    while True:
      if heartbeat_on:
        _retry(lambda: optuna.storages.fail_stale_trials(study))
      for number in _retry(lambda: fail_dead_local_trials(study)):
        log(f'trial {number} belonged to a worker process that no longer exists: failed (retried if enabled)')
      c = state_counts(study)
      finished = c[TrialState.COMPLETE] + c[TrialState.PRUNED]
      if finished >= n_trials:
        break
      free = n_trials - finished - c[TrialState.RUNNING] - c[TrialState.WAITING]
      if free <= 0 and c[TrialState.WAITING] == 0:
        # Others are running the rest; wait long enough to see one of them go stale, then leave.
        waited_since = waited_since or time.perf_counter()
        if time.perf_counter() - waited_since > wait_limit:
          break
        time.sleep(poll_seconds)
        continue
      waited_since = None
      waiting = c[TrialState.WAITING]
      # Queued trials (retries, other workers' followers) first, as they come; else a fresh batch.
      asked = _ask(study, min(batch, waiting) if waiting else min(batch, free), space, base, base_dropnet, beat,
                   followers=not waiting)
      for t, _ in asked:
        for key, value in (('worker', name), ('worker_machine', machine), ('worker_pid', os.getpid())):
          _retry(lambda: t.set_user_attr(key, value))
      if dropnet is not None:
        for t, settings in asked:
          ran += _run_dropnet_trial(study, t, settings, dropnet, beat, log)
      else:
        groups: dict[Any, list] = collections.OrderedDict()
        for t, settings in asked:
          try:
            groups.setdefault(template_config(settings, space, base), []).append((t, settings))
          except ValueError as e:  # a setting the config refuses (e.g. a schedule too short)
            _tell(study, t, beat, state=TrialState.FAIL, attrs={'error': str(e)})
            log(f'trial {t.number} failed: {e}')
        for template, members in groups.items():
          ran += _run_group(study, runner, template, members, space, batch, beat, log)
  return WorkerReport(ran, time.perf_counter() - start)


class PinnedSampler(optuna.samplers.BaseSampler):
  """A sampler that returns given values for some parameters of some trials (`pin`) and asks `base` for
  the rest. Batches use it to give followers their leader's static parameters: kept in this process,
  unlike `study.enqueue_trial`, whose queued trials another worker could take."""

  def __init__(self, base: optuna.samplers.BaseSampler):
    self.base = base
    self._pins: dict[int, dict[str, Any]] = {}

  def pin(self, number: int, params: dict[str, Any]) -> None:
    self._pins[number] = dict(params)

  def unpin(self, number: int) -> None:
    self._pins.pop(number, None)

  def infer_relative_search_space(self, study, trial):
    return self.base.infer_relative_search_space(study, trial)

  def sample_relative(self, study, trial, search_space):
    pins = self._pins.get(trial.number, {})
    return {k: v for k, v in self.base.sample_relative(study, trial, search_space).items() if k not in pins}

  def sample_independent(self, study, trial, param_name, param_distribution):
    pins = self._pins.get(trial.number, {})
    if param_name in pins:
      return pins[param_name]
    return self.base.sample_independent(study, trial, param_name, param_distribution)

  def before_trial(self, study, trial):
    self.base.before_trial(study, trial)

  def after_trial(self, study, trial, state, values):
    self.unpin(trial.number)
    self.base.after_trial(study, trial, state, values)

  def reseed_rng(self) -> None:
    self.base.reseed_rng()


def _ask(study, k: int, space, base, base_dropnet, beat: Heartbeat,
         followers: bool = True) -> list[tuple[Any, dict[str, Any]]]:
  """k trials: a leader, then k - 1 followers given the leader's static parameters (with `followers`;
  else whatever the queue holds), so the sampler picks only their learning rate, momentum and weight decay."""
  if not isinstance(study.sampler, PinnedSampler):
    study.sampler = PinnedSampler(study.sampler)
  leader = _retry(study.ask)
  beat.add(leader._trial_id)
  out = [(leader, suggest(leader, space, base, base_dropnet))]
  fixed = {p: v for p, v in leader.params.items() if p not in DYNAMIC}
  for _ in range(k - 1):
    t = _retry(study.ask)  # a new trial, or a queued one (a retry: its own parameters win, grouped apart)
    beat.add(t._trial_id)
    if followers:
      study.sampler.pin(t.number, fixed)
    out.append((t, suggest(t, space, base, base_dropnet)))
    study.sampler.unpin(t.number)
  return out


def _tell(study, trial, beat: Heartbeat, value: float | None = None, state=None, attrs=None) -> bool:
  """Sets the attributes and tells; False when the trial was already finished elsewhere (stale)."""
  try:
    for k, v in (attrs or {}).items():
      _retry(lambda: trial.set_user_attr(k, v))
    _retry(lambda: study.tell(trial, value, state=state))
    return True
  except (RuntimeError, ValueError, optuna.exceptions.UpdateFinishedTrialError):
    return False
  finally:
    beat.discard(trial._trial_id)


def _run_group(study, runner: LaneRunner, template, members, space, batch, beat, log) -> list[int]:
  trials = [t for t, _ in members]
  lost: set[int] = set()

  def on_epoch(lane: int, epoch: int, acc: float) -> bool:
    try:
      _retry(lambda: trials[lane].report(acc, epoch))
      return _retry(trials[lane].should_prune)
    except (RuntimeError, ValueError, optuna.exceptions.UpdateFinishedTrialError):
      lost.add(lane)  # failed by another worker as stale: stop it, do not tell
      return True

  start = time.perf_counter()
  results = runner.run(template, [lane_hyperparams(s, space) for _, s in members],
                       lane_count=batch if batch > 1 else None, on_epoch=on_epoch)
  seconds = time.perf_counter() - start
  ran = []
  for i, ((t, settings), r) in enumerate(zip(members, results)):
    attrs = {'epochs': r.epochs, 'best_epoch': r.best_epoch, 'diverged': r.diverged, 'lanes': len(members),
             'group_seconds': seconds}
    ok = i not in lost and (
        _tell(study, t, beat, state=TrialState.PRUNED, attrs=attrs) if r.pruned
        else _tell(study, t, beat, value=r.best_val_accuracy, attrs=attrs))
    if ok:
      ran.append(t.number)
    log(f'trial {t.number:3d} {"pruned" if r.pruned else "done  "} epochs {r.epochs:3d} '
        f'val_acc {r.best_val_accuracy:.4f} lanes {len(members)} {_short(settings)}'
        + ('' if ok else ' (finished elsewhere: not told)'))
  return ran


def _run_dropnet_trial(study, trial, settings, objective: DropNetObjective, beat, log) -> list[int]:
  start = time.perf_counter()
  try:
    value, attrs = objective(trial, settings)
  except optuna.TrialPruned:
    ok = _tell(study, trial, beat, state=TrialState.PRUNED, attrs={'seconds': time.perf_counter() - start})
    log(f'trial {trial.number:3d} pruned {_short(settings)}')
    return [trial.number] if ok else []
  except ValueError as e:
    _tell(study, trial, beat, state=TrialState.FAIL, attrs={'error': str(e)})
    log(f'trial {trial.number} failed: {e}')
    return []
  ok = _tell(study, trial, beat, value=value, attrs={**attrs, 'seconds': time.perf_counter() - start})
  log(f'trial {trial.number:3d} done   val_acc@<=X {value:.4f} cycles {attrs["cycles"]} {_short(settings)}')
  return [trial.number] if ok else []


def _short(settings: dict[str, Any]) -> str:
  return ' '.join(f'{k}={v:.3g}' if isinstance(v, float) else f'{k}={v}' for k, v in settings.items())


# -- the final retrain ----------------------------------------------------------------------------

def retrain(model, image_shape, data: DeviceData, config: TrainConfig, seeds: Sequence[int]) -> list[dict[str, Any]]:
  """The configuration trained from each seed's θ0 to early stopping (no pruning); test accuracy of θ
  at the best-validation-loss epoch (the project's convention) and at the last epoch."""
  trainer = Trainer(model, config, steps_per_epoch=steps_per_epoch(int(data.train_labels.shape[0]), config.batch_size))
  masks, out = full_masks(model), []
  for seed in seeds:
    keys = SeedKeys.for_seed(seed)
    vals: list[float] = []
    state = fit(trainer.epoch_step, trainer.init_fit(init_params(model, keys.init, image_shape), masks,
                                                     keys.shuffle_key(0)), data,
                lambda s: vals.append(float(s.val_accuracy)) if not bool(s.diverged) else None)
    ev = lambda theta, x, y: trainer.evaluate(theta, masks, x, y)
    best_val, best_test = ev(state.best_params, data.val_images, data.val_labels), ev(
        state.best_params, data.test_images, data.test_labels)
    last_test = ev(state.params, data.test_images, data.test_labels)
    out.append({'seed': seed, 'epochs': int(state.epoch), 'best_epoch': int(state.best_epoch),
                'best_val_accuracy': max(vals, default=0.0), 'val_accuracy': float(best_val.accuracy),
                'test_accuracy': float(best_test.accuracy), 'last_test_accuracy': float(last_test.accuracy)})
  return out
