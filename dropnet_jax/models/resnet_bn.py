"""ResNet18 with batch norm, masked: the CIFAR ResNet18 of the common PyTorch repositories.

Why a second ResNet18: the DropNet paper's ResNet18 (`large.ResNet18`) has no
batch norm and conv biases; the CIFAR-10 reports this project reproduces
(magnitude pruning, "ResNet18 under 5 M parameters") use the ResNet18 of
kuangliu/pytorch-cifar, which trains at lr 0.1 because of its batch norm:

  stem: conv3x3(64), stride 1, no bias -> BN -> ReLU; no max-pool;
  4 stages x 2 BasicBlocks (64, 128, 256, 512 filters; the first block of
  stages 2-4 has stride 2 and a 1x1 conv (no bias, same stride) -> BN
  projection shortcut); global average pool; Linear(num_classes) with bias.
  11,173,962 parameters for CIFAR-10 (torch's count: BN running statistics
  are buffers, here the 'batch_stats' collection, not parameters).

Masks are placed as in `large.ResNet18` (its docstring has the 20 masked
layers and the residual-group width rules, which `check_resnet18_widths`
enforces): after each BN -> ReLU (stem, conv1 of each block), after the
projection shortcut's BN (linear, no ReLU: `masked_linear`), and after the
block's add + ReLU (the block output, whose mask silences that channel of the
residual stream). A block with input x is

    h   = mask_conv1 * relu(bn1(conv1(x)))
    sc  = mask_shortcut * shortcut_bn(shortcut(x))   (projection blocks)
        = x                                          (identity blocks)
    out = mask_out * relu(bn2(conv2(h)) + sc)

Batch norm is `layers.BatchNorm(use_running_average=not train, momentum=0.9,
epsilon=1e-5)` (PyTorch's defaults and running statistics: the unbiased batch
variance folds into the running one), so θ carries a 'batch_stats' collection
(`dropnet_jax.theta`); training applies the model with
`mutable=['batch_stats']`. The default initializer ('auto') is PyTorch's
(`small.TORCH_INIT_MODELS`): kernels and the classifier's bias U(±1/√fan_in),
BN scale 1 / bias 0.

The trunk is shared with the compact network (`models.compact.CompactResNet18BN`):
with `shortcut_index` each block gathers its shortcut channels (-1: a zero
channel), and widths may be 0; with `shortcut_index=None` it is the masked
model's identity map.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax

from dropnet_jax.models.large import (ALL_STAGES, check_resnet18_widths, resnet18_blocks, resnet18_layer_names,
                                      resnet18_widths)
from dropnet_jax.models.layers import (KERNEL_INIT, BatchNorm, InputNorm, Masks, UnitStats, dropout,
                                       gather_channels, masked_linear, masked_relu, to_float)

Initializer = Callable[..., Any]


def _batch_norm(train: bool, name: str) -> BatchNorm:
  return BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


def _conv(width: int, size: int, stride: int, name: str, kernel_init: Initializer) -> nn.Conv:
  pad = (size - 1) // 2  # 1 for 3x3 (PyTorch-style: stride-2 outputs are ceil(H/2)), 0 for the 1x1 shortcut
  return nn.Conv(width, (size, size), strides=(stride, stride), padding=((pad, pad), (pad, pad)), use_bias=False,
                 kernel_init=kernel_init, name=name)


class BasicBlockBN(nn.Module):
  """conv1 -> BN -> ReLU -> mask, conv2 -> BN, (+ identity or 1x1 conv -> BN -> mask), ReLU -> mask."""
  conv1_width: int
  out_width: int
  stride: int = 1
  projection: bool = False
  shortcut_width: int = 0  # projection blocks only
  shortcut_index: tuple[int, ...] | None = None  # compact networks: gathered shortcut channels
  kernel_init: Initializer = KERNEL_INIT

  @nn.compact
  def __call__(self, x: jax.Array, masks: Masks, train: bool) -> tuple[jax.Array, list[UnitStats]]:
    h = _batch_norm(train, 'bn1')(_conv(self.conv1_width, 3, self.stride, 'conv1', self.kernel_init)(x))
    h, s1 = masked_relu(h, masks[0])
    h = _batch_norm(train, 'bn2')(_conv(self.out_width, 3, 1, 'conv2', self.kernel_init)(h))
    stats = [s1]
    if self.projection:
      sc = _conv(self.shortcut_width, 1, self.stride, 'shortcut', self.kernel_init)(x)
      sc, s_sc = masked_linear(_batch_norm(train, 'shortcut_bn')(sc), masks[1])
      stats.append(s_sc)
    else:
      sc = x
    if self.shortcut_index is not None:
      sc = gather_channels(sc, self.shortcut_index)
    out, s_out = masked_relu(h + sc, masks[-1])
    stats.append(s_out)
    return out, stats


def resnet18_bn_trunk(images: jax.Array, widths: Sequence[int], masks: Masks, train: bool, input_norm: InputNorm,
                      shortcut_index: Sequence[Sequence[int]] | None = None,
                      kernel_init: Initializer = KERNEL_INIT,
                      stages: Sequence[int] = ALL_STAGES) -> tuple[jax.Array, tuple[UnitStats, ...]]:
  """The pooled features and per-layer stats (call inside a compact module, which owns the layers);
  `shortcut_index`: one entry per kept block, in order."""
  w = tuple(int(v) for v in widths)
  x = to_float(images, input_norm)
  x = _batch_norm(train, 'stem_bn')(_conv(w[0], 3, 1, 'stem', kernel_init)(x))
  x, s = masked_relu(x, masks[0])
  stats, i = [s], 1
  for j, blk in enumerate(resnet18_blocks(stages)):
    b, stride, proj = blk.index, blk.stride, blk.projection
    n = 3 if proj else 2
    index = None if shortcut_index is None else tuple(int(k) for k in shortcut_index[j])
    if index is not None and len(index) != w[i + n - 1]:
      raise ValueError(f'block{b}: shortcut_index has {len(index)} entries for out width {w[i + n - 1]}')
    block = BasicBlockBN(w[i], w[i + n - 1], stride, proj, w[i + 1] if proj else 0, index, kernel_init,
                         name=f'block{b}')
    x, s = block(x, masks[i:i + n], train)
    stats += s
    i += n
  return x.mean(axis=(1, 2)), tuple(stats)


class ResNet18BN(nn.Module):
  """CIFAR ResNet18 with batch norm (kuangliu/pytorch-cifar); see the module docstring for the masks."""
  widths: Sequence[int] = resnet18_widths()
  num_classes: int = 10
  dropout: float = 0.0  # on the pooled features the classifier reads, training only
  input_norm: InputNorm = None
  initializer: str = 'glorot'  # glorot or torch: what `init_params` draws θ0 from ('auto' picks torch)
  stages: tuple[int, ...] = ALL_STAGES  # the kept stages (layer removal: `large`'s docstring)

  @nn.compact
  def __call__(self, images: jax.Array, masks: Masks, train: bool = False):
    check_resnet18_widths(self.widths, self.stages)
    if len(masks) != len(self.widths):
      raise ValueError(f'{len(masks)} masks for {len(self.widths)} masked layers')
    x, stats = resnet18_bn_trunk(images, self.widths, masks, train, self.input_norm, stages=self.stages)
    x = dropout(x, self.dropout, train)
    logits = nn.Dense(self.num_classes, kernel_init=KERNEL_INIT, name='classifier')(x)
    return logits, stats


def incoming_params(model: nn.Module) -> tuple[tuple[tuple[str, ...], ...], ...]:
  """Per masked layer, the param paths whose last-axis entry u feeds unit u: the conv and its BN
  ('stem' / 'stem_bn', (blockB, conv1) / bn1, shortcut / shortcut_bn, conv2 / bn2 for the block output;
  the 'batch_stats' collection has the same BN paths)."""
  roles = {'conv1': ('conv1', 'bn1'), 'shortcut': ('shortcut', 'shortcut_bn'), 'out': ('conv2', 'bn2')}
  paths = []
  for name in resnet18_layer_names(model.stages):
    if name == 'stem':
      paths.append((('stem',), ('stem_bn',)))
    else:
      block, role = name.split('/')
      paths.append(tuple((block, part) for part in roles[role]))
  return tuple(paths)

