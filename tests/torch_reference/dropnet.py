"""DropNet (Algorithm 1) in PyTorch, the same loop as dropnet_jax.loop.dropnet.run_seed.

Per seed, θ0 is dropnet_jax's Flax initialisation copied into the torch model,
and the randomness (epoch shuffles, tie-breaks, random drops) is drawn from the
very JAX keys dropnet_jax uses (`SeedKeys`), computed on the host, so both
implementations run the same experiment. The dense cycle is trained once and
shared by all metrics; every cycle restarts from θ0 with the current mask; the
stop rules are dropnet_jax.loop.dropnet.should_stop. Records have the same fields.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np
import torch

from dropnet_jax.config import DropNetConfig
from dropnet_jax.loop.dropnet import SeedKeys, should_stop
from dropnet_jax.models import init_params
from tests.torch_reference.models import Masks, full_masks
from tests.torch_reference.train import FitResult, StatSums, TorchData, Trainer, snapshot
from tests.torch_reference.weights import load_flax_params

# -- randomness: dropnet_jax's draws, computed on the host ----------------------


def shuffle_order(shuffle_key: jax.Array, epoch: int, n: int) -> np.ndarray:
  """The training order of `epoch` (from 1) in dropnet_jax.training.trainer.Trainer._epoch_step."""
  return np.array(jax.random.permutation(jax.random.fold_in(shuffle_key, epoch), n))


def tie_break_draws(key: jax.Array, sizes: Sequence[int], layerwise: bool) -> list[torch.Tensor]:
  """The uniform draws dropnet_jax.pruning.criteria's drop rules makes with `key`.

  Global metrics: one vector over all masked units; layer-wise: one per layer.
  """
  if layerwise:
    keys = jax.random.split(key, len(sizes))
    return [torch.from_numpy(np.array(jax.random.uniform(k, (s,)))) for k, s in zip(keys, sizes)]
  return [torch.from_numpy(np.array(jax.random.uniform(key, (sum(sizes),))))]


# -- scores and mask updates --------------------------------------------------


class MetricSpec(NamedTuple):
  score: str  # 'abs' (mean |activation|), 'apoz' (fraction of zeros) or 'random'
  drop: str  # which end is dropped: 'lowest' or 'highest'
  layerwise: bool  # the same fraction inside each layer instead of globally


# The activation criteria of dropnet_jax.pruning.criteria, written out again for the twin.
METRICS = {
    'min': MetricSpec('abs', 'lowest', False), 'max': MetricSpec('abs', 'highest', False),
    'random': MetricSpec('random', 'lowest', False), 'min_layer': MetricSpec('abs', 'lowest', True),
    'max_layer': MetricSpec('abs', 'highest', True), 'random_layer': MetricSpec('random', 'lowest', True),
    'apoz': MetricSpec('apoz', 'highest', False), 'apoz_layer': MetricSpec('apoz', 'highest', True),
}


def check_metric(metric: str) -> MetricSpec:
  if metric not in METRICS:
    raise ValueError(f'the PyTorch reference implements {sorted(METRICS)}, not {metric!r}')
  return METRICS[metric]


def unit_scores(sums: StatSums, metric: str) -> tuple[torch.Tensor, ...]:
  spec = check_metric(metric)
  source = sums.zero_sum if spec.score == 'apoz' else sums.abs_sum
  return tuple(s / sums.count for s in source)


def num_to_drop(fraction: float, remaining: torch.Tensor) -> int:
  """floor(fraction * remaining) in float32 with dropnet_jax's relative nudge."""
  return int(torch.floor(torch.tensor(fraction, dtype=torch.float32) * remaining.float() * (1 + 1e-6)))


def _drop_ranked(mask: torch.Tensor, priority: torch.Tensor, n_drop: int, tie_break: torch.Tensor) -> torch.Tensor:
  """Drops the n_drop kept units of lowest priority, ties broken by the lowest draw."""
  priority = torch.where(mask > 0, priority, torch.tensor(float('inf')))
  by_draw = torch.argsort(tie_break, stable=True)
  order = by_draw[torch.argsort(priority[by_draw], stable=True)]  # lexsort: priority, then draw
  rank = torch.empty_like(order)
  rank[order] = torch.arange(order.numel())
  return mask * (rank >= n_drop).to(mask.dtype)


def update_mask(masks: Masks, scores: Sequence[torch.Tensor], metric: str, fraction: float,
                tie_break: Sequence[torch.Tensor]) -> Masks:
  """dropnet_jax.pruning.criteria's drop rules with the tie-break draws given (see `tie_break_draws`).

  Drops int(fraction * remaining) units globally (one draw vector over all
  units) or in each layer (one draw vector per layer), at least one, never the
  last one.
  """
  spec = check_metric(metric)
  if len(masks) != len(scores):
    raise ValueError(f'{len(masks)} mask vectors but {len(scores)} score vectors')
  if spec.score == 'random':
    priorities = [torch.zeros_like(m) for m in masks]
  elif spec.drop == 'lowest':
    priorities = [s.float() for s in scores]
  else:
    priorities = [-s.float() for s in scores]

  def n_drop_of(mask):
    remaining = mask.sum()
    return min(max(num_to_drop(fraction, remaining), 1), int(remaining) - 1)

  if spec.layerwise:
    if len(tie_break) != len(masks):
      raise ValueError('layer-wise metrics need one tie-break vector per layer')
    return tuple(_drop_ranked(m, p, n_drop_of(m), t) for m, p, t in zip(masks, priorities, tie_break))
  flat_mask = torch.cat(masks)
  flat = _drop_ranked(flat_mask, torch.cat(priorities), n_drop_of(flat_mask), torch.cat(list(tie_break)))
  return tuple(flat.split([m.numel() for m in masks]))


def units_per_layer(masks: Masks) -> list[int]:
  return [int(round(float(m.sum()))) for m in masks]


def fraction_remaining(masks: Masks) -> float:
  return sum(units_per_layer(masks)) / sum(m.numel() for m in masks)


def mask_to_strings(masks: Masks) -> list[str]:
  return [''.join('1' if v > 0 else '0' for v in m.tolist()) for m in masks]


# -- Algorithm 1 ---------------------------------------------------------------


@dataclasses.dataclass
class CycleOutcome:
  state: FitResult
  record: dict[str, Any]
  sums: StatSums


def train_cycle(trainer: Trainer, params0, masks: Masks, data: TorchData, shuffle_key: jax.Array,
                score_from: str = 'data', on_epoch: Callable[[FitResult], None] | None = None) -> CycleOutcome:
  """Trains `masks` from θ0 with early stopping and measures the result (same record as dropnet_jax)."""
  start = time.perf_counter()
  n = len(data.train_labels)
  state = trainer.fit(params0, masks, data, lambda epoch: shuffle_order(shuffle_key, epoch, n),
                      with_sums=score_from == 'epoch', on_epoch=on_epoch)
  last_test = trainer.evaluate(masks, data.test_images, data.test_labels)  # the model holds the last params
  trainer.model.load_state_dict(state.best_params)
  train = trainer.evaluate(masks, data.train_images, data.train_labels)
  val = trainer.evaluate(masks, data.val_images, data.val_labels)
  test = trainer.evaluate(masks, data.test_images, data.test_labels)
  sums = train.sums if score_from == 'data' else state.best_sums
  record = {
      'fraction_remaining': fraction_remaining(masks),
      'units': units_per_layer(masks),
      'train_accuracy': train.accuracy, 'train_loss': train.loss,
      'val_accuracy': val.accuracy, 'val_loss': val.loss,
      'test_accuracy': test.accuracy, 'test_loss': test.loss,
      'last_train_accuracy': state.train_accuracy, 'last_train_loss': state.train_loss,
      'last_val_accuracy': state.val_accuracy, 'last_val_loss': state.val_loss,
      'last_test_accuracy': last_test.accuracy, 'last_test_loss': last_test.loss,
      'early_stop_epoch': state.best_epoch, 'epochs_trained': state.epoch,
      'diverged': state.diverged,
      'mask': mask_to_strings(masks),
  }
  record['seconds'] = time.perf_counter() - start
  return CycleOutcome(state, record, sums)


def next_masks(masks: Masks, sums: StatSums, metric: str, fraction: float, key: jax.Array) -> Masks:
  spec = check_metric(metric)
  draws = tie_break_draws(key, [m.numel() for m in masks], spec.layerwise)
  return update_mask(masks, unit_scores(sums, metric), metric, fraction, draws)


def run_seed(flax_model, torch_model: torch.nn.Module, image_shape, data: TorchData, seed: int,
             config: DropNetConfig, trainer: Trainer | None = None,
             on_record: Callable[[dict[str, Any]], None] | None = None,
             log: Callable[[str], None] = print, log_epochs: bool = True,
             on_epoch: Callable[[FitResult], None] | None = None) -> list[dict[str, Any]]:
  """All metrics of one seed, as dropnet_jax.loop.dropnet.run_seed; θ0 from `flax_model`'s init."""
  trainer = trainer or Trainer(torch_model, config.train)
  keys = SeedKeys.for_seed(seed)
  load_flax_params(torch_model, init_params(flax_model, keys.init, image_shape))
  params0 = snapshot(torch_model)
  records: list[dict[str, Any]] = []

  def progress(metric, cycle):
    def cb(s: FitResult):
      if on_epoch is not None:
        on_epoch(s)
      if log_epochs:
        log(f'[torch] seed {seed} {metric:>12} cycle {cycle:2d} epoch {s.epoch:3d} '
            f'train_loss {s.train_loss:.4f} val_loss {s.val_loss:.4f} val_acc {s.val_accuracy:.4f}'
            + (' (stop)' if s.done else ''))
    return cb

  dense = train_cycle(trainer, params0, full_masks(torch_model), data, keys.shuffle_key(0), config.score_from,
                      progress('dense', 0))
  for metric in config.metrics:
    outcome, cycle, masks = dense, 0, full_masks(torch_model)
    while True:
      record = {'seed': seed, 'metric': metric, 'cycle': cycle, **outcome.record}
      stop = should_stop(record, dense.record['val_accuracy'], config)
      if not stop:
        new_masks = next_masks(masks, outcome.sums, metric, config.fraction, keys.mask_key(metric, cycle))
        if units_per_layer(new_masks) == record['units']:
          stop = 'nothing left to drop'
      record['stop_reason'] = stop
      records.append(record)
      if on_record:
        on_record(record)
      log(f'[torch] seed {seed} {metric:>12} cycle {cycle:2d} fraction {record["fraction_remaining"]:.3f} '
          f'units {record["units"]} test_acc {record["test_accuracy"]:.4f} '
          f'epoch {record["early_stop_epoch"]} ({record["seconds"]:.1f}s)' + (f' stop: {stop}' if stop else ''))
      if stop:
        break
      masks, cycle = new_masks, cycle + 1
      outcome = train_cycle(trainer, params0, masks, data, keys.shuffle_key(cycle), config.score_from,
                            progress(metric, cycle))
  return records
