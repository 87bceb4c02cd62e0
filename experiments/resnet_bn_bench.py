r"""Time per training epoch of resnet18_bn: our Trainer against its PyTorch twin, as one ratio.

  python -m experiments.resnet_bn_bench --examples=2048 --batch_size=128 --torch_threads=2 \
      --out=runs/resnet_bn_bench

The CIFAR-10 reports' recipe on CIFAR-shaped data: --examples random 32x32x3 uint8
images (10 classes), batch --batch_size, SGD lr 0.1, momentum 0.9, weight decay 5e-4,
full width (11,173,962 parameters; --width_multiplier scales it), all-ones masks, train
mode (batch statistics). JAX: `Trainer.train_epoch` (one jitted epoch; its per-unit
statistics included), compiled ahead of time, then one epoch timed. PyTorch:
tests/torch_reference's `ResNet18BN` with the same initial θ, a plain loop of
`torch.optim.SGD` steps over the same batches (no statistics kept), on --torch_threads
threads, timed after one warm-up step. One run each (the issue asks for the ratio of one
run): a shared machine makes single timings noisy. Writes <out>/resnet_bn_bench.json;
needs torch and the source checkout (tests/torch_reference).
"""

from __future__ import annotations

from dropnet_jax.cli import entry  # first: applies --host_devices before jax is imported

import dataclasses
import json
import math
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from dropnet_jax import models
from dropnet_jax import theta as theta_lib
from dropnet_jax.config import TrainConfig
from dropnet_jax.settings import setting
from dropnet_jax.training.optim import OptimizerConfig
from dropnet_jax.training.trainer import Trainer

NUM_CLASSES = 10
IMAGE_SHAPE = (32, 32, 3)


@dataclasses.dataclass(frozen=True)
class ResNetBNBenchConfig:
  """What is timed (see the module docstring)."""
  examples: int = setting(2048, 'Random CIFAR-shaped training images per epoch.', flag='examples')
  batch_size: int = setting(128, 'Batch size.', flag='batch_size')
  lr: float = setting(0.1, 'SGD learning rate.', flag='lr')
  momentum: float = setting(0.9, 'SGD momentum.', flag='momentum')
  weight_decay: float = setting(5e-4, "Weight decay (torch's coupled L2).", flag='weight_decay')
  width_multiplier: float = setting(1.0, 'resnet18_bn widths scaled by this (1: 11,173,962 parameters).',
                                    flag='width_multiplier')
  torch_threads: int = setting(2, 'torch.set_num_threads for the PyTorch epoch.', flag='torch_threads')
  unroll: int = setting(1, "Trainer's scan steps unrolled per loop iteration (XLA:CPU runs convs in a rolled loop "
                        'far slower: try the steps per epoch).', flag='unroll')

  def validate(self) -> None:
    """Raises ValueError naming the setting."""
    for name in ('examples', 'batch_size', 'torch_threads', 'unroll'):
      if getattr(self, name) < 1:
        raise ValueError(f'{name} must be >= 1, got {getattr(self, name)}')
    for name in ('lr', 'width_multiplier'):
      if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
        raise ValueError(f'{name} must be a positive number, got {getattr(self, name)}')
    for name in ('momentum', 'weight_decay'):
      if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
        raise ValueError(f'{name} must be >= 0, got {getattr(self, name)}')


CONFIG = entry.define(ResNetBNBenchConfig(), 'resnet_bn_bench',
                      out_help='Output directory: <out>/resnet_bn_bench.json.')


def time_jax(model, theta0, images, labels, config: ResNetBNBenchConfig) -> float:
  optim = OptimizerConfig(optimizer='momentum', lr=config.lr, momentum=config.momentum,
                          weight_decay=config.weight_decay)
  trainer = Trainer(model, TrainConfig(batch_size=config.batch_size, optim=optim), devices=jax.local_devices()[:1],
                    unroll=config.unroll)
  masks = models.full_masks(model)
  opt_state = trainer.tx.init(theta_lib.params(theta0))
  args = (theta0, opt_state, masks, images, labels, jax.random.key(1))
  compiled = trainer.train_epoch.lower(*args).compile()  # ahead of time: no untimed warm-up epoch to run
  start = time.perf_counter()
  jax.block_until_ready(compiled(*args))
  return time.perf_counter() - start


def time_torch(model, theta0, images, labels, config: ResNetBNBenchConfig) -> float:
  import torch
  import torch.nn.functional as F
  from tests.torch_reference import models as tmodels
  from tests.torch_reference.weights import load_flax_variables
  torch.set_num_threads(config.torch_threads)
  twin = tmodels.create_model('resnet18_bn', model.widths, NUM_CLASSES, IMAGE_SHAPE)
  load_flax_variables(twin, jax.tree.map(np.asarray, theta_lib.variables(theta0))).train()
  masks = tmodels.full_masks(twin)
  opt = torch.optim.SGD(twin.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
  x_all, y_all = torch.from_numpy(np.array(images)), torch.from_numpy(np.array(labels, np.int64))
  order = torch.from_numpy(np.random.default_rng(0).permutation(len(y_all)))

  def step(idx):
    opt.zero_grad()
    logits, _ = twin(x_all[idx], masks, with_stats=False)
    F.cross_entropy(logits, y_all[idx]).backward()
    opt.step()

  step(order[:config.batch_size])  # warm-up
  start = time.perf_counter()
  for i in range(0, len(order), config.batch_size):
    step(order[i:i + config.batch_size])
  return time.perf_counter() - start


def bench(config: ResNetBNBenchConfig) -> dict:
  import torch
  model = models.create_model('resnet18_bn', None, NUM_CLASSES, width_multiplier=config.width_multiplier)
  theta0 = models.init_params(model, jax.random.key(0, impl='rbg'), IMAGE_SHAPE)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(0, 256, (config.examples, *IMAGE_SHAPE), np.uint8))
  labels = jnp.asarray(rng.integers(0, NUM_CLASSES, config.examples), jnp.int32)
  params = sum(a.size for a in jax.tree.leaves(theta_lib.params(theta0)))
  jax_s = time_jax(model, theta0, images, labels, config)
  torch_s = time_torch(model, theta0, images, labels, config)
  return {'model': 'resnet18_bn', 'parameters': int(params), 'examples': config.examples,
          'batch_size': config.batch_size, 'jax_device': str(jax.devices()[0]), 'cpu_count': os.cpu_count(),
          'platform': platform.platform(), 'torch_threads': config.torch_threads, 'torch_version': torch.__version__,
          'jax_version': jax.__version__, 'unroll': config.unroll, 'jax_train_epoch_s': jax_s, 'torch_train_epoch_s': torch_s,
          'torch_over_jax': torch_s / jax_s, 'note': 'one timed epoch each on a possibly shared machine'}


def main(argv):
  from dropnet_jax.runs.run_dir import RunDir  # here: --help does not need it
  del argv
  try:
    config = entry.config(CONFIG)
    run_dir = RunDir(entry.FLAGS.out, 'resnet_bn_bench', config)
    run_dir.check()
    entry.require_torch_twin('resnet_bn_bench')
  except ValueError as e:
    entry.fail(e)
  with run_dir.open(resume_hint='resnet_bn_bench.json was not written; rerun the command to time again'):
    r = bench(config)
    print(f'resnet18_bn ({r["parameters"]:,} params), {r["examples"]} images, batch {r["batch_size"]}: '
          f'JAX epoch {r["jax_train_epoch_s"]:.2f} s ({r["jax_device"]}), torch epoch {r["torch_train_epoch_s"]:.2f} s '
          f'({r["torch_threads"]} threads): torch/JAX = {r["torch_over_jax"]:.2f}', flush=True)
    path = run_dir.write_text('resnet_bn_bench.json', json.dumps(r, indent=2))
  print(f'wrote {path}')


if __name__ == '__main__':
  entry.run(main)
