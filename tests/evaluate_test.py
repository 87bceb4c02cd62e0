"""experiments.evaluate against real runs: every saved record of a DropNet run (several cycles, two metrics)
and of a magnitude run (one-shot to 50/75/90 %) and a compact export are rebuilt from their files and
reproduce what their runs recorded; bad requests end in one line with nothing written.

The runs are tiny (digits, Model A 8-8 / 16-16, two epochs) and made in-process through the library
calls the entry points make; the module's fixtures are its slow part (tests/slow_tests.txt)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dropnet_jax.compaction import accounting, compact, export
from dropnet_jax.config import DropNetConfig, ExperimentConfig, ModelConfig, OutputConfig, TrainConfig
from dropnet_jax.loop.magnitude import MagnitudeConfig
from dropnet_jax.runs import evaluate, evaluate_report, experiment, magnitude, reporting, saved_params
from dropnet_jax.runs.evaluate_score import SPLITS

REPO = Path(__file__).resolve().parents[1]
TARGETS = (0.5, 0.75, 0.9)


@pytest.fixture(scope='module')
def dropnet_run(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('dropnet') / 'run')
  config = ExperimentConfig(model=ModelConfig(name='fc', widths=(8, 8)),
                            dropnet=DropNetConfig(metrics=('min', 'max'), floor=0.5, train=TrainConfig(max_epochs=2)),
                            output=OutputConfig(save_params='all', curves=False))
  records = experiment.run_config(config, out)
  assert max(r['cycle'] for r in records) >= 3
  return out, records


@pytest.fixture(scope='module')
def magnitude_run(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('magnitude') / 'run')
  config = magnitude.MagnitudeRunConfig(
      model=ModelConfig(name='fc', widths=(16, 16)),
      magnitude=MagnitudeConfig(methods=('oneshot',), sparsities=TARGETS, finetune_epochs=1,
                                train=TrainConfig(max_epochs=2)),
      output=OutputConfig(save_params='all', curves=False))
  records, _ = magnitude.run(magnitude.prepare(config, out))
  return out, records


@pytest.fixture(scope='module')
def exported(dropnet_run, tmp_path_factory):
  out = str(tmp_path_factory.mktemp('export') / 'min2')
  result = export.run(export.prepare(export.CompactConfig(run=dropnet_run[0], seed=0, metric='min', cycle=2), out))
  assert result['passes']
  return out


def evaluated(*networks, out=None, **changes):
  """The rows of an in-process evaluation (what the entry point prints)."""
  return evaluate.run(evaluate.prepare(evaluate.EvaluateConfig(networks=networks, **changes), out))


def test_every_saved_dropnet_record_reproduces_its_accuracies(dropnet_run):
  run, records = dropnet_run
  rows = evaluated(f'{run}:*')
  saved = {(r['seed'], r['metric'] if r['cycle'] else 'dense', r['cycle']) for r in records}
  assert len(rows) == len(saved) == len(saved_params.saved_selectors(run))
  by_key = {(r['seed'], r['metric'], r['cycle']): r for r in records}
  for row in rows:
    record = by_key[(row['seed'], row['metric'], row['cycle'])]
    assert row['reproduced'], row['differences']
    for split in SPLITS:
      assert row[f'{split}_accuracy'] == record[f'{split}_accuracy']  # the same float32, not just the count
    # Model A (8, 8) on digits: the compact network of the record's units, by hand.
    k1, k2 = record['units']
    kernels = 64 * k1 + k1 * k2 + k2 * 10
    assert row['effective_params'] == record['params'] == kernels + k1 + k2 + 10
    assert row['macs'] == record['macs'] == kernels
    assert row['params'] == 64 * 8 + 8 * 8 + 8 * 10 + 8 + 8 + 10
    assert row['sparsity'] == pytest.approx(1 - kernels / (64 * 8 + 8 * 8 + 8 * 10), abs=1e-12)


def test_magnitude_records_reproduce_and_their_zeros_are_the_targets(magnitude_run):
  run, records = magnitude_run
  finals = [f'{run}:seed0/oneshot s={t:g}' for t in TARGETS]  # each trial's newest saved cycle
  rows = evaluated(f'{run}:seed0/dense', *finals)
  prunable = 64 * 16 + 16 * 16 + 16 * 10
  assert rows[0]['zero_prunable'] == 0 and rows[0]['reproduced'], rows[0]['differences']
  for row, target in zip(rows[1:], TARGETS):
    record = next(r for r in records if r['metric'] == f'oneshot s={target:g}' and r['stop_reason'] == 'target')
    assert (row['metric'], row['cycle']) == (record['metric'], record['cycle'])
    assert row['reproduced'], row['differences']
    assert row['test_accuracy'] == record['test_accuracy']
    assert row['prunable_params'] == prunable and row['zero_prunable'] == round(target * prunable)
    assert row['pruned'] == row['zero_prunable']  # the saved weight mask's count (runs.sparse_params)
    assert row['sparsity'] == record['sparsity']
    assert row['macs'] == row['dense_macs'] == prunable  # unstructured zeros are still multiplied
    assert row['nonzero_params'] == row['params'] - row['zero_prunable']  # no other zero (biases trained)


def test_compact_export_matches_its_own_check_and_its_record(dropnet_run, exported):
  run, _ = dropnet_run
  export_row, record_row = evaluated(exported, f'{run}:seed0/min/cycle2')
  assert export_row['reproduced'] and record_row['reproduced'], (export_row['differences'], record_row['differences'])
  model, _, spec = compact.load(exported)
  counts = accounting.count(model, spec['image_shape'])
  assert export_row['params'] == export_row['effective_params'] == spec['meta']['params'] == counts.params
  assert export_row['macs'] == spec['meta']['macs'] == counts.macs == record_row['macs']
  assert export_row['effective_params'] == record_row['effective_params']
  for split in SPLITS:
    assert export_row[f'{split}_correct'] == record_row[f'{split}_correct']


def test_a_changed_record_is_reported_not_reproduced(dropnet_run, tmp_path):
  """The check can fail: a copy of the run whose record claims one more correct test prediction."""
  run = str(tmp_path / 'copy')
  shutil.copytree(dropnet_run[0], run)
  records = reporting.read_jsonl(os.path.join(run, 'results.jsonl'))
  target = next(r for r in records if r['metric'] == 'max' and r['cycle'] == 1)
  target['test_accuracy'] += 1 / 359
  reporting.write_jsonl(os.path.join(run, 'results.jsonl'), records)
  (row,) = evaluated(f'{run}:seed0/max/cycle1')
  assert not row['reproduced'] and row['differences'][0].startswith('test: ')
  assert 'does not reproduce' in evaluate_report.markdown([row])


def test_report_files_hold_every_column(dropnet_run, exported, tmp_path):
  out, json_path = str(tmp_path / 'eval'), str(tmp_path / 'e.json')
  rows = evaluated(f'{dropnet_run[0]}:seed0/min', exported, out=out, json_path=json_path)
  saved = json.loads(Path(out, evaluate.EVALUATION_JSON).read_text())
  assert saved == json.loads(Path(json_path).read_text())
  assert saved['networks'] == json.loads(json.dumps(rows))
  assert json.loads(Path(out, 'config.json').read_text())['kind'] == evaluate.KIND
  table = Path(out, evaluate.EVALUATION_MD).read_text().splitlines()
  assert table[0] == '| ' + ' | '.join(h for h, _ in evaluate_report.COLUMNS) + ' |' and len(table) == 4
  for key in ('train_accuracy', 'train_loss', 'val_accuracy', 'val_loss', 'test_accuracy', 'test_loss', 'params',
              'effective_params', 'nonzero_params', 'sparsity', 'global_sparsity', 'macs', 'reproduced',
              'reference_test_accuracy'):
    assert all(key in row for row in saved['networks']), key


def _damaged_copies(run, tmp_path):
  """Copies of the run: without params (--save_params=none), without one cycle (only some kept), with
  other data stamped."""
  copies = {}
  for name in ('none', 'some', 'data'):
    copies[name] = str(tmp_path / name)
    shutil.copytree(run, copies[name])
  shutil.rmtree(os.path.join(copies['none'], 'params'))
  shutil.rmtree(os.path.join(copies['some'], 'params', 'seed0', 'min', 'cycle2'))
  config_path = os.path.join(copies['data'], 'config.json')
  config = json.loads(Path(config_path).read_text())
  config['stamp']['data_fingerprint'] = '0' * 64
  Path(config_path).write_text(json.dumps(config))
  return copies


def test_bad_requests_are_one_line_naming_the_setting_and_write_nothing(dropnet_run, exported, tmp_path):
  run = dropnet_run[0]
  copies = _damaged_copies(run, tmp_path)
  cases = [
      ('/no/such/run', r'networks: .*/no/such/run.* is not a directory'),
      (f'{run}:seed0/min/cyc2', 'record selector'),
      (f'{run}:seed3/min/cycle1', r'nothing saved for seed3/min/cycle1.*--save_params=all'),
      (f'{copies["some"]}:seed0/min/cycle2', r'nothing saved for seed0/min/cycle2.*--save_params=all'),
      (copies['none'], r'neither a run with saved params.*--save_params=none'),
      (f'{exported}:seed0/dense', 'is a compact export'),
      (copies['data'], r'data_dir: .*not the data .* was made with'),
  ]
  for i, (network, message) in enumerate(cases):
    out = tmp_path / f'out{i}'
    with pytest.raises(ValueError, match=message) as e:
      evaluate.prepare(evaluate.EvaluateConfig(networks=(network,)), str(out))
    assert '\n' not in str(e.value) and not out.exists()


def test_command_line_table_and_exit_status(dropnet_run, tmp_path):
  """The entry point: a markdown table when not on a terminal; one error line, exit 1, nothing written."""
  run = dropnet_run[0]
  command = [sys.executable, '-m', 'experiments.evaluate']
  ok = subprocess.run([*command, f'--networks={run}:seed0/max/cycle2,{run}'], cwd=REPO, capture_output=True, text=True)
  assert ok.returncode == 0, ok.stderr[-2000:]
  lines = ok.stdout.splitlines()
  assert lines[0].startswith('| network | train acc % |') and len(lines) == 4
  assert lines[2].startswith(f'| {run}:seed0/max/cycle2 |') and '| yes |' in lines[2]
  out = tmp_path / 'out'
  bad = subprocess.run([*command, f'--networks={run}:seed0/min/cycle99', f'--out={out}'], cwd=REPO,
                       capture_output=True, text=True)
  assert bad.returncode == 1 and not out.exists()
  assert bad.stderr.strip().count('\n') == 0 and bad.stderr.startswith('error: networks:'), bad.stderr


def test_the_tuners_retrained_best_reproduces_on_its_training_subset(tmp_path):
  """The tuned best is saved as a run's record (tuning.best). Its data are the run's train_subset: the
  fingerprint the tuner stamped is of the subset, so scoring the full training split would be refused."""
  pytest.importorskip('optuna')
  from dropnet_jax.config import DataConfig
  from dropnet_jax.tuning import experiment as tune_experiment
  from dropnet_jax.tuning.config import TuneConfig
  out = str(tmp_path / 'tune')
  config = TuneConfig(model=ModelConfig(widths=(8, 8)), data=DataConfig(dataset='digits'),
                      dropnet=DropNetConfig(train=TrainConfig(max_epochs=1)), n_trials=2, train_subset=300,
                      retrain_seeds=1)
  tune_experiment.run(tune_experiment.prepare(config, out), log=lambda line: None)
  [record] = reporting.read_jsonl(os.path.join(out, 'results.jsonl'))
  (row,) = evaluated(f'{out}:*')
  assert row['reproduced'], row['differences']
  assert row['train_examples'] == 300 and row['test_accuracy'] == record['test_accuracy']
