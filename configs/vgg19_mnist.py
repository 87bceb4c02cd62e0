"""DropNet on VGG19 with the reproduction report's MNIST head (global average pool -> FC256 -> 10
classes), on the MNIST subset: filters and FC256 nodes pruned. 28x28 inputs (the pools use 'SAME'
padding, so the last map is 1x1). CPU-sized with --width_multiplier=0.25.

  python -m experiments.dropnet --config=configs/vgg19_mnist.py --out=runs/vgg19_mnist
"""

from dropnet_jax.config import DataConfig, DropNetConfig, ExperimentConfig, ModelConfig, TrainConfig
from dropnet_jax.training.optim import OptimizerConfig


def get_config() -> ExperimentConfig:
  return ExperimentConfig(
      model=ModelConfig(name='vgg19', head=(256,)),
      data=DataConfig(dataset='mnist', data_dir='../shared/data/mnist_subset'),
      dropnet=DropNetConfig(metrics=('min', 'min_layer'), fraction=0.2,
                            train=TrainConfig(batch_size=128, max_epochs=30, patience=5,
                                              optim=OptimizerConfig(optimizer='momentum', lr=0.01))))
