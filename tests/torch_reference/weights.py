"""Parameter transfer between the Flax models and their torch twins.

Flax names the layers `Conv_i` / `Dense_i` in creation order; the torch models
keep them in `model.convs[i]` / `model.dense[i]`. Dense kernels are (in, out)
in Flax and Linear weights (out, in) in torch; conv kernels are HWIO in Flax
and OIHW in torch.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
from torch import nn


def _layers(model: nn.Module):
  yield from ((f'Conv_{i}', m) for i, m in enumerate(model.convs))
  yield from ((f'Dense_{i}', m) for i, m in enumerate(model.dense))


def load_flax_params(model: nn.Module, params: Mapping[str, Any]) -> nn.Module:
  """Copies Flax `params` (the 'params' collection) into `model` in place; returns it."""
  names = dict(_layers(model))
  if set(names) != set(params):
    raise ValueError(f'layer names differ: torch {sorted(names)} vs flax {sorted(params)}')
  with torch.no_grad():
    for name, layer in names.items():
      kernel = torch.from_numpy(np.array(params[name]['kernel'], np.float32))
      kernel = kernel.permute(3, 2, 0, 1) if kernel.dim() == 4 else kernel.T
      if kernel.shape != layer.weight.shape:
        raise ValueError(f'{name}: flax kernel gives {tuple(kernel.shape)}, torch wants {tuple(layer.weight.shape)}')
      layer.weight.copy_(kernel)
      layer.bias.copy_(torch.from_numpy(np.array(params[name]['bias'], np.float32)))
  return model


def to_flax_params(model: nn.Module) -> dict[str, dict[str, np.ndarray]]:
  """The reverse: the model's parameters as a Flax-layout dict of numpy arrays."""
  out = {}
  for name, layer in _layers(model):
    w = layer.weight.detach()
    w = w.permute(2, 3, 1, 0) if w.dim() == 4 else w.T
    out[name] = {'kernel': w.contiguous().numpy().copy(), 'bias': layer.bias.detach().numpy().copy()}
  return out
