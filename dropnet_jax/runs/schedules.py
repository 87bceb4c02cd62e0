"""Learning-rate schedules compared (`experiments.schedules`) as one library call.

One model is trained with each schedule for `max_epochs` epochs. Every schedule starts from the same
θ0 and sees the same shuffles (`seed`), so the schedule is the only difference; training runs all
epochs unless `early_stop`. The schedules' parameters are the optimiser's settings (min_lr_factor,
step_epochs, gamma, cyclic_half_epochs, warmup_epochs, warmup_start_factor, schedule_epochs).

`prepare(config, out)` checks everything before any work (the settings, the model, the run directory,
then the data and every schedule's length in steps); `run(setup)` trains the schedules into the
directory: config.json, schedules.json (per schedule: its settings and stamp, per-epoch curves, final
accuracies), schedules.md (the table) and schedules.png (learning rate, training and validation
accuracy per epoch). A rerun with the same settings skips the schedules already in schedules.json;
the run directory's stamp (kind, every result-changing setting, the data's fingerprint) refuses a
directory made with another model, other data or other training settings before anything is trained
or rewritten. The list of schedules is not stamped: a rerun may add schedules to the same directory.

Each schedule's trained network (the best-validation-loss θ, with batch-norm statistics: the params its
`best` accuracies were measured with) is saved unless `save_params` is 'none', in the layout of every
run (`runs.saved_params`): params/spec.json and one orbax checkpoint per schedule, with a results.jsonl
row per schedule (seed, metric = the schedule, the best-θ accuracies and losses). So
`experiments.evaluate --networks=RUN:*` scores them again, and `RUN:seed<S>/<schedule>` is an
`--init_from` of any run (e.g. the magnitude report's "pretrain, save, load, prune"). The record's
cycle is 1 (`SAVED_CYCLE`), not 0: in that layout cycle 0 is `seed<S>/dense`, the one dense network a
DropNet or magnitude trial shares with every metric of its seed, while each schedule trains its own;
as cycle 1 each schedule's network is a record of its own (`seed<S>/<schedule>/cycle1`). A schedule
already in schedules.json whose network is not saved (an earlier run with --save_params=none) is
trained again when saving is asked for: the same θ0 and shuffles give the same network and figures.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import time
from typing import Any, Callable, NamedTuple

import numpy as np
from absl import logging

from dropnet_jax.config import DataConfig, ModelConfig, OutputConfig, TrainConfig
from dropnet_jax.input_pipeline import Dataset, dataset_fingerprint, input_norm_for, load_dataset
from dropnet_jax.models import model_from_config
from dropnet_jax.models.compact import spec_of
from dropnet_jax.runs import reporting, saved_params
from dropnet_jax.runs.run_dir import CONFIG_FILE, RunDir
from dropnet_jax.settings import setting, to_dict
from dropnet_jax.training import optim
from dropnet_jax.training.optim import SCHEDULES
from dropnet_jax.training.trainer import DeviceData, steps_per_epoch

RESULTS = 'schedules.json'
SAVED_CYCLE = 1  # the cycle of each schedule's record (see the module docstring)
_SAVE_PARAMS = {f.name: f for f in dataclasses.fields(OutputConfig)}['save_params'].metadata  # declared once there


@dataclasses.dataclass(frozen=True)
class SchedulesConfig:
  """One model trained with each of `schedules` (the optimiser's schedule replaced, all else shared)."""
  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  train: TrainConfig = TrainConfig(max_epochs=50)
  schedules: tuple[str, ...] = setting(SCHEDULES, 'Schedules to compare.', flag='schedules', result=False,
                                       choices=SCHEDULES)
  seed: int = setting(0, 'θ0 and shuffle order shared by every schedule.', flag='seed')
  early_stop: bool = setting(False, 'Stop on --patience epochs without a lower validation loss (default: train all '
                             '--max_epochs epochs).', flag='early_stop')
  train_subset: int | None = setting(None, 'Use only this many training examples (a seeded random subset).',
                                     flag='train_subset')
  save_params: str = setting('all', _SAVE_PARAMS['help'] + ' Here each schedule is a trial of one network: all, '
                             'last and auto keep every schedule\'s network.', flag='save_params', result=False,
                             choices=_SAVE_PARAMS['choices'])

  def validate(self) -> None:
    """Raises ValueError naming the offending setting; reads no data."""
    if not self.schedules:
      raise ValueError(f'schedules: give at least one of {", ".join(SCHEDULES)}')
    unknown = [s for s in self.schedules if s not in SCHEDULES]
    if unknown:
      raise ValueError(f'schedules: unknown {unknown}; choose from {", ".join(SCHEDULES)}')
    if len(set(self.schedules)) != len(self.schedules):
      raise ValueError(f'schedules: duplicates in {list(self.schedules)}')
    if self.seed < 0:
      raise ValueError(f'seed must be >= 0, got {self.seed}')
    if self.train_subset is not None and self.train_subset < 1:
      raise ValueError(f'train_subset must be a positive number of examples, got {self.train_subset}')
    if self.save_params not in _SAVE_PARAMS['choices']:
      raise ValueError(f'save_params must be one of {_SAVE_PARAMS["choices"]}, got {self.save_params!r}')
    if self.data.data_dir is not None and not os.path.isdir(self.data.data_dir):
      raise ValueError(f'data_dir: {self.data.data_dir} is not a directory')
    self.train.validate()
    for name in self.schedules:
      self.schedule_config(name).validate()

  def schedule_config(self, name: str) -> TrainConfig:
    """The training settings of one schedule: `train` with its schedule (and without early stopping
    unless `early_stop`)."""
    config = dataclasses.replace(self.train, optim=dataclasses.replace(self.train.optim, schedule=name))
    return config if self.early_stop else dataclasses.replace(config, patience=config.max_epochs)


@dataclasses.dataclass
class Setup:
  """A checked schedules run: its config, model, data (the training subset taken) and directory."""
  config: SchedulesConfig
  model: Any
  dataset: Dataset
  run_dir: RunDir

  def title(self) -> str:
    from dropnet_jax.runs.titles import run_title
    return run_title(self.config.model.name, list(self.model.widths), self.config.data.dataset)


def subset_train(dataset: Dataset, n: int | None) -> Dataset:
  """The first n of a seeded permutation of the training split (validation and test unchanged);
  ValueError when the split has fewer than n examples (using all of them would silently train on more
  than asked)."""
  if n is not None and n > len(dataset.train_labels):
    raise ValueError(f'--train_subset={n}: the {dataset.name} training split has only {len(dataset.train_labels)} '
                     'examples')
  if n is None or n == len(dataset.train_labels):
    return dataset
  idx = np.sort(np.random.default_rng(0).permutation(len(dataset.train_labels))[:n])
  return dataclasses.replace(dataset, train_images=dataset.train_images[idx], train_labels=dataset.train_labels[idx])


def prepare(config: SchedulesConfig, out: str) -> Setup:
  """Checks everything, then loads the data; raises ValueError (input_pipeline.DataError) naming the
  problem before anything is trained or written."""
  config.validate()
  m = config.model
  model_from_config(m, 10)  # the model and widths, before any data is read
  run_dir = RunDir(out, 'schedules', config)
  run_dir.check()
  if os.path.exists(run_dir.file(RESULTS)) and not os.path.exists(run_dir.file(CONFIG_FILE)):
    raise ValueError(f'{out} has {RESULTS} but no {CONFIG_FILE} (made by an older version or another run); '
                     'use another --out')
  d = config.data
  dataset = subset_train(load_dataset(d.dataset, d.data_dir, split_seed=d.split_seed), config.train_subset)
  run_dir.data_fingerprint = dataset_fingerprint(dataset)  # what is trained on, wherever it was read from
  run_dir.check()
  steps = steps_per_epoch(len(dataset.train_labels), config.train.batch_size)
  for name in config.schedules:  # every schedule's lengths in steps, before the first is trained
    train = config.schedule_config(name)
    optim.schedule_steps(train.optim, steps, train.max_epochs)
  return Setup(config, model_from_config(m, dataset.num_classes, input_norm_for(config.data.normalize, dataset)), dataset, run_dir)


def run(setup: Setup, log: Callable[[str], None] = logging.info) -> dict[str, dict[str, Any]]:
  """Trains each schedule (skipping those already in schedules.json with the same settings) and writes
  the json, the table and the figure; returns the results of `config.schedules`, in order."""
  config, run_dir, dataset = setup.config, setup.run_dir, setup.dataset
  run_dir.check()
  data = DeviceData.from_dataset(dataset)
  results = {}
  spec = {**spec_of(setup.model), 'image_shape': list(dataset.image_shape)}
  with run_dir.open():
    saved = _saved(run_dir)
    store = None if config.save_params == 'none' else run_dir.params_store('all', spec)
    for name in config.schedules:
      train = config.schedule_config(name)
      settings = json.loads(json.dumps({'config': to_dict(train), 'seed': config.seed,
                                        'train': int(len(dataset.train_labels)), 'stamp': run_dir.stamp}))
      if name in saved and saved[name].get('settings') == settings:
        if store is None or _selector(config.seed, name) in saved_params.saved_selectors(run_dir.path):
          results[name] = saved[name]
          log(f'{name}: already done')
          continue
        log(f'{name}: done before without saving its network: trained again to save it')
      r, best_theta = train_schedule(setup.model, dataset.image_shape, data, train, config.seed)
      results[name] = {'settings': settings, **r}
      log(f'{name}: {r["epochs"]} epochs in {r["seconds"]:.1f}s, last val {r["last"]["val"]:.4f} '
          f'test {r["last"]["test"]:.4f}')
      everything = {**saved, **results}
      if store is not None:  # the network and its row before schedules.json marks the schedule done
        store.saved_cycle(_Trial(config.seed, name, [record(name, results[name])]), best_theta)
        run_dir.write_results([record(n, everything[n]) for n in everything])
      run_dir.write_text(RESULTS, json.dumps(everything, indent=1))
    run_dir.write_text('schedules.md', table(results))
    figure(results, run_dir.file('schedules.png'), title=setup.title())
  return results


class _Trial(NamedTuple):
  """What `saved_params.ParamsStore.saved_cycle` reads of a trial: its seed, metric and records."""
  seed: int
  metric: str
  records: list[dict[str, Any]]


def _selector(seed: int, name: str) -> str:
  """The saved-params selector of schedule `name`'s network (`saved_params.parse_selector`)."""
  return f'seed{seed}/{name}/cycle{SAVED_CYCLE}'


def record(name: str, result: dict[str, Any]) -> dict[str, Any]:
  """Schedule `name`'s results.jsonl row: the figures of its saved (best-validation-loss) network."""
  row = {'seed': int(result['settings']['seed']), 'metric': name, 'cycle': SAVED_CYCLE, 'schedule': name,
         'best_epoch': result['best_epoch'], 'epochs_trained': result['epochs']}
  for split in ('train', 'val', 'test'):
    row[f'{split}_accuracy'] = result['best'][split]
    if 'best_loss' in result:  # absent from entries made before the losses were kept
      row[f'{split}_loss'] = result['best_loss'][split]
  return row


def _saved(run_dir: RunDir) -> dict[str, Any]:
  """The entries of schedules.json made with this run's stamp (the directory's check has compared
  config.json; an entry with another stamp is dropped, never shown as this run's)."""
  path = run_dir.file(RESULTS)
  if not os.path.exists(path):
    return {}
  try:
    with open(path) as f:
      saved = json.load(f)
  except (OSError, json.JSONDecodeError):
    return {}
  stamp = json.loads(json.dumps(run_dir.stamp))
  return {k: v for k, v in saved.items() if isinstance(v, dict) and v.get('settings', {}).get('stamp') == stamp}


def train_schedule(model, image_shape, data: DeviceData, config: TrainConfig,
                   seed: int = 0) -> tuple[dict[str, Any], Any]:
  """Trains `config` from seed's θ0; returns (per-epoch curves and the final accuracies, the
  best-validation-loss θ)."""
  from dropnet_jax.loop.dropnet import SeedKeys
  from dropnet_jax.models import init_params
  from dropnet_jax.models.layers import full_masks
  from dropnet_jax.training.trainer import Trainer, fit

  steps = steps_per_epoch(int(data.train_labels.shape[0]), config.batch_size)
  trainer = Trainer(model, config, steps_per_epoch=steps)
  schedule = optim.make_schedule(config.optim, steps, config.max_epochs)
  keys, masks = SeedKeys.for_seed(seed), full_masks(model)
  curves: dict[str, list] = {k: [] for k in ('epoch', 'lr', 'train_accuracy', 'train_loss', 'val_accuracy', 'val_loss')}

  def on_epoch(s):
    e = int(s.epoch)
    curves['epoch'].append(e)
    curves['lr'].append(float(schedule(e * steps - 1)))  # the last step of the epoch
    for k in ('train_accuracy', 'train_loss', 'val_accuracy', 'val_loss'):
      curves[k].append(float(getattr(s, k)))

  start = time.perf_counter()
  state = fit(trainer.epoch_step, trainer.init_fit(init_params(model, keys.init, image_shape), masks,
                                                   keys.shuffle_key(0)), data, on_epoch)
  seconds = time.perf_counter() - start

  def scores(theta):
    return {split: trainer.evaluate(theta, masks, *xy) for split, xy in (
        ('train', (data.train_images, data.train_labels)), ('val', (data.val_images, data.val_labels)),
        ('test', (data.test_images, data.test_labels)))}

  last, best = scores(state.params), scores(state.best_params)
  return {'curves': curves, 'last': {k: float(v.accuracy) for k, v in last.items()},
          'best': {k: float(v.accuracy) for k, v in best.items()},
          'best_loss': {k: float(v.loss) for k, v in best.items()},
          'best_epoch': int(state.best_epoch), 'epochs': int(state.epoch), 'diverged': bool(state.diverged),
          'lr_per_step': [float(schedule(t)) for t in range(0, steps * config.max_epochs, max(1, steps // 8))],
          'steps_per_epoch': steps, 'seconds': seconds}, state.best_params


def table(results: dict[str, dict[str, Any]]) -> str:
  """The source report's table: accuracy per schedule after the last epoch (and at the best epoch)."""
  lines = ['| schedule | train acc | val acc | test acc | best epoch | val acc @best | test acc @best |',
           '|---|---:|---:|---:|---:|---:|---:|']
  for name, r in results.items():
    last, best = r['last'], r['best']
    lines.append(f'| {name} | {100 * last["train"]:.2f} | {100 * last["val"]:.2f} | {100 * last["test"]:.2f} | '
                 f'{r["best_epoch"]} | {100 * best["val"]:.2f} | {100 * best["test"]:.2f} |')
  return '\n'.join(lines) + '\n'


def figure(results: dict[str, dict[str, Any]], path: str, title: str = '') -> None:
  """Learning rate (per step), running training accuracy and validation accuracy per epoch."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(16, 4.5), layout='constrained')
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, 3)
  for name, r in results.items():
    c = r['curves']
    x = np.arange(len(r['lr_per_step'])) * max(1, r['steps_per_epoch'] // 8) / r['steps_per_epoch']
    axes[0].plot(x, r['lr_per_step'], label=name)
    axes[1].plot(c['epoch'], c['train_accuracy'], label=name)
    axes[2].plot(c['epoch'], c['val_accuracy'], label=name)
  for ax, label in zip(axes, ('learning rate', 'training accuracy (running, per epoch)', 'validation accuracy')):
    ax.set_xlabel('epoch')
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
  axes[2].legend()
  if title:
    fig.suptitle(title)
  buf = io.BytesIO()
  fig.savefig(buf, format='png', dpi=100)
  reporting.atomic_write_bytes(path, buf.getvalue())
