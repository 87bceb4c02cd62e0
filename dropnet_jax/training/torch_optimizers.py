"""The optimiser transforms whose arithmetic optax does not have in torch.optim's form: Adam's bias
corrections, Adagrad's accumulator and ASGD. `dropnet_jax.training.optim` chains them with optax's
own pieces (weight decay, momentum, the final -lr scale) into the configured optimiser.

Why each is written here rather than taken from optax:
  * Adam: optax computes the bias correction 1 - 0.999^t in float32 with ~1e-5 relative error at the
    first steps; torch computes it in float64 (see `_one_minus_power`).
  * Adagrad: optax.scale_by_rss puts eps inside the sqrt and starts its accumulator at 0.1; torch
    divides by sqrt(Σg²) + eps with the accumulator from 0.
  * ASGD: optax has no averaged SGD. `torch_asgd` is torch.optim.ASGD's single-tensor update (the
    path torch takes on CPU), state and defaults included:

      t ← t + 1                              (step count; t = 1 at the first update)
      g ← g + weight_decay·θ                 (coupled, added before this transform by the chain)
      θ ← θ·(1 - λ·η) - η·g                  (η: the step size stored by the previous update)
      ax ← θ if μ = 1 else ax + μ·(θ - ax)   (the running average, from t0 on)
      η ← lr / (1 + λ·lr·t)^α,  μ ← 1 / max(1, t - t0)

    with λ = lambd (1e-4), α = alpha (0.75), t0 (1e6) at torch's defaults, η = lr and μ = 1 before the
    first update. The η an update uses was computed from the *previous* update's lr (torch stores it
    in the state), so under a schedule ASGD's step lags the schedule by one update, exactly as with a
    torch scheduler; the first update uses the lr in force then. That lr is read at the first update,
    not at init, so `optim.with_hyperparams` may set it after init (per-lane learning rates).

    What is evaluated and saved: the model's θ, as in torch, where ASGD's `ax` lives only in
    optimizer.state and the forward pass uses the parameters. `ax` is kept in the optimiser state (so
    a resumed run continues it exactly, and `asgd_averaged_params` reads it, e.g. to evaluate the
    Polyak average by hand); it costs one more copy of θ. With torch's default t0 = 1e6 averaging
    starts after a million updates, so ax is simply θ in runs of ordinary length.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

# torch.optim's defaults.
ADAM_B1, ADAM_B2, ADAM_EPS = 0.9, 0.999, 1e-8
ADAGRAD_EPS = 1e-10
ASGD_LAMBD, ASGD_ALPHA, ASGD_T0 = 1e-4, 0.75, 1e6


# -- Adam -----------------------------------------------------------------------------------------

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


# -- Adagrad --------------------------------------------------------------------------------------

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


# -- ASGD -----------------------------------------------------------------------------------------

class TorchASGDState(NamedTuple):
  """torch.optim.ASGD's per-parameter state, shared by all parameters (torch's values are equal
  across parameters: they depend only on the step count and the lr)."""
  count: jax.Array  # int32: updates taken (torch's 'step')
  eta: jax.Array  # float32: the step size of the next update (torch's 'eta'; read only after the first)
  mu: jax.Array  # float32: the averaging weight of the next update (torch's 'mu')
  ax: optax.Params  # the averaged parameters (torch's 'ax')


def torch_asgd(learning_rate: Any, lambd: float = ASGD_LAMBD, alpha: float = ASGD_ALPHA,
               t0: float = ASGD_T0) -> optax.GradientTransformation:
  """torch.optim.ASGD's update (see the module docstring) given the gradient with any coupled weight
  decay already added: returns the full update -η·(g + λ·θ), so no -lr scale follows it in a chain.
  `learning_rate` is the lr in force for this update (a number or a traced scalar: `optim` builds the
  transform anew each update inside optax.inject_hyperparams, with the scheduled lr). Needs params."""
  lambd, alpha, t0 = float(lambd), float(alpha), float(t0)

  def init_fn(params):
    return TorchASGDState(count=jnp.zeros([], jnp.int32), eta=jnp.zeros([], jnp.float32),
                          mu=jnp.ones([], jnp.float32), ax=jax.tree.map(jnp.zeros_like, params))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError('torch_asgd: update needs params (its decay term and average use θ)')
    lr = jnp.asarray(learning_rate, jnp.float32)
    eta = jnp.where(state.count == 0, lr, state.eta)  # torch: η = the group's lr when the state is created
    updates = jax.tree.map(lambda g, p: -eta.astype(p.dtype) * (g + lambd * p), updates, params)
    new_params = optax.apply_updates(params, updates)  # what the caller's apply_updates will give
    mu = state.mu
    ax = jax.tree.map(lambda a, p: jnp.where(mu == 1, p, a + mu.astype(p.dtype) * (p - a)), state.ax, new_params)
    count = optax.safe_int32_increment(state.count)
    t = count.astype(jnp.float32)
    # lr / (1 + λ·lr·t)^α, with log1p keeping the small λ·lr·t's digits.
    new_eta = lr * jnp.exp(-alpha * jnp.log1p(lambd * lr * t))
    new_mu = 1.0 / jnp.maximum(jnp.float32(1.0), t - jnp.float32(t0))
    return updates, TorchASGDState(count=count, eta=new_eta, mu=new_mu.astype(jnp.float32), ax=ax)

  return optax.GradientTransformation(init_fn, update_fn)


def asgd_averaged_params(opt_state: Any) -> optax.Params:
  """ASGD's averaged parameters `ax` (torch's optimizer.state[p]['ax']) from an optimiser state that
  holds a `torch_asgd` (e.g. `optim.make_optimizer`'s for optimizer='asgd'); ValueError if none."""
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, TorchASGDState))
           if isinstance(s, TorchASGDState)]
  if len(found) != 1:
    raise ValueError(f'asgd_averaged_params: expected one ASGD state in the optimiser state, found {len(found)}')
  return found[0].ax
