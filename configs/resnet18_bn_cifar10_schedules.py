"""The "ResNet18 under 5 M parameters" report's training set-up, one network per learning-rate schedule:
the CIFAR ResNet18 with batch norm (PyTorch's initialisation), 200 epochs of SGD with momentum 0.9, lr
0.1 and weight decay 5e-4, batch 128, random crop + flip + AutoAugment (CIFAR-10 policy) and
per-channel normalisation, schedules stepped once per epoch as torch's `scheduler.step()` is
(`torch_linear` is torch's `LinearLR` with its defaults). GPU-sized: 200 epochs × 4 schedules.

  python -m experiments.schedules --config=configs/resnet18_bn_cifar10_schedules.py \
      --data_dir=<cifar-10-batches-py> --out=runs/resnet18_bn_schedules
"""

import dataclasses

from dropnet_jax.config import DataConfig, ModelConfig, TrainConfig
from dropnet_jax.runs.schedules import SchedulesConfig
from dropnet_jax.training.optim import OptimizerConfig


def get_config() -> SchedulesConfig:
  return dataclasses.replace(
      SchedulesConfig(), model=ModelConfig(name='resnet18_bn'),
      data=DataConfig(dataset='cifar10', normalize=True),
      train=TrainConfig(batch_size=128, max_epochs=200, augment='crop,flip,autoaugment',
                        optim=OptimizerConfig(optimizer='momentum', lr=0.1, momentum=0.9, weight_decay=5e-4,
                                              schedule_unit='epoch')),
      schedules=('torch_linear', 'cosine', 'step', 'constant'))
