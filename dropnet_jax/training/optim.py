"""Optimisers and learning-rate schedules in torch.optim's exact form, built from optax.

DropNet trains with plain SGD (the paper's setting, and `OptimizerConfig()`'s default, whose updates
are `optax.sgd(lr)`'s bit for bit, so existing results do not move). For the other studies the
config also offers SGD with (Nesterov) momentum, Adam, AdamW, RMSprop, Adagrad, Adadelta and ASGD and
seven schedules, each defined as its torch.optim / torch.optim.lr_scheduler counterpart so that a run here
and one with the PyTorch twin follow the same trajectory (tested in tests/optim_test.py):

  optimizer   torch counterpart (all other arguments at torch's defaults)
  'sgd'       SGD(lr, weight_decay)
  'momentum'  SGD(lr, momentum, nesterov, weight_decay)           momentum defaults to 0.9
  'adam'      Adam(lr, weight_decay)                              betas (0.9, 0.999), eps 1e-8 (see below)
  'adamw'     AdamW(lr, weight_decay)                             decoupled decay (torch's default is 1e-2, ours 0)
  'rmsprop'   RMSprop(lr, momentum, weight_decay)                 alpha 0.99, eps 1e-8 outside the sqrt, momentum 0
  'adagrad'   Adagrad(lr, weight_decay)                           eps 1e-10 outside the sqrt, accumulator from 0
  'adadelta'  Adadelta(lr, weight_decay)                          rho 0.9, eps 1e-6 (torch's default lr is 1.0)
  'asgd'      ASGD(lr, lambd, alpha, t0, weight_decay)            lambd 1e-4, alpha 0.75, t0 1e6 (torch's default
                                                                  lr is 0.01); θ is evaluated and saved, not ax

optax's own pieces are used where their arithmetic is torch's (trace, scale_by_rms with eps outside
the sqrt, scale_by_adadelta, add_decayed_weights). Adagrad, Adam's bias corrections and ASGD are
written in `torch_optimizers`, which says why and gives ASGD's update.

Weight decay is coupled (wd * θ added to the gradient before anything else, as torch's
`weight_decay` argument does) for every optimiser but 'adamw', where it is decoupled (θ shrinks by
lr * wd each step, as torch.optim.AdamW). It applies to every parameter, biases included, as in torch.
`lr` is used as given by every optimiser: torch's per-optimiser default lrs are not applied.
(torch's AdamW multiplies θ by float32(1 - lr·wd), whose rounding drifts θ by up to ~3e-8 relative
per step from the exact product; ours computes θ - lr·wd·θ, so the two differ by that much.)

Schedules multiply `lr` by a factor of the optimiser step count t (0 for the first update; the
count lives in the optimiser state, so it restarts whenever the state is re-initialised, e.g. with
θ0 at every DropNet cycle). Their lengths are given in epochs and turned into steps with
`steps_per_epoch` (rounded half up, at least one step):

  'constant'       lr                                                    (torch: no scheduler)
  'cosine'         lr·(m + (1-m)·(1 + cos(π·t/T))/2), t ≤ T               CosineAnnealingLR(T, eta_min=m·lr)
  'linear'         lr·(1 + (m-1)·t/T), t ≤ T                              LinearLR(1, end_factor=m, T)
  'step'           lr·γ^⌊t/S⌋                                             StepLR(step_size=S, gamma=γ)
  'cyclic'         triangle between m·lr (t = 0) and lr, H steps each way CyclicLR(m·lr, lr, H, mode='triangular',
                                                                          cycle_momentum=False)
  'warmup_cosine'  linear from s·lr to lr over W steps, then cosine to   SequentialLR([LinearLR(s, 1, W),
                   m·lr at step T (T counts the warmup too)               CosineAnnealingLR(T-W, m·lr)], [W])
  'torch_linear'   lr·(s0 + (s1-s0)·min(t, N)/N)                          LinearLR(s0, s1, N): torch's defaults
                                                                          s0 = 1/3, s1 = 1, N = 5

with T = schedule_epochs (default max_epochs), m = min_lr_factor, S = step_epochs, γ = gamma,
H = cyclic_half_epochs, W = warmup_epochs, s = warmup_start_factor, all in steps; s0, s1, N are the
torch_linear_* fields, N counted in schedule units (not epochs), as torch's total_iters counts
scheduler.step() calls. Past T the cosine schedules stay at m·lr (torch's CosineAnnealingLR would rise
again; with the default T = max_epochs training never gets there). The factors are computed in
float32 in forms that keep their relative error ~1e-7 even where they approach 0 (sin² instead of
1 + cos, integer step differences).

Per-epoch schedules. With schedule_unit='epoch' the same formulas run on the epoch index
e = t // steps_per_epoch instead of t, their lengths in whole epochs (a fractional length the schedule
reads is a ValueError): the lr is constant within epoch e and equals what torch gives in epoch e when
scheduler.step() is called once after each epoch (the CIFAR recipes' convention).

Static vs dynamic. The optimiser kind, the schedule's kind and lengths and factors, nesterov, the
torch constants above, and *which* terms exist (weight decay only when `weight_decay > 0`, RMSprop's
momentum only when `momentum > 0`) are fixed when the transform is built. The values of the
learning rate, momentum and weight decay are not: `make_optimizer` wraps the chain in
`optax.inject_hyperparams`, so they sit in the optimiser state as float arrays ('learning_rate',
'momentum', 'weight_decay'; 'lr_factor' is the schedule's current factor, recomputed every step) and
`with_hyperparams` replaces them, e.g. with one value per lane of a vmapped batch of trials. Because
a term whose config value is 0 is absent from the program, the default SGD is exactly
`optax.sgd(lr)` (no `0 * θ` terms), and lanes can vary weight decay (RMSprop momentum) only when the
config's value is non-zero. `tx.update` needs `params` (weight decay, and the hyperparameters take
the params' float dtype).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dropnet_jax.settings import setting
from dropnet_jax.training.torch_optimizers import (ASGD_ALPHA, ASGD_LAMBD, ASGD_T0, scale_by_torch_adagrad,
                                                   scale_by_torch_adam, torch_asgd)

OPTIMIZERS = ('sgd', 'momentum', 'adam', 'adamw', 'rmsprop', 'adagrad', 'adadelta', 'asgd')
SCHEDULES = ('constant', 'cosine', 'linear', 'step', 'cyclic', 'warmup_cosine', 'torch_linear')
SCHEDULE_UNITS = ('step', 'epoch')

# torch.optim's defaults for the constants that are not config fields (Adam's, Adagrad's: torch_optimizers).
RMSPROP_ALPHA, RMSPROP_EPS = 0.99, 1e-8
ADADELTA_RHO, ADADELTA_EPS = 0.9, 1e-6
DEFAULT_MOMENTUM = {'momentum': 0.9, 'rmsprop': 0.0}  # the optimisers that take a momentum


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Optimiser and learning-rate schedule of a training run (see the module docstring)."""
  optimizer: str = setting('sgd', "sgd (the paper's), momentum, adam, adamw, rmsprop, adagrad, adadelta or asgd, "
                           "with torch.optim's formulas and defaults.", flag='optimizer', choices=OPTIMIZERS)
  lr: float = setting(0.1, "Peak / initial learning rate, shared by every optimiser (torch's defaults differ: "
                      "adadelta 1.0, asgd 0.01).", flag='lr')
  momentum: float | None = setting(None, 'momentum: heavy-ball coefficient (default 0.9); rmsprop: momentum '
                                   '(default 0); not accepted by the other optimisers.', flag='momentum')
  nesterov: bool = setting(False, 'Nesterov momentum (optimizer=momentum).', flag='nesterov')
  weight_decay: float = setting(0.0, "L2 coupled into the gradient, as torch's weight_decay; decoupled for adamw.",
                                flag='weight_decay')
  asgd_lambd: float = setting(ASGD_LAMBD, "asgd: decay term λ (torch's lambd): θ shrinks by λ·η per update, and "
                              'η = lr / (1 + λ·lr·t)^α.', flag='asgd_lambd')
  asgd_alpha: float = setting(ASGD_ALPHA, 'asgd: power α of the step-size decay (torch\'s alpha).', flag='asgd_alpha')
  asgd_t0: float = setting(ASGD_T0, 'asgd: update from which the average ax starts (torch\'s t0); ax is kept in '
                           'the optimiser state, θ is what is evaluated and saved.', flag='asgd_t0')
  schedule: str = setting('constant', 'Learning-rate schedule.', flag='lr_schedule', choices=SCHEDULES)
  schedule_unit: str = setting('step', "step: the schedule moves every optimiser step; epoch: once per epoch, as "
                               "torch's scheduler.step() called once per epoch (lengths then whole epochs).",
                               flag='lr_schedule_unit', choices=SCHEDULE_UNITS)
  schedule_epochs: float | None = setting(None, 'Length T of cosine/linear/warmup_cosine in epochs (default: '
                                          'max_epochs).', flag='schedule_epochs')
  min_lr_factor: float = setting(0.0, 'Lowest lr as a fraction of lr (cosine/linear end, cyclic low point).',
                                 flag='min_lr_factor')
  warmup_epochs: float = setting(5.0, 'warmup_cosine: epochs W of linear warmup.', flag='warmup_epochs')
  warmup_start_factor: float = setting(0.0, 'warmup_cosine: the warmup starts at this fraction of lr.',
                                       flag='warmup_start_factor')
  step_epochs: float = setting(30.0, 'step: epochs S between learning-rate drops.', flag='step_epochs')
  gamma: float = setting(0.1, 'step: factor of each drop.', flag='lr_gamma')
  cyclic_half_epochs: float = setting(2.0, 'cyclic (triangular): epochs H from the low point to the peak.',
                                      flag='cyclic_half_epochs')
  torch_linear_start_factor: float = setting(1.0 / 3, "torch_linear: lr factor at the start (LinearLR's "
                                             'start_factor), in (0, 1].', flag='torch_linear_start_factor')
  torch_linear_end_factor: float = setting(1.0, "torch_linear: lr factor from total_iters on (LinearLR's end_factor), "
                                           'in [0, 1].', flag='torch_linear_end_factor')
  torch_linear_total_iters: int = setting(5, "torch_linear: schedule steps to reach end_factor (LinearLR's "
                                          'total_iters), counted in --lr_schedule_unit: optimiser steps or epochs.',
                                          flag='torch_linear_total_iters')

  @property
  def resolved_momentum(self) -> float:
    """The momentum in force: the given one, else the optimiser's default (0 for those without)."""
    if self.momentum is not None:
      return float(self.momentum)
    return DEFAULT_MOMENTUM.get(self.optimizer, 0.0)

  def validate(self) -> 'OptimizerConfig':
    """Raises ValueError naming the offending field; returns self."""
    if self.optimizer not in OPTIMIZERS:
      raise ValueError(f'optimizer: unknown {self.optimizer!r}; choose one of {", ".join(OPTIMIZERS)}')
    if self.schedule not in SCHEDULES:
      raise ValueError(f'schedule: unknown {self.schedule!r}; choose one of {", ".join(SCHEDULES)}')
    if self.schedule_unit not in SCHEDULE_UNITS:
      raise ValueError(f'schedule_unit: unknown {self.schedule_unit!r}; choose one of {", ".join(SCHEDULE_UNITS)}')
    _check('lr', self.lr, low=0.0, low_open=True)
    _check('weight_decay', self.weight_decay, low=0.0)
    if self.momentum is not None:
      if self.optimizer not in DEFAULT_MOMENTUM:
        raise ValueError(f'momentum: optimizer {self.optimizer!r} takes no momentum (only '
                         f'{", ".join(DEFAULT_MOMENTUM)} do)')
      _check('momentum', self.momentum, low=0.0, high=1.0, high_open=True)
    if not isinstance(self.nesterov, bool):
      raise ValueError(f'nesterov: expected a bool, got {self.nesterov!r}')
    if self.nesterov and (self.optimizer != 'momentum' or self.resolved_momentum <= 0):
      raise ValueError('nesterov: needs optimizer=momentum with a momentum > 0')
    if self.schedule_epochs is not None:
      _check('schedule_epochs', self.schedule_epochs, low=0.0, low_open=True)
    _check('min_lr_factor', self.min_lr_factor, low=0.0, high=1.0)
    _check('warmup_epochs', self.warmup_epochs, low=0.0)
    _check('warmup_start_factor', self.warmup_start_factor, low=0.0, high=1.0)
    _check('step_epochs', self.step_epochs, low=0.0, low_open=True)
    _check('gamma', self.gamma, low=0.0, low_open=True)
    _check('cyclic_half_epochs', self.cyclic_half_epochs, low=0.0, low_open=True)
    _check('asgd_lambd', self.asgd_lambd, low=0.0)
    _check('asgd_alpha', self.asgd_alpha, low=0.0)
    _check('asgd_t0', self.asgd_t0, low=0.0)
    _check('torch_linear_start_factor', self.torch_linear_start_factor, low=0.0, high=1.0, low_open=True)
    _check('torch_linear_end_factor', self.torch_linear_end_factor, low=0.0, high=1.0)
    total_iters = self.torch_linear_total_iters
    if isinstance(total_iters, bool) or not isinstance(total_iters, int) or total_iters < 1:
      raise ValueError(f'torch_linear_total_iters: expected an integer >= 1, got {total_iters!r}')
    if (self.schedule == 'warmup_cosine' and self.schedule_epochs is not None
        and self.warmup_epochs >= self.schedule_epochs):
      raise ValueError(f'warmup_epochs: {self.warmup_epochs} must be below schedule_epochs {self.schedule_epochs}')
    return self

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> 'OptimizerConfig':
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f'unknown optimizer config fields: {sorted(unknown)}')
    return cls(**d)


def _check(name: str, value, *, low=None, high=None, low_open=False, high_open=False) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise ValueError(f'{name}: expected a finite number, got {value!r}')
  if low is not None and (value < low or (low_open and value == low)):
    raise ValueError(f'{name}: must be {">" if low_open else ">="} {low}, got {value}')
  if high is not None and (value > high or (high_open and value == high)):
    raise ValueError(f'{name}: must be {"<" if high_open else "<="} {high}, got {value}')


# -- schedules ------------------------------------------------------------------------------------

class ScheduleSteps(NamedTuple):
  """The schedule's lengths in its units: optimiser steps (schedule_unit 'step') or epochs ('epoch')."""
  horizon: int  # T
  warmup: int  # W
  step_size: int  # S
  half_cycle: int  # H


# The epoch lengths each schedule reads (with schedule_unit 'epoch' they must be whole numbers).
_LENGTHS_READ = {'cosine': ('schedule_epochs',), 'linear': ('schedule_epochs',), 'step': ('step_epochs',),
                 'cyclic': ('cyclic_half_epochs',), 'warmup_cosine': ('schedule_epochs', 'warmup_epochs')}
_MIN_LENGTH = {'schedule_epochs': 1, 'warmup_epochs': 0, 'step_epochs': 1, 'cyclic_half_epochs': 1}


def _steps(name: str, epochs: float, steps_per_epoch: int, minimum: int) -> int:
  steps = int(math.floor(epochs * steps_per_epoch + 0.5))
  if steps < minimum:
    raise ValueError(f'{name}: {epochs} epochs of {steps_per_epoch} steps is {steps} steps; '
                     f'needs at least {minimum}')
  return steps


def schedule_steps(cfg: OptimizerConfig, steps_per_epoch: int, max_epochs: int) -> ScheduleSteps:
  """The epoch-based lengths of `cfg` in the schedule's units: steps (round half up) for schedule_unit
  'step', epochs for 'epoch' (where the lengths the schedule reads must be whole numbers). ValueError
  naming a field that is too short or, per epoch, fractional."""
  cfg.validate()
  if steps_per_epoch < 1 or max_epochs < 1:
    raise ValueError(f'steps_per_epoch and max_epochs must be positive, got {steps_per_epoch}, {max_epochs}')
  epochs = {'schedule_epochs': max_epochs if cfg.schedule_epochs is None else cfg.schedule_epochs,
            'warmup_epochs': cfg.warmup_epochs, 'step_epochs': cfg.step_epochs,
            'cyclic_half_epochs': cfg.cyclic_half_epochs}
  if cfg.schedule_unit == 'step':
    n = {k: _steps(k, v, steps_per_epoch, _MIN_LENGTH[k]) for k, v in epochs.items()}
  else:
    read = _LENGTHS_READ.get(cfg.schedule, ())
    for k in read:
      if epochs[k] != int(epochs[k]):
        raise ValueError(f'{k}: {epochs[k]} is not a whole number of epochs, which schedule_unit=epoch needs '
                         '(the schedule moves once per epoch)')
    # Lengths the schedule does not read only need to be valid numbers.
    n = {k: _steps(k, v, 1, _MIN_LENGTH[k]) if k in read else max(_MIN_LENGTH[k], int(math.floor(v + 0.5)))
         for k, v in epochs.items()}
  horizon, warmup = n['schedule_epochs'], n['warmup_epochs']
  if cfg.schedule == 'warmup_cosine' and warmup >= horizon:
    raise ValueError(f'warmup_epochs: {warmup} warmup {cfg.schedule_unit}s leave no cosine within the '
                     f'{horizon}-{cfg.schedule_unit} horizon')
  return ScheduleSteps(horizon=horizon, warmup=warmup, step_size=n['step_epochs'], half_cycle=n['cyclic_half_epochs'])


def _cosine(t: jax.Array, length: int, m: float) -> jax.Array:
  # (1 + cos(πt/T))/2 = sin²(π(T - t)/(2T)): relatively accurate in float32 down to the last steps.
  u = jnp.clip(length - t, 0, length).astype(jnp.float32)
  s = jnp.sin(u * (math.pi / (2 * length)))
  return m + (1.0 - m) * (s * s)


def make_lr_factor(cfg: OptimizerConfig, steps_per_epoch: int,
                   max_epochs: int) -> Callable[[jax.Array], jax.Array] | None:
  """The schedule as a factor of lr, a jittable function of the optimiser step count; None for
  'constant'. Per epoch (schedule_unit 'epoch') the factor at step t is the schedule's at epoch
  t // steps_per_epoch, its lengths counted in epochs."""
  n = schedule_steps(cfg, steps_per_epoch, max_epochs)
  if cfg.schedule == 'constant':
    return None
  factor = _factor_of_position(cfg, n)
  if cfg.schedule_unit == 'epoch':
    return lambda count: factor(jnp.asarray(count) // steps_per_epoch)
  return factor


def _factor_of_position(cfg: OptimizerConfig, n: ScheduleSteps) -> Callable[[jax.Array], jax.Array]:
  """The factor as a function of the schedule's position t (steps or epochs, as n's lengths)."""
  m = float(cfg.min_lr_factor)
  if cfg.schedule == 'cosine':
    return lambda count: _cosine(jnp.asarray(count), n.horizon, m)
  if cfg.schedule == 'linear':
    def linear(count):
      t = jnp.clip(jnp.asarray(count), 0, n.horizon)
      return ((n.horizon - t).astype(jnp.float32) + m * t.astype(jnp.float32)) / n.horizon
    return linear
  if cfg.schedule == 'torch_linear':  # LinearLR's closed form: s0 + (s1 - s0)·min(t, T)/T
    total, s0, s1 = cfg.torch_linear_total_iters, float(cfg.torch_linear_start_factor), float(
        cfg.torch_linear_end_factor)
    def torch_linear(count):
      t = jnp.clip(jnp.asarray(count), 0, total)
      return (s0 * (total - t).astype(jnp.float32) + s1 * t.astype(jnp.float32)) / total
    return torch_linear
  if cfg.schedule == 'step':
    gamma = float(cfg.gamma)
    return lambda count: jnp.power(jnp.float32(gamma), (jnp.asarray(count) // n.step_size).astype(jnp.float32))
  if cfg.schedule == 'cyclic':
    h = n.half_cycle
    def cyclic(count):
      p = jnp.asarray(count) % (2 * h)
      up = jnp.where(p <= h, p, 2 * h - p).astype(jnp.float32) / h
      return m + (1.0 - m) * up
    return cyclic
  if cfg.schedule == 'warmup_cosine':
    w, s = n.warmup, float(cfg.warmup_start_factor)
    def warmup_cosine(count):
      t = jnp.asarray(count)
      warm = (s * (w - t).astype(jnp.float32) + t.astype(jnp.float32)) / max(w, 1)
      return jnp.where(t < w, warm, _cosine(t - w, n.horizon - w, m))
    return warmup_cosine
  raise AssertionError(cfg.schedule)  # validate() rejects the rest


def make_schedule(cfg: OptimizerConfig, steps_per_epoch: int, max_epochs: int) -> optax.Schedule:
  """lr at optimiser step t (t = 0 for the first update), counted in steps."""
  factor = make_lr_factor(cfg, steps_per_epoch, max_epochs)
  if factor is None:
    return optax.constant_schedule(cfg.lr)
  lr = jnp.float32(cfg.lr)
  return lambda count: lr * factor(count)


# -- optimisers -----------------------------------------------------------------------------------

def _chain(kind: str, nesterov: bool, asgd: tuple[float, float, float], learning_rate, momentum, weight_decay,
           lr_factor) -> optax.GradientTransformation:
  """The torch-form chain; None for a term that is absent (see the module docstring). `asgd`: its
  (lambd, alpha, t0)."""
  coupled = [optax.add_decayed_weights(weight_decay)] if weight_decay is not None and kind != 'adamw' else []
  step = learning_rate if lr_factor is None else learning_rate * lr_factor
  if kind == 'asgd':  # its step size η is a function of lr and the step count: it scales by -η itself
    return optax.chain(*coupled, torch_asgd(step, *asgd))
  if kind == 'sgd':
    core = []
  elif kind == 'momentum':
    core = [optax.trace(decay=momentum, nesterov=nesterov)]  # torch's buffer: μ·buf + g, first buf = g
  elif kind in ('adam', 'adamw'):
    core = [scale_by_torch_adam()]
    if kind == 'adamw' and weight_decay is not None:  # θ - lr·(adam + wd·θ) = θ·(1 - lr·wd) - lr·adam
      core.append(optax.add_decayed_weights(weight_decay))
  elif kind == 'rmsprop':
    core = [optax.scale_by_rms(decay=RMSPROP_ALPHA, eps=RMSPROP_EPS, initial_scale=0.0, eps_in_sqrt=False)]
    if momentum is not None:
      core.append(optax.trace(decay=momentum))  # torch: buf = μ·buf + g/avg
  elif kind == 'adagrad':
    core = [scale_by_torch_adagrad()]
  elif kind == 'adadelta':  # optax's formula is torch's: sqrt(E[Δ²] + eps) / sqrt(E[g²] + eps) · g
    core = [optax.scale_by_adadelta(rho=ADADELTA_RHO, eps=ADADELTA_EPS)]
  else:
    raise AssertionError(kind)
  return optax.chain(*coupled, *core, optax.scale(-step))


def make_optimizer(cfg: OptimizerConfig, steps_per_epoch: int, max_epochs: int) -> optax.GradientTransformation:
  """The optimiser of `cfg` with its schedule, hyperparameters injected into the state (see the docstring)."""
  factor = make_lr_factor(cfg, steps_per_epoch, max_epochs)  # validates
  kind, nesterov = cfg.optimizer, cfg.nesterov
  asgd = (float(cfg.asgd_lambd), float(cfg.asgd_alpha), float(cfg.asgd_t0))
  momentum = cfg.resolved_momentum
  has_momentum = kind == 'momentum' or (kind == 'rmsprop' and momentum > 0)

  # inject_hyperparams binds these names: numbers become state arrays, callables schedules, None stays None.
  def factory(learning_rate, momentum=None, weight_decay=None, lr_factor=None):
    return _chain(kind, nesterov, asgd, learning_rate, momentum, weight_decay, lr_factor)

  hyper: dict[str, Any] = {'learning_rate': float(cfg.lr)}
  if has_momentum:
    hyper['momentum'] = float(momentum)
  if cfg.weight_decay > 0:
    hyper['weight_decay'] = float(cfg.weight_decay)
  if factor is not None:
    hyper['lr_factor'] = factor
  return optax.inject_hyperparams(factory)(**hyper)


SETTABLE = ('learning_rate', 'momentum', 'weight_decay')


def with_hyperparams(opt_state, **values) -> Any:
  """`opt_state` (from make_optimizer's init, possibly with a leading lane axis) with new values for
  'learning_rate', 'momentum' or 'weight_decay', each a scalar or one value per lane. A name the
  optimiser does not have (e.g. momentum for Adam, weight_decay when the config's was 0) is a ValueError."""
  hyper = dict(opt_state.hyperparams)
  for name, value in values.items():
    if name not in SETTABLE or name not in hyper:
      have = [k for k in SETTABLE if k in hyper]
      raise ValueError(f'{name}: not a settable hyperparameter of this optimiser (it has {", ".join(have)})')
    old = hyper[name]
    new = jnp.asarray(value, old.dtype)
    hyper[name] = jnp.broadcast_to(new, old.shape) if new.ndim < old.ndim else new
  return opt_state._replace(hyperparams=hyper)
