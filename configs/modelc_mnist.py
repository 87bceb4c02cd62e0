"""DropNet on MNIST, Model C (Conv64-Conv64-Pool-Conv128-Conv128-Pool-FC256, the FC head unmasked), the
six metrics, one seed, the paper's protocol (the config defaults: SGD lr 0.1, up to 100 epochs a cycle,
patience 5, p = 0.2 down to 10 % of the filters).

  python -m experiments.dropnet --config=configs/modelc_mnist.py --out=runs/modelc_mnist

data_dir is the MNIST subset beside a checkout; point --data_dir at the full IDX files for the paper's
60,000 training images.
"""

from dropnet_jax.config import DataConfig, DropNetConfig, ExperimentConfig, ModelConfig

SIX_METRICS = ('min', 'max', 'random', 'min_layer', 'max_layer', 'random_layer')


def get_config() -> ExperimentConfig:
  return ExperimentConfig(model=ModelConfig(name='modelc'),
                          data=DataConfig(dataset='mnist', data_dir='../shared/data/mnist_subset'),
                          dropnet=DropNetConfig(metrics=SIX_METRICS))
