"""Weight magnitude pruning of LeNet-300-100 on MNIST: one-shot, iterative fine-tuning, lottery tickets
and their re-init control at 50/75/90 % sparsity, three seeds (the README's example).

  python -m experiments.magnitude --config=configs/lenet_magnitude_mnist.py --out=runs/lenet_magnitude
"""

from dropnet_jax.config import DataConfig, ModelConfig
from dropnet_jax.loop.magnitude import MagnitudeConfig
from dropnet_jax.runs.magnitude import MagnitudeRunConfig


def get_config() -> MagnitudeRunConfig:
  return MagnitudeRunConfig(
      model=ModelConfig(name='fc', widths=(300, 100)),
      data=DataConfig(dataset='mnist', data_dir='../shared/data/mnist_subset'), seeds=3,
      magnitude=MagnitudeConfig(methods=('oneshot', 'iterative', 'lottery', 'lottery_reinit'),
                                sparsities=(0.5, 0.75, 0.9), finetune_epochs=10, round_epochs=2, final_epochs=10))
