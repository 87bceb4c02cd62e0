"""Algorithm 1 for many trials at once: all (seed, metric) runs of one model in lockstep cycles.

Every cycle trains all its trials together in one compiled program,
`Trainer.batched_epoch_step` (`jit(vmap(epoch_step))`: params, optimiser
state, masks and shuffling keys carry a leading trial axis, the data are
shared). Early stopping is per trial: a trial whose `FitState.done` is set
stops changing while the others go on, and the cycle ends when all are done.

The batch shape never changes, so nothing recompiles between cycles: cycle 0
(the dense network, the same computation for every metric of a seed) is
trained once per seed, in a batch of len(seeds) trials, and shared by the
seed's metrics exactly as `dropnet.run_seed` does; every later cycle is a
batch of len(seeds) x len(metrics) lanes in a fixed order, where a trial that
has stopped keeps its lane as a done (frozen) state whose results are
ignored (and which the trainer does not recompute, see
`Trainer.lanes_per_chunk`). With several devices the lane counts are padded
to a multiple of the device count so the lanes can be split over them. Scoring and mask updates use `dropnet.next_masks` per trial with the
keys of `dropnet.SeedKeys`, so the records are those of `run_seed` (up to
float rounding of the batched arithmetic and the wall-clock `seconds`, which
here is the time of the whole batched cycle).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dropnet_jax import pruning
from dropnet_jax.dropnet import ORACLE, DropNetConfig, SeedKeys, mask_to_strings, next_masks, should_stop
from dropnet_jax.models import full_masks, init_params
from dropnet_jax.train import DeviceData, FitState, Trainer

_stack = lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def train_lanes(trainer: Trainer, state: FitState, data: DeviceData,
                on_epoch: Callable[[FitState], None] | None = None) -> FitState:
  """Runs the batched epoch step until every lane is done (one small host read of `done` per epoch)."""
  while not np.all(np.asarray(state.done)):
    state = trainer.batched_epoch_step(state, data)
    if on_epoch is not None:
      on_epoch(state)
  return state


def measure_lanes(trainer: Trainer, state: FitState, data: DeviceData, score_from: str,
                  seconds: float, active=None) -> list[tuple[dict[str, Any], pruning.StatSums]]:
  """`dropnet.measure_cycle` for every lane of a batched state: (record fields, scoring sums) per
  lane. Lanes not `active` (bool per lane; default all) are not evaluated: their fields are junk."""
  start = time.perf_counter()
  masks, best, last = state.masks, state.best_params, state.params
  active = jnp.ones(state.done.shape, bool) if active is None else jnp.asarray(active)
  train = trainer.batched_evaluate(best, masks, data.train_images, data.train_labels, active)
  val = trainer.batched_evaluate(best, masks, data.val_images, data.val_labels, active)
  test = trainer.batched_evaluate(best, masks, data.test_images, data.test_labels, active)
  last_test = trainer.batched_evaluate(last, masks, data.test_images, data.test_labels, active)
  sums = train.sums if score_from == 'data' else state.best_sums
  host = jax.device_get({'masks': masks, 'train': train, 'val': val, 'test': test, 'last_test': last_test,
                         'sums': sums, 'state': state._replace(params=None, opt_state=None, best_params=None,
                                                               best_sums=None, key=None)})
  seconds += time.perf_counter() - start
  s = host['state']
  out = []
  for t in range(len(s.done)):
    lane_masks = tuple(m[t] for m in host['masks'])
    f = lambda x: float(x[t])
    record = {
        'fraction_remaining': pruning.fraction_remaining(lane_masks),
        'units': pruning.units_per_layer(lane_masks),
        'train_accuracy': f(host['train'].accuracy), 'train_loss': f(host['train'].loss),
        'val_accuracy': f(host['val'].accuracy), 'val_loss': f(host['val'].loss),
        'test_accuracy': f(host['test'].accuracy), 'test_loss': f(host['test'].loss),
        'last_train_accuracy': f(s.train_accuracy), 'last_train_loss': f(s.train_loss),
        'last_val_accuracy': f(s.val_accuracy), 'last_val_loss': f(s.val_loss),
        'last_test_accuracy': f(host['last_test'].accuracy), 'last_test_loss': f(host['last_test'].loss),
        'early_stop_epoch': int(s.best_epoch[t]), 'epochs_trained': int(s.epoch[t]),
        'diverged': bool(s.diverged[t]),
        'mask': mask_to_strings(lane_masks),
        'seconds': seconds,
    }
    lane_sums = jax.tree.map(lambda x: jnp.asarray(x[t]), host['sums'])
    out.append((record, lane_sums))
  return out


class _Trial:
  """One (seed, metric) run of Algorithm 1 as it advances cycle by cycle."""

  def __init__(self, seed_index: int, seed: int, metric: str, masks):
    self.seed_index, self.seed, self.metric = seed_index, seed, metric
    self.masks = masks  # the masks of the trial's next cycle
    self.stopped = False
    self.records: list[dict[str, Any]] = []


def _checkpoint(cycle: int, trials: Sequence[_Trial], dense_val: Sequence[float]):
  """(arrays, meta) for `Checkpointer.save` after `cycle`: the trials' next masks (stacked per
  layer, one row per trial) and, as JSON, their records, stop flags and the dense accuracies."""
  arrays = {'masks': [np.stack([np.asarray(t.masks[l]) for t in trials]) for l in range(len(trials[0].masks))]}
  meta = {'version': 1, 'driver': 'batched', 'cycle': cycle, 'dense_val': list(dense_val),
          'trials': [{'seed': t.seed, 'metric': t.metric, 'stopped': t.stopped, 'records': t.records}
                     for t in trials]}
  return arrays, meta


def _restore(checkpointer, trials: Sequence[_Trial]) -> tuple[int, list[float]] | None:
  """Loads a `_checkpoint` into `trials` (built for the same seeds and metrics); returns
  (the last finished cycle, dense validation accuracies), or None without a checkpoint."""
  meta = checkpointer.restore_meta()
  if meta is None:
    return None
  if meta.get('driver') != 'batched' or [(t['seed'], t['metric']) for t in meta['trials']] != [
      (t.seed, t.metric) for t in trials]:
    raise ValueError(f'{checkpointer.manager.directory} holds a checkpoint of another experiment or driver; '
                     'use another output directory')
  template = {'masks': [np.zeros((len(trials), m.shape[0]), np.float32) for m in trials[0].masks]}
  masks = checkpointer.restore_arrays(template)['masks']
  for i, (trial, saved) in enumerate(zip(trials, meta['trials'])):
    trial.masks = tuple(jnp.asarray(m[i]) for m in masks)
    trial.stopped, trial.records = saved['stopped'], saved['records']
  return meta['cycle'], meta['dense_val']


def run_seeds_batched(model, image_shape, data: DeviceData, seeds: Sequence[int], config: DropNetConfig,
                      trainer: Trainer | None = None, checkpointer=None,
                      on_record: Callable[[list[dict[str, Any]]], None] | None = None,
                      log: Callable[[str], None] = print, log_epochs: bool = False) -> list[dict[str, Any]]:
  """Algorithm 1 for every seed x metric, all trials of a cycle trained together.

  Returns the records in `run_seed`'s order (seed by seed as given, metrics in
  config order, cycles ascending), i.e. what concatenating `run_seed` over the
  seeds gives. `on_record` gets all records so far, in that order, after every
  cycle (and once on resume), as `dropnet.run_experiment` does. With a
  `checkpointer` the state is saved after every cycle and a rerun continues
  from the newest checkpoint with the same records (up to `seconds`); there
  are no mid-cycle checkpoints (a cycle of all trials is one unit of work).
  """
  config.validate()
  if ORACLE in config.metrics:
    raise ValueError('the oracle metric is not batched (it is a greedy search per trial); run it without '
                     'batched trials')
  trainer = trainer or Trainer(model, config.train)
  seeds, metrics = list(seeds), list(config.metrics)
  if not seeds:
    return []
  keys = [SeedKeys.for_seed(s) for s in seeds]
  dense_masks = full_masks(model)
  trials = [_Trial(i, seed, metric, dense_masks) for i, seed in enumerate(seeds) for metric in metrics]
  all_records = lambda: [r for t in trials for r in t.records]
  restored = _restore(checkpointer, trials) if checkpointer is not None else None
  theta0 = _stack([init_params(model, k.init, image_shape) for k in keys])  # leading axis: seed
  shuffle_bases = jnp.stack([k.shuffle for k in keys])
  lane_keys = jax.jit(jax.vmap(jax.random.fold_in, in_axes=(0, None)))

  def epoch_logger(cycle, labels):
    if not log_epochs:
      return None

    def on_epoch(state):
      s = jax.device_get(state._replace(params=None, opt_state=None, best_params=None, best_sums=None, key=None))
      for t, label in enumerate(labels):
        if label is not None and (s.epoch[t] > 0):
          log(f'{label} cycle {cycle:2d} epoch {int(s.epoch[t]):3d} train_loss {float(s.train_loss[t]):.4f} '
              f'val_loss {float(s.val_loss[t]):.4f} val_acc {float(s.val_accuracy[t]):.4f}'
              + (' (done)' if s.done[t] else ''))
    return on_epoch

  def advance(trial: _Trial, cycle: int, fields: dict[str, Any], sums: pruning.StatSums) -> None:
    """Records the trial's cycle, then stops it or sets its next masks (run_seed's rules)."""
    record = {'seed': trial.seed, 'metric': trial.metric, 'cycle': cycle, **fields}
    stop = should_stop(record, dense_val[trial.seed_index], config)
    if not stop:
      new_masks = next_masks(trial.masks, sums, trial.metric, config.fraction,
                             keys[trial.seed_index].mask_key(trial.metric, cycle))
      if pruning.units_per_layer(new_masks) == record['units']:
        stop = 'nothing left to drop'
      else:
        trial.masks = tuple(new_masks)
    record['stop_reason'] = stop
    trial.stopped = bool(stop)
    trial.records.append(record)
    log(f'seed {trial.seed} {trial.metric:>12} cycle {cycle:2d} fraction {record["fraction_remaining"]:.3f} '
        f'units {record["units"]} test_acc {record["test_accuracy"]:.4f} '
        f'epoch {record["early_stop_epoch"]} ({record["seconds"]:.1f}s batched)' + (f' stop: {stop}' if stop else ''))

  def cycle_done(cycle: int) -> None:
    if checkpointer is not None:
      checkpointer.save(*_checkpoint(cycle, trials, dense_val))
    if on_record:
      on_record(all_records())

  # Lane counts are padded to a multiple of the device count (extra lanes: copies of lane 0,
  # done from the start) so that the trainer can split the lanes over the devices.
  padded = lambda n: -(-n // trainer.num_devices) * trainer.num_devices

  if restored is not None:
    cycle, dense_val = restored
    log(f'resuming after cycle {cycle}: {len(all_records())} records so far')
    if on_record:
      on_record(all_records())
  else:
    # Cycle 0: the dense network, one lane per seed, shared by all metrics of that seed.
    cycle, start = 0, time.perf_counter()
    n_dense = padded(len(seeds))
    dense_seed = jnp.asarray(list(range(len(seeds))) + [0] * (n_dense - len(seeds)))
    state = trainer.batched_init_fit(jax.tree.map(lambda a: a[dense_seed], theta0),
                                     _stack([dense_masks] * n_dense), lane_keys(shuffle_bases[dense_seed], 0))
    padding = jnp.arange(n_dense) >= len(seeds)
    state = state._replace(done=padding)
    state = train_lanes(trainer, state, data, epoch_logger(0, [f'seed {s} {"dense":>12}' for s in seeds]))
    dense = measure_lanes(trainer, state, data, config.score_from, time.perf_counter() - start,
                          active=~padding)[:len(seeds)]
    dense_val = [rec['val_accuracy'] for rec, _ in dense]
    for trial in trials:
      fields, sums = dense[trial.seed_index]
      advance(trial, 0, fields, sums)
    cycle_done(0)

  # Cycles 1, 2, ...: one lane per trial, always len(seeds) * len(metrics) lanes (plus padding).
  lanes = trials + [trials[0]] * (padded(len(trials)) - len(trials))
  lane_seed = jnp.asarray([t.seed_index for t in lanes])
  lane_theta0 = jax.tree.map(lambda a: a[lane_seed], theta0)
  lane_shuffle = shuffle_bases[lane_seed]
  while not all(t.stopped for t in trials):
    cycle += 1
    start = time.perf_counter()
    lane_masks = tuple(jnp.asarray(np.stack([np.asarray(t.masks[l]) for t in lanes]))
                       for l in range(len(dense_masks)))
    state = trainer.batched_init_fit(lane_theta0, lane_masks, lane_keys(lane_shuffle, cycle))
    # Stopped trials (and padding) are done lanes: frozen, and neither trained nor evaluated.
    idle = np.array([t.stopped or i >= len(trials) for i, t in enumerate(lanes)])
    state = state._replace(done=jnp.asarray(idle))
    labels = [None if t.stopped else f'seed {t.seed} {t.metric:>12}' for t in trials]
    state = train_lanes(trainer, state, data, epoch_logger(cycle, labels))
    measured = measure_lanes(trainer, state, data, config.score_from, time.perf_counter() - start, active=~idle)
    for trial, (fields, sums) in zip(trials, measured):
      if not trial.stopped and len(trial.records) == cycle:
        advance(trial, cycle, fields, sums)
    cycle_done(cycle)

  return all_records()
