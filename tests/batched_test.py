"""Batched trials (lanes.Lanes, the driver with --batch_trials) and batch-norm support in Trainer."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dropnet_jax import models

from dropnet_jax.loop import dropnet
from dropnet_jax.loop.driver import RunIO
from dropnet_jax.models.layers import masked_relu, to_float
from dropnet_jax.config import DropNetConfig, TrainConfig
from dropnet_jax.training.optim import OptimizerConfig
from dropnet_jax.training.lanes import Lanes
from dropnet_jax.training.trainer import DeviceData, Trainer, fit

# --batch_trials: every trial of a cycle as a lane of one program.
run_batched = functools.partial(dropnet.run_experiment, batch_trials=True)


def cut(data, n_train, n_val, n_test):
  return DeviceData(*(jnp.asarray(a) for a in (
      data.train_images[:n_train], data.train_labels[:n_train], data.val_images[:n_val],
      data.val_labels[:n_val], data.test_images[:n_test], data.test_labels[:n_test])))


# -- batched trials against one trial at a time ----------------------------------------------------------

EXACT = ('seed', 'metric', 'cycle', 'fraction_remaining', 'units', 'mask', 'early_stop_epoch',
         'epochs_trained', 'diverged', 'stop_reason')


def test_batched_records_equal_one_trial_at_a_time(mnist_small):
  data = cut(mnist_small, 1000, 300, 300)  # val and test: one compiled evaluate
  model = models.MLP(widths=(16, 16), num_classes=10)
  # patience 1 makes trials stop at different epochs; a global and a layer-wise metric reach
  # the floor at different cycles (4 vs 5), so lanes freeze at different times.
  config = DropNetConfig(metrics=('min', 'max_layer'), fraction=0.3, floor=0.3,
                                 train=TrainConfig(max_epochs=4, patience=1))
  trainer = Trainer(model, config.train)
  seen = []
  got = run_batched(model, (28, 28, 1), data, [0, 3], config, trainer,
                    io=RunIO(on_record=seen.append, log=lambda s: None))
  want = [r for seed in (0, 3) for r in dropnet.run_seed(model, (28, 28, 1), data, seed, config, trainer,
                                                         log=lambda s: None, log_epochs=False)]
  # on_record: all records so far, in the final order, after every cycle.
  assert len(got) == len(want) and seen[-1] == got
  assert all({id(r) for r in a} < {id(r) for r in b} for a, b in zip(seen, seen[1:]))  # grows every cycle
  for g, w in zip(got, want):
    assert list(g) == list(w)  # same fields in the same order
    for k in g:
      if k in EXACT:
        assert g[k] == w[k], (k, g, w)
      elif k != 'seconds':
        np.testing.assert_allclose(g[k], w[k], rtol=0, atol=1e-5, err_msg=k)
  # The case this test is about: trials stop at different cycles and epochs.
  last_cycle = {(r['seed'], r['metric']): r['cycle'] for r in got}
  assert len(set(last_cycle.values())) > 1
  by_cycle = {}
  for r in got:
    by_cycle.setdefault(r['cycle'], set()).add(r['epochs_trained'])
  assert any(len(e) > 1 for e in by_cycle.values())
  assert all(r['stop_reason'] == 'floor' for r in got if r['cycle'] == last_cycle[(r['seed'], r['metric'])])


def test_done_lanes_are_frozen_and_live_lanes_match_single_runs(mnist_small):
  data = cut(mnist_small, 640, 100, 100)
  model = models.MLP(widths=(8,), num_classes=10)
  trainer = Trainer(model, TrainConfig(max_epochs=3, patience=2))
  params = [models.init_params(model, jax.random.key(s), (28, 28, 1)) for s in range(3)]
  masks = [(jnp.ones(8).at[s].set(0),) for s in range(3)]
  keys = [jax.random.key(10 + s) for s in range(3)]
  stack = lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
  lanes = Lanes(trainer)
  state = lanes.init_fit(stack(params), stack(masks), jnp.stack(keys))
  state = state._replace(done=jnp.array([False, True, False]))
  after = lanes.epoch_step(state, data)
  lane = lambda s, t: jax.tree.map(lambda x: x[t], s._replace(key=jax.random.key_data(s.key)))
  chex.assert_trees_all_equal(lane(after, 1), lane(state, 1))  # done: bit-for-bit unchanged
  for t in (0, 2):
    single = trainer.epoch_step(trainer.init_fit(params[t], masks[t], keys[t]), data)
    chex.assert_trees_all_close(lane(after, t), single._replace(key=jax.random.key_data(single.key)),
                                rtol=1e-5, atol=1e-6)
    assert int(lane(after, t).epoch) == 1


# -- batch norm ---------------------------------------------------------------------------------


class TinyBN(nn.Module):
  """Dense -> BatchNorm -> ReLU -> mask -> Dense, with the models' (logits, stats) contract."""
  widths: tuple = (6,)
  num_classes: int = 10

  @nn.compact
  def __call__(self, images, masks, train: bool = False):
    x = to_float(images).reshape((images.shape[0], -1))
    x = nn.Dense(self.widths[0], use_bias=False)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    x, s = masked_relu(x, masks[0])
    return nn.Dense(self.num_classes)(x), (s,)


def reference_bn_epoch(model, theta, masks, images, labels, order, batch_size, lr):
  """Plain per-batch SGD: batches of `order` (the last one smaller), train-mode batch norm."""
  @jax.jit
  def sgd_step(params, stats, x, y):
    def loss_fn(p):
      (logits, _), upd = model.apply({'params': p, 'batch_stats': stats}, x, masks, train=True,
                                     mutable=['batch_stats'])
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd['batch_stats']

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return jax.tree.map(lambda p, g: p - lr * g, params, grads), stats, loss

  params, stats = theta['params'], theta['batch_stats']
  losses = []
  for start in range(0, len(order), batch_size):
    idx = order[start:start + batch_size]
    params, stats, loss = sgd_step(params, stats, images[idx], labels[idx])
    losses.append(float(loss) * len(idx))
  return {'params': params, 'batch_stats': stats}, sum(losses) / len(order)


def test_batch_norm_training_matches_reference_and_eval_uses_running_stats(mnist_small):
  data = cut(mnist_small, 200, 100, 100)  # 200 = 6 x 32 + 8: a partial last batch of 8
  model = TinyBN()
  masks = (jnp.ones(6).at[4].set(0),)
  theta0 = models.init_params(model, jax.random.key(0), (28, 28, 1))
  assert set(theta0) == {'params', 'batch_stats'}
  trainer = Trainer(model, TrainConfig(optim=OptimizerConfig(lr=0.1), batch_size=32, max_epochs=3, patience=5))
  key = jax.random.key(1)
  new, _, loss, _, sums = trainer.train_epoch(theta0, trainer.tx.init(theta0['params']), masks,
                                              data.train_images, data.train_labels, key)
  order = np.asarray(jax.random.permutation(key, 200))
  want, want_loss = reference_bn_epoch(model, theta0, masks, data.train_images, data.train_labels, order, 32, 0.1)
  chex.assert_trees_all_close(new, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
  assert float(sums.count) == 200
  # The running statistics moved away from their initial values.
  assert not np.allclose(new['batch_stats']['BatchNorm_0']['mean'], 0)

  # evaluate: train=False, i.e. the running averages, not the batch's statistics.
  res = trainer.evaluate(new, masks, data.val_images, data.val_labels)
  logits, _ = model.apply(new, data.val_images, masks, train=False)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, data.val_labels).mean()
  np.testing.assert_allclose(float(res.loss), float(ce), rtol=1e-5)
  np.testing.assert_allclose(float(res.accuracy), float((logits.argmax(-1) == data.val_labels).mean()))

  # fit carries batch_stats in the state: best θ includes the statistics of its epoch.
  history = []
  state = fit(trainer.epoch_step, trainer.init_fit(theta0, masks, key), data, lambda s: history.append(s))
  assert set(state.params) == set(state.best_params) == {'params', 'batch_stats'}
  best = history[int(state.best_epoch) - 1]
  chex.assert_trees_all_equal(state.best_params, best.params)
  chex.assert_trees_all_close(history[0].params, trainer.train_epoch(
      theta0, trainer.tx.init(theta0['params']), masks, data.train_images, data.train_labels,
      jax.random.fold_in(key, 1))[0])


def test_models_without_batch_norm_keep_a_plain_params_tree(mnist_small):
  model = models.MLP(widths=(4,), num_classes=10)
  theta = models.init_params(model, jax.random.key(0), (28, 28, 1))
  assert set(theta) == {'Dense_0', 'Dense_1'}
  data = cut(mnist_small, 64, 32, 32)
  trainer = Trainer(model, TrainConfig(max_epochs=1))
  state = fit(trainer.epoch_step, trainer.init_fit(theta, models.full_masks(model), jax.random.key(0)), data)
  assert set(state.params) == {'Dense_0', 'Dense_1'}


def test_batched_runs_a_batch_norm_model(mnist_small):
  data = cut(mnist_small, 200, 100, 100)
  model = TinyBN(widths=(8,))
  # One seed, one metric: every cycle has one lane, so one set of compiled programs.
  config = DropNetConfig(metrics=('min',), fraction=0.5, floor=0.3,
                                 train=TrainConfig(max_epochs=2, patience=1))
  records = run_batched(model, (28, 28, 1), data, [0], config, io=RunIO(log=lambda s: None))
  assert [r['units'] for r in records] == [[8], [4], [2]]
  assert all(np.isfinite(r['test_loss']) for r in records)


def test_lane_chunks_give_the_same_results(mnist_small):
  data = cut(mnist_small, 128, 64, 64)
  model = models.MLP(widths=(8,), num_classes=10)
  stack = lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
  params = stack([models.init_params(model, jax.random.key(s), (28, 28, 1)) for s in range(4)])
  masks = stack([(jnp.ones(8).at[s].set(0),) for s in range(4)])
  results = []
  for k in (1, 2, 4):
    lanes = Lanes(Trainer(model, TrainConfig(max_epochs=2)), lanes_per_chunk=k)
    state = lanes.init_fit(params, masks, jax.random.split(jax.random.key(0), 4))
    state = lanes.epoch_step(state._replace(done=jnp.array([False, True, False, False])), data)
    ev = lanes.evaluate(state.params, state.masks, data.val_images, data.val_labels)
    results.append((state._replace(key=jax.random.key_data(state.key)), ev))
    assert list(np.asarray(state.epoch)) == [1, 0, 1, 1]
  for other in results[1:]:
    chex.assert_trees_all_close(other, results[0], rtol=1e-5, atol=1e-6)

