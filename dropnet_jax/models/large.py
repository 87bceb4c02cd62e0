"""The DropNet paper's large models: ResNet18 (no batch norm), masked; VGG16/VGG19 live in `vgg`.

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

Layer removal (`stages`, a model field, so spec.json and compact networks carry it): the
kept stages, e.g. (1, 2, 3) for the "under 5 M" report's network without stage 4
(11.2 M -> 2.8 M parameters). A removed stage's two blocks are absent; the others keep
their structure and names (stage s holds block{2s-2} and block{2s-1}), so the first
block of every kept stage s >= 2 is still a stride-2 projection block and the
classifier reads the last kept stage's channels (256 without stage 4). Why any stage
can go: the stem and every stage >= 2 start with a projection, so the shapes always
fit. `resnet18_blocks(stages)` is the one description every user of the block
structure reads (models, compaction, accounting, the torch twin).

VGG16 and VGG19 (batch norm, configurable head): `dropnet_jax.models.vgg`; `VGG19`,
`VGG19_WIDTHS` and `VGG19_POOL_AFTER` are re-exported here for existing importers.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import flax.linen as nn
import jax

from dropnet_jax.models import vgg as vgg_models
from dropnet_jax.models.vgg import VGG16, VGG19, VGG19_POOL_AFTER, VGG19_WIDTHS  # noqa: F401
from dropnet_jax.models.layers import (KERNEL_INIT, InputNorm, Masks, UnitStats, dropout, masked_linear, masked_relu,
                                       to_float)

RESNET18_STAGES = (64, 128, 256, 512)
RESNET18_STRIDES = (1, 1, 2, 1, 2, 1, 2, 1)  # per block
RESNET18_PROJECTION = tuple(s != 1 for s in RESNET18_STRIDES)  # blocks 2, 4, 6
ALL_STAGES = (1, 2, 3, 4)


class ResBlock(NamedTuple):
  """One basic block of a (possibly stage-removed) ResNet18."""
  index: int  # its position in the full network: named f'block{index}'
  stage: int  # 1..4
  stride: int
  projection: bool


def check_stages(stages: Sequence[int]) -> tuple[int, ...]:
  """`stages` as a tuple; ValueError unless it is a non-empty increasing subset of 1..4."""
  kept = tuple(int(s) for s in stages)
  if not kept or any(s not in ALL_STAGES for s in kept) or list(kept) != sorted(set(kept)):
    raise ValueError(f'stages must be an increasing non-empty subset of 1,2,3,4 (the kept ResNet18 stages), '
                     f'got {",".join(map(str, stages))}')
  return kept


def resnet18_blocks(stages: Sequence[int] = ALL_STAGES) -> tuple[ResBlock, ...]:
  """The blocks of the kept `stages`, in order."""
  return tuple(ResBlock(b, b // 2 + 1, RESNET18_STRIDES[b], RESNET18_PROJECTION[b])
               for b in range(8) if b // 2 + 1 in check_stages(stages))


def resnet18_layer_names(stages: Sequence[int] = ALL_STAGES) -> tuple[str, ...]:
  names = ['stem']
  for blk in resnet18_blocks(stages):
    b = blk.index
    names += [f'block{b}/conv1'] + ([f'block{b}/shortcut'] if blk.projection else []) + [f'block{b}/out']
  return tuple(names)


def resnet18_widths(stage_widths: Sequence[int] = RESNET18_STAGES,
                    stages: Sequence[int] = ALL_STAGES) -> tuple[int, ...]:
  """The masked-layer widths (20 with every stage) of a ResNet18 whose 4 stages have `stage_widths`
  filters (the stem has stage 1's, also when stage 1 is removed), keeping `stages`."""
  if len(stage_widths) != 4:
    raise ValueError(f'ResNet18 has 4 stages, got stage_widths={stage_widths}')
  widths = [stage_widths[0]]
  for blk in resnet18_blocks(stages):
    w = stage_widths[blk.stage - 1]
    widths += [w, w, w] if blk.projection else [w, w]
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


def check_resnet18_widths(widths: Sequence[int], stages: Sequence[int] = ALL_STAGES) -> None:
  """Raises ValueError unless `widths` are positive widths, one per masked layer of the kept `stages`
  (20 with all four), that respect the residual adds."""
  w, n = tuple(widths), len(resnet18_layer_names(stages))
  if len(w) != n or any(int(v) != v or v <= 0 for v in w):
    raise ValueError(f'ResNet18 with stages {",".join(map(str, stages))} needs {n} positive masked-layer widths '
                     f'(see resnet18_widths), got {w}')
  i, width_in = 1, w[0]
  for blk in resnet18_blocks(stages):
    b, proj = blk.index, blk.projection
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
  stages: tuple[int, ...] = ALL_STAGES  # the kept stages (layer removal; see the module docstring)

  @nn.compact
  def __call__(self, images: jax.Array, masks: Masks, train: bool = False):
    check_resnet18_widths(self.widths, self.stages)
    if len(masks) != len(self.widths):
      raise ValueError(f'{len(masks)} masks for {len(self.widths)} masked layers')
    w = tuple(int(v) for v in self.widths)
    x = to_float(images, self.input_norm)
    x, s = masked_relu(_conv3(w[0], 1, 'stem')(x), masks[0])
    stats, i = [s], 1
    for blk in resnet18_blocks(self.stages):
      proj = blk.projection
      n = 3 if proj else 2
      x, s = BasicBlock(w[i], w[i + n - 1], blk.stride, proj, name=f'block{blk.index}')(x, masks[i:i + n])
      stats += s
      i += n
    x = dropout(x.mean(axis=(1, 2)), self.dropout, train)
    logits = nn.Dense(self.num_classes, kernel_init=KERNEL_INIT, name='classifier')(x)
    return logits, tuple(stats)


def layer_names(model: nn.Module) -> tuple[str, ...]:
  """A name per masked layer, in mask order."""
  from dropnet_jax.models import resnet_bn  # here: resnet_bn imports this module
  if isinstance(model, (ResNet18, resnet_bn.ResNet18BN)):
    return resnet18_layer_names(model.stages)
  if isinstance(model, vgg_models.VGG):
    return vgg_models.layer_names(model)
  raise TypeError(f'not a large model: {type(model).__name__}')


def incoming_params(model: nn.Module) -> tuple[tuple[tuple[str, ...], ...], ...]:
  """Per masked layer, the param paths whose last-axis entry u feeds unit u (kernel[..., u], bias/scale[u]).

  ResNet18: 'stem' / (blockB, conv1) / (blockB, shortcut) / (blockB, conv2) for the block output.
  ResNet18BN: the same convs, each with its BN (`resnet_bn.incoming_params`).
  VGG16/VGG19: (convI,) and (bnI,) (the 'batch_stats' collection has the same bnI paths), (fcJ,) for the head.
  """
  from dropnet_jax.models import resnet_bn  # here: resnet_bn imports this module
  if isinstance(model, resnet_bn.ResNet18BN):
    return resnet_bn.incoming_params(model)
  if isinstance(model, ResNet18):
    paths = []
    for name in resnet18_layer_names(model.stages):
      if name == 'stem':
        paths.append((('stem',),))
      else:
        block, role = name.split('/')
        paths.append(((block, 'conv2' if role == 'out' else role),))
    return tuple(paths)
  if isinstance(model, vgg_models.VGG):
    return vgg_models.incoming_params(model)
  raise TypeError(f'not a large model: {type(model).__name__}')


LARGE_MODELS = {'resnet18': ResNet18, **vgg_models.VGG_MODELS}
