"""Command-line flags derived from a config dataclass: nothing here names a setting.

`define(default, kind)` declares, for the entry point that calls it:
  * `--config`: a recipe (a `.py` file whose `get_config()` returns the entry point's config) or a
    run's `config.json` (the same kind of run), as the base configuration;
  * `--config.<path>` for every setting (e.g. `--config.dropnet.train.optim.lr=0.05`);
  * `--<flag>` for every setting whose field names a short flag (e.g. `--lr=0.05`);
each with the field's help and default. `ConfigFlags.value()` is the base configuration with every
flag given on the command line applied (a setting given twice, long and short, is refused).
Lists are comma-separated (`--metrics=min,max`, `--config.model.widths=40,40`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any

from absl import flags

from dropnet_jax import settings

# Flags defined by `define` belong to the entry point that calls it: its `--help` lists them.
flags.disclaim_key_flags()


class ConfigFlags:
  """The settings flags of one entry point; `value()` after absl has parsed the command line."""

  def __init__(self, default: Any, kind: str, flag_values: flags.FlagValues):
    self.default, self.kind, self.flag_values = default, kind, flag_values
    self.leaves = list(settings.leaves(default))

  def flag_names(self) -> set[str]:
    """Every flag `define` declared: --config, and each setting's long and short forms."""
    return {'config'} | {f'config.{leaf.path}' for leaf in self.leaves} | {leaf.flag for leaf in self.leaves
                                                                           if leaf.flag}

  def long_twins(self) -> set[str]:
    """The long forms (config.<path>) of the settings that have a short flag too; the short flag's
    help names them, so --help lists them once."""
    return {f'config.{leaf.path}' for leaf in self.leaves if leaf.flag}

  def _present(self, name: str) -> bool:
    return name in self.flag_values and self.flag_values[name].present

  def base(self) -> Any:
    """The configuration --config gives (the defaults without it)."""
    path = self.flag_values['config'].value
    return self.default if not path else load(path, self.default, self.kind)

  def value(self) -> Any:
    """The configuration: --config (or the defaults), then every settings flag given. ValueError
    names the flag."""
    config = self.base()
    for leaf in self.leaves:
      given = [name for name in (f'config.{leaf.path}', leaf.flag) if name and self._present(name)]
      if len(given) > 1:
        raise ValueError(f'--{given[0]} and --{given[1]} set the same setting; give one')
      if given:
        value = settings.coerce(leaf, self.flag_values[given[0]].value, f'--{given[0]}')
        config = settings.replace(config, leaf.path, value)
    return config


def load(path: str, default: Any, kind: str) -> Any:
  """The configuration a recipe (.py) or a run's config.json holds; ValueError names the file."""
  if not os.path.isfile(path):
    raise ValueError(f'--config={path}: no such file')
  if path.endswith('.json'):
    data = settings.read_run_config(path)
    if data.get('kind', kind) != kind:
      raise ValueError(f'--config={path}: a {data.get("kind")} run\'s configuration; this entry point runs {kind}')
    return settings.from_dict(default, data['config'], f'--config={path}: config')
  if path.endswith('.py'):
    config = recipe_config(path)
    if isinstance(config, dict):
      return settings.from_dict(default, config, f'--config={path}')
    if type(config) is not type(default):
      raise ValueError(f'--config={path}: get_config() gives a {type(config).__name__}; this entry point takes '
                       f'a {type(default).__name__}')
    return config
  raise ValueError(f'--config={path}: expected a recipe (.py) or a run\'s config.json')


def recipe_config(path: str) -> Any:
  """What a recipe file's get_config() returns; ValueError names the file."""
  spec = importlib.util.spec_from_file_location(f'_recipe_{abs(hash(path))}', path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # a recipe is user code: its error is reported as the recipe's
    raise ValueError(f'--config={path}: the recipe failed to load ({type(e).__name__}: {e})') from None
  if not hasattr(module, 'get_config'):
    raise ValueError(f'--config={path}: a recipe defines get_config()')
  return module.get_config()


def _define_leaf(name: str, leaf: settings.Leaf, help_text: str, flag_values: flags.FlagValues) -> None:
  default = leaf.value
  if leaf.is_tuple:
    flags.DEFINE_list(name, None if default is None else [str(v) for v in default], help_text,
                      flag_values=flag_values)
  elif leaf.kind is bool:
    flags.DEFINE_bool(name, default, help_text, flag_values=flag_values)
  elif leaf.kind is int:
    flags.DEFINE_integer(name, default, help_text, flag_values=flag_values)
  elif leaf.kind is float:
    flags.DEFINE_float(name, default, help_text, flag_values=flag_values)
  elif leaf.choices:
    flags.DEFINE_enum(name, default, list(leaf.choices), help_text, flag_values=flag_values)
  else:
    flags.DEFINE_string(name, default, help_text, flag_values=flag_values)


def define(default: Any, kind: str, flag_values: flags.FlagValues = flags.FLAGS) -> ConfigFlags:
  """Declares --config, --config.<path> and the short flags of `default`'s settings (see the module
  docstring); `kind` names the run (what a config.json given to --config must be)."""
  if not dataclasses.is_dataclass(default):
    raise TypeError('define() takes a config dataclass instance')
  flags.DEFINE_string('config', None, 'A recipe (configs/*.py, whose get_config() returns the settings) or a '
                      'run\'s config.json, as the base of every setting below; flags given on the command line '
                      'override it.', flag_values=flag_values)
  holder = ConfigFlags(default, kind, flag_values)
  for leaf in holder.leaves:
    if leaf.flag:
      _define_leaf(leaf.flag, leaf, f'{leaf.help} [config.{leaf.path}]', flag_values)
      _define_leaf(f'config.{leaf.path}', leaf, f'The same as --{leaf.flag}.', flag_values)
    else:
      _define_leaf(f'config.{leaf.path}', leaf, leaf.help, flag_values)
  return holder
