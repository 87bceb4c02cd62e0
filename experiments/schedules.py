r"""Learning-rate schedules compared: one model trained with each schedule for N epochs.

  python -m experiments.schedules --model=fc --widths=40,40 --dataset=mnist \
      --data_dir=../shared/data/mnist_subset --optimizer=momentum --lr=0.05 --max_epochs=50 --out=runs/schedules

Every schedule starts from the same θ0 and sees the same shuffles (--seed), so the schedule is the
only difference. Training runs all --max_epochs epochs (no early stopping unless --early_stop).
The schedules' parameters are the shared flags (--min_lr_factor, --step_epochs, --lr_gamma,
--cyclic_half_epochs, --warmup_epochs, --warmup_start_factor, --schedule_epochs).

Writes <out>/schedules.json (settings, per-epoch curves and final accuracies per schedule; a rerun
skips the schedules already there with the same settings), <out>/schedules.md (the table: train,
validation and test accuracy after the last epoch, and at the best-validation-loss epoch) and
<out>/schedules.png (learning rate, training and validation accuracy per epoch).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any

import numpy as np
from absl import app, flags, logging

from experiments import common  # the shared flags

FLAGS = flags.FLAGS
flags.DEFINE_list('schedules', 'constant,cosine,linear,step,cyclic,warmup_cosine', 'Schedules to compare.')
flags.DEFINE_integer('seed', 0, 'θ0 and shuffle order shared by every schedule.')
flags.DEFINE_bool('early_stop', False, 'Stop on --patience epochs without a lower validation loss (default: '
                  'train all --max_epochs epochs).')
flags.DEFINE_integer('train_subset', None, 'Use only this many training examples (a seeded random subset).')


def train_schedule(model, image_shape, data, config, seed: int = 0) -> dict[str, Any]:
  """Trains `config` from seed's θ0 and returns per-epoch curves and the final accuracies."""
  from dropnet_jax.training import optim
  from dropnet_jax.loop.dropnet import SeedKeys
  from dropnet_jax.models.layers import full_masks
  from dropnet_jax.models import init_params
  from dropnet_jax.training.trainer import Trainer, fit, steps_per_epoch

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

  def accuracies(theta):
    return {split: float(trainer.evaluate(theta, masks, *xy).accuracy) for split, xy in (
        ('train', (data.train_images, data.train_labels)), ('val', (data.val_images, data.val_labels)),
        ('test', (data.test_images, data.test_labels)))}

  return {'curves': curves, 'last': accuracies(state.params), 'best': accuracies(state.best_params),
          'best_epoch': int(state.best_epoch), 'epochs': int(state.epoch), 'diverged': bool(state.diverged),
          'lr_per_step': [float(schedule(t)) for t in range(0, steps * config.max_epochs, max(1, steps // 8))],
          'steps_per_epoch': steps, 'seconds': seconds}


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
  import io
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  from dropnet_jax.runs import reporting
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


def run(out: str, model, dataset, base, schedules, seed: int, log=logging.info) -> dict[str, dict[str, Any]]:
  """Trains each schedule (skipping those already in <out>/schedules.json with the same settings) and
  writes the json, table and figure."""
  from dropnet_jax.runs import reporting
  from dropnet_jax.config import to_dict
  from dropnet_jax.training.trainer import DeviceData
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, 'schedules.json')
  saved = json.load(open(path)) if os.path.exists(path) else {}
  data = DeviceData.from_dataset(dataset)
  results = {}
  for name in schedules:
    config = dataclasses.replace(base, optim=dataclasses.replace(base.optim, schedule=name))
    config.validate()
    settings = {'config': to_dict(config), 'seed': seed, 'train': int(len(dataset.train_labels))}
    if name in saved and saved[name]['settings'] == json.loads(json.dumps(settings)):
      results[name] = saved[name]
      log(f'{name}: already done')
      continue
    r = train_schedule(model, dataset.image_shape, data, config, seed)
    results[name] = {'settings': settings, **r}
    log(f'{name}: {r["epochs"]} epochs in {r["seconds"]:.1f}s, last val {r["last"]["val"]:.4f} '
        f'test {r["last"]["test"]:.4f}')
    reporting.atomic_write_text(path, json.dumps({**saved, **results}, indent=1))
  reporting.atomic_write_text(os.path.join(out, 'schedules.md'), table(results))
  figure(results, os.path.join(out, 'schedules.png'))
  return results


def main(argv):
  del argv
  from dropnet_jax.training.optim import SCHEDULES
  try:
    bad = [s for s in FLAGS.schedules if s not in SCHEDULES]
    if bad or not FLAGS.schedules:
      raise ValueError(f'--schedules: unknown {bad}; choose from {", ".join(SCHEDULES)}')
    setup = common.setup_from_flags()
  except ValueError as e:
    sys.exit(f'error: {e}')
  base = setup.config.train
  if not FLAGS.early_stop:
    base = dataclasses.replace(base, patience=base.max_epochs)
  dataset = setup.dataset
  if FLAGS.train_subset is not None and FLAGS.train_subset < len(dataset.train_labels):
    idx = np.sort(np.random.default_rng(0).permutation(len(dataset.train_labels))[:FLAGS.train_subset])
    dataset = dataclasses.replace(dataset, train_images=dataset.train_images[idx],
                                  train_labels=dataset.train_labels[idx])
  results = run(FLAGS.out, setup.model, dataset, base, FLAGS.schedules, FLAGS.seed)
  print(table(results))
  print(f'outputs in {FLAGS.out}')


def cli() -> None:
  """The `dropnet-schedules` console command (pyproject.toml [project.scripts]; `run` is the study)."""
  flags.FLAGS.set_default('max_epochs', 50)
  app.run(main)


if __name__ == '__main__':
  cli()
