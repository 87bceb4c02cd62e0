"""The README's GPU-time estimates: each piece checked by hand (MACs, cycles, rounds, epochs, seconds)."""

import math
import subprocess
import sys
from pathlib import Path

import pytest

from dropnet_jax.config import DataConfig, DropNetConfig, ExperimentConfig, InitFromConfig, ModelConfig, TrainConfig
from dropnet_jax.ensemble.pipeline import EnsembleConfig
from dropnet_jax.loop.magnitude import MagnitudeConfig
from dropnet_jax.runs import recipe_cost
from dropnet_jax.runs.magnitude import MagnitudeRunConfig
from dropnet_jax.runs.schedules import SchedulesConfig

REPO = Path(__file__).resolve().parents[1]


def test_cycles_and_rounds_by_hand():
  assert recipe_cost.cycles_to_floor(0.2, 0.1) == 11  # 0.8**10 = 0.107 > 0.1 >= 0.8**11 = 0.086
  assert recipe_cost.cycles_to_floor(0.5, 0.05) == 5  # 0.5**4 = 0.0625, 0.5**5 = 0.031
  assert recipe_cost.rounds_to(0.9, 0.2) == 11  # 0.8**11 = 0.086 <= 0.1
  assert recipe_cost.rounds_to(0.5, 0.11) == 6  # 0.89**5 = 0.558, 0.89**6 = 0.497


def test_dropnet_model_a_on_mnist_by_hand():
  config = ExperimentConfig(model=ModelConfig(name='fc', widths=(40, 40)), data=DataConfig(dataset='mnist'),
                            seeds=2, dropnet=DropNetConfig(metrics=('min', 'max')))
  cost = recipe_cost.estimate(config)
  macs = 784 * 40 + 40 * 40 + 40 * 10
  assert cost.macs == macs and cost.params == macs + 40 + 40 + 10
  assert cost.train_examples == 54000 and cost.epochs == 2 * (1 + 2 * 11) * 100
  assert cost.flops == pytest.approx(cost.epochs * (6 * macs * 54000 + 2 * macs * 6000))
  # A 33 kMAC network is launch-bound: every step costs the floor.
  steps = math.ceil(54000 / 32)
  expected = cost.epochs * (steps * recipe_cost.MIN_STEP_SECONDS + 2 * macs * 6000 / recipe_cost.SUSTAINED_FLOPS)
  assert cost.gpu_seconds == pytest.approx(expected)


def test_flop_bound_seconds_and_schedules():
  config = SchedulesConfig(model=ModelConfig(name='resnet18_bn'), data=DataConfig(dataset='cifar10'),
                           train=TrainConfig(batch_size=128, max_epochs=3), schedules=('constant', 'cosine'))
  cost = recipe_cost.estimate(config)
  assert cost.epochs == 6 and cost.params == 11173962  # torch's count of the twin (tests/resnet_bn_test.py)
  step = 6 * cost.macs * 128 / recipe_cost.SUSTAINED_FLOPS
  assert step > recipe_cost.MIN_STEP_SECONDS
  assert cost.gpu_seconds == pytest.approx(6 * (math.ceil(45000 / 128) * step + 2 * cost.macs * 5000 / 15e12))


def test_magnitude_epochs_by_hand():
  m = MagnitudeConfig(methods=('oneshot', 'iterative', 'lottery'), sparsities=(0.5, 0.9), finetune_epochs=20,
                      iterative_fraction=0.11, round_epochs=5, final_epochs=100, prune_fraction=0.2,
                      train=TrainConfig(max_epochs=30))
  cost = recipe_cost.estimate(MagnitudeRunConfig(data=DataConfig(dataset='mnist'), magnitude=m, seeds=1))
  oneshot = 2 * 20
  iterative = (6 * 5 + 100) + (20 * 5 + 100)  # 0.89**20 = 0.097 <= 0.1 < 0.89**19
  lottery = 11 * 30
  assert cost.epochs == 30 + oneshot + iterative + lottery
  loaded = MagnitudeRunConfig(data=DataConfig(dataset='mnist'), magnitude=m, start=InitFromConfig(init_from='x'))
  assert recipe_cost.estimate(loaded).epochs == oneshot + iterative + lottery  # the loaded network is not trained


def test_a_recipe_that_trains_nothing():
  with pytest.raises(recipe_cost.TrainsNothing):
    recipe_cost.estimate(EnsembleConfig())


def test_the_table_command():
  proc = subprocess.run([sys.executable, '-m', 'experiments.recipe_cost',
                         '--recipes=configs/fc40_mnist.py,configs/ensemble_fc40.py'], cwd=REPO, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert '| `configs/fc40_mnist.py` | 33,450 | 33,360 | 54,000 | 6,700 |' in proc.stdout
  assert '| `configs/ensemble_fc40.py` |' in proc.stdout and 'trains nothing' in proc.stdout
  bad = subprocess.run([sys.executable, '-m', 'experiments.recipe_cost', '--recipes=configs/nope.py'], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  assert bad.returncode == 1 and bad.stderr.strip() == 'error: --recipes: no such file configs/nope.py'
