"""Structured pruning at initialisation run by the one loop: prune filters of θ0, then train.

Why a method of the loop and not a script: the "ResNet18 under 5 M" report prunes the untrained
ResNet18 at fixed per-layer rates (Torch-Pruning) and trains the result; here that is a one-cycle
method of `driver.Driver` beside DropNet and magnitude pruning, so it gets the same training, early
stopping, records, checkpoints, resume and saved networks. A trial is (seed, importance):

  cycle 0  the dense network trained from θ0 (the loop shares it per seed, as DropNet's): the baseline;
  cycle 1  the network masked at init (`pruning.structured.prune_at_init` on the seed's θ0, which the
           trial's importance ranks: l1 or random) trained from the same θ0; then the trial stops.

Masked training from θ0 is training the compact network from θ0's kept filters (a dropped filter
outputs exactly 0 and gets no gradient), so the record's `params`/`macs` (the compact network's,
`accounting`) are the pruned network's. The rates are per rate slot (`pruning.structured`: a basic
block of ResNet18, a masked layer of a chain), or one uniform rate found for `param_budget`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax

from dropnet_jax.compaction import accounting
from dropnet_jax.config import TrainConfig
from dropnet_jax.loop.dropnet import SeedKeys
from dropnet_jax.loop.driver import Driver, Outcome, RunIO, Trial, log_info
from dropnet_jax.models import init_params
from dropnet_jax.models.layers import Masks, full_masks, zero_sums
from dropnet_jax.pruning import structured
from dropnet_jax.pruning.masks import fraction_remaining, mask_to_strings, units_per_layer
from dropnet_jax.settings import setting


@dataclasses.dataclass(frozen=True)
class StructuredConfig:
  """Structured pruning at init: how much goes (per-layer rates or a parameter budget), ranked how."""
  importances: tuple[str, ...] = setting(('l1',), "Filter importance on θ0, one trial per seed each: l1 (Torch-"
                                         "Pruning's MagnitudeImportance(p=1) of the coupled layers) or random.",
                                         flag='importance')
  rates: tuple[float, ...] | None = setting(None, 'Fraction of filters pruned per layer, in [0, 1): ResNet18: one '
                                            "per basic block (the report's 10 % on layers 1-2, 20 % on 3-6, 30 % on "
                                            '7-8 is 0.1,0.1,0.2,0.2,0.2,0.2,0.3,0.3); other models: one per masked '
                                            'layer; or one rate for all.', flag='prune_rates')
  param_budget: float | None = setting(None, 'Instead of --prune_rates: the smallest uniform rate whose pruned '
                                       'network has at most this many parameters (e.g. 5e6).', flag='param_budget')
  train: TrainConfig = TrainConfig()

  def validate(self) -> None:
    if not self.importances or any(i not in structured.IMPORTANCES for i in self.importances):
      raise ValueError(f'--importance must be some of {", ".join(structured.IMPORTANCES)}, got '
                       f'{",".join(self.importances)}')
    if len(set(self.importances)) != len(self.importances):
      raise ValueError(f'--importance: duplicates in {",".join(self.importances)}')
    if (self.rates is None) == (self.param_budget is None):
      raise ValueError('give exactly one of --prune_rates and --param_budget')
    if self.rates is not None and (not self.rates or any(not (math.isfinite(r) and 0 <= r < 1) for r in self.rates)):
      raise ValueError(f'--prune_rates must be in [0, 1), got {",".join(map(str, self.rates))}')
    if self.param_budget is not None and not (math.isfinite(self.param_budget) and self.param_budget > 0):
      raise ValueError(f'--param_budget must be a positive number, got {self.param_budget}')
    self.train.validate()


def resolve_rates(model, image_shape: Sequence[int], config: StructuredConfig) -> tuple[float, ...]:
  """Per channel group, its rate: from `rates`, or the uniform rate that meets `param_budget`."""
  if config.rates is not None:
    return structured.group_rates(model, config.rates)
  rate = structured.rate_for_budget(model, image_shape, config.param_budget)
  return structured.group_rates(model, (rate,))


class StructuredMethod:
  """Structured pruning at init's side of the loop (`driver.Method`)."""
  score_from, score_params = 'data', 'best'

  def __init__(self, model, image_shape: Sequence[int], config: StructuredConfig,
               log: Callable[[str], None] = log_info):
    if not accounting.supports(model):
      raise ValueError(f'structured pruning: no channel groups for {type(model).__name__}')
    self.model, self.image_shape, self.config, self.log = model, tuple(image_shape), config, log
    self.rates = resolve_rates(model, image_shape, config)
    self.widths = structured.group_widths(model, self.rates)

  def theta0(self, seed: int):
    return init_params(self.model, SeedKeys.for_seed(seed).init, self.image_shape)  # DropNet's θ0

  def full_mask(self) -> Masks:
    return full_masks(self.model)

  def sums_template(self):
    return zero_sums(full_masks(self.model))

  def shuffle_key(self, seed: int, cycle: int) -> jax.Array:
    return SeedKeys.for_seed(seed).shuffle_key(cycle)

  def mask_fields(self, masks: Masks) -> dict[str, Any]:
    size = accounting.summary(self.model, self.image_shape, masks)
    return {'fraction_remaining': fraction_remaining(masks), 'units': units_per_layer(masks),
            'params': size['params'], 'macs': size['macs'], 'mask': mask_to_strings(masks)}

  def init_mask(self, seed: int, importance: str) -> Masks:
    """The trial's mask: θ0 of `seed` ranked by `importance` (random: a key of the seed)."""
    key = SeedKeys.for_seed(seed).mask_key(f'structured {importance}', 0)
    return structured.prune_at_init(self.model, self.theta0(seed), self.rates, importance, key)

  def advance(self, trial: Trial, outcome: Outcome, dense: Outcome) -> None:
    record = {'seed': trial.seed, 'metric': trial.metric, 'cycle': trial.cycle, 'importance': trial.metric,
              'phase': 'dense' if trial.cycle == 0 else 'pruned at init',
              'group_widths': list(self.widths), **outcome.fields}
    stop = 'diverged' if record['diverged'] else ('trained' if trial.cycle > 0 else None)
    record['stop_reason'] = stop
    trial.records.append(record)
    self.log(f'seed {trial.seed} {trial.metric:>8} cycle {trial.cycle} params {record["params"]:,} '
             f'test_acc {record["test_accuracy"]:.4f} epoch {record["early_stop_epoch"]} ({record["seconds"]:.1f}s)'
             + (f' stop: {stop}' if stop else ''))
    if stop:
      trial.stopped = True
    else:  # cycle 1 trains the pruned network from the seed's θ0 (trial.theta None) with the full epoch limit
      trial.mask, trial.cycle = self.init_mask(trial.seed, trial.metric), 1


def run(model, image_shape, data, seeds: Sequence[int], config: StructuredConfig, trainer=None,
        io: RunIO | None = None, lanes_per_chunk: int | None = None) -> list[dict[str, Any]]:
  """Every seed x importance as lanes of one group, resumable (`io`: `driver.RunIO`); the records."""
  from dropnet_jax.training.lanes import Lanes
  from dropnet_jax.training.trainer import Trainer, steps_per_epoch
  config.validate()
  io = io or RunIO()
  trainer = trainer or Trainer(model, config.train,
                               steps_per_epoch=steps_per_epoch(data.train_labels.shape[0], config.train.batch_size))
  method = StructuredMethod(model, image_shape, config, io.log)
  trials = [Trial(seed, importance, method.full_mask()) for seed in seeds for importance in config.importances]
  return Driver(method, trials, Lanes(trainer, lanes_per_chunk), data, io=io).run()
