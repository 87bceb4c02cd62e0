"""The study entry points and the random re-initialisation baseline."""

import subprocess
import sys
from pathlib import Path

import chex
import jax.numpy as jnp
import pytest

from dropnet_jax import models

from dropnet_jax.loop import dropnet
from dropnet_jax.loop.driver import RunIO

from dropnet_jax.pruning import masks as mask_ops

from dropnet_jax.runs import reporting
from dropnet_jax.config import DropNetConfig, TrainConfig
from dropnet_jax.training.lanes import Lanes
from dropnet_jax.training.trainer import DeviceData, Trainer, fit

QUIET = RunIO(log=lambda s: None)

REPO = Path(__file__).resolve().parents[1]


def test_random_init_is_fresh_and_keeps_mask_and_order(mnist_small):
  model = models.MLP(widths=(8,), num_classes=10)
  data = DeviceData(*(jnp.asarray(a[:400]) for a in mnist_small))
  trainer = Trainer(model, TrainConfig(max_epochs=2))
  theta0 = models.init_params(model, dropnet.SeedKeys.for_seed(3).init, (28, 28, 1))
  inits = [models.init_params(model, dropnet.random_init_key(3, c), (28, 28, 1)) for c in range(3)]
  for params in inits:
    with pytest.raises(AssertionError):
      chex.assert_trees_all_close(params, theta0)
  with pytest.raises(AssertionError):
    chex.assert_trees_all_close(inits[0], inits[1])
  record = {'seed': 3, 'metric': 'min', 'cycle': 2, 'mask': ['10110111'], 'stop_reason': None}
  out = dropnet.retrain_from_random_init(trainer, model, (28, 28, 1), data, record)
  assert out['metric'] == 'min_randominit' and out['cycle'] == 2 and out['mask'] == ['10110111']
  assert out['units'] == [6]
  # It is exactly a θ0-style cycle trained from the fresh init.
  same = dropnet.train_cycle(trainer, inits[2], mask_ops.masks_from_strings(['10110111']), data,
                             dropnet.SeedKeys.for_seed(3).shuffle_key(2))
  assert out['test_accuracy'] == same.fields['test_accuracy']


def run(module, out, *args):
  proc = subprocess.run([sys.executable, '-m', module, '--widths=6,6', '--max_epochs=2', '--floor=0.5',
                         '--noverbose', f'--out={out}', *args], cwd=REPO, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def test_fraction_study_runs_each_p_with_min(tmp_path):
  run('experiments.fraction_study', tmp_path / 'f', '--fractions=0.3,0.9')
  records = reporting.read_jsonl(tmp_path / 'f' / 'results.jsonl')
  assert {r['metric'] for r in records} == {'min p=0.3', 'min p=0.9'}
  p9 = [r for r in records if r['metric'] == 'min p=0.9']
  assert sum(p9[1]['units']) == 12 - int(0.9 * 12)  # one cycle of p=0.9 from 12 units
  assert (tmp_path / 'f' / 'test_accuracy.png').exists()
  # The same command again (a resume, here of a finished study) is accepted and changes no record; it was
  # refused because the first p's directory was checked against --fraction's default instead of that p.
  run('experiments.fraction_study', tmp_path / 'f', '--fractions=0.3,0.9')
  assert reporting.read_jsonl(tmp_path / 'f' / 'results.jsonl') == records


def test_bad_fraction_list_is_rejected(tmp_path):
  proc = subprocess.run([sys.executable, '-m', 'experiments.fraction_study', '--fractions=0.2,1.5',
                         f'--out={tmp_path / "x"}'], cwd=REPO, capture_output=True, text=True)
  assert proc.returncode != 0 and 'fraction' in proc.stderr and not (tmp_path / 'x').exists()
  twice = subprocess.run([sys.executable, '-m', 'experiments.fraction_study', '--fractions=0.5,0.5',
                          f'--out={tmp_path / "x"}'], cwd=REPO, capture_output=True, text=True)
  assert twice.returncode == 1 and 'error: --fractions: each p once, got 0.5,0.5' in twice.stderr, twice.stderr[-2000:]
  assert 'Traceback' not in twice.stderr and not (tmp_path / 'x').exists()


def test_randominit_study_pairs_every_cycle(tmp_path):
  run('experiments.randominit_study', tmp_path / 'r', '--metrics=min')
  theta0 = reporting.read_jsonl(tmp_path / 'r' / 'theta0' / 'results.jsonl')
  reinit = reporting.read_jsonl(tmp_path / 'r' / 'randominit.jsonl')
  assert [(r['cycle'], r['mask']) for r in theta0] == [(r['cycle'], r['mask']) for r in reinit]
  assert all(r['metric'] == 'min_randominit' for r in reinit)
  # The retrained networks are saved too (--save_params), and read back as their records' networks.
  from dropnet_jax.compaction.export import correct_count, predictions
  from dropnet_jax.input_pipeline import load_dataset
  from dropnet_jax.pruning.masks import masks_from_strings
  from dropnet_jax.runs import saved_params
  test = load_dataset('digits')
  last = reinit[-1]
  model, theta, wmask, record = saved_params.load_saved(tmp_path / 'r', f'seed0/min_randominit/cycle{last["cycle"]}')
  assert wmask is None and record == last
  logits = predictions(model, theta, test.test_images, masks_from_strings(record['mask']))
  assert correct_count(logits, test.test_labels) == round(record['test_accuracy'] * len(test.test_labels))


def test_oracle_study_and_resume_with_oracle(tmp_path, mnist_small):
  proc = run('experiments.oracle_study', tmp_path / 'o', '--oracle_examples=300')
  records = reporting.read_jsonl(tmp_path / 'o' / 'results.jsonl')
  assert {r['metric'] for r in records} == {'oracle', 'min', 'max', 'random_layer'}
  similarity = reporting.read_jsonl(tmp_path / 'o' / 'similarity.jsonl')
  assert all(0 <= s['oracle_similarity'] <= 1 for s in similarity)
  assert all(s['oracle_similarity'] == 1 for s in similarity if s['cycle'] == 0)
  assert (tmp_path / 'o' / 'similarity.png').exists() and 'oracle_similarity' in proc.stdout


def test_oracle_metric_resumes_exactly(tmp_path, mnist_small):
  from dropnet_jax.runs.checkpoint import Checkpointer
  model = models.MLP(widths=(6, 5), num_classes=10)
  data = DeviceData(*(jnp.asarray(a[:300]) for a in mnist_small))
  config = DropNetConfig(metrics=('min', 'oracle'), fraction=0.3, floor=0.5, oracle_examples=200,
                                 train=TrainConfig(max_epochs=2))
  trainer = Trainer(model, config.train)
  reference = dropnet.run_experiment(model, (28, 28, 1), data, [0], config, trainer, io=QUIET)
  calls = []

  def crash(records):
    calls.append(1)
    if len(calls) == 2:  # during min's cycles: the oracle's cycle 0 will need the checkpointed dense params
      raise RuntimeError('crash')

  with pytest.raises(RuntimeError):
    dropnet.run_experiment(model, (28, 28, 1), data, [0], config, trainer,
                           io=RunIO(checkpointer=Checkpointer(str(tmp_path)), on_record=crash, log=lambda s: None))
  resumed = dropnet.run_experiment(model, (28, 28, 1), data, [0], config, trainer,
                                   io=RunIO(checkpointer=Checkpointer(str(tmp_path)), log=lambda s: None))
  strip = lambda rs: [{k: v for k, v in r.items() if k != 'seconds'} for r in rs]
  assert strip(resumed) == strip(reference)
  assert any(r['metric'] == 'oracle' and r['cycle'] > 0 for r in reference)


def test_oracle_runs_batched_with_the_sequential_records(mnist_small):
  """The oracle is a criterion like any other: with --batch_trials its trials train as lanes and
  select their masks exactly as in the sequential run (same masks, values to float rounding)."""
  model = models.MLP(widths=(6, 5), num_classes=10)
  data = DeviceData(*(jnp.asarray(a[:300]) for a in mnist_small))
  config = DropNetConfig(metrics=('oracle', 'min'), fraction=0.3, floor=0.5, oracle_examples=200,
                         train=TrainConfig(max_epochs=2))
  trainer = Trainer(model, config.train)
  sequential = dropnet.run_experiment(model, (28, 28, 1), data, [0, 1], config, trainer, io=QUIET)
  batched = dropnet.run_experiment(model, (28, 28, 1), data, [0, 1], config, trainer, io=QUIET,
                                   batch_trials=True)
  exact = ('seed', 'metric', 'cycle', 'mask', 'units', 'stop_reason', 'early_stop_epoch')
  assert [[r[k] for k in exact] for r in batched] == [[r[k] for k in exact] for r in sequential]
  assert any(r['metric'] == 'oracle' and r['cycle'] >= 2 for r in batched)
  for b, s in zip(batched, sequential):
    assert abs(b['test_loss'] - s['test_loss']) < 1e-5
