"""Saved networks rebuilt from their files and scored again: `experiments.evaluate` (the magnitude
report's `test.py`) as a library call.

What can be evaluated (`--networks`, comma-separated):
  * a record of any run that saved its params (`runs.saved_params`: DropNet runs and the studies'
    runs, magnitude runs, the tuner's retrained best): `RUN[:SELECTOR]` with the record selector of
    `saved_params.parse_selector` (the one spelling, shared with `init_from`: `seed0/dense`,
    `seed0/min/cycle3`, `seed0/oneshot s=0.9` for a trial's newest saved cycle; none: seed 0's dense
    network), or `RUN:*` for every saved record of the run (`saved_params.saved_selectors`);
  * a compact export (`experiments.compact --out`): its directory.
Every network is read once before anything is written (`load_saved` checks the manifest and that
orbax can read it), so a missing, unsaved or damaged network ends the command with one line naming
it; the evaluation then reads each again, one at a time, so `RUN:*` of a large model never holds
every θ at once.

Each network is scored on the data its run used: the run's config.json gives dataset, data_dir,
split_seed, `train_subset` (the runs that take one) and the evaluation batch size; `data_dir` may be
overridden (the files may live elsewhere now), and the data read are checked against the
fingerprint the run stamped, so other files under the same name are refused rather than scored.
How a network is scored and counted is `runs.evaluate_score`; the tables and JSON are
`runs.evaluate_report`. With an output directory (a `RunDir` of kind 'evaluate') the report goes to
evaluation.json and evaluation.md; `json_path` writes the JSON anywhere.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import numpy as np

from dropnet_jax.compaction.export import read_json
from dropnet_jax.runs import evaluate_report, reporting, saved_params
from dropnet_jax.runs.evaluate_score import Scorer, evaluate_network
from dropnet_jax.settings import setting

KIND = 'evaluate'
EVALUATION_JSON, EVALUATION_MD = 'evaluation.json', 'evaluation.md'
FORMATS = ('auto', 'markdown', 'json')
EVERY = saved_params.EVERY  # RUN:* = every saved record of the run


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
  """Which saved networks to score again, and how to report them."""
  networks: tuple[str, ...] = setting((), 'Saved networks: RUN[:seed<S>/dense | :seed<S>/<metric>/cycle<C> | '
                                      ':seed<S>/<metric>] (a record; RUN alone: seed 0 dense), RUN:* (every saved '
                                      'record), or a compact export directory.', flag='networks')
  data_dir: str | None = setting(None, "Data directory (default: each run's config.json data_dir).",
                                 flag='data_dir', result=False)
  print_format: str = setting('auto', 'What is printed: auto (a table: rich on a terminal, markdown otherwise), '
                              'markdown or json.', flag='format', choices=FORMATS, result=False)
  json_path: str | None = setting(None, 'Also write the figures as JSON to this file (with --out they also go '
                                  'to <out>/evaluation.json).', flag='json', result=False)

  def validate(self) -> None:
    """Raises ValueError naming the setting; reads nothing but whether paths exist."""
    if not self.networks:
      raise ValueError('networks: give at least one saved network (--networks=RUN[:SELECTOR], RUN:* or an export '
                       'directory)')
    if self.print_format not in FORMATS:
      raise ValueError(f'format must be one of {FORMATS}, got {self.print_format!r}')
    if self.data_dir is not None and not os.path.isdir(self.data_dir):
      raise ValueError(f'data_dir {self.data_dir!r} is not a directory')
    if self.json_path is not None:
      if os.path.isdir(self.json_path):
        raise ValueError(f'json {self.json_path!r} is a directory; give a file path')
      parent = os.path.dirname(os.path.abspath(self.json_path))
      if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise ValueError(f'json {self.json_path!r}: {parent} is not a writable directory')
    for text in self.networks:
      split_network(text)


def split_network(text: str) -> tuple[str, str | None]:
  """(directory, record selector, '*' or None) of one --networks entry: `saved_params.split_record_path`,
  the one splitting of RUN[:SELECTOR] (shared with --init_from)."""
  return saved_params.split_record_path(text, 'networks', every=True)


def canonical_selector(record: dict[str, Any]) -> str:
  """The selector naming exactly this record's saved θ (cycle 0: the seed's shared dense network)."""
  if record['cycle'] == 0:
    return f'seed{record["seed"]}/dense'
  return f'seed{record["seed"]}/{record["metric"]}/cycle{record["cycle"]}'


@dataclasses.dataclass
class Network:
  """One saved network to score: where it is, its data, and the figures it should reproduce."""
  label: str
  source: str  # 'record' or 'export'
  path: str  # the run directory or the export directory
  selector: str | None  # the record's canonical selector (None for an export)
  data: dict[str, Any]  # dataset, data_dir, split_seed, train_subset, fingerprint (None: not stamped)
  eval_batch_size: int
  selection: dict[str, bool]  # the prunable weights when no weight mask was saved: prunable_names' options
  reference: dict[str, Any]  # the figures to reproduce: the record, or the export's own evaluation
  image_shape: tuple[int, ...] | None  # what the network was trained on (None: not recorded)


def _find(tree: Any, key: str) -> Any:
  """The first value under `key` in a nested dict, depth first (None if absent)."""
  if isinstance(tree, dict):
    if key in tree:
      return tree[key]
    for value in tree.values():
      found = _find(value, key)
      if found is not None:
        return found
  return None


def run_settings(path: str, where: str) -> tuple[dict[str, Any], int, dict[str, bool]]:
  """(data settings, eval batch size, prunable selection) of the run whose config.json is in `path`.

  Every run kind's config has a `data` (DataConfig); `train_subset` is top-level where a kind has it
  (tuner, schedules); the batch size is the run's TrainConfig's; the selection a magnitude run's."""
  saved = read_json(os.path.join(path, 'config.json'), f'{where} is not a run directory')
  config = saved.get('config')
  data = config.get('data') if isinstance(config, dict) else None
  if not isinstance(data, dict) or 'dataset' not in data:
    raise ValueError(f'{where}: {path}/config.json has no data settings')
  settings = {'dataset': data['dataset'], 'data_dir': data.get('data_dir'),
              'split_seed': int(data.get('split_seed', 0)), 'train_subset': config.get('train_subset'),
              'fingerprint': (saved.get('stamp') or {}).get('data_fingerprint')}
  magnitude = config.get('magnitude') if isinstance(config.get('magnitude'), dict) else {}
  selection = {'biases': bool(magnitude.get('biases', False)),
               'output_layer': bool(magnitude.get('output_layer', True))}
  return settings, int(_find(config, 'eval_batch_size') or 1000), selection


def _records(path: str, selector: str | None, text: str) -> list[Network]:
  """The records `selector` names in the run at `path`, each read once (see the module docstring)."""
  data, batch, selection = run_settings(path, f'networks: {text!r}')
  selectors = saved_params.saved_selectors(path) if selector == EVERY else [selector]
  if not selectors:
    raise ValueError(f'networks: {text!r}: {path} has no saved params (the run was made with --save_params=none)')
  image_shape = read_json(os.path.join(path, 'params', 'spec.json'), 'saved params spec').get('image_shape')
  out = []
  for one in selectors:
    try:
      _, _, _, record = saved_params.load_saved(path, one)
    except (FileNotFoundError, KeyError) as e:
      reason = e.args[0] if e.args else str(e)
      raise ValueError(f'networks: {text!r}: {reason} (was the run made with --save_params=all?)') from None
    except ValueError as e:  # SavedParamsError: damaged files, named
      raise ValueError(f'networks: {text!r}: {e}') from None
    canonical = canonical_selector(record)
    out.append(Network(f'{path}:{canonical}', 'record', path, canonical, data, batch, selection, record,
                       _shape(image_shape)))
  return out


def _export(path: str, text: str, data_dir: str | None) -> Network:
  from dropnet_jax.compaction import compact
  spec = read_json(os.path.join(path, compact.SPEC_FILE), 'not a compact export')
  if spec.get('format') != compact.FORMAT:
    raise ValueError(f'networks: {text!r}: {path}/spec.json is not a compact export (format {spec.get("format")!r})')
  meta = spec.get('meta', {})
  evaluation = read_json(os.path.join(path, 'evaluation.json'), 'an export without its check (evaluation.json)')
  source = meta.get('run')
  if source and os.path.isfile(os.path.join(source, 'config.json')):
    data, batch, selection = run_settings(source, f'networks: {text!r} (its source run)')
  else:  # the source run moved away: the export's meta names the data
    if data_dir is None and meta.get('dataset') != 'digits':
      raise ValueError(f'networks: {text!r}: its source run {source} is gone; pass --data_dir')
    data = {'dataset': meta['dataset'], 'data_dir': None, 'split_seed': int(meta.get('split_seed', 0)),
            'train_subset': None, 'fingerprint': None}
    batch, selection = 1000, {'biases': False, 'output_layer': True}
  reference = {'params': meta.get('params'), 'macs': meta.get('macs'),
               **{f'{s}_accuracy': evaluation[f'export_{s}_accuracy'] for s in ('val', 'test')
                  if f'export_{s}_accuracy' in evaluation}}
  return Network(path, 'export', path, None, data, batch, selection, reference, _shape(spec.get('image_shape')))


def _shape(value: Sequence[int] | None) -> tuple[int, ...] | None:
  return None if value is None else tuple(int(v) for v in value)


def resolve(config: EvaluateConfig) -> list[Network]:
  """The networks of every --networks entry, each read once to check it (nothing is written)."""
  from dropnet_jax.compaction import compact
  out: list[Network] = []
  for text in config.networks:
    path, selector = split_network(text)
    if not os.path.isdir(path):
      raise ValueError(f'networks: {text!r}: {path} is not a directory')
    if os.path.isfile(os.path.join(path, compact.SPEC_FILE)) and not os.path.isdir(os.path.join(path, 'params')):
      if selector is not None:
        raise ValueError(f'networks: {text!r}: {path} is a compact export (one network); give its directory alone')
      out.append(_export(path, text, config.data_dir))
    elif os.path.isfile(os.path.join(path, 'params', 'spec.json')):
      out += _records(path, selector, text)
    else:
      raise ValueError(f'networks: {text!r}: {path} is neither a run with saved params (params/spec.json; was it '
                       'made with --save_params=none?) nor a compact export (spec.json)')
  unique: dict[str, Network] = {}
  for network in out:  # a network named twice (RUN:* beside one of its records) is scored once
    unique.setdefault(network.label, network)
  return list(unique.values())


def data_key(network: Network, override: str | None) -> tuple:
  d = network.data
  return (d['dataset'], override if override is not None else d['data_dir'], d['split_seed'], d['train_subset'])


def load_data(network: Network, override: str | None):
  """The dataset `network`'s run used (train subset taken); ValueError if it cannot be read from here or
  is not the data the run stamped."""
  from dropnet_jax.compaction.export import resolve_data_dir
  from dropnet_jax.input_pipeline import dataset_fingerprint, load_dataset
  from dropnet_jax.runs.schedules import subset_train
  d = network.data
  data_dir = resolve_data_dir(d, override)
  dataset = subset_train(load_dataset(d['dataset'], data_dir, split_seed=d['split_seed']), d['train_subset'])
  if d['fingerprint'] is not None and dataset_fingerprint(dataset) != d['fingerprint']:
    raise ValueError(f'data_dir: the {d["dataset"]} data read from {data_dir} are not the data {network.path} was '
                     'made with (their fingerprint differs from the one in its config.json)')
  return dataset


@dataclasses.dataclass
class Request:
  """A checked evaluation: the settings, the networks, their data (loaded), the output directory."""
  config: EvaluateConfig
  networks: list[Network]
  datasets: dict[tuple, Any]
  run_dir: Any = None  # RunDir, or None without --out


def prepare(config: EvaluateConfig, out: str | None = None) -> Request:
  """Every check before any work (settings, --out, each network read once, the data); ValueError with
  one line naming the setting; nothing is written."""
  from dropnet_jax.runs.run_dir import RunDir
  config.validate()
  run_dir = None
  if out is not None:
    run_dir = RunDir(out, KIND, config, inputs=[split_network(t)[0] for t in config.networks])
    run_dir.check()
  networks = resolve(config)
  datasets: dict[tuple, Any] = {}
  for network in networks:
    key = data_key(network, config.data_dir)
    if key not in datasets:
      datasets[key] = load_data(network, config.data_dir)
    shape = network.image_shape
    if shape is not None and tuple(datasets[key].image_shape) != shape:
      raise ValueError(f'networks: {network.label} was trained on {shape} images but the {key[0]} data have '
                       f'{datasets[key].image_shape}')
  return Request(config, networks, datasets, run_dir)


def run(request: Request, log=lambda line: None) -> list[dict[str, Any]]:
  """Scores every network (`log` gets a line per network); writes the report where asked."""
  scorer, rows = Scorer(), []
  for network in request.networks:
    rows.append(evaluate_network(network, request.datasets[data_key(network, request.config.data_dir)], scorer))
    log(f'{network.label}: test accuracy {rows[-1]["test_accuracy"]:.4f}'
        + ('' if rows[-1]['reproduced'] else ' (does NOT reproduce its reference)'))
  text = evaluate_report.to_json(rows)
  if request.run_dir is not None:
    with request.run_dir.open():
      request.run_dir.write_text(EVALUATION_JSON, text)
      request.run_dir.write_text(EVALUATION_MD, evaluate_report.markdown(rows) + '\n')
  if request.config.json_path is not None:
    reporting.atomic_write_text(request.config.json_path, text)
  return rows
