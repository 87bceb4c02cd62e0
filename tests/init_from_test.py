"""--init_from (runs.init_from) and saved networks (runs.saved_params.load_saved, runs.sparse_params) on digits:
a loaded network is the dense cycle, evaluated; magnitude pruning from it hits its targets exactly; every saved
weight-pruned network is dense θ with pruned weights 0, its mask and a sparse form that rebuilds it exactly."""

import dataclasses
import json
import os
import re

import jax
import numpy as np
import pytest

from dropnet_jax import theta as theta_lib
from dropnet_jax.compaction import compact
from dropnet_jax.compaction.export import correct_count, predictions
from dropnet_jax.config import DataConfig, DropNetConfig, ExperimentConfig, InitFromConfig, ModelConfig, TrainConfig
from dropnet_jax.input_pipeline import load_dataset
from dropnet_jax.loop import magnitude
from dropnet_jax.loop.dropnet import run_experiment
from dropnet_jax.loop.driver import RunIO
from dropnet_jax.models import create_model
from dropnet_jax.models.compact import spec_of
from dropnet_jax.pruning.weight_masks import named_leaves
from dropnet_jax.runs import experiment, reporting, saved_params, sparse_params
from dropnet_jax.runs import magnitude as magnitude_run
from dropnet_jax.training.trainer import DeviceData

WIDTHS = (20, 10)  # fc on digits: 1580 prunable weights, so 50/75/90 % are whole numbers of weights
TRAIN = TrainConfig(max_epochs=3, patience=2)


@pytest.fixture(scope='module')
def digits():
  ds = load_dataset('digits')
  return ds, DeviceData.from_dataset(ds), create_model('fc', WIDTHS, ds.num_classes)


class Captured:
  """A params store in memory: θ (and weight mask) of every saved cycle, by (seed, metric, cycle)."""

  def __init__(self):
    self.saved = {}

  def saved_cycle(self, trial, theta, weight_mask=None):
    r = trial.records[-1]
    self.saved[(r['seed'], r['metric'], r['cycle'])] = (theta, weight_mask)


def _strip(records, *names):
  return [{k: v for k, v in r.items() if k not in ('seconds', *names)} for r in records]


@pytest.fixture(scope='module')
def pretrained(digits):
  """The dense network of a short DropNet run (min, 2 cycles), with its records and saved θs."""
  ds, data, model = digits
  config = DropNetConfig(metrics=('min',), floor=0.7, train=TRAIN)
  store = Captured()
  records = run_experiment(model, ds.image_shape, data, [0], config, io=RunIO(params_store=store, log=lambda s: None))
  return records, store.saved[(0, 'min', 0)][0], config


def test_dropnet_from_its_own_dense_network_reproduces_the_run(digits, pretrained):
  ds, data, model = digits
  records, dense, config = pretrained
  again = run_experiment(model, ds.image_shape, data, [0], config, io=RunIO(log=lambda s: None), start_theta=dense)
  assert len(again) == len(records) >= 2
  assert again[0]['epochs_trained'] == 0 and again[0]['early_stop_epoch'] == 0  # evaluated, not trained
  for key in ('train_accuracy', 'val_accuracy', 'test_accuracy', 'test_loss', 'mask'):
    assert again[0][key] == records[0][key], key
  # Later cycles restart from the seed's θ0 with the loaded network's mask: the same records.
  assert _strip(again[1:]) == _strip(records[1:])


@pytest.mark.parametrize('schedule', ['barrier', 'continuous'])
def test_batched_lanes_evaluate_the_loaded_network_too(digits, pretrained, schedule):
  ds, data, model = digits
  records, dense, config = pretrained
  again = run_experiment(model, ds.image_shape, data, [0], config, io=RunIO(log=lambda s: None), start_theta=dense,
                         batch_trials=True, lane_schedule=schedule)
  assert again[0]['epochs_trained'] == 0 and again[0]['test_accuracy'] == records[0]['test_accuracy']
  assert [r['mask'] for r in again] == [r['mask'] for r in records]  # lanes: the same masks, floats to rounding
  np.testing.assert_allclose([r['test_accuracy'] for r in again], [r['test_accuracy'] for r in records], atol=0.01)


@pytest.fixture(scope='module')
def pruned(digits, pretrained, tmp_path_factory):
  """One-shot and iterative magnitude pruning of the loaded network to 50/75/90 %, saved into a run layout."""
  ds, data, model = digits
  _, dense, _ = pretrained
  config = magnitude.MagnitudeConfig(methods=('oneshot', 'iterative'), sparsities=(0.5, 0.75, 0.9),
                                     finetune_epochs=1, round_epochs=1, final_epochs=1, iterative_fraction=0.5,
                                     train=TRAIN)
  out = str(tmp_path_factory.mktemp('pruned'))
  store = saved_params.ParamsStore(os.path.join(out, 'params'), 'all',
                                   {**spec_of(model), 'image_shape': list(ds.image_shape)})
  records = magnitude.run(model, ds.image_shape, data, [0], config, io=RunIO(params_store=store, log=lambda s: None),
                          start_theta=dense)
  reporting.write_jsonl(os.path.join(out, 'results.jsonl'), records)
  return out, records, dense


def test_the_dense_record_is_the_loaded_network_evaluated(digits, pruned):
  ds, _, model = digits
  _, records, dense = pruned
  for r in (r for r in records if r['cycle'] == 0):
    assert r['epochs_trained'] == 0 and r['last_test_accuracy'] == r['test_accuracy']
    for split in ('train', 'val', 'test'):
      images, labels = getattr(ds, f'{split}_images'), getattr(ds, f'{split}_labels')
      assert round(r[f'{split}_accuracy'] * len(labels)) == correct_count(predictions(model, dense, images), labels)


def test_targets_are_hit_exactly_and_saved_networks_are_zeros_plus_mask(pruned):
  out, records, _ = pruned
  finals = [r for r in records if r['stop_reason'] == 'target']
  assert sorted((r['method'], r['target_sparsity']) for r in finals) == sorted(
      (m, s) for m in ('oneshot', 'iterative') for s in (0.5, 0.75, 0.9))
  for r in finals:
    model, theta, wmask, saved = saved_params.load_saved(out, f'seed0/{r["metric"]}/cycle{r["cycle"]}')
    assert saved['test_accuracy'] == r['test_accuracy'] and saved['saved_files']['sparse_bytes'] > 0
    params, masks = named_leaves(theta_lib.params(theta)), named_leaves(wmask)
    total = sum(m.size for m in masks.values())
    zeros = sum(int(np.sum(np.asarray(params[n]) == 0)) for n in masks)
    pruned_count = sum(int(np.sum(m == 0)) for m in masks.values())
    assert pruned_count == round(r['target_sparsity'] * total)  # exactly 50/75/90 % of the prunable weights
    assert zeros == pruned_count  # pruned weights are exactly 0, and no kept weight is
    for n, m in masks.items():
      assert np.all(np.asarray(params[n])[m == 0] == 0)
    # The sparse form rebuilds the dense θ and the mask bit for bit.
    path = os.path.join(out, 'params', 'seed0', r['metric'], f'cycle{r["cycle"]}')
    sparse_theta, sparse_mask = sparse_params.read_sparse(path)
    jax.tree.map(np.testing.assert_array_equal, theta_lib.variables(sparse_theta), theta_lib.variables(theta))
    jax.tree.map(np.testing.assert_array_equal, sparse_mask, wmask)
    sizes = json.load(open(path + sparse_params.SIZES_SUFFIX))
    assert sizes['sparse_bytes'] == os.path.getsize(path + sparse_params.SPARSE_SUFFIX)
    if r['target_sparsity'] == 0.9:
      assert sizes['sparse_bytes'] < sizes['raw_bytes']  # (tiny arrays: the zip's per-array headers weigh)


def test_load_saved_selectors(pruned):
  out, records, dense = pruned
  model, theta, wmask, record = saved_params.load_saved(out)  # seed 0's dense network
  assert record['cycle'] == 0 and all(np.all(np.asarray(m) == 1) for m in jax.tree.leaves(wmask))
  jax.tree.map(np.testing.assert_array_equal, theta_lib.variables(theta), theta_lib.variables(dense))
  sparse_theta, sparse_mask = sparse_params.read_sparse(os.path.join(out, 'params', 'seed0', 'dense'))  # no indices
  jax.tree.map(np.testing.assert_array_equal, theta_lib.variables(sparse_theta), theta_lib.variables(dense))
  jax.tree.map(np.testing.assert_array_equal, sparse_mask, wmask)
  last = max(r['cycle'] for r in records if r['metric'] == 'iterative s=0.9')
  assert saved_params.load_saved(out, 'seed0/iterative s=0.9')[3]['cycle'] == last
  with pytest.raises(FileNotFoundError, match='saved: seed0/dense'):
    saved_params.load_saved(out, 'seed0/min/cycle1')
  with pytest.raises(ValueError, match='record selector'):
    saved_params.load_saved(out, 'dense')


def _config(init_from, widths=WIDTHS, **changes):
  return magnitude_run.MagnitudeRunConfig(model=ModelConfig(name='fc', widths=widths),
                                          start=InitFromConfig(init_from), **changes)


def test_every_source_kind_loads_the_same_network(digits, pruned, tmp_path):
  torch = pytest.importorskip('torch')
  from tests.torch_reference.compact import to_torch
  ds, _, model = digits
  out, _, dense = pruned
  compact.save(str(tmp_path / 'export'), model, dense, {}, ds.image_shape)
  torch.save(to_torch(model, dense, ds.image_shape).state_dict(), str(tmp_path / 'twin.pth'))
  for source in (out, f'{out}:seed0/dense', str(tmp_path / 'export'), str(tmp_path / 'twin.pth')):
    setup = magnitude_run.prepare(_config(source), str(tmp_path / 'out'))
    jax.tree.map(np.testing.assert_array_equal, theta_lib.variables(setup.start_theta), theta_lib.variables(dense))
  iterative = f'{out}:seed0/iterative s=0.9'  # a weight-pruned record loads as its dense θ (zeros included)
  loaded = magnitude_run.prepare(_config(iterative), str(tmp_path / 'out')).start_theta
  zeros = sum(int(np.sum(np.asarray(x) == 0)) for x in jax.tree.leaves(loaded))
  assert zeros >= 0.9 * 1580


def test_refusals_are_one_line_before_any_work(pretrained, pruned, tmp_path):
  out, _, _ = pruned
  bad = [(_config(out, widths=(20, 12)), re.escape('does not fit the fc (widths [20, 12])')),
         (_config(f'{out}:seed0/nothing/cycle3'), 'nothing saved for seed0/nothing/cycle3'),
         (_config(str(tmp_path / 'missing.pth')), 'is not a file'),
         (_config(str(tmp_path / 'nowhere')), 'does not exist'),
         (dataclasses.replace(_config(out), model=ModelConfig(name='conv', widths=(4, 4))), 'holds a fc network')]
  for config, message in bad:
    with pytest.raises(ValueError, match=message) as e:
      magnitude_run.prepare(config, str(tmp_path / 'out'))
    assert '\n' not in str(e.value)
  assert not os.path.exists(tmp_path / 'out')
  dropnet = ExperimentConfig(model=ModelConfig(name='fc', widths=WIDTHS), data=DataConfig(), start=InitFromConfig(out),
                             dropnet=DropNetConfig(score_from='epoch'))
  with pytest.raises(ValueError, match='score_from=data'):
    experiment.prepare(dropnet, str(tmp_path / 'out'))


def test_a_compact_resnet_export_of_the_dense_network_loads_as_the_resnet(tmp_path):
  from dropnet_jax.models import full_masks, init_params
  from dropnet_jax.runs import init_from
  from tests.torch_reference.models import resnet18_widths
  model = create_model('resnet18_bn', resnet18_widths((2, 2, 3, 3)), 10)
  theta = init_params(model, jax.random.key(0), (8, 8, 3))
  small, small_theta = compact.compact(model, theta, full_masks(model), image_shape=(8, 8, 3))
  assert spec_of(small)['model'] == 'resnet18_bn_compact'
  compact.save(str(tmp_path / 'export'), small, small_theta, {}, (8, 8, 3))
  loaded, _ = init_from.load(str(tmp_path / 'export'), model, (8, 8, 3))
  jax.tree.map(np.testing.assert_array_equal, theta_lib.variables(loaded), theta_lib.variables(theta))
  with pytest.raises(ValueError, match='resnet18_bn'):
    init_from.load(str(tmp_path / 'export'), create_model('resnet18', resnet18_widths((2, 2, 3, 3)), 10), (8, 8, 3))
