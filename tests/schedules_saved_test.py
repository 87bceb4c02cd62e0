"""experiments.schedules saves each schedule's network (--save_params) in the layout of every run, so that
`saved_params.load_saved` reads it back, `experiments.evaluate` scores it again exactly, and `--init_from`
starts a magnitude run from it; and the one splitting of `RUN[:SELECTOR]` (`saved_params.split_record_path`)
shared by --networks and --init_from."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from dropnet_jax import theta as theta_lib
from dropnet_jax.config import InitFromConfig, ModelConfig, OutputConfig, TrainConfig
from dropnet_jax.loop.magnitude import MagnitudeConfig
from dropnet_jax.models.layers import full_masks
from dropnet_jax.runs import evaluate, saved_params, schedules
from dropnet_jax.runs import magnitude as magnitude_run
from dropnet_jax.training.optim import OptimizerConfig
from dropnet_jax.training.trainer import DeviceData, Trainer, steps_per_epoch

WIDTHS = (8, 6)
CONFIG = schedules.SchedulesConfig(
    model=ModelConfig(name='fc', widths=WIDTHS), schedules=('constant', 'cosine'),
    train=TrainConfig(batch_size=128, max_epochs=2, optim=OptimizerConfig(optimizer='momentum', lr=0.05)))


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('schedules_saved'))
  setup = schedules.prepare(CONFIG, out)
  return out, setup, schedules.run(setup, log=lambda line: None)


def test_each_schedule_is_saved_and_reloads_with_its_accuracies(run):
  out, setup, results = run
  assert saved_params.saved_selectors(out) == ['seed0/constant/cycle1', 'seed0/cosine/cycle1']
  ds = setup.dataset
  data = DeviceData.from_dataset(ds)
  trainer = Trainer(setup.model, CONFIG.train, steps_per_epoch=steps_per_epoch(len(ds.train_labels), 128))
  tested = json.load(open(os.path.join(out, schedules.RESULTS)))
  for name in CONFIG.schedules:
    model, theta, weight_mask, record = saved_params.load_saved(out, f'seed0/{name}')  # the newest saved: cycle 1
    assert weight_mask is None and (record['metric'], record['cycle'], record['seed']) == (name, 1, 0)
    assert [int(w) for w in model.widths] == list(WIDTHS)
    got = trainer.evaluate(theta, full_masks(model), data.test_images, data.test_labels)
    assert float(got.accuracy) == tested[name]['best']['test'] == record['test_accuracy']  # exactly
    assert float(got.loss) == record['test_loss']
  # The two schedules' networks differ (each is its own record, not a shared dense network).
  a, b = (theta_lib.params(saved_params.load_saved(out, f'seed0/{n}')[1]) for n in CONFIG.schedules)
  assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_evaluate_every_saved_schedule_reproduces_its_test_accuracy(run):
  out, _, results = run
  rows = evaluate.run(evaluate.prepare(evaluate.EvaluateConfig(networks=(f'{out}:*',))))
  assert [row['metric'] for row in rows] == ['constant', 'cosine']
  for row in rows:
    assert row['reproduced'], row['differences']
    assert row['test_accuracy'] == results[row['metric']]['best']['test']
    assert row['network'] == f'{out}:seed0/{row["metric"]}/cycle1'


def test_a_rerun_skips_saved_schedules_and_retrains_unsaved_ones_identically(run, tmp_path):
  out, _, results = run
  logs = []
  schedules.run(schedules.prepare(CONFIG, out), log=logs.append)
  assert logs == ['constant: already done', 'cosine: already done']
  # --save_params=none saves nothing; a later run that saves trains the schedule again, to the same figures.
  bare = str(tmp_path / 'bare')
  none = dataclasses.replace(CONFIG, schedules=('cosine',), save_params='none')
  schedules.run(schedules.prepare(none, bare), log=lambda line: None)
  assert not os.path.exists(os.path.join(bare, 'params')) and not os.path.exists(os.path.join(bare, 'results.jsonl'))
  with pytest.raises(ValueError, match='save_params=none'):
    evaluate.prepare(evaluate.EvaluateConfig(networks=(f'{bare}:*',)))
  logs = []
  again = schedules.run(schedules.prepare(dataclasses.replace(none, save_params='all'), bare), log=logs.append)
  assert logs[0] == 'cosine: done before without saving its network: trained again to save it'
  assert again['cosine']['best'] == results['cosine']['best']
  assert saved_params.saved_selectors(bare) == ['seed0/cosine/cycle1']


def test_magnitude_starts_from_a_saved_schedule(run, tmp_path):
  out, _, results = run
  config = magnitude_run.MagnitudeRunConfig(
      model=ModelConfig(name='fc', widths=WIDTHS), start=InitFromConfig(f'{out}:seed0/cosine'),
      magnitude=MagnitudeConfig(methods=('oneshot',), sparsities=(0.5,), finetune_epochs=1, train=CONFIG.train),
      output=OutputConfig(save_params='none', curves=False))
  setup = magnitude_run.prepare(config, str(tmp_path / 'magnitude'))
  _, saved, _, _ = saved_params.load_saved(out, 'seed0/cosine')
  jax.tree.map(np.testing.assert_array_equal, theta_lib.variables(setup.start_theta), theta_lib.variables(saved))
  records, _ = magnitude_run.run(setup)
  dense = [r for r in records if r['cycle'] == 0][0]
  assert dense['epochs_trained'] == 0 and dense['test_accuracy'] == results['cosine']['best']['test']


@pytest.mark.parametrize('value, every, expected', [
    ('runs/a', False, ('runs/a', None)),
    ('runs/a:', False, ('runs/a', None)),
    ('runs/a:seed0/cosine', False, ('runs/a', 'seed0/cosine')),
    ('runs/a:seed2/cosine/cycle1', False, ('runs/a', 'seed2/cosine/cycle1')),
    ('runs/mag:seed0/oneshot s=0.9', False, ('runs/mag', 'seed0/oneshot s=0.9')),
    ('runs/a:*', True, ('runs/a', '*')),
])
def test_split_record_path(value, every, expected):
  assert saved_params.split_record_path(value, '--x', every=every) == expected


def test_split_record_path_refusals_name_the_flag(tmp_path):
  odd = tmp_path / 'run:2'  # an existing directory is taken whole
  odd.mkdir()
  assert saved_params.split_record_path(str(odd), '--init_from') == (str(odd), None)
  with pytest.raises(ValueError, match=r"^--init_from: 'runs/a:\*': record selector"):
    saved_params.split_record_path('runs/a:*', '--init_from')  # '*' only where the flag takes several
  with pytest.raises(ValueError, match=r"^networks: 'runs/a:cosine': record selector"):
    saved_params.split_record_path('runs/a:cosine', 'networks', every=True)
  with pytest.raises(ValueError, match='^networks: an empty entry'):
    saved_params.split_record_path(' ', 'networks')
