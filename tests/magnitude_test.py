"""Weight pruning in the one loop: one-shot, iterative fine-tuning and lottery tickets on digits."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dropnet_jax.loop import magnitude
from dropnet_jax.loop.driver import RunIO

from dropnet_jax.pruning import weight_masks
from dropnet_jax.runs.checkpoint import Checkpointer
from dropnet_jax.config import TrainConfig
from dropnet_jax.loop.dropnet import SeedKeys
from dropnet_jax.input_pipeline import load_dataset
from dropnet_jax.training.lanes import Lanes
from dropnet_jax.models import create_model, init_params
from dropnet_jax.training.optim import OptimizerConfig
from dropnet_jax.training.trainer import DeviceData, Trainer, fit

CONFIG = magnitude.MagnitudeConfig(sparsities=(0.5, 0.75), finetune_epochs=2, round_epochs=1, final_epochs=2,
                                   iterative_fraction=0.3, train=TrainConfig(max_epochs=3, patience=2))


@pytest.fixture(scope='module')
def digits():
  ds = load_dataset('digits')
  return ds, DeviceData.from_dataset(ds), create_model('fc', (16, 12), ds.num_classes)


@pytest.fixture(scope='module')
def records(digits):
  ds, data, model = digits
  return magnitude.run(model, ds.image_shape, data, [0, 1], CONFIG, io=RunIO(log=lambda s: None))


def test_pruned_weights_stay_zero_and_training_moves_the_rest(digits):
  ds, data, model = digits
  config = TrainConfig(max_epochs=3, patience=3, optim=OptimizerConfig(optimizer='momentum', weight_decay=5e-4))
  trainer = Trainer(model, config, weight_masks=True)
  theta0 = init_params(model, jax.random.key(0), ds.image_shape)
  wmask = weight_masks.init_weight_mask(theta0)
  wmask = jax.tree.map(lambda m: m * (jax.random.uniform(jax.random.key(1), m.shape) > 0.6), wmask)
  state = fit(trainer.epoch_step, trainer.init_fit(theta0, wmask, jax.random.key(2)), data)
  for name, m in weight_masks.named_leaves(wmask).items():
    trained = np.asarray(weight_masks.named_leaves(state.params)[name])
    start = np.asarray(weight_masks.named_leaves(theta0)[name])
    assert np.all(trained[np.asarray(m) == 0] == 0)  # exactly zero after momentum and weight decay
    assert np.mean(trained[np.asarray(m) > 0] != start[np.asarray(m) > 0]) > 0.9


def test_every_method_reaches_its_targets(records):
  by_trial = {}
  for r in records:
    by_trial.setdefault((r['seed'], r['metric']), []).append(r)
  assert len(by_trial) == 2 * (2 + 2 + 1 + 1)
  for (seed, label), rs in by_trial.items():
    assert [r['cycle'] for r in rs] == list(range(len(rs)))
    assert all(a['sparsity'] <= b['sparsity'] + 1e-12 for a, b in zip(rs, rs[1:]))  # masks only shrink
    assert rs[-1]['stop_reason'] == 'target'
    target = rs[-1]['target_sparsity']
    assert abs(rs[-1]['sparsity'] - target) < 1e-3
  oneshot = by_trial[(0, 'oneshot s=0.75')]
  assert [r['phase'] for r in oneshot] == ['dense', 'finetune'] and oneshot[1]['epochs_trained'] <= 2
  iterative = by_trial[(0, 'iterative s=0.75')]
  assert iterative[-1]['phase'] == 'final' and iterative[-2]['sparsity'] == iterative[-1]['sparsity']
  assert all(r['epochs_trained'] <= 1 for r in iterative[1:-1])  # one epoch per round
  lottery = by_trial[(0, 'lottery')]
  assert {0.5, 0.75} <= {round(r['sparsity'], 3) for r in lottery}  # every target hit exactly


def test_lottery_reinit_trains_the_lottery_masks(records):
  """The control follows its lottery sibling's masks cycle by cycle (same fingerprints), but trains
  from fresh initialisations, so its accuracies differ."""
  for seed in (0, 1):
    lottery = [r for r in records if r['seed'] == seed and r['metric'] == 'lottery']
    reinit = [r for r in records if r['seed'] == seed and r['metric'] == 'lottery_reinit']
    assert [r['mask_fingerprint'] for r in reinit] == [r['mask_fingerprint'] for r in lottery]
    assert any(a['test_loss'] != b['test_loss'] for a, b in zip(lottery[1:], reinit[1:]))


def test_lottery_rewinds_to_theta0_bit_for_bit(digits, monkeypatch):
  ds, data, model = digits
  config = magnitude.MagnitudeConfig(methods=('lottery',), sparsities=(0.5,), train=TrainConfig(max_epochs=1))
  starts = []
  original_init = Lanes.__init__

  def recording_init(self, *args, **kwargs):  # every cycle's start θ, as the lanes receive it
    original_init(self, *args, **kwargs)
    init_fit = self.init_fit
    self.init_fit = lambda params, masks, keys: (starts.append(params), init_fit(params, masks, keys))[1]

  monkeypatch.setattr(Lanes, '__init__', recording_init)
  magnitude.run(model, ds.image_shape, data, [3], config, io=RunIO(log=lambda s: None))
  theta0 = init_params(model, SeedKeys.for_seed(3).init, ds.image_shape)
  assert len(starts) >= 3  # the dense cycle and at least two rewound ones (lanes: θ stacked)
  for s in starts:
    chex.assert_trees_all_equal(jax.tree.map(lambda x: x[0], s), theta0)


def test_sparsity_accounting_follows_torchs_rounding(records):
  lottery = [r for r in records if r['seed'] == 0 and r['metric'] == 'lottery']
  size = 64 * 16 + 16 * 12 + 12 * 10  # the three kernels of Model A (16, 12) on 8x8 digits
  kept = size
  for r in lottery[1:]:
    assert round(r['fraction_remaining'] * size) == r['params'] - (16 + 12 + 10)  # biases are not pruned
  # The first round prunes round(0.2 * kept) of the kept weights, torch's count.
  assert round(lottery[1]['fraction_remaining'] * size) == kept - round(0.2 * kept)


def test_a_killed_run_resumes_to_the_same_records(digits, tmp_path, records):
  ds, data, model = digits
  calls = []

  def crash(rs):
    calls.append(1)
    if len(calls) == 3:
      raise RuntimeError('crash')

  with pytest.raises(RuntimeError):
    magnitude.run(model, ds.image_shape, data, [0, 1], CONFIG,
                  io=RunIO(Checkpointer(str(tmp_path)), on_record=crash, log=lambda s: None))
  resumed = magnitude.run(model, ds.image_shape, data, [0, 1], CONFIG,
                          io=RunIO(Checkpointer(str(tmp_path)), log=lambda s: None))
  strip = lambda rs: [{k: v for k, v in r.items() if k != 'seconds'} for r in rs]
  assert strip(resumed) == strip(records)


def test_table_and_bad_config():
  table = magnitude.sparsity_table([
      {'seed': 0, 'cycle': 0, 'test_accuracy': 0.9, 'method': 'dense', 'sparsity': 0.0, 'stop_reason': None},
      {'seed': 0, 'cycle': 1, 'test_accuracy': 0.88, 'method': 'oneshot', 'sparsity': 0.5, 'stop_reason': 'target'},
  ], [0.5], ['oneshot'])
  assert '| oneshot | 2.00 ± n/a (n=1) |' in table
  two = magnitude.sparsity_table([
      {'seed': 0, 'cycle': 0, 'test_accuracy': 0.9, 'method': 'dense', 'sparsity': 0.0, 'stop_reason': None},
      {'seed': 0, 'cycle': 1, 'test_accuracy': 0.88, 'method': 'oneshot', 'sparsity': 0.5, 'stop_reason': 'target'},
      {'seed': 1, 'cycle': 0, 'test_accuracy': 0.9, 'method': 'dense', 'sparsity': 0.0, 'stop_reason': None},
      {'seed': 1, 'cycle': 1, 'test_accuracy': 0.86, 'method': 'oneshot', 'sparsity': 0.5, 'stop_reason': 'target'},
  ], [0.5], ['oneshot'])
  assert '| oneshot | 3.00 ± 1.41 (n=2) |' in two  # the sample std of 2 and 4 points
  with pytest.raises(ValueError, match='lottery_reinit'):
    magnitude.MagnitudeConfig(methods=('lottery_reinit',)).validate()
  with pytest.raises(ValueError, match='unknown metric'):
    magnitude.MagnitudeConfig(criterion='min').validate()
  with pytest.raises(ValueError, match='sparsities'):
    magnitude.MagnitudeConfig(sparsities=(1.0,)).validate()


def test_cli_writes_table_and_figure_and_rejects_bad_input(tmp_path):
  import subprocess
  import sys
  from pathlib import Path
  repo = Path(__file__).resolve().parents[1]
  cli = [sys.executable, '-m', 'experiments.magnitude', '--dataset=digits', '--widths=8,8', '--seeds=1',
         '--methods=oneshot,lottery', '--sparsities=0.5', '--max_epochs=2', '--finetune_epochs=1']
  done = subprocess.run(cli + [f'--out={tmp_path / "m"}'], cwd=repo, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-2000:]
  assert '| oneshot |' in (tmp_path / 'm' / 'table.md').read_text()
  assert (tmp_path / 'm' / 'test_accuracy_vs_weights.png').stat().st_size > 1000
  bad = subprocess.run(cli + ['--sparsities=1.5', f'--out={tmp_path / "bad"}'], cwd=repo, capture_output=True,
                       text=True)
  assert bad.returncode != 0 and 'sparsities' in bad.stderr and 'Traceback' not in bad.stderr
  assert not (tmp_path / 'bad').exists()


def test_each_target_is_reported_once_per_trial():
  """The lottery round before a target can be within rounding of it too; only the closest counts."""
  rows = [{'seed': 0, 'cycle': 0, 'test_accuracy': 0.9, 'method': 'lottery', 'metric': 'lottery',
           'sparsity': 0.0, 'stop_reason': None},
          {'seed': 0, 'cycle': 21, 'test_accuracy': 0.8, 'method': 'lottery', 'metric': 'lottery',
           'sparsity': 0.979526, 'stop_reason': None},
          {'seed': 0, 'cycle': 22, 'test_accuracy': 0.7, 'method': 'lottery', 'metric': 'lottery',
           'sparsity': 0.980006, 'stop_reason': 'target'}]
  [row] = magnitude.at_targets(rows, [0.98])
  assert row['test_accuracy'] == 0.7 and abs(row['drop'] - 0.2) < 1e-12


def test_a_target_within_one_weight_ends_the_rounds():
  """Small layers: the last rounds before 90 % sparsity would prune round(amount x remaining) = 0
  weights; the iterative trial then goes to its final training and the lottery trial stops, instead of
  repeating the same round forever."""
  ds = load_dataset('digits')
  model = create_model('fc', (8, 8), 10)
  data = DeviceData.from_dataset(ds)
  config = magnitude.MagnitudeConfig(methods=('iterative', 'lottery'), sparsities=(0.9,), round_epochs=1,
                                     final_epochs=1, prune_fraction=0.5, iterative_fraction=0.5,
                                     train=TrainConfig(max_epochs=1))
  records = magnitude.run(model, ds.image_shape, data, [0], config, io=RunIO(log=lambda s: None))
  for method in ('iterative', 'lottery'):
    own = [r for r in records if r['method'] == method]
    assert own[-1]['stop_reason'] == 'target' and len(own) < 40, (method, len(own))
    assert own[-1]['sparsity'] >= 0.89
