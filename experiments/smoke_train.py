r"""Smoke training of the larger models: a few hundred SGD steps on real images, loss before and after.

  python -m experiments.smoke_train --models=modelc,resnet18,vgg19 --steps=200 \
      --dataset=mnist --data_dir=../shared/data/mnist_subset

Shows that Model C, ResNet18 (no batch norm) and VGG19 (batch norm) train with
the production `Trainer` (one jitted epoch of `--steps` steps, masks with some
units dropped): validation loss and accuracy of θ0 and after the steps. These
models expect CIFAR-shaped input; MNIST's 28x28x1 digits are zero-padded to
32x32 and repeated over 3 channels (CIFAR-10 from `--data_dir` is used as is).
"""

from __future__ import annotations

import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from dropnet_jax import models

from dropnet_jax.models import large as large_models

from dropnet_jax.runs import reporting
from dropnet_jax.input_pipeline import load_dataset
from dropnet_jax.training.optim import OptimizerConfig
from dropnet_jax.training.trainer import DeviceData, TrainConfig, Trainer, split_theta

FLAGS = flags.FLAGS
flags.DEFINE_list('models', 'modelc,resnet18,vgg19', 'Models to train.')
flags.DEFINE_integer('steps', 200, 'SGD steps (one epoch over steps x batch_size training images).')
flags.DEFINE_integer('batch_size', 32, 'SGD batch size.')
flags.DEFINE_float('lr', 0.01, 'SGD learning rate (0.1, the paper\'s MNIST rate, is too high for the deep '
                   'models without warm-up).')
flags.DEFINE_float('width_multiplier', 1.0, 'ResNet18/VGG19 widths scaled by this (1: the paper\'s).')
flags.DEFINE_float('drop', 0.25, 'Fraction of every masked layer\'s units dropped (the first ones), so the '
                   'masked path is exercised.')
flags.DEFINE_integer('val_examples', 1000, 'Validation images the before/after figures use.')
flags.DEFINE_string('dataset', 'mnist', 'mnist (padded to 32x32x3) or cifar10.')
flags.DEFINE_string('data_dir', None, 'Local data files.')
flags.DEFINE_string('out', None, 'Optional JSON of the figures.')


def cifar_shaped(images: np.ndarray) -> np.ndarray:
  """(N, 28, 28, 1) -> (N, 32, 32, 3): zero padding and the channel repeated; CIFAR-shaped input passes."""
  if images.shape[1:] == (32, 32, 3):
    return images
  if images.shape[1:] != (28, 28, 1):
    raise ValueError(f'expected 28x28x1 or 32x32x3 images, got {images.shape[1:]}')
  return np.repeat(np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0))), 3, axis=-1)


def build(name: str, num_classes: int):
  multiplier = FLAGS.width_multiplier if name in large_models.LARGE_MODELS else 1.0
  return models.create_model(name, None, num_classes, width_multiplier=multiplier)


def smoke(name: str, data: DeviceData, num_classes: int) -> dict:
  model = build(name, num_classes)
  theta0 = models.init_params(model, jax.random.key(0), data.train_images.shape[1:])
  masks = tuple(jnp.ones(w).at[:int(FLAGS.drop * w)].set(0) for w in model.widths)
  trainer = Trainer(model, TrainConfig(optim=OptimizerConfig(lr=FLAGS.lr), batch_size=FLAGS.batch_size))
  before = trainer.evaluate(theta0, masks, data.val_images, data.val_labels)
  opt_state = trainer.tx.init(split_theta(theta0)[0])
  start = time.perf_counter()
  theta, _, train_loss, train_acc, _ = jax.block_until_ready(trainer.train_epoch(
      theta0, opt_state, masks, data.train_images, data.train_labels, jax.random.key(1)))
  seconds = time.perf_counter() - start
  after = trainer.evaluate(theta, masks, data.val_images, data.val_labels)
  n_params = sum(x.size for x in jax.tree.leaves(theta0))
  return {'model': name, 'parameters': int(n_params), 'masked_layers': len(model.widths), 'steps': FLAGS.steps,
          'seconds_incl_compile': seconds, 'train_loss_epoch_mean': float(train_loss),
          'train_accuracy_epoch_mean': float(train_acc), 'val_loss_before': float(before.loss),
          'val_loss_after': float(after.loss), 'val_accuracy_before': float(before.accuracy),
          'val_accuracy_after': float(after.accuracy), 'finite': bool(np.isfinite(float(after.loss)))}


def main(argv):
  del argv
  try:
    for name in FLAGS.models:
      if name not in models.MODELS:
        raise ValueError(f'--models: unknown model {name!r}; choose from {sorted(models.MODELS)}')
    if FLAGS.steps < 1 or FLAGS.batch_size < 1 or FLAGS.val_examples < 1:
      raise ValueError('--steps, --batch_size and --val_examples must be positive')
    if not 0 <= FLAGS.drop < 1:
      raise ValueError(f'--drop must be in [0, 1), got {FLAGS.drop}')
    ds = load_dataset(FLAGS.dataset, FLAGS.data_dir)
    n = FLAGS.steps * FLAGS.batch_size
    if len(ds.train_labels) < n:
      raise ValueError(f'--steps x --batch_size = {n} images, the training split has {len(ds.train_labels)}')
    data = DeviceData(*(jnp.asarray(a) for a in (
        cifar_shaped(ds.train_images[:n]), ds.train_labels[:n].astype(np.int32),
        cifar_shaped(ds.val_images[:FLAGS.val_examples]), ds.val_labels[:FLAGS.val_examples].astype(np.int32),
        cifar_shaped(ds.test_images[:1]), ds.test_labels[:1].astype(np.int32))))
  except ValueError as e:
    sys.exit(f'error: {e}')
  results = []
  for name in FLAGS.models:
    r = smoke(name, data, ds.num_classes)
    results.append(r)
    print(f'{name:>9}: {r["parameters"]:>10,} params, {r["steps"]} steps in {r["seconds_incl_compile"]:.1f}s '
          f'(incl. compile) | val loss {r["val_loss_before"]:.3f} -> {r["val_loss_after"]:.3f}, '
          f'val acc {r["val_accuracy_before"]:.3f} -> {r["val_accuracy_after"]:.3f} | '
          f'epoch-mean train loss {r["train_loss_epoch_mean"]:.3f}', flush=True)
  if FLAGS.out:
    reporting.atomic_write_text(FLAGS.out, json.dumps({'dataset': FLAGS.dataset, 'lr': FLAGS.lr,
                                                      'batch_size': FLAGS.batch_size, 'results': results}, indent=2))


if __name__ == '__main__':
  app.run(main)
