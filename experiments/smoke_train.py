r"""Smoke training of the larger models: a few hundred SGD steps on real images, loss before and after.

  python -m experiments.smoke_train --models=modelc,resnet18,vgg19 --steps=200 \
      --dataset=mnist --data_dir=../shared/data/mnist_subset --out=runs/smoke

Shows that Model C, ResNet18 (no batch norm) and VGG19 (batch norm) train with
the production `Trainer` (one jitted epoch of `--steps` steps, masks with some
units dropped): validation loss and accuracy of θ0 and after the steps, and after
them the eval-mode train loss and the test loss and accuracy. The CIFAR ResNet18
with batch norm against the paper's, at the CIFAR-10 reports' rate:

  python -m experiments.smoke_train --models=resnet18_bn,resnet18 --width_multiplier=0.25 \
      --steps=300 --batch_size=64 --lr=0.1 --momentum=0.9 --drop=0 \
      --dataset=mnist --data_dir=../shared/data/mnist_subset --out=runs/smoke_bn

These
models expect CIFAR-shaped input; MNIST's 28x28x1 digits are zero-padded to
32x32 and repeated over 3 channels (CIFAR-10 from `--data_dir` is used as is).
Writes <out>/smoke.json (the figures) and <out>/config.json; the settings and
--out are checked before the data are read.
"""

from __future__ import annotations

from dropnet_jax.cli import entry  # first: applies --host_devices before jax is imported

import dataclasses
import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from dropnet_jax import models
from dropnet_jax.config import MODEL_NAMES, DataConfig
from dropnet_jax.input_pipeline import load_dataset
from dropnet_jax.models import large as large_models
from dropnet_jax.settings import setting
from dropnet_jax import theta as theta_lib
from dropnet_jax.training.optim import OptimizerConfig
from dropnet_jax.training.trainer import DeviceData, TrainConfig, Trainer

SMOKE_DATASETS = ('mnist', 'cifar10')


@dataclasses.dataclass(frozen=True)
class SmokeTrainConfig:
  """Which models train how many steps on which images (see the module docstring)."""
  models: tuple[str, ...] = setting(('modelc', 'resnet18', 'vgg19'), 'Models to train.', flag='models',
                                    choices=MODEL_NAMES)
  data: DataConfig = DataConfig(dataset='mnist')  # mnist (padded to 32x32x3) or cifar10
  steps: int = setting(200, 'SGD steps (one epoch over steps x batch_size training images).', flag='steps')
  batch_size: int = setting(32, 'SGD batch size.', flag='batch_size')
  lr: float = setting(0.01, "SGD learning rate (0.1, the paper's MNIST rate, is too high for the deep models "
                      'without batch norm or warm-up).', flag='lr')
  momentum: float = setting(0.0, 'SGD momentum (0: plain SGD; e.g. 0.9, the CIFAR-10 reports\' recipe).',
                            flag='momentum')
  width_multiplier: float = setting(1.0, "ResNet18/VGG19 widths scaled by this (1: the paper's).",
                                    flag='width_multiplier')
  drop: float = setting(0.25, "Fraction of every masked layer's units dropped (the first ones), so the masked "
                        'path is exercised.', flag='drop')
  val_examples: int = setting(1000, 'Validation images the before/after figures use (and training images the '
                              'final eval-mode train loss uses).', flag='val_examples')
  test_examples: int = setting(1000, 'Test images the final test loss and accuracy use.', flag='test_examples')

  def validate(self) -> None:
    """Raises ValueError naming the setting."""
    if not self.models:
      raise ValueError('models: give at least one')
    if len(set(self.models)) != len(self.models):
      raise ValueError(f'models: duplicates in {list(self.models)}')
    for name in self.models:
      if name not in models.MODELS:
        raise ValueError(f'models: unknown model {name!r}; choose from {sorted(models.MODELS)}')
    if self.data.dataset not in SMOKE_DATASETS:
      raise ValueError(f'dataset: mnist (padded to 32x32x3) or cifar10, not {self.data.dataset}')
    for name in ('steps', 'batch_size', 'val_examples', 'test_examples'):
      if getattr(self, name) < 1:
        raise ValueError(f'{name} must be >= 1, got {getattr(self, name)}')
    if not (math.isfinite(self.momentum) and 0 <= self.momentum < 1):
      raise ValueError(f'momentum must be in [0, 1), got {self.momentum}')
    if not 0 <= self.drop < 1:
      raise ValueError(f'drop must be in [0, 1), got {self.drop}')
    for name in ('lr', 'width_multiplier'):
      if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
        raise ValueError(f'{name} must be a positive number, got {getattr(self, name)}')


CONFIG = entry.define(SmokeTrainConfig(), 'smoke_train', out_help='Output directory: <out>/smoke.json.')


def cifar_shaped(images: np.ndarray) -> np.ndarray:
  """(N, 28, 28, 1) -> (N, 32, 32, 3): zero padding and the channel repeated; CIFAR-shaped input passes."""
  if images.shape[1:] == (32, 32, 3):
    return images
  if images.shape[1:] != (28, 28, 1):
    raise ValueError(f'expected 28x28x1 or 32x32x3 images, got {images.shape[1:]}')
  return np.repeat(np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0))), 3, axis=-1)


def build(name: str, num_classes: int, config: SmokeTrainConfig):
  multiplier = config.width_multiplier if name in (*large_models.LARGE_MODELS, 'resnet18_bn') else 1.0
  return models.create_model(name, None, num_classes, width_multiplier=multiplier)


def smoke(name: str, data: DeviceData, num_classes: int, config: SmokeTrainConfig) -> dict:
  model = build(name, num_classes, config)
  theta0 = models.init_params(model, jax.random.key(0), data.train_images.shape[1:])
  masks = tuple(jnp.ones(w).at[:int(config.drop * w)].set(0) for w in model.widths)
  optim = (OptimizerConfig(optimizer='momentum', lr=config.lr, momentum=config.momentum) if config.momentum
           else OptimizerConfig(lr=config.lr))
  trainer = Trainer(model, TrainConfig(optim=optim, batch_size=config.batch_size))
  before = trainer.evaluate(theta0, masks, data.val_images, data.val_labels)
  opt_state = trainer.tx.init(theta_lib.params(theta0))
  start = time.perf_counter()
  theta, _, train_loss, train_acc, _ = jax.block_until_ready(trainer.train_epoch(
      theta0, opt_state, masks, data.train_images, data.train_labels, jax.random.key(1)))
  seconds = time.perf_counter() - start
  after = trainer.evaluate(theta, masks, data.val_images, data.val_labels)
  v = config.val_examples
  train_after = trainer.evaluate(theta, masks, data.train_images[:v], data.train_labels[:v])
  test_after = trainer.evaluate(theta, masks, data.test_images, data.test_labels)
  n_params = sum(x.size for x in jax.tree.leaves(theta0))
  return {'model': name, 'parameters': int(n_params), 'masked_layers': len(model.widths), 'steps': config.steps,
          'seconds_incl_compile': seconds, 'train_loss_epoch_mean': float(train_loss),
          'train_accuracy_epoch_mean': float(train_acc), 'val_loss_before': float(before.loss),
          'val_loss_after': float(after.loss), 'val_accuracy_before': float(before.accuracy),
          'val_accuracy_after': float(after.accuracy), 'train_loss_after': float(train_after.loss),
          'test_loss_after': float(test_after.loss), 'test_accuracy_after': float(test_after.accuracy),
          'finite': bool(np.isfinite(float(after.loss)))}


def load(config: SmokeTrainConfig) -> tuple[DeviceData, int]:
  """The training and validation images, CIFAR-shaped; ValueError (DataError) names a problem."""
  ds = load_dataset(config.data.dataset, config.data.data_dir, split_seed=config.data.split_seed)
  n, v, t = config.steps * config.batch_size, config.val_examples, config.test_examples
  if len(ds.train_labels) < n:
    raise ValueError(f'steps x batch_size = {n} images, the training split has {len(ds.train_labels)}')
  data = DeviceData(*(jnp.asarray(a) for a in (
      cifar_shaped(ds.train_images[:n]), ds.train_labels[:n].astype(np.int32),
      cifar_shaped(ds.val_images[:v]), ds.val_labels[:v].astype(np.int32),
      cifar_shaped(ds.test_images[:t]), ds.test_labels[:t].astype(np.int32))))
  return data, ds.num_classes


def main(argv):
  from dropnet_jax.runs.run_dir import RunDir  # here: --help does not need it
  del argv
  try:
    config = entry.config(CONFIG)
    run_dir = RunDir(entry.FLAGS.out, 'smoke_train', config)
    run_dir.check()
    data, num_classes = load(config)
  except ValueError as e:  # includes input_pipeline.DataError
    entry.fail(e)
  results = []
  with run_dir.open(resume_hint='smoke.json was not written; rerun the command to train again'):
    for name in config.models:
      r = smoke(name, data, num_classes, config)
      results.append(r)
      print(f'{name:>9}: {r["parameters"]:>10,} params, {r["steps"]} steps in {r["seconds_incl_compile"]:.1f}s '
            f'(incl. compile) | val loss {r["val_loss_before"]:.3f} -> {r["val_loss_after"]:.3f}, '
            f'val acc {r["val_accuracy_before"]:.3f} -> {r["val_accuracy_after"]:.3f} | '
            f'epoch-mean train loss {r["train_loss_epoch_mean"]:.3f}, final train loss {r["train_loss_after"]:.3f} | '
            f'test loss {r["test_loss_after"]:.3f}, test acc {r["test_accuracy_after"]:.3f}', flush=True)
    run_dir.write_text('smoke.json', json.dumps({'dataset': config.data.dataset, 'lr': config.lr,
                                                 'momentum': config.momentum,
                                                 'batch_size': config.batch_size, 'results': results}, indent=2))


if __name__ == '__main__':
  entry.run(main)
