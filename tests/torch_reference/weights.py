"""Parameter transfer between the Flax models and their torch twins.

Flax names the layers `Conv_i` / `Dense_i` in creation order; the torch models
keep them in `model.convs[i]` / `model.dense[i]`. A twin whose Flax model names
its layers itself (VGG: conv{i}, bn{i}, fc{j}, classifier) lists the pairs in a
`flax_layers()` method. Dense kernels are (in, out) in Flax and Linear weights
(out, in) in torch; conv kernels are HWIO in Flax and OIHW in torch; a batch
norm's scale/bias are torch's weight/bias and its 'batch_stats' mean/var
torch's running_mean/running_var (so θ may be a variables dict). Nested Flax
trees (ResNet18BN: block0/conv1 is torch's block0.conv1) use
`load_flax_variables` / `to_flax_variables`, which map every leaf by path.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from dropnet_jax import theta as theta_lib


def _layers(model: nn.Module):
  if hasattr(model, 'flax_layers'):
    yield from model.flax_layers()
    return
  yield from ((f'Conv_{i}', m) for i, m in enumerate(model.convs))
  yield from ((f'Dense_{i}', m) for i, m in enumerate(model.dense))


def _tensor(a) -> torch.Tensor:
  return torch.from_numpy(np.array(a, np.float32))


def load_flax_params(model: nn.Module, theta: Mapping[str, Any]) -> nn.Module:
  """Copies Flax θ (the 'params' tree, or a variables dict with 'batch_stats') into `model` in place; returns it."""
  params, stats = theta_lib.split(theta)
  names = dict(_layers(model))
  if set(names) != set(params):
    raise ValueError(f'layer names differ: torch {sorted(names)} vs flax {sorted(params)}')
  with torch.no_grad():
    for name, layer in names.items():
      if isinstance(layer, nn.modules.batchnorm._BatchNorm):
        layer.weight.copy_(_tensor(params[name]['scale']))
        layer.bias.copy_(_tensor(params[name]['bias']))
        if stats is not None:
          layer.running_mean.copy_(_tensor(stats[name]['mean']))
          layer.running_var.copy_(_tensor(stats[name]['var']))
        continue
      kernel = torch.from_numpy(np.array(params[name]['kernel'], np.float32))
      kernel = kernel.permute(3, 2, 0, 1) if kernel.dim() == 4 else kernel.T
      if kernel.shape != layer.weight.shape:
        raise ValueError(f'{name}: flax kernel gives {tuple(kernel.shape)}, torch wants {tuple(layer.weight.shape)}')
      layer.weight.copy_(kernel)
      if layer.bias is not None:
        layer.bias.copy_(_tensor(params[name]['bias']))
  return model


def to_flax_params(model: nn.Module) -> dict[str, dict[str, np.ndarray]]:
  """The reverse: the model's parameters as a Flax-layout dict of numpy arrays (params only, no running stats)."""
  out = {}
  for name, layer in _layers(model):
    if isinstance(layer, nn.modules.batchnorm._BatchNorm):
      out[name] = {'scale': layer.weight.detach().numpy().copy(), 'bias': layer.bias.detach().numpy().copy()}
      continue
    w = layer.weight.detach()
    w = w.permute(2, 3, 1, 0) if w.dim() == 4 else w.T
    out[name] = {'kernel': w.contiguous().numpy().copy()}
    if layer.bias is not None:
      out[name]['bias'] = layer.bias.detach().numpy().copy()
  return out


def load_flax_variables(model: nn.Module, variables: Mapping[str, Any]) -> nn.Module:
  """Copies a Flax variables dict {'params', 'batch_stats'} into a twin whose module names are the Flax
  paths with '.' for '/' (ResNet18BN): conv kernels HWIO -> OIHW, Dense (in, out) -> (out, in), BN
  scale/bias -> weight/bias and mean/var -> running_mean/running_var. Every Flax leaf must find its
  torch tensor and every torch parameter and running statistic must be written."""
  written = set()
  modules = dict(model.named_modules())
  flat = [*_flat(variables['params']), *_flat(variables.get('batch_stats', {}))]
  with torch.no_grad():
    for path, leaf in flat:
      module, key = '.'.join(path[:-1]), path[-1]
      layer = modules[module]
      value = torch.from_numpy(np.array(leaf, np.float32))
      if key == 'kernel':
        value = value.permute(3, 2, 0, 1) if value.dim() == 4 else value.T
      name = {'kernel': 'weight', 'scale': 'weight', 'mean': 'running_mean', 'var': 'running_var'}.get(key, key)
      target = getattr(layer, name)
      if value.shape != target.shape:
        raise ValueError(f'{module}.{name}: flax gives {tuple(value.shape)}, torch wants {tuple(target.shape)}')
      target.copy_(value)
      written.add(f'{module}.{name}')
  state = {k for k in model.state_dict() if not k.endswith('num_batches_tracked')}
  if written != state:
    raise ValueError(f'not transferred: torch {sorted(state - written)}, flax {sorted(written - state)}')
  return model


def to_flax_variables(model: nn.Module) -> dict[str, Any]:
  """The reverse of `load_flax_variables`: {'params', 'batch_stats'} as nested dicts of numpy arrays."""
  out: dict[str, Any] = {'params': {}, 'batch_stats': {}}
  names = {'weight': None, 'bias': 'bias', 'running_mean': 'mean', 'running_var': 'var'}
  for full, tensor in model.state_dict().items():
    module, name = full.rsplit('.', 1)
    if name not in names:
      continue
    layer = dict(model.named_modules())[module]
    value = tensor.detach().numpy().copy()
    if name == 'weight':
      is_bn = isinstance(layer, nn.modules.batchnorm._BatchNorm)
      key = 'scale' if is_bn else 'kernel'
      if not is_bn:
        value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
    else:
      key = names[name]
    collection = 'batch_stats' if key in ('mean', 'var') else 'params'
    node = out[collection]
    for part in module.split('.'):
      node = node.setdefault(part, {})
    node[key] = np.ascontiguousarray(value)
  return out


def _flat(tree, prefix=()):
  for key, value in tree.items():
    if isinstance(value, Mapping):
      yield from _flat(value, (*prefix, key))
    else:
      yield (*prefix, key), value
