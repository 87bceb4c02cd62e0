"""The experiment entry point: an end-to-end run, and bad input rejected before any work."""

import gzip
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np

from dropnet_jax.runs import reporting

REPO = Path(__file__).resolve().parents[1]
BASE = [sys.executable, '-m', 'experiments.dropnet']
REQUIRED = ('seed', 'metric', 'cycle', 'fraction_remaining', 'units', 'train_accuracy', 'val_accuracy',
            'test_accuracy', 'train_loss', 'val_loss', 'test_loss', 'early_stop_epoch', 'seconds')


def write_idx(path, array, magic):
  header = struct.pack('>I', magic) + b''.join(struct.pack('>I', d) for d in array.shape)
  with gzip.open(path, 'wb') as f:
    f.write(header + array.astype(np.uint8).tobytes())


def idx_dir(root, n_train=60, n_train_labels=60, image_magic=0x803):
  root.mkdir()
  rng = np.random.default_rng(0)
  write_idx(root / 'train-images-idx3-ubyte.gz', rng.integers(0, 256, (n_train, 28, 28)), image_magic)
  write_idx(root / 'train-labels-idx1-ubyte.gz', np.arange(n_train_labels) % 10, 0x801)
  write_idx(root / 't10k-images-idx3-ubyte.gz', rng.integers(0, 256, (20, 28, 28)), 0x803)
  write_idx(root / 't10k-labels-idx1-ubyte.gz', np.arange(20) % 10, 0x801)
  return root


def test_end_to_end_on_the_offline_default(tmp_path):
  out = tmp_path / 'run'
  proc = subprocess.run(BASE + ['--widths=8,8', '--metrics=min,random_layer', '--max_epochs=3', '--floor=0.5',
                                f'--out={out}'], cwd=REPO, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = reporting.read_jsonl(out / 'results.jsonl')
  assert {r['metric'] for r in records} == {'min', 'random_layer'}
  for r in records:
    assert set(REQUIRED) <= set(r)
  for name in ('test_accuracy.png', 'accuracy_panels.png', 'early_stopping.png'):
    assert (out / name).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert json.loads((out / 'config.json').read_text())['config']['model']['widths'] == [8, 8]
  assert 'random_layer' in proc.stdout and 'cycle' in proc.stdout  # the summary table
  assert 'cycle' in proc.stdout and 'epoch' in proc.stdout  # a line per cycle while it runs (progress.py)


BAD = {
    'model': (['--model=resnet7'], '--model'),
    'metric': (['--metrics=min,median'], 'median'),
    'dataset': (['--dataset=imagenet22k'], '--dataset'),
    'fraction_zero': (['--fraction=0'], 'fraction'),
    'fraction_big': (['--fraction=1.5'], 'fraction'),
    'floor_one': (['--floor=1'], 'floor'),
    'floor_zero': (['--floor=0'], 'floor'),
    'kappa_zero': (['--kappa=0'], 'kappa'),
    'kappa_big': (['--kappa=1.2'], 'kappa'),
    'widths_text': (['--widths=40,x'], 'widths'),
    'widths_negative': (['--widths=40,-3'], 'widths'),
    'widths_zero': (['--widths=0'], 'widths'),
    'seeds': (['--seeds=0'], 'seeds'),
    'missing_dir': (['--dataset=mnist', '--data_dir=/nonexistent/mnist'], '/nonexistent/mnist'),
}


def test_bad_input_fails_fast_with_a_named_error(tmp_path):
  corrupt = idx_dir(tmp_path / 'corrupt', image_magic=0x999)
  mismatch = idx_dir(tmp_path / 'mismatch', n_train_labels=50)
  missing = idx_dir(tmp_path / 'missing')
  (missing / 't10k-labels-idx1-ubyte.gz').unlink()
  cases = dict(BAD)
  cases['corrupt_file'] = (['--dataset=mnist', f'--data_dir={corrupt}'], 'train-images-idx3-ubyte')
  cases['count_mismatch'] = (['--dataset=mnist', f'--data_dir={mismatch}'], '60')
  cases['missing_file'] = (['--dataset=mnist', f'--data_dir={missing}'], 't10k-labels')
  procs = {name: subprocess.Popen(BASE + args + [f'--out={tmp_path / name}'], cwd=REPO, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
           for name, (args, _) in cases.items()}
  for name, proc in procs.items():
    _, err = proc.communicate(timeout=300)
    expected = cases[name][1]
    assert proc.returncode != 0, name
    assert expected in err, (name, err[-1500:])
    assert 'Traceback' not in err, (name, err[-1500:])
    assert not (tmp_path / name).exists(), name  # nothing written


def test_bad_input_does_not_touch_an_existing_run(tmp_path):
  out = tmp_path / 'run'
  out.mkdir()
  (out / 'results.jsonl').write_text('{"seed": 0}\n')
  (out / 'config.json').write_text('{"model": "fc"}')
  proc = subprocess.run(BASE + ['--fraction=2', f'--out={out}'], cwd=REPO, capture_output=True, text=True)
  assert proc.returncode != 0 and 'fraction' in proc.stderr
  assert (out / 'results.jsonl').read_text() == '{"seed": 0}\n'
  assert (out / 'config.json').read_text() == '{"model": "fc"}'


def test_config_json_reruns_the_same_records_and_overrides_apply(tmp_path):
  """config.json is the serialised config: `--config=<run>/config.json` into a new --out gives the same
  records; a recipe (.py) and --config.<path> overrides land in config.json and its stamp."""
  first, again, recipe_run = tmp_path / 'first', tmp_path / 'again', tmp_path / 'recipe'
  args = ['--widths=6,6', '--metrics=min,random', '--max_epochs=2', '--floor=0.5', '--lr=0.05']
  proc = subprocess.run(BASE + args + [f'--out={first}'], cwd=REPO, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  proc = subprocess.run(BASE + [f'--config={first}/config.json', f'--out={again}'], cwd=REPO, capture_output=True,
                        text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  strip = lambda path: [{k: v for k, v in r.items() if k != 'seconds'} for r in reporting.read_jsonl(path)]
  assert strip(again / 'results.jsonl') == strip(first / 'results.jsonl')
  saved = json.loads((again / 'config.json').read_text())
  assert saved['config'] == json.loads((first / 'config.json').read_text())['config']
  assert saved['config']['dropnet']['train']['optim']['lr'] == 0.05 and saved['kind'] == 'dropnet'
  # A recipe file, with a long-form override on top of it.
  path = tmp_path / 'recipe.py'
  path.write_text('from dropnet_jax.config import *\n'
                  'def get_config():\n'
                  '  return ExperimentConfig(model=ModelConfig(widths=(5, 5)),\n'
                  '                          dropnet=DropNetConfig(metrics=("max",), floor=0.6))\n')
  proc = subprocess.run(BASE + [f'--config={path}', '--config.dropnet.train.max_epochs=1', f'--out={recipe_run}'],
                        cwd=REPO, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  saved = json.loads((recipe_run / 'config.json').read_text())
  assert saved['config']['model']['widths'] == [5, 5] and saved['stamp']['dropnet.train.max_epochs'] == 1
  assert {r['metric'] for r in reporting.read_jsonl(recipe_run / 'results.jsonl')} == {'max'}
  # The same setting spelled twice, and a config.json of another kind of run, are refused with one line.
  for bad, expected in ((['--lr=0.1', '--config.dropnet.train.optim.lr=0.2'], 'set the same setting'),
                        ([f'--config={tmp_path}/missing.json'], 'no such file')):
    proc = subprocess.run(BASE + bad + [f'--out={tmp_path / "bad"}'], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode != 0 and expected in proc.stderr and 'Traceback' not in proc.stderr, proc.stderr
    assert not (tmp_path / 'bad').exists()


def test_a_stray_word_on_the_command_line_is_refused_before_any_work(tmp_path):
  """`--metrics=min max` used to run min alone and exit 0 (absl hands main the words that are not flags,
  and main dropped them); now one line names them and nothing is written."""
  out = tmp_path / 'run'
  proc = subprocess.run(BASE + ['--widths=8,8', '--max_epochs=1', '--metrics=min', 'max', f'--out={out}'],
                        cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1, proc.stderr[-2000:]
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith('error: unexpected arguments') and "'max'" in lines[0], proc.stderr
  assert not out.exists()


def test_a_disk_that_fills_while_outputs_are_written_ends_in_one_line():
  """An OSError of a full disk (or quota, or a read-only remount) that reaches the entry point's main ended in
  a traceback (experiments.ensemble on a full tmpfs); now one line names the file. Other errors still raise."""
  import errno

  import pytest

  from dropnet_jax.cli import entry

  def full(argv):
    raise OSError(errno.ENOSPC, 'No space left on device', '/disk/out/teams.jsonl')

  with pytest.raises(SystemExit) as stopped:
    entry._checked_main(full)(['prog'])
  assert str(stopped.value) == ('error: writing /disk/out/teams.jsonl failed: No space left on device (errno 28); '
                                'free space and rerun the same command')

  def other(argv):
    raise OSError(errno.EACCES, 'Permission denied', '/x')

  with pytest.raises(PermissionError):
    entry._checked_main(other)(['prog'])
