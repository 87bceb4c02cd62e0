"""ASGD and per-epoch schedules against torch (the optimiser and schedule pieces of the CIFAR
recipes): torch.optim.ASGD's θ, average ax, η and μ update by update; every schedule with
schedule_unit='epoch' against its torch.optim.lr_scheduler counterpart stepped once per epoch; the
Trainer's epochs moving a per-epoch schedule; and training the Model A twin with ASGD or a per-epoch
schedule along torch's trajectory. The torch side and the Model A setup are tests/optim_test.py's.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip('torch')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from dropnet_jax import models  # noqa: E402
from dropnet_jax.training.optim import OptimizerConfig, make_optimizer, make_schedule, with_hyperparams  # noqa: E402
from dropnet_jax.training.torch_optimizers import asgd_averaged_params  # noqa: E402
from tests.optim_test import (check_trains_like_torch, rel_err, setup, torch_lrs, torch_optimizer,  # noqa: E402,F401
                              torch_scheduler)

# Torch on one thread (conftest.one_torch_thread).
pytestmark = pytest.mark.usefixtures('one_torch_thread')


# -- per-epoch schedules ------------------------------------------------------------------------------

# Lengths in whole epochs, as torch's schedulers stepped once per epoch take them.
EPOCH_SCHEDULE_CASES = [
    OptimizerConfig(schedule='constant', lr=0.3),
    OptimizerConfig(schedule='cosine'),
    OptimizerConfig(schedule='cosine', lr=0.05, schedule_epochs=6, min_lr_factor=0.1),
    OptimizerConfig(schedule='linear', lr=0.2),
    OptimizerConfig(schedule='linear', schedule_epochs=4, min_lr_factor=0.25),
    OptimizerConfig(schedule='step', step_epochs=3, gamma=0.5),
    OptimizerConfig(schedule='step', step_epochs=1, gamma=0.7, lr=1.0),
    OptimizerConfig(schedule='cyclic', cyclic_half_epochs=2, min_lr_factor=0.1),
    OptimizerConfig(schedule='cyclic', cyclic_half_epochs=1, lr=0.01),
    OptimizerConfig(schedule='warmup_cosine', warmup_epochs=2, warmup_start_factor=0.1, min_lr_factor=0.05),
    OptimizerConfig(schedule='warmup_cosine', warmup_epochs=1, schedule_epochs=8),
    OptimizerConfig(schedule='torch_linear'),  # the "under 5 M" report's warmup: lr/3 -> lr over 5 epochs
    OptimizerConfig(schedule='torch_linear', torch_linear_start_factor=0.25, torch_linear_end_factor=0.5,
                    torch_linear_total_iters=7),
]


@pytest.mark.parametrize('cfg', [dataclasses.replace(c, schedule_unit='epoch') for c in EPOCH_SCHEDULE_CASES],
                         ids=lambda c: f'{c.schedule}')
def test_per_epoch_schedule_matches_torch_stepped_once_per_epoch(cfg):
  """schedule_unit='epoch': the lr of every optimiser step equals torch's when its scheduler.step()
  is called after each epoch of spe steps (constant within an epoch)."""
  spe, max_epochs = 7, 10
  n = spe * max_epochs
  if cfg.schedule in ('cosine', 'warmup_cosine') and cfg.schedule_epochs is not None:
    n = min(n, spe * (int(cfg.schedule_epochs) + 1))  # torch's cosine rises again past T_max
  expected = torch_lrs(cfg, spe, max_epochs, n, per_epoch=True)
  got = np.asarray(jax.jit(jax.vmap(make_schedule(cfg, spe, max_epochs)))(jnp.arange(n)), np.float64)
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-12)
  assert (np.ptp(expected) > 0) == (cfg.schedule != 'constant')  # the grid does see the schedule move
  per_epoch = got.reshape(-1, spe) if n % spe == 0 else got[:n // spe * spe].reshape(-1, spe)
  assert np.all(per_epoch == per_epoch[:, :1])  # constant within each epoch, bit for bit


def test_per_epoch_moves_only_at_epoch_boundaries():
  """Per step, cosine moves every step; per epoch it holds, for each epoch, the per-step value of the
  epoch's first step. A step schedule with whole-epoch lengths is the same either way; torch_linear's
  total_iters counts the unit's steps."""
  spe = 4
  cosine = OptimizerConfig(schedule='cosine')
  per_step = np.asarray(jax.vmap(make_schedule(cosine, spe, 10))(jnp.arange(40)))
  per_epoch = np.asarray(jax.vmap(make_schedule(dataclasses.replace(cosine, schedule_unit='epoch'), spe, 10))(
      jnp.arange(40)))
  assert np.all(np.diff(per_step) < 0)
  np.testing.assert_allclose(per_epoch, np.repeat(per_step[::spe], spe), rtol=1e-6)
  step = OptimizerConfig(schedule='step', step_epochs=2, gamma=0.5)
  np.testing.assert_allclose(np.asarray(jax.vmap(make_schedule(step, spe, 10))(jnp.arange(40))),
                             np.asarray(jax.vmap(make_schedule(dataclasses.replace(step, schedule_unit='epoch'), spe,
                                                                10))(jnp.arange(40))), rtol=1e-7)
  linear = OptimizerConfig(schedule='torch_linear')
  assert float(make_schedule(linear, spe, 10)(5)) == pytest.approx(0.1)  # 5 optimiser steps: the end
  assert float(make_schedule(dataclasses.replace(linear, schedule_unit='epoch'), spe, 10)(5)) == pytest.approx(
      0.1 * (1 / 3 + (2 / 3) / 5))  # step 5 is in epoch 1 of 5


def test_trainer_moves_a_per_epoch_schedule_at_its_epoch_boundaries():
  """Through the Trainer (its steps_per_epoch, its epochs of padded batches): with a per-epoch step
  schedule halving every epoch, the factor of every update of epoch e is 0.5^e, and an epoch takes
  ceil(48 / 10) = 5 updates."""
  from dropnet_jax.config import TrainConfig
  from dropnet_jax.training.trainer import DeviceData, Trainer, steps_per_epoch
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(0, 256, (72, 4, 4, 1), dtype=np.uint8))
  labels = jnp.asarray(rng.integers(0, 3, 72).astype(np.int32))
  data = DeviceData(images[:48], labels[:48], images[48:60], labels[48:60], images[60:], labels[60:])
  model = models.MLP(widths=(5,), num_classes=3)
  optim = OptimizerConfig(optimizer='momentum', lr=0.05, schedule='step', step_epochs=1, gamma=0.5,
                          schedule_unit='epoch')
  config = TrainConfig(batch_size=10, max_epochs=3, patience=3, optim=optim)
  spe = steps_per_epoch(48, 10)
  trainer = Trainer(model, config, steps_per_epoch=spe)
  state = trainer.init_fit(models.init_params(model, jax.random.key(0), (4, 4, 1)), (jnp.ones(5),),
                           jax.random.key(1))
  for epoch in range(3):
    state = trainer.epoch_step(state, data)
    assert int(state.opt_state.count) == spe * (epoch + 1)
    assert float(state.opt_state.hyperparams['lr_factor']) == 0.5 ** epoch  # the epoch's last update


@pytest.mark.parametrize('field,kwargs', [
    ('step_epochs', dict(schedule='step', step_epochs=1.5)),
    ('schedule_epochs', dict(schedule='cosine', schedule_epochs=6.5)),
    ('cyclic_half_epochs', dict(schedule='cyclic', cyclic_half_epochs=0.5)),
    ('warmup_epochs', dict(schedule='warmup_cosine', warmup_epochs=2.5)),
    ('warmup_epochs', dict(schedule='warmup_cosine', warmup_epochs=3, schedule_epochs=3.0)),
])
def test_per_epoch_lengths_must_be_whole_epochs(field, kwargs):
  cfg = OptimizerConfig(schedule_unit='epoch', **kwargs)
  with pytest.raises(ValueError, match=f'^{field}:'):
    make_optimizer(cfg, 4, 10)
  # A fractional length the schedule does not read is no error.
  make_schedule(OptimizerConfig(schedule='cosine', schedule_unit='epoch', step_epochs=1.5, cyclic_half_epochs=0.2),
                4, 10)


# -- training the Model A twin ----------------------------------------------------------------------

TRAINING_CASES = [
    OptimizerConfig(optimizer='asgd', lr=0.1),  # torch's defaults: lambd 1e-4, alpha 0.75, t0 1e6
    # η visibly decaying, averaging from update 20 on, coupled weight decay.
    OptimizerConfig(optimizer='asgd', lr=0.1, weight_decay=0.05, asgd_lambd=0.5, asgd_alpha=0.6, asgd_t0=20),
    # Schedules stepped once per epoch (6 steps), as the CIFAR recipes do.
    OptimizerConfig(optimizer='momentum', lr=0.05, weight_decay=5e-4, schedule='step', step_epochs=3, gamma=0.3,
                    schedule_unit='epoch'),
    OptimizerConfig(optimizer='momentum', lr=0.05, schedule='torch_linear', schedule_unit='epoch'),
    OptimizerConfig(optimizer='momentum', lr=0.05, schedule='cosine', schedule_unit='epoch'),
    # ASGD's η lags the lr by one update (torch stores it): a per-epoch drop shows it.
    OptimizerConfig(optimizer='asgd', lr=0.1, asgd_lambd=0.5, schedule='step', step_epochs=2, gamma=0.3,
                    schedule_unit='epoch'),
]


@pytest.mark.parametrize('cfg', TRAINING_CASES,
                         ids=lambda c: f'{c.optimizer}-wd{c.weight_decay}-{c.schedule}'
                                       f'{"-per_epoch" * (c.schedule_unit == "epoch")}')
def test_trains_like_torch(setup, cfg):
  check_trains_like_torch(setup, cfg)


# -- ASGD's state -------------------------------------------------------------------------------------

@pytest.mark.parametrize('schedule', ['constant', 'step'])
def test_asgd_state_matches_torch(schedule):
  """ASGD on fixed gradients, update by update, against torch.optim.ASGD: θ, the average ax (from
  update t0 = 8 on), the step count, η and μ, with weight decay and (with 'step') an lr that halves
  every 4 updates, so η's one-update lag behind the lr shows. The lr is set after init with
  with_hyperparams, as the tuner's lanes do: ASGD must read it at the first update."""
  rng = np.random.default_rng(7)
  n = 30
  p0 = rng.normal(size=256).astype(np.float32)
  grads = (rng.normal(size=(n, 256)) * np.exp(rng.uniform(-3, 0, (n, 256)))).astype(np.float32)
  cfg = OptimizerConfig(optimizer='asgd', lr=0.2, weight_decay=0.02, asgd_lambd=0.3, asgd_alpha=0.7, asgd_t0=8,
                        schedule=schedule, step_epochs=4, gamma=0.5)
  p = torch.nn.Parameter(torch.from_numpy(p0.copy()))
  opt = torch_optimizer(cfg, [p])
  sch = torch_scheduler(cfg, opt, 1, n)
  tx = make_optimizer(dataclasses.replace(cfg, lr=1.0), 1, n)  # the lr replaced below, after init
  params = jnp.asarray(p0)
  state = with_hyperparams(tx.init(params), learning_rate=cfg.lr)
  update = jax.jit(tx.update)
  for g in grads:
    p.grad = torch.from_numpy(g.copy())
    opt.step()
    sch.step()
    u, state = update(jnp.asarray(g), state, params)
    params = optax.apply_updates(params, u)
    torch_state = opt.state[p]
    assert rel_err(params, p.detach().numpy()) < 1e-6
    assert rel_err(asgd_averaged_params(state), torch_state['ax'].numpy()) < 1e-6
    asgd = state.inner_state[-1]
    assert int(asgd.count) == int(torch_state['step'])
    np.testing.assert_allclose(float(asgd.eta), float(torch_state['eta']), rtol=1e-6)
    assert float(asgd.mu) == pytest.approx(float(torch_state['mu']), rel=1e-6)
  assert float(asgd.mu) < 0.1 and rel_err(asgd_averaged_params(state), params) > 1e-3  # averaging did start
  if schedule == 'constant':
    assert float(asgd.eta) < 0.7 * cfg.lr  # η did decay
