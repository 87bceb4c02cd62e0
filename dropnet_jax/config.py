"""The settings of a run in one place: training (`TrainConfig`) and DropNet's loop (`DropNetConfig`).

Both are frozen dataclasses; `validate()` raises ValueError naming the setting
and is called before any work starts. `to_dict` gives the JSON form written to
config.json and compared on resume.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from dropnet_jax.pruning import criteria
from dropnet_jax.training.optim import OptimizerConfig

SCORE_SOURCES = ('data', 'epoch')
SCORE_PARAMS = ('best', 'last')


AUGMENTATIONS = ('none', 'flip', 'crop', 'crop,flip')


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Hyperparameters of one training run (the paper's defaults: plain SGD, lr 0.1, batch 32)."""
  batch_size: int = 32
  max_epochs: int = 100
  patience: int = 5
  eval_batch_size: int = 1000
  shuffle: bool = True  # reshuffle the training set every epoch (the official notebook did not)
  augment: str = 'none'  # on-device training augmentation: random crop (pad 4) and/or horizontal flip
  optim: OptimizerConfig = OptimizerConfig()  # optimiser, learning rate and its schedule (dropnet_jax.training.optim)

  @property
  def lr(self) -> float:
    return self.optim.lr

  def validate(self) -> None:
    self.optim.validate()
    for name in ('batch_size', 'max_epochs', 'patience', 'eval_batch_size'):
      if getattr(self, name) < 1:
        raise ValueError(f'{name} must be a positive integer, got {getattr(self, name)}')
    if self.augment not in AUGMENTATIONS:
      raise ValueError(f'augment must be one of {AUGMENTATIONS}, got {self.augment!r}')


@dataclasses.dataclass(frozen=True)
class DropNetConfig:
  """Algorithm 1's settings; `metrics` are names in `criteria` (the registry)."""
  metrics: tuple[str, ...] = ('min', 'max', 'random', 'min_layer', 'max_layer', 'random_layer')
  fraction: float = 0.2  # p: fraction of the remaining units dropped per cycle
  floor: float = 0.1  # stop once the fraction of units remaining is <= floor
  kappa: float | None = None  # stop once val accuracy <= kappa * dense val accuracy
  score_from: str = 'data'  # 'data': a full pass over the training set; 'epoch': the best epoch's running sums
  score_params: str = 'best'  # θ the criteria score: the best-validation-loss epoch's, or the last epoch's
  oracle_examples: int | None = None  # training examples the oracle's loss uses (None: all)
  param_budget: int | None = None  # stop at the first cycle whose compact network has <= this many params
  mac_budget: int | None = None  # ... or <= this many multiply-accumulates per example
  train: TrainConfig = TrainConfig()

  def validate(self) -> None:
    """Raises ValueError naming the offending setting."""
    if not self.metrics:
      raise ValueError('metrics: at least one metric is needed')
    for m in self.metrics:
      criteria.get(m, 'unit')
    if len(set(self.metrics)) != len(self.metrics):
      raise ValueError(f'metrics: duplicates in {self.metrics}')
    if self.oracle_examples is not None and self.oracle_examples < 1:
      raise ValueError(f'oracle_examples must be positive, got {self.oracle_examples}')
    if not (math.isfinite(self.fraction) and 0 < self.fraction <= 1):
      raise ValueError(f'fraction must be in (0, 1], got {self.fraction}')
    if not (math.isfinite(self.floor) and 0 < self.floor < 1):
      raise ValueError(f'floor must be in (0, 1), got {self.floor}')
    if self.kappa is not None and not (math.isfinite(self.kappa) and 0 < self.kappa <= 1):
      raise ValueError(f'kappa must be in (0, 1], got {self.kappa}')
    for name in ('param_budget', 'mac_budget'):
      value = getattr(self, name)
      if value is not None and not (math.isfinite(value) and value > 0):
        raise ValueError(f'{name} must be a positive number, got {value}')
    if self.score_from not in SCORE_SOURCES:
      raise ValueError(f'score_from must be one of {SCORE_SOURCES}, got {self.score_from!r}')
    if self.score_params not in SCORE_PARAMS:
      raise ValueError(f'score_params must be one of {SCORE_PARAMS}, got {self.score_params!r}')
    if self.score_params == 'last' and self.score_from == 'epoch':
      raise ValueError('score_params=last needs score_from=data (the running sums are kept for the best epoch only)')
    self.train.validate()


def to_dict(config: Any) -> dict[str, Any]:
  """A config dataclass as JSON-able nested dicts (tuples as lists)."""
  out = {}
  for f in dataclasses.fields(config):
    v = getattr(config, f.name)
    if dataclasses.is_dataclass(v):
      v = to_dict(v)
    elif isinstance(v, tuple):
      v = list(v)
    out[f.name] = v
  return out
