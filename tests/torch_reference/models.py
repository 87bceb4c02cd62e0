"""Masked torch.nn versions of dropnet_jax.models (Model A, B and C, VGG16 and VGG19).

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
  """Model C: Conv-Conv-Pool pairs (masks after each conv's ReLU), then the unmasked FC layers `head`."""

  def __init__(self, widths: Sequence[int] = (64, 64, 128, 128), num_classes: int = 10,
               image_shape: Sequence[int] = (32, 32, 3), head: Sequence[int] = (256,)):
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
    sizes = [h * w * c, *(int(v) for v in head), num_classes]
    self.dense = nn.ModuleList(_glorot(nn.Linear(a, b)) for a, b in zip(sizes[:-1], sizes[1:]))

  def forward(self, images: torch.Tensor, masks: Masks, with_stats: bool = True):
    x = to_float(images).permute(0, 3, 1, 2)
    stats = []
    for i, (conv, mask) in enumerate(zip(self.convs, masks, strict=True)):
      x, s = masked_relu(conv(x), mask, with_stats)
      stats.append(s)
      if i % 2 == 1:
        x = F.max_pool2d(x, 2)
    x = x.permute(0, 2, 3, 1).flatten(1)
    for layer in self.dense[:-1]:
      x = F.relu(layer(x))
    return self.dense[-1](x), tuple(stats)


class VGG(nn.Module):
  """dropnet_jax.models.vgg's VGG: conv (no bias) -> BatchNorm -> ReLU -> mask, a 2x2 max-pool after each
  stage (ceil_mode: Flax's 'SAME' pool), global average pool, the head's FC layers (Linear -> ReLU -> mask
  -> dropout; masked nodes), the classifier. `widths` are the conv widths then the head's, as in Flax.
  BatchNorm2d's defaults (eps 1e-5, momentum 0.1) are Flax's (1e-5, 0.9)."""
  CONV_WIDTHS: tuple[int, ...] = ()
  POOL_AFTER: tuple[int, ...] = ()

  def __init__(self, widths: Sequence[int] | None = None, num_classes: int = 10,
               image_shape: Sequence[int] = (32, 32, 3), head: Sequence[int] = (), dropout: float = 0.0):
    super().__init__()
    n, head = len(self.CONV_WIDTHS), tuple(int(v) for v in head)
    widths = self.CONV_WIDTHS + head if widths is None else tuple(int(v) for v in widths)
    if len(widths) == n:
      widths += head
    if len(widths) != n + len(head) or widths[n:] != head:
      raise ValueError(f'{type(self).__name__} needs {n} conv widths + the head {head}, got {widths}')
    self.widths, self.head, self.dropout = widths, head, dropout
    c = image_shape[-1]
    self.convs, self.bns, self.fcs = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
    for width in widths[:n]:
      self.convs.append(nn.Conv2d(c, width, 3, padding=1, bias=False))
      self.bns.append(nn.BatchNorm2d(width))
      c = width
    for width in head:
      self.fcs.append(nn.Linear(c, width))
      c = width
    self.classifier = nn.Linear(c, num_classes)

  def flax_layers(self):
    """(Flax layer name, torch module) pairs, for tests.torch_reference.weights."""
    yield from ((f'conv{i}', m) for i, m in enumerate(self.convs))
    yield from ((f'bn{i}', m) for i, m in enumerate(self.bns))
    yield from ((f'fc{j}', m) for j, m in enumerate(self.fcs))
    yield 'classifier', self.classifier

  def forward(self, images: torch.Tensor, masks: Masks, with_stats: bool = True):
    if len(masks) != len(self.widths):
      raise ValueError(f'{len(masks)} masks for {len(self.widths)} masked layers')
    n = len(self.convs)
    x = to_float(images).permute(0, 3, 1, 2)
    stats = []
    for i, (conv, bn, mask) in enumerate(zip(self.convs, self.bns, masks[:n])):
      x, s = masked_relu(bn(conv(x)), mask, with_stats)
      stats.append(s)
      if i in self.POOL_AFTER:
        x = F.max_pool2d(x, 2, ceil_mode=True)
    x = x.mean(dim=(2, 3))
    for fc, mask in zip(self.fcs, masks[n:]):
      x, s = masked_relu(fc(x), mask, with_stats)
      x = F.dropout(x, self.dropout, self.training)
      stats.append(s)
    if not self.fcs:
      x = F.dropout(x, self.dropout, self.training)
    return self.classifier(x), tuple(stats)


class VGG16(VGG):
  CONV_WIDTHS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
  POOL_AFTER = (1, 3, 6, 9, 12)


class VGG19(VGG):
  CONV_WIDTHS = (64, 64, 128, 128, 256, 256, 256, 256, 512, 512, 512, 512, 512, 512, 512, 512)
  POOL_AFTER = (1, 3, 7, 11, 15)


MODELS = {'fc': MLP, 'conv': ConvNet, 'modelc': ModelC, 'vgg16': VGG16, 'vgg19': VGG19}
DEFAULT_WIDTHS = {'fc': (40, 40), 'conv': (64, 64), 'modelc': (64, 64, 128, 128), 'vgg16': VGG16.CONV_WIDTHS,
                  'vgg19': VGG19.CONV_WIDTHS}


def create_model(name: str, widths: Sequence[int] | None, num_classes: int,
                 image_shape: Sequence[int], head: Sequence[int] | None = None,
                 stages: Sequence[int] | None = None) -> nn.Module:
  """The torch twin of dropnet_jax.models.create_model (torch needs the input shape up front); `head` for
  modelc and the VGGs (None: the model's default; a VGG's widths may end with it, as in Flax); `stages`
  for resnet18_bn (layer removal)."""
  if name not in MODELS:
    raise ValueError(f'unknown model {name!r}; choose one of {sorted(MODELS)}')
  options = {}
  if stages is not None:
    options['stages'] = tuple(stages)
    if not widths:
      widths = resnet18_widths(stages=stages)
  widths = tuple(DEFAULT_WIDTHS[name] if not widths else widths)
  if name in ('vgg16', 'vgg19'):
    n = len(MODELS[name].CONV_WIDTHS)
    options['head'] = tuple(widths[n:]) if head is None else tuple(head)
  elif head is not None:
    options['head'] = tuple(head)
  return MODELS[name](widths=widths, num_classes=num_classes, image_shape=tuple(image_shape), **options)


def full_masks(model: nn.Module) -> Masks:
  return tuple(torch.ones(w, dtype=torch.float32) for w in model.widths)


def masked_linear(x: torch.Tensor, mask: torch.Tensor, with_stats: bool = True):
  """The mask on an output without activation (a projection shortcut after its BN), with the same stats."""
  a = x * mask.to(x.dtype).view(1, -1, 1, 1)
  if not with_stats:
    return a, None
  return a, UnitStats(a.abs().mean(dim=(2, 3)), (a == 0).to(a.dtype).mean(dim=(2, 3)))


RESNET18_STRIDES = (1, 1, 2, 1, 2, 1, 2, 1)


def kept_blocks(stages: Sequence[int] = (1, 2, 3, 4)) -> list[int]:
  """Layer removal: the block indices of the kept stages (stage s holds blocks 2s-2 and 2s-1)."""
  return [b for b in range(8) if b // 2 + 1 in tuple(stages)]


def resnet18_widths(stage_widths: Sequence[int] = (64, 128, 256, 512),
                    stages: Sequence[int] = (1, 2, 3, 4)) -> tuple[int, ...]:
  """The masked-layer widths (stem; per kept block conv1, [shortcut], out), as dropnet_jax's resnet18_widths."""
  widths = [stage_widths[0]]
  for b in kept_blocks(stages):
    widths += [stage_widths[b // 2]] * (3 if RESNET18_STRIDES[b] != 1 else 2)
  return tuple(int(w) for w in widths)


class BasicBlockBN(nn.Module):
  """kuangliu/pytorch-cifar's BasicBlock with dropnet_jax.models.resnet_bn's masks."""

  def __init__(self, c_in: int, conv1_width: int, out_width: int, stride: int, projection: bool):
    super().__init__()
    self.conv1 = nn.Conv2d(c_in, conv1_width, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(conv1_width)
    self.conv2 = nn.Conv2d(conv1_width, out_width, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(out_width)
    self.projection = projection
    if projection:
      self.shortcut = nn.Conv2d(c_in, out_width, 1, stride, bias=False)
      self.shortcut_bn = nn.BatchNorm2d(out_width)

  def forward(self, x: torch.Tensor, masks: Masks | None, with_stats: bool = True):
    """`masks=None`: the unmasked network (what Torch-Pruning traces)."""
    m = (lambda i: masks[i]) if masks is not None else (lambda i: None)
    stats = []
    h = self.bn1(self.conv1(x))
    h, s = masked_relu(h, m(0), with_stats) if masks is not None else (F.relu(h), None)
    stats.append(s)
    h = self.bn2(self.conv2(h))
    sc = x
    if self.projection:
      sc = self.shortcut_bn(self.shortcut(x))
      if masks is not None:
        sc, s = masked_linear(sc, m(1), with_stats)
        stats.append(s)
    out = h + sc
    out, s = masked_relu(out, m(len(masks) - 1), with_stats) if masks is not None else (F.relu(out), None)
    stats.append(s)
    return out, stats


class ResNet18BN(nn.Module):
  """The CIFAR ResNet18 with batch norm (kuangliu/pytorch-cifar), masked as dropnet_jax's resnet18_bn.

  PyTorch's default initialisation (the layers' own). Module names follow the Flax ones ('stem',
  'stem_bn', 'block0.conv1', ..., 'classifier') so `weights.load_flax_variables` maps them directly.
  `stages`: the kept stages (layer removal: a removed stage's blocks are not built, the classifier reads
  the last kept stage), written independently of dropnet_jax's `resnet18_blocks`.
  """

  def __init__(self, widths: Sequence[int] | None = None, num_classes: int = 10,
               image_shape: Sequence[int] = (32, 32, 3), stages: Sequence[int] = (1, 2, 3, 4)):
    super().__init__()
    self.stages = tuple(stages)
    self.widths = w = tuple(int(v) for v in (widths or resnet18_widths(stages=self.stages)))
    self.stem = nn.Conv2d(image_shape[-1], w[0], 3, 1, 1, bias=False)
    self.stem_bn = nn.BatchNorm2d(w[0])
    self.block_sizes, c, i = [], w[0], 1
    for b in kept_blocks(self.stages):
      stride = RESNET18_STRIDES[b]
      n = 3 if stride != 1 else 2
      self.add_module(f'block{b}', BasicBlockBN(c, w[i], w[i + n - 1], stride, stride != 1))
      self.block_sizes.append(n)
      c, i = w[i + n - 1], i + n
    if i != len(w):
      raise ValueError(f'{len(w)} widths for {i} masked layers (stages {self.stages})')
    self.classifier = nn.Linear(c, num_classes)

  def blocks(self):
    return [getattr(self, f'block{b}') for b in kept_blocks(self.stages)]

  def features(self, x: torch.Tensor, masks: Masks | None, with_stats: bool = True):
    """NCHW float input -> pooled features, stats (`masks=None`: unmasked)."""
    x = self.stem_bn(self.stem(x))
    x, s = masked_relu(x, masks[0], with_stats) if masks is not None else (F.relu(x), None)
    stats, i = [s], 1
    for block, n in zip(self.blocks(), self.block_sizes):
      x, s = block(x, None if masks is None else masks[i:i + n], with_stats)
      stats += s
      i += n
    return x.mean(dim=(2, 3)), tuple(stats)

  def forward(self, images: torch.Tensor, masks: Masks, with_stats: bool = True):
    x, stats = self.features(to_float(images).permute(0, 3, 1, 2), masks, with_stats)
    return self.classifier(x), stats


MODELS['resnet18_bn'] = ResNet18BN
DEFAULT_WIDTHS['resnet18_bn'] = resnet18_widths()
