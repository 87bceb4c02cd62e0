"""dropnet_jax.training.optim against torch.optim: every schedule equals its torch.optim.lr_scheduler
counterpart on a step grid, and every optimiser trains the Model A twin along torch.optim's
trajectory for 60 steps (same θ0, masks and batches). Plus: the default is optax.sgd bit for bit,
per-lane hyperparameters under vmap equal separate runs, and validate() names the bad field.
ASGD's state and the per-epoch schedules are tested in optim_asgd_epoch_test.py with the torch side
defined here (torch_scheduler, torch_lrs with per_epoch, torch_optimizer, torch_train).

The torch side is built here from the torch API and the config's documented meaning (epochs x
steps per epoch, rounded half up), not from dropnet_jax.training.optim's step arithmetic.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip('torch')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dropnet_jax import models  # noqa: E402
from dropnet_jax.training.optim import OptimizerConfig, make_optimizer, make_schedule, with_hyperparams  # noqa: E402
from dropnet_jax.training.torch_optimizers import asgd_averaged_params  # noqa: E402
from tests.torch_reference import models as tmodels  # noqa: E402
from tests.torch_reference.weights import load_flax_params, to_flax_params  # noqa: E402

IMAGE_SHAPE = (8, 8, 1)
WIDTHS = (16, 16)
STEPS = 60
BATCH = 16


# Torch on one thread (conftest.one_torch_thread).
pytestmark = pytest.mark.usefixtures('one_torch_thread')


def steps(epochs: float, steps_per_epoch: int) -> int:
  return int(math.floor(epochs * steps_per_epoch + 0.5))


# -- schedules ----------------------------------------------------------------------------------------

def torch_scheduler(cfg: OptimizerConfig, opt, spe: int, max_epochs: int):
  lr, m = cfg.lr, cfg.min_lr_factor
  sched = torch.optim.lr_scheduler
  horizon = steps(max_epochs if cfg.schedule_epochs is None else cfg.schedule_epochs, spe)
  if cfg.schedule == 'constant':
    return sched.LambdaLR(opt, lambda t: 1.0)
  if cfg.schedule == 'cosine':
    return sched.CosineAnnealingLR(opt, T_max=horizon, eta_min=m * lr)
  if cfg.schedule == 'linear':
    return sched.LinearLR(opt, start_factor=1.0, end_factor=m, total_iters=horizon)
  if cfg.schedule == 'step':
    return sched.StepLR(opt, step_size=steps(cfg.step_epochs, spe), gamma=cfg.gamma)
  if cfg.schedule == 'cyclic':
    return sched.CyclicLR(opt, base_lr=m * lr, max_lr=lr, step_size_up=steps(cfg.cyclic_half_epochs, spe),
                          mode='triangular', cycle_momentum=False)
  if cfg.schedule == 'torch_linear':  # total_iters counts scheduler steps, whatever their unit
    return sched.LinearLR(opt, start_factor=cfg.torch_linear_start_factor, end_factor=cfg.torch_linear_end_factor,
                          total_iters=cfg.torch_linear_total_iters)
  if cfg.schedule == 'warmup_cosine':
    w = steps(cfg.warmup_epochs, spe)
    cosine = sched.CosineAnnealingLR(opt, T_max=horizon - w, eta_min=m * lr)
    if cfg.warmup_start_factor > 0:
      warm = sched.LinearLR(opt, start_factor=cfg.warmup_start_factor, end_factor=1.0, total_iters=w)
    else:  # LinearLR refuses a start factor of 0: the warmup line by hand
      warm = sched.LambdaLR(opt, lambda t: t / w)
    return sched.SequentialLR(opt, [warm, cosine], milestones=[w])
  raise AssertionError(cfg.schedule)


def torch_lrs(cfg: OptimizerConfig, spe: int, max_epochs: int, n: int, per_epoch: bool = False) -> np.ndarray:
  """The lr torch uses at steps 0..n-1 (optimizer.step, then scheduler.step, as torch prescribes):
  scheduler.step() after every step, or with `per_epoch` after every spe-th (its lengths in epochs)."""
  p = torch.nn.Parameter(torch.zeros(1))
  opt = torch.optim.SGD([p], lr=cfg.lr)
  sch = torch_scheduler(cfg, opt, 1 if per_epoch else spe, max_epochs)
  out = []
  for i in range(n):
    out.append(opt.param_groups[0]['lr'])
    p.grad = torch.zeros(1)
    opt.step()
    if not per_epoch or (i + 1) % spe == 0:
      sch.step()
  return np.array(out, np.float64)


SCHEDULE_CASES = [
    OptimizerConfig(schedule='constant', lr=0.3),
    OptimizerConfig(schedule='cosine'),
    OptimizerConfig(schedule='cosine', lr=0.05, schedule_epochs=6.5, min_lr_factor=0.1),
    OptimizerConfig(schedule='linear', lr=0.2),
    OptimizerConfig(schedule='linear', schedule_epochs=4, min_lr_factor=0.25),
    OptimizerConfig(schedule='step', step_epochs=3, gamma=0.5),
    OptimizerConfig(schedule='step', step_epochs=1.5, gamma=0.1, lr=1.0),
    OptimizerConfig(schedule='cyclic', cyclic_half_epochs=1.5, min_lr_factor=0.1),
    OptimizerConfig(schedule='cyclic', cyclic_half_epochs=0.5, lr=0.01),
    OptimizerConfig(schedule='warmup_cosine', warmup_epochs=2, warmup_start_factor=0.1, min_lr_factor=0.05),
    OptimizerConfig(schedule='warmup_cosine', warmup_epochs=1.5, schedule_epochs=8),
    OptimizerConfig(schedule='torch_linear'),  # torch's LinearLR() defaults: 1/3 -> 1 over 5 steps
    OptimizerConfig(schedule='torch_linear', lr=0.2, torch_linear_start_factor=0.5, torch_linear_end_factor=0.1,
                    torch_linear_total_iters=40),
]


@pytest.mark.parametrize('cfg', SCHEDULE_CASES, ids=lambda c: f'{c.schedule}')
def test_schedule_matches_torch(cfg):
  spe, max_epochs = 7, 10
  n = spe * max_epochs  # all of training
  if cfg.schedule in ('cosine', 'warmup_cosine') and cfg.schedule_epochs is not None:
    n = min(n, steps(cfg.schedule_epochs, spe) + 1)  # torch's cosine rises again past T_max; ours stays (below)
  expected = torch_lrs(cfg, spe, max_epochs, n)
  got = np.asarray(jax.jit(jax.vmap(make_schedule(cfg, spe, max_epochs)))(jnp.arange(n)), np.float64)
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-12)
  assert np.ptp(expected) > 0 or cfg.schedule == 'constant'  # the grid does see the schedule move


@pytest.mark.parametrize('schedule', ['cosine', 'linear', 'warmup_cosine'])
def test_schedule_stays_at_floor_after_horizon(schedule):
  cfg = OptimizerConfig(schedule=schedule, lr=0.5, schedule_epochs=3, warmup_epochs=1, min_lr_factor=0.2)
  lr = make_schedule(cfg, 4, 10)
  np.testing.assert_allclose(np.asarray(jax.vmap(lr)(jnp.arange(12, 40))), 0.1, rtol=1e-6)
  assert float(lr(11)) > 0.1


# -- optimisers against torch.optim on the Model A twin --------------------------------------------------

@pytest.fixture(scope='module')
def setup():
  """θ0 (Flax init), fixed masks with dropped units, and STEPS batches of random uint8 images."""
  model = models.create_model('fc', WIDTHS, 10)
  params = models.init_params(model, jax.random.key(3), IMAGE_SHAPE)
  rng = np.random.default_rng(0)
  masks = tuple((rng.random(w) > 0.25).astype(np.float32) for w in WIDTHS)
  xs = rng.integers(0, 256, (STEPS, BATCH, *IMAGE_SHAPE), dtype=np.uint8)
  ys = rng.integers(0, 10, (STEPS, BATCH)).astype(np.int32)
  return model, jax.tree.map(np.asarray, params), masks, xs, ys


def jax_train(model, params, masks, xs, ys, tx, hyper=None):
  """STEPS updates of `tx` on the mean softmax cross-entropy, scanned in one program."""
  masks = tuple(jnp.asarray(m) for m in masks)

  def loss(p, x, y):
    logits, _ = model.apply({'params': p}, x, masks)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def run(params, xs, ys, hyper):
    state = tx.init(params)
    if hyper:
      state = with_hyperparams(state, **hyper)

    def body(carry, batch):
      p, s = carry
      g = jax.grad(loss)(p, *batch)
      u, s = tx.update(g, s, p)
      return (optax.apply_updates(p, u), s), None

    (p, _), _ = jax.lax.scan(body, (params, state), (xs, ys))
    return p

  return run, (params, jnp.asarray(xs), jnp.asarray(ys), hyper or {})


def torch_optimizer(cfg: OptimizerConfig, params):
  o, wd = torch.optim, cfg.weight_decay
  if cfg.optimizer == 'sgd':
    return o.SGD(params, lr=cfg.lr, weight_decay=wd)
  if cfg.optimizer == 'momentum':
    return o.SGD(params, lr=cfg.lr, momentum=0.9 if cfg.momentum is None else cfg.momentum,
                 nesterov=cfg.nesterov, weight_decay=wd)
  if cfg.optimizer == 'adam':
    return o.Adam(params, lr=cfg.lr, weight_decay=wd)
  if cfg.optimizer == 'adamw':
    return o.AdamW(params, lr=cfg.lr, weight_decay=wd)
  if cfg.optimizer == 'rmsprop':
    return o.RMSprop(params, lr=cfg.lr, momentum=cfg.momentum or 0.0, weight_decay=wd)
  if cfg.optimizer == 'adagrad':
    return o.Adagrad(params, lr=cfg.lr, weight_decay=wd)
  if cfg.optimizer == 'adadelta':
    return o.Adadelta(params, lr=cfg.lr, weight_decay=wd)
  if cfg.optimizer == 'asgd':
    return o.ASGD(params, lr=cfg.lr, lambd=cfg.asgd_lambd, alpha=cfg.asgd_alpha, t0=cfg.asgd_t0, weight_decay=wd)
  raise AssertionError(cfg.optimizer)


def torch_train(cfg, params, masks, xs, ys, spe, max_epochs):
  net = load_flax_params(tmodels.create_model('fc', WIDTHS, 10, IMAGE_SHAPE), params)
  opt = torch_optimizer(cfg, net.parameters())
  per_epoch = cfg.schedule_unit == 'epoch'  # scheduler.step() after each epoch, its lengths in epochs
  sch = torch_scheduler(cfg, opt, 1 if per_epoch else spe, max_epochs)
  tmasks = tuple(torch.from_numpy(m) for m in masks)
  for i, (x, y) in enumerate(zip(xs, ys)):
    opt.zero_grad()
    logits, _ = net(torch.from_numpy(x), tmasks, with_stats=False)
    F.cross_entropy(logits, torch.from_numpy(y).long()).backward()
    opt.step()
    if not per_epoch or (i + 1) % spe == 0:
      sch.step()
  return to_flax_params(net)


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


OPTIMIZER_CASES = [
    OptimizerConfig(optimizer='sgd', lr=0.1),
    OptimizerConfig(optimizer='sgd', lr=0.1, weight_decay=0.05),
    OptimizerConfig(optimizer='momentum', lr=0.05),
    OptimizerConfig(optimizer='momentum', lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.01),
    OptimizerConfig(optimizer='adam', lr=0.003),
    OptimizerConfig(optimizer='adam', lr=0.003, weight_decay=0.05),
    OptimizerConfig(optimizer='adamw', lr=0.003, weight_decay=0.3),
    OptimizerConfig(optimizer='rmsprop', lr=0.001),
    OptimizerConfig(optimizer='rmsprop', lr=0.001, momentum=0.5, weight_decay=0.05),
    OptimizerConfig(optimizer='adagrad', lr=0.03),
    OptimizerConfig(optimizer='adagrad', lr=0.03, weight_decay=0.05),
    OptimizerConfig(optimizer='adadelta', lr=1.0),
    OptimizerConfig(optimizer='adadelta', lr=1.0, weight_decay=0.05),
    # A schedule inside the optimiser: the count it sees must be torch's scheduler position.
    OptimizerConfig(optimizer='momentum', lr=0.05, schedule='cosine'),
    OptimizerConfig(optimizer='adamw', lr=0.003, weight_decay=0.1, schedule='warmup_cosine', warmup_epochs=2,
                    warmup_start_factor=0.1),
    OptimizerConfig(optimizer='sgd', lr=0.1, schedule='cyclic', cyclic_half_epochs=1.5, min_lr_factor=0.2),
]


@pytest.mark.parametrize('cfg', OPTIMIZER_CASES,
                         ids=lambda c: f'{c.optimizer}-wd{c.weight_decay}-{c.schedule}{"-nesterov" * c.nesterov}'
                                       f'{"-per_epoch" * (c.schedule_unit == "epoch")}')
def test_optimizer_matches_torch(setup, cfg):
  check_trains_like_torch(setup, cfg)


def check_trains_like_torch(setup, cfg: OptimizerConfig) -> None:
  """STEPS updates of cfg's optimiser on the Model A twin give torch's θ to 1e-5 relative."""
  model, params, masks, xs, ys = setup
  spe, max_epochs = 6, 10  # 60 steps: the schedules' horizons are the whole run
  run, args = jax_train(model, params, masks, xs, ys, make_optimizer(cfg, spe, max_epochs))
  got = jax.jit(run)(*args)
  expected = torch_train(cfg, params, masks, xs, ys, spe, max_epochs)
  moved = max(rel_err(params[k]['kernel'], expected[k]['kernel']) for k in params)
  assert moved > 1e-3  # training did change θ (the comparison below is not of θ0 with itself)
  for layer in params:
    for name in ('kernel', 'bias'):
      err = rel_err(got[layer][name], expected[layer][name])
      assert err < 1e-5, f'{layer}/{name}: relative error {err:.2e}'


@pytest.mark.parametrize('cfg', [
    OptimizerConfig(optimizer='adam', lr=1e-3),
    OptimizerConfig(optimizer='adamw', lr=1e-3, weight_decay=0.01),
    OptimizerConfig(optimizer='rmsprop', lr=1e-3),
    OptimizerConfig(optimizer='adagrad', lr=1e-2),
], ids=lambda c: c.optimizer)
def test_first_steps_match_torch_closely(cfg):
  """The first updates on fixed gradients, to float32 rounding: finer than the training test, so it
  sees an eps moved inside a sqrt or Adam's bias corrections computed as optax does (1 - 0.999**t in
  float32 is ~1e-5 off at t = 1)."""
  rng = np.random.default_rng(5)
  p0 = (rng.normal(size=512) * 1e-3).astype(np.float32)  # small: θ - θ0 keeps the updates' digits
  grads = (rng.normal(size=(4, 512)) * np.exp(rng.uniform(-6, 0, (4, 512)))).astype(np.float32)
  p = torch.nn.Parameter(torch.from_numpy(p0.copy()))
  opt = torch_optimizer(cfg, [p])
  tx = make_optimizer(cfg, 10, 10)
  params = jnp.asarray(p0)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for g in grads:
    p.grad = torch.from_numpy(g.copy())
    opt.step()
    u, state = update(jnp.asarray(g), state, params)
    params = optax.apply_updates(params, u)
    assert rel_err(np.asarray(params) - p0, p.detach().numpy() - p0) < 1e-6


# -- the default is the paper's SGD, bit for bit ------------------------------------------------------

def test_default_is_optax_sgd_bit_for_bit(setup):
  model, params, masks, xs, ys = setup
  tx = make_optimizer(OptimizerConfig(lr=0.07), 6, 10)
  ref = optax.sgd(0.07)
  grads = jax.tree.map(lambda p: jnp.asarray(np.random.default_rng(1).normal(size=p.shape), jnp.float32), params)
  u, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  u_ref, _ = jax.jit(ref.update)(grads, ref.init(params), params)
  for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(u_ref)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  run, args = jax_train(model, params, masks, xs, ys, tx)
  run_ref, args_ref = jax_train(model, params, masks, xs, ys, ref)
  for a, b in zip(jax.tree.leaves(jax.jit(run)(*args)), jax.tree.leaves(jax.jit(run_ref)(*args_ref))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# -- per-lane hyperparameters ------------------------------------------------------------------------

def test_per_lane_hyperparameters_equal_separate_runs(setup):
  """Lanes of one vmapped run with their own lr/momentum/weight decay follow the runs whose configs
  hold those values (schedule included), and the optimiser state holds only arrays."""
  model, params, masks, xs, ys = setup
  xs, ys = xs[:20], ys[:20]
  base = dict(optimizer='momentum', schedule='cosine', nesterov=True)
  lanes = [dict(lr=0.05, momentum=0.9, weight_decay=0.01), dict(lr=0.02, momentum=0.5, weight_decay=0.1)]
  tx = make_optimizer(OptimizerConfig(**base, **lanes[0]), 2, 10)
  state = tx.init(params)
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(state))
  run, (p0, bx, by, _) = jax_train(model, params, masks, xs, ys, tx)
  hyper = {'learning_rate': jnp.array([l['lr'] for l in lanes]),
           'momentum': jnp.array([l['momentum'] for l in lanes]),
           'weight_decay': jnp.array([l['weight_decay'] for l in lanes])}
  batched = jax.jit(jax.vmap(run, in_axes=(None, None, None, 0)))(p0, bx, by, hyper)
  for i, lane in enumerate(lanes):
    one_tx = make_optimizer(OptimizerConfig(**base, **lane), 2, 10)
    one_run, one_args = jax_train(model, params, masks, xs, ys, one_tx)
    single = jax.jit(one_run)(*one_args)
    for a, b in zip(jax.tree.leaves(batched), jax.tree.leaves(single)):
      assert rel_err(np.asarray(a)[i], b) < 1e-6
  with pytest.raises(ValueError, match='momentum'):
    with_hyperparams(make_optimizer(OptimizerConfig(optimizer='adam'), 2, 10).init(params), momentum=0.9)


# -- validation ---------------------------------------------------------------------------------------

@pytest.mark.parametrize('field,kwargs', [
    ('optimizer', dict(optimizer='lion')),
    ('schedule', dict(schedule='exponential')),
    ('lr', dict(lr=0.0)),
    ('lr', dict(lr=float('nan'))),
    ('lr', dict(lr=float('inf'))),
    ('weight_decay', dict(weight_decay=-0.1)),
    ('momentum', dict(optimizer='momentum', momentum=1.0)),
    ('momentum', dict(optimizer='adam', momentum=0.9)),
    ('nesterov', dict(optimizer='sgd', nesterov=True)),
    ('nesterov', dict(optimizer='momentum', momentum=0.0, nesterov=True)),
    ('schedule_epochs', dict(schedule='cosine', schedule_epochs=0)),
    ('min_lr_factor', dict(min_lr_factor=1.5)),
    ('warmup_epochs', dict(warmup_epochs=-1)),
    ('warmup_epochs', dict(schedule='warmup_cosine', warmup_epochs=5, schedule_epochs=5)),
    ('warmup_start_factor', dict(warmup_start_factor=float('nan'))),
    ('step_epochs', dict(step_epochs=0)),
    ('gamma', dict(gamma=-0.5)),
    ('cyclic_half_epochs', dict(cyclic_half_epochs=float('inf'))),
    ('schedule_unit', dict(schedule_unit='batch')),
    ('asgd_lambd', dict(optimizer='asgd', asgd_lambd=-1e-4)),
    ('asgd_alpha', dict(optimizer='asgd', asgd_alpha=float('nan'))),
    ('asgd_t0', dict(optimizer='asgd', asgd_t0=-1.0)),
    ('torch_linear_start_factor', dict(schedule='torch_linear', torch_linear_start_factor=0.0)),
    ('torch_linear_start_factor', dict(schedule='torch_linear', torch_linear_start_factor=1.5)),
    ('torch_linear_end_factor', dict(schedule='torch_linear', torch_linear_end_factor=-0.1)),
    ('torch_linear_total_iters', dict(schedule='torch_linear', torch_linear_total_iters=0)),
    ('torch_linear_total_iters', dict(schedule='torch_linear', torch_linear_total_iters=2.5)),
])
def test_validate_names_the_field(field, kwargs):
  with pytest.raises(ValueError, match=f'^{field}:'):
    OptimizerConfig(**kwargs).validate()


def test_step_lengths_too_short_for_the_run():
  with pytest.raises(ValueError, match='^cyclic_half_epochs:'):
    make_schedule(OptimizerConfig(schedule='cyclic', cyclic_half_epochs=0.1), 4, 10)  # 0.4 steps
  with pytest.raises(ValueError, match='^warmup_epochs:'):  # the default horizon is max_epochs
    make_optimizer(OptimizerConfig(schedule='warmup_cosine', warmup_epochs=10), 4, 10)


def test_config_round_trips_through_dict():
  cfg = OptimizerConfig(optimizer='adamw', weight_decay=0.01, schedule='warmup_cosine', schedule_epochs=20.0)
  assert OptimizerConfig.from_dict(cfg.to_dict()) == cfg
  assert OptimizerConfig().validate() == OptimizerConfig()
