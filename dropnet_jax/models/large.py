"""The DropNet paper's large models: ResNet18 (no batch norm) and VGG19 (batch norm), masked.

Both follow the contract of `dropnet_jax.models`: `__call__(images, masks,
train=False) -> (logits, stats)`, uint8 images scaled by `to_float`, one mask
vector (and one `UnitStats`) per masked layer, `widths` with one entry per
masked layer (so `models.full_masks` works), Glorot-uniform kernels.

ResNet18 (CIFAR-style, no batch norm)
-------------------------------------
stem: conv3x3(64), stride 1, ReLU, mask; no max-pool (so 32x32 and 64x64 inputs
both work). Then 4 stages of 2 basic blocks (64, 128, 256, 512 filters; the
first block of stages 2-4 has stride 2 and a 1x1 projection shortcut), global
average pool, Dense(num_classes). Convs have biases (there is no batch norm).
3x3 convs pad 1 on each side (PyTorch-style), so stride-2 outputs are
ceil(H/2). A basic block with input x is

    h   = mask_conv1 * relu(conv1(x))                      # masked layer "blockB/conv1"
    sc  = mask_shortcut * shortcut(x)   (projection blocks)  # masked layer "blockB/shortcut"
        = x                             (identity blocks)
    out = mask_out * relu(conv2(h) + sc)                   # masked layer "blockB/out"

i.e. conv2's post-activation is the block output after the residual add and
ReLU, and its mask silences that channel of the residual stream (so conv2's
filter c, and the identity/shortcut channel c, contribute nothing downstream).
The projection shortcut has no ReLU; its mask multiplies the 1x1 conv output
and its stats are of that (linear) output: abs_mean = mean |output|, zero_frac
= fraction of exact zeros (~0 unless dropped, so APoZ never picks it).

Masked layers, in mask order (20): stem, then per block conv1, [shortcut], out:
  0 stem | 1,2 block0 | 3,4 block1 | 5,6,7 block2 (conv1, shortcut, out) | 8,9 block3
  | 10,11,12 block4 | 13,14 block5 | 15,16,17 block6 | 18,19 block7.
Widths must respect the residual adds: a block's out width equals its input
width (identity blocks; stem == block0 out == block1 out) or its shortcut width
(projection blocks); conv1 widths are free. `resnet18_widths` builds a valid tuple.

VGG19 (batch norm)
------------------
16 convs 3x3 (pad 1), 2-2-4-4-4 per stage with 64-128-256-512-512 filters, each
conv (no bias: batch norm follows) -> BatchNorm -> ReLU -> mask, and a 2x2
max-pool (stride 2, 'SAME' padding so a 1x1 map stays 1x1 and small test inputs
work; identical to 'VALID' on even sizes) after each stage. The classifier is
global average pooling then Dense(num_classes): for 32x32 inputs the last map
is 1x1, so this equals flatten -> Linear(512, num_classes) (the usual CIFAR
VGG); for 64x64 (Tiny ImageNet) it averages the 2x2 map. Batch norm is
`nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)` (the
PyTorch defaults), so init creates a 'batch_stats' collection; train with
`mutable=['batch_stats']`. The mask follows the ReLU, so a dropped filter
outputs exactly 0 whatever its BN scale/bias.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax

from dropnet_jax.models.layers import (KERNEL_INIT, InputNorm, Masks, UnitStats, dropout, masked_linear, masked_relu,
                                       to_float)

RESNET18_STAGES = (64, 128, 256, 512)
RESNET18_STRIDES = (1, 1, 2, 1, 2, 1, 2, 1)  # per block
RESNET18_PROJECTION = tuple(s != 1 for s in RESNET18_STRIDES)  # blocks 2, 4, 6
VGG19_WIDTHS = (64, 64, 128, 128, 256, 256, 256, 256, 512, 512, 512, 512, 512, 512, 512, 512)
VGG19_POOL_AFTER = (1, 3, 7, 11, 15)  # conv indices followed by a max-pool


def resnet18_layer_names() -> tuple[str, ...]:
  names = ['stem']
  for b, proj in enumerate(RESNET18_PROJECTION):
    names += [f'block{b}/conv1'] + ([f'block{b}/shortcut'] if proj else []) + [f'block{b}/out']
  return tuple(names)


def resnet18_widths(stage_widths: Sequence[int] = RESNET18_STAGES) -> tuple[int, ...]:
  """The 20 masked-layer widths of a ResNet18 whose stages have `stage_widths` filters."""
  if len(stage_widths) != 4:
    raise ValueError(f'ResNet18 has 4 stages, got stage_widths={stage_widths}')
  widths = [stage_widths[0]]
  for b, proj in enumerate(RESNET18_PROJECTION):
    w = stage_widths[b // 2]
    widths += [w, w, w] if proj else [w, w]
  return tuple(int(w) for w in widths)


def _conv3(width, stride, name, use_bias=True):
  return nn.Conv(width, (3, 3), strides=(stride, stride), padding=((1, 1), (1, 1)), use_bias=use_bias,
                 kernel_init=KERNEL_INIT, name=name)


class BasicBlock(nn.Module):
  """conv1 -> ReLU -> mask, conv2, (+ identity or masked 1x1 projection), ReLU -> mask."""
  conv1_width: int
  out_width: int
  stride: int = 1
  projection: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, masks: Masks) -> tuple[jax.Array, list[UnitStats]]:
    h, s1 = masked_relu(_conv3(self.conv1_width, self.stride, 'conv1')(x), masks[0])
    h = _conv3(self.out_width, 1, 'conv2')(h)
    stats = [s1]
    if self.projection:
      sc = nn.Conv(self.out_width, (1, 1), strides=(self.stride, self.stride), padding='VALID',
                   kernel_init=KERNEL_INIT, name='shortcut')(x)
      sc, s_sc = masked_linear(sc, masks[1])
      stats.append(s_sc)
    else:
      sc = x
    out, s_out = masked_relu(h + sc, masks[-1])
    stats.append(s_out)
    return out, stats


def check_resnet18_widths(widths: Sequence[int]) -> None:
  """Raises ValueError unless `widths` are 20 positive widths that respect the residual adds."""
  w = tuple(widths)
  if len(w) != 20 or any(int(v) != v or v <= 0 for v in w):
    raise ValueError(f'ResNet18 needs 20 positive masked-layer widths (see resnet18_widths), got {w}')
  i, width_in = 1, w[0]
  for b, proj in enumerate(RESNET18_PROJECTION):
    out = w[i + (2 if proj else 1)]
    if proj and w[i + 1] != out:
      raise ValueError(f'block{b}: shortcut width {w[i + 1]} != out width {out}')
    if not proj and width_in != out:
      raise ValueError(f'block{b}: identity shortcut needs out width {out} == input width {width_in}')
    i, width_in = i + (3 if proj else 2), out


class ResNet18(nn.Module):
  """CIFAR-style ResNet18 without batch norm; see the module docstring for the mask placement."""
  widths: Sequence[int] = resnet18_widths()
  num_classes: int = 10
  dropout: float = 0.0  # on the pooled features the classifier reads, training only
  input_norm: InputNorm = None
  initializer: str = 'glorot'  # glorot or torch: what `init_params` draws θ0 from

  @nn.compact
  def __call__(self, images: jax.Array, masks: Masks, train: bool = False):
    check_resnet18_widths(self.widths)
    if len(masks) != len(self.widths):
      raise ValueError(f'{len(masks)} masks for {len(self.widths)} masked layers')
    w = tuple(int(v) for v in self.widths)
    x = to_float(images, self.input_norm)
    x, s = masked_relu(_conv3(w[0], 1, 'stem')(x), masks[0])
    stats, i = [s], 1
    for b, (stride, proj) in enumerate(zip(RESNET18_STRIDES, RESNET18_PROJECTION)):
      n = 3 if proj else 2
      x, s = BasicBlock(w[i], w[i + n - 1], stride, proj, name=f'block{b}')(x, masks[i:i + n])
      stats += s
      i += n
    x = dropout(x.mean(axis=(1, 2)), self.dropout, train)
    logits = nn.Dense(self.num_classes, kernel_init=KERNEL_INIT, name='classifier')(x)
    return logits, tuple(stats)


class VGG19(nn.Module):
  """VGG19 with batch norm: conv -> BN -> ReLU -> mask, pools after convs 2, 4, 8, 12, 16, GAP, Dense."""
  widths: Sequence[int] = VGG19_WIDTHS
  num_classes: int = 10
  dropout: float = 0.0  # on the pooled features the classifier reads, training only
  input_norm: InputNorm = None
  initializer: str = 'glorot'  # glorot or torch: what `init_params` draws θ0 from

  @nn.compact
  def __call__(self, images: jax.Array, masks: Masks, train: bool = False):
    if len(self.widths) != 16 or any(int(v) != v or v <= 0 for v in self.widths):
      raise ValueError(f'VGG19 needs 16 positive conv widths, got {tuple(self.widths)}')
    if len(masks) != 16:
      raise ValueError(f'{len(masks)} masks for 16 masked layers')
    x = to_float(images, self.input_norm)
    stats = []
    for i, (width, mask) in enumerate(zip(self.widths, masks)):
      x = _conv3(int(width), 1, f'conv{i}', use_bias=False)(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=f'bn{i}')(x)
      x, s = masked_relu(x, mask)
      stats.append(s)
      if i in VGG19_POOL_AFTER:
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding='SAME')
    x = dropout(x.mean(axis=(1, 2)), self.dropout, train)
    logits = nn.Dense(self.num_classes, kernel_init=KERNEL_INIT, name='classifier')(x)
    return logits, tuple(stats)


def layer_names(model: nn.Module) -> tuple[str, ...]:
  """A name per masked layer, in mask order."""
  if isinstance(model, ResNet18):
    return resnet18_layer_names()
  if isinstance(model, VGG19):
    return tuple(f'conv{i}' for i in range(16))
  raise TypeError(f'not a large model: {type(model).__name__}')


def incoming_params(model: nn.Module) -> tuple[tuple[tuple[str, ...], ...], ...]:
  """Per masked layer, the param paths whose last-axis entry u feeds unit u (kernel[..., u], bias/scale[u]).

  ResNet18: 'stem' / (blockB, conv1) / (blockB, shortcut) / (blockB, conv2) for the block output.
  VGG19: (convI,) and (bnI,) (the 'batch_stats' collection has the same bnI paths).
  """
  if isinstance(model, ResNet18):
    paths = []
    for name in resnet18_layer_names():
      if name == 'stem':
        paths.append((('stem',),))
      else:
        block, role = name.split('/')
        paths.append(((block, 'conv2' if role == 'out' else role),))
    return tuple(paths)
  if isinstance(model, VGG19):
    return tuple(((f'conv{i}',), (f'bn{i}',)) for i in range(16))
  raise TypeError(f'not a large model: {type(model).__name__}')


LARGE_MODELS = {'resnet18': ResNet18, 'vgg19': VGG19}
