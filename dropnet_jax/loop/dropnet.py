"""DropNet, Algorithm 1 of Tan & Motani (ICML 2020).

    θ0 <- init(seed); mask <- all ones
    repeat:
      θ <- train(θ0, mask) with early stopping          (every cycle restarts from θ0, bit for bit)
      record accuracies; stop if fraction remaining <= floor, or val acc <= κ · dense val acc
      mask <- criterion(θ, unit statistics, mask, key)   (drop p of the remaining units)

The loop itself (groups of trials, lanes, checkpoints, saved params) is
`dropnet_jax.loop.driver`; the criteria are the registry in `dropnet_jax.pruning.criteria`.
This module holds what makes it DropNet: the keys, the stop rule and the
record of a cycle (`DropNetMethod`), the entry function `run_experiment`, and
`reference_run`, the same algorithm for one trial as a plain loop to read.

Randomness is split so runs are comparable: the shuffle order depends only on
(seed, cycle) and the tie-breaks/random drops on (seed, metric, cycle). Hence
cycle 0 (the dense network) is the same computation for every metric of a seed
and is trained once and shared.
"""

from __future__ import annotations

import dataclasses
import time
import zlib
from typing import Any, Callable, Sequence

import jax

from dropnet_jax.compaction import accounting

from dropnet_jax.pruning import criteria
from dropnet_jax.training import trainer as train_lib
from dropnet_jax.config import DropNetConfig
from dropnet_jax.loop.driver import Driver, Outcome, RunIO, Trial, log_info
from dropnet_jax.loop.measure import measure
from dropnet_jax.training.lanes import Lanes, OneLane
from dropnet_jax.models.layers import Masks, full_masks, zero_sums
from dropnet_jax.pruning.masks import fraction_remaining, mask_to_strings, masks_from_strings, units_per_layer
from dropnet_jax.models import init_params
from dropnet_jax.training.trainer import DeviceData, Trainer


def metric_salt(metric: str) -> int:
  """A stable per-metric integer for PRNG folding (independent of --metrics order)."""
  return zlib.crc32(metric.encode()) & 0x7FFFFFFF


@dataclasses.dataclass(frozen=True)
class SeedKeys:
  init: jax.Array
  shuffle: jax.Array
  mask: jax.Array

  @classmethod
  def for_seed(cls, seed: int) -> 'SeedKeys':
    init, shuffle, mask = jax.random.split(jax.random.key(seed), 3)
    return cls(init, shuffle, mask)

  def shuffle_key(self, cycle: int) -> jax.Array:
    return jax.random.fold_in(self.shuffle, cycle)

  def mask_key(self, metric: str, cycle: int) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(self.mask, metric_salt(metric)), cycle)


def should_stop(record: dict[str, Any], dense_val_accuracy: float, config: DropNetConfig) -> str | None:
  """Why Algorithm 1 stops after this cycle, or None to go on."""
  if record['diverged']:
    return 'diverged'
  # Size budgets: the first network whose compact form fits is the answer.
  if config.param_budget is not None and record['params'] <= config.param_budget:
    return 'param_budget'
  if config.mac_budget is not None and record['macs'] <= config.mac_budget:
    return 'mac_budget'
  if record['fraction_remaining'] <= config.floor:
    return 'floor'
  if (config.kappa is not None and record['cycle'] > 0
      and record['val_accuracy'] <= config.kappa * dense_val_accuracy):
    return 'kappa'
  return None


class DropNetMethod:
  """Algorithm 1's side of the loop (`driver.Method`) for one model, dataset and configuration."""

  def __init__(self, model, image_shape: Sequence[int], data: DeviceData, config: DropNetConfig,
               log: Callable[[str], None] = log_info, start_theta: Any = None):
    self.model, self.image_shape, self.config, self.log = model, tuple(image_shape), config, log
    self.start_theta = start_theta  # a loaded dense network (runs.init_from), or None: trained from θ0
    self.score_from, self.score_params = config.score_from, config.score_params
    self.context = criteria.Context(model.apply, data.train_images, data.train_labels, config.oracle_examples)

  def theta0(self, seed: int):
    return init_params(self.model, SeedKeys.for_seed(seed).init, self.image_shape)

  def full_mask(self) -> Masks:
    return full_masks(self.model)

  def dense_start(self, seed: int) -> tuple[Any, int | None]:
    """The dense cycle: the loaded network evaluated as given (0 epochs), else trained from θ0."""
    del seed
    return (None, None) if self.start_theta is None else (self.start_theta, 0)

  def sums_template(self):
    return zero_sums(full_masks(self.model))

  def shuffle_key(self, seed: int, cycle: int) -> jax.Array:
    return SeedKeys.for_seed(seed).shuffle_key(cycle)

  def mask_fields(self, masks: Masks) -> dict[str, Any]:
    """The mask's record fields, with the size of its compact network (`compact`, `accounting`) for
    the library's model families (a model of one's own has no counts, so no size budgets)."""
    out = {'fraction_remaining': fraction_remaining(masks), 'units': units_per_layer(masks)}
    if accounting.supports(self.model):
      size = accounting.summary(self.model, self.image_shape, masks)
      out.update(params=size['params'], macs=size['macs'])
    return {**out, 'mask': mask_to_strings(masks)}

  def advance(self, trial: Trial, outcome: Outcome, dense: Outcome) -> None:
    """Records the trial's cycle, then stops it or sets its next mask."""
    record = {'seed': trial.seed, 'metric': trial.metric, 'cycle': trial.cycle, **outcome.fields}
    stop = should_stop(record, dense.fields['val_accuracy'], self.config)
    if not stop:
      inputs = criteria.PruneInputs(outcome.score_theta, outcome.sums, trial.mask,
                                    SeedKeys.for_seed(trial.seed).mask_key(trial.metric, trial.cycle),
                                    self.config.fraction)
      new_mask = tuple(criteria.get(trial.metric)(inputs, self.context))
      if units_per_layer(new_mask) == record['units']:
        stop = 'nothing left to drop'
    record['stop_reason'] = stop
    trial.records.append(record)
    self.log(f'seed {trial.seed} {trial.metric:>12} cycle {trial.cycle:2d} fraction {record["fraction_remaining"]:.3f} '
             f'units {record["units"]} test_acc {record["test_accuracy"]:.4f} '
             f'epoch {record["early_stop_epoch"]} ({record["seconds"]:.1f}s)' + (f' stop: {stop}' if stop else ''))
    if stop:
      trial.stopped = True
    else:
      trial.mask, trial.cycle = new_mask, trial.cycle + 1


def default_trainer(model, data: DeviceData, config: DropNetConfig) -> Trainer:
  """The Trainer of `config.train` for `data` (what `run_experiment` uses when given none)."""
  return Trainer(model, config.train, steps_per_epoch=train_lib.steps_per_epoch(
      data.train_labels.shape[0], config.train.batch_size))


def run_experiment(model, image_shape, data: DeviceData, seeds: Sequence[int], config: DropNetConfig,
                   trainer: Trainer | None = None, io: RunIO | None = None, batch_trials: bool = False,
                   lanes_per_chunk: int | None = None, lane_schedule: str = 'barrier',
                   lanes: int | None = None, start_theta: Any = None) -> list[dict[str, Any]]:
  """Algorithm 1 for every seed x metric; returns all records (seed by seed, metrics in config
  order, cycles ascending).

  Sequential (default): one trial at a time. `batch_trials`: all trials of a
  cycle together, as lanes of one program (`lanes_per_chunk`: `lanes.Lanes`);
  `lanes` trials at a time (None: all), and with `lane_schedule='continuous'`
  on `lanes` lanes without a barrier between cycles (`continuous`).
  `io` (`driver.RunIO`; None: in memory, lines to logging at INFO) is what the run writes
  and reports: with a checkpointer, the state is offered at every epoch and cycle
  end (saved by its policy, `runs.checkpoint`, and every `checkpoint_every_epochs`
  epochs, on an interrupt and at the end) and a rerun continues from the newest
  checkpoint with the same records (up to `seconds`); `on_record` gets all
  records so far after every cycle (and once on resume); `params_store` keeps
  the trained θ of finished cycles; `monitor` gets progress events; `stamp`
  (the settings and data fingerprint) guards the checkpoints.
  `start_theta`: a loaded dense network (`runs.init_from`): cycle 0 evaluates it instead of training
  from θ0, the later cycles still restart from the seed's θ0 (why: `runs.init_from`).
  `reference_run` is the same computation for one trial as a plain loop.
  """
  config.validate()
  if (config.param_budget or config.mac_budget) and not accounting.supports(model):
    raise ValueError(f'param_budget/mac_budget: no params/MACs counts for {type(model).__name__}')
  io = io or RunIO()
  trainer = trainer or default_trainer(model, data, config)
  method = DropNetMethod(model, image_shape, data, config, io.log, start_theta)
  trials = [Trial(seed, metric, method.full_mask()) for seed in seeds for metric in config.metrics]
  if not trials:
    return []
  if (lane_schedule != 'barrier' or lanes is not None) and not batch_trials:
    raise ValueError('lane_schedule and lanes apply to batched trials: add batch_trials')
  runner = Lanes(trainer, lanes_per_chunk) if batch_trials else OneLane(trainer)
  return Driver(method, trials, runner, data, group_size=lanes if batch_trials else 1, io=io,
                schedule=lane_schedule, lanes=lanes).run()


def run_seed(model, image_shape, data: DeviceData, seed: int, config: DropNetConfig,
             trainer: Trainer | None = None, on_record: Callable[[dict[str, Any]], None] | None = None,
             log: Callable[[str], None] = log_info, log_epochs: bool = True) -> list[dict[str, Any]]:
  """All metrics of one seed, without checkpoints; `on_record` gets each new record."""
  seen = 0

  def each(records):
    nonlocal seen
    for r in records[seen:]:
      on_record(r)
    seen = len(records)

  return run_experiment(model, image_shape, data, [seed], config, trainer,
                        RunIO(on_record=each if on_record else None, log=log, log_epochs=log_epochs))


def reference_run(model, image_shape, data: DeviceData, seed: int, metric: str, config: DropNetConfig,
                  trainer: Trainer | None = None) -> list[dict[str, Any]]:
  """Algorithm 1 for one seed and one criterion as a plain loop, to read (and to test the driver
  against): the same keys, training, measuring, criterion and stop rule as `run_experiment`, without
  groups, lanes, checkpoints or a shared dense cycle, so its records equal the driver's (but for
  `seconds`; batched lanes to float rounding)."""
  config.validate()
  trainer = trainer or default_trainer(model, data, config)
  method = DropNetMethod(model, image_shape, data, config, log=lambda s: None)  # record fields, criterion context
  keys = SeedKeys.for_seed(seed)
  theta0 = init_params(model, keys.init, image_shape)  # θ0 <- init(seed)
  mask = full_masks(model)  # mask <- all ones
  records: list[dict[str, Any]] = []
  cycle = 0
  while True:  # repeat
    start = time.perf_counter()
    # θ <- train(θ0, mask): reset to θ0, train the masked network with early stopping (best val loss).
    state = train_lib.fit(trainer.epoch_step, trainer.init_fit(theta0, mask, keys.shuffle_key(cycle)), data)
    outcome = measure(OneLane(trainer), state, data, method, time.perf_counter() - start, [True])[0]
    record = {'seed': seed, 'metric': metric, 'cycle': cycle, **outcome.fields}  # record accuracies
    if cycle == 0:
      dense_val_accuracy = record['val_accuracy']  # what κ compares the later cycles with
    # Stop if fraction remaining <= floor, or val acc <= κ · dense val acc (or a size budget is met).
    stop = should_stop(record, dense_val_accuracy, config)
    if not stop:
      # mask <- criterion(θ, unit statistics, mask, key): drop p of the remaining units.
      inputs = criteria.PruneInputs(outcome.score_theta, outcome.sums, mask, keys.mask_key(metric, cycle),
                                    config.fraction)
      new_mask = tuple(criteria.get(metric)(inputs, method.context))
      if units_per_layer(new_mask) == record['units']:
        stop = 'nothing left to drop'
    record['stop_reason'] = stop
    records.append(record)
    if stop:
      return records
    mask, cycle = new_mask, cycle + 1


def train_cycle(trainer: Trainer, params0, masks: Masks, data: DeviceData, shuffle_key: jax.Array,
                config: DropNetConfig = DropNetConfig()) -> Outcome:
  """One cycle outside the loop: trains `masks` from `params0` with early stopping and measures it."""
  start = time.perf_counter()
  state = train_lib.fit(trainer.epoch_step, trainer.init_fit(params0, masks, shuffle_key), data)
  method = DropNetMethod(trainer.model, data.train_images.shape[1:], data, config)
  return measure(OneLane(trainer), state, data, method, time.perf_counter() - start, [True])[0]


def random_init_key(seed: int, cycle: int) -> jax.Array:
  """The fresh initialisation for the random re-initialisation baseline: new per (seed, cycle), never θ0's."""
  return jax.random.fold_in(jax.random.fold_in(SeedKeys.for_seed(seed).init, 0x5EED), cycle)


def retrain_from_random_init(trainer: Trainer, model, image_shape, data: DeviceData, record: dict[str, Any],
                             config: DropNetConfig = DropNetConfig(), *, with_theta: bool = False):
  """The paper's "randominit": the record's mask retrained from a fresh random init, not θ0.

  Only the initialisation differs from the θ0 run: same mask, same shuffle order. Returns the new
  record (with `with_theta`: (record, its trained θ), the best-validation-loss params).
  """
  seed, cycle = record['seed'], record['cycle']
  params = init_params(model, random_init_key(seed, cycle), image_shape)
  outcome = train_cycle(trainer, params, masks_from_strings(record['mask']), data,
                        SeedKeys.for_seed(seed).shuffle_key(cycle), config)
  new = {'seed': seed, 'metric': f'{record["metric"]}_randominit', 'cycle': cycle, **outcome.fields,
         'stop_reason': record['stop_reason']}
  return (new, outcome.best_theta) if with_theta else new
