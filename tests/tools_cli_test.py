"""The developer tools that compare against PyTorch (experiments.benchmark, compare, magnitude_bench) and
experiments.smoke_train: bad settings, an unusable --out and a missing torch each stop with one line before
any work, and a tiny run of each torch tool writes its files into its run directory.

All through subprocesses: no test imports an `experiments` module.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dropnet_jax.runs import reporting

REPO = Path(__file__).resolve().parents[1]
TOOLS = ('benchmark', 'compare', 'magnitude_bench', 'smoke_train')
# Python with torch unimportable, as on a machine without it, then the tool as `python -m` would run it.
WITHOUT_TORCH = """
import runpy, sys
class NoTorch:
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] == 'torch':
      raise ModuleNotFoundError(f"No module named '{name}'", name=name)
sys.meta_path.insert(0, NoTorch())
runpy.run_module(sys.argv.pop(1), run_name='__main__', alter_sys=True)
"""


def next_error(tmp_path):
  """Per tool, settings whose error (the data's) comes right after the --out check: a test of that check
  then fails fast, whatever happens."""
  empty = tmp_path / 'no_idx_files'
  empty.mkdir(exist_ok=True)
  return {'benchmark': ['--models=fc', f'--data_dir={empty}'], 'compare': [f'--data_dir={empty}'],
          'magnitude_bench': ['--dataset=mnist', f'--data_dir={empty}'], 'smoke_train': [f'--data_dir={empty}']}


def start(tool, *args, without_torch=False):
  command = ([sys.executable, '-c', WITHOUT_TORCH, f'experiments.{tool}'] if without_torch
             else [sys.executable, '-m', f'experiments.{tool}'])
  return subprocess.Popen(command + list(args), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def finish(proc, timeout=300):
  out, err = proc.communicate(timeout=timeout)
  return proc.returncode, out, err


def assert_one_line_error(code, err, expected, name=''):
  assert code != 0, (name, err[-1500:])
  assert expected in err, (name, err[-1500:])
  assert 'Traceback' not in err, (name, err[-1500:])
  assert err.strip().splitlines()[-1].startswith('error: '), (name, err[-1500:])


@pytest.fixture(scope='module')
def dropnet_run(tmp_path_factory):
  """A real (tiny) DropNet run directory: another kind of run."""
  out = tmp_path_factory.mktemp('dropnet') / 'run'
  proc = subprocess.run([sys.executable, '-m', 'experiments.dropnet', '--widths=4,4', '--metrics=min',
                         '--max_epochs=1', f'--out={out}'], cwd=REPO, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return out


def test_bad_settings_stop_before_any_work(tmp_path):
  cases = {
      'bench_epochs_zero': ('benchmark', ['--epochs=0'], 'epochs'),  # used to report an epoch time of Infinity
      'bench_data_dir_typo': ('benchmark', [f'--data_dir={tmp_path / "mnist_subsett"}'], 'mnist_subsett'),
      'bench_trials_dup': ('benchmark', ['--trials=1,1'], 'trials'),
      'bench_model': ('benchmark', ['--models=fc,resnet18'], 'resnet18'),
      'compare_optimizer': ('compare', ['--optimizer=adam'], 'optimizer'),
      'compare_model': ('compare', ['--model=vgg19'], 'vgg19'),
      'compare_metric': ('compare', ['--metrics=min,oracle'], 'oracle'),
      'compare_data_dir': ('compare', [f'--data_dir={tmp_path / "nowhere"}'], 'nowhere'),
      'mag_amount': ('magnitude_bench', ['--amount=1.5'], 'amount'),
      'mag_rounds': ('magnitude_bench', ['--rounds=0'], 'rounds'),
      'smoke_drop': ('smoke_train', ['--drop=1'], 'drop'),
      'smoke_dataset': ('smoke_train', ['--dataset=digits'], 'digits'),
  }
  procs = {name: start(tool, *args, f'--out={tmp_path / name}') for name, (tool, args, _) in cases.items()}
  for name, proc in procs.items():
    code, _, err = finish(proc)
    assert_one_line_error(code, err, cases[name][2], name)
    assert not (tmp_path / name).exists(), name  # nothing written


def test_an_unusable_out_is_refused_before_any_work(tmp_path, dropnet_run):
  a_file = tmp_path / 'a_file'
  a_file.write_text('kept')
  config_before = (dropnet_run / 'config.json').read_text()
  data_args = next_error(tmp_path)  # the next error, were --out not refused first
  procs = {}
  for tool in TOOLS:
    procs[tool, 'file'] = start(tool, *data_args[tool], f'--out={a_file}')
    procs[tool, 'dropnet run'] = start(tool, *data_args[tool], f'--out={dropnet_run}')
  for (tool, case), proc in procs.items():
    code, _, err = finish(proc)
    assert_one_line_error(code, err, 'is a file' if case == 'file' else 'holds a dropnet run', (tool, case))
  assert a_file.read_text() == 'kept'
  assert (dropnet_run / 'config.json').read_text() == config_before
  assert not any(p.name.startswith(('benchmark', 'report', 'bench', 'smoke')) for p in dropnet_run.iterdir())


@pytest.mark.skipif(os.geteuid() == 0, reason='root may write anywhere')
def test_a_read_only_out_is_refused_before_any_work(tmp_path):
  locked = tmp_path / 'locked'
  locked.mkdir()
  locked.chmod(0o500)
  try:
    data_args = next_error(tmp_path)
    procs = {tool: start(tool, *data_args[tool], f'--out={locked / "out"}') for tool in TOOLS}
    for tool, proc in procs.items():
      code, _, err = finish(proc)
      assert_one_line_error(code, err, 'not writable', tool)
  finally:
    locked.chmod(0o700)
  assert not (locked / 'out').exists()


def test_without_torch_the_torch_tools_stop_with_one_line(tmp_path):
  procs = {tool: start(tool, f'--out={tmp_path / tool}', without_torch=True)
           for tool in ('benchmark', 'compare', 'magnitude_bench')}
  # --notorch times JAX alone: it gets past the torch check to the next one (here the data's).
  procs['notorch'] = start('benchmark', '--notorch', *next_error(tmp_path)['benchmark'],
                           f'--out={tmp_path / "notorch"}', without_torch=True)
  for name, proc in procs.items():
    code, _, err = finish(proc)
    if name == 'notorch':
      assert_one_line_error(code, err, 'train-images', name)
      assert 'PyTorch' not in err
    else:
      assert_one_line_error(code, err, 'needs PyTorch', name)
      assert 'pip install torch' in err and 'tests/torch_reference' in err
    assert not (tmp_path / name).exists(), name


def test_compare_writes_matching_records_and_refuses_other_settings_in_its_directory(tmp_path):
  pytest.importorskip('torch')
  out = tmp_path / 'compare'
  args = ['--dataset=digits', '--widths=8,8', '--metrics=min,max_layer', '--max_epochs=2', '--floor=0.7',
          '--torch_threads=1']
  code, stdout, err = finish(start('compare', *args, f'--out={out}'), timeout=600)
  assert code == 0, err[-3000:]
  jax_records = reporting.read_jsonl(out / 'results_jax.jsonl')
  torch_records = reporting.read_jsonl(out / 'results_torch.jsonl')
  assert len(jax_records) == len(torch_records) >= 4
  for j, t in zip(jax_records, torch_records):  # the same experiment, to float32 rounding
    assert (j['seed'], j['metric'], j['cycle'], j['mask'], j['early_stop_epoch']) == \
        (t['seed'], t['metric'], t['cycle'], t['mask'], t['early_stop_epoch'])
    assert abs(j['test_accuracy'] - t['test_accuracy']) < 1e-3
  report = (out / 'report.md').read_text()
  assert f'Masks identical in {len(jax_records)} of {len(jax_records)}' in report
  assert (out / 'test_accuracy.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert json.loads((out / 'config.json').read_text())['kind'] == 'compare'
  assert 'same mask' in stdout
  # The directory now holds this comparison: other settings are refused before any work.
  code, _, err = finish(start('compare', *args[:-2], '--floor=0.5', f'--out={out}'))
  assert_one_line_error(code, err, 'floor', 'other settings')
  assert reporting.read_jsonl(out / 'results_jax.jsonl') == jax_records


def test_magnitude_bench_writes_bench_json_into_its_run_directory(tmp_path):
  pytest.importorskip('torch')
  out = tmp_path / 'mag'
  code, stdout, err = finish(start('magnitude_bench', '--widths=8,8', '--epochs=1', '--rounds=1',
                                   '--torch_threads=1', f'--out={out}'), timeout=600)
  assert code == 0, err[-3000:]
  result = json.loads((out / 'bench.json').read_text())
  assert result['model'] == 'fc' and result['widths'] == [8, 8] and result['timed_rounds'] == 1
  assert result['mask_agreement'] > 0.99 and result['fraction_remaining'] == pytest.approx(0.64, abs=0.01)
  assert json.loads((out / 'config.json').read_text())['kind'] == 'magnitude_bench'
  assert 'ratio torch / JAX' in stdout
  # The former form of --out, a JSON file path, gets a line that says what --out is now.
  code, _, err = finish(start('magnitude_bench', f'--out={tmp_path / "mag.json"}'))
  assert_one_line_error(code, err, 'run directory', 'json out')
  assert not (tmp_path / 'mag.json').exists()


def test_benchmark_reports_finite_times_into_its_run_directory(tmp_path):
  pytest.importorskip('torch')
  out = tmp_path / 'bench'
  code, stdout, err = finish(start('benchmark', '--models=fc', '--trials=1,2', '--epochs=1', '--fc_examples=256',
                                   f'--out={out}'), timeout=600)
  assert code == 0, err[-3000:]
  report = json.loads((out / 'benchmark.json').read_text())
  assert [(r['model'], r['trials']) for r in report['results']] == [('fc', 1), ('fc', 2)]
  for r in report['results']:
    assert 0 < r['epoch_s'] < float('inf') and r['model_epochs_per_s'] > 0
  assert report['results'][0]['speedup_vs_torch'] > 0
  assert 'random MNIST-shaped data' in report['data'][0]
  assert json.loads((out / 'config.json').read_text())['config']['trials'] == [1, 2]
  assert 'model-epochs/s' in stdout
