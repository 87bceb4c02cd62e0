"""Every recipe in configs/ loads through --config, validates, round-trips through config.json's form,
and its docstring says how to run it."""

import re
from pathlib import Path

import pytest

from dropnet_jax import settings
from dropnet_jax.cli import config_flags

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / 'configs').glob('*.py'))


def test_there_are_recipes():
  assert len(RECIPES) >= 5


@pytest.mark.parametrize('path', RECIPES, ids=lambda p: p.name)
def test_recipe_loads_validates_and_round_trips(path):
  text = path.read_text()
  match = re.search(r'python -m (experiments\.\w+) --config=configs/' + re.escape(path.name), text)
  assert match, f'{path.name}: its docstring shows the command that runs it'
  namespace = {'__file__': str(path)}  # a recipe may read a sibling recipe (one spelling of shared set-ups)
  exec(compile(text, str(path), 'exec'), namespace)
  config = namespace['get_config']()
  loaded = config_flags.load(str(path), type(config)(), 'any')
  assert loaded == config
  if hasattr(config, 'validate'):
    config.validate()
  assert settings.from_dict(type(config)(), settings.to_dict(config)) == config
