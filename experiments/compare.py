r"""DropNet side by side: dropnet_jax and the PyTorch reference, same experiment, one report.

  python -m experiments.compare --dataset=mnist --data_dir=../shared/data/mnist_subset \
      --model=fc --widths=40,40 --metrics=min,max --seeds=1 --out=runs/compare

Both implementations run Algorithm 1 from the same θ0 (dropnet_jax's Flax
init, copied into torch) with the same shuffles and tie-break draws (the same
JAX keys), so their records should agree up to float32 rounding. Writes to
--out: config.json, results_jax.jsonl/.csv, results_torch.jsonl/.csv,
test_accuracy.png (test accuracy vs fraction of units remaining, both
implementations, one panel per metric) and report.md (accuracy per cycle from
both, wall time per epoch and per experiment, the speed ratio); prints the
tables. The JAX side is `dropnet_jax.loop.dropnet.run_seed`, what
`experiments.dropnet` runs, one trial at a time.

The PyTorch twin (tests/torch_reference, in a source checkout) trains Models
A, B and C with plain SGD at a constant learning rate, reshuffling every
epoch, without augmentation, and has the activation criteria (min, max,
random, apoz and their _layer forms); other settings are refused before any
work, as are a missing torch and an unusable --out.

Timing: JAX's compile is measured in a separate warm-up before the timed run
(one call of every compiled program: the epoch step, evaluation on each split
and the mask update of each metric, each then called again to subtract the
run time); the timed JAX run excludes nothing else. An epoch is one training
epoch plus the validation pass and the early-stopping bookkeeping, in both.
"""

from __future__ import annotations

from dropnet_jax.cli import entry  # first: applies --host_devices before jax is imported

import dataclasses
import json
import os
import platform
import statistics
import time

from absl import logging

from dropnet_jax.config import DataConfig, DropNetConfig, ModelConfig
from dropnet_jax.settings import setting

TWIN_MODELS = ('fc', 'conv', 'modelc')


@dataclasses.dataclass(frozen=True)
class CompareConfig:
  """DropNet in both implementations: the settings of `ExperimentConfig` the PyTorch twin can mirror."""
  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig(dataset='mnist')
  seeds: int = setting(1, 'Number of seeds, run as 0..N-1.', flag='seeds')
  dropnet: DropNetConfig = DropNetConfig(metrics=('min', 'max'))
  torch_threads: int = setting(0, "torch.set_num_threads for the PyTorch run (0: leave torch's default).",
                               flag='torch_threads')
  verbose: bool = setting(False, 'Also log a line per epoch (with -v: absl logging at INFO).', flag='verbose',
                          result=False)

  def validate(self) -> None:
    """Raises ValueError naming the setting (the metrics are checked against the twin in `main`)."""
    if self.seeds < 1:
      raise ValueError(f'seeds must be >= 1, got {self.seeds}')
    if self.torch_threads < 0:
      raise ValueError(f'torch_threads must be >= 0, got {self.torch_threads}')
    if self.model.name not in TWIN_MODELS:
      raise ValueError(f'model: the PyTorch reference has {", ".join(TWIN_MODELS)}, not {self.model.name}')
    self.dropnet.validate()
    d, train, optim = self.dropnet, self.dropnet.train, self.dropnet.train.optim
    # What the twin mirrors: each setting with the value it needs (and what it is).
    twin = {
        'dropnet.train.optim.optimizer': (optim.optimizer, 'sgd', 'plain SGD'),
        'dropnet.train.optim.momentum': (optim.momentum or None, None, 'plain SGD'),
        'dropnet.train.optim.weight_decay': (optim.weight_decay, 0.0, 'plain SGD, no weight decay'),
        'dropnet.train.optim.schedule': (optim.schedule, 'constant', 'a constant learning rate'),
        'dropnet.train.shuffle': (train.shuffle, True, 'a reshuffle every epoch'),
        'dropnet.train.augment': (train.augment, 'none', 'no augmentation'),
        'dropnet.score_params': (d.score_params, 'best', "the best epoch's θ scored"),
        'dropnet.param_budget': (d.param_budget, None, 'no size budget'),
        'dropnet.mac_budget': (d.mac_budget, None, 'no size budget'),
    }
    for path, (value, needed, what) in twin.items():
      if value != needed:
        raise ValueError(f'{path}={value}: the PyTorch reference supports {path}={needed} only ({what})')


CONFIG = entry.define(CompareConfig(), 'compare', out_help='Output directory: report.md, the records of both '
                      'implementations and the figure.')


def _timed(fn, *args):
  import jax
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, time.perf_counter() - start


def warm_up_jax(trainer, model, image_shape, data, config) -> dict[str, float]:
  """Compiles every program the JAX run uses; returns the warm-up wall time and the compile estimate.

  Each program is called twice on real inputs; the compile estimate is the sum
  of (first call - second call).
  """
  from dropnet_jax.pruning import criteria
  from dropnet_jax.loop import dropnet
  from dropnet_jax.models import full_masks, init_params

  start = time.perf_counter()
  keys = dropnet.SeedKeys.for_seed(0)
  params0 = init_params(model, keys.init, image_shape)  # eager ops, also used by the torch run
  masks = full_masks(model)
  state = trainer.init_fit(params0, masks, keys.shuffle_key(0))
  compile_s = 0.0
  s1, first = _timed(trainer.epoch_step, state, data)
  _, second = _timed(trainer.epoch_step, s1, data)
  compile_s += first - second
  epoch_first, epoch_second = first, second
  sums = None
  for images, labels in ((data.train_images, data.train_labels), (data.val_images, data.val_labels),
                         (data.test_images, data.test_labels)):
    res, first = _timed(trainer.evaluate, s1.best_params, masks, images, labels)
    _, second = _timed(trainer.evaluate, s1.best_params, masks, images, labels)
    compile_s += first - second
    sums = sums or res.sums
  for metric in config.metrics:
    inputs = criteria.PruneInputs(s1.best_params, sums, masks, keys.mask_key(metric, 0), config.fraction)
    _, first = _timed(criteria.get(metric), inputs, criteria.Context())
    _, second = _timed(criteria.get(metric), inputs, criteria.Context())
    compile_s += first - second
  return {'warmup_wall_s': time.perf_counter() - start, 'compile_s': compile_s,
          'first_epoch_step_s': epoch_first, 'second_epoch_step_s': epoch_second}


def run_jax(model, ds, config, seeds, write, log_epochs: bool):
  """The JAX side: `run_seed` per seed (every record to `write(records)`), each epoch step timed."""
  import jax
  from dropnet_jax.loop.dropnet import run_seed
  from dropnet_jax.training.trainer import DeviceData, Trainer

  data = DeviceData.from_dataset(ds)
  trainer = Trainer(model, config.train)
  warm = warm_up_jax(trainer, model, ds.image_shape, data, config)
  logging.info('JAX warm-up: %.1fs (compile ~%.1fs)', warm['warmup_wall_s'], warm['compile_s'])

  epoch_times: list[float] = []
  step = trainer.epoch_step

  def timed_epoch_step(state, data):
    start = time.perf_counter()
    out = jax.block_until_ready(step(state, data))
    epoch_times.append(time.perf_counter() - start)
    return out

  trainer.epoch_step = timed_epoch_step
  records, timing = timed_seeds(
      write, seeds,
      lambda seed, on_record: run_seed(model, ds.image_shape, data, seed, config, trainer, on_record,
                                       lambda m: logging.info('[jax] %s', m), log_epochs))
  return records, {**timing, 'epoch_s': epoch_times, **warm}


def timed_seeds(write, seeds, run_one):
  """Runs `run_one(seed, on_record)` for every seed, calling `write(all records so far)` as records
  arrive; returns (records, {'wall_s', 'load_before', 'load_after'})."""
  records: list[dict] = []

  def on_record(r):
    records.append(r)
    write(records)

  load0 = os.getloadavg()[0]
  start = time.perf_counter()
  for seed in seeds:
    run_one(seed, on_record)
  wall = time.perf_counter() - start
  return records, {'wall_s': wall, 'load_before': load0, 'load_after': os.getloadavg()[0]}


def run_torch(flax_model, torch_model, ds, config, seeds, write, log_epochs: bool):
  """The PyTorch twin's side, the same seeds and draws; every epoch timed."""
  import jax
  from tests.torch_reference import dropnet as tdropnet
  from tests.torch_reference.train import TorchData, Trainer

  data = TorchData.from_dataset(ds)
  trainer = Trainer(torch_model, config.train)
  # The host-side JAX draws the torch run borrows (shuffles, tie-breaks): compile them outside the timing.
  key = jax.random.key(0)
  tdropnet.shuffle_order(key, 1, len(data.train_labels))
  for layerwise in (False, True):
    tdropnet.tie_break_draws(key, list(torch_model.widths), layerwise)

  epoch_times: list[float] = []
  records, timing = timed_seeds(
      write, seeds,
      lambda seed, on_record: tdropnet.run_seed(flax_model, torch_model, ds.image_shape, data, seed, config,
                                                trainer, on_record, lambda m: logging.info('%s', m), log_epochs,
                                                on_epoch=lambda s: epoch_times.append(s.epoch_seconds[-1])))
  return records, {**timing, 'epoch_s': epoch_times}


# -- report -----------------------------------------------------------------------


def _by_key(records):
  return {(r['seed'], r['metric'], r['cycle']): r for r in records}


def accuracy_table(rec_jax, rec_torch, metrics) -> str:
  """Markdown: one row per (seed, metric, cycle) present in either implementation."""
  a, b = _by_key(rec_jax), _by_key(rec_torch)
  rows = ['| seed | metric | cycle | fraction | units JAX | units torch | same mask | test acc JAX | '
          'test acc torch | Δ | stop epoch JAX / torch |',
          '|---|---|---:|---:|---|---|---|---:|---:|---:|---|']
  for k in sorted(set(a) | set(b), key=lambda k: (k[0], metrics.index(k[1]), k[2])):
    j, t = a.get(k), b.get(k)
    frac = (j or t)['fraction_remaining']
    acc = lambda r: f'{r["test_accuracy"]:.4f}' if r else '-'
    delta = f'{round(t["test_accuracy"] - j["test_accuracy"], 4) + 0.0:+.4f}' if j and t else '-'
    same = ('yes' if j['mask'] == t['mask'] else 'no') if j and t else '-'
    units = lambda r: str(r['units']) if r else '-'
    epochs = f'{j["early_stop_epoch"] if j else "-"} / {t["early_stop_epoch"] if t else "-"}'
    rows.append(f'| {k[0]} | {k[1]} | {k[2]} | {frac:.3f} | {units(j)} | {units(t)} | {same} | {acc(j)} | '
                f'{acc(t)} | {delta} | {epochs} |')
  return '\n'.join(rows)


def timing_table(tj, tt) -> str:
  med = lambda xs: statistics.median(xs) if xs else float('nan')
  mean = lambda xs: statistics.fmean(xs) if xs else float('nan')
  rows = ['| | JAX | PyTorch | PyTorch / JAX |', '|---|---:|---:|---:|']

  def row(name, x, y, fmt='{:.3f}'):
    ratio = y / x if x else float('nan')
    rows.append(f'| {name} | {fmt.format(x)} | {fmt.format(y)} | {ratio:.2f}x |')

  row('full experiment, wall (s)', tj['wall_s'], tt['wall_s'], '{:.1f}')
  row('epochs trained', len(tj['epoch_s']), len(tt['epoch_s']), '{:d}')
  row('median epoch (s)', med(tj['epoch_s']), med(tt['epoch_s']))
  row('mean epoch (s)', mean(tj['epoch_s']), mean(tt['epoch_s']))
  p90 = lambda xs: statistics.quantiles(xs, n=10)[-1] if len(xs) > 1 else float('nan')
  row('90th percentile epoch (s)', p90(tj['epoch_s']), p90(tt['epoch_s']))
  rows.append(f'| JAX compile (separate warm-up), estimate (s) | {tj["compile_s"]:.1f} | - | - |')
  rows.append(f'| JAX warm-up wall: compile + 2 epochs + 3 evals + mask updates (s) | {tj["warmup_wall_s"]:.1f} | - | - |')
  row('full experiment incl. JAX warm-up (s)', tj['wall_s'] + tj['warmup_wall_s'], tt['wall_s'], '{:.1f}')
  rows.append(f'| 1-min load average before / after the run | {tj["load_before"]:.1f} / {tj["load_after"]:.1f} | '
              f'{tt["load_before"]:.1f} / {tt["load_after"]:.1f} | |')
  return '\n'.join(rows)


def save_figure(rec_jax, rec_torch, metrics, path, title):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  import numpy as np

  fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False, sharey=True)
  fracs = [r['fraction_remaining'] for r in rec_jax + rec_torch]
  for ax, metric in zip(axes[0], metrics):
    for recs, label, style in ((rec_jax, 'JAX (dropnet_jax)', dict(color='C0', marker='o', linestyle='-')),
                               (rec_torch, 'PyTorch reference', dict(color='C3', marker='x', linestyle='--'))):
      by_cycle: dict[int, list] = {}
      for r in recs:
        if r['metric'] == metric:
          by_cycle.setdefault(r['cycle'], []).append(r)
      cycles = sorted(by_cycle)
      x = [np.mean([r['fraction_remaining'] for r in by_cycle[c]]) for c in cycles]
      y = [np.mean([r['test_accuracy'] for r in by_cycle[c]]) for c in cycles]
      ax.plot(x, y, label=label, **style)
    ax.set_xscale('log')
    ax.set_xlim(max(fracs) * 1.08, min(fracs) / 1.08)  # inverted: dense network on the left
    ticks = [t for t in (1.0, 0.5, 0.2, 0.1, 0.05, 0.02, 0.01) if min(fracs) / 1.08 <= t <= max(fracs) * 1.08]
    ax.set_xticks(ticks, [f'{t:g}' for t in ticks])
    ax.minorticks_off()
    ax.grid(True, alpha=0.4)
    ax.set_title(metric)
    ax.set_xlabel('fraction of nodes/filters remaining')
  axes[0][0].set_ylabel('test accuracy')
  axes[0][0].legend()
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def prepare(config: CompareConfig, out: str):
  """Checks everything (the twin's metrics, the model, --out), then loads the data; raises ValueError
  naming the problem before anything is written. Returns (flax model, torch model, dataset, run dir)."""
  from dropnet_jax.input_pipeline import dataset_fingerprint, load_dataset
  from dropnet_jax.runs.experiment import build_model
  from dropnet_jax.runs.run_dir import RunDir
  from tests.torch_reference import dropnet as tdropnet
  from tests.torch_reference import models as tmodels

  for m in config.dropnet.metrics:
    try:
      tdropnet.check_metric(m)
    except ValueError as e:
      raise ValueError(f'metrics: {e}') from None
  build_model(config)  # the model's widths, before any data are read
  run_dir = RunDir(out, 'compare', config)
  run_dir.check()
  ds = load_dataset(config.data.dataset, config.data.data_dir, split_seed=config.data.split_seed)
  run_dir.data_fingerprint = dataset_fingerprint(ds)
  run_dir.check()
  flax_model = build_model(config, ds)
  torch_model = tmodels.create_model(config.model.name, flax_model.widths, ds.num_classes, ds.image_shape)
  return flax_model, torch_model, ds, run_dir


def main(argv):
  del argv
  try:
    config = entry.config(CONFIG)
    entry.require_torch_twin('experiments.compare')
    flax_model, torch_model, ds, run_dir = prepare(config, entry.FLAGS.out)
  except ValueError as e:  # includes input_pipeline.DataError
    entry.fail(e)
  import jax
  import torch

  if config.torch_threads:
    torch.set_num_threads(config.torch_threads)
  seeds = range(config.seeds)
  metrics = list(config.dropnet.metrics)
  logging.info('%s: train %d, val %d, test %d', config.data.dataset, len(ds.train_labels), len(ds.val_labels),
               len(ds.test_labels))
  dn = config.dropnet
  title = f'{config.model.name} {list(flax_model.widths)} on {config.data.dataset}: JAX vs PyTorch'
  with run_dir.open(resume_hint='rerun the same command to start again'):
    rec_jax, t_jax = run_jax(flax_model, ds, dn, seeds, lambda r: run_dir.write_results(r, 'results_jax'),
                             config.verbose)
    rec_torch, t_torch = run_torch(flax_model, torch_model, ds, dn, seeds,
                                   lambda r: run_dir.write_results(r, 'results_torch'), config.verbose)
    save_figure(rec_jax, rec_torch, metrics, run_dir.file('test_accuracy.png'), title)
    acc = accuracy_table(rec_jax, rec_torch, metrics)
    timing = timing_table(t_jax, t_torch)
    torch_by_key = _by_key(rec_torch)
    same_masks = sum(1 for k, r in _by_key(rec_jax).items()
                     if k in torch_by_key and torch_by_key[k]['mask'] == r['mask'])
    machine = (f'{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; JAX {jax.__version__} on '
               f'{jax.devices()[0].platform}; PyTorch {torch.__version__} on CPU with {torch.get_num_threads()} '
               'threads')
    shown = {'model': config.model.name, 'widths': list(flax_model.widths), 'dataset': config.data.dataset,
             'data_dir': config.data.data_dir, 'metrics': metrics, 'seeds': config.seeds,
             'fraction': dn.fraction, 'floor': dn.floor, 'lr': dn.train.lr, 'batch_size': dn.train.batch_size,
             'max_epochs': dn.train.max_epochs, 'patience': dn.train.patience, 'split_seed': config.data.split_seed}
    report = f"""# DropNet: dropnet_jax vs the PyTorch reference

{title}. Settings: `{json.dumps(shown)}` (all of them in config.json).
Machine: {machine}.

Both start from the same θ0 (the Flax init copied into torch) and use the same shuffles and tie-break
draws, so differences come from float32 rounding only (and what it changes downstream: a different early-stopping
epoch or a different unit near a score tie). Masks identical in {same_masks} of {len(rec_jax)} (seed, metric, cycle)
records (JAX {len(rec_jax)}, torch {len(rec_torch)} records).

## Time

{timing}

An epoch = one training epoch + the validation pass + early-stopping bookkeeping. JAX's compile is
measured in a separate warm-up (every compiled program called twice: compile ≈ first − second call) and is
not in the JAX full-experiment time; the row "incl. JAX warm-up" adds it back. Other processes on the machine
share its CPUs (load averages above).

## Test accuracy per cycle (best-validation-loss epoch)

{acc}

![test accuracy](test_accuracy.png)
"""
    path = run_dir.write_text('report.md', report)
  print(timing)
  print()
  print(acc)
  print(f'\nreport: {path}')


def run() -> None:
  """The `dropnet-compare` console command (pyproject.toml [project.scripts])."""
  entry.run(main)


if __name__ == '__main__':
  run()
