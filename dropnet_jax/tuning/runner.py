"""Training trials: lanes of one compiled program with per-lane hyperparameters, the final retrain,
and the DropNet objective (see dropnet_jax.tuning)."""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optuna
from jax.sharding import NamedSharding, PartitionSpec as P

from dropnet_jax.config import DropNetConfig, TrainConfig
from dropnet_jax.loop.driver import RunIO, init_lanes
from dropnet_jax.loop.dropnet import SeedKeys, run_experiment
from dropnet_jax.training.lanes import Lanes, OneLane
from dropnet_jax.models.layers import full_masks
from dropnet_jax.models import init_params
from dropnet_jax.training.optim import with_hyperparams
from dropnet_jax.training.trainer import DATA_AXIS, DeviceData, FitState, Trainer, fit, steps_per_epoch
from dropnet_jax.tuning.space import train_config, trial_model

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

  def _programs(self, template: TrainConfig, lane_count: int | None, dropout: float | None = None):
    key = (template, lane_count, dropout)
    if key not in self._cache:
      model = self.model if dropout is None else self.model.clone(dropout=dropout)  # θ0 is the same: no params
      trainer = Trainer(model, template, steps_per_epoch=self.steps(template.batch_size))
      self._cache[key] = (trainer, OneLane(trainer) if lane_count is None else Lanes(trainer, self.lanes_per_chunk))
      while len(self._cache) > self._cache_size:
        self._cache.popitem(last=False)
    self._cache.move_to_end(key)
    return self._cache[key]

  def run(self, template: TrainConfig, hypers: list[dict[str, float]], lane_count: int | None = None,
          on_epoch: Callable[[int, int, float], bool] | None = None,
          dropout: float | None = None) -> list[LaneResult]:
    """Trains one lane per `hypers` entry (optax names -> values) from θ0 until each early-stops,
    diverges, reaches max_epochs or is stopped: `on_epoch(lane, epoch, val_accuracy)` returning True
    stops (prunes) that lane. `lane_count=None`: one trial, one-trial programs. `dropout`: the
    trials' dropout rate (None: the model's own)."""
    n = len(hypers)
    trainer, runner = self._programs(template, lane_count, dropout)
    if not runner.batched and n != 1:
      raise ValueError(f'one-trial programs train one trial, got {n}')
    count = runner.pad(max(lane_count, n)) if runner.batched else 1
    # Every lane starts from θ0 with the full masks and the same shuffle order (padding lanes frozen).
    state = init_lanes(runner, [(self.theta0, self.masks, self.shuffle_key)] * n, count)
    if runner.batched:
      values = {k: np.asarray([h[k] for h in hypers] + [hypers[0][k]] * (count - n), np.float32) for k in hypers[0]}
    else:
      values = hypers[0]
    state = state._replace(opt_state=with_hyperparams(state.opt_state, **values))
    step = runner.epoch_step
    # Inputs placed as the program's outputs will be, so the second epoch does not compile again
    # (a committed sharding differs from the first call's uncommitted arrays).
    split = runner.batched and trainer.num_devices > 1 and count % trainer.num_devices == 0
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
        state = _set_done(state, stop, not runner.batched)
    return results


def _set_done(state: FitState, lanes: list[int], single: bool) -> FitState:
  """`state` with these lanes marked done (frozen), on the same devices/sharding as before."""
  if single:
    return state._replace(done=jnp.ones_like(state.done))
  done = np.asarray(jax.device_get(state.done)).copy()
  done[lanes] = True
  return state._replace(done=jax.device_put(done, state.done.sharding))


# -- the final retrain ----------------------------------------------------------------------------

def retrain(model, image_shape, data: DeviceData, config: TrainConfig, seeds: Sequence[int],
            on_trained: Callable[[int, Any], None] | None = None) -> list[dict[str, Any]]:
  """The configuration trained from each seed's θ0 to early stopping (no pruning); test accuracy of θ
  at the best-validation-loss epoch (the project's convention) and at the last epoch.
  `on_trained(seed, θ)` gets each seed's best-validation-loss θ (the one the accuracies are of)."""
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
                'val_loss': float(best_val.loss), 'test_accuracy': float(best_test.accuracy),
                'test_loss': float(best_test.loss), 'last_test_accuracy': float(last_test.accuracy)})
    if on_trained is not None:
      on_trained(seed, state.best_params)
  return out


# -- the DropNet objective ------------------------------------------------------------------------

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
    self._trainers: collections.OrderedDict = collections.OrderedDict()  # (TrainConfig, dropout) -> Trainer

  def _trainer(self, config: TrainConfig, model) -> Trainer:
    key = (config, model.dropout)
    if key not in self._trainers:
      self._trainers[key] = Trainer(model, config, steps_per_epoch=steps_per_epoch(
          int(self.data.train_labels.shape[0]), config.batch_size))
      while len(self._trainers) > 4:
        self._trainers.popitem(last=False)
    return self._trainers[key]

  def config(self, settings: dict[str, Any]) -> DropNetConfig:
    config = dataclasses.replace(self.base, metrics=(settings['metric'],), fraction=float(settings['fraction']),
                                 floor=self.units_remaining, train=train_config(settings, self.base.train))
    config.validate()
    return config

  def run(self, settings: dict[str, Any], seeds: Sequence[int] | None = None,
          on_cycle: Callable[[dict[str, Any]], None] | None = None, io: RunIO | None = None) -> list[dict[str, Any]]:
    """DropNet with the trial's settings; `io` (e.g. with a params store, for the final retrain) gets the
    records and this objective's log."""
    each = (lambda records: on_cycle(records[-1])) if on_cycle else None
    config, model = self.config(settings), trial_model(self.model, settings)
    io = dataclasses.replace(io or RunIO(), on_record=each, log=self.log)
    return run_experiment(model, self.image_shape, self.data, list(seeds or [self.seed]), config,
                          self._trainer(config.train, model), io)

  def __call__(self, trial, settings: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    def on_cycle(record):
      trial.report(float(record['val_accuracy']), int(record['cycle']))
      if trial.should_prune():
        raise optuna.TrialPruned()
    records = self.run(settings, on_cycle=on_cycle)
    return dropnet_value(records, self.units_remaining), {'cycles': len(records), 'epochs': sum(
        r['epochs_trained'] for r in records), 'fraction_remaining': records[-1]['fraction_remaining']}
