"""experiments.smoke_train: the larger models train a few steps through the production Trainer."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import MNIST_DIR

REPO = Path(__file__).resolve().parents[1]


def test_smoke_train_writes_finite_before_and_after_figures(tmp_path):
  if not MNIST_DIR.is_dir():
    pytest.skip(f'real MNIST files not found at {MNIST_DIR}')
  out = tmp_path / 'smoke'
  proc = subprocess.run([sys.executable, '-m', 'experiments.smoke_train', '--models=resnet18,vgg19', '--steps=3',
                         '--batch_size=8', '--width_multiplier=0.0625', '--val_examples=16', '--dataset=mnist',
                         f'--data_dir={MNIST_DIR}', f'--out={out}'], cwd=REPO, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((out / 'smoke.json').read_text())['results']
  assert json.loads((out / 'config.json').read_text())['kind'] == 'smoke_train'
  assert [r['model'] for r in results] == ['resnet18', 'vgg19']
  for r in results:
    assert r['finite'] and r['steps'] == 3 and r['parameters'] > 0
    assert r['val_loss_before'] != r['val_loss_after']  # the parameters moved
  assert 'resnet18' in proc.stdout and 'val loss' in proc.stdout


def test_smoke_train_rejects_an_unknown_model(tmp_path):
  proc = subprocess.run([sys.executable, '-m', 'experiments.smoke_train', '--models=resnet7',
                         f'--out={tmp_path / "x"}'], cwd=REPO, capture_output=True, text=True)
  assert proc.returncode != 0 and '--models' in proc.stderr and 'Traceback' not in proc.stderr
  assert not (tmp_path / 'x').exists()


def test_smoke_train_refuses_a_file_as_out_before_reading_data(tmp_path):
  out = tmp_path / 'smoke.json'
  out.write_text('kept')
  # A data_dir that does not exist would be the next error: --out is refused first, before any data.
  proc = subprocess.run([sys.executable, '-m', 'experiments.smoke_train', '--steps=1', '--dataset=mnist',
                         f'--data_dir={tmp_path / "nowhere"}', f'--out={out}'], cwd=REPO, capture_output=True,
                        text=True)
  assert proc.returncode != 0 and 'is a file' in proc.stderr and 'Traceback' not in proc.stderr
  assert out.read_text() == 'kept'
