"""Focal-diversity HQ ensembles over a DropNet run's saved networks (members from 20 % to 60 % of the
units, validation accuracy at least 0.5; teams of up to 5 out of 20), the README's example. The run
comes from `configs/fc40_mnist_saved.py` (see there).

  python -m experiments.ensemble --config=configs/ensemble_fc40.py --out=runs/ens_src/ensemble
"""

from dropnet_jax.ensemble.pipeline import EnsembleConfig
from dropnet_jax.ensemble.pools import PoolConfig


def get_config() -> EnsembleConfig:
  return EnsembleConfig(run='runs/ens_src', max_size=5, betas=(0.0, 0.2, 0.5),
                        pool=PoolConfig(min_fraction=0.2, max_fraction=0.6, min_member_val_accuracy=0.5,
                                        max_members=20))
