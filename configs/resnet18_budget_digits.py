"""A quarter-width ResNet18 (no batch norm, the paper's) pruned until its compact network has at most
312,500 parameters, on digits (CPU-sized).

  python -m experiments.dropnet --config=configs/resnet18_budget_digits.py --out=runs/resnet_budget
"""

from dropnet_jax.config import DropNetConfig, ExperimentConfig, ModelConfig, TrainConfig
from dropnet_jax.training.optim import OptimizerConfig


def get_config() -> ExperimentConfig:
  return ExperimentConfig(
      model=ModelConfig(name='resnet18', width_multiplier=0.25),
      dropnet=DropNetConfig(metrics=('min', 'min_layer'), param_budget=312_500,
                            train=TrainConfig(max_epochs=8, optim=OptimizerConfig(lr=0.05))))
