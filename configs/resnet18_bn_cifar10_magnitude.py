"""The magnitude-pruning report: load the pretrained `resnet18_bn` (`configs/resnet18_bn_cifar10_pretrain.py`,
or a PyTorch `state_dict` of the twin with --init_from=ckpt.pth) and prune its weights by global L1
magnitude (`torch.nn.utils.prune.global_unstructured`'s selection), one-shot to 50 / 75 / 90 % then 20
epochs of fine-tuning, and iteratively (11 % of the remaining weights per round, 5 epochs per round,
then 100 epochs at the target). Fine-tuning is SGD with momentum 0.9 at lr 0.01, weight decay 5e-4, with
the pretraining's augmentation and normalisation and no early stopping (patience 100: every phase runs
its epochs, the best-validation weights are kept). Every pruned network is saved with its zeros and mask
(the report's `<s>percent_single_ckpt.pth`) and a sparse copy; `experiments.evaluate` re-tests them.

  python -m experiments.magnitude --config=configs/resnet18_bn_cifar10_magnitude.py \
      --init_from=runs/resnet18_bn_pretrain:seed0/cosine --data_dir=<cifar-10-batches-py> \
      --out=runs/resnet18_bn_magnitude
  python -m experiments.evaluate --networks='runs/resnet18_bn_magnitude:*'
"""

import dataclasses
import os

from dropnet_jax.cli.config_flags import recipe_config
from dropnet_jax.config import OutputConfig
from dropnet_jax.loop.magnitude import MagnitudeConfig
from dropnet_jax.runs.magnitude import MagnitudeRunConfig


def get_config() -> MagnitudeRunConfig:
  base = recipe_config(os.path.join(os.path.dirname(__file__), 'resnet18_bn_cifar10_schedules.py'))
  finetune = dataclasses.replace(base.train, patience=100, optim=dataclasses.replace(
      base.train.optim, lr=0.01, schedule='constant'))
  return MagnitudeRunConfig(
      model=base.model, data=base.data,
      magnitude=MagnitudeConfig(methods=('oneshot', 'iterative'), criterion='global_l1', sparsities=(0.5, 0.75, 0.9),
                                finetune_epochs=20, iterative_fraction=0.11, round_epochs=5, final_epochs=100,
                                train=finetune),
      output=OutputConfig(save_params='all'))
