"""The "under 5 M" report's structured pruning before training: `resnet18_bn` with 10 % of the filters
pruned in layers 1-2, 20 % in 3-6 and 30 % in 7-8 (a "layer" is a basic block, as the report's
Torch-Pruning `pruning_ratio_dict` over layer1..layer4 makes it; residual groups share one rate), ranked
by the L1 norm of the initial filters (Torch-Pruning's grouped `MagnitudeImportance`) and at random,
then trained 200 epochs as the report trains (the schedules recipe's set-up with torch's LinearLR, read
from `resnet18_bn_cifar10_schedules.py`; no early stopping). Cycle 0 is the unpruned network trained
alike. These rates leave 5,990,811 parameters (Torch-Pruning counts the same); `--param_budget=5e6`
instead of the rates finds the uniform rate that gets under 5 M.

  python -m experiments.structured --config=configs/resnet18_bn_under5m_rates.py \
      --data_dir=<cifar-10-batches-py> --out=runs/resnet18_bn_under5m_rates
"""

import dataclasses
import os

from dropnet_jax.cli.config_flags import recipe_config
from dropnet_jax.loop.structured import StructuredConfig
from dropnet_jax.runs.structured import StructuredRunConfig

REPORT_RATES = (0.1, 0.1, 0.2, 0.2, 0.2, 0.2, 0.3, 0.3)


def get_config() -> StructuredRunConfig:
  base = recipe_config(os.path.join(os.path.dirname(__file__), 'resnet18_bn_cifar10_schedules.py'))
  train = dataclasses.replace(base.train, patience=base.train.max_epochs,
                              optim=dataclasses.replace(base.train.optim, schedule='torch_linear'))
  return StructuredRunConfig(model=base.model, data=base.data,
                             structured=StructuredConfig(importances=('l1', 'random'), rates=REPORT_RATES,
                                                         train=train))
