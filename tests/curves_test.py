"""Learning curves (dropnet_jax.runs.curves, fed by the driver): metrics.jsonl against the records,
the TensorBoard files read back with TensorBoard's own reader, the learning rate of constant and
cosine schedules, batched lanes against sequential trials, resume without duplicate epochs, the
switch that turns it all off, and the magnitude run's hook.

Every run is a tiny DropNet on the bundled digits (Model A 8-8, two metrics, at most 3 epochs per
cycle; lr 0.3 and patience 1 so that some cycles stop early, and batched lanes finish at different
epochs) through `runs.experiment.prepare/run`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections import Counter

import numpy as np
import pytest

from dropnet_jax.config import DropNetConfig, ExperimentConfig, ModelConfig, OutputConfig, TrainConfig
from dropnet_jax.runs import curves, experiment
from dropnet_jax.training import optim
from dropnet_jax.training.trainer import steps_per_epoch

CONFIG = ExperimentConfig(
    model=ModelConfig('fc', (8, 8)),
    dropnet=DropNetConfig(metrics=('min', 'max'), fraction=0.5, floor=0.3,
                          train=TrainConfig(max_epochs=3, patience=1, optim=optim.OptimizerConfig(lr=0.3))),
    output=OutputConfig(checkpoint_every_epochs=2))
VALUES = curves.QUANTITIES
key = lambda r: (r['seed'], r['metric'], r['cycle'])
f32 = np.float32


def run(config: ExperimentConfig, out) -> list[dict]:
  return experiment.run(experiment.prepare(config, str(out)))


def rows_by_epoch(out) -> dict[tuple, dict]:
  """The run's rows by (seed, metric, cycle, epoch); a duplicate is a failure."""
  rows = curves.load(str(out))
  index = {(*key(r), r['epoch']): r for r in rows}
  duplicates = [k for k, n in Counter((*key(r), r['epoch']) for r in rows).items() if n > 1]
  assert not duplicates, f'duplicate rows: {duplicates[:5]}'
  return index


@pytest.fixture(scope='module')
def sequential(tmp_path_factory):
  out = tmp_path_factory.mktemp('sequential')
  return out, run(CONFIG, out)


@pytest.fixture(scope='module')
def batched(tmp_path_factory):
  out = tmp_path_factory.mktemp('batched')
  return out, run(dataclasses.replace(CONFIG, batch_trials=True), out)


def test_a_row_per_trained_epoch_of_every_trial_and_cycle(sequential):
  out, records = sequential
  rows = rows_by_epoch(out)
  expected = {(*key(r), e) for r in records for e in range(1, r['epochs_trained'] + 1)}
  assert set(rows) == expected
  assert len({r['epochs_trained'] for r in records}) > 1, 'patience 1 should stop some cycles early'
  for r in rows.values():
    assert list(r) == list(curves.ROW_KEYS)
    assert all(math.isfinite(r[k]) for k in VALUES)
    assert 0 <= r['train_accuracy'] <= 1 and 0 <= r['val_accuracy'] <= 1
    assert r['train_loss'] > 0 and r['val_loss'] > 0
    assert r['lr'] == 0.3  # a constant schedule: the config's lr, as written
  for record in records:  # the last epoch's row is the state the record's last_* values come from
    last = rows[(*key(record), record['epochs_trained'])]
    for name in ('train_loss', 'train_accuracy', 'val_loss', 'val_accuracy'):
      assert f32(last[name]) == f32(record[f'last_{name}']), (key(record), name)
    # The record's best epoch is the first epoch of lowest validation loss.
    losses = [rows[(*key(record), e)]['val_loss'] for e in range(1, record['epochs_trained'] + 1)]
    assert record['early_stop_epoch'] == 1 + int(np.argmin(losses))


def test_the_shared_dense_cycle_is_cycle_0_of_every_metric(sequential):
  out, records = sequential
  rows = rows_by_epoch(out)
  dense = [r for r in records if r['cycle'] == 0]
  assert len(dense) == len(CONFIG.dropnet.metrics)
  for epoch in range(1, dense[0]['epochs_trained'] + 1):
    values = [tuple(rows[(*key(r), epoch)][k] for k in VALUES) for r in dense]
    assert len(set(values)) == 1


def test_tensorboard_events_read_back_with_tensorboards_reader(sequential):
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  out, records = sequential
  rows = rows_by_epoch(out)
  runs = sorted(os.listdir(out / curves.TENSORBOARD_DIR))
  assert runs == sorted(curves.tensorboard_run(0, m) for m in CONFIG.dropnet.metrics)
  for metric in CONFIG.dropnet.metrics:
    events = EventAccumulator(str(out / curves.TENSORBOARD_DIR / curves.tensorboard_run(0, metric)))
    events.Reload()
    mine = [r for r in records if r['metric'] == metric]
    assert sorted(events.Tags()['scalars']) == sorted(
        f'{q}/cycle{r["cycle"]:02d}' for r in mine for q in VALUES)
    for record in mine:
      for q in VALUES:
        scalars = events.Scalars(curves.tensorboard_tag(q, record['cycle']))
        assert [s.step for s in scalars] == list(range(1, record['epochs_trained'] + 1))
        assert [s.value for s in scalars] == [f32(rows[(*key(record), s.step)][q]) for s in scalars]


def test_the_figure_is_written(sequential):
  out, _ = sequential
  with open(out / curves.FIGURE_FILE, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_batched_lanes_give_the_rows_of_sequential_trials(sequential, batched):
  (seq_out, seq_records), (bat_out, bat_records) = sequential, batched
  seq, bat = rows_by_epoch(seq_out), rows_by_epoch(bat_out)
  assert set(bat) == set(seq)
  for k, row in seq.items():
    for q in VALUES:
      assert bat[k][q] == pytest.approx(row[q], rel=1e-4, abs=1e-5), (k, q)


def test_lr_follows_a_cosine_schedule(tmp_path):
  optim_cfg = dataclasses.replace(CONFIG.dropnet.train.optim, schedule='cosine')
  train = dataclasses.replace(CONFIG.dropnet.train, optim=optim_cfg)
  config = dataclasses.replace(CONFIG, dropnet=dataclasses.replace(CONFIG.dropnet, metrics=('min',), train=train))
  setup = experiment.prepare(config, str(tmp_path))
  records = experiment.run(setup)
  rows = rows_by_epoch(tmp_path)
  spe = steps_per_epoch(len(setup.dataset.train_labels), train.batch_size)
  schedule = optim.make_schedule(optim_cfg, spe, train.max_epochs)
  for record in records:
    lrs = [rows[(*key(record), e)]['lr'] for e in range(1, record['epochs_trained'] + 1)]
    # The lr of the epoch's last step (step count e * spe - 1); every cycle restarts the schedule.
    assert [f32(lr) for lr in lrs] == [f32(schedule(e * spe - 1)) for e in range(1, len(lrs) + 1)]
    assert all(a > b for a, b in zip(lrs, lrs[1:])) and lrs[0] < optim_cfg.lr


@pytest.mark.parametrize('batch_trials,checkpoint_every', [(False, 2), (False, 0), (True, 2)])
def test_resume_after_an_interruption_writes_no_epoch_twice(tmp_path, monkeypatch, sequential, batched,
                                                             batch_trials, checkpoint_every):
  """Interrupted at epoch 3 of a pruned cycle: the newest checkpoint is mid-cycle at epoch 2 (or,
  with after-cycle checkpoints only, before that cycle), so rows already written past it are trained
  again; the resumed run's rows and TensorBoard steps are the uninterrupted run's, each once."""
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  config = dataclasses.replace(CONFIG, batch_trials=batch_trials,
                               output=dataclasses.replace(CONFIG.output, checkpoint_every_epochs=checkpoint_every))
  reference_out = (batched if batch_trials else sequential)[0]
  reference = rows_by_epoch(reference_out)
  stop_at = next(k for k in reference if k[2] >= 1 and k[3] == 3)  # (seed, metric, cycle, epoch 3)
  add = curves.CurveWriter.add

  def interrupted(self, rows):
    add(self, rows)
    if any((*key(r), r['epoch']) == stop_at for r in rows):
      raise KeyboardInterrupt  # as Ctrl-C: RunDir finishes the save in flight and exits 130

  monkeypatch.setattr(curves.CurveWriter, 'add', interrupted)
  with pytest.raises(SystemExit) as stopped:
    run(config, tmp_path)
  assert stopped.value.code == 130
  assert stop_at in {(*key(r), r['epoch']) for r in curves.load(str(tmp_path))}  # written past the checkpoint
  monkeypatch.setattr(curves.CurveWriter, 'add', add)
  run(config, tmp_path)

  rows = rows_by_epoch(tmp_path)
  assert set(rows) == set(reference)
  for k, row in reference.items():
    for q in VALUES:
      assert rows[k][q] == pytest.approx(row[q], rel=1e-6, abs=1e-7), (k, q)
  for metric in CONFIG.dropnet.metrics:
    events = EventAccumulator(str(tmp_path / curves.TENSORBOARD_DIR / curves.tensorboard_run(0, metric)))
    events.Reload()
    for cycle in {k[2] for k in reference if k[1] == metric}:
      steps = [s.step for s in events.Scalars(curves.tensorboard_tag('val_loss', cycle))]
      assert steps == sorted(k[3] for k in reference if k[1:3] == (metric, cycle))


def test_curves_off_writes_none_and_the_records_do_not_change(tmp_path, sequential):
  out, records = sequential
  off = run(dataclasses.replace(CONFIG, output=dataclasses.replace(CONFIG.output, curves=False)), tmp_path)
  for name in (curves.METRICS_FILE, curves.TENSORBOARD_DIR, curves.FIGURE_FILE):
    assert not os.path.exists(tmp_path / name)
  strip = lambda rs: [{k: v for k, v in r.items() if k != 'seconds'} for r in rs]
  assert strip(off) == strip(records)


def test_a_magnitude_run_writes_a_row_per_trained_epoch(tmp_path):
  from dropnet_jax.loop.magnitude import MagnitudeConfig
  from dropnet_jax.runs import magnitude
  config = magnitude.MagnitudeRunConfig(
      model=ModelConfig('fc', (8, 8)),
      magnitude=MagnitudeConfig(methods=('oneshot', 'lottery'), sparsities=(0.5,), finetune_epochs=2,
                                train=TrainConfig(max_epochs=2)))
  records, _ = magnitude.run(magnitude.prepare(config, str(tmp_path)))
  rows = rows_by_epoch(tmp_path)
  assert set(rows) == {(*key(r), e) for r in records for e in range(1, r['epochs_trained'] + 1)}
  assert os.path.isdir(tmp_path / curves.TENSORBOARD_DIR / curves.tensorboard_run(0, 'oneshot s=0.5'))
  assert (tmp_path / curves.FIGURE_FILE).is_file()


def test_a_torn_last_line_is_left_out_and_a_corrupt_one_refused(tmp_path):
  row = {k: 1 for k in curves.ROW_KEYS}
  (tmp_path / curves.METRICS_FILE).write_text(json.dumps(row) + '\n' + json.dumps(row)[:20])
  assert curves.load(str(tmp_path)) == [row]
  (tmp_path / curves.METRICS_FILE).write_text('{"seed": \n' + json.dumps(row) + '\n')
  with pytest.raises(ValueError, match='line 1'):
    curves.load(str(tmp_path))
