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
  out = tmp_path / 'smoke.json'
  proc = subprocess.run([sys.executable, '-m', 'experiments.smoke_train', '--models=resnet18,vgg19', '--steps=3',
                         '--batch_size=8', '--width_multiplier=0.0625', '--val_examples=16', '--dataset=mnist',
                         f'--data_dir={MNIST_DIR}', f'--out={out}'], cwd=REPO, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads(out.read_text())['results']
  assert [r['model'] for r in results] == ['resnet18', 'vgg19']
  for r in results:
    assert r['finite'] and r['steps'] == 3 and r['parameters'] > 0
    assert r['val_loss_before'] != r['val_loss_after']  # the parameters moved
  assert 'resnet18' in proc.stdout and 'val loss' in proc.stdout


def test_smoke_train_rejects_an_unknown_model(tmp_path):
  proc = subprocess.run([sys.executable, '-m', 'experiments.smoke_train', '--models=resnet7',
                         f'--out={tmp_path / "x.json"}'], cwd=REPO, capture_output=True, text=True)
  assert proc.returncode != 0 and '--models' in proc.stderr and 'Traceback' not in proc.stderr
  assert not (tmp_path / 'x.json').exists()
