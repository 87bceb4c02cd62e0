r"""Exports one record of a DropNet run as its compact network, and checks the export against the record.

  python -m experiments.compact --run=runs/compact_src --seed=0 --metric=min --cycle=8 --out=exports/min8
  python -m experiments.compact --run=runs/compact_src --best_under_params=8000 --out=exports/p8k --torch

A DropNet record is a masked network: full-size arrays and a 0/1 mask per
layer. Its trained θ is kept beside the run when the run was made with
`--save_params=all` (or, with `last`, only each trial's final cycle). This
entry point picks a record, either by (seed, metric, cycle) or as the record
with the best *validation* accuracy whose compact network fits a parameter or
MAC budget (the test split never selects anything), turns it into the smaller
dense network with the same logits (`dropnet_jax.compaction.compact.compact`) and
writes it with `compact.save`: `spec.json` (architecture, shapes, and the
record's seed/metric/cycle/fraction, accuracies, params and MACs under
`meta`) and an orbax checkpoint. `--torch` also writes the PyTorch twin
(`tests.torch_reference.compact.export`).

The export is then checked from the files alone: `compact.load` rebuilds the
model, and its accuracy on the run's validation and test splits (reloaded
with the run's config.json: dataset, data_dir, split_seed) must equal the
record's. They are compared as counts of correct predictions: the record
holds the trainer's float32 correct / n, which XLA may compute as
correct * (1/n), one float32 ulp away from the division done here, and
which identifies the count exactly (round(accuracy * n)). A mismatch exits
non-zero after printing both. The figures go to
`<out>/evaluation.json`.

Bad requests (missing run, no such record, params not saved, nothing under
the budget, no torch twin for the model, missing data) end with one
`error: ...` line and exit status 1 before anything is loaded or written.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, NamedTuple, Sequence

import numpy as np
from absl import app, flags, logging

from dropnet_jax.compaction import accounting

from dropnet_jax.compaction import compact

from dropnet_jax.runs import reporting

from dropnet_jax.runs import saved_params
from dropnet_jax.input_pipeline import DataError, load_dataset
from dropnet_jax.pruning.masks import masks_from_strings
from dropnet_jax.models import create_model

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Declared when run as a program only, so tests can import this beside other entry points."""
  flags.DEFINE_string('run', None, 'Output directory of a DropNet run (experiments.dropnet --out).')
  flags.DEFINE_integer('seed', 0, 'Seed of the record.')
  flags.DEFINE_string('metric', None, 'Metric of the record (required with --cycle; with a budget, limits the '
                      'candidates to this metric, else every metric of the seed competes).')
  flags.DEFINE_integer('cycle', None, 'Cycle of the record (0 is the dense network).')
  flags.DEFINE_float('best_under_params', None, 'Pick the record with the best validation accuracy whose compact '
                     'network has at most this many parameters.')
  flags.DEFINE_float('best_under_macs', None, 'Pick the record with the best validation accuracy whose compact '
                     'network needs at most this many multiply-accumulates per example.')
  flags.DEFINE_bool('torch', False, 'Also write the PyTorch twin (Models A/B/C only) and check its logits.')
  flags.DEFINE_string('data_dir', None, 'Data directory for the check (default: the run\'s config.json data_dir).')
  flags.DEFINE_string('out', None, 'Directory of the export (created; an older export there is replaced).')


TORCH_MODELS = ('fc', 'conv', 'modelc')  # tests.torch_reference.models
EVAL_BATCH = 1000
FRESH_OUT = 'and a new --out (resuming a finished run does not train, or save, its cycles again)'


class ExportError(ValueError):
  """A request that cannot be served; the message is the whole error line."""


class Selection(NamedTuple):
  record: dict[str, Any]
  config: dict[str, Any]  # the run's config.json
  spec: dict[str, Any]  # the run's params/spec.json (model, widths, num_classes, image_shape)
  candidates: list[dict[str, Any]]  # the records the choice was made among (for the table)


def _size(record: dict[str, Any], spec: dict[str, Any]) -> tuple[int, int]:
  """(params, MACs) of the record's compact network (records from before they carried them: counted)."""
  if 'params' in record and 'macs' in record:
    return int(record['params']), int(record['macs'])
  model = create_model(spec['model'], spec['widths'], spec['num_classes'])
  size = accounting.summary(model, spec['image_shape'], masks_from_strings(record['mask']))
  return size['params'], size['macs']


def _usable(record: dict[str, Any]) -> bool:
  return not record.get('diverged') and math.isfinite(record.get('val_accuracy', float('nan')))


def best_under(records: Sequence[dict[str, Any]], spec: dict[str, Any], *, params: float | None = None,
               macs: float | None = None) -> dict[str, Any] | None:
  """The record with the highest val_accuracy whose compact network fits; ties: fewer params, then earlier cycle.

  Only validation accuracy decides (test accuracy is what gets reported, so it may not pick).
  """
  fits = []
  for r in records:
    p, m = _size(r, spec)
    if _usable(r) and (params is None or p <= params) and (macs is None or m <= macs):
      fits.append((-r['val_accuracy'], p, r['cycle'], r['metric'], r))
  return min(fits, key=lambda t: t[:4])[-1] if fits else None


def _read_json(path: str, what: str) -> dict[str, Any]:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise ExportError(f'{path} not found: {what}') from None
  except json.JSONDecodeError as e:
    raise ExportError(f'{path} is not valid JSON ({e})') from None


def select(run: str | None, seed: int, metric: str | None, cycle: int | None, best_under_params: float | None,
           best_under_macs: float | None, torch: bool = False) -> Selection:
  """Validates the request against the run's files (nothing heavy is loaded) and picks the record."""
  budgets = [b for b in (best_under_params, best_under_macs) if b is not None]
  if (cycle is None) == (not budgets) or len(budgets) > 1:
    raise ExportError('give exactly one of --cycle, --best_under_params, --best_under_macs')
  if cycle is not None and metric is None:
    raise ExportError('--cycle needs --metric')
  if not run or not os.path.isdir(run):
    raise ExportError(f'run directory {run!r} does not exist')
  config = _read_json(os.path.join(run, 'config.json'), 'not a DropNet run directory')
  try:
    records = reporting.read_jsonl(os.path.join(run, 'results.jsonl'))
  except FileNotFoundError:
    raise ExportError(f'{run} has no results.jsonl: not a DropNet run, or it has not finished a cycle') from None
  params_spec = os.path.join(run, 'params', 'spec.json')
  if not os.path.exists(params_spec):
    raise ExportError(f'{run} has no saved params (params/spec.json); rerun the DropNet command with '
                      f'--save_params=all {FRESH_OUT}')
  spec = _read_json(params_spec, 'saved params spec')
  if torch and spec['model'] not in TORCH_MODELS:
    raise ExportError(f'--torch: no PyTorch twin for {spec["model"]!r} (only {", ".join(TORCH_MODELS)})')
  pool = [r for r in records if r['seed'] == seed and (metric is None or r['metric'] == metric)]
  if not pool:
    have = sorted({(r['seed'], r['metric']) for r in records})
    raise ExportError(f'{run}/results.jsonl has no record for seed {seed}'
                      + (f' metric {metric}' if metric else '') + f'; it has (seed, metric) {have}')
  if cycle is not None:
    chosen = [r for r in pool if r['cycle'] == cycle]
    if not chosen:
      raise ExportError(f'{run}/results.jsonl has no record for seed {seed} metric {metric} cycle {cycle}; '
                        f'its cycles are {sorted(r["cycle"] for r in pool)}')
    record = chosen[0]
  else:
    record = best_under(pool, spec, params=best_under_params, macs=best_under_macs)
    if record is None:
      kind, budget = ('params', best_under_params) if best_under_params is not None else ('macs', best_under_macs)
      smallest = min(_size(r, spec)[kind == 'macs'] for r in pool)
      raise ExportError(f'nothing under the budget: no usable record of seed {seed}'
                        + (f' metric {metric}' if metric else '')
                        + f' has at most {budget:g} {kind} (the smallest has {smallest:,})')
  # Only a directory check here (the θ is loaded later); _path is saved_params' layout of the store.
  if not os.path.isdir(saved_params._path(os.path.join(run, 'params'), seed, record['metric'], record['cycle'])):
    raise ExportError(f'params not saved for seed {seed} metric {record["metric"]} cycle {record["cycle"]} '
                      f'(the run kept only some cycles); rerun the DropNet command with --save_params=all {FRESH_OUT}')
  return Selection(record, config, spec, pool)


def resolve_data_dir(config: dict[str, Any], override: str | None) -> str | None:
  """The data directory of the check: --data_dir, else the run's (checked to exist from here)."""
  data_dir = override if override is not None else config.get('data_dir')
  if config.get('dataset') != 'digits' and data_dir is not None and not os.path.isdir(data_dir):
    raise ExportError(f'data_dir {data_dir!r} (from ' + ('--data_dir' if override else "the run's config.json")
                      + ') is not a directory from here; pass --data_dir')
  return data_dir


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


def export(selection: Selection, run: str, out: str, data_dir: str | None, with_torch: bool) -> dict[str, Any]:
  """Compacts the selected record, writes it to `out`, reads it back and evaluates it; returns the figures."""
  r, config, spec = selection.record, selection.config, selection.spec
  image_shape = tuple(int(v) for v in spec['image_shape'])
  dataset = load_dataset(config['dataset'], data_dir, split_seed=int(config.get('split_seed', 0)))
  if dataset.image_shape != image_shape:
    raise ExportError(f'{config["dataset"]} images are {dataset.image_shape} but the run trained on {image_shape}')
  model, theta, masks, _ = saved_params.load_network(run, r['seed'], r['metric'], r['cycle'])
  small, small_theta = compact.compact(model, theta, masks, image_shape=image_shape)
  dense_counts, small_counts = accounting.count(model, image_shape), accounting.count(small, image_shape)
  meta = {'run': os.path.abspath(run), 'seed': r['seed'], 'metric': r['metric'], 'cycle': r['cycle'],
          'fraction_remaining': r['fraction_remaining'], 'units': r['units'],
          'val_accuracy': r['val_accuracy'], 'test_accuracy': r['test_accuracy'],
          'params': small_counts.params, 'macs': small_counts.macs,
          'dense_model': spec['model'], 'dense_widths': list(spec['widths']),
          'dense_params': dense_counts.params, 'dense_macs': dense_counts.macs,
          'dataset': config['dataset'], 'split_seed': int(config.get('split_seed', 0))}
  if with_torch:
    from tests.torch_reference import compact as torch_compact
    torch_compact.export(out, small, small_theta, image_shape, meta)
  else:
    compact.save(out, small, small_theta, meta, image_shape)

  # Everything below reads the export back from disk: the figures are those of the files.
  loaded, loaded_theta, _ = compact.load(out)
  test_logits = predictions(loaded, loaded_theta, dataset.test_images)
  result = {**meta, 'out': os.path.abspath(out), 'compact_widths': list(loaded.widths)}
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
    from tests.torch_reference import compact as torch_compact
    twin_logits = torch_logits(torch_compact.load_torch(out), dataset.test_images)
    result['torch_test_correct'] = correct_count(twin_logits, dataset.test_labels)
    result['torch_test_accuracy'] = result['torch_test_correct'] / len(dataset.test_labels)
    result['torch_max_abs_logit_diff'] = float(np.abs(twin_logits.astype(np.float64) - test_logits).max())
    result['torch_logit_scale'] = float(np.abs(test_logits).max())
  with open(os.path.join(out, 'evaluation.json'), 'w') as f:
    json.dump(result, f, indent=1)
  return result


def candidates_table(selection: Selection) -> str:
  """The candidate records with their compact size and accuracies; '*' marks the exported one."""
  rows = [f'  {"metric":<12} {"cycle":>5} {"fraction":>8} {"units":<14} {"params":>10} {"MACs":>10} '
          f'{"val acc":>8} {"test acc":>8}']
  for r in sorted(selection.candidates, key=lambda r: (r['metric'], r['cycle'])):
    p, m = _size(r, selection.spec)
    mark = '*' if r is selection.record else ' '
    rows.append(f'{mark} {r["metric"]:<12} {r["cycle"]:>5} {r["fraction_remaining"]:>8.3f} '
                f'{str(r["units"]):<14} {p:>10,} {m:>10,} {r["val_accuracy"]:>8.4f} {r["test_accuracy"]:>8.4f}')
  return '\n'.join(rows)


def reproduces(result: dict[str, Any]) -> bool:
  """Whether the export gets exactly as many val and test examples right as the record."""
  return all(result[f'export_{s}_correct'] == result[f'record_{s}_correct'] for s in ('val', 'test'))


def report(result: dict[str, Any], record: dict[str, Any]) -> tuple[str, bool]:
  """The printed summary, and whether the export reproduces the record (and the twin its logits)."""
  ok = reproduces(result)
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
    lines.append(f'{split} accuracy: record {record[f"{split}_accuracy"]:.6f} ({result[f"record_{split}_correct"]}'
                 f'/{n}), export read back {result[f"export_{split}_accuracy"]:.6f} '
                 f'({result[f"export_{split}_correct"]}/{n})')
  if not ok:
    lines.append(f'MISMATCH: the export does not reproduce the record ('
                 f'{result.get("test_predictions_differing_from_masked")} test predictions differ from the '
                 'masked network\'s)')
  if 'torch_test_accuracy' in result:
    tol = 1e-4 * max(1.0, result['torch_logit_scale'])
    torch_ok = result['torch_max_abs_logit_diff'] <= tol
    lines.append(f'torch twin: test accuracy {result["torch_test_accuracy"]:.6f} '
                 f'({result["torch_test_correct"]}/{result["test_examples"]}), max |logit diff| vs the JAX '
                 f'export on the test split {result["torch_max_abs_logit_diff"]:.2e} (tolerance {tol:.1e})'
                 + ('' if torch_ok else ' MISMATCH'))
    ok = ok and torch_ok
  return '\n'.join(lines), ok


def main(argv):
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments {argv[1:]}')
  logging.set_verbosity(logging.WARNING)  # orbax logs every save and restore at INFO
  try:
    if not FLAGS.out:
      raise ExportError('--out is required')
    selection = select(FLAGS.run, FLAGS.seed, FLAGS.metric, FLAGS.cycle, FLAGS.best_under_params,
                       FLAGS.best_under_macs, FLAGS.torch)
    data_dir = resolve_data_dir(selection.config, FLAGS.data_dir)
  except ExportError as e:
    sys.exit(f'error: {e}')
  print(f'{FLAGS.run}: candidates (seed {FLAGS.seed}' + (f', metric {FLAGS.metric}' if FLAGS.metric else '') + ')')
  print(candidates_table(selection))
  try:
    result = export(selection, FLAGS.run, FLAGS.out, data_dir, FLAGS.torch)
  except (ExportError, DataError) as e:
    sys.exit(f'error: {e}')
  text, ok = report(result, selection.record)
  print(text)
  if not ok:
    sys.exit('error: the export does not reproduce the record (see above)')


def run() -> None:
  """The `dropnet-compact` console command (pyproject.toml [project.scripts])."""
  define_flags()
  app.run(main)


if __name__ == '__main__':
  run()
