"""The magnitude-pruning report's pretraining: `resnet18_bn` on CIFAR-10 for 200 epochs with the usual
PyTorch CIFAR recipe (the schedules recipe's set-up, read from `resnet18_bn_cifar10_schedules.py`:
SGD 0.1 / momentum 0.9 / weight decay 5e-4, batch 128, crop + flip + AutoAugment, normalised), cosine
annealing stepped per epoch, no early stopping; the trained network is saved (the report's `ckpt.pth`)
for `configs/resnet18_bn_cifar10_magnitude.py` to load.

  python -m experiments.schedules --config=configs/resnet18_bn_cifar10_pretrain.py \
      --data_dir=<cifar-10-batches-py> --out=runs/resnet18_bn_pretrain
"""

import dataclasses
import os

from dropnet_jax.cli.config_flags import recipe_config
from dropnet_jax.runs.schedules import SchedulesConfig


def get_config() -> SchedulesConfig:
  base = recipe_config(os.path.join(os.path.dirname(__file__), 'resnet18_bn_cifar10_schedules.py'))
  return dataclasses.replace(base, schedules=('cosine',))
