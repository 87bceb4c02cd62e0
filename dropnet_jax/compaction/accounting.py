"""Parameters and multiply-accumulates (MACs) of dense, masked and compact networks.

Counted analytically, per layer and in total, for one example:

* params: kernel + bias entries (+ batch-norm scale and bias); batch norm's
  running mean/variance are state, reported as `batch_stats`.
* macs: the usual convention (thop, Torch-Pruning's `count_ops_and_params`
  without its bias/activation terms): a conv costs out_h * out_w * k * k *
  in_channels * out_channels, padding taps included; a Dense in * out.
* macs_valid: the same without the taps that fall on zero padding. This is
  what XLA's cost analysis counts for a convolution (2 flops per valid MAC),
  so it is the figure to compare with `xla_flops`.

Elementwise work (bias adds, ReLU, masks, pooling, batch norm, the uint8 ->
float scaling) is not counted as MACs.

Three views of one network:
* `count(model, image_shape)`: the network as built. A masked network's
  arrays are full size and XLA computes every unit, so this is also what a
  masked network costs to run.
* `masked_counts(model, image_shape, masks)`: the effective network, i.e. the
  weights that can influence the logits under `masks`; by construction the
  count of `compact.compact_model(model, masks)` (a constant network: its
  `num_classes` logits and no MACs).
* `count(small_model, image_shape)` of a compacted model gives the same numbers.

`xla_flops` compiles the eval-mode forward pass (logits only, so the unit
statistics are dead code) and returns XLA's flop count:
    flops = 2 * macs_valid + elementwise terms,
each elementwise op counting about one flop per element it produces. The
tests check 2 * macs_valid <= flops <= 2 * macs_valid + c * (elements of all
layer outputs and of the input) with a documented small c, and check each
layer's formula against XLA exactly by compiling that layer's conv/dot alone.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dropnet_jax import theta as theta_lib
from dropnet_jax import models

from dropnet_jax.compaction import compact

from dropnet_jax.models import large as large_models
from dropnet_jax.models import vgg as vgg_models
from dropnet_jax.models import resnet_bn
from dropnet_jax.models.compact import CompactResNet18, CompactResNet18BN, ConstantModel
from dropnet_jax.models.layers import Masks


class LayerCount(NamedTuple):
  """One layer's shape and cost for one example."""
  name: str  # the Flax parameter path, '/'-joined
  kind: str  # 'dense', 'conv', 'batchnorm' or 'bias' (a ConstantModel's logits)
  in_features: int
  out_features: int
  kernel: int  # square kernel size (1 for dense)
  stride: int
  padding: int  # zero padding on each side
  in_hw: tuple[int, int]  # (1, 1) for dense
  out_hw: tuple[int, int]
  params: int
  macs: int
  macs_valid: int


class Counts(NamedTuple):
  layers: tuple[LayerCount, ...]
  params: int
  macs: int
  macs_valid: int
  batch_stats: int  # batch norm running mean + variance entries (not parameters)

  def as_dict(self) -> dict[str, int]:
    return {'params': self.params, 'macs': self.macs, 'macs_valid': self.macs_valid, 'batch_stats': self.batch_stats}


def _valid_taps(n: int, k: int, stride: int, pad: int, out: int) -> int:
  """Pairs (output position, kernel tap) along one axis whose input index lies inside [0, n)."""
  o = np.arange(out)[:, None] * stride + np.arange(k)[None, :] - pad
  return int(((o >= 0) & (o < n)).sum())


def _conv(name, hw, cin, cout, k, stride, pad, bias=True):
  out_hw = tuple((n + 2 * pad - k) // stride + 1 for n in hw)
  per_tap = cin * cout
  macs = out_hw[0] * out_hw[1] * k * k * per_tap
  valid = _valid_taps(hw[0], k, stride, pad, out_hw[0]) * _valid_taps(hw[1], k, stride, pad, out_hw[1]) * per_tap
  params = k * k * per_tap + (cout if bias else 0)
  return LayerCount(name, 'conv', cin, cout, k, stride, pad, tuple(hw), out_hw, params, macs, valid), out_hw


def _dense(name, fin, fout):
  return LayerCount(name, 'dense', fin, fout, 1, 1, 0, (1, 1), (1, 1), fin * fout + fout, fin * fout, fin * fout)


def _bn(name, hw, c):
  return LayerCount(name, 'batchnorm', c, c, 1, 1, 0, tuple(hw), tuple(hw), 2 * c, 0, 0)


RESNETS = (large_models.ResNet18, CompactResNet18, resnet_bn.ResNet18BN, CompactResNet18BN)


def _layers(model: nn.Module, image_shape: Sequence[int]) -> list[LayerCount]:
  h, w, c = (int(v) for v in image_shape)
  hw, out = (h, w), []
  widths = [int(v) for v in model.widths]
  if isinstance(model, ConstantModel):
    return [LayerCount('bias', 'bias', 0, model.num_classes, 1, 1, 0, (1, 1), (1, 1), model.num_classes, 0, 0)]
  if isinstance(model, models.MLP):
    sizes = [h * w * c, *widths, model.num_classes]
    return [_dense(f'Dense_{i}', a, b) for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))]
  if isinstance(model, (models.ConvNet, models.ModelC)):
    for i, width in enumerate(widths):
      layer, hw = _conv(f'Conv_{i}', hw, c, width, 3, 1, 1)
      out.append(layer)
      c = width
      if isinstance(model, models.ConvNet) or i % 2 == 1:
        hw = (hw[0] // 2, hw[1] // 2)  # 2x2 'VALID' max-pool
    if isinstance(model, models.ModelC):
      sizes = [hw[0] * hw[1] * c, *(int(v) for v in model.head), model.num_classes]
      return out + [_dense(f'Dense_{i}', a, b) for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))]
    return out + [_dense('Dense_0', hw[0] * hw[1] * c, model.num_classes)]
  if isinstance(model, vgg_models.VGG):
    n = model.num_convs()
    for i, width in enumerate(widths[:n]):
      layer, hw = _conv(f'conv{i}', hw, c, width, 3, 1, 1, bias=False)
      out += [layer, _bn(f'bn{i}', hw, width)]
      c = width
      if i in model.POOL_AFTER:
        hw = (-(-hw[0] // 2), -(-hw[1] // 2))  # 'SAME' max-pool
    for j, width in enumerate(widths[n:]):  # after global average pooling: c features
      out.append(_dense(f'fc{j}', c, width))
      c = width
    return out + [_dense('classifier', c, model.num_classes)]
  if isinstance(model, RESNETS):
    bn = isinstance(model, (resnet_bn.ResNet18BN, CompactResNet18BN))  # no conv biases; a BN after each conv

    def conv(name, bn_name, hw, cin, cout, k, stride, pad):
      layer, out_hw = _conv(name, hw, cin, cout, k, stride, pad, bias=not bn)
      return ([layer, _bn(bn_name, out_hw, cout)] if bn else [layer]), out_hw

    layers, hw = conv('stem', 'stem_bn', hw, c, widths[0], 3, 1, 1)
    out += layers
    c, i = widths[0], 1
    for blk in large_models.resnet18_blocks(model.stages):
      b, stride, proj = blk.index, blk.stride, blk.projection
      c1, wo = widths[i], widths[i + (2 if proj else 1)]
      l1, hw_out = conv(f'block{b}/conv1', f'block{b}/bn1', hw, c, c1, 3, stride, 1)
      l2, _ = conv(f'block{b}/conv2', f'block{b}/bn2', hw_out, c1, wo, 3, 1, 1)
      out += l1 + l2
      if proj:
        out += conv(f'block{b}/shortcut', f'block{b}/shortcut_bn', hw, c, widths[i + 1], 1, stride, 0)[0]
      hw, c, i = hw_out, wo, i + (3 if proj else 2)
    return out + [_dense('classifier', c, model.num_classes)]
  raise TypeError(f'no counts for {type(model).__name__}')


COUNTED = (ConstantModel, models.MLP, models.ConvNet, models.ModelC, vgg_models.VGG, *RESNETS)


def supports(model: nn.Module) -> bool:
  """Whether params and MACs of `model` can be counted (the library's model families)."""
  return isinstance(model, COUNTED)


def count(model: nn.Module, image_shape: Sequence[int]) -> Counts:
  """Params and MACs of `model` as built (dense; for a masked network, its run cost)."""
  layers = tuple(_layers(model, image_shape))
  stats = sum(2 * l.out_features for l in layers if l.kind == 'batchnorm')
  return Counts(layers, sum(l.params for l in layers), sum(l.macs for l in layers),
                sum(l.macs_valid for l in layers), stats)


def masked_counts(model: nn.Module, image_shape: Sequence[int], masks: Masks) -> Counts:
  """The effective params and MACs of `model` under `masks`: those of its compaction."""
  return count(compact.compact_model(model, masks), image_shape)


def summary(model: nn.Module, image_shape: Sequence[int], masks: Masks) -> dict[str, Any]:
  """Totals for records: the compact network's params/MACs, the dense ones, and their ratios."""
  dense, eff = count(model, image_shape), masked_counts(model, image_shape, masks)
  return {'params': eff.params, 'macs': eff.macs, 'dense_params': dense.params, 'dense_macs': dense.macs,
          'params_ratio': eff.params / dense.params, 'macs_ratio': eff.macs / max(dense.macs, 1)}


def format_table(counts: Counts) -> str:
  """A per-layer text table (name, kind, in -> out, params, MACs)."""
  rows = [f'{"layer":<18} {"kind":<9} {"in":>6} {"out":>6} {"params":>12} {"macs":>14}']
  for l in counts.layers:
    rows.append(f'{l.name:<18} {l.kind:<9} {l.in_features:>6} {l.out_features:>6} {l.params:>12,} {l.macs:>14,}')
  rows.append(f'{"total":<18} {"":<9} {"":>6} {"":>6} {counts.params:>12,} {counts.macs:>14,}')
  return '\n'.join(rows)


def xla_flops(model: nn.Module, theta: Any, masks: Masks | None, image_shape: Sequence[int],
              batch_size: int = 1) -> float:
  """XLA's flop count of the compiled eval-mode forward pass (logits only) for `batch_size` examples."""
  masks = models.full_masks(model) if masks is None else tuple(jnp.asarray(m, jnp.float32) for m in masks)
  images = jnp.zeros((batch_size, *image_shape), jnp.uint8)
  cost = compact._forward(model).lower(theta_lib.variables(theta), images, masks).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax returns one dict per device program
    cost = cost[0]
  return float(cost['flops'])
