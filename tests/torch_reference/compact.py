"""The PyTorch twin of a compacted Model A/B/C, and its export next to the JAX one.

`dropnet_jax.compaction.compact` turns a masked network into a smaller dense one of the
same family; this builds the torch twin of that small network
(`tests.torch_reference.models`, weights copied by
`weights.load_flax_params`) and checks that both compute the same logits. A
constant network (a layer with no units left, see dropnet_jax.compaction.compact) becomes
`ConstantTwin`. VGG16/VGG19 twins carry batch norm with θ's running statistics; ResNet18 (no
batch norm) has no torch twin in this reference.

`export(dir, model, theta, image_shape)` writes the JAX export
(`compact.save`), the twin's state dict (`torch_state_dict.pt`) and the
largest logit difference between the two on random images; `load_torch(dir)`
rebuilds the twin from the directory.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import numpy as np
import torch
from torch import nn

from dropnet_jax import theta as theta_lib
from dropnet_jax.compaction import compact
from dropnet_jax.models.compact import ConstantModel, model_from_spec, spec_of
from tests.torch_reference import models as tmodels
from tests.torch_reference.weights import load_flax_params

STATE_FILE = 'torch_state_dict.pt'


class ConstantTwin(nn.Module):
  """The twin of compact_models.ConstantModel: the same logits for every input."""

  def __init__(self, num_classes: int):
    super().__init__()
    self.widths = ()
    self.bias = nn.Parameter(torch.zeros(num_classes))

  def forward(self, images: torch.Tensor, masks=(), with_stats: bool = True):
    del masks, with_stats
    return self.bias.expand(images.shape[0], -1), ()


def to_torch(model: Any, theta: Any, image_shape: Sequence[int]) -> nn.Module:
  """The torch twin of a (compact) Flax Model A/B/C, VGG16/19 or ConstantModel, holding the same weights
  (batch norm: θ's running statistics too; the twin is returned in eval mode)."""
  params, _ = theta_lib.split(theta)
  if isinstance(model, ConstantModel):
    twin = ConstantTwin(model.num_classes)
    with torch.no_grad():
      twin.bias.copy_(torch.from_numpy(np.array(params['bias'], np.float32)))
    return twin
  spec = spec_of(model)
  if spec['model'] not in tmodels.MODELS:
    raise ValueError(f'no torch twin for {spec["model"]!r}; the reference has {sorted(tmodels.MODELS)}')
  kwargs = {'head': tuple(spec['head'])} if 'head' in spec else {}
  twin = tmodels.MODELS[spec['model']](widths=tuple(spec['widths']), num_classes=spec['num_classes'],
                                       image_shape=tuple(image_shape), **kwargs)
  return load_flax_params(twin, theta).eval()


def max_abs_diff(model: Any, theta: Any, twin: nn.Module, images: np.ndarray) -> float:
  """Largest |logit difference| between the Flax model and its twin on uint8 NHWC `images` (all-ones masks)."""
  jax_logits = np.asarray(compact.predict(model, theta, jnp.asarray(images)), np.float64)
  with torch.no_grad():
    torch_logits, _ = twin(torch.from_numpy(np.array(images)), tmodels.full_masks(twin), with_stats=False)
  return float(np.abs(torch_logits.detach().double().numpy() - jax_logits).max())


def save_torch(directory: str, twin: nn.Module) -> str:
  path = os.path.join(directory, STATE_FILE)
  torch.save(twin.state_dict(), path)
  return path


def load_torch(directory: str) -> nn.Module:
  """The twin saved by `export`, rebuilt from spec.json (which must hold the image shape)."""
  with open(os.path.join(directory, compact.SPEC_FILE)) as f:
    spec = json.load(f)
  model = model_from_spec(spec)
  if spec['image_shape'] is None:
    raise ValueError(f'{directory}: spec.json has no image_shape; the torch twin needs it')
  twin = to_torch(model, _zeros_theta(spec), spec['image_shape'])
  twin.load_state_dict(torch.load(os.path.join(directory, STATE_FILE)))
  return twin


def _zeros_theta(spec: Mapping[str, Any]) -> dict[str, Any]:
  """A params tree of zeros with the exported shapes (only to build the twin before loading its state)."""
  flat = {k: np.zeros(v, np.float32) for k, v in spec['shapes'].items()}
  return theta_lib.split(compact.unflatten(flat))[0]


def export(directory: str, model: Any, theta: Any, image_shape: Sequence[int],
           extra_meta: Mapping[str, Any] | None = None, check_examples: int = 16, seed: int = 0) -> float:
  """compact.save + the torch twin; returns (and records in torch_check.json) the twin's max |logit diff|."""
  compact.save(directory, model, theta, extra_meta, image_shape)
  twin = to_torch(model, theta, image_shape)
  save_torch(directory, twin)
  images = np.random.default_rng(seed).integers(0, 256, (check_examples, *image_shape)).astype(np.uint8)
  diff = max_abs_diff(model, theta, twin, images)
  with open(os.path.join(directory, 'torch_check.json'), 'w') as f:
    json.dump({'max_abs_logit_diff': diff, 'examples': check_examples, 'seed': seed}, f)
  return diff
