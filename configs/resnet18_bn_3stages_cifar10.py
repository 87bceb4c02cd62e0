"""The "under 5 M" report's layer removal: `resnet18_bn` with stage 4 dropped (11.2 M -> 2.8 M parameters;
ours counts 2,777,674, the PyTorch twin's count), trained as the report trains (the schedules recipe's
set-up, read from `resnet18_bn_cifar10_schedules.py` so it is spelled once), one network per schedule:
the report's table of four schedulers.

  python -m experiments.schedules --config=configs/resnet18_bn_3stages_cifar10.py \
      --data_dir=<cifar-10-batches-py> --out=runs/resnet18_bn_3stages
"""

import dataclasses
import os

from dropnet_jax.cli.config_flags import recipe_config
from dropnet_jax.runs.schedules import SchedulesConfig


def get_config() -> SchedulesConfig:
  base = recipe_config(os.path.join(os.path.dirname(__file__), 'resnet18_bn_cifar10_schedules.py'))
  return dataclasses.replace(base, model=dataclasses.replace(base.model, stages=(1, 2, 3)))
