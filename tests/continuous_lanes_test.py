"""The driver's continuous lane schedule (`loop.continuous`): the sequential run's records, exact resume
with lanes at different cycles, no recompiles when a lane changes trial, and better occupancy."""


import jax
import pytest

from dropnet_jax.config import DropNetConfig, TrainConfig
from dropnet_jax.input_pipeline import load_dataset
from dropnet_jax.loop import dropnet
from dropnet_jax.loop.driver import RunIO
from dropnet_jax.models import create_model
from dropnet_jax.runs.checkpoint import CheckpointError, Checkpointer
from dropnet_jax.training.trainer import DeviceData
from recompile_test import compilations

# Two criteria (one random: per-(seed, metric, cycle) keys) x 3 seeds: trials stop at different cycles.
CONFIG = DropNetConfig(metrics=('min', 'random_layer'), fraction=0.3, floor=0.3,
                       train=TrainConfig(max_epochs=5, patience=1))
SEEDS = [0, 1, 2]


class Crash(Exception):
  pass


class Curves:
  """A CurveSink in memory (keeps the rows an earlier invocation wrote that `start` says to keep)."""

  def __init__(self):
    self.rows = []

  def start(self, keep):
    self.rows = [r for r in self.rows if keep(r)]

  def add(self, rows):
    self.rows += rows


def key(row):
  return row['seed'], row['metric'], row['cycle'], row['epoch']


@pytest.fixture(scope='module')
def digits():
  ds = load_dataset('digits', None)
  data = DeviceData.from_dataset(ds)
  model = create_model('fc', (8, 8), ds.num_classes)
  trainer = dropnet.default_trainer(model, data, CONFIG)
  curves = Curves()
  sequential = dropnet.run_experiment(model, ds.image_shape, data, SEEDS, CONFIG, trainer,
                                      RunIO(log=lambda s: None, curves=curves))
  return ds, data, model, trainer, sequential, sorted(curves.rows, key=key)


def run(digits, io, **kw):
  ds, data, model, trainer, *_ = digits
  return dropnet.run_experiment(model, ds.image_shape, data, SEEDS, CONFIG, trainer, io, batch_trials=True,
                                lane_schedule='continuous', **kw)


def comparable(records):
  return [{k: v for k, v in r.items() if k != 'seconds'} for r in records]


@pytest.mark.parametrize('lanes', [None, 4, 1])
def test_records_and_curves_equal_the_sequential_run(digits, lanes):
  *_, sequential, sequential_rows = digits
  lines, curves = [], Curves()
  got = run(digits, RunIO(log=lines.append, curves=curves), lanes=lanes)
  assert comparable(got) == comparable(sequential)  # masks and numbers bit for bit on the CPU
  assert sorted(curves.rows, key=key) == sequential_rows
  assert lines[-1].startswith(f'lanes: continuous schedule, {lanes or 2 * len(SEEDS)} lanes, occupancy')


def test_continuous_occupancy_beats_the_barrier(digits):
  ds, data, model, trainer, *_ = digits
  share = {}
  for schedule in ('barrier', 'continuous'):
    lines = []
    dropnet.run_experiment(model, ds.image_shape, data, SEEDS, CONFIG, trainer, RunIO(log=lines.append),
                           batch_trials=True, lane_schedule=schedule, lanes=4)
    share[schedule] = float(lines[-1].split('occupancy ')[1].split('%')[0])
  assert share['continuous'] > share['barrier'], share


@pytest.mark.parametrize('crash_at', [4, 14])
def test_crash_with_lanes_at_different_cycles_resumes_to_the_same_records(digits, tmp_path, crash_at):
  *_, sequential, sequential_rows = digits
  ckpt = str(tmp_path / 'ckpt')
  count, curves = {'epoch': 0}, Curves()

  def monitor(event):
    if event['event'] == 'epoch':
      count['epoch'] += 1
      if count['epoch'] == crash_at:
        raise Crash()

  with pytest.raises(Crash):
    run(digits, RunIO(Checkpointer(ckpt), 3, log=lambda s: None, monitor=monitor, curves=curves), lanes=4)
  meta = Checkpointer(ckpt).restore_meta()
  assert meta['fit']['schedule'] == 'continuous'
  if crash_at == 14:  # lanes mid-cycle, at different cycles
    cycles = {job['cycle'] for job in meta['fit']['lanes'] if job}
    assert len(cycles) > 1, meta['fit']['lanes']
  lines = []
  resumed = run(digits, RunIO(Checkpointer(ckpt), 3, log=lines.append, curves=curves), lanes=4)
  assert lines[0].startswith('resuming from the checkpoint')
  assert comparable(resumed) == comparable(sequential)
  assert sorted(curves.rows, key=key) == sequential_rows


def test_the_barrier_refuses_a_continuous_checkpoint(digits, tmp_path):
  ds, data, model, trainer, *_ = digits
  ckpt, count = str(tmp_path / 'ckpt'), {'epoch': 0}

  def monitor(event):
    count['epoch'] += event['event'] == 'epoch'
    if count['epoch'] == 5:
      raise Crash()

  with pytest.raises(Crash):
    run(digits, RunIO(Checkpointer(ckpt), 2, log=lambda s: None, monitor=monitor), lanes=4)
  with pytest.raises(CheckpointError, match='continuous schedule'):
    dropnet.run_experiment(model, ds.image_shape, data, SEEDS, CONFIG, trainer,
                           RunIO(Checkpointer(ckpt), 2, log=lambda s: None), batch_trials=True, lanes=4)


def test_nothing_recompiles_when_lanes_change_trials(digits):
  """Once every kind of program has run (the first records), new jobs in lanes compile nothing: the
  epoch step, a lane's fresh state, writing it into its lane and measuring gathers each compiled once."""
  jax.clear_caches()
  snapshots = []
  with compilations() as names:
    records = run(digits, RunIO(log=lambda s: None, on_record=lambda rs: snapshots.append((len(rs), len(names)))),
                  lanes=4)
  assert len(records) > 20 and len(snapshots) > 10
  steady = [n for count, n in snapshots if count >= 12]  # every seed's dense cycle and a pruned cycle recorded
  assert len(set(steady)) == 1, (snapshots, names)
  for program in ('jit(_epoch_step)', 'jit(put_lane)', 'jit(take_lanes)'):
    assert names.count(program) == 1, (program, names)
  assert names.count('jit(init_fit)') == 2, names  # the idle lanes at the start, and one lane's fresh state


def test_lanes_bench_at_a_toy_size(tmp_path):
  """The GPU suite (experiments.lanes_bench) at a CPU toy size: every configuration, JSON out."""
  import json
  import subprocess
  import sys
  from pathlib import Path
  out = tmp_path / 'bench'
  proc = subprocess.run([sys.executable, '-m', 'experiments.lanes_bench', '--models=fc', '--seeds=1',
                         '--metrics=min,random_layer', '--lanes=1,2', '--max_epochs=2', '--train_examples=128',
                         '--width_multiplier=0.25', f'--out={out}'], cwd=Path(__file__).resolve().parents[1],
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  results = json.loads((out / 'lanes_bench.json').read_text())['results']
  assert [(r['lanes'], r['schedule']) for r in results] == [(1, 'sequential'), (2, 'barrier'), (2, 'continuous')]
  assert results[-1]['same_masks'] and results[-1]['max_abs_diff'] == 0 and all(0 < r['occupancy'] <= 1 and r['model_epochs_per_s'] > 0 for r in results)
  assert 'occupancy' in proc.stdout
