"""The source documents' recipes run end to end, reduced, on data in the official layouts that the test
writes (random pixels): the real-data paths are the same code with --data_dir pointing at the real files.

Each case is the recipe's own command plus overrides that shrink it (width, epochs, trials); what the
recipe fixes (model family and head, dataset, augmentation, normalisation, optimiser, schedule unit)
stays as written.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from input_pipeline_test import make_mnist, write_cifar, write_tiny_imagenet

REPO = Path(__file__).resolve().parents[1]


def _run(module, recipe, data_dir, out, *overrides):
  cmd = [sys.executable, '-m', module, f'--config=configs/{recipe}', f'--data_dir={data_dir}', f'--out={out}',
         *overrides]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  return json.loads((Path(out) / 'config.json').read_text())['config']


@pytest.fixture(scope='module')
def cifar(tmp_path_factory):
  root = tmp_path_factory.mktemp('cifar') / 'cifar-10-batches-py'
  write_cifar(root, per_batch=40)
  return root


def test_resnet18_bn_schedules_recipe(cifar, tmp_path):
  config = _run('experiments.schedules', 'resnet18_bn_cifar10_schedules.py', cifar, tmp_path / 'out',
                '--width_multiplier=0.0625', '--max_epochs=1', '--schedules=torch_linear')
  assert config['model']['name'] == 'resnet18_bn' and config['data']['normalize']
  assert config['train']['augment'] == 'crop,flip,autoaugment'
  assert config['train']['optim']['schedule_unit'] == 'epoch'
  results = json.loads((tmp_path / 'out' / 'schedules.json').read_text())
  assert 'torch_linear' in json.dumps(results)


def test_resnet18_bn_tune_recipe(cifar, tmp_path):
  config = _run('experiments.tune', 'tune_resnet18_bn_cifar10.py', cifar, tmp_path / 'out',
                '--width_multiplier=0.0625', '--n_trials=2', '--max_epochs=1', '--patience=1', '--startup_trials=2',
                '--retrain_epochs=1')
  assert config['space']['optimizers'] == ['momentum', 'asgd'] and config['space']['dropout'] == [0.0, 0.5]
  best = json.loads((tmp_path / 'out' / 'best.json').read_text())
  assert set(best['best_params']) >= {'optimizer', 'dropout', 'batch_size'}
  assert 64 <= best['best_params']['batch_size'] <= 256
  assert config['retrain_epochs'] == 1 and (tmp_path / 'out' / 'params' / 'spec.json').is_file()  # the best, saved


def test_vgg19_tiny_imagenet_recipe(tmp_path):
  write_tiny_imagenet(tmp_path / 'tiny', per_class=10)
  _run('experiments.dropnet', 'vgg19_tiny_imagenet.py', tmp_path / 'tiny', tmp_path / 'out',
       '--width_multiplier=0.0625', '--head=16', '--max_epochs=1', '--floor=0.4', '--batch_size=16')
  records = [json.loads(line) for line in (tmp_path / 'out' / 'results.jsonl').read_text().splitlines()]
  assert {r['metric'] for r in records} == {'min', 'min_layer', 'random'}
  last = max(records, key=lambda r: r['cycle'])
  assert len(last['units']) == 17 and last['units'][-1] < 16  # 16 convs + the FC head, pruned too


def test_vgg19_mnist_recipe(tmp_path):
  (tmp_path / 'mnist').mkdir()
  make_mnist(tmp_path / 'mnist', n_train=200, n_test=50)
  _run('experiments.dropnet', 'vgg19_mnist.py', tmp_path / 'mnist', tmp_path / 'out',
       '--width_multiplier=0.0625', '--head=8', '--max_epochs=1', '--floor=0.5')
  records = [json.loads(line) for line in (tmp_path / 'out' / 'results.jsonl').read_text().splitlines()]
  assert records and all(len(r['units']) == 17 for r in records)


@pytest.fixture(scope='module')
def mnist(tmp_path_factory):
  root = tmp_path_factory.mktemp('mnist')
  make_mnist(root, n_train=200, n_test=50)
  return root


@pytest.mark.parametrize('recipe,model,units', [('fc40_mnist.py', 'fc', 2), ('conv_mnist.py', 'conv', 2),
                                                ('modelc_mnist.py', 'modelc', 4)])
def test_dropnet_mnist_recipes(mnist, tmp_path, recipe, model, units):
  """Models A, B and C on MNIST: the recipe's six metrics, protocol and model, reduced in width and epochs."""
  config = _run('experiments.dropnet', recipe, mnist, tmp_path / 'out', '--width_multiplier=0.125',
                '--max_epochs=1', '--floor=0.7', '--batch_trials')
  assert config['model']['name'] == model and config['dropnet']['fraction'] == 0.2
  records = [json.loads(line) for line in (tmp_path / 'out' / 'results.jsonl').read_text().splitlines()]
  assert {r['metric'] for r in records} == {'min', 'max', 'random', 'min_layer', 'max_layer', 'random_layer'}
  assert all(len(r['units']) == units for r in records) and max(r['cycle'] for r in records) >= 1


def test_resnet18_tiny_imagenet_recipe(tmp_path):
  write_tiny_imagenet(tmp_path / 'tiny', per_class=10)
  config = _run('experiments.dropnet', 'resnet18_tiny_imagenet.py', tmp_path / 'tiny', tmp_path / 'out',
                '--width_multiplier=0.0625', '--max_epochs=1', '--floor=0.4', '--batch_size=16')
  assert config['model']['name'] == 'resnet18' and config['dropnet']['train']['augment'] == 'crop,flip'
  records = [json.loads(line) for line in (tmp_path / 'out' / 'results.jsonl').read_text().splitlines()]
  assert {r['metric'] for r in records} == {'min', 'min_layer', 'random'}
  assert any(r['cycle'] == 1 and r['fraction_remaining'] < 0.6 for r in records)  # p = 0.5


def test_modelc_cifar10_ensemble_recipes(cifar, tmp_path):
  """The deck's pipeline: the DropNet recipe (every cycle saved), then the ensemble recipe's table of six
  metrics x three levels from one command."""
  run = tmp_path / 'run'
  _run('experiments.dropnet', 'modelc_cifar10.py', cifar, run, '--width_multiplier=0.125', '--max_epochs=1',
       '--floor=0.5', '--batch_trials')
  config = _run('experiments.ensemble', 'ensemble_modelc_cifar10.py', cifar, tmp_path / 'ens', f'--run={run}',
                '--max_size=2')
  assert config['pool']['levels'] == [0.0, 0.2, 0.5] and config['pool']['group'] == 'metric'
  rows = (tmp_path / 'ens' / 'levels_table.csv').read_text().splitlines()[1:]
  assert len(rows) == 6 * 3


def test_resnet18_bn_3stages_recipe(cifar, tmp_path):
  config = _run('experiments.schedules', 'resnet18_bn_3stages_cifar10.py', cifar, tmp_path / 'out',
                '--width_multiplier=0.0625', '--max_epochs=1', '--schedules=cosine')
  assert config['model']['stages'] == [1, 2, 3] and config['train']['augment'] == 'crop,flip,autoaugment'
  assert 'cosine' in (tmp_path / 'out' / 'schedules.json').read_text()


def test_resnet18_bn_under5m_rates_recipe(cifar, tmp_path):
  config = _run('experiments.structured', 'resnet18_bn_under5m_rates.py', cifar, tmp_path / 'out',
                '--width_multiplier=0.125', '--max_epochs=1', '--importance=l1')
  assert config['structured']['rates'] == [0.1, 0.1, 0.2, 0.2, 0.2, 0.2, 0.3, 0.3]
  records = [json.loads(line) for line in (tmp_path / 'out' / 'results.jsonl').read_text().splitlines()]
  dense, pruned = (next(r for r in records if r['cycle'] == c) for c in (0, 1))
  assert pruned['params'] < dense['params']


def test_resnet18_bn_pretrain_then_magnitude_recipes(cifar, tmp_path):
  """The magnitude report's pipeline from its two recipes: pretrain (saved) -> load -> one-shot and
  iterative pruning (saved with their zeros) -> experiments.evaluate re-tests every network."""
  pre = tmp_path / 'pre'
  _run('experiments.schedules', 'resnet18_bn_cifar10_pretrain.py', cifar, pre, '--width_multiplier=0.0625',
       '--max_epochs=1')
  config = _run('experiments.magnitude', 'resnet18_bn_cifar10_magnitude.py', cifar, tmp_path / 'mag',
                f'--init_from={pre}:seed0/cosine', '--width_multiplier=0.0625', '--sparsities=0.5',
                '--finetune_epochs=1', '--round_epochs=1', '--final_epochs=1', '--iterative_fraction=0.3')
  assert config['magnitude']['methods'] == ['oneshot', 'iterative'] and config['magnitude']['criterion'] == 'global_l1'
  proc = subprocess.run([sys.executable, '-m', 'experiments.evaluate', f'--networks={tmp_path / "mag"}:*',
                         f'--data_dir={cifar}', f'--json={tmp_path / "eval.json"}'], cwd=REPO, capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  rows = json.loads((tmp_path / 'eval.json').read_text())['networks']
  assert all(r['reproduced'] for r in rows)
  final = {}  # per method, its last saved cycle: the network at the target
  for r in rows:
    if 's=0.5' in r['network']:
      trial, cycle = r['network'].rsplit('/cycle', 1)
      if int(cycle) >= final.get(trial, (-1, None))[0]:
        final[trial] = (int(cycle), r)
  assert len(final) == 2 and all(abs(r['sparsity'] - 0.5) < 1e-4 for _, r in final.values())
