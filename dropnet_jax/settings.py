"""Typed settings, each written once: a dataclass field with its default, its help and what it touches.

A setting is declared as `name: type = setting(default, help, flag=..., result=...)` on a frozen
dataclass (`dropnet_jax.config` holds them). Everything else is derived from that one declaration:

  * the command line (`dropnet_jax.cli.config_flags`): `--config.<path>` for every field, plus the
    short `--<flag>` people type for the fields that name one, with the field's help and default;
  * `config.json` (`to_dict`) and its way back in (`from_dict`, refusing unknown keys by path);
  * the checkpoint stamp (`stamp`): the fields whose `result=True`, i.e. those that can change a
    result. Verbosity, progress, checkpoint interval and where the data are read from are marked
    `result=False` on the field, so a resume may change them and nothing lists them by hand.

Why not ml_collections' `config_flags.DEFINE_config_dataclass`: (a) it resolves field types with
`issubclass` on the annotation, which fails on the string annotations of `from __future__ import
annotations` and on `X | None`; (b) it assigns overrides with `setattr`, which frozen dataclasses
refuse (and the configs must stay frozen: they are hashable static arguments of jitted code);
(c) it defines the `--config.*` flags only for those present on the command line, so `--help` cannot
list them. The part of its interface people know (`--config=<file>`, `--config.a.b=value`) is kept.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, Iterator

MISSING = dataclasses.MISSING


def setting(default: Any = MISSING, help: str = '', *, flag: str | None = None, result: bool = True,
            choices: tuple[str, ...] | None = None) -> Any:
  """A config field: `default`, a one-line `help`, the short command-line `flag` (None: only
  `--config.<path>`), whether it can change a `result` (else a resume may change it), and the allowed
  `choices` of a string."""
  return dataclasses.field(default=default, metadata={
      'help': help, 'flag': flag, 'result': result, 'choices': choices})


@dataclasses.dataclass(frozen=True)
class Leaf:
  """One setting of a config tree: its dotted path, type, field metadata and current value."""
  path: str
  kind: type  # bool, int, float or str (for a tuple: its element type)
  is_tuple: bool
  optional: bool
  help: str
  flag: str | None
  result: bool
  choices: tuple[str, ...] | None
  value: Any


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
  return typing.get_type_hints(cls)


def _unwrap(annotation: Any) -> tuple[Any, bool]:
  """(the type without None, whether None is allowed)."""
  if typing.get_origin(annotation) in (typing.Union, types.UnionType):
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if len(args) != 1:
      raise TypeError(f'unsupported setting type {annotation}')
    return args[0], True
  return annotation, False


def leaves(config: Any, prefix: str = '') -> Iterator[Leaf]:
  """Every setting of `config` (a dataclass instance), depth first, in declaration order."""
  for f in dataclasses.fields(config):
    value = getattr(config, f.name)
    path = prefix + f.name
    annotation, optional = _unwrap(_hints(type(config))[f.name])
    if dataclasses.is_dataclass(annotation):
      yield from leaves(value, path + '.')
      continue
    is_tuple = typing.get_origin(annotation) is tuple
    kind = typing.get_args(annotation)[0] if is_tuple else annotation
    if kind not in (bool, int, float, str):
      raise TypeError(f'{path}: unsupported setting type {annotation}')
    meta = f.metadata
    yield Leaf(path, kind, is_tuple, optional, meta.get('help', ''), meta.get('flag'), meta.get('result', True),
               meta.get('choices'), value)


def coerce(leaf: Leaf, value: Any, where: str) -> Any:
  """`value` (from JSON, a recipe or the command line) as the leaf's type; ValueError names `where`."""
  if value is None:
    if leaf.optional:
      return None
    raise ValueError(f'{where}: a value is required')
  if leaf.is_tuple:
    if isinstance(value, str):
      value = [v for v in value.split(',') if v.strip()]
    if not isinstance(value, (list, tuple)):
      raise ValueError(f'{where}: expected a list, got {value!r}')
    return tuple(_scalar(leaf, v, where) for v in value)
  return _scalar(leaf, value, where)


def _scalar(leaf: Leaf, value: Any, where: str) -> Any:
  kind = leaf.kind
  if isinstance(value, str) and kind is not str:
    text = value.strip()
    if kind is bool:
      if text.lower() not in ('true', 'false', '1', '0'):
        raise ValueError(f'{where}: expected true or false, got {value!r}')
      return text.lower() in ('true', '1')
    try:
      value = float(text) if kind is float else int(text)
    except ValueError:
      raise ValueError(f'{where}: expected {"a number" if kind is float else "an integer"}, got {value!r}') from None
  if kind is bool and not isinstance(value, bool):
    raise ValueError(f'{where}: expected true or false, got {value!r}')
  if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
    if isinstance(value, float) and value.is_integer():
      value = int(value)
    else:
      raise ValueError(f'{where}: expected an integer, got {value!r}')
  if kind is float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ValueError(f'{where}: expected a number, got {value!r}')
    value = float(value)
  if kind is str:
    if not isinstance(value, str):
      raise ValueError(f'{where}: expected a string, got {value!r}')
    value = value.strip()
    if leaf.choices is not None and value not in leaf.choices:
      raise ValueError(f'{where}: {value!r} is not one of {", ".join(leaf.choices)}')
  return value


def replace(config: Any, path: str, value: Any) -> Any:
  """`config` with the setting at dotted `path` set to `value` (nested frozen dataclasses rebuilt)."""
  head, _, rest = path.partition('.')
  if rest:
    return dataclasses.replace(config, **{head: replace(getattr(config, head), rest, value)})
  return dataclasses.replace(config, **{head: value})


def to_dict(config: Any) -> dict[str, Any]:
  """A config dataclass as JSON-able nested dicts (tuples as lists): the `config` of config.json."""
  out = {}
  for f in dataclasses.fields(config):
    v = getattr(config, f.name)
    if dataclasses.is_dataclass(v):
      v = to_dict(v)
    elif isinstance(v, tuple):
      v = list(v)
    out[f.name] = v
  return out


def from_dict(default: Any, data: dict[str, Any], where: str = 'config') -> Any:
  """`default` (a config instance) with every setting `data` gives (nested dicts as from `to_dict`).
  A key that is no setting, or a value of the wrong type, raises ValueError naming its path; a setting
  `data` lacks keeps its default (so an older config.json still loads)."""
  if not isinstance(data, dict):
    raise ValueError(f'{where}: expected an object, got {data!r}')
  known = {f.name for f in dataclasses.fields(default)}
  unknown = sorted(set(data) - known)
  if unknown:
    raise ValueError(f'{where}: unknown setting{"s" * (len(unknown) > 1)} {", ".join(unknown)}')
  changes = {}
  own = {leaf.path: leaf for leaf in leaves(default) if '.' not in leaf.path}
  for name, value in data.items():
    current = getattr(default, name)
    if dataclasses.is_dataclass(current):
      changes[name] = from_dict(current, value, f'{where}.{name}')
    else:
      changes[name] = coerce(own[name], value, f'{where}.{name}')
  return dataclasses.replace(default, **changes)


def read_run_config(path: str) -> dict[str, Any]:
  """A run's config.json as written by `runs.run_dir.RunDir` ({'kind', 'config', 'stamp', ...});
  ValueError (one line naming the file) when it is not valid JSON or not such a file."""
  import json
  try:
    with open(path) as f:
      data = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f'{path} is not valid JSON ({e}); move it away to start afresh') from None
  if not isinstance(data, dict) or 'config' not in data or 'stamp' not in data:
    raise ValueError(f'{path} is not a run\'s config.json of this version of dropnet_jax')
  return data


def stamp(config: Any) -> dict[str, Any]:
  """The settings a run's results depend on, flat by dotted path: what its checkpoints and
  config.json are compared on before a resume (fields marked `result=False` are left out)."""
  return {leaf.path: list(leaf.value) if leaf.is_tuple and leaf.value is not None else leaf.value
          for leaf in leaves(config) if leaf.result}


def differences(saved: dict[str, Any] | None, current: dict[str, Any] | None) -> list[str]:
  """'path: saved X, now Y' for every entry of two stamps that differs (nothing when either is None)."""
  if saved is None or current is None:
    return []
  keys = sorted(set(saved) | set(current))
  return [f'{k}: saved {saved.get(k)!r}, now {current.get(k)!r}' for k in keys if saved.get(k) != current.get(k)]
