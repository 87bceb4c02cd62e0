"""Masked Flax models of the DropNet paper.

Every model takes the node/filter masks as an explicit input of `__call__`
(a tuple with one float vector per masked layer, 1 = kept, 0 = dropped) and
returns `(logits, stats)`; `train=True` switches layers that behave
differently in training (batch norm) and is ignored by the others. `stats`
holds, per masked layer, the per-example post-activation statistics that scoring needs, so no second "activation model"
is ever built:

  * `abs_mean[b, u]`: mean |a| of unit u on example b (for conv filters the
    mean over spatial positions, the paper's filter score);
  * `zero_frac[b, u]`: fraction of unit u's activations that are exactly zero
    (APoZ; for a dense node it is 0 or 1).

Images arrive as uint8 and are scaled to [0, 1] inside the model, so datasets
stay uint8 on the device (4x less memory than float32).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from dropnet_jax.models import large as large_models
from dropnet_jax.models import resnet_bn
from dropnet_jax.models import vgg as vgg_models
from dropnet_jax.models.layers import (KERNEL_INIT, InputNorm, Masks, UnitStats, check_dropout, dropout,  # noqa: F401
                                       full_masks, masked_relu, to_float)


class MLP(nn.Module):
  """Model A: FC hidden layers (default FC40-FC40), ReLU, mask after each."""
  widths: Sequence[int] = (40, 40)
  num_classes: int = 10
  dropout: float = 0.0  # after each hidden layer (its mask applied), training only
  input_norm: InputNorm = None
  initializer: str = 'glorot'  # glorot or torch: what `init_params` draws θ0 from

  @nn.compact
  def __call__(self, images: jax.Array, masks: Masks, train: bool = False):
    x = to_float(images, self.input_norm).reshape((images.shape[0], -1))
    stats = []
    for width, mask in zip(self.widths, masks, strict=True):
      x, s = masked_relu(nn.Dense(width, kernel_init=KERNEL_INIT)(x), mask)
      x = dropout(x, self.dropout, train)
      stats.append(s)
    logits = nn.Dense(self.num_classes, kernel_init=KERNEL_INIT)(x)
    return logits, tuple(stats)


class ConvNet(nn.Module):
  """Model B: 3x3 same-padding convs, each ReLU -> mask -> 2x2 max-pool.

  `widths` are the filters per conv (Conv64-Conv64 by default; Conv64-Conv32
  and Conv32-Conv64 are `(64, 32)` and `(32, 64)`), then a linear classifier.
  """
  widths: Sequence[int] = (64, 64)
  num_classes: int = 10
  dropout: float = 0.0  # on the flattened features the classifier reads, training only
  input_norm: InputNorm = None
  initializer: str = 'glorot'  # glorot or torch: what `init_params` draws θ0 from

  @nn.compact
  def __call__(self, images: jax.Array, masks: Masks, train: bool = False):
    x = to_float(images, self.input_norm)
    stats = []
    for width, mask in zip(self.widths, masks, strict=True):
      x = nn.Conv(width, (3, 3), padding='SAME', kernel_init=KERNEL_INIT)(x)
      x, s = masked_relu(x, mask)
      stats.append(s)
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = dropout(x.reshape((x.shape[0], -1)), self.dropout, train)
    logits = nn.Dense(self.num_classes, kernel_init=KERNEL_INIT)(x)
    return logits, tuple(stats)


class ModelC(nn.Module):
  """Model C (the paper's CIFAR-10 model): Conv64-Conv64-Pool-Conv128-Conv128-Pool-FC256.

  `widths` gives the four conv widths; the mask follows each conv's ReLU
  (before the pool). `head` are the hidden FC layers before the classifier
  ((256,) is the paper's; the ensemble deck's deeper heads are e.g. (512, 256)).
  The head is not masked: the paper prunes the convolutional filters of this
  model. Dropout (training only) follows each head layer's ReLU.
  """
  widths: Sequence[int] = (64, 64, 128, 128)
  head: Sequence[int] = (256,)
  num_classes: int = 10
  dropout: float = 0.0
  input_norm: InputNorm = None
  initializer: str = 'glorot'  # glorot or torch: what `init_params` draws θ0 from

  @nn.compact
  def __call__(self, images: jax.Array, masks: Masks, train: bool = False):
    if len(self.widths) % 2:
      raise ValueError(f'ModelC needs an even number of conv widths (pairs before each pool), got {self.widths}')
    x = to_float(images, self.input_norm)
    stats = []
    for i, (width, mask) in enumerate(zip(self.widths, masks, strict=True)):
      x = nn.Conv(width, (3, 3), padding='SAME', kernel_init=KERNEL_INIT)(x)
      x, s = masked_relu(x, mask)
      stats.append(s)
      if i % 2 == 1:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    for width in self.head:
      x = dropout(nn.relu(nn.Dense(int(width), kernel_init=KERNEL_INIT)(x)), self.dropout, train)
    logits = nn.Dense(self.num_classes, kernel_init=KERNEL_INIT)(x)
    return logits, tuple(stats)


MODELS = {'fc': MLP, 'conv': ConvNet, 'modelc': ModelC, **large_models.LARGE_MODELS,
          'resnet18_bn': resnet_bn.ResNet18BN}
RESNET18_NAMES = ('resnet18', 'resnet18_bn')  # the residual-group width rules hold for both
DEFAULT_WIDTHS = {'fc': (40, 40), 'conv': (64, 64), 'modelc': (64, 64, 128, 128),
                  'resnet18': large_models.resnet18_widths(), 'resnet18_bn': large_models.resnet18_widths(),
                  'vgg16': large_models.VGG16.CONV_WIDTHS,
                  'vgg19': large_models.VGG19.CONV_WIDTHS}  # VGG: the convs; create_model appends the head


INITIALIZERS = ('glorot', 'torch')


def default_initializer(name: str) -> str:
  """glorot (Keras' defaults, the DropNet paper's code) for the paper's models; torch (PyTorch's layer
  defaults) for the PyTorch reports' models."""
  return 'torch' if name in TORCH_INIT_MODELS else 'glorot'


TORCH_INIT_MODELS: set[str] = {'resnet18_bn'}  # model names whose default initializer is torch's


def create_model(name: str, widths: Sequence[int] | None, num_classes: int, width_multiplier: float = 1.0, *,
                 head: Sequence[int] | None = None, dropout: float = 0.0, initializer: str = 'auto',
                 input_norm: InputNorm = None, stages: Sequence[int] | None = None) -> nn.Module:
  """Builds a model by its `--model` name; `widths` (one per masked layer) default to the model's,
  scaled by `width_multiplier` (each at least 1; ResNet18 keeps its residual constraints).
  VGG16/VGG19: `widths` are the conv widths, optionally followed by the head widths; the head's FC
  nodes are masked layers, so the model's widths end with `head` (taken as given, not scaled).

  `head`: hidden FC widths of the classifier head (models with a `head` field; None: the model's
  default). `dropout`: rate in [0, 1), training only. `initializer`: glorot, torch or auto (the
  model's default, `default_initializer`). `input_norm`: per-channel (mean, std) the model applies to
  its [0, 1]-scaled input. `stages`: ResNet18 only, the kept stages (layer removal, e.g. (1, 2, 3);
  None: all four).
  """
  if name not in MODELS:
    raise ValueError(f'unknown model {name!r}; choose one of {sorted(MODELS)}')
  # Refused even when `widths` make it unused: a bad value given is a mistake, not a no-op.
  if not (math.isfinite(width_multiplier) and width_multiplier > 0):
    raise ValueError(f'--width_multiplier must be a positive number, got {width_multiplier}')
  if stages is not None:
    if name not in RESNET18_NAMES:
      raise ValueError(f'stages (layer removal) applies to {" and ".join(RESNET18_NAMES)}, not {name}')
    stages = large_models.check_stages(stages)
  if not widths:
    widths = default_widths(name, width_multiplier, stages)
  widths = tuple(widths)
  if not widths or any(int(w) != w or w <= 0 for w in widths):
    raise ValueError(f'widths must be positive integers, got {widths}')
  widths = tuple(int(w) for w in widths)
  if name in RESNET18_NAMES:
    large_models.check_resnet18_widths(widths, stages or large_models.ALL_STAGES)
  elif name in vgg_models.VGG_MODELS:  # conv widths (+ head widths); the head is masked, so widths end with it
    widths, head = vgg_models.widths_with_head(name, widths, head)
  check_dropout(dropout)
  if initializer == 'auto':
    initializer = default_initializer(name)
  if initializer not in INITIALIZERS:
    raise ValueError(f'unknown initializer {initializer!r}; choose one of auto, {", ".join(INITIALIZERS)}')
  cls = MODELS[name]
  options: dict[str, Any] = {'dropout': float(dropout), 'initializer': initializer}
  if input_norm is not None:
    options['input_norm'] = tuple(tuple(float(v) for v in part) for part in input_norm)
  if head is not None:
    if 'head' not in cls.__dataclass_fields__:
      raise ValueError(f'model {name} has no classifier head to configure (head={tuple(head)})')
    if any(int(w) != w or w <= 0 for w in head):
      raise ValueError(f'head widths must be positive integers, got {tuple(head)}')
    options['head'] = tuple(int(w) for w in head)
  if stages is not None:
    options['stages'] = stages
  return cls(widths=widths, num_classes=num_classes, **options)


def model_from_config(config: Any, num_classes: int, input_norm: InputNorm = None) -> nn.Module:
  """`create_model` from a `config.ModelConfig` (name, widths, width_multiplier, head, dropout, init)."""
  return create_model(config.name, config.widths, num_classes, config.width_multiplier, head=config.head,
                      dropout=config.dropout, initializer=config.init, input_norm=input_norm,
                      stages=getattr(config, 'stages', None))


def default_widths(name: str, width_multiplier: float = 1.0, stages: Sequence[int] | None = None) -> tuple[int, ...]:
  """The masked-layer widths of `name`, every layer scaled by `width_multiplier` (at least 1); ResNet18:
  of the kept `stages` (None: all)."""
  if width_multiplier <= 0:
    raise ValueError(f'width_multiplier must be positive, got {width_multiplier}')
  if name in RESNET18_NAMES:
    stage_widths = tuple(max(1, int(round(w * width_multiplier))) for w in large_models.RESNET18_STAGES)
    return large_models.resnet18_widths(stage_widths, stages or large_models.ALL_STAGES)
  return tuple(max(1, int(round(w * width_multiplier))) for w in DEFAULT_WIDTHS[name])


def parse_widths(values: Sequence[str] | None) -> tuple[int, ...] | None:
  """A `--widths` flag value (list of strings) as positive integers; None when not given."""
  if not values:
    return None
  try:
    widths = tuple(int(v) for v in values)
  except ValueError:
    raise ValueError(f'--widths must be positive integers, got {",".join(values)}') from None
  if any(w <= 0 for w in widths):
    raise ValueError(f'--widths must be positive integers, got {",".join(values)}')
  return widths


def init_params(model: nn.Module, key: jax.Array, image_shape: Sequence[int]) -> Any:
  """θ0: the model's initial parameters for one seed.

  The 'params' tree, or for models with batch norm (VGG19) the variables dict
  {'params', 'batch_stats'}: the initial running statistics are part of θ0 and
  are reset with it (dropnet_jax.training.trainer accepts either form).
  """
  dummy = jnp.zeros((1, *image_shape), jnp.uint8)
  variables = model.init(key, dummy, full_masks(model))
  if getattr(model, 'initializer', 'glorot') == 'torch':
    variables = {**variables, 'params': torch_initializer(jax.random.fold_in(key, 1), variables['params'])}
  if 'batch_stats' in variables:
    return {'params': variables['params'], 'batch_stats': variables['batch_stats']}
  return variables['params']


def torch_initializer(key: jax.Array, params: Any) -> Any:
  """PyTorch's default initialisation of `params`: every Conv/Linear kernel (`kaiming_uniform_(a=√5)`)
  and its bias are uniform on ±1/√fan_in, fan_in = the kernel's input size (kh·kw·c_in or d_in);
  batch-norm scale 1 and bias 0 (Flax's defaults, as torch's) are left as they are."""
  def layer(key, module):
    if not isinstance(module, dict):
      return module
    if 'kernel' not in module:
      keys = jax.random.split(key, max(len(module), 1))
      return {name: layer(k, sub) for k, (name, sub) in zip(keys, sorted(module.items()))}
    kernel = module['kernel']
    fan_in = math.prod(kernel.shape[:-1])
    if fan_in == 0:
      return module
    bound = 1.0 / math.sqrt(fan_in)
    k_kernel, k_bias = jax.random.split(key)
    out = dict(module)
    out['kernel'] = jax.random.uniform(k_kernel, kernel.shape, kernel.dtype, -bound, bound)
    if 'bias' in module:
      out['bias'] = jax.random.uniform(k_bias, module['bias'].shape, module['bias'].dtype, -bound, bound)
    return out
  return layer(key, flax.core.unfreeze(params))
