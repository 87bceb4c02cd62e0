"""Studies, heartbeats and the worker loop: asks, trains and tells (see dropnet_jax.tuning)."""

from __future__ import annotations

import collections
import dataclasses
import json
import time
from typing import Any, Callable

import optuna
from optuna.trial import TrialState

from dropnet_jax.config import TrainConfig
from dropnet_jax.tuning.runner import DropNetObjective, LaneRunner
# Heartbeats and the failing of dead workers' trials, importable from here as before.
from dropnet_jax.tuning.liveness import (  # noqa: F401
    Heartbeat, UnclaimedTrials, _retry, claim, fail_dead_local_trials, machine_id, worker_name)
# The storage's checks and construction, importable from here as before.
from dropnet_jax.tuning.storage import check_storage, make_storage, sqlite_url  # noqa: F401
from dropnet_jax.tuning.space import DYNAMIC, SearchSpace, group_key, lane_hyperparams, suggest

# -- studies ------------------------------------------------------------------------------------

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


def state_counts(study) -> collections.Counter:
  return collections.Counter(t.state for t in _retry(lambda: study.get_trials(deepcopy=False)))


# -- the worker loop ------------------------------------------------------------------------------

@dataclasses.dataclass
class WorkerReport:
  trials: list[int]  # numbers of the trials this worker ran to an end
  seconds: float


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
  ran, start = [], time.perf_counter()
  base_dropnet = dropnet.base if dropnet else None
  waited_since = None
  unclaimed = UnclaimedTrials(getattr(backend, 'grace_period', None) or 2 * interval) if heartbeat_on else None
  if not isinstance(study.sampler, PinnedSampler):
    study.sampler = PinnedSampler(study.sampler)
  with Heartbeat(storage) as beat:
    # Each trial is claimed as Optuna creates it, before sampling or training (see `liveness`).
    study.sampler.on_trial_created = lambda trial_id: claim(storage, beat, trial_id, worker_id)
    try:
      while True:
        if heartbeat_on:
          _retry(lambda: optuna.storages.fail_stale_trials(study))
        for number in _retry(lambda: fail_dead_local_trials(study)):
          log(f'trial {number} belonged to a worker process that no longer exists: failed (retried if enabled)')
        for number in _retry(lambda: unclaimed.fail(study)) if unclaimed else ():
          log(f'trial {number} was never claimed by a worker (killed as it was asked): failed (retried if enabled)')
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
        asked = _ask(study, min(batch, waiting) if waiting else min(batch, free), space, base, base_dropnet,
                     followers=not waiting)
        if dropnet is not None:
          for t, settings in asked:
            ran += _run_dropnet_trial(study, t, settings, dropnet, beat, log)
        else:
          ran += _run_groups(study, runner, asked, space, base, batch, beat, log)
    finally:
      study.sampler.on_trial_created = None
  return WorkerReport(ran, time.perf_counter() - start)


def _run_groups(study, runner: LaneRunner, asked, space, base, batch, beat, log) -> list[int]:
  """The asked trials, grouped by their compiled program (`group_key`) and trained group by group."""
  ran, groups = [], collections.OrderedDict()
  for t, settings in asked:
    try:
      groups.setdefault(group_key(settings, space, base), []).append((t, settings))
    except ValueError as e:  # a setting the config refuses (e.g. a schedule too short)
      _tell(study, t, beat, state=TrialState.FAIL, attrs={'error': str(e)})
      log(f'trial {t.number} failed: {e}')
  for (template, dropout), members in groups.items():
    ran += _run_group(study, runner, template, dropout, members, space, batch, beat, log)
  return ran


class PinnedSampler(optuna.samplers.BaseSampler):
  """A sampler that returns given values for some parameters of some trials (`pin`) and asks `base` for
  the rest. Batches use it to give followers their leader's static parameters: kept in this process,
  unlike `study.enqueue_trial`, whose queued trials another worker could take."""

  def __init__(self, base: optuna.samplers.BaseSampler):
    self.base = base
    self._pins: dict[int, dict[str, Any]] = {}
    # Called with each new trial's id as Optuna creates it (before any sampling): the worker's claim.
    self.on_trial_created: Callable[[int], None] | None = None

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
    if self.on_trial_created is not None:
      self.on_trial_created(trial._trial_id)
    self.base.before_trial(study, trial)

  def after_trial(self, study, trial, state, values):
    self.unpin(trial.number)
    self.base.after_trial(study, trial, state, values)

  def reseed_rng(self) -> None:
    self.base.reseed_rng()


def _ask(study, k: int, space, base, base_dropnet, followers: bool = True) -> list[tuple[Any, dict[str, Any]]]:
  """k trials: a leader, then k - 1 followers given the leader's static parameters (with `followers`;
  else whatever the queue holds), so the sampler picks only their learning rate, momentum and weight decay."""
  if not isinstance(study.sampler, PinnedSampler):
    study.sampler = PinnedSampler(study.sampler)
  # Each trial is claimed (heartbeat, worker attributes) by the sampler as Optuna creates it.
  leader = _retry(study.ask)
  out = [(leader, suggest(leader, space, base, base_dropnet))]
  fixed = {p: v for p, v in leader.params.items() if p not in DYNAMIC}
  for _ in range(k - 1):
    t = _retry(study.ask)  # a new trial, or a queued one (a retry: its own parameters win, grouped apart)
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


def _run_group(study, runner: LaneRunner, template, dropout, members, space, batch, beat, log) -> list[int]:
  trials = [t for t, _ in members]
  lost: set[int] = set()

  nop = isinstance(study.pruner, optuna.pruners.NopPruner)  # a storage read per lane and epoch saved

  def on_epoch(lane: int, epoch: int, acc: float) -> bool:
    try:
      _retry(lambda: trials[lane].report(acc, epoch))
      return False if nop else _retry(trials[lane].should_prune)
    except (RuntimeError, ValueError, optuna.exceptions.UpdateFinishedTrialError):
      lost.add(lane)  # failed by another worker as stale: stop it, do not tell
      return True

  start = time.perf_counter()
  results = runner.run(template, [lane_hyperparams(s, space) for _, s in members],
                       lane_count=batch if batch > 1 else None, on_epoch=on_epoch, dropout=dropout)
  seconds = time.perf_counter() - start
  ran = []
  for i, ((t, settings), r) in enumerate(zip(members, results)):
    attrs = {'epochs': r.epochs, 'best_epoch': r.best_epoch, 'diverged': r.diverged, 'lanes': len(members),
             'group_seconds': seconds, 'best_val_accuracy': r.best_val_accuracy}
    ok = i not in lost and (
        _tell(study, t, beat, state=TrialState.PRUNED, attrs=attrs) if r.pruned
        else _tell(study, t, beat, value=r.best_val_accuracy, attrs=attrs))
    if ok:
      ran.append(t.number)
    # The value logged is the one the study holds (trials.csv's): for a pruned trial Optuna records its
    # last reported accuracy, not its best; the best epoch's accuracy is logged beside it.
    log(f'trial {t.number:3d} {"pruned" if r.pruned else "done  "} epochs {r.epochs:3d} '
        f'value {_value_text(recorded_value(study, t) if ok else None)} best_val_acc {r.best_val_accuracy:.4f} '
        f'lanes {len(members)} {_short(settings)}' + ('' if ok else ' (finished elsewhere: not told)'))
  return ran


def recorded_value(study, trial) -> float | None:
  """The value the study holds for a finished trial (what trials.csv and best.json report): the told
  value of a complete trial; for a pruned one, Optuna's choice, its last reported intermediate value."""
  return _retry(lambda: study._storage.get_trial(trial._trial_id)).value


def _value_text(value: float | None) -> str:
  return 'n/a' if value is None else f'{value:.4f}'


def _run_dropnet_trial(study, trial, settings, objective: DropNetObjective, beat, log) -> list[int]:
  start = time.perf_counter()
  try:
    value, attrs = objective(trial, settings)
  except optuna.TrialPruned:
    ok = _tell(study, trial, beat, state=TrialState.PRUNED, attrs={'seconds': time.perf_counter() - start})
    log(f'trial {trial.number:3d} pruned value {_value_text(recorded_value(study, trial) if ok else None)} '
        f'(last cycle\'s val_acc) {_short(settings)}')
    return [trial.number] if ok else []
  except ValueError as e:
    _tell(study, trial, beat, state=TrialState.FAIL, attrs={'error': str(e)})
    log(f'trial {trial.number} failed: {e}')
    return []
  ok = _tell(study, trial, beat, value=value, attrs={**attrs, 'seconds': time.perf_counter() - start})
  log(f'trial {trial.number:3d} done   value {value:.4f} (best val_acc at <= X) cycles {attrs["cycles"]} '
      f'{_short(settings)}')
  return [trial.number] if ok else []


def _short(settings: dict[str, Any]) -> str:
  return ' '.join(f'{k}={v:.3g}' if isinstance(v, float) else f'{k}={v}' for k, v in settings.items())
