"""What a recipe costs on a GPU, estimated from counted FLOPs: the README's recipe table.

A recipe's real-data run cannot be timed here (no GPU, no CIFAR-10 or Tiny ImageNet), so the table gives an
estimate a reader can check by hand:

* FLOPs per training example = 3 x 2 x MACs of the full-width network (`compaction.accounting.count`: forward
  2 flops per MAC, backward about twice the forward). A masked network runs at full size (its arrays are not
  smaller), so every DropNet cycle costs what the dense one does.
* An epoch = the training split once (3x) + the validation split once (forward only); the split sizes are the
  official datasets' (MNIST 60,000 / CIFAR-10 50,000 / Tiny ImageNet 100,000 training images), 10 % held out
  for validation as `input_pipeline` does.
* Epochs = the most the recipe can train: `max_epochs` per training run (early stopping usually ends sooner,
  so the figure is an upper bound), times the runs the method makes (DropNet: seeds x (1 + metrics x cycles
  to the floor); magnitude: the dense run + each method's rounds; structured: the dense run + one per
  importance; schedules: one run per schedule; the tuner: trials + retrains).
* Seconds = per step, the larger of (step FLOPs / SUSTAINED_FLOPS) and MIN_STEP_SECONDS: a small network's
  step is bound by launch overhead, not arithmetic, so a pure FLOP estimate would be absurdly short.

SUSTAINED_FLOPS (15 TFLOP/s: a PyTorch CIFAR ResNet18 epoch of about 10 s on an A100 is 6 x 0.56 GMAC x
45,000 = 1.5e14 flops in 10 s) and MIN_STEP_SECONDS are assumptions, stated with the table; they are not measured.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from dropnet_jax.compaction import accounting
from dropnet_jax.models import model_from_config

SUSTAINED_FLOPS = 15e12
MIN_STEP_SECONDS = 2e-4
VALIDATION_FRACTION = 0.1

# name -> (training images in the official train split, image shape, classes); digits: our 80 % train split
OFFICIAL_SIZES = {'digits': (1438, (8, 8, 1), 10), 'mnist': (60000, (28, 28, 1), 10),
                  'cifar10': (50000, (32, 32, 3), 10), 'tiny_imagenet': (100000, (64, 64, 3), 200)}


class TrainsNothing(ValueError):
  """A recipe whose entry point trains nothing (an ensemble, a compaction, an evaluation)."""


@dataclasses.dataclass(frozen=True)
class Cost:
  macs: int  # one example's forward pass, full width
  params: int
  train_examples: int
  batch_size: int
  epochs: int  # upper bound over all training runs of the recipe
  flops: float
  gpu_seconds: float


def cycles_to_floor(fraction: float, floor: float) -> int:
  """DropNet's pruned cycles until at most `floor` of the units remain, dropping `fraction` per cycle."""
  return max(1, math.ceil(math.log(floor) / math.log(1 - fraction))) if fraction < 1 else 1


def rounds_to(sparsity: float, fraction: float) -> int:
  """Rounds of pruning `fraction` of the remaining weights until `sparsity` of them are zero."""
  return max(1, math.ceil(math.log(1 - sparsity) / math.log(1 - fraction)))


def _dropnet_epochs(config) -> int:
  d = config.dropnet
  dense = 0 if config.start.init_from else 1  # a loaded dense network is evaluated, not trained
  return config.seeds * (dense + len(d.metrics) * cycles_to_floor(d.fraction, d.floor)) * d.train.max_epochs


def _magnitude_epochs(config) -> int:
  m = config.magnitude
  per_seed = 0 if config.start.init_from else m.train.max_epochs  # a loaded network is evaluated, not trained
  for method in m.methods:
    if method == 'oneshot':
      per_seed += len(m.sparsities) * m.finetune_epochs
    elif method == 'iterative':
      per_seed += sum(rounds_to(s, m.iterative_fraction) * m.round_epochs + m.final_epochs for s in m.sparsities)
    else:  # lottery, lottery_reinit: a full training per round
      per_seed += rounds_to(max(m.sparsities), m.prune_fraction) * m.train.max_epochs
  return config.seeds * per_seed


def _schedules_epochs(config) -> int:
  return len(config.schedules) * config.train.max_epochs


def _tune_epochs(config) -> int:
  train = config.dropnet.train
  per_trial = train.max_epochs
  if config.objective == 'dropnet':
    per_trial *= 1 + cycles_to_floor(config.dropnet.fraction, config.units_remaining)
  retrain = getattr(config, 'retrain_epochs', None) or train.max_epochs
  return config.n_trials * per_trial + config.retrain_seeds * retrain


def _structured_epochs(config) -> int:
  s = config.structured
  return config.seeds * (1 + len(s.importances)) * s.train.max_epochs  # the dense baseline, then each ranking


def _batch_size(config) -> int:
  for path in ('dropnet.train', 'magnitude.train', 'structured.train', 'train'):
    node = config
    for part in path.split('.'):
      node = getattr(node, part, None)
    if node is not None and hasattr(node, 'batch_size'):
      return node.batch_size
  raise ValueError(f'{type(config).__name__}: no training batch size')


TRAINS_NOTHING = ('EnsembleConfig', 'CompactConfig', 'CompactBenchConfig', 'EvaluateConfig')


def _epochs(config) -> int:
  kind = type(config).__name__
  counters = {'ExperimentConfig': _dropnet_epochs, 'FractionStudyConfig': _dropnet_epochs,
              'MagnitudeRunConfig': _magnitude_epochs, 'SchedulesConfig': _schedules_epochs,
              'TuneConfig': _tune_epochs, 'StructuredRunConfig': _structured_epochs}
  if kind in TRAINS_NOTHING:
    raise TrainsNothing(f'a {kind} recipe trains nothing')
  if kind not in counters:
    raise ValueError(f'no cost model for a {kind} recipe: add its counter to recipe_cost._epochs')
  return counters[kind](config)


def estimate(config: Any) -> Cost:
  """The upper-bound training cost of a recipe's config on its dataset's official size."""
  epochs = _epochs(config)
  dataset = config.data.dataset
  images, image_shape, classes = OFFICIAL_SIZES[dataset]
  model = model_from_config(config.model, classes, None)
  counts = accounting.count(model, image_shape)
  macs, params = counts.macs, counts.params
  train = round(images * (1 - VALIDATION_FRACTION))
  val = images - train
  batch = _batch_size(config)
  steps = math.ceil(train / batch)
  step_flops = 6 * macs * batch
  epoch_flops = 6 * macs * train + 2 * macs * val
  seconds_per_epoch = steps * max(step_flops / SUSTAINED_FLOPS, MIN_STEP_SECONDS) + 2 * macs * val / SUSTAINED_FLOPS
  return Cost(macs, params, train, batch, epochs, epoch_flops * epochs, seconds_per_epoch * epochs)


def format_hours(seconds: float) -> str:
  """The table's GPU-time cell: minutes below an hour, else hours with two significant digits."""
  if seconds < 3600:
    return f'{max(1, round(seconds / 60))} min'
  hours = seconds / 3600
  return f'{hours:.2g} h' if hours < 10 else f'{round(hours)} h'
