"""Masked Flax models of the DropNet paper.

Every model takes the node/filter masks as an explicit input of `__call__`
(a tuple with one float vector per masked layer, 1 = kept, 0 = dropped) and
returns `(logits, stats)`; `train=True` switches layers that behave
differently in training (batch norm) and is ignored by the others. `stats`
holds, per masked layer, the per-example post-activation statistics that scoring needs, so no second "activation model"
is ever built:

  * `abs_mean[b, u]`: mean |a| of unit u on example b (for conv filters the
    mean over spatial positions, the paper's filter score);
  * `zero_frac[b, u]`: fraction of unit u's activations that are exactly zero
    (APoZ; for a dense node it is 0 or 1).

Images arrive as uint8 and are scaled to [0, 1] inside the model, so datasets
stay uint8 on the device (4x less memory than float32).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dropnet_jax.models import large as large_models
from dropnet_jax.models.layers import KERNEL_INIT, Masks, UnitStats, full_masks, masked_relu, to_float  # noqa: F401


class MLP(nn.Module):
  """Model A: FC hidden layers (default FC40-FC40), ReLU, mask after each."""
  widths: Sequence[int] = (40, 40)
  num_classes: int = 10

  @nn.compact
  def __call__(self, images: jax.Array, masks: Masks, train: bool = False):
    del train  # no batch norm or dropout in this model
    x = to_float(images).reshape((images.shape[0], -1))
    stats = []
    for width, mask in zip(self.widths, masks, strict=True):
      x, s = masked_relu(nn.Dense(width, kernel_init=KERNEL_INIT)(x), mask)
      stats.append(s)
    logits = nn.Dense(self.num_classes, kernel_init=KERNEL_INIT)(x)
    return logits, tuple(stats)


class ConvNet(nn.Module):
  """Model B: 3x3 same-padding convs, each ReLU -> mask -> 2x2 max-pool.

  `widths` are the filters per conv (Conv64-Conv64 by default; Conv64-Conv32
  and Conv32-Conv64 are `(64, 32)` and `(32, 64)`), then a linear classifier.
  """
  widths: Sequence[int] = (64, 64)
  num_classes: int = 10

  @nn.compact
  def __call__(self, images: jax.Array, masks: Masks, train: bool = False):
    del train  # no batch norm or dropout in this model
    x = to_float(images)
    stats = []
    for width, mask in zip(self.widths, masks, strict=True):
      x = nn.Conv(width, (3, 3), padding='SAME', kernel_init=KERNEL_INIT)(x)
      x, s = masked_relu(x, mask)
      stats.append(s)
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    logits = nn.Dense(self.num_classes, kernel_init=KERNEL_INIT)(x)
    return logits, tuple(stats)


class ModelC(nn.Module):
  """Model C (the paper's CIFAR-10 model): Conv64-Conv64-Pool-Conv128-Conv128-Pool-FC256.

  `widths` gives the four conv widths; the mask follows each conv's ReLU
  (before the pool). The FC256 layer is not masked: the paper prunes the
  convolutional filters of this model.
  """
  widths: Sequence[int] = (64, 64, 128, 128)
  hidden: int = 256
  num_classes: int = 10

  @nn.compact
  def __call__(self, images: jax.Array, masks: Masks, train: bool = False):
    del train  # no batch norm or dropout in this model
    if len(self.widths) % 2:
      raise ValueError(f'ModelC needs an even number of conv widths (pairs before each pool), got {self.widths}')
    x = to_float(images)
    stats = []
    for i, (width, mask) in enumerate(zip(self.widths, masks, strict=True)):
      x = nn.Conv(width, (3, 3), padding='SAME', kernel_init=KERNEL_INIT)(x)
      x, s = masked_relu(x, mask)
      stats.append(s)
      if i % 2 == 1:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(self.hidden, kernel_init=KERNEL_INIT)(x))
    logits = nn.Dense(self.num_classes, kernel_init=KERNEL_INIT)(x)
    return logits, tuple(stats)


MODELS = {'fc': MLP, 'conv': ConvNet, 'modelc': ModelC, **large_models.LARGE_MODELS}
DEFAULT_WIDTHS = {'fc': (40, 40), 'conv': (64, 64), 'modelc': (64, 64, 128, 128),
                  'resnet18': large_models.resnet18_widths(), 'vgg19': large_models.VGG19_WIDTHS}


def create_model(name: str, widths: Sequence[int] | None, num_classes: int, width_multiplier: float = 1.0) -> nn.Module:
  """Builds a model by its `--model` name; `widths` (one per masked layer) default to the model's,
  scaled by `width_multiplier` (each at least 1; ResNet18 keeps its residual constraints)."""
  if name not in MODELS:
    raise ValueError(f'unknown model {name!r}; choose one of {sorted(MODELS)}')
  if not widths:
    widths = default_widths(name, width_multiplier)
  widths = tuple(widths)
  if not widths or any(int(w) != w or w <= 0 for w in widths):
    raise ValueError(f'widths must be positive integers, got {widths}')
  widths = tuple(int(w) for w in widths)
  if name == 'resnet18':
    large_models.check_resnet18_widths(widths)
  elif name == 'vgg19' and len(widths) != 16:
    raise ValueError(f'VGG19 needs 16 conv widths, got {widths}')
  return MODELS[name](widths=widths, num_classes=num_classes)


def default_widths(name: str, width_multiplier: float = 1.0) -> tuple[int, ...]:
  """The masked-layer widths of `name`, every layer scaled by `width_multiplier` (at least 1)."""
  if width_multiplier <= 0:
    raise ValueError(f'width_multiplier must be positive, got {width_multiplier}')
  if name == 'resnet18':
    stages = tuple(max(1, int(round(w * width_multiplier))) for w in large_models.RESNET18_STAGES)
    return large_models.resnet18_widths(stages)
  return tuple(max(1, int(round(w * width_multiplier))) for w in DEFAULT_WIDTHS[name])


def parse_widths(values: Sequence[str] | None) -> tuple[int, ...] | None:
  """A `--widths` flag value (list of strings) as positive integers; None when not given."""
  if not values:
    return None
  try:
    widths = tuple(int(v) for v in values)
  except ValueError:
    raise ValueError(f'--widths must be positive integers, got {",".join(values)}') from None
  if any(w <= 0 for w in widths):
    raise ValueError(f'--widths must be positive integers, got {",".join(values)}')
  return widths


def init_params(model: nn.Module, key: jax.Array, image_shape: Sequence[int]) -> Any:
  """θ0: the model's initial parameters for one seed.

  The 'params' tree, or for models with batch norm (VGG19) the variables dict
  {'params', 'batch_stats'}: the initial running statistics are part of θ0 and
  are reset with it (dropnet_jax.training.trainer accepts either form).
  """
  dummy = jnp.zeros((1, *image_shape), jnp.uint8)
  variables = model.init(key, dummy, full_masks(model))
  if 'batch_stats' in variables:
    return {'params': variables['params'], 'batch_stats': variables['batch_stats']}
  return variables['params']
