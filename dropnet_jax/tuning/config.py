"""The settings of a hyperparameter search (`experiments.tune`), each written once (dropnet_jax.settings).

`TuneConfig` composes the network (`ModelConfig`), the data (`DataConfig`), the base DropNet and
training settings the trials start from (`DropNetConfig`, whose `train` holds the optimiser flags;
25 epochs by default), the search space (`space.SearchSpace`, the `--tune_*` flags) and the study's
own settings. What can change a result is stamped (config.json, and the settings stored with the
study); the study's size, the workers, the sampler and pruner, heartbeats and the final retrain are
marked `result=False`, so a rerun may change them (e.g. a larger `--n_trials` continues the study).
The final retrain has its own epoch count (`retrain_epochs`): a search is cheap only with short
trials (e.g. 30 trials x 25 epochs), and the best configuration is then trained for real (200).

The Optuna storage URL is not a setting: like `--out` it says where, and it may hold a password,
which config.json must not (see `experiments.tune`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Iterable

from dropnet_jax.config import DataConfig, DropNetConfig, ModelConfig, TrainConfig
from dropnet_jax.settings import setting
from dropnet_jax.tuning.space import SearchSpace

OBJECTIVES = ('train', 'dropnet')
PRUNERS = ('median', 'hyperband', 'none')


@dataclasses.dataclass(frozen=True)
class TuneConfig:
  """A study: what the trials train, what they search, and how the search runs."""
  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  dropnet: DropNetConfig = DropNetConfig(train=TrainConfig(max_epochs=25))
  objective: str = setting('train', 'train: best validation accuracy of one training run; dropnet: best validation '
                           'accuracy of a DropNet cycle with <= --units_remaining of the units left (searches '
                           '--tune_fractions and --tune_metrics too).', flag='objective', choices=OBJECTIVES)
  units_remaining: float = setting(0.2, 'dropnet objective: X, the fraction of units remaining (DropNet floor).',
                                   flag='units_remaining')
  space: SearchSpace = SearchSpace()
  space_file: str | None = setting(None, 'JSON file with SearchSpace fields (ranges as [low, high]); a --tune_* '
                                   'flag given on the command line overrides it.', flag='space', result=False)
  trial_seed: int = setting(0, 'θ0 and shuffle order of every trial (common random numbers).', flag='trial_seed')
  train_subset: int | None = setting(None, 'Use only this many training examples (a seeded random subset).',
                                     flag='train_subset')
  study_name: str = setting('tune', 'Study name in the storage.', flag='study_name')
  n_trials: int = setting(30, 'Stop once the study has this many complete or pruned trials.', flag='n_trials',
                          result=False)
  workers: int = setting(1, 'Worker processes on the storage (this one and N-1 started by it).', flag='workers',
                         result=False)
  worker_id: int = setting(0, "This worker's index (varies the sampler seed between workers).", flag='worker_id',
                           result=False)
  worker_only: bool = setting(False, 'Only run trials: no outputs, no retrain (extra workers).', flag='worker_only',
                              result=False)
  ready_file: str | None = setting(None, 'Internal (--workers): touched once this worker has loaded its data.',
                                   flag='ready_file', result=False)
  batch: int = setting(1, 'Trials trained together as lanes of one compiled program (1: one at a time).',
                       flag='batch', result=False)
  lanes_per_chunk: int | None = setting(None, 'Lanes vmapped together (default: 1 on CPU, all on accelerators).',
                                        flag='lanes_per_chunk', result=False)
  sampler_seed: int = setting(0, 'TPE sampler seed (mixed with --worker_id and the trials so far).',
                              flag='sampler_seed', result=False)
  startup_trials: int = setting(10, 'Random trials before TPE models the results.', flag='startup_trials',
                                result=False)
  pruner: str = setting('median', 'Pruner fed every epoch (cycle).', flag='pruner', result=False, choices=PRUNERS)
  pruner_warmup: int = setting(2, 'median: epochs before a trial may be pruned.', flag='pruner_warmup', result=False)
  pruner_startup_trials: int = setting(5, 'median: complete trials before any pruning.', flag='pruner_startup_trials',
                                       result=False)
  retrain_seeds: int = setting(1, "Final retrain of the best configuration from seeds --trial_seed.. +N-1 (the "
                               "first is the trials' own θ0 and shuffle order; 0: none).", flag='retrain_seeds',
                               result=False)
  retrain_epochs: int | None = setting(None, "max_epochs of the final retrain (per DropNet cycle for "
                                       "--objective=dropnet); default: the trials' --max_epochs.",
                                       flag='retrain_epochs', result=False)
  heartbeat_interval: int = setting(10, 'Seconds between heartbeats of running trials.', flag='heartbeat_interval',
                                    result=False)
  grace_period: int = setting(60, 'A running trial without a heartbeat for this long is failed and retried.',
                              flag='grace_period', result=False)
  max_retry: int = setting(2, 'Retries of a trial failed by its heartbeat.', flag='max_retry', result=False)

  @property
  def train(self) -> TrainConfig:
    """The training settings every trial starts from (the searched ones are replaced per trial)."""
    return self.dropnet.train

  @property
  def search_space(self) -> SearchSpace:
    """The space searched: DropNet's p and criterion only for the dropnet objective."""
    return self.space if self.objective == 'dropnet' else self.space.without_dropnet()

  def validate(self) -> None:
    """Raises ValueError naming the offending setting; reads no data."""
    if self.objective not in OBJECTIVES:
      raise ValueError(f'objective must be one of {OBJECTIVES}, got {self.objective!r}')
    if self.pruner not in PRUNERS:
      raise ValueError(f'pruner must be one of {PRUNERS}, got {self.pruner!r}')
    positive = ('n_trials', 'workers', 'batch', 'heartbeat_interval', 'grace_period')
    at_least_zero = ('worker_id', 'startup_trials', 'pruner_warmup', 'pruner_startup_trials', 'retrain_seeds',
                     'max_retry', 'trial_seed', 'sampler_seed')
    _check_counts(self, positive, at_least_zero, ('train_subset', 'lanes_per_chunk', 'retrain_epochs'))
    if self.objective == 'dropnet':
      if self.batch != 1:
        raise ValueError('batch applies to objective=train (DropNet trials run one at a time)')
      if not (math.isfinite(self.units_remaining) and 0 < self.units_remaining < 1):
        raise ValueError(f'units_remaining must be in (0, 1), got {self.units_remaining}')
    if not self.study_name.strip():
      raise ValueError('study_name: give a name')
    if self.space_file is not None and not os.path.isfile(self.space_file):
      raise ValueError(f'space: {self.space_file} is not a file')
    check_data_dir(self.data)
    try:
      self.space.validate()
    except ValueError as e:  # named as the flag typed (--tune_<name>) and the setting (space.<name>)
      raise SearchSpace.flag_error(e) from None
    self.dropnet.validate()


def with_space_file(config: TuneConfig, given: Iterable[str] = ()) -> TuneConfig:
  """`config` with its search space read from `space_file` (SearchSpace's fields; the rest at their
  defaults), except the space's settings in `given` (dotted paths set on the command line), which
  keep their value. The space file is then no longer needed (space_file None): config.json holds the
  space itself."""
  if config.space_file is None:
    return config
  space = SearchSpace.load(config.space_file)
  keep = {path.split('.', 1)[1]: getattr(config.space, path.split('.', 1)[1]) for path in given
          if path.startswith('space.')}
  try:  # the file's space is valid (`load`): an error here comes from a --tune_* flag
    merged = dataclasses.replace(space, **keep).validate()
  except ValueError as e:
    raise SearchSpace.flag_error(e) from None
  return dataclasses.replace(config, space=merged, space_file=None)


def check_data_dir(data: DataConfig) -> None:
  if data.data_dir is not None and not os.path.isdir(data.data_dir):
    raise ValueError(f'data_dir: {data.data_dir} is not a directory')


def _check_counts(config: Any, positive: Iterable[str], at_least_zero: Iterable[str],
                  positive_or_none: Iterable[str]) -> None:
  for name in positive:
    if getattr(config, name) < 1:
      raise ValueError(f'{name} must be a positive integer, got {getattr(config, name)}')
  for name in at_least_zero:
    if getattr(config, name) < 0:
      raise ValueError(f'{name} must be >= 0, got {getattr(config, name)}')
  for name in positive_or_none:
    value = getattr(config, name)
    if value is not None and value < 1:
      raise ValueError(f'{name} must be a positive integer, got {value}')
