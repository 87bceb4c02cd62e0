"""DropNet, Algorithm 1 of Tan & Motani (ICML 2020).

Per seed, θ0 is initialised once. Every cycle of every metric restarts from
exactly those arrays with the current mask, trains with early stopping, scores
the units with the trained (best-validation-loss) params and drops a fraction
of the remaining ones, until the fraction left reaches the floor or the
validation accuracy falls to κ times the dense run's.

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
import jax.numpy as jnp

from dropnet_jax import pruning
from dropnet_jax.models import Masks, full_masks, init_params
from dropnet_jax.train import DeviceData, FitState, TrainConfig, Trainer

SCORE_SOURCES = ('data', 'epoch')


@dataclasses.dataclass(frozen=True)
class DropNetConfig:
  metrics: tuple[str, ...] = ('min', 'max', 'random', 'min_layer', 'max_layer', 'random_layer')
  fraction: float = 0.2  # p: fraction of the remaining units dropped per cycle
  floor: float = 0.1  # stop once the fraction of units remaining is <= floor
  kappa: float | None = None  # stop once val accuracy <= kappa * dense val accuracy
  score_from: str = 'data'  # 'data': a full pass over the training set; 'epoch': the best epoch's running sums
  train: TrainConfig = TrainConfig()

  def validate(self) -> None:
    """Raises ValueError naming the offending setting."""
    for m in self.metrics:
      pruning.check_metric(m)
    if not self.metrics:
      raise ValueError('metrics: at least one metric is needed')
    if len(set(self.metrics)) != len(self.metrics):
      raise ValueError(f'metrics: duplicates in {self.metrics}')
    if not 0 < self.fraction <= 1:
      raise ValueError(f'fraction must be in (0, 1], got {self.fraction}')
    if not 0 < self.floor < 1:
      raise ValueError(f'floor must be in (0, 1), got {self.floor}')
    if self.kappa is not None and not 0 < self.kappa <= 1:
      raise ValueError(f'kappa must be in (0, 1], got {self.kappa}')
    if self.score_from not in SCORE_SOURCES:
      raise ValueError(f'score_from must be one of {SCORE_SOURCES}, got {self.score_from!r}')
    t = self.train
    if t.lr <= 0:
      raise ValueError(f'lr must be positive, got {t.lr}')
    for name in ('batch_size', 'max_epochs', 'patience', 'eval_batch_size'):
      if getattr(t, name) < 1:
        raise ValueError(f'{name} must be a positive integer, got {getattr(t, name)}')


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


def mask_to_strings(masks: Masks) -> list[str]:
  return [''.join('1' if v > 0 else '0' for v in jax.device_get(m)) for m in masks]


def masks_from_strings(bits: Sequence[str]) -> Masks:
  return tuple(jnp.array([c == '1' for c in b], jnp.float32) for b in bits)


@dataclasses.dataclass
class CycleOutcome:
  """The trained state of one cycle and its record fields."""
  state: FitState
  record: dict[str, Any]
  sums: pruning.StatSums  # per-unit stat sums used for scoring


def train_cycle(trainer: Trainer, params0, masks: Masks, data: DeviceData, shuffle_key: jax.Array,
                score_from: str = 'data', on_epoch: Callable[[FitState], None] | None = None) -> CycleOutcome:
  """Trains `masks` from θ0 with early stopping and measures the result."""
  start = time.perf_counter()
  state = trainer.fit(trainer.init_fit(params0, masks, shuffle_key), data, on_epoch)
  best, last = state.best_params, state.params
  train = trainer.evaluate(best, masks, data.train_images, data.train_labels)
  val = trainer.evaluate(best, masks, data.val_images, data.val_labels)
  test = trainer.evaluate(best, masks, data.test_images, data.test_labels)
  last_test = trainer.evaluate(last, masks, data.test_images, data.test_labels)
  sums = train.sums if score_from == 'data' else state.best_sums
  f = lambda x: float(x)
  record = {
      'fraction_remaining': pruning.fraction_remaining(masks),
      'units': pruning.units_per_layer(masks),
      # At the best-validation-loss epoch (the paper's definition).
      'train_accuracy': f(train.accuracy), 'train_loss': f(train.loss),
      'val_accuracy': f(val.accuracy), 'val_loss': f(val.loss),
      'test_accuracy': f(test.accuracy), 'test_loss': f(test.loss),
      # At the last epoch trained (what the official Keras code reported).
      'last_train_accuracy': f(state.train_accuracy), 'last_train_loss': f(state.train_loss),
      'last_val_accuracy': f(state.val_accuracy), 'last_val_loss': f(state.val_loss),
      'last_test_accuracy': f(last_test.accuracy), 'last_test_loss': f(last_test.loss),
      'early_stop_epoch': int(state.best_epoch), 'epochs_trained': int(state.epoch),
      'diverged': bool(state.diverged),
      'mask': mask_to_strings(masks),
  }
  record['seconds'] = time.perf_counter() - start
  return CycleOutcome(state, record, sums)


def next_masks(masks: Masks, sums: pruning.StatSums, metric: str, fraction: float, key: jax.Array) -> Masks:
  scores = pruning.unit_scores(sums, metric)
  return _update_mask_jit(masks, scores, metric, fraction, key)


_update_mask_jit = jax.jit(pruning.update_mask, static_argnames='metric')


def should_stop(record: dict[str, Any], dense_val_accuracy: float, config: DropNetConfig) -> str | None:
  """Why Algorithm 1 stops after this cycle, or None to go on."""
  if record['diverged']:
    return 'diverged'
  if record['fraction_remaining'] <= config.floor:
    return 'floor'
  if (config.kappa is not None and record['cycle'] > 0
      and record['val_accuracy'] <= config.kappa * dense_val_accuracy):
    return 'kappa'
  return None


def run_seed(model, dataset_image_shape, data: DeviceData, seed: int, config: DropNetConfig,
             trainer: Trainer | None = None,
             on_record: Callable[[dict[str, Any]], None] | None = None,
             log: Callable[[str], None] = print, log_epochs: bool = True) -> list[dict[str, Any]]:
  """All metrics of one seed; returns the records in the order they were made."""
  trainer = trainer or Trainer(model, config.train)
  keys = SeedKeys.for_seed(seed)
  params0 = init_params(model, keys.init, dataset_image_shape)
  records: list[dict[str, Any]] = []

  def progress(metric, cycle):
    if not log_epochs:
      return None

    def on_epoch(s: FitState):
      log(f'seed {seed} {metric:>12} cycle {cycle:2d} epoch {int(s.epoch):3d} '
          f'train_loss {float(s.train_loss):.4f} val_loss {float(s.val_loss):.4f} '
          f'val_acc {float(s.val_accuracy):.4f}' + (' (stop)' if bool(s.done) else ''))
    return on_epoch

  dense = train_cycle(trainer, params0, full_masks(model), data, keys.shuffle_key(0), config.score_from,
                      progress('dense', 0))
  for metric in config.metrics:
    outcome, cycle, masks = dense, 0, full_masks(model)
    while True:
      record = {'seed': seed, 'metric': metric, 'cycle': cycle, **outcome.record}
      stop = should_stop(record, dense.record['val_accuracy'], config)
      if not stop:
        new_masks = next_masks(masks, outcome.sums, metric, config.fraction, keys.mask_key(metric, cycle))
        if pruning.units_per_layer(new_masks) == record['units']:
          stop = 'nothing left to drop'
      record['stop_reason'] = stop
      records.append(record)
      if on_record:
        on_record(record)
      log(f'seed {seed} {metric:>12} cycle {cycle:2d} fraction {record["fraction_remaining"]:.3f} '
          f'units {record["units"]} test_acc {record["test_accuracy"]:.4f} '
          f'epoch {record["early_stop_epoch"]} ({record["seconds"]:.1f}s)' + (f' stop: {stop}' if stop else ''))
      if stop:
        break
      masks, cycle = new_masks, cycle + 1
      outcome = train_cycle(trainer, params0, masks, data, keys.shuffle_key(cycle), config.score_from,
                            progress(metric, cycle))
  return records
