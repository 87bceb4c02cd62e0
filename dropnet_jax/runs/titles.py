"""Readable names of models and datasets for figure titles and run headers.

A figure headed `fc [40, 40] on digits` names the `--model` flag and a Python list, which a reader
of a paper has to decode; the paper calls the same network "Model A (FC40-FC40)". `model_title`
gives that name from the model's `--model` name and its masked-layer widths (what every run
records), so a title says both which architecture it is and how wide it was trained:

  fc        Model A (FC40-FC40)          the widths listed, one per hidden layer
  conv      Model B (Conv64-Conv64)      the widths listed, one per conv
  modelc    Model C                      at the paper's widths; else "width x0.5" when every
  resnet18  ResNet18 (width x0.25)       layer is the default scaled by one multiplier (as
  vgg19     VGG19                        --width_multiplier makes them), else the widths
                                         (Model C), stage widths (ResNet18) or "custom widths"
  vgg16     VGG16 (width x0.5) + FC256   a VGG's hidden FC (head) widths follow its convs'

Widths are inferred, not passed as a multiplier, because the records and config.json keep the
widths themselves; a multiplier is found by trying each layer's ratio to the default, rounded to
1-3 decimals, the roundest first (so 0.3 reads "x0.3", not "x0.301" from a rounded layer).
"""

from __future__ import annotations

from typing import Sequence

_NAMES = {'fc': 'Model A', 'conv': 'Model B', 'modelc': 'Model C', 'resnet18': 'ResNet18',
          'resnet18_bn': 'ResNet18-BN', 'vgg16': 'VGG16', 'vgg19': 'VGG19'}
_DATASETS = {'digits': '8x8 digits', 'mnist': 'MNIST', 'cifar10': 'CIFAR-10', 'tiny_imagenet': 'Tiny ImageNet'}


def _multiplier(name: str, widths: tuple[int, ...]) -> float | None:
  """The width multiplier that turns `name`'s default widths into `widths`, or None."""
  from dropnet_jax.models.small import default_widths  # here: importing this module must not load flax
  default = default_widths(name)
  if len(default) != len(widths):
    return None
  ratios = [w / d for w, d in zip(widths, default)]
  candidates = sorted({round(r, digits) for r in ratios for digits in (1, 2, 3)} | set(ratios),
                      key=lambda m: (len(f'{m:g}'), m))
  for m in candidates:
    if m > 0 and default_widths(name, m) == widths:
      return m
  return None


def model_title(name: str, widths: Sequence[int]) -> str:
  """A model as a paper names it, e.g. 'Model A (FC40-FC40)' or 'ResNet18 (width x0.25)'."""
  widths = tuple(int(w) for w in widths)
  title = _NAMES.get(name, name)
  if name == 'fc':
    return f'{title} ({"-".join(f"FC{w}" for w in widths)})'
  if name == 'conv':
    return f'{title} ({"-".join(f"Conv{w}" for w in widths)})'
  if name not in _NAMES:
    return f'{title} ({"-".join(map(str, widths))})'
  if name in ('vgg16', 'vgg19'):  # the head's FC widths follow the convs': 'VGG19 (width x0.25) + FC1024'
    from dropnet_jax.models.small import default_widths
    n = len(default_widths(name))
    if len(widths) > n:
      return f'{model_title(name, widths[:n])} + {"-".join(f"FC{w}" for w in widths[n:])}'
  m = _multiplier(name, widths)
  if m == 1:
    return title
  if m is not None:
    return f'{title} (width x{m:g})'
  if name == 'modelc':
    return f'{title} ({"-".join(f"Conv{w}" for w in widths)})'
  if name in ('resnet18', 'resnet18_bn') and len(widths) == 20:
    from dropnet_jax.models import large as large_models
    stages = (widths[0], widths[9], widths[14], widths[19])  # the stem and the out widths of blocks 3, 5, 7
    if large_models.resnet18_widths(stages) == widths:
      return f'{title} (stages {"-".join(map(str, stages))})'
  return f'{title} (custom widths)'


def dataset_title(name: str) -> str:
  """A dataset as a paper names it, e.g. 'MNIST', 'CIFAR-10'; unknown names are kept."""
  return _DATASETS.get(name, name)


def run_title(model: str, widths: Sequence[int], dataset: str) -> str:
  """'Model A (FC40-FC40) on MNIST': the title of a run's figures and its progress header."""
  return f'{model_title(model, widths)} on {dataset_title(dataset)}'
