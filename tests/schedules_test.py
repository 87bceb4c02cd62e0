"""Tests of the schedules comparison (dropnet_jax.runs.schedules, experiments.schedules): every schedule
from the same θ0, the learning rates it reports, the table against an independent run, resuming, and
the directories and settings it refuses before any work."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dropnet_jax.config import ExperimentConfig, ModelConfig, TrainConfig
from dropnet_jax.input_pipeline import load_dataset
from dropnet_jax.loop.dropnet import SeedKeys
from dropnet_jax.models import init_params
from dropnet_jax.models.layers import full_masks
from dropnet_jax.runs import schedules
from dropnet_jax.runs.run_dir import RunDir
from dropnet_jax.training.optim import OptimizerConfig
from dropnet_jax.training.trainer import DeviceData, Trainer, steps_per_epoch

REPO = Path(__file__).resolve().parents[1]
CONFIG = schedules.SchedulesConfig(
    model=ModelConfig(widths=(8, 8)), schedules=('constant', 'cosine', 'cyclic'),
    train=TrainConfig(batch_size=64, max_epochs=3, patience=3,
                      optim=OptimizerConfig(optimizer='momentum', lr=0.05, cyclic_half_epochs=1.0, min_lr_factor=0.1)))


@pytest.fixture(scope='module')
def study(tmp_path_factory):
  out = tmp_path_factory.mktemp('schedules')
  setup = schedules.prepare(CONFIG, str(out))
  logs = []
  results = schedules.run(setup, log=logs.append)
  return setup, out, results, logs


def test_reported_learning_rates(study):
  setup, _, results, _ = study
  steps = steps_per_epoch(len(setup.dataset.train_labels), 64)
  total, lr, m = 3 * steps, 0.05, 0.1
  for e in (1, 2, 3):
    t = e * steps - 1  # the epoch's last step
    cos = lr * (m + (1 - m) * (1 + math.cos(math.pi * t / total)) / 2)  # CosineAnnealingLR, eta_min = m·lr
    p = t % (2 * steps)
    tri = lr * (m + (1 - m) * (p if p <= steps else 2 * steps - p) / steps)  # CyclicLR, triangular
    assert results['cosine']['curves']['lr'][e - 1] == pytest.approx(cos, rel=1e-5)
    assert results['cyclic']['curves']['lr'][e - 1] == pytest.approx(tri, rel=1e-5)
    assert results['constant']['curves']['lr'][e - 1] == pytest.approx(lr, rel=1e-6)


def test_table_matches_an_independent_run(study):
  setup, out, results, _ = study
  ds, model = setup.dataset, setup.model
  # The constant schedule, trained by hand from the same θ0 and shuffles: the same accuracies.
  data = DeviceData.from_dataset(ds)
  trainer = Trainer(model, CONFIG.train, steps_per_epoch=steps_per_epoch(len(ds.train_labels), 64))
  keys, masks = SeedKeys.for_seed(0), full_masks(model)
  state = trainer.init_fit(init_params(model, keys.init, ds.image_shape), masks, keys.shuffle_key(0))
  vals = []
  for _ in range(3):
    state = trainer.epoch_step(state, data)
    vals.append(float(state.val_accuracy))
  r = results['constant']
  np.testing.assert_allclose(r['curves']['val_accuracy'], vals, atol=1e-6)
  test = float(trainer.evaluate(state.params, masks, data.test_images, data.test_labels).accuracy)
  assert r['last']['test'] == pytest.approx(test, abs=1e-6) and r['epochs'] == 3
  assert results['cosine']['curves']['val_accuracy'] != r['curves']['val_accuracy']  # the schedule matters
  rows = [line.split('|') for line in (out / 'schedules.md').read_text().splitlines()[2:]]
  assert [row[1].strip() for row in rows] == ['constant', 'cosine', 'cyclic']
  for row in rows:
    res = results[row[1].strip()]
    assert [float(row[i]) for i in (2, 3, 4)] == pytest.approx(
        [100 * res['last'][k] for k in ('train', 'val', 'test')], abs=0.006)
  assert (out / 'schedules.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert json.loads((out / 'config.json').read_text())['kind'] == 'schedules'


def test_rerun_skips_finished_schedules(study):
  _, out, results, _ = study
  logs = []
  again = schedules.run(schedules.prepare(CONFIG, str(out)), log=logs.append)
  assert logs == ['constant: already done', 'cosine: already done', 'cyclic: already done']
  assert json.loads(json.dumps(again)) == json.loads((out / 'schedules.json').read_text())
  # The list of schedules is not stamped: a subset (or more) reuses what is there.
  logs = []
  subset = schedules.run(schedules.prepare(dataclasses.replace(CONFIG, schedules=('cosine',)), str(out)),
                         log=logs.append)
  assert logs == ['cosine: already done'] and list(subset) == ['cosine']
  assert set(json.loads((out / 'schedules.json').read_text())) == {'constant', 'cosine', 'cyclic'}


def _unchanged(out):
  return {name: (out / name).read_bytes() for name in ('schedules.json', 'schedules.md', 'config.json')}


def test_other_settings_widths_or_data_are_refused_before_training(study, monkeypatch):
  """The defect: a rerun into a directory made with other widths or data trained nothing, exited 0 and
  rewrote the table with the old numbers. Now the directory's stamp refuses it, before any work."""
  _, out, _, _ = study
  before = _unchanged(out)
  other_lr = dataclasses.replace(CONFIG, train=dataclasses.replace(
      CONFIG.train, optim=dataclasses.replace(CONFIG.train.optim, lr=0.02)))
  with pytest.raises(ValueError, match=r'train\.optim\.lr'):
    schedules.prepare(other_lr, str(out))
  with pytest.raises(ValueError, match=r'model\.widths: saved \[8, 8\], now \[6, 6\]'):
    schedules.prepare(dataclasses.replace(CONFIG, model=ModelConfig(widths=(6, 6))), str(out))
  with pytest.raises(ValueError, match='train_subset'):
    schedules.prepare(dataclasses.replace(CONFIG, train_subset=500), str(out))
  # The same settings on other data (e.g. other files behind the same --data_dir, which is not a
  # setting that changes a result): refused by the data's fingerprint.
  ds = load_dataset('digits')
  other = dataclasses.replace(ds, train_images=ds.train_images[::-1].copy(), train_labels=ds.train_labels[::-1].copy())
  monkeypatch.setattr(schedules, 'load_dataset', lambda *args, **kwargs: other)
  with pytest.raises(ValueError, match='data_fingerprint'):
    schedules.prepare(CONFIG, str(out))
  assert _unchanged(out) == before


def test_validation_rejects_nonsense():
  for changes, match in (({'train_subset': -5}, 'train_subset'), ({'train_subset': 0}, 'train_subset'),
                         ({'schedules': ()}, 'schedules'), ({'schedules': ('cosine', 'cosine')}, 'duplicates'),
                         ({'schedules': ('cosine', 'exp')}, 'unknown'), ({'seed': -1}, 'seed'),
                         ({'train': TrainConfig(max_epochs=0)}, 'max_epochs')):
    with pytest.raises(ValueError, match=match):
      dataclasses.replace(CONFIG, **changes).validate()
  ds = load_dataset('digits')
  small = schedules.subset_train(ds, 100)
  assert len(small.train_labels) == 100 and len(small.val_labels) == len(ds.val_labels)
  n = len(ds.train_labels)
  assert schedules.subset_train(ds, None) is ds and schedules.subset_train(ds, n) is ds
  # More than the split has is refused (it used to train on all of it, silently), naming the flag and the size.
  with pytest.raises(ValueError, match=rf'^--train_subset={n + 1}: the digits training split has only {n} examples$'):
    schedules.subset_train(ds, n + 1)


def _cli(*args):
  return subprocess.run([sys.executable, '-m', 'experiments.schedules', '--widths=8,8', '--max_epochs=1',
                         '--schedules=constant', *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def _refused(proc, match):
  assert proc.returncode != 0 and proc.stderr.strip().startswith('error:'), proc.stderr[-2000:]
  assert len(proc.stderr.strip().splitlines()) == 1 and match in proc.stderr, proc.stderr


def test_cli_refuses_bad_out_and_settings_before_work(study, tmp_path):
  _, out, _, _ = study
  before = _unchanged(out)
  same = ['--batch_size=64', '--max_epochs=3', '--patience=3', '--optimizer=momentum', '--lr=0.05',
          '--cyclic_half_epochs=1', '--min_lr_factor=0.1', '--schedules=constant,cosine,cyclic']
  _refused(_cli(f'--out={out}', *same, '--widths=6,6'), 'model.widths: saved [8, 8], now [6, 6]')
  assert _unchanged(out) == before
  afile = tmp_path / 'file'
  afile.write_text('x')
  _refused(_cli(f'--out={afile}'), 'is a file')
  dropnet = tmp_path / 'dropnet_run'
  with RunDir(str(dropnet), 'dropnet', ExperimentConfig()).open():  # what experiments.dropnet writes first
    pass
  _refused(_cli(f'--out={dropnet}'), 'holds a dropnet run')
  assert sorted(os.listdir(dropnet)) == ['.lock', 'config.json']
  _refused(_cli(f'--out={tmp_path / "neg"}', '--train_subset=-5'), 'train_subset')
  assert not (tmp_path / 'neg').exists()
  if os.geteuid() != 0:  # root may write anywhere
    locked = tmp_path / 'locked'
    locked.mkdir()
    locked.chmod(0o500)
    try:
      _refused(_cli(f'--out={locked / "x"}'), 'not writable')
    finally:
      locked.chmod(0o700)
