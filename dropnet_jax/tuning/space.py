"""The search space of a study and the configs it maps to (see dropnet_jax.tuning).

`suggest` samples a trial's parameters define-by-run (conditional on optimiser and schedule) and
`complete` fills in the fixed ones; `train_config` is the trial's TrainConfig, `template_config` the
config of the compiled program it trains with (searched learning rate, momentum and weight decay
replaced by stand-ins, which every lane then sets to its own value: `lane_hyperparams`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from dropnet_jax import settings
from dropnet_jax.pruning import criteria
from dropnet_jax.config import AUGMENTATIONS, DropNetConfig, TrainConfig
from dropnet_jax.settings import setting
from dropnet_jax.training.optim import DEFAULT_MOMENTUM, OPTIMIZERS, SCHEDULES

DYNAMIC = ('lr', 'momentum', 'weight_decay')  # per-lane values; everything else is static
_OPTAX_NAME = {'lr': 'learning_rate', 'momentum': 'momentum', 'weight_decay': 'weight_decay'}
# Static stand-ins for searched dynamic values in a lane program's config (each lane sets its own):
# non-zero so the momentum and weight-decay terms exist in the program.
_PLACEHOLDER = {'lr': 1.0, 'momentum': 0.5, 'weight_decay': 1e-3}
_SCHEDULES_WITH_FLOOR = ('cosine', 'linear', 'cyclic', 'warmup_cosine')

# -- the search space -----------------------------------------------------------------------------

_RANGES = ('lr', 'momentum', 'weight_decay', 'min_lr_factor', 'step_epochs', 'gamma', 'cyclic_half_epochs',
           'warmup_epochs', 'fractions', 'batch_size_range', 'dropout')


@dataclasses.dataclass(frozen=True)
class SearchSpace:
  """What a study searches: settings (`dropnet_jax.settings`), so each is a `--tune_<name>` flag, a
  `--config.space.<name>` and a field of a `--space=<file.json>`. Ranges are [low, high]; an empty or
  None range, or one choice, is not searched (its value is fixed)."""
  optimizers: tuple[str, ...] = setting(('sgd', 'momentum', 'adam'), 'Optimisers searched (sgd, momentum, adam, '
                                        'adamw, rmsprop, adagrad, adadelta, asgd).', flag='tune_optimizers')
  lr: tuple[float, ...] | None = setting((1e-5, 1e-1), 'Learning-rate range (log).', flag='tune_lr')
  momentum: tuple[float, ...] | None = setting((0.5, 0.99), 'Momentum range (momentum, rmsprop); empty: not '
                                               'searched.', flag='tune_momentum')
  weight_decay: tuple[float, ...] | None = setting(None, 'Weight-decay range (log), e.g. 1e-6,1e-2; empty: '
                                                   '--weight_decay.', flag='tune_weight_decay')
  batch_sizes: tuple[int, ...] = setting((64, 128, 256), 'Batch sizes searched.', flag='tune_batch_sizes')
  batch_size_range: tuple[int, ...] | None = setting(None, 'Batch-size range [low, high] (integers, e.g. 64,256), '
                                                     'replacing --tune_batch_sizes; each size compiles its own '
                                                     'programs.', flag='tune_batch_size_range')
  batch_size_step: int = setting(1, 'Batch-size range: sampled sizes are low + k·step (high - low a multiple).',
                                 flag='tune_batch_size_step')
  batch_size_log: bool = setting(False, 'Batch-size range: sample on a log scale (step 1).', flag='tune_batch_size_log')
  dropout: tuple[float, ...] | None = setting(None, 'Dropout-rate range [low, high] in [0, 1) (the model\'s '
                                              '--dropout); empty: the model config\'s rate.', flag='tune_dropout')
  schedules: tuple[str, ...] = setting(('constant', 'cosine', 'step'), 'Schedules searched (constant, cosine, '
                                       'linear, step, cyclic, warmup_cosine, torch_linear).', flag='tune_schedules')
  min_lr_factor: tuple[float, ...] | None = setting((0.0, 0.1), 'cosine/linear/cyclic/warmup_cosine floor range.',
                                                    flag='tune_min_lr_factor')
  step_epochs: tuple[int, ...] | None = setting((2, 10), 'step: epochs between drops (integers).',
                                                flag='tune_step_epochs')
  gamma: tuple[float, ...] | None = setting((0.1, 0.5), 'step: drop factor range (log).', flag='tune_gamma')
  cyclic_half_epochs: tuple[int, ...] | None = setting((1, 4), 'cyclic: half-cycle range in epochs (integers).',
                                                       flag='tune_cyclic_half_epochs')
  warmup_epochs: tuple[int, ...] | None = setting((1, 3), 'warmup_cosine: warmup range in epochs (integers; capped '
                                                  'below max_epochs).', flag='tune_warmup_epochs')
  augments: tuple[str, ...] = setting(('none',), 'Augmentations searched (none, flip, crop, autoaugment; '
                                      'crop,flip as crop+flip, crop,flip,autoaugment as crop+flip+autoaugment).',
                                      flag='tune_augments')
  fractions: tuple[float, ...] | None = setting((0.1, 0.5), 'dropnet objective: range of p.', flag='tune_fractions')
  metrics: tuple[str, ...] | None = setting(('min', 'min_layer'), 'dropnet objective: criteria searched.',
                                            flag='tune_metrics')

  def __post_init__(self):
    # Lists (from JSON) as tuples, an empty range as None (not searched), crop+flip as crop,flip.
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if isinstance(value, list):
        value = tuple(value)
      if f.name in _RANGES and value == ():
        value = None
      if f.name == 'augments' and isinstance(value, tuple):
        value = tuple(v.replace('+', ',') if isinstance(v, str) else v for v in value)
      object.__setattr__(self, f.name, value)

  @classmethod
  def from_dict(cls, d: dict[str, Any], where: str = 'search space') -> 'SearchSpace':
    """The fields `d` gives (JSON: ranges as [low, high]) over the defaults; ValueError names the field."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names) if isinstance(d, dict) else []
    if unknown:
      raise ValueError(f'{where}: unknown fields {unknown}; known: {sorted(names)}')
    return settings.from_dict(cls(), d, where).validate()

  @classmethod
  def load(cls, path: str) -> 'SearchSpace':
    try:
      with open(path) as f:
        d = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise ValueError(f'--space={path}: not readable JSON ({e})') from None
    return cls.from_dict(d, f'--space={path}')

  def to_dict(self) -> dict[str, Any]:
    return settings.to_dict(self)

  def without_dropnet(self) -> 'SearchSpace':
    """This space for the 'train' objective: DropNet's p and criterion are not searched."""
    return dataclasses.replace(self, fractions=None, metrics=None)

  def validate(self) -> 'SearchSpace':
    """Raises ValueError naming the field; returns self."""
    for name, known in (('optimizers', OPTIMIZERS), ('schedules', SCHEDULES), ('augments', AUGMENTATIONS)):
      choices = getattr(self, name)
      if not choices or any(c not in known for c in choices):
        raise ValueError(f'{name}: {list(choices)} must be a non-empty subset of {list(known)}')
    for name in ('optimizers', 'schedules', 'augments', 'batch_sizes', 'metrics'):
      choices = getattr(self, name) or ()
      if len(set(choices)) != len(choices):
        raise ValueError(f'{name}: duplicates in {list(choices)}')
    if not self.batch_sizes or any(int(b) != b or b < 1 for b in self.batch_sizes):
      raise ValueError(f'batch_sizes: positive integers, got {list(self.batch_sizes)}')
    self._validate_batch_size_range()
    for name, low, high, log in (('lr', 0, None, True), ('momentum', 0, 1, False), ('weight_decay', 0, None, True),
                                 ('min_lr_factor', 0, 1, False), ('gamma', 0, None, True), ('fractions', 0, 1, False),
                                 ('step_epochs', 1, None, False), ('cyclic_half_epochs', 1, None, False),
                                 ('warmup_epochs', 1, None, False), ('dropout', 0, 1, False)):
      r = getattr(self, name)
      if r is None:
        continue
      if len(r) != 2 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in r) or r[0] > r[1]:
        raise ValueError(f'{name}: expected [low, high] with low <= high, got {r}')
      if r[0] < low or (log and r[0] <= 0) or (high is not None and r[1] > high):
        raise ValueError(f'{name}: {list(r)} must lie in [{low}, {high if high is not None else "inf"}]'
                         + (' with low > 0 (log scale)' if log else ''))
    for name in ('momentum', 'dropout'):
      r = getattr(self, name)
      if r is not None and r[1] >= 1:
        raise ValueError(f'{name}: high must be < 1, got {r[1]}')
    if self.fractions is not None and self.fractions[0] <= 0:
      raise ValueError(f'fractions: low must be > 0, got {self.fractions[0]}')
    if self.metrics is not None:
      if not self.metrics:
        raise ValueError('metrics: at least one criterion, or None')
      for m in self.metrics:
        try:
          criteria.get(m)
        except ValueError as e:
          raise ValueError(f'metrics: {e}') from None
    return self

  @classmethod
  def flag_error(cls, error: ValueError) -> ValueError:
    """`error` from `validate` ('<field>: ...') naming the field's command-line flag and its config path
    ('--tune_lr (space.lr): ...'): what the user typed, for every field (its `setting(flag=...)`)."""
    field, sep, rest = str(error).partition(':')
    flags = {f.name: f.metadata.get('flag') for f in dataclasses.fields(cls)}
    if not sep or not flags.get(field):
      return ValueError(f'space: {error}')
    return ValueError(f'--{flags[field]} (space.{field}):{rest}')

  def _validate_batch_size_range(self) -> None:
    step, log, r = self.batch_size_step, self.batch_size_log, self.batch_size_range
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
      raise ValueError(f'batch_size_step: a positive integer, got {step!r}')
    if not isinstance(log, bool):
      raise ValueError(f'batch_size_log: expected a bool, got {log!r}')
    if r is None:
      return
    if len(r) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v for v in r) \
        or not 1 <= r[0] <= r[1]:
      raise ValueError(f'batch_size_range: expected integers [low, high] with 1 <= low <= high, got {list(r)}')
    if (int(r[1]) - int(r[0])) % step:
      raise ValueError(f'batch_size_range: high - low = {int(r[1]) - int(r[0])} is not a multiple of '
                       f'batch_size_step {step}')
    if log and step != 1:
      raise ValueError(f'batch_size_log: a log-scale range takes batch_size_step 1, got {step}')


def suggest(trial, space: SearchSpace, base: TrainConfig, dropnet: DropNetConfig | None = None) -> dict[str, Any]:
  """Samples the trial's searched parameters (define-by-run, conditional on optimiser and schedule)
  and returns every setting, the fixed ones included (`complete`)."""
  int_range = lambda r: r is not None and int(r[0]) < int(r[1])

  def pick(name, choices):
    if len(choices) > 1:
      trial.suggest_categorical(name, list(choices))

  def real(name, r, log=False):
    if r is not None and r[0] < r[1]:
      trial.suggest_float(name, float(r[0]), float(r[1]), log=log)

  pick('optimizer', space.optimizers)
  optimizer = trial.params.get('optimizer', space.optimizers[0])
  real('lr', space.lr, log=True)
  if optimizer in DEFAULT_MOMENTUM:
    real('momentum', space.momentum)
  real('weight_decay', space.weight_decay, log=True)
  if space.batch_size_range is not None:
    if int(space.batch_size_range[0]) < int(space.batch_size_range[1]):
      trial.suggest_int('batch_size', int(space.batch_size_range[0]), int(space.batch_size_range[1]),
                        step=int(space.batch_size_step), log=bool(space.batch_size_log))
  else:
    pick('batch_size', space.batch_sizes)
  pick('schedule', space.schedules)
  schedule = trial.params.get('schedule', space.schedules[0])
  if schedule in _SCHEDULES_WITH_FLOOR:
    real('min_lr_factor', space.min_lr_factor)
  if schedule == 'step':
    if int_range(space.step_epochs):
      trial.suggest_int('step_epochs', int(space.step_epochs[0]), int(space.step_epochs[1]))
    real('gamma', space.gamma, log=True)
  if schedule == 'cyclic' and int_range(space.cyclic_half_epochs):
    trial.suggest_int('cyclic_half_epochs', int(space.cyclic_half_epochs[0]), int(space.cyclic_half_epochs[1]))
  if schedule == 'warmup_cosine' and space.warmup_epochs is not None:
    high = min(int(space.warmup_epochs[1]), base.max_epochs - 1)
    if int(space.warmup_epochs[0]) < high:
      trial.suggest_int('warmup_epochs', int(space.warmup_epochs[0]), high)
  pick('augment', space.augments)
  real('dropout', space.dropout)
  if dropnet is not None:
    real('fraction', space.fractions)
    if space.metrics is not None:
      pick('metric', space.metrics)
  return complete(trial.params, space, base, dropnet)


def complete(params: dict[str, Any], space: SearchSpace, base: TrainConfig,
             dropnet: DropNetConfig | None = None) -> dict[str, Any]:
  """All settings of a trial: its searched `params` plus the fixed ones (one choice, an empty
  range, or the base config's value for what the space does not search)."""
  o = base.optim
  fixed = lambda r, default: r[0] if r is not None else default
  s = {'optimizer': params.get('optimizer', space.optimizers[0]),
       'lr': params.get('lr', fixed(space.lr, o.lr)),
       'batch_size': int(params.get('batch_size', fixed(space.batch_size_range, space.batch_sizes[0]))),
       'schedule': params.get('schedule', space.schedules[0]),
       'augment': params.get('augment', space.augments[0])}
  if s['optimizer'] in DEFAULT_MOMENTUM:
    base_momentum = o.momentum if o.momentum is not None else DEFAULT_MOMENTUM[s['optimizer']]
    s['momentum'] = params.get('momentum', fixed(space.momentum, base_momentum))
  s['weight_decay'] = params.get('weight_decay', fixed(space.weight_decay, o.weight_decay))
  if s['schedule'] in _SCHEDULES_WITH_FLOOR:
    s['min_lr_factor'] = params.get('min_lr_factor', fixed(space.min_lr_factor, o.min_lr_factor))
  if s['schedule'] == 'step':
    s['step_epochs'] = params.get('step_epochs', fixed(space.step_epochs, o.step_epochs))
    s['gamma'] = params.get('gamma', fixed(space.gamma, o.gamma))
  if s['schedule'] == 'cyclic':
    s['cyclic_half_epochs'] = params.get('cyclic_half_epochs', fixed(space.cyclic_half_epochs, o.cyclic_half_epochs))
  if s['schedule'] == 'warmup_cosine':
    s['warmup_epochs'] = params.get('warmup_epochs', min(fixed(space.warmup_epochs, o.warmup_epochs),
                                                         base.max_epochs - 1))
  if space.dropout is not None:  # else the model config's rate (ModelConfig.dropout), not a trial setting
    s['dropout'] = float(params.get('dropout', space.dropout[0]))
  if dropnet is not None:
    s['fraction'] = params.get('fraction', fixed(space.fractions, dropnet.fraction))
    s['metric'] = params.get('metric', space.metrics[0] if space.metrics else dropnet.metrics[0])
  return s


def train_config(settings: dict[str, Any], base: TrainConfig) -> TrainConfig:
  """The TrainConfig of a trial's settings (`complete`'s output) over `base`."""
  kind = settings['optimizer']
  optim = dataclasses.replace(
      base.optim, optimizer=kind, lr=float(settings['lr']),
      momentum=float(settings['momentum']) if kind in DEFAULT_MOMENTUM else None,
      nesterov=base.optim.nesterov and kind == 'momentum', weight_decay=float(settings['weight_decay']),
      schedule=settings['schedule'],
      **{k: type(getattr(base.optim, k))(settings[k]) for k in
         ('min_lr_factor', 'step_epochs', 'gamma', 'cyclic_half_epochs', 'warmup_epochs') if k in settings})
  config = dataclasses.replace(base, batch_size=int(settings['batch_size']), augment=settings['augment'], optim=optim)
  config.validate()
  return config


def trial_model(model, settings: dict[str, Any]):
  """The model a trial trains: `model` with the trial's dropout rate where the space gives one. The
  rate is a field of the model (static, like the batch size), so trials group by it too (`group_key`)."""
  return model if settings.get('dropout') is None else model.clone(dropout=float(settings['dropout']))


def group_key(settings: dict[str, Any], space: SearchSpace, base: TrainConfig) -> tuple[TrainConfig, float | None]:
  """What trials must share to train as lanes of one program: the template config and the dropout rate."""
  return template_config(settings, space, base), settings.get('dropout')


def searched_dynamic(space: SearchSpace, settings: dict[str, Any]) -> tuple[str, ...]:
  """The dynamic settings that vary between lanes of this static shape (always the learning rate)."""
  out = ['lr']
  if 'momentum' in settings and space.momentum is not None:
    out.append('momentum')
  if space.weight_decay is not None:
    out.append('weight_decay')
  return tuple(out)


def template_config(settings: dict[str, Any], space: SearchSpace, base: TrainConfig) -> TrainConfig:
  """The config of the compiled program a trial trains with: its settings with the per-lane values
  replaced by fixed stand-ins. Trials with equal templates can share one program as lanes."""
  stand_in = {k: _PLACEHOLDER[k] for k in searched_dynamic(space, settings)}
  return train_config({**settings, **stand_in}, base)


def lane_hyperparams(settings: dict[str, Any], space: SearchSpace) -> dict[str, float]:
  """The optax names and values `optim.with_hyperparams` sets for one lane."""
  return {_OPTAX_NAME[k]: float(settings[k]) for k in searched_dynamic(space, settings)}
