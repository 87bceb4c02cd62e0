"""DropNet on the paper's ResNet18 (no batch norm) on Tiny ImageNet (64x64, 200 classes): filters pruned in
residual groups, p = 0.5, crop + flip augmentation, momentum SGD; the supplementary material's study with
the global and layer-wise minimum and the random control. GPU-sized (100,000 training images).

  python -m experiments.dropnet --config=configs/resnet18_tiny_imagenet.py \
      --data_dir=<tiny-imagenet-200> --out=runs/resnet18_tiny_imagenet
"""

from dropnet_jax.config import DataConfig, DropNetConfig, ExperimentConfig, ModelConfig, TrainConfig
from dropnet_jax.training.optim import OptimizerConfig


def get_config() -> ExperimentConfig:
  return ExperimentConfig(
      model=ModelConfig(name='resnet18'), data=DataConfig(dataset='tiny_imagenet'),
      dropnet=DropNetConfig(metrics=('min', 'min_layer', 'random'), fraction=0.5, floor=0.05,
                            train=TrainConfig(batch_size=128, max_epochs=100, patience=10, augment='crop,flip',
                                              optim=OptimizerConfig(optimizer='momentum', lr=0.01))))
