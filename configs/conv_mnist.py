"""DropNet on MNIST, Model B (Conv64-Conv64, each ReLU -> mask -> 2x2 max-pool), the six metrics of the
paper's node/filter study, one seed; SGD at lr 0.1, cycles of up to 100 epochs with early stopping
(patience 5), p = 0.2 down to 10 % of the filters (the paper's protocol, the config defaults).

  python -m experiments.dropnet --config=configs/conv_mnist.py --out=runs/conv_mnist

data_dir is the MNIST subset beside a checkout; point --data_dir at the full IDX files for the paper's
60,000 training images (the README's GPU estimate assumes those).
"""

from dropnet_jax.config import DataConfig, DropNetConfig, ExperimentConfig, ModelConfig

SIX_METRICS = ('min', 'max', 'random', 'min_layer', 'max_layer', 'random_layer')


def get_config() -> ExperimentConfig:
  return ExperimentConfig(model=ModelConfig(name='conv'),
                          data=DataConfig(dataset='mnist', data_dir='../shared/data/mnist_subset'),
                          dropnet=DropNetConfig(metrics=SIX_METRICS))
