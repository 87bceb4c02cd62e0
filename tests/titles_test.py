"""Tests for dropnet_jax.runs.titles: the names figures and run headers give models and datasets."""

import pytest

from dropnet_jax.models import large
from dropnet_jax.models.small import default_widths
from dropnet_jax.runs import reporting, titles


@pytest.mark.parametrize('name, widths, expected', [
    ('fc', (40, 40), 'Model A (FC40-FC40)'),
    ('fc', (8, 8), 'Model A (FC8-FC8)'),
    ('fc', (300, 100, 50), 'Model A (FC300-FC100-FC50)'),
    ('conv', (64, 64), 'Model B (Conv64-Conv64)'),
    ('conv', (32, 64), 'Model B (Conv32-Conv64)'),
    ('modelc', (64, 64, 128, 128), 'Model C'),
    ('modelc', (32, 32, 64, 64), 'Model C (width x0.5)'),
    ('modelc', (32, 32, 64, 100), 'Model C (Conv32-Conv32-Conv64-Conv100)'),
    ('resnet18', large.resnet18_widths(), 'ResNet18'),
    ('resnet18', large.resnet18_widths((16, 32, 64, 128)), 'ResNet18 (width x0.25)'),
    ('resnet18', large.resnet18_widths((16, 40, 64, 128)), 'ResNet18 (stages 16-40-64-128)'),
    ('vgg19', large.VGG19_WIDTHS, 'VGG19'),
    ('vgg19', default_widths('vgg19', 0.125), 'VGG19 (width x0.125)'),
    ('vgg19', (8,) * 16, 'VGG19 (custom widths)'),
])
def test_model_title(name, widths, expected):
  assert titles.model_title(name, widths) == expected
  assert reporting.model_title(name, list(widths)) == expected  # the same function, lists too


@pytest.mark.parametrize('multiplier', [0.25, 0.3, 0.5, 2.0])
def test_model_title_names_the_width_multiplier(multiplier):
  # A multiplier whose rounded layers give ratios like 0.301 still reads as the multiplier given.
  for name in ('modelc', 'resnet18', 'vgg19'):
    assert titles.model_title(name, default_widths(name, multiplier)) == \
        f'{titles.model_title(name, default_widths(name))} (width x{multiplier:g})'


def test_dataset_and_run_titles():
  assert titles.dataset_title('mnist') == 'MNIST'
  assert titles.dataset_title('cifar10') == 'CIFAR-10'
  assert titles.dataset_title('tiny_imagenet') == 'Tiny ImageNet'
  assert titles.dataset_title('digits') == '8x8 digits'
  assert titles.dataset_title('other') == 'other'
  assert titles.run_title('fc', [40, 40], 'mnist') == 'Model A (FC40-FC40) on MNIST'


def test_setup_title_uses_the_readable_names():
  from dropnet_jax.config import ExperimentConfig
  from dropnet_jax.runs import experiment
  config = ExperimentConfig()
  model = experiment.build_model(config)
  setup = experiment.Setup(config, model, None, None)
  assert setup.title() == titles.run_title(config.model.name, model.widths, config.data.dataset)
  assert setup.title().startswith('Model A (FC')
