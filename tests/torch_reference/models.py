"""Masked torch.nn versions of dropnet_jax.models (Model A, B and C).

Same structure and conventions as the Flax models: the node/filter masks are an
input of `forward`, the mask multiplies the post-ReLU activation, images arrive
NHWC (uint8 scaled by 1/255 inside, float taken as already scaled) and
`forward` returns `(logits, stats)` with per-example, per-unit `abs_mean` and
`zero_frac` for every masked layer (conv filters: the means over spatial
positions). Convs run in NCHW, torch's layout; before the classifier the
activations go back to NHWC so the flatten order (and so a transferred Dense
kernel) is Flax's.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

Masks = tuple[torch.Tensor, ...]


class UnitStats(NamedTuple):
  abs_mean: torch.Tensor  # (batch, units)
  zero_frac: torch.Tensor  # (batch, units)


def to_float(images: torch.Tensor) -> torch.Tensor:
  if images.is_floating_point():
    return images.float()
  return images.float() / 255.0


def masked_relu(x: torch.Tensor, mask: torch.Tensor, with_stats: bool = True):
  """ReLU, then the unit mask (dim 1: features or channels); and the unit statistics."""
  a = F.relu(x) * mask.to(x.dtype).view((1, -1) + (1,) * (x.dim() - 2))
  if not with_stats:
    return a, None
  abs_a, zero = a.abs(), (a == 0).to(a.dtype)
  if a.dim() > 2:
    abs_a, zero = abs_a.mean(dim=(2, 3)), zero.mean(dim=(2, 3))
  return a, UnitStats(abs_a, zero)


def _glorot(module: nn.Module) -> nn.Module:
  """Keras' (and dropnet_jax's) init: Glorot-uniform weights, zero biases."""
  nn.init.xavier_uniform_(module.weight)
  nn.init.zeros_(module.bias)
  return module


class MLP(nn.Module):
  """Model A: FC hidden layers, ReLU, mask after each."""

  def __init__(self, widths: Sequence[int] = (40, 40), num_classes: int = 10,
               image_shape: Sequence[int] = (28, 28, 1)):
    super().__init__()
    self.widths = tuple(widths)
    sizes = [int(torch.tensor(image_shape).prod()), *self.widths, num_classes]
    self.convs = nn.ModuleList()
    self.dense = nn.ModuleList(_glorot(nn.Linear(a, b)) for a, b in zip(sizes[:-1], sizes[1:]))

  def forward(self, images: torch.Tensor, masks: Masks, with_stats: bool = True):
    x = to_float(images).flatten(1)
    stats = []
    for layer, mask in zip(self.dense[:-1], masks, strict=True):
      x, s = masked_relu(layer(x), mask, with_stats)
      stats.append(s)
    return self.dense[-1](x), tuple(stats)


class ConvNet(nn.Module):
  """Model B: 3x3 same-padding convs, each ReLU -> mask -> 2x2 max-pool, then a linear classifier."""

  def __init__(self, widths: Sequence[int] = (64, 64), num_classes: int = 10,
               image_shape: Sequence[int] = (28, 28, 1)):
    super().__init__()
    self.widths = tuple(widths)
    h, w, c = image_shape
    self.convs = nn.ModuleList()
    for width in self.widths:
      self.convs.append(_glorot(nn.Conv2d(c, width, 3, padding=1)))
      h, w, c = h // 2, w // 2, width
    self.dense = nn.ModuleList([_glorot(nn.Linear(h * w * c, num_classes))])

  def forward(self, images: torch.Tensor, masks: Masks, with_stats: bool = True):
    x = to_float(images).permute(0, 3, 1, 2)  # NHWC -> NCHW
    stats = []
    for conv, mask in zip(self.convs, masks, strict=True):
      x, s = masked_relu(conv(x), mask, with_stats)
      stats.append(s)
      x = F.max_pool2d(x, 2)
    x = x.permute(0, 2, 3, 1).flatten(1)  # Flax's NHWC flatten order
    return self.dense[0](x), tuple(stats)


class ModelC(nn.Module):
  """Model C: Conv-Conv-Pool pairs (masks after each conv's ReLU), then unmasked FC `hidden`."""

  def __init__(self, widths: Sequence[int] = (64, 64, 128, 128), num_classes: int = 10,
               image_shape: Sequence[int] = (32, 32, 3), hidden: int = 256):
    super().__init__()
    if len(widths) % 2:
      raise ValueError(f'ModelC needs an even number of conv widths (pairs before each pool), got {widths}')
    self.widths = tuple(widths)
    h, w, c = image_shape
    self.convs = nn.ModuleList()
    for i, width in enumerate(self.widths):
      self.convs.append(_glorot(nn.Conv2d(c, width, 3, padding=1)))
      c = width
      if i % 2 == 1:
        h, w = h // 2, w // 2
    self.dense = nn.ModuleList([_glorot(nn.Linear(h * w * c, hidden)), _glorot(nn.Linear(hidden, num_classes))])

  def forward(self, images: torch.Tensor, masks: Masks, with_stats: bool = True):
    x = to_float(images).permute(0, 3, 1, 2)
    stats = []
    for i, (conv, mask) in enumerate(zip(self.convs, masks, strict=True)):
      x, s = masked_relu(conv(x), mask, with_stats)
      stats.append(s)
      if i % 2 == 1:
        x = F.max_pool2d(x, 2)
    x = x.permute(0, 2, 3, 1).flatten(1)
    x = F.relu(self.dense[0](x))
    return self.dense[1](x), tuple(stats)


MODELS = {'fc': MLP, 'conv': ConvNet, 'modelc': ModelC}
DEFAULT_WIDTHS = {'fc': (40, 40), 'conv': (64, 64), 'modelc': (64, 64, 128, 128)}


def create_model(name: str, widths: Sequence[int] | None, num_classes: int,
                 image_shape: Sequence[int]) -> nn.Module:
  """The torch twin of dropnet_jax.models.create_model (torch needs the input shape up front)."""
  if name not in MODELS:
    raise ValueError(f'unknown model {name!r}; choose one of {sorted(MODELS)}')
  widths = tuple(DEFAULT_WIDTHS[name] if not widths else widths)
  return MODELS[name](widths=widths, num_classes=num_classes, image_shape=tuple(image_shape))


def full_masks(model: nn.Module) -> Masks:
  return tuple(torch.ones(w, dtype=torch.float32) for w in model.widths)
