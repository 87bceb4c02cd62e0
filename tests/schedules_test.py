"""Tests of experiments.schedules: every schedule from the same θ0, the learning rates it reports,
the table against an independent run, and resuming."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from dropnet_jax.config import TrainConfig
from dropnet_jax.loop.dropnet import SeedKeys
from dropnet_jax.input_pipeline import load_dataset
from dropnet_jax.models.layers import full_masks
from dropnet_jax.models import create_model, init_params
from dropnet_jax.training.optim import OptimizerConfig
from dropnet_jax.training.trainer import DeviceData, Trainer, steps_per_epoch
from experiments import schedules


@pytest.fixture(scope='module')
def study(tmp_path_factory):
  ds = load_dataset('digits')
  model = create_model('fc', (8, 8), 10)
  base = TrainConfig(batch_size=64, max_epochs=3, patience=3,
                     optim=OptimizerConfig(optimizer='momentum', lr=0.05, cyclic_half_epochs=1.0, min_lr_factor=0.1))
  out = tmp_path_factory.mktemp('schedules')
  logs = []
  results = schedules.run(str(out), model, ds, base, ['constant', 'cosine', 'cyclic'], seed=0, log=logs.append)
  return ds, model, base, out, results, logs


def test_reported_learning_rates(study):
  ds, _, base, _, results, _ = study
  steps = steps_per_epoch(len(ds.train_labels), 64)
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
  ds, model, base, out, results, _ = study
  # The constant schedule, trained by hand from the same θ0 and shuffles: the same accuracies.
  data = DeviceData.from_dataset(ds)
  trainer = Trainer(model, base, steps_per_epoch=steps_per_epoch(len(ds.train_labels), 64))
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


def test_rerun_skips_finished_schedules(study):
  ds, model, base, out, results, _ = study
  logs = []
  again = schedules.run(str(out), model, ds, base, ['constant', 'cosine', 'cyclic'], seed=0, log=logs.append)
  assert logs == ['constant: already done', 'cosine: already done', 'cyclic: already done']
  assert json.loads(json.dumps(again)) == json.loads((out / 'schedules.json').read_text())
  # Other settings are trained, not taken from the file.
  changed = dataclasses.replace(base, optim=dataclasses.replace(base.optim, lr=0.02))
  logs = []
  schedules.run(str(out), model, ds, changed, ['constant'], seed=0, log=logs.append)
  assert logs and 'already done' not in logs[0]
