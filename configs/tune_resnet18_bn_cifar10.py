"""The "ResNet18 under 5 M parameters" report's Optuna study: 30 trials of 25 epochs on CIFAR-10 over
the dropout rate (before the classifier), SGD with momentum vs ASGD, the learning rate and a batch size
in 64-256; crop + flip + AutoAugment, per-channel normalisation, torch's LinearLR stepped per epoch. The best
configuration is then retrained for 200 epochs (no early stopping: patience 200) and saved, so
`experiments.evaluate --networks=<out>:seed0/dense` re-tests it.

  python -m experiments.tune --config=configs/tune_resnet18_bn_cifar10.py \
      --data_dir=<cifar-10-batches-py> --out=runs/tune_resnet18_bn
"""

import dataclasses

from dropnet_jax.config import DataConfig, DropNetConfig, ModelConfig, TrainConfig
from dropnet_jax.training.optim import OptimizerConfig
from dropnet_jax.tuning.config import TuneConfig


def get_config() -> TuneConfig:
  default = TuneConfig()
  return dataclasses.replace(
      default, model=ModelConfig(name='resnet18_bn'), data=DataConfig(dataset='cifar10', normalize=True),
      dropnet=DropNetConfig(train=TrainConfig(
          batch_size=128, max_epochs=25, patience=200, augment='crop,flip,autoaugment',
          optim=OptimizerConfig(optimizer='momentum', lr=0.1, weight_decay=5e-4, schedule='torch_linear',
                                schedule_unit='epoch'))),
      n_trials=30, batch=1, retrain_epochs=200,
      space=dataclasses.replace(default.space, optimizers=('momentum', 'asgd'), lr=(1e-3, 0.2),
                                dropout=(0.0, 0.5), batch_size_range=(64, 256), batch_size_step=64,
                                schedules=('torch_linear',), augments=('crop,flip,autoaugment',)))
