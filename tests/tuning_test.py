"""Tests of dropnet_jax.tuning and experiments.tune: the search space, lanes against independent
one-trial runs, per-lane pruning, resumable SQLite studies, stale trials retried, DropNet's
objective, the settings and directories a study refuses before any work, and several worker
processes on SQLite and on a real PostgreSQL server."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import glob
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

optuna = pytest.importorskip('optuna')
from optuna.trial import TrialState  # noqa: E402

from dropnet_jax import tuning  # noqa: E402
from dropnet_jax.config import DataConfig, DropNetConfig, ExperimentConfig, ModelConfig, TrainConfig  # noqa: E402
from dropnet_jax.loop.dropnet import SeedKeys  # noqa: E402
from dropnet_jax.input_pipeline import load_dataset  # noqa: E402
from dropnet_jax.models.layers import full_masks  # noqa: E402
from dropnet_jax.models import create_model, init_params  # noqa: E402
from dropnet_jax.runs.run_dir import RunDir  # noqa: E402
from dropnet_jax.training.trainer import DeviceData, Trainer, steps_per_epoch  # noqa: E402
from dropnet_jax.tuning import experiment  # noqa: E402
from dropnet_jax.tuning.config import TuneConfig, with_space_file  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# One static shape (and the same compiled programs, cached by the module's runner) for most tests.
SMALL = dict(optimizers=('momentum',), batch_sizes=(64,), schedules=('constant',), weight_decay=(1e-5, 1e-2))
BASE = TrainConfig(max_epochs=3, patience=3)


@pytest.fixture(scope='module')
def digits():
  ds = load_dataset('digits')
  return ds, DeviceData.from_dataset(ds)


@pytest.fixture(scope='module')
def runner(digits):
  ds, data = digits
  return tuning.LaneRunner(create_model('fc', (12, 12), 10), ds.image_shape, data)


# -- the search space -------------------------------------------------------------------------------

def test_space_validation_file_and_fixed_fields(tmp_path):
  with pytest.raises(ValueError, match='unknown fields'):
    tuning.SearchSpace.from_dict({'learning_rate': [0.1, 1]})
  with pytest.raises(ValueError, match='optimizers'):
    tuning.SearchSpace.from_dict({'optimizers': ['sgd', 'lbfgs']})
  with pytest.raises(ValueError, match='lr'):
    tuning.SearchSpace.from_dict({'lr': [0.0, 0.1]})  # log scale needs low > 0
  with pytest.raises(ValueError, match='momentum'):
    tuning.SearchSpace.from_dict({'momentum': [0.5, 1.0]})
  path = tmp_path / 'space.json'
  path.write_text(json.dumps({'optimizers': ['adam'], 'lr': [0.01, 0.01], 'schedules': ['step'], 'gamma': [0.3, 0.3],
                              'step_epochs': [2, 4]}))
  space = tuning.SearchSpace.load(str(path))
  base = TrainConfig(max_epochs=5)
  trial = optuna.trial.FixedTrial({'batch_size': 128, 'step_epochs': 3})
  settings = tuning.suggest(trial, space, base)
  # Only batch size and step length are searched; the rest are fixed by the space or the base config.
  assert set(trial.params) == {'batch_size', 'step_epochs'}
  assert settings == {'optimizer': 'adam', 'lr': 0.01, 'batch_size': 128, 'schedule': 'step', 'augment': 'none',
                      'weight_decay': 0.0, 'step_epochs': 3, 'gamma': 0.3}
  config = tuning.train_config(settings, base)
  assert (config.optim.optimizer, config.optim.lr, config.optim.step_epochs, config.optim.gamma, config.batch_size,
          config.optim.momentum) == ('adam', 0.01, 3.0, 0.3, 128, None)


def test_sampled_params_respect_ranges_and_conditions():
  space = tuning.SearchSpace(optimizers=('sgd', 'momentum', 'rmsprop', 'adam'), weight_decay=(1e-6, 1e-2),
                             schedules=('constant', 'cosine', 'step', 'cyclic', 'warmup_cosine'),
                             warmup_epochs=(1, 10), augments=('none', 'crop'))
  base = TrainConfig(max_epochs=4)
  study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3), direction='maximize')
  seen = set()
  for _ in range(60):
    t = study.ask()
    s = tuning.suggest(t, space, base)
    tuning.train_config(s, base)  # every sample is a valid config
    p = t.params
    seen.add((s['optimizer'], s['schedule']))
    assert 1e-5 <= p['lr'] <= 1e-1 and 1e-6 <= p['weight_decay'] <= 1e-2
    assert ('momentum' in p) == (s['optimizer'] in ('momentum', 'rmsprop'))
    assert ('min_lr_factor' in p) == (s['schedule'] in ('cosine', 'cyclic', 'warmup_cosine'))
    assert ('gamma' in p) == ('step_epochs' in p) == (s['schedule'] == 'step')
    assert ('cyclic_half_epochs' in p) == (s['schedule'] == 'cyclic')
    if s['schedule'] == 'warmup_cosine':
      assert 1 <= s['warmup_epochs'] <= base.max_epochs - 1  # capped below the horizon
    study.tell(t, 0.0)
  assert len(seen) > 10


def test_templates_group_static_settings_only():
  space = tuning.SearchSpace(**SMALL)
  base = TrainConfig(max_epochs=3)
  space = dataclasses.replace(space, schedules=('cosine',))
  a = tuning.complete({'lr': 0.1, 'momentum': 0.9, 'weight_decay': 1e-4, 'min_lr_factor': 0.05}, space, base)
  b = tuning.complete({'lr': 0.01, 'momentum': 0.6, 'weight_decay': 1e-3, 'min_lr_factor': 0.05}, space, base)
  c = {**a, 'min_lr_factor': 0.02}
  ta, tb, tc = (tuning.template_config(s, space, base) for s in (a, b, c))
  assert ta == tb and hash(ta) == hash(tb) and ta != tc  # a schedule parameter is static
  assert ta.optim.weight_decay > 0 and ta.optim.momentum > 0  # the terms exist in the shared program
  assert tuning.lane_hyperparams(b, space) == {'learning_rate': 0.01, 'momentum': 0.6, 'weight_decay': 1e-3}


def test_space_searches_dropout_asgd_and_a_batch_size_range():
  """A sampled trial carries its dropout rate (into the model: `trial_model`), ASGD and a batch size
  from an integer range with a step (into the TrainConfig); dropout groups trials like a static setting."""
  space = tuning.SearchSpace(optimizers=('sgd', 'asgd'), batch_size_range=(64, 256), batch_size_step=32,
                             dropout=(0.0, 0.5), schedules=('constant', 'torch_linear'))
  base = TrainConfig(max_epochs=4)
  model = create_model('fc', (12, 12), 10)
  study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1), direction='maximize')
  sizes, optimizers = set(), set()
  for _ in range(30):
    t = study.ask()
    s = tuning.suggest(t, space, base)
    config = tuning.train_config(s, base)
    assert config.batch_size == s['batch_size'] == t.params['batch_size']
    assert 64 <= s['batch_size'] <= 256 and (s['batch_size'] - 64) % 32 == 0
    assert 0.0 <= t.params['dropout'] == s['dropout'] <= 0.5
    assert tuning.trial_model(model, s).dropout == s['dropout'] and model.dropout == 0.0
    assert config.optim.optimizer == s['optimizer'] and config.optim.momentum is None and 'momentum' not in t.params
    assert config.optim.schedule == s['schedule']
    sizes.add(s['batch_size'])
    optimizers.add(s['optimizer'])
    study.tell(t, 0.0)
  assert optimizers == {'sgd', 'asgd'} and len(sizes) > 3
  assert study.trials[0].distributions['batch_size'] == optuna.distributions.IntDistribution(64, 256, step=32)
  t = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
  tuning.suggest(t, dataclasses.replace(space, batch_size_range=(16, 512), batch_size_step=1, batch_size_log=True),
                 base)
  assert t.distributions['batch_size'] == optuna.distributions.IntDistribution(16, 512, log=True)
  # One-value ranges fix the value; without a dropout range the model keeps its own rate.
  fixed = tuning.complete({}, dataclasses.replace(space, batch_size_range=(96, 96), dropout=(0.3, 0.3)), base)
  assert fixed['batch_size'] == 96 and fixed['dropout'] == 0.3
  unset = tuning.complete({}, dataclasses.replace(space, dropout=None), base)
  assert 'dropout' not in unset and tuning.trial_model(model, unset) is model
  a = tuning.complete({'optimizer': 'asgd', 'lr': 0.1, 'batch_size': 64, 'dropout': 0.2}, space, base)
  key = lambda s: tuning.group_key(s, space, base)
  assert key(a) != key({**a, 'dropout': 0.3}) and key(a) == key({**a, 'lr': 0.01})  # lr is a lane's own
  assert tuning.SearchSpace.from_dict({'batch_size_range': [64, 256], 'dropout': [0.1, 0.5]}).dropout == (0.1, 0.5)


@pytest.mark.parametrize('fields,match', [
    ({'batch_size_range': (0, 64)}, 'batch_size_range'),
    ({'batch_size_range': (128, 64)}, 'batch_size_range'),
    ({'batch_size_range': (64.5, 128)}, 'batch_size_range'),
    ({'batch_size_range': (64, 250), 'batch_size_step': 32}, 'batch_size_range'),
    ({'batch_size_step': 0}, 'batch_size_step'),
    ({'batch_size_range': (16, 256), 'batch_size_step': 16, 'batch_size_log': True}, 'batch_size_log'),
    ({'dropout': (0.2, 1.0)}, 'dropout'),
    ({'dropout': (-0.1, 0.5)}, 'dropout'),
    ({'dropout': (0.5, 0.2)}, 'dropout'),
])
def test_space_refuses_bad_dropout_and_batch_size_ranges(fields, match):
  with pytest.raises(ValueError, match=f'^{match}:'):
    tuning.SearchSpace(**fields).validate()


@pytest.mark.parametrize('field', tuning.space._RANGES)
@pytest.mark.parametrize('value', ['one', 'reversed'])
def test_a_bad_range_names_the_flag_typed(field, value, tmp_path):
  """--tune_lr=0.1 or --tune_lr=1,0.001 (any range field): the error names the flag, then the setting."""
  flag = {f.name: f.metadata['flag'] for f in dataclasses.fields(tuning.SearchSpace)}[field]
  assert flag.startswith('tune_')
  bad = (0.5,) if value == 'one' else (8.0, 2.0)
  config = dataclasses.replace(TuneConfig(), space=dataclasses.replace(tuning.SearchSpace(), **{field: bad}))
  with pytest.raises(ValueError, match=rf'^--{flag} \(space\.{field}\): ') as e:
    config.validate()
  assert '\n' not in str(e.value)
  # The same with a --space file under the flag given on the command line.
  path = tmp_path / 'space.json'
  path.write_text('{}')
  with pytest.raises(ValueError, match=rf'^--{flag} \(space\.{field}\): '):
    with_space_file(dataclasses.replace(config, space_file=str(path)), [f'space.{field}'])


# -- the study's settings and directory -------------------------------------------------------------

def test_config_validation_space_file_and_objective(tmp_path):
  for changes, match in (({'train_subset': -5}, 'train_subset'), ({'train_subset': 0}, 'train_subset'),
                         ({'n_trials': 0}, 'n_trials'), ({'workers': 0}, 'workers'), ({'batch': 0}, 'batch'),
                         ({'objective': 'dropnet', 'batch': 2}, 'batch'), ({'lanes_per_chunk': 0}, 'lanes_per_chunk'),
                         ({'objective': 'dropnet', 'units_remaining': 1.5}, 'units_remaining'),
                         ({'retrain_seeds': -1}, 'retrain_seeds'), ({'grace_period': 0}, 'grace_period'),
                         ({'space': tuning.SearchSpace(optimizers=('sgd', 'sgd'))}, 'duplicates'),
                         ({'data': DataConfig(dataset='mnist', data_dir=str(tmp_path / 'none'))}, 'data_dir'),
                         ({'space_file': str(tmp_path / 'none.json')}, 'space')):
    with pytest.raises(ValueError, match=match):
      dataclasses.replace(TuneConfig(), **changes).validate()
  TuneConfig().validate()
  # --space's file under the --tune_* flags given on the command line (here the learning rate).
  path = tmp_path / 'space.json'
  path.write_text(json.dumps({'optimizers': ['adam'], 'lr': [0.01, 0.01], 'augments': ['crop+flip']}))
  given = dataclasses.replace(TuneConfig(), space=tuning.SearchSpace(lr=(1e-3, 0.1)), space_file=str(path))
  merged = with_space_file(given, ['space.lr'])
  assert merged.space_file is None  # config.json holds the space itself
  assert (merged.space.optimizers, merged.space.lr, merged.space.augments) == (('adam',), (1e-3, 0.1), ('crop,flip',))
  assert merged.space.batch_sizes == tuning.SearchSpace().batch_sizes  # the file's missing fields: defaults
  assert with_space_file(given).space.lr == (0.01, 0.01)
  # DropNet's p and criterion are searched by the dropnet objective only.
  assert TuneConfig().search_space.fractions is None and TuneConfig().search_space.metrics is None
  assert TuneConfig(objective='dropnet').search_space.fractions == (0.1, 0.5)
  assert tuning.SearchSpace(weight_decay=()).weight_decay is None  # an empty --tune_weight_decay: not searched


def test_worker_argv_replaces_the_worker_settings():
  argv = ['py', '-m', 'experiments.tune', '--out=x', '--workers=3', '--config.worker_id=5', '--worker_only',
          '--ready_file', 'r', '--noconfig.worker_only', '--batch=2']
  assert experiment.worker_argv(argv, 2, 'ready') == [
      'py', '-m', 'experiments.tune', '--out=x', '--batch=2', '--worker_only', '--worker_id=2', '--workers=1',
      '--ready_file=ready']


SMALL_STUDY = TuneConfig(model=ModelConfig(widths=(8, 8)), dropnet=DropNetConfig(train=TrainConfig(max_epochs=2)))


def test_prepare_refuses_other_settings_and_data(tmp_path, monkeypatch):
  out = str(tmp_path / 'tune')
  setup = experiment.prepare(SMALL_STUDY, out)
  with setup.run_dir.open():  # config.json, as a study's first run writes it
    pass
  assert len(setup.dataset.train_labels) > 1000 and setup.storage_url == tuning.sqlite_url(out)
  assert setup.settings['data_fingerprint'] == setup.run_dir.data_fingerprint
  again = experiment.prepare(dataclasses.replace(SMALL_STUDY, n_trials=50, workers=2), out)  # not result settings
  assert again.settings == setup.settings
  with pytest.raises(ValueError, match=r'model\.widths: saved \[8, 8\], now \[6, 6\]'):
    experiment.prepare(dataclasses.replace(SMALL_STUDY, model=ModelConfig(widths=(6, 6))), out)
  with pytest.raises(ValueError, match='train_subset'):
    experiment.prepare(dataclasses.replace(SMALL_STUDY, train_subset=300), out)
  ds = load_dataset('digits')
  other = dataclasses.replace(ds, train_images=255 - ds.train_images)
  monkeypatch.setattr(experiment, 'load_dataset', lambda *args, **kwargs: other)
  with pytest.raises(ValueError, match='data_fingerprint'):
    experiment.prepare(SMALL_STUDY, out)
  assert sorted(os.listdir(out)) == ['.lock', 'config.json']  # nothing else was written
  with pytest.raises(ValueError, match='storage'):
    experiment.prepare(SMALL_STUDY, str(tmp_path / 'other'), storage='not a url')


def _refused(proc, match):
  assert proc.returncode != 0 and proc.stderr.strip().startswith('error:'), proc.stderr[-2000:]
  assert len(proc.stderr.strip().splitlines()) == 1 and match in proc.stderr, proc.stderr


def test_cli_refuses_bad_out_before_work(tmp_path):
  tune = lambda *args: subprocess.run([sys.executable, '-m', 'experiments.tune', '--widths=8,8', *args], cwd=REPO,
                                      capture_output=True, text=True, timeout=120)
  afile = tmp_path / 'file'
  afile.write_text('x')
  _refused(tune(f'--out={afile}'), 'is a file')
  dropnet = tmp_path / 'dropnet_run'
  with RunDir(str(dropnet), 'dropnet', ExperimentConfig()).open():  # what experiments.dropnet writes first
    pass
  _refused(tune(f'--out={dropnet}'), 'holds a dropnet run')
  assert sorted(os.listdir(dropnet)) == ['.lock', 'config.json']
  _refused(tune(f'--out={tmp_path / "neg"}', '--train_subset=-5'), 'train_subset')
  assert not (tmp_path / 'neg').exists()
  study = tmp_path / 'study'
  with RunDir(str(study), 'tune', SMALL_STUDY).open():
    pass
  _refused(tune(f'--out={study}', '--widths=6,6', '--max_epochs=2'), 'model.widths: saved [8, 8], now [6, 6]')
  assert sorted(os.listdir(study)) == ['.lock', 'config.json']
  if os.geteuid() != 0:  # root may write anywhere
    locked = tmp_path / 'locked'
    locked.mkdir()
    locked.chmod(0o500)
    try:
      _refused(tune(f'--out={locked / "x"}'), 'not writable')
    finally:
      locked.chmod(0o700)


# -- lanes ------------------------------------------------------------------------------------------

def _independent_run(model, ds, data, config: TrainConfig) -> list[float]:
  """Validation accuracy per epoch from a Trainer built with the trial's exact config (no placeholders,
  no with_hyperparams): the reference the lanes must reproduce."""
  trainer = Trainer(model, config, steps_per_epoch=steps_per_epoch(len(ds.train_labels), config.batch_size))
  keys = SeedKeys.for_seed(0)
  state = trainer.init_fit(init_params(model, keys.init, ds.image_shape), full_masks(model), keys.shuffle_key(0))
  accs = []
  while not bool(state.done):
    state = trainer.epoch_step(state, data)
    accs.append(float(state.val_accuracy))
  return accs


def test_lanes_equal_independent_runs_and_prune_separately(digits, runner):
  ds, data = digits
  space = tuning.SearchSpace(**SMALL)
  base = BASE
  settings = [tuning.complete({'lr': lr, 'momentum': m, 'weight_decay': wd}, space, base)
              for lr, m, wd in ((0.05, 0.9, 1e-4), (0.2, 0.5, 1e-2))]
  template = tuning.template_config(settings[0], space, base)
  hypers = [tuning.lane_hyperparams(s, space) for s in settings]
  want = [_independent_run(runner.model, ds, data, tuning.train_config(s, base)) for s in settings]
  assert want[0] != want[1]  # the hyperparameters matter
  lanes = runner.run(template, hypers, lane_count=3)  # one padding lane
  for got, ref in zip(lanes, want):
    np.testing.assert_allclose(got.val_accuracies, ref, atol=2e-6)
    assert got.epochs == 3 and not got.pruned and got.best_val_accuracy == max(got.val_accuracies)
  alone = runner.run(tuning.template_config(settings[1], space, base), [hypers[1]])  # one-trial programs
  np.testing.assert_allclose(alone[0].val_accuracies, want[1], atol=2e-6)

  calls = []

  def prune_lane_1_at_2(lane, epoch, acc):
    calls.append((lane, epoch))
    return lane == 1 and epoch == 2

  pruned = runner.run(template, hypers, lane_count=3, on_epoch=prune_lane_1_at_2)
  assert pruned[1].pruned and pruned[1].epochs == 2 and not pruned[0].pruned
  np.testing.assert_allclose(pruned[1].val_accuracies, want[1][:2], atol=2e-6)
  # The other lane is untouched by its neighbour's pruning.
  np.testing.assert_allclose(pruned[0].val_accuracies, want[0], atol=2e-6)
  assert (1, 3) not in calls and (0, 3) in calls  # a pruned lane reports no more epochs


# -- studies ----------------------------------------------------------------------------------------

def _storage(tmp_path, **kw):
  return tuning.make_storage(tuning.sqlite_url(str(tmp_path)), **kw)


def test_sqlite_study_resumes_batches_and_prunes(tmp_path, runner):
  space = tuning.SearchSpace(**{**SMALL, 'batch_sizes': (64, 128)}, lr=(1e-4, 0.5))
  base = BASE
  pruner = optuna.pruners.ThresholdPruner(lower=0.6, n_warmup_steps=2)  # deterministic: val acc < 0.6 from epoch 2
  settings = {'space': space.to_dict(), 'n': 1}
  study = tuning.open_study(_storage(tmp_path), 's', settings, pruner=pruner, startup_trials=2)
  report = tuning.run_worker(study, space, base, 3, runner=runner, batch=3, log=lambda s: None)
  assert sorted(report.trials) == [0, 1, 2]
  # A rerun (new storage object, as a new process) continues the same study up to the new target.
  study = tuning.open_study(_storage(tmp_path), 's', settings, pruner=pruner, startup_trials=2)
  report = tuning.run_worker(study, space, base, 5, runner=runner, batch=3, log=lambda s: None)
  assert sorted(report.trials) == [3, 4]
  trials = study.get_trials()
  assert [t.number for t in trials] == list(range(5))
  assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
  for batch in ((0, 1, 2), (3, 4)):  # a batch shares its static parameters, not its learning rates
    ts = [trials[i] for i in batch]
    assert len({t.params['batch_size'] for t in ts}) == 1 and len({t.params['lr'] for t in ts}) == len(ts)
    assert all(t.user_attrs['lanes'] == len(ts) for t in ts)
  for t in trials:
    values = [t.intermediate_values[e] for e in sorted(t.intermediate_values)]
    if t.state == TrialState.PRUNED:
      assert values[-1] < 0.6 and len(values) >= 2 and t.user_attrs['epochs'] == len(values)
    else:
      # (a trial that reaches max_epochs completes: the last epoch is not pruned)
      assert all(v >= 0.6 for v in values[1:-1]) and t.value == pytest.approx(max(values))
  assert any(t.state == TrialState.PRUNED for t in trials) and any(t.state == TrialState.COMPLETE for t in trials)
  with pytest.raises(ValueError, match='other settings'):
    tuning.open_study(_storage(tmp_path), 's', {**settings, 'n': 2})


def test_stale_trial_is_failed_and_retried(tmp_path, runner):
  space = tuning.SearchSpace(**SMALL)
  base = BASE
  study = tuning.open_study(_storage(tmp_path, heartbeat_interval=1, grace_period=1), 's', {})
  # A worker that asked a trial, beat once and died.
  dead = study.ask()
  params = tuning.suggest(dead, space, base)
  study._storage.record_heartbeat(dead._trial_id)
  time.sleep(2.5)
  report = tuning.run_worker(study, space, base, 2, runner=runner, log=lambda s: None, poll_seconds=0.2)
  trials = study.get_trials()
  assert trials[0].state == TrialState.FAIL
  retried = [t for t in trials if t.system_attrs.get('failed_trial') == dead.number]
  assert len(retried) == 1 and retried[0].state == TrialState.COMPLETE
  assert tuning.complete(retried[0].params, space, base) == params  # same parameters
  assert sum(t.state == TrialState.COMPLETE for t in trials) == 2 and len(report.trials) == 2


def test_a_trial_killed_before_its_first_heartbeat_is_failed_and_retried(tmp_path, runner):
  """A worker killed between Optuna's creation of a trial and its claim leaves a running trial with no
  heartbeat and no worker attributes, which Optuna's stale check skips: the study must still finish."""
  space = tuning.SearchSpace(**SMALL)
  study = tuning.open_study(_storage(tmp_path, heartbeat_interval=1, grace_period=1), 's', {})
  orphans = [study._storage.create_new_trial(study._study_id) for _ in range(2)]  # what killed workers left
  # The second is a retry (its failed trial's user attributes copied, from a worker on another machine).
  for key, value in (('worker', 'elsewhere:1:0'), ('worker_machine', 'elsewhere'), ('worker_pid', 1),
                     ('worker_trial_id', orphans[0])):
    study._storage.set_trial_user_attr(orphans[1], key, value)
  logs = []
  report = tuning.run_worker(study, space, BASE, 3, runner=runner, log=logs.append, poll_seconds=0.2)
  trials = study.get_trials()
  for orphan in orphans:
    killed = [t for t in trials if t._trial_id == orphan][0]
    assert killed.state == TrialState.FAIL
    assert [t.state for t in trials if t.system_attrs.get('failed_trial') == killed.number] == [TrialState.COMPLETE]
    assert any(f'trial {killed.number} was never claimed' in line for line in logs)
  assert sum(t.state == TrialState.COMPLETE for t in trials) == 3 and len(report.trials) == 3


def test_a_trial_is_claimed_as_it_is_created_before_sampling(tmp_path, runner):
  """The worker's heartbeat and PID are on the trial before any parameter is sampled (so a kill at any
  later point is seen by the PID or heartbeat checks)."""
  study = tuning.open_study(_storage(tmp_path, heartbeat_interval=1), 's', {})
  db = str(tmp_path / 'study.db')
  seen = []

  class Spy(optuna.samplers.RandomSampler):
    def sample_independent(self, _study, trial, name, distribution):
      with sqlite3.connect(db) as con:
        beats = con.execute('SELECT COUNT(*) FROM trial_heartbeats WHERE trial_id = ?', (trial._trial_id,)).fetchone()
      attrs = study._storage.get_trial(trial._trial_id).user_attrs
      seen.append((name, (attrs.get('worker_pid'), attrs.get('worker_trial_id')) == (os.getpid(), trial._trial_id),
                   beats[0]))
      return super().sample_independent(_study, trial, name, distribution)

  study.sampler = tuning.PinnedSampler(Spy(seed=0))
  tuning.run_worker(study, tuning.SearchSpace(**SMALL), BASE, 2, runner=runner, batch=2, log=lambda s: None)
  assert {name for name, _, _ in seen} >= {'lr', 'momentum'}
  assert all(own and beats == 1 for _, own, beats in seen), seen
  assert study.sampler.on_trial_created is None  # the claim ends with the worker


def test_study_searching_dropout_asgd_and_batch_size_range(tmp_path, runner):
  """A tiny study over dropout, ASGD and a batch-size range runs: one batch of two trials, which share
  the leader's static settings (batch size, dropout) as lanes of one program whose model has that
  dropout rate, and differ in their learning rates."""
  space = tuning.SearchSpace(optimizers=('asgd',), lr=(0.05, 0.5), batch_size_range=(48, 64), batch_size_step=16,
                             dropout=(0.1, 0.6), schedules=('constant',))
  base = TrainConfig(max_epochs=2, patience=2)
  study = tuning.open_study(_storage(tmp_path), 's', {'n': 1}, pruner=optuna.pruners.NopPruner())
  report = tuning.run_worker(study, space, base, 2, runner=runner, batch=2, log=lambda s: None)
  trials = study.get_trials()
  assert sorted(report.trials) == [0, 1] and all(t.state == TrialState.COMPLETE for t in trials)
  for t in trials:
    assert set(t.params) == {'lr', 'batch_size', 'dropout'} and t.params['batch_size'] in (48, 64)
    assert 0.1 <= t.params['dropout'] <= 0.6 and t.user_attrs['epochs'] == 2 and t.user_attrs['lanes'] == 2
    assert t.value > 0.1
  assert trials[0].params['lr'] != trials[1].params['lr']
  assert [{k: t.params[k] for k in ('batch_size', 'dropout')} for t in trials].count(
      {k: trials[0].params[k] for k in ('batch_size', 'dropout')}) == 2
  (trainer, _), = [runner._cache[k] for k in runner._cache if k[1] == 2 and k[0].optim.optimizer == 'asgd']
  assert trainer.model.dropout == trials[0].params['dropout'] and trainer.uses_dropout
  assert trainer.config.batch_size == trials[0].params['batch_size']


def test_dropnet_objective(digits):
  records = [{'fraction_remaining': f, 'val_accuracy': v, 'diverged': d} for f, v, d in
             ((1.0, 0.9, False), (0.5, 0.8, False), (0.25, 0.7, False), (0.2, 0.75, False), (0.1, 0.9, True))]
  assert tuning.dropnet_value(records, 0.25) == 0.75  # best among <= 25% remaining, diverged ignored
  assert tuning.dropnet_value(records[:2], 0.25) == 0.0  # never got there
  ds, data = digits
  base = DropNetConfig(metrics=('min',), train=TrainConfig(max_epochs=2, patience=2))
  space = tuning.SearchSpace(optimizers=('sgd',), lr=(0.1, 0.1), batch_sizes=(64,), schedules=('constant',),
                             fractions=(0.3, 0.6), metrics=('min', 'max'))
  objective = tuning.DropNetObjective(create_model('fc', (8, 8), 10), ds.image_shape, data, base, 0.3)
  trial = optuna.trial.FixedTrial({'fraction': 0.5, 'metric': 'max'})
  settings = tuning.suggest(trial, space, base.train, base)
  assert (settings['fraction'], settings['metric']) == (0.5, 'max')
  value, attrs = objective(trial, settings)
  records = objective.run(settings)
  assert [r['fraction_remaining'] for r in records] == [1.0, 0.5, 0.25]  # p = 0.5 down to floor 0.3
  assert records[-1]['metric'] == 'max' and value == records[-1]['val_accuracy'] and attrs['cycles'] == 3

  class PruneAtOnce:
    def __init__(self):
      self.reports = []

    def report(self, value, step):
      self.reports.append((step, value))

    def should_prune(self):
      return True

  t = PruneAtOnce()
  with pytest.raises(optuna.TrialPruned):
    objective(t, settings)
  assert t.reports == [(0, records[0]['val_accuracy'])]  # pruned after the dense cycle


# -- several processes --------------------------------------------------------------------------------

def _tune_cmd(out, *extra):
  return [sys.executable, '-m', 'experiments.tune', f'--out={out}', '--widths=8,8', '--max_epochs=2', '--patience=2',
          '--tune_optimizers=momentum', '--tune_batch_sizes=64', '--tune_schedules=constant', '--batch=2',
          '--startup_trials=2', '--pruner_startup_trials=1', '--heartbeat_interval=1', '--grace_period=3', *extra]


def _check_workers(out, study, n_trials, workers):
  reports = [json.loads(Path(p).read_text()) for p in glob.glob(os.path.join(out, 'worker_*_*.json'))]
  assert len(reports) == workers
  ran = [set(r['trials']) for r in reports]
  assert all(ran) and not set.intersection(*ran)  # both worked; no trial run twice
  finished = {t.number for t in study.get_trials() if t.state in (TrialState.COMPLETE, TrialState.PRUNED)}
  assert set.union(*ran) == finished and sum(map(len, ran)) == len(finished)
  assert n_trials <= len(finished) <= n_trials + 2  # at most one batch of overshoot per extra worker
  assert not [t for t in study.get_trials() if t.state in (TrialState.RUNNING, TrialState.WAITING)]


def test_two_workers_on_sqlite_and_outputs(tmp_path):
  out = tmp_path / 'run'
  # Trials long enough (20 epochs, no pruning) that both workers get some.
  proc = subprocess.run(_tune_cmd(out, '--n_trials=8', '--workers=2', '--max_epochs=20', '--patience=20',
                                  '--pruner=none'), cwd=REPO, capture_output=True, text=True, timeout=240)
  assert proc.returncode == 0, proc.stderr[-3000:]
  study = optuna.load_study(study_name='tune', storage=tuning.sqlite_url(str(out)))
  _check_workers(str(out), study, 8, 2)
  rows = list(csv.DictReader(open(out / 'trials.csv')))
  assert [int(r['number']) for r in rows] == [t.number for t in study.trials]
  assert {r['state'] for r in rows} <= {'COMPLETE', 'PRUNED'} and all(r['epochs'] for r in rows)
  best = json.loads((out / 'best.json').read_text())
  assert best['best_value'] == study.best_value and best['best_params'] == study.best_params
  assert 0 <= best['retrain']['mean_test_accuracy'] <= 1 and best['retrain']['runs'][0]['epochs'] >= 1
  for name in ('optimization_history', 'parallel_coordinate', 'param_importances'):
    assert (out / f'{name}.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def _postgres_bin():
  found = shutil.which('initdb')
  candidates = [os.path.dirname(found)] if found else []
  candidates += sorted(glob.glob('/usr/lib/postgresql/*/bin'), reverse=True)
  for d in candidates:
    if os.path.exists(os.path.join(d, 'initdb')) and os.path.exists(os.path.join(d, 'pg_ctl')):
      return d
  return None


@contextlib.contextmanager
def postgres_server():
  """A throwaway PostgreSQL cluster on 127.0.0.1 and a free port (trust auth, no fsync), removed after:
  yields (url, stop) where stop() shuts the server down at once (a database going away)."""
  pytest.importorskip('psycopg2')
  bindir = _postgres_bin()
  if bindir is None:
    pytest.skip('PostgreSQL server binaries (initdb, pg_ctl) not installed')
  as_user = []
  root = tempfile.mkdtemp(prefix='pgtest', dir='/tmp')
  if os.geteuid() == 0:  # the server refuses to run as root
    try:
      import pwd
      pw = pwd.getpwnam('postgres')
    except KeyError:
      pytest.skip('running as root and no postgres user to run the server as')
    os.chown(root, pw.pw_uid, pw.pw_gid)
    as_user = ['runuser', '-u', 'postgres', '--']
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  data = os.path.join(root, 'data')
  subprocess.run(as_user + [f'{bindir}/initdb', '-D', data, '-A', 'trust', '-U', 'tuner', '--no-sync', '-E', 'UTF8'],
                 check=True, capture_output=True, timeout=60)
  opts = f'-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off -c synchronous_commit=off'
  subprocess.run(as_user + [f'{bindir}/pg_ctl', '-D', data, '-l', os.path.join(root, 'log'), '-w', '-t', '30',
                            '-o', opts, 'start'], check=True, capture_output=True, timeout=60)

  def stop():
    subprocess.run(as_user + [f'{bindir}/pg_ctl', '-D', data, '-m', 'immediate', '-w', 'stop'], capture_output=True,
                   timeout=60)
  try:
    yield f'postgresql+psycopg2://tuner@127.0.0.1:{port}/postgres', stop
  finally:
    stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres():
  with postgres_server() as (url, _):
    yield url


def test_two_processes_on_postgresql(tmp_path, postgres):
  out = tmp_path / 'pg'
  # Started together with no barrier: trials long enough (40 epochs) that both get some.
  cmd = _tune_cmd(out, '--n_trials=8', f'--storage={postgres}', '--retrain_seeds=0', '--max_epochs=40',
                  '--patience=40', '--pruner=none')
  procs = [subprocess.Popen(cmd + [f'--worker_id={i}'] + (['--worker_only'] if i else []), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  try:
    outs = [p.communicate(timeout=240)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert all(p.returncode == 0 for p in procs), outs[0][-2000:] + outs[1][-2000:]
  study = optuna.load_study(study_name='tune', storage=postgres)
  _check_workers(str(out), study, 8, 2)


def test_killed_worker_resumes(tmp_path):
  """SIGKILL mid-study, then the same command again: the killed trial is failed and retried with the
  same parameters, and the study reaches its target."""
  out = tmp_path / 'kill'
  # A long grace period: the rerun must see that the process is gone rather than wait for the heartbeat.
  cmd = _tune_cmd(out, '--n_trials=2', '--batch=1', '--max_epochs=100', '--patience=100', '--pruner=none',
                  '--retrain_seeds=0', '--grace_period=120')
  log = tmp_path / 'first_run.log'  # kept: if the first run ends early, its output says why
  with open(log, 'w') as log_file:
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
  url = tuning.sqlite_url(str(out))
  db = str(out / 'study.db')
  query = ('SELECT t.number FROM trials t WHERE t.state = "RUNNING" AND EXISTS '
           '(SELECT 1 FROM trial_intermediate_values v WHERE v.trial_id = t.trial_id)')
  try:
    deadline = time.time() + 120
    running = []
    # Polled with plain SQLite reads (a few ms; optuna.load_study is far slower under load, and a trial
    # of 100 digits epochs lasts only seconds).
    while time.time() < deadline and not running and proc.poll() is None:
      time.sleep(0.02)
      try:
        with sqlite3.connect(f'file:{db}?mode=ro', uri=True, timeout=1) as con:
          running = [row[0] for row in con.execute(query)]
      except sqlite3.Error:  # the study is not created yet, or a writer holds the lock
        pass
    assert running, f'no running trial seen (first run exit code {proc.poll()}):\n{log.read_text()[-3000:]}'
  finally:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
  rerun = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  # Failed at once (its process is gone), not after the heartbeat's grace period.
  assert f'trial {running[0]} belonged to a worker process that no longer exists' in rerun.stdout
  trials = optuna.load_study(study_name='tune', storage=url).get_trials()
  killed = [t for t in trials if t.number == running[0]][0]
  assert killed.state == TrialState.FAIL
  assert [t.state for t in trials if t.system_attrs.get('failed_trial') == killed.number] == [TrialState.COMPLETE]
  assert sum(t.state == TrialState.COMPLETE for t in trials) == 2
