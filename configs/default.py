"""The quick start: DropNet on the bundled 8x8 digits, Model A, all six metrics (the defaults).

  python -m experiments.dropnet --config=configs/default.py --out=runs/digits
"""

from dropnet_jax.config import ExperimentConfig


def get_config() -> ExperimentConfig:
  return ExperimentConfig()
