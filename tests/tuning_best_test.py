"""Tests of the tuned best (dropnet_jax.tuning.best) and of the value a pruned trial reports.

The retrain against an independent fresh training (a Trainer built from the best trial's completed
settings, max_epochs = retrain_epochs, the trials' θ0 and shuffle order), the saved record read back
through runs.saved_params like any run's; the importances JSON against optuna's own function; and the
log line against trials.csv for a pruned trial whose last reported accuracy is below its best (the
log used to print the best, trials.csv Optuna's value, the last)."""

from __future__ import annotations

import dataclasses
import json
import re

import jax
import numpy as np
import pytest

optuna = pytest.importorskip('optuna')
from optuna.trial import TrialState  # noqa: E402

from dropnet_jax import tuning  # noqa: E402
from dropnet_jax.config import DataConfig, DropNetConfig, ModelConfig, TrainConfig  # noqa: E402
from dropnet_jax.loop.dropnet import SeedKeys  # noqa: E402
from dropnet_jax.models import init_params  # noqa: E402
from dropnet_jax.models.layers import full_masks  # noqa: E402
from dropnet_jax.runs import reporting, saved_params  # noqa: E402
from dropnet_jax.training.trainer import DeviceData, Trainer, fit, steps_per_epoch  # noqa: E402
from dropnet_jax.tuning import best as best_lib, experiment  # noqa: E402
from dropnet_jax.tuning.config import TuneConfig  # noqa: E402
from dropnet_jax.tuning.runner import LaneResult  # noqa: E402

SPACE = tuning.SearchSpace(optimizers=('momentum',), batch_sizes=(64,), schedules=('constant',), lr=(0.01, 0.3),
                           weight_decay=(1e-5, 1e-3))


@pytest.fixture(scope='module')
def tuned(tmp_path_factory):
  """A 4-trial study (2 epochs each) on digits whose best is retrained for 5 epochs from trial seed 3."""
  out = tmp_path_factory.mktemp('tune') / 'run'
  config = TuneConfig(model=ModelConfig(widths=(8, 8)), data=DataConfig(dataset='digits'),
                      dropnet=DropNetConfig(train=TrainConfig(max_epochs=2, patience=10)), space=SPACE,
                      n_trials=4, startup_trials=2, pruner='none', trial_seed=3, retrain_seeds=1, retrain_epochs=5)
  setup = experiment.prepare(config, str(out))
  lines = []
  summary = experiment.run(setup, log=lines.append)
  return out, setup, summary


def test_retrain_honours_retrain_epochs_and_equals_a_fresh_training(tuned):
  out, setup, summary = tuned
  retrain = summary['retrain']
  assert retrain['epochs'] == 5 and retrain['seeds'] == [3]
  study = optuna.load_study(study_name='tune', storage=tuning.sqlite_url(str(out)))
  assert all(len(t.intermediate_values) == 2 for t in study.trials)  # the trials kept their 2 epochs
  [record] = reporting.read_jsonl(out / 'results.jsonl')
  assert record['epochs_trained'] == 5 and record['best_trial'] == study.best_trial.number
  assert record['test_accuracy'] == retrain['runs'][0]['test_accuracy'] == retrain['mean_test_accuracy']

  # Independently: the best trial's completed settings, trained fresh for 5 epochs from the trials' θ0.
  settings = tuning.complete(study.best_params, SPACE, setup.config.train)
  config = dataclasses.replace(tuning.train_config(settings, setup.config.train), max_epochs=5)
  model, ds = setup.model, setup.dataset
  data = DeviceData.from_dataset(ds)
  trainer = Trainer(model, config, steps_per_epoch=steps_per_epoch(len(ds.train_labels), config.batch_size))
  keys = SeedKeys.for_seed(3)
  masks = full_masks(model)
  state = fit(trainer.epoch_step, trainer.init_fit(init_params(model, keys.init, ds.image_shape), masks,
                                                   keys.shuffle_key(0)), data)
  assert int(state.epoch) == 5
  want = trainer.evaluate(state.best_params, masks, data.test_images, data.test_labels)

  # The saved record is read back as any run's (runs.saved_params) and gives the same network.
  loaded_model, theta, loaded_masks, loaded_record = saved_params.load_network(str(out), 3, best_lib.METRIC, 0)
  assert loaded_record == record and type(loaded_model) is type(model)
  for a, b in zip(jax.tree.leaves(theta), jax.tree.leaves(state.best_params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  got = trainer.evaluate(theta, loaded_masks, data.test_images, data.test_labels)
  assert float(got.accuracy) == pytest.approx(float(want.accuracy)) == pytest.approx(record['test_accuracy'])
  assert float(got.loss) == pytest.approx(record['test_loss'], rel=1e-5)


def test_importances_json_is_optunas_and_repeats(tuned):
  out, _, _ = tuned
  saved = json.loads((out / 'param_importances.json').read_text())
  study = optuna.load_study(study_name='tune', storage=tuning.sqlite_url(str(out)))
  want = optuna.importance.get_param_importances(
      study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
  assert saved['evaluator'] == 'fanova' and saved['seed'] == 0
  assert list(saved['importances']) == list(want) and set(want) == {'lr', 'momentum', 'weight_decay'}
  assert saved['importances'] == pytest.approx(dict(want))
  assert best_lib.importances(study) == saved  # deterministic
  assert (out / 'param_importances.png').exists()


def test_importances_optuna_cannot_compute_say_why():
  optuna.logging.set_verbosity(optuna.logging.WARNING)
  study = optuna.create_study(direction='maximize')
  study.optimize(lambda t: 1.0 + 0 * t.suggest_float('x', 0, 1), n_trials=3)  # every value equal: no variance
  saved = best_lib.importances(study)
  assert saved['importances'] is None and 'variance' in saved['reason']


class _ScriptedRunner:
  """LaneRunner's interface with scripted validation accuracies: epoch 3 (0.6) is below epoch 2 (0.8)."""
  ACCURACIES = (0.5, 0.8, 0.6, 0.7)

  def run(self, template, hypers, lane_count=None, on_epoch=None, dropout=None):
    results = []
    for lane in range(len(hypers)):
      r = LaneResult([], 0, 0, False, False)
      for epoch, acc in enumerate(self.ACCURACIES, start=1):
        r.val_accuracies.append(acc)
        r.epochs = epoch
        if on_epoch(lane, epoch, acc):
          r.pruned = True
          break
      results.append(r)
    return results


class _PruneAtEpoch3(optuna.pruners.BasePruner):
  def prune(self, study, trial) -> bool:
    return trial.last_step == 3


def test_a_pruned_trial_reports_one_value_in_the_log_and_trials_csv(tmp_path):
  storage = tuning.make_storage(tuning.sqlite_url(str(tmp_path)))
  study = tuning.open_study(storage, 's', {}, pruner=_PruneAtEpoch3())
  lines = []
  tuning.run_worker(study, SPACE, TrainConfig(max_epochs=4), 2, runner=_ScriptedRunner(), log=lines.append)
  rows = {r['number']: r for r in experiment.trials_rows(study)}
  assert [r['state'] for r in rows.values()] == ['PRUNED', 'PRUNED']
  for line in lines:
    number, value, best = re.match(r'trial +(\d+) pruned epochs +3 value ([\d.]+) best_val_acc ([\d.]+)', line).groups()
    row = rows[int(number)]
    # Optuna's value of a pruned trial is its last report (0.6), not its best (0.8): the log says the same.
    assert float(value) == pytest.approx(row['value']) == pytest.approx(0.6)
    assert float(best) == pytest.approx(row['best_val_accuracy']) == pytest.approx(0.8)
  assert all(t.state == TrialState.PRUNED and t.value == pytest.approx(0.6) for t in study.trials)


def test_dropnet_objective_retrain_is_saved_as_a_dropnet_run(tmp_path):
  space = tuning.SearchSpace(optimizers=('sgd',), lr=(0.1, 0.1), batch_sizes=(64,), schedules=('constant',),
                             fractions=(0.5, 0.5), metrics=('max',))
  config = TuneConfig(model=ModelConfig(widths=(8, 8)), data=DataConfig(dataset='digits'), objective='dropnet',
                      units_remaining=0.3, dropnet=DropNetConfig(train=TrainConfig(max_epochs=1, patience=5)),
                      space=space, n_trials=1, pruner='none', retrain_seeds=1, retrain_epochs=3)
  setup = experiment.prepare(config, str(tmp_path / 'run'))
  summary = experiment.run(setup, log=lambda line: None)
  records = reporting.read_jsonl(tmp_path / 'run' / 'results.jsonl')
  assert [r['fraction_remaining'] for r in records] == [1.0, 0.5, 0.25]  # p = 0.5 down to units_remaining 0.3
  assert all(r['metric'] == 'max' and r['epochs_trained'] == 3 for r in records)  # retrain_epochs per cycle
  assert summary['retrain']['runs'][0]['test_accuracy'] == records[-1]['test_accuracy']
  model, theta, masks, record = saved_params.load_network(str(tmp_path / 'run'), 0, 'max', 2)
  ds = setup.dataset
  trainer = Trainer(model, config.train, steps_per_epoch=steps_per_epoch(len(ds.train_labels), 64))
  got = trainer.evaluate(theta, masks, ds.test_images, ds.test_labels)
  assert float(got.accuracy) == pytest.approx(record['test_accuracy'])


def test_retrain_epochs_must_be_positive():
  with pytest.raises(ValueError, match='retrain_epochs must be a positive integer, got 0'):
    TuneConfig(retrain_epochs=0).validate()
  assert best_lib.retrain_epochs(TuneConfig()) == 25 and best_lib.retrain_epochs(TuneConfig(retrain_epochs=200)) == 200
  assert best_lib.retrain_seeds(TuneConfig(trial_seed=3, retrain_seeds=2)) == [3, 4]
