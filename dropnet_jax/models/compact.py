"""Model classes that only compacted networks need, and the JSON spec <-> model mapping.

`dropnet_jax.compaction.compact` turns a masked network into a smaller dense one. For
Models A/B/C and VGG16/VGG19 the result is the same class with the kept widths. Two
cases need a class of their own:

* `CompactResNet18`: ResNet18 whose residual adds gather channels. In the
  masked ResNet18 every block output, the stem and the projection shortcuts
  write into a residual stream whose channels they share, each with its own
  mask. The compact network keeps, for every tensor of the stream, only the
  channels that are kept *and* read downstream, so two tensors added together
  may hold different channel sets. Each block therefore carries a static
  `shortcut_index`: for each of its kept output channels, the position of the
  same channel in the shortcut tensor (the block input, or the projection
  output), or -1 where the shortcut holds no such channel (it is exactly 0
  there in the masked network). The block computes
      out = relu(conv2(h) + gather(shortcut, shortcut_index))
  which is the masked block restricted to its kept channels. Widths may be 0
  (a dropped conv1 or shortcut; a conv reading 0 channels outputs its bias),
  which the library's ResNet18 (Glorot init on a zero-size kernel divides by
  zero) cannot express. With identity index maps it is ResNet18 exactly.
  `CompactResNet18BN` is the same for `resnet18_bn` (the trunk of
  `resnet_bn`, each BN sliced with its conv).
* `ConstantModel`: the network whose output does not depend on the input (a
  chain with a layer that has no units left, or a ResNet whose residual stream
  is cut): its logits are one vector, stored as a bias.

All follow the `dropnet_jax.models` contract: `__call__(images, masks,
train=False) -> (logits, stats)` with one mask per entry of `widths`, so
`models.full_masks` works (ConstantModel has no masked layers: widths == ()).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dropnet_jax import models

from dropnet_jax.models import large as large_models
from dropnet_jax.models import resnet_bn
from dropnet_jax.models.layers import (KERNEL_INIT, InputNorm, Masks, gather_channels,  # noqa: F401 (re-exported)
                                       masked_linear, masked_relu, to_float)


def zero_safe_init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
  """Glorot-uniform, or zeros for a zero-size kernel (whose fan computation divides by zero)."""
  if math.prod(shape) == 0:
    return jnp.zeros(shape, dtype)
  return KERNEL_INIT(key, shape, dtype)


def _conv(width: int, size: int, stride: int, name: str) -> nn.Conv:
  pad = (size - 1) // 2  # 1 for 3x3 (PyTorch-style, as large_models), 0 for the 1x1 shortcut
  return nn.Conv(width, (size, size), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                 kernel_init=zero_safe_init, name=name)


class CompactBlock(nn.Module):
  """A basic block with a gathered residual add (see the module docstring)."""
  conv1_width: int
  out_width: int
  shortcut_index: tuple[int, ...]
  stride: int = 1
  projection: bool = False
  shortcut_width: int = 0

  @nn.compact
  def __call__(self, x: jax.Array, masks: Masks):
    h, s1 = masked_relu(_conv(self.conv1_width, 3, self.stride, 'conv1')(x), masks[0])
    h = _conv(self.out_width, 3, 1, 'conv2')(h)
    stats = [s1]
    if self.projection:
      sc, s_sc = masked_linear(_conv(self.shortcut_width, 1, self.stride, 'shortcut')(x), masks[1])
      stats.append(s_sc)
    else:
      sc = x
    out, s_out = masked_relu(h + gather_channels(sc, self.shortcut_index), masks[-1])
    stats.append(s_out)
    return out, stats


def _check_sizes(cls: str, stages, widths, masks, shortcut_index) -> None:
  layers, blocks = len(large_models.resnet18_layer_names(stages)), len(large_models.resnet18_blocks(stages))
  if len(widths) != layers or len(masks) != layers or len(shortcut_index) != blocks:
    raise ValueError(f'{cls} needs {layers} widths, {layers} masks and {blocks} index maps, got '
                     f'{len(widths)}, {len(masks)}, {len(shortcut_index)}')


class CompactResNet18(nn.Module):
  """ResNet18 (no batch norm) with free per-tensor widths and gathered residual adds.

  `widths`: the 20 masked-layer widths in `large_models.resnet18_layer_names`
  order (any may be 0); `shortcut_index`: one tuple per block, as long as the
  block's out width. Parameter names are ResNet18's.
  """
  widths: tuple[int, ...]
  shortcut_index: tuple[tuple[int, ...], ...]
  num_classes: int = 10
  input_norm: InputNorm = None
  stages: tuple[int, ...] = large_models.ALL_STAGES  # the kept stages of the masked network (layer removal)

  @nn.compact
  def __call__(self, images: jax.Array, masks: Masks, train: bool = False):
    del train  # an eval-mode network: no batch norm, and no dropout
    w = tuple(int(v) for v in self.widths)
    _check_sizes(type(self).__name__, self.stages, w, masks, self.shortcut_index)
    x, s = masked_relu(_conv(w[0], 3, 1, 'stem')(to_float(images, self.input_norm)), masks[0])
    stats, i = [s], 1
    for j, blk in enumerate(large_models.resnet18_blocks(self.stages)):
      b, stride, proj = blk.index, blk.stride, blk.projection
      n = 3 if proj else 2
      index = tuple(self.shortcut_index[j])
      if len(index) != w[i + n - 1]:
        raise ValueError(f'block{b}: shortcut_index has {len(index)} entries for out width {w[i + n - 1]}')
      block = CompactBlock(w[i], w[i + n - 1], index, stride, proj, w[i + 1] if proj else 0, name=f'block{b}')
      x, s = block(x, masks[i:i + n])
      stats += s
      i += n
    logits = nn.Dense(self.num_classes, kernel_init=zero_safe_init, name='classifier')(x.mean(axis=(1, 2)))
    return logits, tuple(stats)


class CompactResNet18BN(nn.Module):
  """ResNet18 with batch norm (`resnet_bn.ResNet18BN`) as CompactResNet18 is ResNet18: free per-tensor
  widths (any may be 0), gathered residual adds, every conv's BN sliced with it; parameter names are
  ResNet18BN's. An eval-mode network (compaction keeps the running statistics; no dropout)."""
  widths: tuple[int, ...]
  shortcut_index: tuple[tuple[int, ...], ...]
  num_classes: int = 10
  input_norm: InputNorm = None
  stages: tuple[int, ...] = large_models.ALL_STAGES

  @nn.compact
  def __call__(self, images: jax.Array, masks: Masks, train: bool = False):
    _check_sizes(type(self).__name__, self.stages, self.widths, masks, self.shortcut_index)
    x, stats = resnet_bn.resnet18_bn_trunk(images, self.widths, masks, train, self.input_norm,
                                           self.shortcut_index, zero_safe_init, self.stages)
    logits = nn.Dense(self.num_classes, kernel_init=zero_safe_init, name='classifier')(x)
    return logits, stats


class ConstantModel(nn.Module):
  """A network whose logits do not depend on the input: one learned vector per class, no masked layers."""
  num_classes: int = 10
  widths: tuple[int, ...] = ()

  @nn.compact
  def __call__(self, images: jax.Array, masks: Masks = (), train: bool = False):
    del train
    if masks:
      raise ValueError('ConstantModel has no masked layers; pass masks=()')
    bias = self.param('bias', nn.initializers.zeros_init(), (self.num_classes,))
    return jnp.broadcast_to(bias, (images.shape[0], self.num_classes)), ()


def model_name(model: nn.Module) -> str:
  """The spec name of a model instance ('fc', 'conv', 'modelc', 'resnet18', 'vgg16', 'vgg19', ...)."""
  compact_classes = {'resnet18_compact': CompactResNet18, 'resnet18_bn_compact': CompactResNet18BN,
                     'constant': ConstantModel}
  for name, cls in {**models.MODELS, **compact_classes}.items():
    if type(model) is cls:
      return name
  raise TypeError(f'not a dropnet_jax model: {type(model).__name__}')


# Model fields a spec carries besides name, widths and classes (when the model has them).
OPTION_FIELDS = ('head', 'dropout', 'initializer', 'input_norm', 'stages')


def _jsonable(value):
  if isinstance(value, (tuple, list)):
    return [_jsonable(v) for v in value]
  return value


def spec_of(model: nn.Module) -> dict[str, Any]:
  """A JSON-able description from which `model_from_spec` rebuilds the same module."""
  spec = {'model': model_name(model), 'widths': [int(w) for w in model.widths], 'num_classes': int(model.num_classes)}
  for field in OPTION_FIELDS:
    if hasattr(model, field):
      spec[field] = _jsonable(getattr(model, field))
  if isinstance(model, (CompactResNet18, CompactResNet18BN)):
    spec['shortcut_index'] = [[int(i) for i in idx] for idx in model.shortcut_index]
  return spec


def model_from_spec(spec: dict[str, Any]) -> nn.Module:
  """The module `spec` describes (the library's constructors for the library's families). Specs
  written before the option fields existed rebuild with the defaults (Model C's 'hidden' as its head)."""
  name, widths, num_classes = spec['model'], tuple(int(w) for w in spec['widths']), int(spec['num_classes'])
  norm = spec.get('input_norm')
  norm = None if norm is None else tuple(tuple(float(v) for v in part) for part in norm)
  if name == 'constant':
    return ConstantModel(num_classes=num_classes)
  if name in ('resnet18_compact', 'resnet18_bn_compact'):
    index = tuple(tuple(int(i) for i in idx) for idx in spec['shortcut_index'])
    cls = CompactResNet18 if name == 'resnet18_compact' else CompactResNet18BN
    return cls(widths=widths, shortcut_index=index, num_classes=num_classes, input_norm=norm,
               stages=tuple(spec.get('stages', large_models.ALL_STAGES)))
  head = spec.get('head')
  if head is None and 'hidden' in spec:
    head = [spec['hidden']]
  return models.create_model(name, widths, num_classes, head=head, dropout=float(spec.get('dropout', 0.0)),
                             initializer=spec.get('initializer', 'auto'), input_norm=norm, stages=spec.get('stages'))
