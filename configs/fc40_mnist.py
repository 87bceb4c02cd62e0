"""DropNet on MNIST: Model A (FC40-FC40), the six metrics of the paper's Figure 2, one seed.

  python -m experiments.dropnet --config=configs/fc40_mnist.py --out=runs/fc40
  python -m experiments.dropnet --config=configs/fc40_mnist.py --seeds=15 --batch_trials --host_devices=2 \
      --out=runs/fc40_15

data_dir is the MNIST subset beside a checkout (the four IDX files); point it elsewhere with
--data_dir, or drop it to load MNIST through tensorflow-datasets.
"""

from dropnet_jax.config import DataConfig, ExperimentConfig, ModelConfig


def get_config() -> ExperimentConfig:
  return ExperimentConfig(model=ModelConfig(name='fc', widths=(40, 40)),
                          data=DataConfig(dataset='mnist', data_dir='../shared/data/mnist_subset'))
