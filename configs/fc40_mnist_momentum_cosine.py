"""Model A on MNIST, min metric, trained with momentum SGD, weight decay and a cosine schedule.

  python -m experiments.dropnet --config=configs/fc40_mnist_momentum_cosine.py --out=runs/fc40_momentum_cosine
"""

from dropnet_jax.config import DataConfig, DropNetConfig, ExperimentConfig, ModelConfig, TrainConfig
from dropnet_jax.training.optim import OptimizerConfig


def get_config() -> ExperimentConfig:
  optim = OptimizerConfig(optimizer='momentum', momentum=0.9, weight_decay=5e-4, lr=0.05, schedule='cosine')
  return ExperimentConfig(model=ModelConfig(name='fc', widths=(40, 40)),
                          data=DataConfig(dataset='mnist', data_dir='../shared/data/mnist_subset'),
                          dropnet=DropNetConfig(metrics=('min',), train=TrainConfig(optim=optim)))
