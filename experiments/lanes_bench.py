r"""Lane schedules side by side: one lane vs 16 vs 90, barrier vs continuous, on real DropNet runs.

  python -m experiments.lanes_bench --out=runs/lanes_bench            # the GPU suite (minutes)
  python -m experiments.lanes_bench --models=fc --seeds=1 --lanes=1,3,6 --max_epochs=3 \
      --train_examples=256 --out=/tmp/lanes_toy                          # a CPU toy size (seconds)

Why: with `--batch_trials` an accelerator computes all lanes of a program in
lockstep, so what a run costs is its lockstep epochs x lanes, whatever the
lanes do. The barrier schedule makes every lane wait for its cycle's slowest
early stop; the continuous schedule (`dropnet_jax.loop.continuous`) restarts a
lane as soon as its cycle ends. This runs the same DropNet trials (--seeds x
the six metrics: 15 x 6 = 90, the paper's protocol) for every model x lane
count x schedule through the one driver and reports, per configuration:

  * occupancy: useful lane-epochs / lane-epochs spent (lockstep epochs x lanes);
  * model-epochs/s: useful lane-epochs per second of the run, compilation
    excluded (XLA compile time is measured and subtracted; the wall time with it
    is reported too);
  * peak memory: host RSS and the device's peak bytes in use (both peaks of the
    process so far, so they only grow over the configurations);
  * same_masks, max_abs_diff: the continuous records against the barrier's
    (the same masks; numbers equal on CPU one lane at a time, to training's
    amplified rounding when lanes are vmapped).

One lane is the sequential mode (one trial at a time, `--single_lane_seeds`
seeds, so it stays short); more lanes run --seeds seeds, as one group
(barrier) or fed to the lanes (continuous); a lane count above the trials is
cut to the trials. Data: scikit-learn's digits (offline, real labels, so
early stopping varies as in a real run), 8x8 for fc, tiled to 32x32x3 for
the CIFAR-shaped models (modelc, resnet18_bn); with --data_dir the MNIST
subset for fc. --train_examples caps the training split. Writes
<out>/lanes_bench.json (and config.json).
"""

from __future__ import annotations

from dropnet_jax.cli import entry  # first: applies --host_devices before jax is imported

import dataclasses
import json
import resource
import time
from typing import Any

import jax
import numpy as np

from dropnet_jax import models
from dropnet_jax.config import DropNetConfig, TrainConfig
from dropnet_jax.settings import setting

PAPER_METRICS = DropNetConfig().metrics  # min, max, random and their _layer forms
CIFAR_SHAPED = ('modelc', 'resnet18', 'resnet18_bn', 'vgg16', 'vgg19')
BACKEND_COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'


@dataclasses.dataclass(frozen=True)
class LanesBenchConfig:
  """What the lane-schedule benchmark runs (see the module docstring)."""
  models: tuple[str, ...] = setting(('fc', 'modelc'), 'Models: fc (A), modelc (C), resnet18_bn, ...', flag='models',
                                    choices=tuple(models.MODELS))
  lanes: tuple[int, ...] = setting((1, 16, 90), 'Lane counts (1: one trial at a time).', flag='lanes')
  schedules: tuple[str, ...] = setting(('barrier', 'continuous'), 'Schedules of the batched lane counts.',
                                       flag='schedules', choices=('barrier', 'continuous'))
  seeds: int = setting(15, 'Seeds of the batched configurations (trials: seeds x metrics).', flag='seeds')
  single_lane_seeds: int = setting(1, 'Seeds of the one-lane configuration.', flag='single_lane_seeds')
  metrics: tuple[str, ...] = setting(PAPER_METRICS, 'DropNet metrics (trials: seeds x metrics).', flag='metrics')
  fraction: float = setting(0.5, 'DropNet p (fewer cycles than the paper, to keep the suite short).', flag='fraction')
  floor: float = setting(0.1, 'Fraction remaining at which a trial stops.', flag='floor')
  max_epochs: int = setting(12, 'Epoch limit of a cycle.', flag='max_epochs')
  patience: int = setting(2, 'Early-stopping patience.', flag='patience')
  batch_size: int = setting(64, 'Batch size.', flag='batch_size')
  train_examples: int = setting(1024, 'Training examples (at most; 0: all).', flag='train_examples')
  width_multiplier: float = setting(1.0, 'Scales the models\' default widths.', flag='width_multiplier')
  lanes_per_chunk: int = setting(0, 'Lanes vmapped together (0: the default, 1 on CPU and all on accelerators).',
                                 flag='lanes_per_chunk')
  data_dir: str | None = setting(None, 'The MNIST subset for fc (default: digits).', flag='data_dir', result=False)

  def validate(self) -> None:
    if not self.lanes or any(n < 1 for n in self.lanes) or len(set(self.lanes)) != len(self.lanes):
      raise ValueError(f'lanes must be distinct positive counts, got {self.lanes}')
    for name in ('seeds', 'single_lane_seeds', 'max_epochs', 'patience', 'batch_size'):
      if getattr(self, name) < 1:
        raise ValueError(f'{name} must be >= 1, got {getattr(self, name)}')
    if self.train_examples < 0 or self.lanes_per_chunk < 0:
      raise ValueError('train_examples and lanes_per_chunk must be >= 0')
    if not self.schedules or not self.metrics:
      raise ValueError('schedules and metrics must not be empty')
    DropNetConfig(metrics=self.metrics, fraction=self.fraction, floor=self.floor).validate()


CONFIG = entry.define(LanesBenchConfig(), 'lanes_bench', out_help='Output directory: <out>/lanes_bench.json.')


def load(name: str, bench: LanesBenchConfig):
  """(DeviceData, image shape, note) for `name`: digits (tiled to 32x32x3 for CIFAR-shaped models) or MNIST."""
  from dropnet_jax.input_pipeline import load_dataset
  from dropnet_jax.training.trainer import DeviceData
  mnist = name == 'fc' and bench.data_dir
  ds = load_dataset('mnist' if mnist else 'digits', bench.data_dir if mnist else None)
  arrays = [ds.train_images, ds.train_labels, ds.val_images, ds.val_labels, ds.test_images, ds.test_labels]
  if bench.train_examples:
    arrays[0], arrays[1] = arrays[0][:bench.train_examples], arrays[1][:bench.train_examples]
  note = f'{"MNIST subset" if mnist else "digits"}, {len(arrays[1])} training examples'
  if name in CIFAR_SHAPED and not mnist:
    for i in (0, 2, 4):  # 8x8x1 -> 32x32x3: each pixel a 4x4 block, the channel repeated
      arrays[i] = np.repeat(np.repeat(np.repeat(arrays[i], 4, axis=1), 4, axis=2), 3, axis=3)
    note += ' tiled to 32x32x3'
  return DeviceData(*(jax.numpy.asarray(a) for a in arrays)), tuple(arrays[0].shape[1:]), note


def run_one(model, image_shape, data, trainer, bench: LanesBenchConfig, lanes: int, schedule: str) -> dict[str, Any]:
  """One configuration through the one driver; its figures and records."""
  from dropnet_jax.loop.driver import Driver, RunIO, Trial
  from dropnet_jax.loop.dropnet import DropNetMethod
  from dropnet_jax.training.lanes import Lanes, OneLane
  config = DropNetConfig(metrics=bench.metrics, fraction=bench.fraction, floor=bench.floor, train=trainer.config)
  method = DropNetMethod(model, image_shape, data, config, log=lambda s: None)
  seeds = bench.single_lane_seeds if lanes == 1 else bench.seeds
  trials = [Trial(seed, metric, method.full_mask()) for seed in range(seeds) for metric in bench.metrics]
  lanes = min(lanes, len(trials))
  if lanes == 1:
    driver = Driver(method, trials, OneLane(trainer), data, group_size=1, io=RunIO(log=lambda s: None))
  else:
    runner = Lanes(trainer, bench.lanes_per_chunk or None)
    driver = Driver(method, trials, runner, data, group_size=lanes, schedule=schedule, lanes=lanes,
                    io=RunIO(log=lambda s: None))
  compiled = []
  listener = lambda event, secs, **kw: compiled.append(secs) if event == BACKEND_COMPILE_EVENT else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    start = time.perf_counter()
    records = driver.run()
    wall = time.perf_counter() - start
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  useful, spent = driver.occupancy.useful, driver.occupancy.spent
  run_s = max(wall - sum(compiled), 1e-9)
  return {'lanes': lanes, 'schedule': schedule if lanes > 1 else 'sequential', 'trials': len(trials),
          'records': len(records), 'useful_lane_epochs': useful, 'lane_epochs_spent': spent,
          'lockstep_epochs': spent // lanes, 'occupancy': useful / spent if spent else 1.0, 'wall_s': wall,
          'compile_s': sum(compiled), 'model_epochs_per_s': useful / run_s, **memory()}, records


def memory() -> dict[str, Any]:
  out = {'host_peak_rss_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:
    stats = None
  if stats:
    out['device_peak_bytes_in_use'] = stats.get('peak_bytes_in_use')
  return out


def compare(a, b) -> dict[str, Any]:
  """Records `a` against `b` (the same trials): the same masks (and cycles), and the largest difference
  of a number (vmapped lanes round differently from one lane at a time, and training amplifies it)."""
  keys = lambda rs: [(r['seed'], r['metric'], r['cycle'], r.get('mask')) for r in rs]
  diffs = [abs(x[k] - y[k]) for x, y in zip(a, b) for k in x
           if k != 'seconds' and isinstance(x[k], float) and isinstance(y.get(k), float)]
  return {'same_masks': keys(a) == keys(b), 'max_abs_diff': max(diffs, default=0.0)}


def benchmark(bench: LanesBenchConfig) -> dict[str, Any]:
  from dropnet_jax.training.trainer import Trainer, steps_per_epoch
  results = []
  print(f'{len(jax.devices())} x {jax.devices()[0].device_kind} ({jax.devices()[0].platform})')
  for name in bench.models:
    data, image_shape, note = load(name, bench)
    model = models.create_model(name, None, 10, bench.width_multiplier)
    train = TrainConfig(max_epochs=bench.max_epochs, patience=bench.patience, batch_size=bench.batch_size)
    trainer = Trainer(model, train, steps_per_epoch=steps_per_epoch(data.train_labels.shape[0], bench.batch_size))
    print(f'\n{name}: {note}; widths {model.widths}')
    for lanes in bench.lanes:
      by_schedule = {}
      for schedule in (bench.schedules if lanes > 1 else ('barrier',)):
        r, records = run_one(model, image_shape, data, trainer, bench, lanes, schedule)
        by_schedule[schedule] = records
        if len(by_schedule) > 1:  # against the first schedule of this lane count
          r.update(compare(records, next(iter(by_schedule.values()))))
        results.append({'model': name, 'data': note, **r})
        print(f'  {r["lanes"]:3d} lane(s) {r["schedule"]:>10}: {r["trials"]:3d} trials, occupancy '
              f'{100 * r["occupancy"]:5.1f}% ({r["useful_lane_epochs"]}/{r["lane_epochs_spent"]} lane-epochs, '
              f'{r["lockstep_epochs"]} lockstep), {r["model_epochs_per_s"]:8.1f} model-epochs/s, wall '
              f'{r["wall_s"]:.1f}s (compile {r["compile_s"]:.1f}s), peak RSS {r["host_peak_rss_mib"]:.0f} MiB'
              + (f', device peak {r["device_peak_bytes_in_use"] / 2**20:.0f} MiB'
                 if r.get('device_peak_bytes_in_use') else '')
              + (f'; vs {bench.schedules[0]}: masks {"equal" if r["same_masks"] else "DIFFER"}, max |diff| '
                 f'{r["max_abs_diff"]:.1e}' if 'same_masks' in r else ''), flush=True)
  return {'devices': [str(d) for d in jax.devices()], 'jax': jax.__version__, 'results': results}


def main(argv):
  from dropnet_jax.runs.run_dir import RunDir  # here: --help does not need it
  del argv
  try:
    bench = entry.config(CONFIG)
    run_dir = RunDir(entry.FLAGS.out, 'lanes_bench', bench)
    run_dir.check()
  except ValueError as e:
    entry.fail(e)
  with run_dir.open(resume_hint='lanes_bench.json was not written; rerun the command'):
    report = benchmark(bench)
    path = run_dir.write_text('lanes_bench.json', json.dumps(report, indent=2))
  print(f'\nwrote {path}')


def run() -> None:
  """The `dropnet-lanes-bench` console command (pyproject.toml [project.scripts])."""
  entry.run(main)


if __name__ == '__main__':
  run()
