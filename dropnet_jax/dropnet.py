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

from dropnet_jax import oracle, pruning
from dropnet_jax.models import Masks, full_masks, init_params
from dropnet_jax.train import DeviceData, FitState, TrainConfig, Trainer, split_theta

SCORE_SOURCES = ('data', 'epoch')
# The paper's oracle baseline: greedy by training loss with the trained params (dropnet_jax.oracle),
# not a function of activation statistics, so it is handled here rather than in pruning.METRICS.
ORACLE = 'oracle'


@dataclasses.dataclass(frozen=True)
class DropNetConfig:
  metrics: tuple[str, ...] = ('min', 'max', 'random', 'min_layer', 'max_layer', 'random_layer')
  fraction: float = 0.2  # p: fraction of the remaining units dropped per cycle
  floor: float = 0.1  # stop once the fraction of units remaining is <= floor
  kappa: float | None = None  # stop once val accuracy <= kappa * dense val accuracy
  score_from: str = 'data'  # 'data': a full pass over the training set; 'epoch': the best epoch's running sums
  oracle_examples: int | None = None  # training examples the oracle's loss uses (None: all)
  train: TrainConfig = TrainConfig()

  def validate(self) -> None:
    """Raises ValueError naming the offending setting."""
    for m in self.metrics:
      if m != ORACLE:
        pruning.check_metric(m)
    if self.oracle_examples is not None and self.oracle_examples < 1:
      raise ValueError(f'oracle_examples must be positive, got {self.oracle_examples}')
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
  return measure_cycle(trainer, state, data, score_from, time.perf_counter() - start)


def measure_cycle(trainer: Trainer, state: FitState, data: DeviceData, score_from: str,
                  seconds_so_far: float = 0.0) -> CycleOutcome:
  """Evaluates a finished training run; the record of one cycle."""
  start = time.perf_counter()
  masks = state.masks
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
  record['seconds'] = seconds_so_far + time.perf_counter() - start
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



# -- the experiment driver: a resumable loop over seeds x metrics x cycles ----


@dataclasses.dataclass
class Progress:
  """Where an experiment stands; everything needed to continue it exactly.

  The next unit of work is training `masks` for (seeds[seed_index], metric,
  cycle), where metric_index -1 is the seed's shared dense cycle. `fit` is a
  partly trained state when a checkpoint was taken mid-cycle.
  """
  records: list[dict[str, Any]]
  seed_index: int = 0
  metric_index: int = -1
  cycle: int = 0
  masks: Masks | None = None
  params0: Any = None
  dense_record: dict[str, Any] | None = None
  dense_sums: pruning.StatSums | None = None
  dense_params: Any = None  # the dense cycle's trained params, kept only for the oracle
  fit: FitState | None = None
  cycle_seconds: float = 0.0  # time spent on the current cycle before `fit` was saved
  finished: bool = False


def _key_data(state: FitState) -> FitState:
  return state._replace(key=jax.random.key_data(state.key))


def _wrap_key(state: FitState) -> FitState:
  return state._replace(key=jax.random.wrap_key_data(state.key))


def progress_to_checkpoint(p: Progress) -> tuple[dict[str, Any], dict[str, Any]]:
  """(arrays, meta) for `Checkpointer.save`. Pytrees are stored as leaf lists; the
  restore side rebuilds their structure from the model, so no Python classes are pickled."""
  arrays = {'params0': jax.tree.leaves(p.params0), 'masks': list(p.masks)}
  if p.dense_sums is not None:
    arrays['dense_sums'] = jax.tree.leaves(p.dense_sums)
  if p.fit is not None:
    arrays['fit'] = jax.tree.leaves(_key_data(p.fit))
  if p.dense_params is not None:
    arrays['dense_params'] = jax.tree.leaves(p.dense_params)
  meta = {'version': 1, 'records': p.records, 'seed_index': p.seed_index, 'metric_index': p.metric_index,
          'cycle': p.cycle, 'dense_record': p.dense_record, 'cycle_seconds': p.cycle_seconds,
          'finished': p.finished, 'has_dense_sums': p.dense_sums is not None, 'has_fit': p.fit is not None,
          'has_dense_params': p.dense_params is not None}
  return arrays, meta


def progress_from_checkpoint(checkpointer, model, image_shape, trainer: Trainer) -> Progress | None:
  meta = checkpointer.restore_meta()
  if meta is None:
    return None
  params_t = init_params(model, jax.random.key(0), image_shape)
  masks_t = full_masks(model)
  sums_t = pruning.StatSums(tuple(jnp.zeros_like(m) for m in masks_t), tuple(jnp.zeros_like(m) for m in masks_t),
                            jnp.zeros((), jnp.float32))
  fit_t = _key_data(trainer.init_fit(params_t, masks_t, jax.random.key(0)))
  template = {'params0': jax.tree.leaves(params_t), 'masks': list(masks_t)}
  if meta['has_dense_sums']:
    template['dense_sums'] = jax.tree.leaves(sums_t)
  if meta['has_fit']:
    template['fit'] = jax.tree.leaves(fit_t)
  if meta.get('has_dense_params'):
    template['dense_params'] = jax.tree.leaves(params_t)
  arrays = checkpointer.restore_arrays(template)
  unflatten = lambda t, leaves: jax.tree.unflatten(jax.tree.structure(t), [jnp.asarray(x) for x in leaves])
  return Progress(
      records=meta['records'], seed_index=meta['seed_index'], metric_index=meta['metric_index'],
      cycle=meta['cycle'], masks=tuple(jnp.asarray(m) for m in arrays['masks']),
      params0=unflatten(params_t, arrays['params0']), dense_record=meta['dense_record'],
      dense_sums=unflatten(sums_t, arrays['dense_sums']) if meta['has_dense_sums'] else None,
      fit=_wrap_key(unflatten(fit_t, arrays['fit'])) if meta['has_fit'] else None,
      dense_params=unflatten(params_t, arrays['dense_params']) if meta.get('has_dense_params') else None,
      cycle_seconds=meta['cycle_seconds'], finished=meta['finished'])


def run_experiment(model, image_shape, data: DeviceData, seeds: Sequence[int], config: DropNetConfig,
                   trainer: Trainer | None = None, checkpointer=None, checkpoint_every_epochs: int = 0,
                   on_record: Callable[[list[dict[str, Any]]], None] | None = None,
                   log: Callable[[str], None] = print, log_epochs: bool = True) -> list[dict[str, Any]]:
  """Algorithm 1 for every seed and metric; returns all records.

  With a `checkpointer`, the state is saved after every cycle and every
  `checkpoint_every_epochs` epochs (0: only after cycles), and a run finds its
  newest checkpoint and continues from it, producing the same records (up to
  wall-clock `seconds`) as an uninterrupted run. `on_record` gets the full
  list of records whenever it grows (and once on resume).
  """
  trainer = trainer or Trainer(model, config.train)
  seeds = list(seeds)
  p = progress_from_checkpoint(checkpointer, model, image_shape, trainer) if checkpointer else None
  if p is not None:
    log(f'resuming: {len(p.records)} records so far, seed {seeds[p.seed_index] if not p.finished else "-"} '
        f'metric {p.metric_index} cycle {p.cycle}' + (f' epoch {int(p.fit.epoch)}' if p.fit is not None else ''))
    if on_record and p.records:
      on_record(p.records)
  else:
    p = Progress(records=[])

  def save():
    if checkpointer is not None:
      checkpointer.save(*progress_to_checkpoint(p))

  def start_seed():
    keys = SeedKeys.for_seed(seeds[p.seed_index])
    p.params0 = init_params(model, keys.init, image_shape)
    p.metric_index, p.cycle, p.masks = -1, 0, full_masks(model)
    p.dense_record = p.dense_sums = p.dense_params = p.fit = None
    p.cycle_seconds = 0.0

  if p.params0 is None and not p.finished:
    start_seed()
    save()

  while not p.finished:
    seed = seeds[p.seed_index]
    keys = SeedKeys.for_seed(seed)
    metric = 'dense' if p.metric_index < 0 else config.metrics[p.metric_index]

    # Train the pending cycle (continuing a mid-cycle state if there is one).
    started = time.perf_counter()
    state = p.fit if p.fit is not None else trainer.init_fit(p.params0, p.masks, keys.shuffle_key(p.cycle))
    while not bool(state.done):
      state = trainer.epoch_step(state, data)
      if log_epochs:
        log(f'seed {seed} {metric:>12} cycle {p.cycle:2d} epoch {int(state.epoch):3d} '
            f'train_loss {float(state.train_loss):.4f} val_loss {float(state.val_loss):.4f} '
            f'val_acc {float(state.val_accuracy):.4f}' + (' (stop)' if bool(state.done) else ''))
      if checkpoint_every_epochs and not bool(state.done) and int(state.epoch) % checkpoint_every_epochs == 0:
        p.fit, p.cycle_seconds = state, p.cycle_seconds + time.perf_counter() - started
        started = time.perf_counter()
        save()
    outcome = measure_cycle(trainer, state, data, config.score_from,
                            p.cycle_seconds + time.perf_counter() - started)
    p.fit, p.cycle_seconds = None, 0.0
    if outcome.record['diverged']:
      log(f'seed {seed} {metric} cycle {p.cycle}: non-finite loss at epoch {outcome.record["epochs_trained"]}; '
          'recording it and stopping this trial')

    if p.metric_index < 0:  # the dense cycle: shared by every metric of this seed
      p.dense_record, p.dense_sums = outcome.record, outcome.sums
      if ORACLE in config.metrics:
        p.dense_params = state.best_params
      p.metric_index = 0
      p.masks = full_masks(model)

    # Record the cycle(s) and find the next work. A metric's cycle 0 is the shared dense
    # outcome, so entering a metric can finish it (and the next) without any training.
    while True:
      metric = config.metrics[p.metric_index]
      if p.cycle == 0:
        outcome = CycleOutcome(None, p.dense_record, p.dense_sums)
      trained_params = p.dense_params if p.cycle == 0 else outcome.state.best_params
      record = {'seed': seed, 'metric': metric, 'cycle': p.cycle, **outcome.record}
      stop = should_stop(record, p.dense_record['val_accuracy'], config)
      if not stop:
        if metric == ORACLE:
          params, batch_stats = split_theta(trained_params)  # batch-norm models: θ holds running stats
          new_masks = oracle.oracle_mask(model.apply, params, p.masks, data.train_images, data.train_labels,
                                         config.fraction, max_examples=config.oracle_examples,
                                         extra_variables=None if batch_stats is None else {'batch_stats': batch_stats})
        else:
          new_masks = next_masks(p.masks, outcome.sums, metric, config.fraction, keys.mask_key(metric, p.cycle))
        if pruning.units_per_layer(new_masks) == record['units']:
          stop = 'nothing left to drop'
      record['stop_reason'] = stop
      p.records.append(record)
      log(f'seed {seed} {metric:>12} cycle {p.cycle:2d} fraction {record["fraction_remaining"]:.3f} '
          f'units {record["units"]} test_acc {record["test_accuracy"]:.4f} '
          f'epoch {record["early_stop_epoch"]} ({record["seconds"]:.1f}s)' + (f' stop: {stop}' if stop else ''))
      if not stop:
        p.masks, p.cycle = new_masks, p.cycle + 1
        break
      if p.metric_index + 1 < len(config.metrics):
        p.metric_index, p.cycle, p.masks = p.metric_index + 1, 0, full_masks(model)
        continue
      if p.seed_index + 1 < len(seeds):
        p.seed_index += 1
        start_seed()
      else:
        p.finished = True
      break
    save()
    if on_record:
      on_record(p.records)
  return p.records


def run_seed(model, image_shape, data: DeviceData, seed: int, config: DropNetConfig,
             trainer: Trainer | None = None, on_record: Callable[[dict[str, Any]], None] | None = None,
             log: Callable[[str], None] = print, log_epochs: bool = True) -> list[dict[str, Any]]:
  """All metrics of one seed, without checkpoints; `on_record` gets each new record."""
  seen = 0

  def each(records):
    nonlocal seen
    for r in records[seen:]:
      on_record(r)
    seen = len(records)

  return run_experiment(model, image_shape, data, [seed], config, trainer, on_record=each if on_record else None,
                        log=log, log_epochs=log_epochs)


def random_init_key(seed: int, cycle: int) -> jax.Array:
  """The fresh initialisation for the random re-initialisation baseline: new per (seed, cycle), never θ0's."""
  return jax.random.fold_in(jax.random.fold_in(SeedKeys.for_seed(seed).init, 0x5EED), cycle)


def retrain_from_random_init(trainer: Trainer, model, image_shape, data: DeviceData, record: dict[str, Any],
                             score_from: str = 'data') -> dict[str, Any]:
  """The paper's "randominit": the record's mask retrained from a fresh random init, not θ0.

  Only the initialisation differs from the θ0 run: same mask, same shuffle order.
  """
  seed, cycle = record['seed'], record['cycle']
  params = init_params(model, random_init_key(seed, cycle), image_shape)
  outcome = train_cycle(trainer, params, masks_from_strings(record['mask']), data,
                        SeedKeys.for_seed(seed).shuffle_key(cycle), score_from)
  return {'seed': seed, 'metric': f'{record["metric"]}_randominit', 'cycle': cycle, **outcome.record,
          'stop_reason': record['stop_reason']}
