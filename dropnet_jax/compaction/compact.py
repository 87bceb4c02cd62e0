"""Structured compaction: a masked network as a smaller dense network with the same outputs.

DropNet's masks zero whole units (Dense nodes, conv filters) but leave the
arrays at full size, so a masked network costs what the dense one costs.
`compact(model, theta, masks)` builds the network that actually computes the
masked function: every kept unit's incoming weights (kernel column / filter,
bias, batch-norm scale, bias, running mean and variance) and the matching
input rows of whatever reads it (the next Dense or conv; for the NHWC flatten
before a Dense, the rows of the kept channels at every spatial position; the
classifier after global average pooling). The compact model runs with
all-ones masks (`models.full_masks`) and, in eval mode, its logits equal the
masked model's up to float32 summation order (tested to 1e-5 for all five
models).

Which units survive (`plan`):
* kept: mask 1;
* live: kept and read by something that reaches the logits. In a chain
  (Models A/B/C, VGG16/19) every kept unit is live unless the network is
  constant (below). In ResNet18 (with or without batch norm) the residual stream's channels are shared by
  the stem / block outputs / projection shortcuts that add into it, each with
  its own mask; a stream tensor keeps its kept channels that a later conv or
  residual add reads, and blocks gather their shortcut channels by index
  (`compact_models.CompactResNet18`), so nothing is computed for a channel no
  one keeps, and no member has to carry another member's channels.

Empty layers (documented choice: exact, no error). A layer with no units left
makes a chain network input-independent: everything after it computes from
exact zeros. The same holds for a ResNet whose residual stream is cut (a whole
stream group dropped, or a block whose output keeps nothing reachable from the
input). `compact` then returns a `ConstantModel` holding the masked network's
logits (computed once on a zero image, so pass `image_shape`), with
`num_classes` parameters and no multiply-accumulates. Inside a ResNet that is
not cut, an empty conv1 or projection shortcut is a zero-width layer (the next
conv reads 0 channels and outputs its bias).

Emptied residual branches keep the identity path, exactly. When DropNet drops
every conv1 filter of a block, the block computes relu(x + c), c = conv2's bias
(or bn2 of zeros: bn2's bias - mean * scale / sqrt(var + eps)), and exactly x
when c = 0: compaction keeps the stream with a zero-width conv1 and a conv2 of
no weights (no MACs; its bias / bn2 hold c), whether one block, every block of a
stage, or blocks of several stages lose their branch (tests/layer_removal_test.py).
Where the shapes allow no identity the output is constant and so is the compact
network: a residual group whose masks are all zero (the masks multiply after the
add, so they silence the identity path too: the masked network itself is
constant), and a projection block (stride 2, a new channel count) whose conv1 and
shortcut are both emptied. Removing a stage on purpose is layer removal, a model
setting (`stages`, `models.large`), not a mask.

Export: `save(dir, model, theta, extra_meta, image_shape)` writes `spec.json`
(model family, widths, classes, image shape, ResNet index maps, caller's
meta, every array's shape) and an orbax checkpoint of the arrays; `load(dir)`
rebuilds model and θ. Compact networks are eval-mode equivalents: batch norm
uses the running statistics.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from dropnet_jax import models
from dropnet_jax import theta as theta_lib

from dropnet_jax.models import large as large_models
from dropnet_jax.models import vgg as vgg_models
from dropnet_jax.models import resnet_bn
from dropnet_jax.models.compact import CompactResNet18, CompactResNet18BN, ConstantModel, model_from_spec, spec_of
from dropnet_jax.models.layers import Masks

SPEC_FILE = 'spec.json'
STATE_DIR = 'state'
FORMAT = 'dropnet_jax.compact/1'


class Plan(NamedTuple):
  """What `compact` keeps: per masked layer the sorted indices of its live units."""
  constant: bool  # the masked network's output does not depend on its input
  live: tuple[np.ndarray, ...]  # int arrays, one per masked layer (all empty when constant)
  shortcut_index: tuple[tuple[int, ...], ...] | None  # ResNet18: per block, see CompactResNet18


def _blocks(stages: Sequence[int] = large_models.ALL_STAGES):
  """ResNet18 blocks (of the kept `stages`) as (conv1, shortcut or None, out) masked-layer indices, and each
  block's input layer."""
  i, prev, out = 1, 0, []
  for block in large_models.resnet18_blocks(stages):
    proj = block.projection
    blk = (i, i + 1 if proj else None, i + (2 if proj else 1))
    out.append((blk, prev))
    prev, i = blk[2], i + (3 if proj else 2)
  return out


def _resnet_plan(kept: list[np.ndarray], stages: Sequence[int]) -> Plan:
  blocks = _blocks(stages)
  # Forward: which channels can depend on the image. The stream is cut (constant output) when none can.
  dep = kept[0].copy()
  for (c1, sc, out), _ in blocks:
    reads = dep.any()
    conv2_dep = bool(reads and kept[c1].any())
    sc_dep = (kept[sc] & reads) if sc is not None else dep
    dep = kept[out] & (conv2_dep | sc_dep)
  if not dep.any():
    return Plan(True, tuple(np.zeros(0, np.int64) for _ in kept), None)
  # Backward: a kept unit is live if a live unit or the classifier reads it.
  live: list[np.ndarray] = [np.zeros_like(k) for k in kept]
  need = kept[blocks[-1][0][2]].copy()  # the classifier reads every kept channel of the last block
  for (c1, sc, out), prev in reversed(blocks):
    live[out] = need
    live[c1] = kept[c1] & need.any()
    reads_all = live[c1].any()
    if sc is not None:
      live[sc] = kept[sc] & need
      reads_all = reads_all or live[sc].any()
      need = kept[prev] & reads_all
    else:
      need = kept[prev] & (reads_all | need)  # the identity add reads channel c of the input for output c
  live[0] = need
  idx = [np.flatnonzero(m) for m in live]
  index = []
  for (c1, sc, out), prev in blocks:
    source = idx[sc] if sc is not None else idx[prev]
    pos = {int(c): p for p, c in enumerate(source)}
    index.append(tuple(pos.get(int(c), -1) for c in idx[out]))
  return Plan(False, tuple(idx), tuple(index))


def plan(model: nn.Module, masks: Masks) -> Plan:
  """The live units of `model` under `masks` (see the module docstring)."""
  kept = [np.asarray(m).reshape(-1) > 0.5 for m in masks]
  if len(kept) != len(model.widths) or any(k.size != w for k, w in zip(kept, model.widths)):
    raise ValueError(f'mask sizes {[k.size for k in kept]} do not match widths {tuple(model.widths)}')
  if isinstance(model, (large_models.ResNet18, resnet_bn.ResNet18BN)):  # the same residual groups
    return _resnet_plan(kept, model.stages)
  if not isinstance(model, (models.MLP, models.ConvNet, models.ModelC, vgg_models.VGG)):
    raise TypeError(f'cannot compact {type(model).__name__}')
  if any(not k.any() for k in kept):  # a chain with an empty layer computes from zeros after it
    return Plan(True, tuple(np.zeros(0, np.int64) for _ in kept), None)
  return Plan(False, tuple(np.flatnonzero(k) for k in kept), None)


def compact_model(model: nn.Module, masks: Masks, the_plan: Plan | None = None) -> nn.Module:
  """The compact module alone (no weights): what `accounting` counts for a masked network."""
  p = plan(model, masks) if the_plan is None else the_plan
  if p.constant:
    return ConstantModel(num_classes=model.num_classes)
  widths = tuple(int(i.size) for i in p.live)
  if isinstance(model, (large_models.ResNet18, resnet_bn.ResNet18BN)):
    cls = CompactResNet18 if isinstance(model, large_models.ResNet18) else CompactResNet18BN
    return cls(widths=widths, shortcut_index=p.shortcut_index, num_classes=model.num_classes,
               input_norm=model.input_norm, stages=model.stages)
  if isinstance(model, vgg_models.VGG):  # the head's FC nodes are masked: its kept widths are the new head
    return model.clone(parent=None, widths=widths, head=widths[model.num_convs():])
  # The same family with the kept widths; every other field (head, dropout, input_norm, ...) kept.
  return model.clone(parent=None, widths=widths)


# θ is a params tree or a variables dict (`dropnet_jax.theta`); these names are kept for existing callers.


def _cut(a, keep_in, keep_out):
  """kernel[..., keep_in, keep_out] (None keeps the axis whole)."""
  a = np.asarray(a)
  if keep_in is not None:
    a = np.take(a, keep_in, axis=-2)
  if keep_out is not None:
    a = np.take(a, keep_out, axis=-1)
  return a


def _layer(p, keep_in, keep_out):
  """A Dense/Conv params dict sliced on both sides."""
  out = {'kernel': _cut(p['kernel'], keep_in, keep_out)}
  if 'bias' in p:
    out['bias'] = _cut(p['bias'], None, keep_out)
  return out


def _flatten_rows(kernel, channels: int, keep):
  """The Dense kernel after an NHWC flatten: rows (y, x, c) with c fastest; keep channels `keep` at every position."""
  k = np.asarray(kernel)
  k = k.reshape(k.shape[0] // channels, channels, k.shape[1])
  return np.take(k, keep, axis=1).reshape(-1, k.shape[-1])


def _compact_params(model, params, stats, live):
  """The sliced params (and batch_stats) trees of a non-constant compaction."""
  params = jax.tree.map(np.asarray, params)
  if isinstance(model, models.MLP):
    n, prev, new = len(live), None, {}
    for i in range(n):
      new[f'Dense_{i}'] = _layer(params[f'Dense_{i}'], prev, live[i])
      prev = live[i]
    new[f'Dense_{n}'] = _layer(params[f'Dense_{n}'], prev, None)
    return new, None
  if isinstance(model, (models.ConvNet, models.ModelC)):
    new, prev = {}, None
    for i, keep in enumerate(live):
      new[f'Conv_{i}'] = _layer(params[f'Conv_{i}'], prev, keep)
      prev = keep
    dense = params['Dense_0']
    new['Dense_0'] = {'kernel': _flatten_rows(dense['kernel'], model.widths[-1], prev), 'bias': dense['bias']}
    for name in params:  # Model C's head after the first FC layer and its classifier: unmasked, kept whole
      if name.startswith('Dense_') and name != 'Dense_0':
        new[name] = params[name]
    return new, None
  if isinstance(model, vgg_models.VGG):  # convs (+ BN), GAP (channel c feeds row c), head FCs, classifier
    new, new_stats, prev, n = {}, {}, None, model.num_convs()
    for i, keep in enumerate(live[:n]):
      new[f'conv{i}'] = _layer(params[f'conv{i}'], prev, keep)
      new[f'bn{i}'] = {k: v[keep] for k, v in params[f'bn{i}'].items()}
      new_stats[f'bn{i}'] = {k: np.asarray(v)[keep] for k, v in stats[f'bn{i}'].items()}
      prev = keep
    for j, keep in enumerate(live[n:]):
      new[f'fc{j}'] = _layer(params[f'fc{j}'], prev, keep)
      prev = keep
    new['classifier'] = _layer(params['classifier'], prev, None)
    return new, new_stats
  if isinstance(model, large_models.ResNet18):
    new = {'stem': _layer(params['stem'], None, live[0])}
    for block, ((c1, sc, out), prev) in zip(large_models.resnet18_blocks(model.stages), _blocks(model.stages)):
      b = block.index
      src = params[f'block{b}']
      new[f'block{b}'] = {'conv1': _layer(src['conv1'], live[prev], live[c1]),
                          'conv2': _layer(src['conv2'], live[c1], live[out])}
      if sc is not None:
        new[f'block{b}']['shortcut'] = _layer(src['shortcut'], live[prev], live[sc])
    new['classifier'] = _layer(params['classifier'], live[_blocks(model.stages)[-1][0][2]], None)
    return new, None
  if isinstance(model, resnet_bn.ResNet18BN):
    return _resnet_bn_params(params, stats, live, model.stages)
  raise TypeError(f'cannot compact {type(model).__name__}')


def _resnet_bn_params(params, stats, live, stages):
  """ResNet18BN sliced as ResNet18 (`_blocks`' live channels), each conv's BN params and stats with it."""
  new, new_stats = {}, {}

  def conv_bn(dst, dst_stats, src, src_stats, conv, bn, keep_in, keep_out):
    dst[conv] = _layer(src[conv], keep_in, keep_out)
    dst[bn] = {k: np.take(np.asarray(v), keep_out) for k, v in src[bn].items()}
    dst_stats[bn] = {k: np.take(np.asarray(v), keep_out) for k, v in src_stats[bn].items()}

  conv_bn(new, new_stats, params, stats, 'stem', 'stem_bn', None, live[0])
  for blk, ((c1, sc, out), prev) in zip(large_models.resnet18_blocks(stages), _blocks(stages)):
    b = blk.index
    block, block_stats = {}, {}
    src, src_stats = params[f'block{b}'], stats[f'block{b}']
    conv_bn(block, block_stats, src, src_stats, 'conv1', 'bn1', live[prev], live[c1])
    conv_bn(block, block_stats, src, src_stats, 'conv2', 'bn2', live[c1], live[out])
    if sc is not None:
      conv_bn(block, block_stats, src, src_stats, 'shortcut', 'shortcut_bn', live[prev], live[sc])
    new[f'block{b}'], new_stats[f'block{b}'] = block, block_stats
  new['classifier'] = _layer(params['classifier'], live[_blocks(stages)[-1][0][2]], None)
  return new, new_stats


def compact(model: nn.Module, theta: Any, masks: Masks,
            image_shape: Sequence[int] | None = None) -> tuple[nn.Module, Any]:
  """(small_model, small_theta): a dense network computing what `model` computes under `masks`.

  θ is a params tree or a {'params', 'batch_stats'} dict (as `models.init_params`
  returns it); small_theta has the same form. `image_shape` (H, W, C) is needed
  only when the masked network is constant (its logits are computed once, on a
  zero image: they are the same for every input). Run the result with
  `models.full_masks(small_model)` (or `predict`), in eval mode.
  """
  p = plan(model, masks)
  small = compact_model(model, masks, p)
  params, stats = theta_lib.split(theta)
  if p.constant:
    if image_shape is None:
      raise ValueError('the masked network is constant (a layer or the residual stream has no units left); '
                       'pass image_shape so its logits can be computed')
    logits = predict(model, theta, jnp.zeros((1, *image_shape), jnp.uint8), masks)
    return small, theta_lib.join(theta, {'bias': jnp.asarray(logits[0])})
  new_params, new_stats = _compact_params(model, params, stats, p.live)
  return small, theta_lib.join(theta, jax.tree.map(jnp.asarray, new_params),
                                None if new_stats is None else jax.tree.map(jnp.asarray, new_stats))


@functools.lru_cache(maxsize=64)
def _forward(model: nn.Module):
  return jax.jit(lambda v, x, m: model.apply(v, x, m, train=False)[0])


def predict(model: nn.Module, theta: Any, images: jax.Array, masks: Masks | None = None) -> jax.Array:
  """Eval-mode logits (jitted once per model); a compact model runs with all-ones masks by default."""
  masks = models.full_masks(model) if masks is None else tuple(jnp.asarray(m, jnp.float32) for m in masks)
  return _forward(model)(theta_lib.variables(theta), jnp.asarray(images), masks)


# ---------------------------------------------------------------------------------------------- export

def flatten(tree: Any) -> dict[str, np.ndarray]:
  """A nested dict of arrays as {'a/b/c': numpy array}."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): np.asarray(v) for path, v in leaves}


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """The inverse of `flatten`."""
  out: dict[str, Any] = {}
  for key, value in flat.items():
    node, parts = out, key.split('/')
    for part in parts[:-1]:
      node = node.setdefault(part, {})
    node[parts[-1]] = value
  return out


def save(directory: str, model: nn.Module, theta: Any, extra_meta: Mapping[str, Any] | None = None,
         image_shape: Sequence[int] | None = None) -> None:
  """Writes `spec.json` and an orbax checkpoint of θ's arrays under `directory` (created; replaced if present).

  Orbax cannot store zero-size arrays (an empty ResNet conv1), so only the
  non-empty arrays are checkpointed; spec.json lists every array's shape and
  `load` recreates the empty ones.
  """
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  flat = flatten(theta)
  spec = {'format': FORMAT, **spec_of(model),
          'image_shape': None if image_shape is None else [int(v) for v in image_shape],
          'shapes': {k: list(v.shape) for k, v in flat.items()},
          'meta': dict(extra_meta or {})}
  if os.path.exists(os.path.join(directory, SPEC_FILE)):  # spec.json, written last, marks a complete export
    os.remove(os.path.join(directory, SPEC_FILE))
  from dropnet_jax.runs.tree_save import save_tree  # one line on a failed write (a full disk), whole on Ctrl-C
  save_tree(os.path.join(directory, STATE_DIR), {k: v for k, v in flat.items() if v.size})
  tmp = os.path.join(directory, SPEC_FILE + '.tmp')
  with open(tmp, 'w') as f:
    json.dump(spec, f, indent=1)
  os.replace(tmp, os.path.join(directory, SPEC_FILE))


def load(directory: str) -> tuple[nn.Module, Any, dict[str, Any]]:
  """(model, θ, spec) from a `save` directory; spec['meta'] is the caller's extra_meta."""
  directory = os.path.abspath(directory)
  with open(os.path.join(directory, SPEC_FILE)) as f:
    spec = json.load(f)
  if spec.get('format') != FORMAT:
    raise ValueError(f'{directory}: not a compact export (format {spec.get("format")!r}, want {FORMAT!r})')
  model = model_from_spec(spec)
  shapes = {k: tuple(v) for k, v in spec['shapes'].items()}
  template = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items() if np.prod(s) > 0}
  checkpointer = ocp.StandardCheckpointer()
  restored = checkpointer.restore(os.path.join(directory, STATE_DIR), template) if template else {}
  checkpointer.close()
  flat = {k: (jnp.asarray(restored[k]) if k in restored else jnp.zeros(s, jnp.float32)) for k, s in shapes.items()}
  theta = unflatten(flat)
  if spec['image_shape'] is not None:  # the arrays must be the ones the rebuilt module creates
    expected = jax.eval_shape(lambda: models.init_params(model, jax.random.key(0), spec['image_shape']))
    shapes_of = lambda t: jax.tree.map(lambda a: tuple(a.shape), theta_lib.variables(t))
    if shapes_of(expected) != shapes_of(theta):
      raise ValueError(f'{directory}: stored arrays do not fit the {spec["model"]} the spec describes')
  return model, theta, spec
