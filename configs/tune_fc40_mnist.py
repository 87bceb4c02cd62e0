"""An Optuna study of Model A's training options on MNIST: 30 trials of at most 25 epochs, four per
program as lanes, over three optimisers and all six schedules (the README's example).

  python -m experiments.tune --config=configs/tune_fc40_mnist.py --out=runs/tune_fc
"""

import dataclasses

from dropnet_jax.config import DataConfig, ModelConfig
from dropnet_jax.tuning.config import TuneConfig


def get_config() -> TuneConfig:
  default = TuneConfig()
  return dataclasses.replace(
      default, model=ModelConfig(name='fc', widths=(40, 40)),
      data=DataConfig(dataset='mnist', data_dir='../shared/data/mnist_subset'), n_trials=30, batch=4,
      space=dataclasses.replace(default.space, optimizers=('sgd', 'momentum', 'adam'),
                                schedules=('constant', 'cosine', 'linear', 'step', 'cyclic', 'warmup_cosine')))
