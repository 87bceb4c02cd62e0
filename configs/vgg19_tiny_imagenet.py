"""DropNet on VGG19 with the reproduction report's head (global average pool -> FC1024 -> 200 classes) on
Tiny ImageNet: filters and the FC1024 nodes pruned, p = 0.5, crop + flip augmentation, momentum SGD.
GPU-sized (64x64 images, 100,000 training images).

  python -m experiments.dropnet --config=configs/vgg19_tiny_imagenet.py \
      --data_dir=<tiny-imagenet-200> --out=runs/vgg19_tiny_imagenet
"""

from dropnet_jax.config import DataConfig, DropNetConfig, ExperimentConfig, ModelConfig, TrainConfig
from dropnet_jax.training.optim import OptimizerConfig


def get_config() -> ExperimentConfig:
  return ExperimentConfig(
      model=ModelConfig(name='vgg19', head=(1024,)), data=DataConfig(dataset='tiny_imagenet'),
      dropnet=DropNetConfig(metrics=('min', 'min_layer', 'random'), fraction=0.5, floor=0.05,
                            train=TrainConfig(batch_size=128, max_epochs=100, patience=10, augment='crop,flip',
                                              optim=OptimizerConfig(optimizer='momentum', lr=0.01))))
