"""Optimisers and learning-rate schedules in torch.optim's exact form, built from optax.

DropNet trains with plain SGD (the paper's setting, and `OptimizerConfig()`'s default, whose updates
are `optax.sgd(lr)`'s bit for bit, so existing results do not move). For the other studies the
config also offers SGD with (Nesterov) momentum, Adam, AdamW, RMSprop, Adagrad and Adadelta and six
schedules, each defined as its torch.optim / torch.optim.lr_scheduler counterpart so that a run here
and one with the PyTorch twin follow the same trajectory (tested in tests/optim_test.py):

  optimizer   torch counterpart (all other arguments at torch's defaults)
  'sgd'       SGD(lr, weight_decay)
  'momentum'  SGD(lr, momentum, nesterov, weight_decay)           momentum defaults to 0.9
  'adam'      Adam(lr, weight_decay)                              betas (0.9, 0.999), eps 1e-8 (see below)
  'adamw'     AdamW(lr, weight_decay)                             decoupled decay (torch's default is 1e-2, ours 0)
  'rmsprop'   RMSprop(lr, momentum, weight_decay)                 alpha 0.99, eps 1e-8 outside the sqrt, momentum 0
  'adagrad'   Adagrad(lr, weight_decay)                           eps 1e-10 outside the sqrt, accumulator from 0
  'adadelta'  Adadelta(lr, weight_decay)                          rho 0.9, eps 1e-6 (torch's default lr is 1.0)

optax's own pieces are used where their arithmetic is torch's (trace, scale_by_rms with eps outside
the sqrt, scale_by_adadelta, add_decayed_weights). Two are rewritten here: Adagrad (optax.scale_by_rss
puts eps inside the sqrt and starts its accumulator at 0.1) and Adam's bias corrections (optax
computes 1 - 0.999^t in float32 with ~1e-5 relative error at the first steps; torch in float64).

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

with T = schedule_epochs (default max_epochs), m = min_lr_factor, S = step_epochs, γ = gamma,
H = cyclic_half_epochs, W = warmup_epochs, s = warmup_start_factor, all in steps. Past T the cosine
schedules stay at m·lr (torch's CosineAnnealingLR would rise again; with the default T = max_epochs
training never gets there). The factors are computed in float32 in forms that keep their relative
error ~1e-7 even where they approach 0 (sin² instead of 1 + cos, integer step differences).

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

OPTIMIZERS = ('sgd', 'momentum', 'adam', 'adamw', 'rmsprop', 'adagrad', 'adadelta')
SCHEDULES = ('constant', 'cosine', 'linear', 'step', 'cyclic', 'warmup_cosine')

# torch.optim's defaults for the constants that are not config fields.
ADAM_B1, ADAM_B2, ADAM_EPS = 0.9, 0.999, 1e-8
RMSPROP_ALPHA, RMSPROP_EPS = 0.99, 1e-8
ADAGRAD_EPS = 1e-10
ADADELTA_RHO, ADADELTA_EPS = 0.9, 1e-6
DEFAULT_MOMENTUM = {'momentum': 0.9, 'rmsprop': 0.0}  # the optimisers that take a momentum


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Optimiser and learning-rate schedule of a training run (see the module docstring)."""
  optimizer: str = setting('sgd', "sgd (the paper's), momentum, adam, adamw, rmsprop, adagrad or adadelta, "
                           "with torch.optim's formulas and defaults.", flag='optimizer', choices=OPTIMIZERS)
  lr: float = setting(0.1, "Peak / initial learning rate (torch's default for adadelta is 1.0).", flag='lr')
  momentum: float | None = setting(None, 'momentum: heavy-ball coefficient (default 0.9); rmsprop: momentum '
                                   '(default 0); not accepted by the other optimisers.', flag='momentum')
  nesterov: bool = setting(False, 'Nesterov momentum (optimizer=momentum).', flag='nesterov')
  weight_decay: float = setting(0.0, "L2 coupled into the gradient, as torch's weight_decay; decoupled for adamw.",
                                flag='weight_decay')
  schedule: str = setting('constant', 'Learning-rate schedule, counted in optimiser steps.', flag='lr_schedule',
                          choices=SCHEDULES)
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
  """The schedule's lengths in optimiser steps."""
  horizon: int  # T
  warmup: int  # W
  step_size: int  # S
  half_cycle: int  # H


def _steps(name: str, epochs: float, steps_per_epoch: int, minimum: int) -> int:
  steps = int(math.floor(epochs * steps_per_epoch + 0.5))
  if steps < minimum:
    raise ValueError(f'{name}: {epochs} epochs of {steps_per_epoch} steps is {steps} steps; '
                     f'needs at least {minimum}')
  return steps


def schedule_steps(cfg: OptimizerConfig, steps_per_epoch: int, max_epochs: int) -> ScheduleSteps:
  """The epoch-based lengths of `cfg` in steps (round half up); ValueError naming a field that is too short."""
  cfg.validate()
  if steps_per_epoch < 1 or max_epochs < 1:
    raise ValueError(f'steps_per_epoch and max_epochs must be positive, got {steps_per_epoch}, {max_epochs}')
  horizon_epochs = max_epochs if cfg.schedule_epochs is None else cfg.schedule_epochs
  horizon = _steps('schedule_epochs', horizon_epochs, steps_per_epoch, 1)
  warmup = _steps('warmup_epochs', cfg.warmup_epochs, steps_per_epoch, 0)
  if cfg.schedule == 'warmup_cosine' and warmup >= horizon:
    raise ValueError(f'warmup_epochs: {warmup} warmup steps leave no cosine within the {horizon}-step horizon')
  return ScheduleSteps(horizon=horizon, warmup=warmup,
                       step_size=_steps('step_epochs', cfg.step_epochs, steps_per_epoch, 1),
                       half_cycle=_steps('cyclic_half_epochs', cfg.cyclic_half_epochs, steps_per_epoch, 1))


def _cosine(t: jax.Array, length: int, m: float) -> jax.Array:
  # (1 + cos(πt/T))/2 = sin²(π(T - t)/(2T)): relatively accurate in float32 down to the last steps.
  u = jnp.clip(length - t, 0, length).astype(jnp.float32)
  s = jnp.sin(u * (math.pi / (2 * length)))
  return m + (1.0 - m) * (s * s)


def make_lr_factor(cfg: OptimizerConfig, steps_per_epoch: int,
                   max_epochs: int) -> Callable[[jax.Array], jax.Array] | None:
  """The schedule as a factor of lr, a jittable function of the step count; None for 'constant'."""
  n = schedule_steps(cfg, steps_per_epoch, max_epochs)
  m = float(cfg.min_lr_factor)
  if cfg.schedule == 'constant':
    return None
  if cfg.schedule == 'cosine':
    return lambda count: _cosine(jnp.asarray(count), n.horizon, m)
  if cfg.schedule == 'linear':
    def linear(count):
      t = jnp.clip(jnp.asarray(count), 0, n.horizon)
      return ((n.horizon - t).astype(jnp.float32) + m * t.astype(jnp.float32)) / n.horizon
    return linear
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

class ScaleByTorchAdamState(NamedTuple):
  count: jax.Array  # int32 steps taken
  mu: optax.Updates
  nu: optax.Updates


def _one_minus_power(b: float, t: jax.Array) -> jax.Array:
  """1 - b^t in float32 without cancellation (-expm1(t·log b)): optax's `1 - b**t` is off by ~1e-5
  relative at t = 1 for b = 0.999 (0.999 is not a float32), which torch, computing it in float64, is not."""
  return -jnp.expm1(t.astype(jnp.float32) * jnp.float32(math.log(b)))


def scale_by_torch_adam(b1: float = ADAM_B1, b2: float = ADAM_B2,
                        eps: float = ADAM_EPS) -> optax.GradientTransformation:
  """torch.optim.Adam's direction: (m / (1 - b1^t)) / (sqrt(v) / sqrt(1 - b2^t) + eps), with the bias
  corrections accurate to float32 rounding (see _one_minus_power); otherwise optax.scale_by_adam."""

  def init_fn(params):
    zeros = jax.tree.map(jnp.zeros_like, params)
    return ScaleByTorchAdamState(jnp.zeros([], jnp.int32), zeros, zeros)

  def update_fn(updates, state, params=None):
    del params
    mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
    nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * (g * g), state.nu, updates)
    count = optax.safe_int32_increment(state.count)
    bc1, sqrt_bc2 = _one_minus_power(b1, count), jnp.sqrt(_one_minus_power(b2, count))
    updates = jax.tree.map(lambda m, v: (m / bc1.astype(m.dtype)) / (jnp.sqrt(v) / sqrt_bc2.astype(v.dtype) + eps),
                           mu, nu)
    return updates, ScaleByTorchAdamState(count, mu, nu)

  return optax.GradientTransformation(init_fn, update_fn)


class ScaleByTorchAdagradState(NamedTuple):
  sum_of_squares: optax.Updates


def scale_by_torch_adagrad(eps: float = ADAGRAD_EPS,
                           initial_accumulator_value: float = 0.0) -> optax.GradientTransformation:
  """torch.optim.Adagrad's scaling: g / (sqrt(Σg²) + eps). (optax.scale_by_rss puts eps inside the sqrt.)"""

  def init_fn(params):
    return ScaleByTorchAdagradState(jax.tree.map(lambda p: jnp.full_like(p, initial_accumulator_value), params))

  def update_fn(updates, state, params=None):
    del params
    sums = jax.tree.map(lambda a, g: a + g * g, state.sum_of_squares, updates)
    updates = jax.tree.map(lambda g, a: g / (jnp.sqrt(a) + eps), updates, sums)
    return updates, ScaleByTorchAdagradState(sums)

  return optax.GradientTransformation(init_fn, update_fn)


def _chain(kind: str, nesterov: bool, learning_rate, momentum, weight_decay,
           lr_factor) -> optax.GradientTransformation:
  """The torch-form chain; None for a term that is absent (see the module docstring)."""
  coupled = [optax.add_decayed_weights(weight_decay)] if weight_decay is not None and kind != 'adamw' else []
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
  step = learning_rate if lr_factor is None else learning_rate * lr_factor
  return optax.chain(*coupled, *core, optax.scale(-step))


def make_optimizer(cfg: OptimizerConfig, steps_per_epoch: int, max_epochs: int) -> optax.GradientTransformation:
  """The optimiser of `cfg` with its schedule, hyperparameters injected into the state (see the docstring)."""
  factor = make_lr_factor(cfg, steps_per_epoch, max_epochs)  # validates
  kind, nesterov = cfg.optimizer, cfg.nesterov
  momentum = cfg.resolved_momentum
  has_momentum = kind == 'momentum' or (kind == 'rmsprop' and momentum > 0)

  # inject_hyperparams binds these names: numbers become state arrays, callables schedules, None stays None.
  def factory(learning_rate, momentum=None, weight_decay=None, lr_factor=None):
    return _chain(kind, nesterov, learning_rate, momentum, weight_decay, lr_factor)

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
