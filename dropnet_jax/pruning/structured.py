"""Structured pruning at initialisation: per-layer rates (or a parameter budget) to node/filter masks.

Why: the "ResNet18 under 5 M parameters" report prunes filters of the *untrained* network at fixed
per-layer rates with Torch-Pruning (which couples the layers a residual add ties together), then
trains the smaller network. Here the same choice is a DropNet-style node mask (`models` contract: one
0/1 vector per masked layer), so the one loop trains it (`loop.structured`) and compaction /
accounting count it like any DropNet mask.

Channel groups (`channel_groups`): masked layers whose channels must go together. In a chain (Models
A/B/C, VGG16/19) every masked layer is its own group. In ResNet18 (both variants, any kept `stages`)
each block's conv1 is a group, and each residual stream is one group: the stem with the outputs of
the identity blocks after it, and each projection shortcut with its block's output and the following
identity block's output. Members of a group share one mask (Torch-Pruning's dependency group), so the
compact network gathers nothing (`compact.plan`).

Rates: a group's rate comes from a *rate slot*. For chains a slot is a masked layer; for ResNet18 a
slot is a basic block ("layer" in the report's "10 % on layers 1-2, 20 % on 3-6, 30 % on 7-8", the 8
blocks), in the order of the kept blocks: a conv1 group takes its block's rate, a stream group the
rate of the first block that adds into it (Torch-Pruning with `pruning_ratio_dict` keyed by the stage
modules layer1..layer4 gives a stage's stream group that stage's rate; the stem's group belongs to
stage 1; with stage 1 removed the stem alone takes the first kept block's rate). A group of C channels
at rate r keeps int(C * (1 - r)) channels (Torch-Pruning's count for local pruning, Python float
arithmetic), and at least one (Torch-Pruning would empty the layer).

Importance, per group (`importance`):
* random: uniform draws (Torch-Pruning's `RandomImportance`), from a JAX key;
* l1: Torch-Pruning's `MagnitudeImportance(p=1)` of the group: per channel c, the sum over the
  group's coupled layers of |weights| of c: every producing conv/Dense's kernel[..., c] (biases
  excluded, as its default bias=False), every producing batch norm's |scale[c]|, and every reading
  conv/Dense's kernel[..., c, :] (after a flatten: the rows of c at every position). Torch-Pruning
  averages over the coupled layers and divides by the mean: positive constants, the same ranking.
The channels with the smallest importance go (ties: the lower index goes first).

`rate_for_budget` finds the smallest uniform rate whose compact network has at most a given number of
parameters (bisection: the widths, and so the count, only fall as the rate grows).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import numpy as np

from dropnet_jax import models
from dropnet_jax import theta as theta_lib
from dropnet_jax.models import large as large_models
from dropnet_jax.models import resnet_bn
from dropnet_jax.models import vgg as vgg_models
from dropnet_jax.models.layers import Masks

IMPORTANCES = ('l1', 'random')
Path = tuple[str, ...]


class ChannelGroup(NamedTuple):
  """Masked layers that share one mask, and the params an L1 importance reads."""
  name: str  # the first member's layer name
  layers: tuple[int, ...]  # masked-layer indices
  width: int
  slot: int  # which rate applies (see the module docstring)
  producers: tuple[Path, ...]  # convs/Denses (kernel[..., c]) and batch norms (scale[c]) that write channel c
  consumers: tuple[Path, ...]  # convs/Denses whose kernel[..., c, :] reads channel c


def _is_resnet(model: nn.Module) -> bool:
  return isinstance(model, (large_models.ResNet18, resnet_bn.ResNet18BN))


def _chain_paths(model: nn.Module) -> tuple[list[tuple[Path, ...]], Path]:
  """Per masked layer its producing paths, and the layer that reads the last masked layer."""
  n = len(model.widths)
  if isinstance(model, models.MLP):
    return [((f'Dense_{i}',),) for i in range(n)], (f'Dense_{n}',)
  if isinstance(model, (models.ConvNet, models.ModelC)):
    return [((f'Conv_{i}',),) for i in range(n)], ('Dense_0',)
  if isinstance(model, vgg_models.VGG):
    return [tuple(p) for p in vgg_models.incoming_params(model)], ('classifier',)
  raise TypeError(f'no structured pruning for {type(model).__name__}')


def channel_groups(model: nn.Module) -> tuple[ChannelGroup, ...]:
  """The model's channel groups, in masked-layer order of their first member."""
  widths = tuple(int(w) for w in model.widths)
  if not _is_resnet(model):
    producers, last_reader = _chain_paths(model)
    readers = [producers[i + 1][0] for i in range(len(widths) - 1)] + [last_reader]
    return tuple(ChannelGroup(f'layer{i}', (i,), w, i, producers[i], (readers[i],)) for i, w in enumerate(widths))
  incoming = large_models.incoming_params(model)
  blocks = large_models.resnet18_blocks(model.stages)
  groups: list[ChannelGroup] = []
  stream = {'layers': [0], 'slot': 0, 'consumers': []}
  streams = [stream]
  i = 1
  for j, blk in enumerate(blocks):
    b, proj = blk.index, blk.projection
    conv1, out = i, i + (2 if proj else 1)
    readers = [(f'block{b}', 'conv1')] + ([(f'block{b}', 'shortcut')] if proj else [])
    stream['consumers'] += readers  # this block reads the stream tensor before it
    if proj:
      stream = {'layers': [i + 1, out], 'slot': j, 'consumers': []}
      streams.append(stream)
    else:  # an identity block adds into the current stream (the stem's group: slot 0, block0's rate)
      stream['layers'].append(out)
    groups.append(ChannelGroup(f'block{b}/conv1', (conv1,), widths[conv1], j, tuple(incoming[conv1]),
                               ((f'block{b}', 'conv2'),)))
    i += 3 if proj else 2
  stream['consumers'].append(('classifier',))
  names = large_models.resnet18_layer_names(model.stages)
  for s in streams:
    layers = tuple(s['layers'])
    groups.append(ChannelGroup(names[layers[0]], layers, widths[layers[0]], s['slot'],
                               tuple(p for k in layers for p in incoming[k]), tuple(s['consumers'])))
  return tuple(sorted(groups, key=lambda g: g.layers[0]))


def rate_slots(model: nn.Module) -> int:
  """How many rates `--prune_rates` takes for `model`: one per kept basic block (ResNet18), else one per
  masked layer."""
  return len(large_models.resnet18_blocks(model.stages)) if _is_resnet(model) else len(model.widths)


def group_rates(model: nn.Module, rates: Sequence[float]) -> tuple[float, ...]:
  """Per channel group, its rate; `rates` has one value per slot, or one value for all."""
  n = rate_slots(model)
  rates = tuple(float(r) for r in rates)
  if len(rates) == 1:
    rates = rates * n
  if len(rates) != n:
    unit = 'basic block' if _is_resnet(model) else 'masked layer'
    raise ValueError(f'--prune_rates needs one rate per {unit} ({n}) or one for all, got {len(rates)}')
  if any(not 0 <= r < 1 for r in rates):
    raise ValueError(f'--prune_rates must be in [0, 1), got {",".join(map(str, rates))}')
  return tuple(rates[g.slot] for g in channel_groups(model))


def kept_count(channels: int, rate: float) -> int:
  """Channels a group keeps at `rate`: Torch-Pruning's int(C * (1 - r)), and at least 1."""
  return max(1, int(channels * (1 - rate)))


def group_widths(model: nn.Module, rates: Sequence[float]) -> tuple[int, ...]:
  """Per channel group, the channels kept at the per-group `rates` (`group_rates`)."""
  return tuple(kept_count(g.width, r) for g, r in zip(channel_groups(model), rates))


def _lookup(tree: Any, path: Path) -> dict[str, Any]:
  for part in path:
    tree = tree[part]
  return tree


def l1_importance(params: Any, group: ChannelGroup) -> np.ndarray:
  """Torch-Pruning's `MagnitudeImportance(p=1)` ranking of a group's channels (float64 sums; see the module
  docstring)."""
  total = np.zeros(group.width, np.float64)
  for path in group.producers:
    node = _lookup(params, path)
    if 'kernel' in node:
      k = np.abs(np.asarray(node['kernel'], np.float64))
      total += k.reshape(-1, k.shape[-1]).sum(axis=0)
    else:  # batch norm
      total += np.abs(np.asarray(node['scale'], np.float64))
  for path in group.consumers:
    k = np.abs(np.asarray(_lookup(params, path)['kernel'], np.float64))
    rows = k.shape[-2]
    if rows % group.width:
      raise ValueError(f'{"/".join(path)} reads {rows} inputs, not a multiple of {group.width} channels')
    total += k.reshape(-1, group.width, k.shape[-1]).sum(axis=(0, 2))  # a flatten's rows: (y, x, c), c fastest
  return total


def importance(params: Any, group: ChannelGroup, kind: str, key: jax.Array) -> np.ndarray:
  if kind == 'l1':
    return l1_importance(params, group)
  if kind == 'random':
    return np.asarray(jax.random.uniform(key, (group.width,)), np.float64)
  raise ValueError(f'importance must be one of {", ".join(IMPORTANCES)}, got {kind!r}')


def kept_channels(scores: np.ndarray, keep: int) -> np.ndarray:
  """The sorted indices of the `keep` most important channels (the lowest scores go; ties: lower index first)."""
  order = np.argsort(scores, kind='stable')
  return np.sort(order[len(scores) - keep:])


def prune_at_init(model: nn.Module, theta: Any, rates: Sequence[float], kind: str, key: jax.Array) -> Masks:
  """The node masks that keep, per channel group, its `kept_count` most important channels of θ (θ0).
  `rates`: per group (`group_rates`)."""
  params = theta_lib.params(theta) if theta is not None else None
  if kind == 'l1' and params is None:
    raise ValueError('l1 importance needs θ')
  masks = [np.zeros(int(w), np.float32) for w in model.widths]
  groups = channel_groups(model)
  if len(rates) != len(groups):
    raise ValueError(f'{len(rates)} rates for {len(groups)} channel groups')
  for g_index, (group, rate) in enumerate(zip(groups, rates)):
    scores = importance(params, group, kind, jax.random.fold_in(key, g_index))
    keep = kept_channels(scores, kept_count(group.width, rate))
    for layer in group.layers:
      masks[layer][keep] = 1.0
  return tuple(masks)


def first_channels_masks(model: nn.Module, rates: Sequence[float]) -> Masks:
  """Masks that keep the first `kept_count` channels of every group: the widths (and so the counts) of
  any importance's masks at `rates`, without θ."""
  masks = [np.zeros(int(w), np.float32) for w in model.widths]
  for group, rate in zip(channel_groups(model), rates):
    for layer in group.layers:
      masks[layer][:kept_count(group.width, rate)] = 1.0
  return tuple(masks)


def pruned_params(model: nn.Module, image_shape: Sequence[int], rates: Sequence[float]) -> int:
  """Parameters of the compact network at per-group `rates`."""
  from dropnet_jax.compaction import accounting  # here: accounting imports the models this module reads
  return accounting.masked_counts(model, image_shape, first_channels_masks(model, rates)).params


def rate_for_budget(model: nn.Module, image_shape: Sequence[int], budget: float, steps: int = 40) -> float:
  """The smallest uniform rate (to 2^-steps) whose compact network has at most `budget` parameters."""
  n = len(channel_groups(model))
  count = lambda r: pruned_params(model, image_shape, (r,) * n)
  if count(0.0) <= budget:
    return 0.0
  hi = 1 - 1e-9
  if count(hi) > budget:
    raise ValueError(f'--param_budget={budget:g}: even one channel per group leaves {count(hi):,} parameters')
  lo = 0.0
  for _ in range(steps):
    mid = (lo + hi) / 2
    lo, hi = (lo, mid) if count(mid) <= budget else (mid, hi)
  return hi
