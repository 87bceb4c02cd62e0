"""experiments.compact and compact_bench end to end: a DropNet run's record exported, read back, and scored as the
record was; refusals before any work; a failed check leaves no export behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dropnet_jax.compaction import accounting, bench, compact
from dropnet_jax.compaction import export as cli
from dropnet_jax.compaction.export import CompactConfig
from dropnet_jax.input_pipeline import load_dataset
from dropnet_jax.runs import reporting, saved_params

REPO = Path(__file__).resolve().parents[1]
EXPORT = [sys.executable, '-m', 'experiments.compact']
BENCH = [sys.executable, '-m', 'experiments.compact_bench']


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
  """A tiny DropNet run on the bundled digits with every cycle's θ saved (two metrics, a few cycles)."""
  out = tmp_path_factory.mktemp('run') / 'run'
  proc = subprocess.run([sys.executable, '-m', 'experiments.dropnet', '--widths=8,8', '--metrics=min,max',
                         '--max_epochs=2', '--floor=0.5', '--save_params=all', '--noverbose',
                         f'--out={out}'], cwd=REPO, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return out


@pytest.fixture(scope='module')
def records(run_dir):
  return reporting.read_jsonl(run_dir / 'results.jsonl')


@pytest.fixture(scope='module')
def digits():
  return load_dataset('digits')


def correct(model, theta, images, labels, masks=None):
  """(correct predictions, predictions) of logits computed here, in one batch."""
  pred = np.asarray(compact.predict(model, theta, images, masks)).argmax(-1)
  return int((pred == labels).sum()), pred


def same_accuracy(count, n, recorded):
  """A count of correct predictions is the one behind a recorded float32 accuracy (float32 error << 1/(2n))."""
  return abs(count / n - recorded) < 0.5 / n


def export(args, cwd=REPO, env=None):
  return subprocess.run(EXPORT + args, cwd=cwd, capture_output=True, text=True, env=env)


@pytest.fixture(scope='module')
def exported(run_dir, tmp_path_factory):
  """seed 0 / min / cycle 2 exported with its torch twin: (the export directory, the command's output)."""
  out = tmp_path_factory.mktemp('export') / 'export'
  proc = export([f'--run={run_dir}', '--seed=0', '--metric=min', '--cycle=2', '--torch', f'--out={out}'])
  assert proc.returncode == 0, proc.stderr[-3000:]
  return out, proc


def test_exported_cycle_reads_back_with_the_records_accuracy_and_a_matching_torch_twin(run_dir, records, digits,
                                                                                      exported):
  record = next(r for r in records if r['metric'] == 'min' and r['cycle'] == 2)
  out, proc = exported
  assert json.loads((out / 'config.json').read_text())['kind'] == 'compact'
  assert not [p for p in os.listdir(out) if p.startswith(cli.TMP_PREFIX)] and not (out / cli.MISMATCH).exists()

  # Read back from the files alone (this process never saw the export's arrays).
  model, theta, spec = compact.load(str(out))
  assert list(model.widths) == record['units']  # a chain keeps every kept unit
  test_correct, test_pred = correct(model, theta, digits.test_images, digits.test_labels)
  val_correct, _ = correct(model, theta, digits.val_images, digits.val_labels)
  assert same_accuracy(test_correct, len(digits.test_labels), record['test_accuracy'])
  assert same_accuracy(val_correct, len(digits.val_labels), record['val_accuracy'])
  # Prediction by prediction, the export is the record's masked network.
  dense_model, dense_theta, masks, _ = saved_params.load_network(str(run_dir), 0, 'min', 2)
  _, masked_pred = correct(dense_model, dense_theta, digits.test_images, digits.test_labels, masks)
  np.testing.assert_array_equal(test_pred, masked_pred)

  image_shape = spec['image_shape']
  meta = spec['meta']
  assert (meta['seed'], meta['metric'], meta['cycle']) == (0, 'min', 2)
  assert meta['fraction_remaining'] == record['fraction_remaining']
  assert (meta['val_accuracy'], meta['test_accuracy']) == (record['val_accuracy'], record['test_accuracy'])
  assert meta['params'] == accounting.count(model, image_shape).params == record['params']
  assert meta['macs'] == accounting.count(model, image_shape).macs == record['macs']
  assert meta['dense_params'] == accounting.count(dense_model, image_shape).params > meta['params']
  evaluation = json.loads((out / 'evaluation.json').read_text())
  assert evaluation['passes']
  assert evaluation['export_test_correct'] == evaluation['record_test_correct'] == test_correct
  assert f'{record["test_accuracy"]:.6f} ({test_correct}/{len(digits.test_labels)})' in proc.stdout
  assert f'{record["params"]:,}' in proc.stdout

  import torch
  from tests.torch_reference import compact as torch_compact
  from tests.torch_reference import models as tmodels
  twin = torch_compact.load_torch(str(out))
  with torch.no_grad():
    twin_logits, _ = twin(torch.from_numpy(digits.test_images), tmodels.full_masks(twin), with_stats=False)
  jax_logits = np.asarray(compact.predict(model, theta, digits.test_images))
  np.testing.assert_allclose(twin_logits.numpy(), jax_logits, atol=1e-4, rtol=1e-5)
  assert evaluation['torch_test_correct'] == test_correct


def test_best_under_params_picks_by_validation_not_test(run_dir, records, tmp_path):
  spec = json.loads((run_dir / 'params' / 'spec.json').read_text())
  budget = sorted(r['params'] for r in records)[len(records) // 2]
  fits = [r for r in records if r['params'] <= budget]
  out = tmp_path / 'export'
  proc = export([f'--run={run_dir}', f'--best_under_params={budget}', f'--out={out}'])
  assert proc.returncode == 0, proc.stderr[-3000:]
  meta = compact.load(str(out))[2]['meta']
  chosen = next(r for r in records if (r['metric'], r['cycle']) == (meta['metric'], meta['cycle']))
  assert chosen['params'] <= budget
  assert chosen['val_accuracy'] == max(r['val_accuracy'] for r in fits)
  assert meta['test_accuracy'] == chosen['test_accuracy']
  # Synthetic candidates: the best test accuracy and the over-budget best val must both lose.
  base = {'seed': 0, 'metric': 'min', 'diverged': False, 'mask': ['1'], 'units': [1], 'fraction_remaining': 1.0}
  fake = [{**base, 'cycle': 0, 'params': 900, 'macs': 9, 'val_accuracy': 0.99, 'test_accuracy': 0.5},
          {**base, 'cycle': 1, 'params': 500, 'macs': 5, 'val_accuracy': 0.80, 'test_accuracy': 0.99},
          {**base, 'cycle': 2, 'params': 400, 'macs': 4, 'val_accuracy': 0.90, 'test_accuracy': 0.60},
          {**base, 'cycle': 3, 'params': 300, 'macs': 3, 'val_accuracy': float('nan'), 'test_accuracy': 0.1,
           'diverged': True}]
  assert cli.best_under(fake, spec, params=600)['cycle'] == 2
  assert cli.best_under(fake, spec, macs=4.5)['cycle'] == 2
  assert cli.best_under(fake, spec, params=399) is None  # only the diverged record fits


def _copy_run(run_dir, tmp_path):
  dst = tmp_path / 'copy'
  shutil.copytree(run_dir, dst, ignore=shutil.ignore_patterns('checkpoints', '*.png'))
  return dst


@pytest.mark.parametrize('case, message', [
    ('missing_run', 'does not exist'),
    ('no_record', 'no record for seed 0 metric min cycle 99'),
    ('no_metric', 'no record for seed 0 metric median'),
    ('no_seed', 'no record for seed 3'),
    ('cycle_not_saved', '--save_params=all'),
    ('no_params_at_all', '--save_params=all'),
    ('nothing_under_budget', 'nothing under the budget'),
    ('two_selectors', 'exactly one of'),
    ('cycle_without_metric', '--cycle needs --metric'),
    ('torch_for_resnet18', 'no PyTorch twin'),
])
def test_bad_requests_are_refused_with_the_reason(run_dir, tmp_path, case, message):
  run, seed, metric, cycle, params, macs, torch = str(run_dir), 0, 'min', 2, None, None, False
  if case == 'missing_run':
    run = str(tmp_path / 'nowhere')
  elif case == 'no_record':
    cycle = 99
  elif case == 'no_metric':
    metric = 'median'
  elif case == 'no_seed':
    seed = 3
  elif case == 'cycle_not_saved':
    run = str(_copy_run(run_dir, tmp_path))
    shutil.rmtree(Path(run) / 'params' / 'seed0' / 'min' / 'cycle2')
  elif case == 'no_params_at_all':
    run = str(_copy_run(run_dir, tmp_path))
    shutil.rmtree(Path(run) / 'params')
  elif case == 'nothing_under_budget':
    cycle, params = None, 1
  elif case == 'two_selectors':
    params = 1e9
  elif case == 'cycle_without_metric':
    metric = None
  elif case == 'torch_for_resnet18':  # the reference has no twin of the no-BN ResNet18
    run, torch = str(_copy_run(run_dir, tmp_path)), True
    spec_path = Path(run) / 'params' / 'spec.json'
    spec_path.write_text(json.dumps({**json.loads(spec_path.read_text()), 'model': 'resnet18'}))
  with pytest.raises(ValueError, match=message):  # ExportError, or the config's validate()
    cli.select(CompactConfig(run=run, seed=seed, metric=metric, cycle=cycle, best_under_params=params,
                             best_under_macs=macs, torch=torch))


def test_cli_error_is_one_line_and_nonzero_before_writing(run_dir, tmp_path):
  run = _copy_run(run_dir, tmp_path)
  shutil.rmtree(run / 'params' / 'seed0' / 'max' / 'cycle1')
  out = tmp_path / 'export'
  proc = export([f'--run={run}', '--metric=max', '--cycle=1', f'--out={out}'])
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1].startswith('error: params not saved for seed 0 metric max cycle 1')
  assert '--save_params=all' in proc.stderr and 'Traceback' not in proc.stderr
  assert not out.exists()


def test_a_mismatch_is_reported_as_failure():
  result = {'val_accuracy': 0.5, 'test_accuracy': 0.75, 'seed': 0, 'metric': 'min', 'cycle': 1, 'fraction_remaining': 0.8, 'units': [1], 'out': 'x',
            'dense_widths': [2], 'compact_widths': [1], 'dense_params': 10, 'dense_macs': 8, 'params': 5, 'macs': 4,
            'val_examples': 4, 'test_examples': 8, 'export_val_accuracy': 0.5, 'export_test_accuracy': 0.75,
            'export_val_correct': 2, 'record_val_correct': cli.recorded_count(0.5, 4),
            'export_test_correct': 6, 'record_test_correct': cli.recorded_count(0.75, 8)}
  assert cli.report(result)[1]
  text, ok = cli.report({**result, 'export_test_correct': 5, 'test_predictions_differing_from_masked': 1})
  assert not ok and 'MISMATCH' in text
  torch_off = {**result, 'torch_test_accuracy': 0.75, 'torch_test_correct': 6, 'torch_max_abs_logit_diff': 0.5,
               'torch_logit_scale': 10.0}
  assert not cli.report(torch_off)[1]


def test_compact_bench_times_an_export(run_dir, tmp_path):
  """compact_bench --export: the record's dense, masked and exported networks, sized by accounting."""
  out = tmp_path / 'export'
  model, theta, masks, record = saved_params.load_network(str(run_dir), 0, 'max', 1)
  spec = json.loads((run_dir / 'params' / 'spec.json').read_text())
  small, small_theta = compact.compact(model, theta, masks)
  compact.save(str(out), small, small_theta, {'run': str(run_dir), 'seed': 0, 'metric': 'max', 'cycle': 1},
               spec['image_shape'])
  result = bench.run_export(str(out), [1, 5], repeats=1, seed=0)
  variants = result['variants']
  assert variants['compact']['params'] == record['params'] < variants['dense']['params']
  assert variants['masked']['macs'] == variants['dense']['macs'] > variants['compact']['macs'] == record['macs']
  assert result['units_kept'] == record['units'] and set(variants['compact']['latency_s']) == {'1', '5'}


def test_a_failed_check_leaves_no_export_behind(run_dir, tmp_path):
  """An export that does not reproduce its record is not left in --out (nor is an earlier one there)."""
  run = _copy_run(run_dir, tmp_path)
  out = tmp_path / 'export'
  config = CompactConfig(run=str(run), metric='max', cycle=1)
  result = cli.run(cli.prepare(config, str(out)))  # in process: a good export first
  assert result['passes'] and (out / 'spec.json').exists() and (out / 'evaluation.json').exists()

  records = reporting.read_jsonl(run / 'results.jsonl')
  for r in records:  # the record now claims one more correct test prediction than its network makes
    if (r['seed'], r['metric'], r['cycle']) == (0, 'max', 1):
      r['test_accuracy'] += 1 / len(load_dataset('digits').test_labels)
  reporting.write_jsonl(run / 'results.jsonl', records)
  proc = export([f'--run={run}', '--metric=max', '--cycle=1', f'--out={out}'])
  assert proc.returncode == 1 and 'MISMATCH' in proc.stdout, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines()[-1].startswith('error: the export does not reproduce the record')
  left = set(os.listdir(out))
  assert left == {'.lock', 'config.json', cli.MISMATCH}, left
  assert not json.loads((out / cli.MISMATCH).read_text())['passes']
  with pytest.raises(FileNotFoundError):
    compact.load(str(out))


def test_torch_missing_is_one_line_before_any_work(run_dir, tmp_path):
  blocker = tmp_path / 'no_torch' / 'torch'
  blocker.mkdir(parents=True)
  (blocker / '__init__.py').write_text('raise ImportError("torch blocked for this test")\n')
  env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(blocker.parent), str(REPO)])}
  out = tmp_path / 'export'
  proc = export([f'--run={run_dir}', '--metric=min', '--cycle=2', '--torch', f'--out={out}'], env=env)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == f'error: {cli.TORCH_MISSING}'
  assert 'Traceback' not in proc.stderr and not out.exists()


def _refused_out(case, run_dir, tmp_path, own_input):
  """An --out each entry point must refuse before any work: (path, what the error line says)."""
  if case == 'file':
    path = tmp_path / 'a_file'
    path.write_text('not a directory\n')
    return path, 'is a file'
  if case == 'read_only':
    if os.geteuid() == 0:
      pytest.skip('root may write into a read-only directory')
    path = tmp_path / 'read_only'
    path.mkdir()
    path.chmod(0o555)
    return path / 'out', 'not writable'
  if case == 'other_run':  # a DropNet run's directory (not this command's input)
    return _copy_run(run_dir, tmp_path), 'holds a dropnet run'
  return own_input, "is the directory of this run's input"


def _listing(path):
  return sorted(str(p.relative_to(path)) for p in path.rglob('*')) if path.is_dir() else path.exists()


@pytest.mark.parametrize('case', ['file', 'read_only', 'other_run', 'own_input'])
def test_compact_refuses_a_bad_out_before_any_work(run_dir, tmp_path, case):
  out, message = _refused_out(case, run_dir, tmp_path, run_dir)
  before = _listing(out)
  proc = export([f'--run={run_dir}', '--metric=min', '--cycle=2', f'--out={out}'])
  assert proc.returncode == 1, proc.stdout
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and message in last and 'Traceback' not in proc.stderr, proc.stderr[-2000:]
  assert _listing(out) == before


def test_compact_bench_cli_writes_bench_json_into_its_run_directory(exported, records, tmp_path):
  export_dir, _ = exported
  out = tmp_path / 'bench'
  proc = subprocess.run(BENCH + [f'--export={export_dir}', '--batch_sizes=1,3', '--repeats=1', f'--out={out}'],
                        cwd=REPO, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads((out / 'config.json').read_text())['kind'] == 'compact_bench'
  result = json.loads((out / 'bench.json').read_text())
  record = next(r for r in records if (r['seed'], r['metric'], r['cycle']) == (0, 'min', 2))
  assert result['variants']['compact']['macs'] == record['macs']
  assert set(result['variants']['dense']['latency_s']) == {'1', '3'}
  assert 'compact' in proc.stdout and str(out / 'bench.json') in proc.stdout


@pytest.mark.parametrize('case', ['file', 'read_only', 'other_run', 'own_input'])
def test_compact_bench_refuses_a_bad_out_before_any_work(run_dir, exported, tmp_path, case):
  export_dir, _ = exported
  out, message = _refused_out(case, run_dir, tmp_path, export_dir)
  before = _listing(out)
  proc = subprocess.run(BENCH + [f'--export={export_dir}', '--repeats=1', f'--out={out}'], cwd=REPO,
                        capture_output=True, text=True)
  assert proc.returncode == 1, proc.stdout
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and message in last and 'Traceback' not in proc.stderr, proc.stderr[-2000:]
  assert _listing(out) == before
