"""The paper's protocol next to the official notebook's: Model A on MNIST, min and max, three seeds.

  python -m experiments.protocol_study --config=configs/protocol_fc40_mnist.py --out=runs/protocol
"""

from dropnet_jax.config import DataConfig, DropNetConfig, ExperimentConfig, ModelConfig


def get_config() -> ExperimentConfig:
  return ExperimentConfig(model=ModelConfig(name='fc', widths=(40, 40)),
                          data=DataConfig(dataset='mnist', data_dir='../shared/data/mnist_subset'),
                          seeds=3, dropnet=DropNetConfig(metrics=('min', 'max')), batch_trials=True)
