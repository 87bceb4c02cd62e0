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
