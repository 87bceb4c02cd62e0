"""Checkpoints and exact resume: interrupted runs give the same records as uninterrupted ones."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import functools

import chex
import jax.numpy as jnp
import pytest

from dropnet_jax import models

from dropnet_jax.loop import dropnet

from dropnet_jax.runs import reporting
from dropnet_jax.runs.checkpoint import Checkpointer
from dropnet_jax.config import DropNetConfig, TrainConfig
from dropnet_jax.loop.driver import Driver, RunIO, Trial
from dropnet_jax.training.lanes import OneLane
from dropnet_jax.training.trainer import DeviceData, Trainer, fit

# --batch_trials: every trial of a cycle as a lane of one program.
run_batched = functools.partial(dropnet.run_experiment, batch_trials=True)

REPO = Path(__file__).resolve().parents[1]
TIMING = ('seconds',)


def comparable(records):
  return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


class Crash(Exception):
  pass


@pytest.fixture(scope='module')
def setup(mnist_small):
  data = DeviceData(*(jnp.asarray(a[:600]) for a in mnist_small))
  model = models.MLP(widths=(8, 6), num_classes=10)
  config = DropNetConfig(metrics=('min', 'random_layer'), fraction=0.3, floor=0.45,
                                 train=TrainConfig(max_epochs=4, patience=2))
  trainer = Trainer(model, config.train)
  reference = dropnet.run_experiment(model, (28, 28, 1), data, [0, 1], config, trainer, RunIO(log=lambda s: None))
  return model, config, trainer, data, reference


@pytest.fixture(scope='module')
def batched_reference(setup):
  model, config, trainer, data, _ = setup
  return run_batched(model, (28, 28, 1), data, [0, 1], config, trainer, RunIO(log=lambda s: None))


def test_reference_run_is_nontrivial(setup):
  *_, reference = setup
  assert {r['seed'] for r in reference} == {0, 1}
  assert max(r['cycle'] for r in reference) >= 2


@pytest.mark.parametrize('batch_trials', [False, True])
@pytest.mark.parametrize('crash_at', [('epoch', 3), ('epoch', 9), ('record', 2), ('record', 5), ('epoch', 17)])
def test_crash_and_resume_gives_identical_records(setup, batched_reference, tmp_path, crash_at, batch_trials):
  """Crashes mid-cycle (epoch) and between cycles (record), one trial at a time and batched."""
  model, config, trainer, data, reference = setup
  if batch_trials:
    reference = batched_reference
  run = lambda io: dropnet.run_experiment(model, (28, 28, 1), data, [0, 1], config, trainer, io,
                                          batch_trials=batch_trials)
  # Checkpoints every 2 epochs; per-epoch log lines, so a finished rerun shows that it trained nothing.
  ckpt_dir = str(tmp_path / 'ckpt')
  io = lambda **kw: RunIO(Checkpointer(ckpt_dir), 2, log_epochs=True, **kw)
  kind, n = crash_at
  count = {'epoch': 0, 'record': 0}

  def monitor(event):  # one 'epoch' event per trained epoch of the group (one trial, or all lanes)
    if event['event'] == 'epoch':
      count['epoch'] += 1
      if kind == 'epoch' and count['epoch'] == n:
        raise Crash()

  def on_record(records):
    count['record'] += 1
    if kind == 'record' and count['record'] == n:
      raise Crash()

  with pytest.raises(Crash):
    run(io(on_record=on_record, log=lambda s: None, monitor=monitor))
  partial = Checkpointer(ckpt_dir).restore_meta()
  assert partial is not None
  if crash_at == ('epoch', 3):
    assert partial['fit'] is not None  # killed in the first cycle's epoch 3, after the epoch-2 checkpoint
  lines = []
  resumed = run(io(log=lines.append))
  assert lines[0].startswith('resuming')
  assert comparable(resumed) == comparable(reference)
  # A finished run resumes to the same records without training anything.
  lines = []
  again = run(io(log=lines.append))
  assert comparable(again) == comparable(reference)
  assert not any('train_loss' in l for l in lines)


def test_mid_cycle_checkpoint_holds_the_training_state(setup, tmp_path):
  model, config, trainer, data, _ = setup
  count = {'n': 0}

  def log(line):
    if 'train_loss' in line:
      count['n'] += 1
      if count['n'] == 3:
        raise Crash()

  ckpt = Checkpointer(str(tmp_path / 'c'))
  with pytest.raises(Crash):
    dropnet.run_experiment(model, (28, 28, 1), data, [0], config, trainer, RunIO(ckpt, 2, log=log, log_epochs=True))
  method = dropnet.DropNetMethod(model, (28, 28, 1), data, config)
  trials = [Trial(0, m, method.full_mask()) for m in config.metrics]
  driver = Driver(method, trials, OneLane(trainer), data, group_size=1,
                  io=RunIO(checkpointer=Checkpointer(str(tmp_path / 'c'))))
  assert driver._restore()
  assert driver.pos.fit is not None and int(driver.pos.fit.epoch) == 2  # saved at epoch 2, killed in epoch 3
  theta0 = models.init_params(model, dropnet.SeedKeys.for_seed(0).init, (28, 28, 1))
  chex.assert_trees_all_equal(driver.pos.theta0[0], theta0)  # θ0 survives the checkpoint bit for bit


CLI = [sys.executable, '-m', 'experiments.dropnet', '--dataset=digits', '--widths=8,8', '--metrics=min,max_layer',
       '--max_epochs=5', '--patience=2', '--floor=0.3', '--seeds=2', '--checkpoint_every_epochs=1',
       '--noverbose']


def test_sigkill_and_resume_via_cli(tmp_path):
  """A real SIGKILL at several points, then a resume, against an uninterrupted run."""
  env = {**os.environ, 'PYTHONUNBUFFERED': '1'}
  ref = tmp_path / 'ref'
  subprocess.run(CLI + [f'--out={ref}'], cwd=REPO, env=env, check=True, capture_output=True)
  reference = reporting.read_jsonl(ref / 'results.jsonl')
  out = tmp_path / 'killed'
  ckpt = out / 'checkpoints'
  kills = 0
  for wait_for_step in (4, 15, 30):
    proc = subprocess.Popen(CLI + [f'--out={out}'], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
      steps = [int(d) for d in os.listdir(ckpt) if d.isdigit()] if ckpt.exists() else []
      if steps and max(steps) >= wait_for_step:
        proc.send_signal(signal.SIGKILL)
        kills += 1
        break
      time.sleep(0.05)
    proc.wait()
    if (out / 'results.jsonl').exists():  # whatever is on disk is whole, never truncated
      reporting.read_jsonl(out / 'results.jsonl')
  assert kills >= 2
  done = subprocess.run(CLI + [f'--out={out}'], cwd=REPO, env=env, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-2000:]
  assert comparable(reporting.read_jsonl(out / 'results.jsonl')) == comparable(reference)


def test_refuses_to_resume_a_different_configuration(tmp_path):
  out = tmp_path / 'run'
  first = subprocess.run(CLI + [f'--out={out}', '--seeds=1', '--max_epochs=1'], cwd=REPO, capture_output=True,
                         text=True)
  assert first.returncode == 0, first.stderr[-2000:]
  before = (out / 'results.jsonl').read_bytes()
  other = subprocess.run(CLI + [f'--out={out}', '--seeds=1', '--max_epochs=1', '--fraction=0.5',
                                '--widths=8,9'], cwd=REPO, capture_output=True, text=True)
  assert other.returncode != 0
  assert 'different configuration' in other.stderr
  assert 'fraction' in other.stderr and 'widths' in other.stderr and 'metrics' not in other.stderr
  assert (out / 'results.jsonl').read_bytes() == before


def test_batched_trials_crash_and_resume_give_the_sequential_records(setup, tmp_path):
  """--batch_trials' driver: checkpoints after every cycle; a crash and a rerun end with the
  records of the uninterrupted sequential run (same masks; values to float tolerance)."""
  model, config, trainer, data, reference = setup
  ckpt = tmp_path / 'ckpt'
  saves = []

  class CrashingCheckpointer(Checkpointer):
    def save(self, arrays, meta):
      step = super().save(arrays, meta)
      saves.append(max(r['cycle'] for t in meta['trials'] for r in t['records']))
      if len(saves) == 2:  # after cycle 1: the dense cycle and one pruned cycle are on disk
        raise Crash()
      return step

  run = lambda c: run_batched(model, (28, 28, 1), data, [0, 1], config, trainer, RunIO(c, log=lambda s: None))
  with pytest.raises(Crash):
    run(CrashingCheckpointer(str(ckpt)))
  saved = Checkpointer(str(ckpt)).restore_meta()
  assert max(r['cycle'] for t in saved['trials'] for r in t['records']) == 1
  seen = []
  got = run_batched(model, (28, 28, 1), data, [0, 1], config, trainer,
                    RunIO(Checkpointer(str(ckpt)), on_record=seen.append, log=lambda s: None))
  assert len(seen[0]) == sum(1 for r in got if r['cycle'] <= 1)  # the restored records come first
  assert [(r['seed'], r['metric'], r['cycle'], r['mask'], r['stop_reason']) for r in got] == [
      (r['seed'], r['metric'], r['cycle'], r['mask'], r['stop_reason']) for r in reference]
  for g, w in zip(got, reference):
    assert abs(g['test_loss'] - w['test_loss']) < 1e-5 and g['early_stop_epoch'] == w['early_stop_epoch']


def test_batched_cli_refuses_a_sequential_run_and_runs_the_oracle(tmp_path):
  out = tmp_path / 'run'
  first = subprocess.run(CLI + [f'--out={out}', '--seeds=1', '--max_epochs=1'], cwd=REPO, capture_output=True,
                         text=True)
  assert first.returncode == 0, first.stderr[-2000:]
  other = subprocess.run(CLI + [f'--out={out}', '--seeds=1', '--max_epochs=1', '--batch_trials'], cwd=REPO,
                         capture_output=True, text=True)
  assert other.returncode != 0 and 'batch_trials' in other.stderr and 'Traceback' not in other.stderr
  oracle = subprocess.run(CLI + [f'--out={tmp_path / "o"}', '--metrics=oracle,min', '--batch_trials', '--seeds=1',
                                 '--max_epochs=1'], cwd=REPO, capture_output=True, text=True)
  assert oracle.returncode == 0, oracle.stderr[-2000:]
  assert {r['metric'] for r in reporting.read_jsonl(tmp_path / 'o' / 'results.jsonl')} == {'oracle', 'min'}
