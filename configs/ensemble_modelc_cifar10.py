"""The ensemble deck's tables: focal-diversity HQ teams of Model C networks pruned by DropNet on CIFAR-10,
one row per metric (three global, three layer-wise) x pruning level (0 %, 20 %, 50 % of the units); per
row the team, its beta, its cost and its test accuracy against the full pool and the best single network.
The run comes from `configs/modelc_cifar10.py` (every cycle saved, two seeds: each level's pool holds one
network per seed, the closest cycle to the level).

  python -m experiments.ensemble --config=configs/ensemble_modelc_cifar10.py --out=runs/modelc_cifar10/ensemble
"""

from dropnet_jax.ensemble.pipeline import EnsembleConfig
from dropnet_jax.ensemble.pools import PoolConfig


def get_config() -> EnsembleConfig:
  return EnsembleConfig(run='runs/modelc_cifar10', max_size=5, betas=(0.0, 0.2, 0.5),
                        pool=PoolConfig(group='metric', levels=(0.0, 0.2, 0.5)))
