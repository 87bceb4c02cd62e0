"""Algorithm 1 end to end on real MNIST (small), and its stopping rules."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dropnet_jax import models

from dropnet_jax.pruning import criteria

from dropnet_jax.loop import dropnet
from dropnet_jax.loop.driver import RunIO

from dropnet_jax.pruning import masks as mask_ops
from dropnet_jax.config import DropNetConfig, TrainConfig
from dropnet_jax.training.optim import OptimizerConfig
from dropnet_jax.training.trainer import DeviceData, Trainer

FAST = TrainConfig(max_epochs=3, patience=2)


def to_device(data):
  return DeviceData(*(jnp.asarray(a) for a in data))


@pytest.fixture(scope='module')
def run(mnist_small):
  """One seed, three metrics, with every θ passed to training recorded."""
  model = models.MLP(widths=(16, 16), num_classes=10)
  config = DropNetConfig(metrics=('min', 'max_layer', 'random'), fraction=0.3, floor=0.3, train=FAST)
  trainer = Trainer(model, config.train)
  starts = []
  original = trainer.init_fit
  trainer.init_fit = lambda params, masks, key: (starts.append(params), original(params, masks, key))[1]
  records = dropnet.run_seed(model, (28, 28, 1), to_device(mnist_small), 0, config, trainer, log=lambda s: None)
  return model, config, records, starts


def test_every_cycle_restarts_from_theta0_bit_for_bit(run):
  model, _, records, starts = run
  theta0 = models.init_params(model, dropnet.SeedKeys.for_seed(0).init, (28, 28, 1))
  # The dense cycle is trained once and shared; every later cycle is one more start.
  assert len(starts) == 1 + sum(r['cycle'] > 0 for r in records)
  for params in starts:
    chex.assert_trees_all_equal(params, theta0)


def test_records_masks_and_stopping(run):
  _, config, records, _ = run
  by_metric = {}
  for r in records:
    by_metric.setdefault(r['metric'], []).append(r)
  assert sorted(by_metric) == ['max_layer', 'min', 'random']
  dense = [rs[0] for rs in by_metric.values()]
  assert all(d['test_accuracy'] == dense[0]['test_accuracy'] and d['units'] == [16, 16] for d in dense)
  assert dense[0]['test_accuracy'] > 0.65  # real signal (chance is 0.1): 2k MNIST images, 3 epochs
  for metric, rs in by_metric.items():
    assert [r['cycle'] for r in rs] == list(range(len(rs)))
    masks = [mask_ops.units_per_layer(mask_ops.masks_from_strings(r['mask'])) for r in rs]
    assert masks == [r['units'] for r in rs]
    for prev, cur in zip(rs, rs[1:]):
      a, b = (np.array([c == '1' for c in ''.join(r['mask'])]) for r in (prev, cur))
      assert np.all(b <= a)  # masks only shrink, dropped units stay dropped
      if metric.endswith('_layer'):
        assert cur['units'] == [u - max(int(0.3 * u), 1) for u in prev['units']]
      else:
        assert sum(cur['units']) == sum(prev['units']) - max(int(0.3 * sum(prev['units'])), 1)
    assert rs[-1]['fraction_remaining'] <= config.floor < rs[-2]['fraction_remaining']
    assert rs[-1]['stop_reason'] == 'floor' and all(r['stop_reason'] is None for r in rs[:-1])
    for r in rs:
      assert 1 <= r['early_stop_epoch'] <= r['epochs_trained'] <= FAST.max_epochs
      for k in ('train_accuracy', 'val_accuracy', 'test_accuracy', 'train_loss', 'val_loss', 'test_loss'):
        assert np.isfinite(r[k])


def test_scores_are_mean_abs_activation_over_all_training_samples(mnist_small):
  """The min metric's scores against a float64 recomputation with the trained params."""
  model = models.MLP(widths=(12, 10), num_classes=10)
  data = to_device(mnist_small)
  trainer = Trainer(model, FAST)
  params0 = models.init_params(model, jax.random.key(0), (28, 28, 1))
  masks = (jnp.ones(12).at[3].set(0), jnp.ones(10))
  out = dropnet.train_cycle(trainer, params0, masks, data, jax.random.key(1))
  scores = criteria.mean_abs(out.sums)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), out.best_theta)
  x = np.asarray(mnist_small.train_images, np.float64).reshape(2000, -1) / 255
  for i, m in enumerate(masks):
    x = np.maximum(x @ p[f'Dense_{i}']['kernel'] + p[f'Dense_{i}']['bias'], 0) * np.asarray(m)
    np.testing.assert_allclose(scores[i], np.abs(x).mean(0), rtol=2e-4, atol=1e-6)
  assert float(out.sums.count) == 2000
  # The next min mask drops exactly the lowest-scoring kept units.
  new = criteria.get('min')(criteria.PruneInputs(out.score_theta, out.sums, masks, jax.random.key(2), 0.2),
                            criteria.Context())
  flat_scores = np.concatenate([np.asarray(s) for s in scores])
  flat_old = np.concatenate([np.asarray(m) for m in masks]) > 0
  flat_new = np.concatenate([np.asarray(m) for m in new]) > 0
  dropped = np.flatnonzero(flat_old & ~flat_new)
  kept_scores = np.sort(flat_scores[flat_old])
  assert len(dropped) == int(0.2 * 21)
  np.testing.assert_allclose(np.sort(flat_scores[dropped]), kept_scores[:len(dropped)])


def test_score_from_epoch_uses_running_sums(mnist_small):
  model = models.MLP(widths=(12,), num_classes=10)
  trainer = Trainer(model, FAST)
  params0 = models.init_params(model, jax.random.key(0), (28, 28, 1))
  out = dropnet.train_cycle(trainer, params0, models.full_masks(model), to_device(mnist_small),
                            jax.random.key(1), DropNetConfig(score_from='epoch'))
  data_out = dropnet.train_cycle(trainer, params0, models.full_masks(model), to_device(mnist_small),
                                 jax.random.key(1))
  # Running sums over one epoch's batches count every training example once; they are taken during
  # the epoch's updates, so they differ from a pass with the trained params.
  assert float(out.sums.count) == 2000
  assert not np.allclose(np.asarray(out.sums.abs_sum[0]), np.asarray(data_out.sums.abs_sum[0]))
  assert out.fields['test_accuracy'] == data_out.fields['test_accuracy']


def test_should_stop_rules():
  config = DropNetConfig(floor=0.1, kappa=0.9)
  base = {'diverged': False, 'fraction_remaining': 0.5, 'cycle': 2, 'val_accuracy': 0.95}
  assert dropnet.should_stop(base, 1.0, config) is None
  assert dropnet.should_stop({**base, 'val_accuracy': 0.9}, 1.0, config) == 'kappa'
  assert dropnet.should_stop({**base, 'fraction_remaining': 0.1}, 1.0, config) == 'floor'
  assert dropnet.should_stop({**base, 'diverged': True}, 1.0, config) == 'diverged'
  # The dense cycle never stops on kappa, even with kappa = 1.
  assert dropnet.should_stop({**base, 'cycle': 0, 'val_accuracy': 1.0}, 1.0,
                             DropNetConfig(kappa=1.0)) is None


@pytest.mark.parametrize('kwargs,flag', [
    ({'fraction': 0.0}, 'fraction'), ({'fraction': 1.5}, 'fraction'), ({'floor': 1.0}, 'floor'),
    ({'floor': 0.0}, 'floor'), ({'kappa': 0.0}, 'kappa'), ({'kappa': 1.2}, 'kappa'),
    ({'metrics': ('min', 'median')}, 'metric'), ({'score_from': 'cache'}, 'score_from'),
    ({'train': TrainConfig(batch_size=0)}, 'batch_size'), ({'train': TrainConfig(optim=OptimizerConfig(lr=-1))}, 'lr'),
    ({'train': TrainConfig(optim=OptimizerConfig(lr=float('nan')))}, 'lr'), ({'fraction': float('nan')}, 'fraction'),
    ({'score_params': 'first'}, 'score_params'), ({'score_params': 'last', 'score_from': 'epoch'}, 'score_params'),
])
def test_config_validation_names_the_setting(kwargs, flag):
  with pytest.raises(ValueError, match=flag):
    DropNetConfig(**kwargs).validate()


def test_mask_string_round_trip():
  masks = (jnp.array([1., 0., 1.]), jnp.array([0., 0., 1., 1.]))
  assert mask_ops.mask_to_strings(masks) == ['101', '0011']
  chex.assert_trees_all_equal(mask_ops.masks_from_strings(['101', '0011']), masks)


def test_batch_norm_model_runs_resumes_and_resets_its_running_stats(tmp_path):
  """VGG19 (batch norm): θ0 holds the initial running statistics, every cycle restarts from them,
  and a checkpointed run resumes (the oracle gets the batch statistics too)."""
  from dropnet_jax.models import large as large_models
  from dropnet_jax.runs.checkpoint import Checkpointer
  model = large_models.VGG19(widths=(3, 4) * 8, num_classes=4)
  rng = np.random.default_rng(0)
  images = lambda n: jnp.asarray(rng.integers(0, 256, (n, 32, 32, 3), np.uint8))
  labels = lambda n: jnp.asarray(np.arange(n) % 4, jnp.int32)
  data = DeviceData(images(64), labels(64), images(32), labels(32), images(32), labels(32))
  config = DropNetConfig(metrics=('min', 'oracle'), fraction=0.5, floor=0.5,
                                 train=TrainConfig(max_epochs=1, batch_size=16, eval_batch_size=32))
  trainer = Trainer(model, config.train)
  starts = []
  original = trainer.init_fit
  trainer.init_fit = lambda params, masks, key: (starts.append(params), original(params, masks, key))[1]
  records = dropnet.run_experiment(model, (32, 32, 3), data, [0], config, trainer,
                                   RunIO(Checkpointer(str(tmp_path / 'ckpt')), log=lambda s: None))
  assert {r['metric'] for r in records} == {'min', 'oracle'} and max(r['cycle'] for r in records) >= 1
  assert all(np.isfinite(r['test_loss']) for r in records)
  theta0 = models.init_params(model, dropnet.SeedKeys.for_seed(0).init, (32, 32, 3))
  assert set(theta0) == {'params', 'batch_stats'}
  assert len(starts) >= 3
  for s in starts:
    chex.assert_trees_all_equal(s, theta0)
  steps = []
  step = trainer.epoch_step
  trainer.epoch_step = lambda *a: (steps.append(1), step(*a))[1]
  again = dropnet.run_experiment(model, (32, 32, 3), data, [0], config, trainer,
                                 RunIO(Checkpointer(str(tmp_path / 'ckpt')), log=lambda s: None))
  assert again == records and not steps  # finished: restored, nothing retrained


def test_records_carry_compact_size_and_budgets_stop_at_the_first_fit(mnist_small):
  """Every record has its compact network's params/MACs; --param_budget/--mac_budget stop there."""
  from dropnet_jax.compaction import accounting
  model = models.MLP(widths=(16, 16), num_classes=10)
  data = DeviceData(*(jnp.asarray(a[:500]) for a in mnist_small))
  base = DropNetConfig(metrics=('min',), fraction=0.3, floor=0.2, train=TrainConfig(max_epochs=2, patience=1))
  full = dropnet.run_experiment(model, (28, 28, 1), data, [0], base, io=RunIO(log=lambda s: None))
  for r in full:
    size = accounting.summary(model, (28, 28, 1), mask_ops.masks_from_strings(r['mask']))
    assert (r['params'], r['macs']) == (size['params'], size['macs'])
  assert full[0]['params'] == 784 * 16 + 16 + 16 * 16 + 16 + 16 * 10 + 10  # the dense MLP, by hand
  assert all(a['params'] > b['params'] for a, b in zip(full, full[1:]))
  for name, key in (('param_budget', 'params'), ('mac_budget', 'macs')):
    budget = full[2][key] + 1  # cycle 2 is the first to fit
    config = dataclasses.replace(base, **{name: budget})
    records = dropnet.run_experiment(model, (28, 28, 1), data, [0], config, io=RunIO(log=lambda s: None))
    assert [r['cycle'] for r in records] == [0, 1, 2] and records[-1]['stop_reason'] == name
    assert records[-1][key] <= budget < records[-2][key]
