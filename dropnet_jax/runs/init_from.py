"""`--init_from`: a run starts from a trained network instead of training its dense one from θ0.

Sources (`parse` tells them apart; `SOURCE_HELP` is the flag's syntax):

  * a saved record of any run (DropNet, magnitude, a study's run, the tuner's best
    when it saved params): `RUN_DIR` is its seed-0 dense network, `RUN_DIR:seed<S>/dense`,
    `RUN_DIR:seed<S>/<metric>/cycle<C>` one record, `RUN_DIR:seed<S>/<metric>` that
    trial's newest saved cycle (`runs.saved_params.load_saved`). A weight-pruned record
    is its dense θ with the pruned weights exactly 0 (what `prune.remove` leaves), so
    it loads as a dense network. A DropNet record with units masked is refused: its
    masked units' weights are not zero, so as a dense network it would compute
    something else than the record; load its compact export (`experiments.compact`)
    with `--widths` set to the export's widths instead;
  * a compact export directory (`experiments.compact --out`: spec.json + state/);
  * a PyTorch state dict (`.pth`/`.pt`, read without torch by `dropnet_jax.pth`) of the
    model's torch twin (tests/torch_reference's module names: `convs.<i>`/`dense.<i>`
    for Models A/B/C, `convs.<i>`/`bns.<i>`/`fcs.<j>`/`classifier` for VGG16/19, the
    Flax paths with '.' for ResNet18 with batch norm), optionally wrapped as
    {'net': state_dict, ...} (the pytorch-cifar ckpt.pth) and with DataParallel's
    'module.' prefix. Conv weights OIHW -> HWIO, Linear (out, in) -> (in, out),
    BatchNorm weight/bias/running_mean/running_var -> scale/bias and batch_stats
    mean/var; num_batches_tracked is ignored. This is the inverse of
    tests/torch_reference/weights.py's Flax -> twin transfer.

The architecture is checked before any work (`load` at prepare): the source's model
name (where it carries one), then every array by name and shape against the run's
model; the first difference is one ValueError line naming the model, the layer and
both shapes. Arrays are cast to the model's dtype.

What the loaded network means (the same for DropNet and magnitude runs): it *is*
the dense cycle's result. Cycle 0 is evaluated, not trained (0 epochs: its record's
accuracies are the loaded network's, `epochs_trained` 0), and every method proceeds
from it: magnitude's one-shot and iterative methods prune and fine-tune the loaded
weights (the magnitude report's "load ckpt.pth, prune, fine-tune"), DropNet's first
mask scores the loaded network. Where a method rewinds (DropNet's every cycle, the
lottery ticket), it rewinds to the seed's own θ0, as without init_from. Why: a
method's definition should not change because its dense network was loaded. With
θ0 kept, loading the dense record of an earlier run of the same seed and settings
reproduces that run's records exactly (tested), so a loaded network is a drop-in for
a trained one; rewinding to the loaded weights instead would turn DropNet into
fine-tuning, a different method (that is what the magnitude methods do). For a
network trained elsewhere (a torch state dict) the seed's θ0 is not the loaded
network's initialisation: DropNet then finds masks with the loaded network's scores
and retrains them from the seed's θ0.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, NamedTuple

import jax
import numpy as np

from dropnet_jax import theta as theta_lib
from dropnet_jax.models import init_params
from dropnet_jax.models.compact import spec_of
from dropnet_jax.pruning.masks import masks_from_strings
from dropnet_jax.pruning.weight_masks import named_leaves
from dropnet_jax.runs import sparse_params

FLAG = '--init_from'
SOURCE_HELP = ('a run directory (its seed-0 dense network), RUN_DIR:seed<S>/dense, RUN_DIR:seed<S>/<metric>/cycle<C> '
               'or RUN_DIR:seed<S>/<metric> (the newest saved cycle); a compact export directory; or a PyTorch '
               'state_dict .pth/.pt of the torch twin')
TORCH_SUFFIXES = ('.pth', '.pt')


class Source(NamedTuple):
  kind: str  # 'run', 'compact' or 'torch'
  path: str
  selector: str | None = None

  def label(self) -> str:
    return self.path + (f':{self.selector}' if self.selector else '')


def parse(value: str) -> Source:
  """Which kind of source `value` names; ValueError (one line naming --init_from) if none."""
  if value.lower().endswith(TORCH_SUFFIXES):
    if not os.path.isfile(value):
      raise ValueError(f'{FLAG}: {value} is not a file')
    return Source('torch', value)
  if os.path.isfile(os.path.join(value, 'spec.json')) and not os.path.isdir(os.path.join(value, 'params')):
    return Source('compact', value)
  from dropnet_jax.runs import saved_params
  path, selector = saved_params.split_record_path(value, FLAG)  # the one splitting of RUN[:SELECTOR]
  if not os.path.isdir(path):
    raise ValueError(f'{FLAG}: {value} does not exist; expected {SOURCE_HELP}')
  if not os.path.isfile(os.path.join(path, 'params', 'spec.json')):
    raise ValueError(f'{FLAG}: {path} is neither a run directory with saved params (params/spec.json) nor a compact '
                     'export (spec.json)')
  return Source('run', path, selector or None)


def check(value: str | None) -> None:
  """The cheap checks (the source exists and its selector parses), before any data are read."""
  if value:
    parse(value)


# -- the torch twin's names -----------------------------------------------------------------------

_SMALL = re.compile(r'(Conv|Dense)_(\d+)$')
_VGG = re.compile(r'(conv|bn|fc)(\d+)$')
_TORCH_LEAF = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean', 'var': 'running_var'}


def _torch_module(model_name: str, modules: list[str]) -> str:
  if model_name in ('fc', 'conv', 'modelc') and len(modules) == 1 and _SMALL.match(modules[0]):
    kind, i = _SMALL.match(modules[0]).groups()
    return f'{"convs" if kind == "Conv" else "dense"}.{i}'
  if model_name in ('vgg16', 'vgg19') and len(modules) == 1 and _VGG.match(modules[0]):
    kind, i = _VGG.match(modules[0]).groups()
    return f'{kind}s.{i}'
  return '.'.join(modules)


def torch_name(model_name: str, leaf: str) -> str:
  """The twin's state_dict key of θ's leaf 'params/Dense_0/kernel' or 'batch_stats/bn0/mean'."""
  _collection, *modules, key = leaf.split('/')
  return f'{_torch_module(model_name, modules)}.{_TORCH_LEAF[key]}'


def from_torch_array(leaf: str, value: np.ndarray) -> np.ndarray:
  """A twin tensor in θ's layout: conv OIHW -> HWIO, Linear (out, in) -> (in, out)."""
  if leaf.endswith('/kernel'):
    return value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
  return value


def theta_from_state_dict(state: dict[str, np.ndarray], model, image_shape, label: str) -> Any:
  """θ for `model` from the twin's state dict; ValueError naming the first key or shape that differs."""
  template = _template(model, image_shape)
  name = spec_of(model)['model']
  flat, used = {}, set()
  for leaf, like in named_leaves(theta_lib.variables(template)).items():
    key = torch_name(name, leaf)
    if key not in state:
      raise ValueError(f'{FLAG}: {label} has no tensor {key!r} for {name} layer {leaf} {tuple(like.shape)} (its '
                       f'keys start {sorted(state)[:6]}): not a state dict of this {name}')
    value = from_torch_array(leaf, np.asarray(state[key]))
    if value.shape != tuple(like.shape):
      raise ValueError(f'{FLAG}: {label} does not fit the {name} (widths {spec_of(model)["widths"]}): {key} gives '
                       f'layer {leaf} shape {value.shape}, the model has {tuple(like.shape)}')
    flat[leaf], used = value.astype(like.dtype), used | {key}
  extra = sorted(k for k in set(state) - used if not k.endswith('num_batches_tracked'))
  if extra:
    more = ' ...' if len(extra) > 1 else ''
    raise ValueError(f'{FLAG}: {label} has tensors the {name} does not ({extra[0]!r}{more}): not a state dict of '
                     'this model')
  return _in_form(template, flat)


# -- loading and the architecture check ---------------------------------------------------------

def _template(model, image_shape):
  return jax.eval_shape(lambda: init_params(model, jax.random.key(0), tuple(image_shape)))


def _in_form(template, flat: dict[str, np.ndarray]) -> Any:
  """θ in the form of `template` (params tree or variables dict) from {'params/...': array}."""
  tree = sparse_params.unflatten(flat)
  return theta_lib.join(template, tree[theta_lib.PARAMS], tree.get(theta_lib.BATCH_STATS))


def fit_to_model(theta: Any, model, image_shape, label: str, source_spec: dict[str, Any] | None = None) -> Any:
  """θ checked against the model (the source's spec: name and input normalisation; then every array's
  name and shape) and cast to its dtypes; ValueError otherwise."""
  spec = spec_of(model)
  name, widths = spec['model'], spec['widths']
  source_spec = source_spec or {}
  source_model, source_widths = source_spec.get('model'), source_spec.get('widths')
  if source_model == f'{name}_compact' and all(list(idx) == list(range(len(idx)))
                                               for idx in source_spec.get('shortcut_index', [])):
    source_model = name  # a compact ResNet with identity shortcut maps is the ResNet (same names and arrays)
  if source_model is not None and source_model != name:
    raise ValueError(f'{FLAG}: {label} holds a {source_model} network, the run\'s model is {name}')
  if source_spec and _norm(source_spec.get('input_norm')) != _norm(spec.get('input_norm')):
    raise ValueError(f'{FLAG}: {label} normalises its inputs differently (input_norm {source_spec.get("input_norm")}'
                     f', this run {spec.get("input_norm")}): match --normalize and the data')
  template = _template(model, image_shape)
  want = named_leaves(theta_lib.variables(template))
  have = {k: np.asarray(v) for k, v in named_leaves(theta_lib.variables(theta)).items()}
  hint = f' (the source\'s widths are {list(source_widths)}: pass --widths to match)' if source_widths else ''
  for leaf, like in want.items():
    if leaf not in have:
      raise ValueError(f'{FLAG}: {label} has no {leaf} for the {name} (widths {widths}) {tuple(like.shape)}{hint}')
    if have[leaf].shape != tuple(like.shape):
      raise ValueError(f'{FLAG}: {label} does not fit the {name} (widths {widths}): layer {leaf} is '
                       f'{have[leaf].shape} there, {tuple(like.shape)} here{hint}')
  extra = sorted(set(have) - set(want))
  if extra:
    raise ValueError(f'{FLAG}: {label} has arrays the {name} (widths {widths}) does not: {extra[0]}{hint}')
  return _in_form(template, {k: have[k].astype(want[k].dtype) for k in want})


def load(value: str, model, image_shape) -> tuple[Any, dict[str, Any]]:
  """(θ for `model`, a description of the source for the log and config) from the --init_from `value`."""
  source = parse(value)
  label = source.label()
  info = {'init_from': label, 'kind': source.kind}
  if source.kind == 'torch':
    from dropnet_jax import pth
    try:
      state = pth.read_state_dict(source.path)
    except pth.PthError as e:
      raise ValueError(f'{FLAG}: {e}') from None
    return theta_from_state_dict(state, model, image_shape, label), info
  if source.kind == 'compact':
    from dropnet_jax.compaction import compact
    try:
      src_model, theta, spec = compact.load(source.path)
    except (OSError, ValueError, KeyError) as e:
      raise ValueError(f'{FLAG}: {source.path} cannot be read as a compact export ({e})') from None
    _check_image_shape(spec.get('image_shape'), image_shape, label)
    return fit_to_model(theta, model, image_shape, label, spec), info
  from dropnet_jax.runs import saved_params
  try:
    src_model, theta, _wmask, record = saved_params.load_saved(source.path, source.selector)
  except (OSError, KeyError, ValueError) as e:
    raise ValueError(f'{FLAG}: {" ".join(str(e).split())}') from None
  with open(os.path.join(source.path, 'params', 'spec.json')) as f:
    spec = json.load(f)
  _check_image_shape(spec.get('image_shape'), image_shape, label)
  if 'mask' in record and any(not np.all(np.asarray(m) > 0) for m in masks_from_strings(record['mask'])):
    raise ValueError(f'{FLAG}: {label} is a DropNet record with units masked (units {record.get("units")}); as a '
                     'dense network it is not the record: export it (experiments.compact) and load the export '
                     'with --widths set to its widths')
  info.update(record={k: record[k] for k in ('seed', 'metric', 'cycle', 'test_accuracy') if k in record})
  return fit_to_model(theta, model, image_shape, label, spec), info


def _norm(value) -> Any:
  return None if value is None else json.dumps(value)


def _check_image_shape(saved, image_shape, label: str) -> None:
  if saved is not None and tuple(int(v) for v in saved) != tuple(image_shape):
    raise ValueError(f'{FLAG}: {label} was trained on images of shape {tuple(saved)}, this run\'s are '
                     f'{tuple(image_shape)}')
