"""Model A on MNIST trained once per learning-rate schedule (momentum SGD, lr 0.05, 50 epochs): the
per-schedule table and learning curves (the README's example).

  python -m experiments.schedules --config=configs/schedules_fc40_mnist.py --out=runs/schedules
"""

import dataclasses

from dropnet_jax.config import DataConfig, ModelConfig, TrainConfig
from dropnet_jax.runs.schedules import SchedulesConfig
from dropnet_jax.training.optim import OptimizerConfig


def get_config() -> SchedulesConfig:
  return dataclasses.replace(
      SchedulesConfig(), model=ModelConfig(name='fc', widths=(40, 40)),
      data=DataConfig(dataset='mnist', data_dir='../shared/data/mnist_subset'),
      train=TrainConfig(max_epochs=50, optim=OptimizerConfig(optimizer='momentum', lr=0.05)))
