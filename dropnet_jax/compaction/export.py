"""One record of a DropNet run exported as its compact network, and checked against the record.

What `experiments.compact` runs (its docstring has the usage): `prepare(config, out)` checks the
request (settings, the output directory, the run's files, the data) before any work and loads the
data; `run(request)` compacts the record, writes the export, reads it back from the files and
scores it on the run's validation and test splits. The export is written into a temporary
directory inside `out` and moved into place only when it reproduces the record (and, with
`torch`, its PyTorch twin the export's logits): a failed check leaves no `spec.json` (what marks a
complete export) behind, only `mismatch.json` with the figures.

Accuracies are compared as counts of correct predictions: the record holds the trainer's float32
correct / n, which XLA may compute as correct * (1/n), one float32 ulp away from the division done
here, and which identifies the count exactly (round(accuracy * n)).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from typing import Any, NamedTuple, Sequence

import numpy as np

from dropnet_jax.compaction import accounting, compact
from dropnet_jax.input_pipeline import Dataset, load_dataset
from dropnet_jax.models.compact import model_from_spec
from dropnet_jax.pruning.masks import masks_from_strings
from dropnet_jax.runs import reporting, saved_params
from dropnet_jax.runs.run_dir import RunDir
from dropnet_jax.settings import setting

KIND = 'compact'
TORCH_MODELS = ('fc', 'conv', 'modelc', 'vgg16', 'vgg19')  # tests.torch_reference.models
TORCH_MISSING = '--torch needs PyTorch (pip install torch) and a source checkout (tests/torch_reference)'
EVAL_BATCH = 1000
FRESH_OUT = 'and a new --out (resuming a finished run does not train, or save, its cycles again)'
EVALUATION, MISMATCH = 'evaluation.json', 'mismatch.json'
# Everything an export consists of (tests.torch_reference.compact adds the twin's two files).
EXPORT_ENTRIES = (compact.SPEC_FILE, compact.STATE_DIR, 'torch_state_dict.pt', 'torch_check.json', EVALUATION,
                  MISMATCH)
TMP_PREFIX = '.export-'
# Runs whose records carry node masks (`mask`) and saved params: DropNet's and structured pruning at init's.
NODE_MASK_KINDS = ('dropnet', 'structured')


@dataclasses.dataclass(frozen=True)
class CompactConfig:
  """Which record of which DropNet run to export: (seed, metric, cycle), or the best under a budget."""
  run: str | None = setting(None, 'Output directory of a DropNet run (experiments.dropnet --out).', flag='run')
  seed: int = setting(0, 'Seed of the record.', flag='seed')
  metric: str | None = setting(None, 'Metric of the record (required with --cycle; with a budget, limits the '
                               'candidates to this metric, else every metric of the seed competes).', flag='metric')
  cycle: int | None = setting(None, 'Cycle of the record (0 is the dense network).', flag='cycle')
  best_under_params: float | None = setting(None, 'Pick the record with the best validation accuracy whose compact '
                                            'network has at most this many parameters.', flag='best_under_params')
  best_under_macs: float | None = setting(None, 'Pick the record with the best validation accuracy whose compact '
                                          'network needs at most this many multiply-accumulates per example.',
                                          flag='best_under_macs')
  torch: bool = setting(False, 'Also write the PyTorch twin (Models A/B/C, VGG16/19) and check its logits.', flag='torch')
  data_dir: str | None = setting(None, "Data directory for the check (default: the run's config.json data_dir).",
                                 flag='data_dir', result=False)

  def validate(self) -> None:
    """Raises ValueError naming the offending setting; reads nothing but the --data_dir's existence."""
    if not self.run:
      raise ValueError('run: give the DropNet run directory (--run)')
    budgets = [b for b in (self.best_under_params, self.best_under_macs) if b is not None]
    if (self.cycle is None) == (not budgets) or len(budgets) > 1:
      raise ValueError('give exactly one of --cycle, --best_under_params, --best_under_macs')
    if self.cycle is not None and self.metric is None:
      raise ValueError('--cycle needs --metric')
    if self.seed < 0 or (self.cycle is not None and self.cycle < 0):
      raise ValueError(f'seed and cycle must be >= 0, got seed {self.seed}, cycle {self.cycle}')
    for name in ('best_under_params', 'best_under_macs'):
      value = getattr(self, name)
      if value is not None and not (math.isfinite(value) and value > 0):
        raise ValueError(f'{name} must be a positive number, got {value}')
    if self.data_dir is not None and not os.path.isdir(self.data_dir):
      raise ValueError(f'data_dir {self.data_dir!r} is not a directory')


class ExportError(ValueError):
  """A request that cannot be served; the message is the whole error line."""


class Selection(NamedTuple):
  record: dict[str, Any]
  data: dict[str, Any]  # the run's data settings: dataset, data_dir, split_seed
  spec: dict[str, Any]  # the run's params/spec.json (model, widths, num_classes, image_shape)
  candidates: list[dict[str, Any]]  # the records the choice was made among (for the table)


@dataclasses.dataclass
class Request:
  """A checked export: the settings, the record, its data (loaded) and the output directory."""
  config: CompactConfig
  selection: Selection
  dataset: Dataset
  run_dir: RunDir
  network: tuple  # (model, θ, masks, record) of the selected record, read before anything is written


def size(record: dict[str, Any], spec: dict[str, Any]) -> tuple[int, int]:
  """(params, MACs) of the record's compact network (records from before they carried them: counted)."""
  if 'params' in record and 'macs' in record:
    return int(record['params']), int(record['macs'])
  model = model_from_spec(spec)
  counts = accounting.summary(model, spec['image_shape'], masks_from_strings(record['mask']))
  return counts['params'], counts['macs']


def _usable(record: dict[str, Any]) -> bool:
  return not record.get('diverged') and math.isfinite(record.get('val_accuracy', float('nan')))


def best_under(records: Sequence[dict[str, Any]], spec: dict[str, Any], *, params: float | None = None,
               macs: float | None = None) -> dict[str, Any] | None:
  """The record with the highest val_accuracy whose compact network fits; ties: fewer params, then earlier cycle.

  Only validation accuracy decides (test accuracy is what gets reported, so it may not pick).
  """
  fits = []
  for r in records:
    p, m = size(r, spec)
    if _usable(r) and (params is None or p <= params) and (macs is None or m <= macs):
      fits.append((-r['val_accuracy'], p, r['cycle'], r['metric'], r))
  return min(fits, key=lambda t: t[:4])[-1] if fits else None


def read_json(path: str, what: str) -> dict[str, Any]:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise ExportError(f'{path} not found: {what}') from None
  except json.JSONDecodeError as e:
    raise ExportError(f'{path} is not valid JSON ({e})') from None
  except OSError as e:
    raise ExportError(f'{path} cannot be read ({e})') from None


def run_data(run: str, run_config: dict[str, Any]) -> dict[str, Any]:
  """The data settings (dataset, data_dir, split_seed) of a DropNet run's config.json."""
  if run_config.get('kind', 'dropnet') not in NODE_MASK_KINDS:
    raise ExportError(f'{run} holds a {run_config["kind"]} run, not a DropNet (or structured pruning) run')
  data = run_config.get('config', {}).get('data') if isinstance(run_config.get('config'), dict) else None
  if data is None and 'dataset' in run_config:  # a config.json from before the settings tree
    data = run_config
  if not isinstance(data, dict) or 'dataset' not in data:
    raise ExportError(f'{run}/config.json has no data settings: not a DropNet run directory')
  return {'dataset': data['dataset'], 'data_dir': data.get('data_dir'), 'split_seed': int(data.get('split_seed', 0))}


def require_torch() -> None:
  """--torch: PyTorch and the twin (tests.torch_reference, in a source checkout) must import."""
  try:
    import torch  # noqa: F401
    from tests.torch_reference import compact as _  # noqa: F401
  except ImportError:
    raise ExportError(TORCH_MISSING) from None


def select(config: CompactConfig) -> Selection:
  """Validates the request against the run's files (nothing heavy is loaded) and picks the record."""
  config.validate()
  run, seed, metric = config.run, config.seed, config.metric
  if not os.path.isdir(run):
    raise ExportError(f'run directory {run!r} does not exist')
  data = run_data(run, read_json(os.path.join(run, 'config.json'), 'not a DropNet run directory'))
  try:
    records = reporting.read_jsonl(os.path.join(run, 'results.jsonl'))
  except FileNotFoundError:
    raise ExportError(f'{run} has no results.jsonl: not a DropNet run, or it has not finished a cycle') from None
  params_spec = os.path.join(run, 'params', 'spec.json')
  if not os.path.exists(params_spec):
    raise ExportError(f'{run} has no saved params (params/spec.json); rerun the DropNet command with '
                      f'--save_params=all {FRESH_OUT}')
  spec = read_json(params_spec, 'saved params spec')
  if config.torch and spec['model'] not in TORCH_MODELS:
    raise ExportError(f'--torch: no PyTorch twin for {spec["model"]!r} (only {", ".join(TORCH_MODELS)})')
  pool = [r for r in records if r['seed'] == seed and (metric is None or r['metric'] == metric)]
  if not pool:
    have = sorted({(r['seed'], r['metric']) for r in records})
    raise ExportError(f'{run}/results.jsonl has no record for seed {seed}'
                      + (f' metric {metric}' if metric else '') + f'; it has (seed, metric) {have}')
  if config.cycle is not None:
    chosen = [r for r in pool if r['cycle'] == config.cycle]
    if not chosen:
      raise ExportError(f'{run}/results.jsonl has no record for seed {seed} metric {metric} cycle {config.cycle}; '
                        f'its cycles are {sorted(r["cycle"] for r in pool)}')
    record = chosen[0]
  else:
    params, macs = config.best_under_params, config.best_under_macs
    record = best_under(pool, spec, params=params, macs=macs)
    if record is None:
      kind, budget = ('params', params) if params is not None else ('macs', macs)
      smallest = min(size(r, spec)[kind == 'macs'] for r in pool)
      raise ExportError(f'nothing under the budget: no usable record of seed {seed}'
                        + (f' metric {metric}' if metric else '')
                        + f' has at most {budget:g} {kind} (the smallest has {smallest:,})')
  # Only a directory check here (the θ is loaded later); _path is saved_params' layout of the store.
  if not os.path.isdir(saved_params._path(os.path.join(run, 'params'), seed, record['metric'], record['cycle'])):
    raise ExportError(f'params not saved for seed {seed} metric {record["metric"]} cycle {record["cycle"]} '
                      f'(the run kept only some cycles); rerun the DropNet command with --save_params=all {FRESH_OUT}')
  return Selection(record, data, spec, pool)


def resolve_data_dir(data: dict[str, Any], override: str | None) -> str | None:
  """The data directory of the check: --data_dir, else the run's (checked to exist from here)."""
  data_dir = override if override is not None else data.get('data_dir')
  if data['dataset'] != 'digits' and data_dir is not None and not os.path.isdir(data_dir):
    raise ExportError(f'data_dir {data_dir!r} (from ' + ('--data_dir' if override else "the run's config.json")
                      + ') is not a directory from here; pass --data_dir')
  return data_dir


def prepare(config: CompactConfig, out: str) -> Request:
  """Every check before any work (settings, --out, torch, the run's files, the data), then the data.
  Raises ValueError (ExportError, DataError, RunDir's refusals) with one line; writes nothing."""
  config.validate()
  run_dir = RunDir(out, KIND, config, inputs=[config.run])
  run_dir.check()
  if config.torch:
    require_torch()
  selection = select(config)
  data = selection.data
  dataset = load_dataset(data['dataset'], resolve_data_dir(data, config.data_dir), split_seed=data['split_seed'])
  image_shape = tuple(int(v) for v in selection.spec['image_shape'])
  if dataset.image_shape != image_shape:
    raise ExportError(f'{data["dataset"]} images are {dataset.image_shape} but the run trained on {image_shape}')
  r = selection.record
  network = saved_params.load_network(config.run, r['seed'], r['metric'], r['cycle'])  # readable? before writing
  return Request(config, selection, dataset, run_dir, network)


def predictions(model, theta, images: np.ndarray, masks=None) -> np.ndarray:
  """Eval-mode logits of `images` in batches of EVAL_BATCH (float32 numpy); all-ones masks by default."""
  return np.concatenate([np.asarray(compact.predict(model, theta, images[i:i + EVAL_BATCH], masks))
                         for i in range(0, len(images), EVAL_BATCH)])


def correct_count(logits: np.ndarray, labels: np.ndarray) -> int:
  """How many argmaxes (first maximum, as the trainer's jnp.argmax) equal the labels."""
  return int((logits.argmax(-1) == labels).sum())


def recorded_count(accuracy: float, n: int) -> int:
  """The count of correct predictions behind a recorded float32 accuracy over n examples."""
  return int(round(accuracy * n))


def torch_logits(twin, images: np.ndarray) -> np.ndarray:
  import torch  # only with --torch
  from tests.torch_reference import models as tmodels
  out = []
  with torch.no_grad():
    for i in range(0, len(images), EVAL_BATCH):
      logits, _ = twin(torch.from_numpy(np.array(images[i:i + EVAL_BATCH])), tmodels.full_masks(twin),
                       with_stats=False)
      out.append(logits.numpy())
  return np.concatenate(out)


def reproduces(result: dict[str, Any]) -> bool:
  """Whether the export gets exactly as many val and test examples right as the record."""
  return all(result[f'export_{s}_correct'] == result[f'record_{s}_correct'] for s in ('val', 'test'))


def torch_tolerance(result: dict[str, Any]) -> float:
  return 1e-4 * max(1.0, result['torch_logit_scale'])


def twin_matches(result: dict[str, Any]) -> bool:
  """Without a twin: True; with one: whether its test logits are the export's to `torch_tolerance`."""
  return 'torch_max_abs_logit_diff' not in result or result['torch_max_abs_logit_diff'] <= torch_tolerance(result)


def passes(result: dict[str, Any]) -> bool:
  return reproduces(result) and twin_matches(result)


def _write(request: Request, directory: str) -> dict[str, Any]:
  """Compacts the record into `directory`, reads it back from there and scores it; returns the figures."""
  r, spec, data, dataset = request.selection.record, request.selection.spec, request.selection.data, request.dataset
  run, with_torch = request.config.run, request.config.torch
  image_shape = tuple(int(v) for v in spec['image_shape'])
  model, theta, masks, _ = request.network
  small, small_theta = compact.compact(model, theta, masks, image_shape=image_shape)
  dense_counts, small_counts = accounting.count(model, image_shape), accounting.count(small, image_shape)
  meta = {'run': os.path.abspath(run), 'seed': r['seed'], 'metric': r['metric'], 'cycle': r['cycle'],
          'fraction_remaining': r['fraction_remaining'], 'units': r['units'],
          'val_accuracy': r['val_accuracy'], 'test_accuracy': r['test_accuracy'],
          'params': small_counts.params, 'macs': small_counts.macs,
          'dense_model': spec['model'], 'dense_widths': list(spec['widths']),
          'dense_params': dense_counts.params, 'dense_macs': dense_counts.macs,
          'dataset': data['dataset'], 'split_seed': data['split_seed']}
  if with_torch:
    from tests.torch_reference import compact as torch_compact
    torch_compact.export(directory, small, small_theta, image_shape, meta)
  else:
    compact.save(directory, small, small_theta, meta, image_shape)

  # Everything below reads the export back from disk: the figures are those of the files.
  loaded, loaded_theta, _ = compact.load(directory)
  test_logits = predictions(loaded, loaded_theta, dataset.test_images)
  result = {**meta, 'out': os.path.abspath(request.run_dir.path), 'compact_widths': list(loaded.widths)}
  split_logits = {'val': predictions(loaded, loaded_theta, dataset.val_images), 'test': test_logits}
  for split, logits in split_logits.items():
    labels = getattr(dataset, f'{split}_labels')
    result.update({f'{split}_examples': len(labels), f'export_{split}_correct': correct_count(logits, labels),
                   f'record_{split}_correct': recorded_count(r[f'{split}_accuracy'], len(labels))})
    result[f'export_{split}_accuracy'] = result[f'export_{split}_correct'] / len(labels)
  if not reproduces(result):
    masked = predictions(model, theta, dataset.test_images, masks)  # the record's network, for the diagnosis
    result['test_predictions_differing_from_masked'] = int((masked.argmax(-1) != test_logits.argmax(-1)).sum())
  if with_torch:
    twin_logits = torch_logits(torch_compact.load_torch(directory), dataset.test_images)
    result['torch_test_correct'] = correct_count(twin_logits, dataset.test_labels)
    result['torch_test_accuracy'] = result['torch_test_correct'] / len(dataset.test_labels)
    result['torch_max_abs_logit_diff'] = float(np.abs(twin_logits.astype(np.float64) - test_logits).max())
    result['torch_logit_scale'] = float(np.abs(test_logits).max())
  return result


def _remove(path: str) -> None:
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path)
  elif os.path.lexists(path):
    os.remove(path)


def _remove_export(out: str) -> None:
  """Removes an earlier export from `out`, spec.json (what marks it complete) first."""
  for name in EXPORT_ENTRIES:
    _remove(os.path.join(out, name))


def _install(tmp: str, out: str) -> None:
  """Moves the checked export from `tmp` into `out`, replacing an earlier one; spec.json goes last, so
  `out` never holds a spec.json whose arrays are not all there."""
  _remove_export(out)
  names = os.listdir(tmp)
  for name in names:
    if name != compact.SPEC_FILE:
      _remove(os.path.join(out, name))
      os.rename(os.path.join(tmp, name), os.path.join(out, name))
  os.rename(os.path.join(tmp, compact.SPEC_FILE), os.path.join(out, compact.SPEC_FILE))


def run(request: Request) -> dict[str, Any]:
  """Writes, reads back and checks the export in `request.run_dir` (holding it: lock, config.json).

  Returns the figures (also in <out>/evaluation.json). When `passes(result)` is False nothing of the
  export is left in the directory (an earlier export there is removed too); the figures go to
  <out>/mismatch.json instead.
  """
  run_dir = request.run_dir
  with run_dir.open():
    out = run_dir.path
    for name in os.listdir(out):  # left by a killed export (we hold the lock: no one else is writing)
      if name.startswith(TMP_PREFIX):
        shutil.rmtree(os.path.join(out, name), ignore_errors=True)
    tmp = tempfile.mkdtemp(prefix=TMP_PREFIX, dir=out)
    try:
      result = _write(request, tmp)
      result['passes'] = passes(result)
      if result['passes']:
        _install(tmp, out)
      else:
        _remove_export(out)
      run_dir.write_text(EVALUATION if result['passes'] else MISMATCH, json.dumps(result, indent=1))
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
  return result


def candidates_table(selection: Selection) -> str:
  """The candidate records with their compact size and accuracies; '*' marks the exported one."""
  rows = [f'  {"metric":<12} {"cycle":>5} {"fraction":>8} {"units":<14} {"params":>10} {"MACs":>10} '
          f'{"val acc":>8} {"test acc":>8}']
  for r in sorted(selection.candidates, key=lambda r: (r['metric'], r['cycle'])):
    p, m = size(r, selection.spec)
    mark = '*' if r is selection.record else ' '
    rows.append(f'{mark} {r["metric"]:<12} {r["cycle"]:>5} {r["fraction_remaining"]:>8.3f} '
                f'{str(r["units"]):<14} {p:>10,} {m:>10,} {r["val_accuracy"]:>8.4f} {r["test_accuracy"]:>8.4f}')
  return '\n'.join(rows)


def report(result: dict[str, Any]) -> tuple[str, bool]:
  """The printed summary, and whether the export reproduces the record (and the twin its logits)."""
  lines = [f'exported seed {result["seed"]} metric {result["metric"]} cycle {result["cycle"]} '
           f'(fraction {result["fraction_remaining"]:.3f}, units {result["units"]}) -> {result["out"]}',
           f'  {"":<8} {"widths":<14} {"params":>10} {"MACs":>10}',
           f'  {"dense":<8} {str(result["dense_widths"]):<14} {result["dense_params"]:>10,} '
           f'{result["dense_macs"]:>10,}',
           f'  {"compact":<8} {str(result["compact_widths"]):<14} {result["params"]:>10,} {result["macs"]:>10,}',
           f'  {"ratio":<8} {"":<14} {result["params"] / result["dense_params"]:>10.3f} '
           f'{result["macs"] / max(result["dense_macs"], 1):>10.3f}']
  for split in ('val', 'test'):
    n = result[f'{split}_examples']
    lines.append(f'{split} accuracy: record {result[f"{split}_accuracy"]:.6f} ({result[f"record_{split}_correct"]}'
                 f'/{n}), export read back {result[f"export_{split}_accuracy"]:.6f} '
                 f'({result[f"export_{split}_correct"]}/{n})')
  if not reproduces(result):
    lines.append(f'MISMATCH: the export does not reproduce the record ('
                 f'{result.get("test_predictions_differing_from_masked")} test predictions differ from the '
                 'masked network\'s)')
  if 'torch_test_accuracy' in result:
    lines.append(f'torch twin: test accuracy {result["torch_test_accuracy"]:.6f} '
                 f'({result["torch_test_correct"]}/{result["test_examples"]}), max |logit diff| vs the JAX '
                 f'export on the test split {result["torch_max_abs_logit_diff"]:.2e} '
                 f'(tolerance {torch_tolerance(result):.1e})' + ('' if twin_matches(result) else ' MISMATCH'))
  return '\n'.join(lines), passes(result)
