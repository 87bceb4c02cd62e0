"""Training: batching, one SGD step against float64, early stopping, divergence."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dropnet_jax import models
from dropnet_jax.config import TrainConfig
from dropnet_jax.training.optim import OptimizerConfig
from dropnet_jax.training.batches import padded_batches
from dropnet_jax.training.trainer import DeviceData, Trainer, fit


def small_data(n=96, seed=0):
  """A learnable toy problem: class = which quarter of the image is brightest."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 4, n).astype(np.int32)
  images = rng.integers(0, 60, (n, 4, 4, 1)).astype(np.uint8)
  for i, c in enumerate(labels):
    r, q = divmod(int(c), 2)
    images[i, 2 * r:2 * r + 2, 2 * q:2 * q + 2, 0] += 150
  split = lambda a: (jnp.asarray(a[:n // 2]), jnp.asarray(a[n // 2:3 * n // 4]), jnp.asarray(a[3 * n // 4:]))
  (tx, vx, sx), (ty, vy, sy) = split(images), split(labels)
  return DeviceData(tx, ty, vx, vy, sx, sy)


def test_padded_batches_cover_every_example_once():
  order = jnp.array([4, 2, 0, 1, 3, 6, 5])
  idx, w = padded_batches(order, 3)
  assert idx.shape == (3, 3) and w.shape == (3, 3)
  real = np.asarray(idx)[np.asarray(w) > 0]
  assert sorted(real.tolist()) == list(range(7))
  assert np.asarray(w).sum() == 7
  np.testing.assert_array_equal(np.asarray(idx).ravel()[:7], np.asarray(order))


def reference_loss(params, images, labels, masks):
  """Float64 numpy forward of the MLP and its mean cross-entropy."""
  x = images.reshape(len(images), -1).astype(np.float64) / 255
  n_layers = len(masks)
  for i in range(n_layers):
    x = np.maximum(x @ params[f'Dense_{i}']['kernel'] + params[f'Dense_{i}']['bias'], 0) * masks[i]
  logits = x @ params[f'Dense_{n_layers}']['kernel'] + params[f'Dense_{n_layers}']['bias']
  logits = logits - logits.max(1, keepdims=True)
  logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  return -logp[np.arange(len(labels)), labels].mean(), (logits.argmax(1) == labels).mean()


def test_evaluate_matches_float64_reference():
  data = small_data()
  model = models.MLP(widths=(6, 5), num_classes=4)
  trainer = Trainer(model, TrainConfig(eval_batch_size=7))  # 48 examples: padded last batch
  params = models.init_params(model, jax.random.key(0), (4, 4, 1))
  masks = (jnp.ones(6).at[2].set(0), jnp.ones(5))
  res = trainer.evaluate(params, masks, data.train_images, data.train_labels)
  p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  loss, acc = reference_loss(p64, np.asarray(data.train_images), np.asarray(data.train_labels),
                             [np.asarray(m) for m in masks])
  np.testing.assert_allclose(float(res.loss), loss, rtol=1e-5)
  np.testing.assert_allclose(float(res.accuracy), acc)
  assert float(res.sums.count) == 48


def test_one_full_batch_epoch_is_one_sgd_step():
  data = small_data()
  model = models.MLP(widths=(6,), num_classes=4)
  trainer = Trainer(model, TrainConfig(optim=OptimizerConfig(lr=0.5), batch_size=48))  # one batch = whole train set
  params = models.init_params(model, jax.random.key(0), (4, 4, 1))
  masks = (jnp.ones(6),)
  new, _, loss, _, _ = trainer.train_epoch(params, trainer.tx.init(params), masks,
                                           data.train_images, data.train_labels, jax.random.key(1))
  # Reference gradient by central differences on the float64 loss, for a few weights.
  p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x, y = np.asarray(data.train_images), np.asarray(data.train_labels)
  for layer, index in [('Dense_0', (3, 2)), ('Dense_0', (10, 5)), ('Dense_1', (1, 3))]:
    eps = 1e-6
    plus = jax.tree.map(np.copy, p64)
    plus[layer]['kernel'][index] += eps
    minus = jax.tree.map(np.copy, p64)
    minus[layer]['kernel'][index] -= eps
    grad = (reference_loss(plus, x, y, [np.ones(6)])[0] - reference_loss(minus, x, y, [np.ones(6)])[0]) / (2 * eps)
    want = p64[layer]['kernel'][index] - 0.5 * grad
    np.testing.assert_allclose(float(new[layer]['kernel'][index]), want, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(float(loss), reference_loss(p64, x, y, [np.ones(6)])[0], rtol=1e-5)


def test_early_stopping_rule_and_best_params():
  data = small_data()
  model = models.MLP(widths=(8,), num_classes=4)
  trainer = Trainer(model, TrainConfig(optim=OptimizerConfig(lr=0.5), batch_size=8, max_epochs=60, patience=3))
  params0 = models.init_params(model, jax.random.key(0), (4, 4, 1))
  history = []
  state = fit(trainer.epoch_step, trainer.init_fit(params0, models.full_masks(model), jax.random.key(0)), data,
                      lambda s: history.append((float(s.val_loss), s.params)))
  val = np.array([h[0] for h in history])
  best = int(np.argmin(val))
  assert int(state.best_epoch) == best + 1
  assert float(state.best_val_loss) == val[best]
  stopped = len(history)
  assert stopped == min(best + 1 + 3, 60)  # patience 3 after the best epoch
  # No improvement over the best in the last `patience` epochs.
  assert np.all(val[best + 1:] >= val[best])
  chex.assert_trees_all_equal(state.best_params, history[best][1])
  chex.assert_trees_all_equal(state.params, history[-1][1])
  assert not bool(state.diverged)
  # A finished state passes through epoch_step unchanged (frozen for batched trials).
  chex.assert_trees_all_equal(trainer.epoch_step(state, data), state)


def test_divergence_is_detected_and_params_stay_finite():
  data = small_data()
  model = models.MLP(widths=(8,), num_classes=4)
  trainer = Trainer(model, TrainConfig(optim=OptimizerConfig(lr=1e30), batch_size=8, max_epochs=10, patience=5))
  params0 = models.init_params(model, jax.random.key(0), (4, 4, 1))
  state = fit(trainer.epoch_step, trainer.init_fit(params0, models.full_masks(model), jax.random.key(0)), data)
  assert bool(state.diverged) and bool(state.done)
  assert int(state.epoch) < 10
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


def test_fit_reuses_theta0_bit_for_bit_and_is_deterministic():
  data = small_data()
  model = models.MLP(widths=(8,), num_classes=4)
  trainer = Trainer(model, TrainConfig(optim=OptimizerConfig(lr=0.5), batch_size=8, max_epochs=4))
  params0 = models.init_params(model, jax.random.key(0), (4, 4, 1))
  snapshot = jax.tree.map(np.array, params0)
  masks = (jnp.ones(8).at[0].set(0),)
  a = fit(trainer.epoch_step, trainer.init_fit(params0, masks, jax.random.key(5)), data)
  b = fit(trainer.epoch_step, trainer.init_fit(params0, masks, jax.random.key(5)), data)
  chex.assert_trees_all_equal(a.params, b.params)
  chex.assert_trees_all_equal(params0, snapshot)  # θ0 untouched by training
  c = fit(trainer.epoch_step, trainer.init_fit(params0, masks, jax.random.key(6)), data)
  with pytest.raises(AssertionError):
    chex.assert_trees_all_equal(a.params, c.params)  # another shuffle, another result


def test_augmentation_changes_the_batches_only_when_on():
  """--augment: the same epoch key gives the same crops/flips (resumable), off leaves training as it was."""
  data = small_data()
  model = models.MLP(widths=(16,), num_classes=4)
  params0 = models.init_params(model, jax.random.key(0), (4, 4, 1))
  masks = models.full_masks(model)
  results = {}
  for augment in ('none', 'flip', 'crop,flip'):
    trainer = Trainer(model, TrainConfig(batch_size=8, augment=augment))
    run = lambda: trainer.train_epoch(params0, trainer.tx.init(params0), masks, data.train_images,
                                      data.train_labels, jax.random.key(3))
    first, again = run(), run()
    chex.assert_trees_all_equal(first[0], again[0])  # deterministic given the epoch key
    results[augment] = first[0]
  plain = Trainer(model, TrainConfig(batch_size=8))
  default = plain.train_epoch(params0, plain.tx.init(params0), masks, data.train_images, data.train_labels,
                              jax.random.key(3))[0]
  chex.assert_trees_all_equal(results['none'], default)
  for augment in ('flip', 'crop,flip'):
    assert not np.allclose(np.asarray(results[augment]['Dense_0']['kernel']),
                           np.asarray(results['none']['Dense_0']['kernel']))


@pytest.mark.parametrize('augment', ['crop,flip', 'crop,flip,autoaugment'])
def test_augmented_run_resumes_exactly(tmp_path, augment):
  from dropnet_jax.loop import dropnet
  from dropnet_jax.loop.driver import RunIO
  from dropnet_jax.runs.checkpoint import Checkpointer
  from dropnet_jax.config import DropNetConfig
  data = small_data()
  model = models.MLP(widths=(8,), num_classes=4)
  config = DropNetConfig(metrics=('min',), fraction=0.5, floor=0.3,
                         train=TrainConfig(batch_size=8, max_epochs=4, patience=2, augment=augment))
  run = lambda ckpt, **kw: dropnet.run_experiment(model, (4, 4, 1), data, [0], config, io=RunIO(
      checkpointer=ckpt, checkpoint_every_epochs=1, log_epochs=True, **kw))  # per-epoch lines: `crash` counts them
  reference = run(None, log=lambda s: None)
  epochs = []

  def crash(line):
    if 'train_loss' in line:
      epochs.append(line)
      if len(epochs) == 6:  # inside the second cycle
        raise RuntimeError('crash')

  with pytest.raises(RuntimeError):
    run(Checkpointer(str(tmp_path)), log=crash)
  resumed = run(Checkpointer(str(tmp_path)), log=lambda s: None)
  strip = lambda rs: [{k: v for k, v in r.items() if k != 'seconds'} for r in rs]
  assert strip(resumed) == strip(reference) and len(reference) >= 2


def test_batch_norm_with_a_batch_larger_than_the_training_set():
  """A batch size above the training-set size (a tuner's sampled size on a small subset): batch norm's
  epoch is its one partial batch, the same step as a batch of exactly the training set."""
  import jax
  from dropnet_jax import models
  from dropnet_jax.config import TrainConfig
  from dropnet_jax.input_pipeline import load_dataset
  from dropnet_jax.training.trainer import DeviceData, Trainer
  ds = load_dataset('digits')
  data = DeviceData.from_dataset(ds)
  model = models.create_model('vgg19', None, 10, 0.0625)
  theta = models.init_params(model, jax.random.key(0), ds.image_shape)
  states = []
  for batch_size in (len(ds.train_labels), 4 * len(ds.train_labels)):
    trainer = Trainer(model, TrainConfig(batch_size=batch_size, max_epochs=2))
    state = trainer.init_fit(theta, models.full_masks(model), jax.random.key(1))
    states.append(trainer.epoch_step(trainer.epoch_step(state, data), data))
  assert int(states[1].epoch) == 2 and np.isfinite(float(states[1].train_loss))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), states[0].params,
               states[1].params)
