"""The settings of every run, each written once (see `dropnet_jax.settings`): a typed field with its
default, help, short flag and whether it can change a result.

Training (`TrainConfig`, with `training.optim.OptimizerConfig`), DropNet's loop (`DropNetConfig`), the
network (`ModelConfig`), the data (`DataConfig`), what a run writes besides results (`OutputConfig`),
and the entry points' configs that compose them (`ExperimentConfig` and the studies'). All are frozen
dataclasses; `validate()` raises ValueError naming the setting and runs before any work starts.
The command line, help, config.json and the checkpoint stamp are derived from these fields.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from dropnet_jax.input_pipeline import DATASETS
from dropnet_jax.models import INITIALIZERS, MODELS, model_from_config
from dropnet_jax.pruning import criteria
from dropnet_jax.settings import setting, to_dict  # noqa: F401  (to_dict: the config's JSON form)
from dropnet_jax.training.optim import OptimizerConfig

SCORE_SOURCES = ('data', 'epoch')
SCORE_PARAMS = ('best', 'last')


# autoaugment: torchvision's AutoAugment CIFAR-10 policy (training.autoaugment); after crop and flip, as in
# torchvision's CIFAR recipe RandomCrop(32, padding=4) -> RandomHorizontalFlip -> AutoAugment.
AUGMENTATIONS = ('none', 'flip', 'crop', 'crop,flip', 'autoaugment', 'crop,flip,autoaugment')
MODEL_NAMES = tuple(sorted(MODELS))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Hyperparameters of one training run (the paper's defaults: plain SGD, lr 0.1, batch 32)."""
  batch_size: int = setting(32, 'Batch size.', flag='batch_size')
  max_epochs: int = setting(100, 'Maximum epochs per training run.', flag='max_epochs')
  patience: int = setting(5, 'Early-stopping patience on validation loss (epochs).', flag='patience')
  eval_batch_size: int = setting(1000, 'Batch size of evaluation passes (does not change a result).', result=False)
  shuffle: bool = setting(True, 'Reshuffle the training set every epoch (the official notebook did not).',
                          flag='shuffle')
  augment: str = setting('none', 'On-device training augmentation: random crop with zero padding 4 and/or '
                         'horizontal flip, then optionally AutoAugment (the CIFAR-10 policy, as torchvision) '
                         "(off by default, as in the paper's MNIST/CIFAR runs).", flag='augment',
                         choices=AUGMENTATIONS)
  optim: OptimizerConfig = OptimizerConfig()  # optimiser, learning rate and its schedule (training.optim)

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
  """Algorithm 1's settings; `metrics` are names of registered criteria (pruning.criteria)."""
  metrics: tuple[str, ...] = setting(
      ('min', 'max', 'random', 'min_layer', 'max_layer', 'random_layer'),
      'Criteria to run (pruning.criteria: min, max, random, their _layer forms, apoz, apoz_layer, oracle, and '
      "the official notebook's selection rule as *_official).", flag='metrics')
  fraction: float = setting(0.2, 'p: fraction of the remaining units dropped per cycle, in (0, 1].', flag='fraction')
  floor: float = setting(0.1, 'Stop once the fraction of units remaining is <= floor, in (0, 1).', flag='floor')
  kappa: float | None = setting(None, 'Stop once val accuracy <= kappa * dense val accuracy, in (0, 1].',
                                flag='kappa')
  score_from: str = setting('data', "data: score with a pass over all training samples (the paper's); epoch: "
                            "from the best epoch's running sums.", flag='score_from', choices=SCORE_SOURCES)
  score_params: str = setting('best', "θ the criteria score: the best-validation-loss epoch's (the paper's) or "
                              "the last epoch's (the official code's).", flag='score_params', choices=SCORE_PARAMS)
  oracle_examples: int | None = setting(None, "Training examples in the oracle's loss (default: all).",
                                        flag='oracle_examples')
  param_budget: float | None = setting(None, 'Stop at the first cycle whose compact network has at most this many '
                                       'parameters (e.g. 5e6), and report that network.', flag='param_budget')
  mac_budget: float | None = setting(None, 'Stop at the first cycle whose compact network needs at most this many '
                                     'multiply-accumulates per example.', flag='mac_budget')
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


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Which network, and how wide."""
  name: str = setting('fc', 'Model: fc (Model A), conv (Model B), modelc (Model C), resnet18 (no batch norm, the '
                      "paper's), resnet18_bn (CIFAR ResNet18 with batch norm), vgg16, vgg19 (batch norm, "
                      'optional FC head: --head).', flag='model', choices=MODEL_NAMES)
  widths: tuple[int, ...] | None = setting(None, "Units/filters per masked layer, e.g. 40,40 (default: the model's).",
                                           flag='widths')
  width_multiplier: float = setting(1.0, "Without widths: the model's default widths scaled by this (e.g. 0.25 for "
                                    'a CPU-sized ResNet18/VGG19).', flag='width_multiplier')
  head: tuple[int, ...] | None = setting(None, 'Hidden FC widths of the classifier head, e.g. 1024 or 512,256, '
                                         'taken as given (not scaled by width_multiplier). modelc: unmasked, '
                                         'default 256. vgg16/vgg19: masked nodes pruned with the filters, default '
                                         'none (global average pool -> classifier); the documents\' VGG19 recipes '
                                         'are 1024 on tiny_imagenet and 256 on mnist.', flag='head')
  dropout: float = setting(0.0, 'Dropout rate in [0, 1), training only: after each hidden FC layer and on the '
                           'features the classifier reads.', flag='dropout')
  init: str = setting('auto', "θ0's initialiser: glorot (Keras', the DropNet paper's), torch (PyTorch's layer "
                      "defaults) or auto (the model's own).", flag='init', choices=('auto', *INITIALIZERS))
  stages: tuple[int, ...] | None = setting(None, 'resnet18/resnet18_bn layer removal: the kept stages, e.g. 1,2,3 '
                                           '(stage 4 removed: the "under 5 M" report\'s network; default: all '
                                           'four). With --widths, give the kept stages\' widths.', flag='stages')

  def validate(self) -> None:
    """The model's own checks (`models.create_model`: name, widths, head, dropout), before any data."""
    try:
      model_from_config(self, 10)
    except ValueError as e:
      raise ValueError(f'model: {e}') from None


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Which data. Where they are read from cannot change a result: the data's fingerprint is stamped."""
  dataset: str = setting('digits', 'digits (bundled with scikit-learn, the offline default), mnist, cifar10, '
                         'tiny_imagenet.', flag='dataset', choices=DATASETS)
  data_dir: str | None = setting(None, 'Local data files (for mnist: a directory of the four IDX files).',
                                 flag='data_dir', result=False)
  split_seed: int = setting(0, 'Seed of the stratified validation split.', flag='split_seed')
  normalize: bool = setting(False, "Per-channel normalisation: the model subtracts the training split's mean and "
                            'divides by its std per channel (stored with the run in params/spec.json).',
                            flag='normalize')


@dataclasses.dataclass(frozen=True)
class OutputConfig:
  """What a run writes and shows besides its results; none of it can change a result."""
  save_params: str = setting('auto', 'Trained params kept in <out>/params: all cycles, the last cycle per trial, '
                             'or none. auto: all for models under 1M parameters, else last.', flag='save_params',
                             result=False, choices=('auto', 'all', 'last', 'none'))
  checkpoint_interval_s: float = setting(60.0, 'Checkpoint at the first epoch or cycle end after this many seconds '
                                         'since the last checkpoint, and always on Ctrl-C/SIGTERM and at the end '
                                         '(0: after every cycle).', flag='checkpoint_interval_s', result=False)
  checkpoint_every_epochs: int = setting(0, 'Also checkpoint every N epochs inside a cycle, whatever the interval '
                                         '(0: never forced).', flag='checkpoint_every_epochs', result=False)
  max_checkpoints: int = setting(3, 'Checkpoints kept in <out>/checkpoints (0: none, the run cannot be resumed).',
                                 flag='max_checkpoints', result=False)
  verbose: bool = setting(False, 'Also print a line per epoch (by default: a progress bar on a terminal and one '
                          'line per finished cycle).', flag='verbose', result=False)
  x_axis: str = setting('fraction', "x axis of the figures: fraction of units remaining, or the compact network's "
                        'params or MACs.', flag='x_axis', result=False, choices=('fraction', 'params', 'macs'))
  curves: bool = setting(True, 'Write learning curves: <out>/metrics.jsonl (a row per trial x cycle x epoch), '
                         'TensorBoard event files in <out>/tb and <out>/learning_curves.png.', flag='curves',
                         result=False)

  def validate(self) -> None:
    if self.checkpoint_every_epochs < 0:
      raise ValueError(f'checkpoint_every_epochs must be >= 0, got {self.checkpoint_every_epochs}')
    if self.max_checkpoints < 0:
      raise ValueError(f'max_checkpoints must be >= 0, got {self.max_checkpoints}')
    if not self.checkpoint_interval_s >= 0:
      raise ValueError(f'checkpoint_interval_s must be >= 0 seconds, got {self.checkpoint_interval_s}')


@dataclasses.dataclass(frozen=True)
class InitFromConfig:
  """Where the dense network comes from: trained from θ0 (default), or a trained network loaded
  (`runs.init_from`, whose docstring says what a loaded network means for each method)."""
  init_from: str | None = setting(
      None, 'Start from a trained network instead of training the dense one from θ0: RUN_DIR (its seed-0 dense '
      'network), RUN_DIR:seed<S>/dense, RUN_DIR:seed<S>/<metric>/cycle<C>, RUN_DIR:seed<S>/<metric> (newest saved '
      'cycle), a compact export directory (experiments.compact), or a PyTorch state_dict .pth/.pt of the torch '
      'twin. The loaded network is the dense cycle, evaluated, not trained; its architecture must be the '
      "model's.", flag='init_from')

  def validate(self) -> None:
    """The source exists and its selector parses (the architecture is checked once the data are known)."""
    from dropnet_jax.runs import init_from  # the runs package imports this module
    init_from.check(self.init_from)


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """A DropNet run (`experiments.dropnet` and the studies): every seed x metric of Algorithm 1."""
  model: ModelConfig = ModelConfig()
  start: InitFromConfig = InitFromConfig()
  data: DataConfig = DataConfig()
  seeds: int = setting(1, 'Number of seeds, run as 0..N-1.', flag='seeds')
  dropnet: DropNetConfig = DropNetConfig()
  batch_trials: bool = setting(False, 'Train all seeds x metrics of a cycle together as lanes of one compiled '
                               'program (the same records). With several devices (or --host_devices on CPU) the '
                               'trials are split over them.', flag='batch_trials')
  lane_schedule: str = setting('barrier', 'With --batch_trials: barrier (every lane starts cycle c together and waits '
                               "for the slowest lane's early stop) or continuous (a lane whose cycle ends starts its "
                               "trial's next cycle, or the next waiting trial, at once; the same records).",
                               flag='lane_schedule', choices=('barrier', 'continuous'))
  lanes: int | None = setting(None, 'With --batch_trials: lanes trained together (default: one per trial); the '
                              'barrier runs the trials in groups of this many, continuous feeds them to the lanes.',
                              flag='lanes')
  output: OutputConfig = OutputConfig()

  def validate(self) -> None:
    if self.seeds < 1:
      raise ValueError(f'seeds must be >= 1, got {self.seeds}')
    if self.lanes is not None and self.lanes < 1:
      raise ValueError(f'lanes must be >= 1, got {self.lanes}')
    if (self.lane_schedule != 'barrier' or self.lanes is not None) and not self.batch_trials:
      raise ValueError('--lane_schedule and --lanes apply to batched trials: add --batch_trials')
    self.model.validate()
    self.start.validate()
    self.dropnet.validate()
    self.output.validate()
    if self.start.init_from and self.dropnet.score_from == 'epoch':
      raise ValueError('--init_from needs --score_from=data: a loaded network is not trained, so it has no epoch sums')


@dataclasses.dataclass(frozen=True)
class FractionStudyConfig(ExperimentConfig):
  """DropNet for several p (the paper's pruning-fraction study: the min metric)."""
  dropnet: DropNetConfig = DropNetConfig(metrics=('min',))
  fractions: tuple[float, ...] = setting((0.2, 0.3, 0.4, 0.5, 0.9), 'Values of p to compare.', flag='fractions')
