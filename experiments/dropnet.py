r"""Runs DropNet (Algorithm 1) and writes results, figures and a summary table.

  python -m experiments.dropnet --model=fc --widths=40,40 --dataset=mnist \
      --data_dir=../shared/data/mnist_subset --metrics=min,max --seeds=1 --out=runs/fc

Writes <out>/config.json, <out>/results.jsonl (one JSON object per seed x
metric x cycle, rewritten atomically after every cycle) and PNG figures.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags, logging

from dropnet_jax import reporting
from dropnet_jax.checkpoint import Checkpointer
from dropnet_jax.dropnet import DropNetConfig, run_experiment
from dropnet_jax.input_pipeline import DATASETS, DataError, load_dataset
from dropnet_jax.models import MODELS, create_model
from dropnet_jax.train import DeviceData, TrainConfig, Trainer

FLAGS = flags.FLAGS
flags.DEFINE_enum('model', 'fc', sorted(MODELS), 'Model: fc (Model A), conv (Model B), modelc (Model C).')
flags.DEFINE_list('widths', None, 'Units/filters per masked layer, e.g. 40,40 (default: the model\'s).')
flags.DEFINE_enum('dataset', 'digits', DATASETS, 'digits is bundled with scikit-learn (offline default).')
flags.DEFINE_string('data_dir', None, 'Local data files (for mnist: a directory of the four IDX files).')
flags.DEFINE_list('metrics', 'min,max,random,min_layer,max_layer,random_layer', 'Metrics to run.')
flags.DEFINE_integer('seeds', 1, 'Number of seeds, run as 0..N-1.')
flags.DEFINE_float('fraction', 0.2, 'p: fraction of remaining units dropped per cycle, in (0, 1].')
flags.DEFINE_float('floor', 0.1, 'Stop once the fraction of units remaining is <= floor, in (0, 1).')
flags.DEFINE_float('kappa', None, 'Stop once val accuracy <= kappa * dense val accuracy, in (0, 1].')
flags.DEFINE_integer('max_epochs', 100, 'Maximum epochs per training run.')
flags.DEFINE_integer('patience', 5, 'Early-stopping patience on validation loss.')
flags.DEFINE_integer('batch_size', 32, 'SGD batch size.')
flags.DEFINE_float('lr', 0.1, 'SGD learning rate.')
flags.DEFINE_enum('score_from', 'data', ['data', 'epoch'],
                  'data: score with a pass over all training samples (paper); epoch: from the best epoch\'s running sums.')
flags.DEFINE_integer('split_seed', 0, 'Seed of the stratified validation split.')
flags.DEFINE_string('out', None, 'Output directory.', required=True)
flags.DEFINE_bool('verbose_epochs', True, 'Log every epoch (else only every cycle).')
flags.DEFINE_integer('checkpoint_every_epochs', 10, 'Also checkpoint every N epochs inside a cycle (0: only after cycles).')
flags.DEFINE_integer('max_checkpoints', 3, 'Checkpoints kept in <out>/checkpoints.')

# Settings that may differ between a run and its resumption (they do not change results).
RESUMABLE_DIFFERENCES = ('data_dir', 'verbose_epochs', 'checkpoint_every_epochs', 'max_checkpoints')


def parse_widths(values) -> tuple[int, ...] | None:
  if not values:
    return None
  try:
    widths = tuple(int(v) for v in values)
  except ValueError:
    raise ValueError(f'--widths must be positive integers, got {",".join(values)}') from None
  if any(w <= 0 for w in widths):
    raise ValueError(f'--widths must be positive integers, got {",".join(values)}')
  return widths


def build_config() -> DropNetConfig:
  config = DropNetConfig(
      metrics=tuple(FLAGS.metrics), fraction=FLAGS.fraction, floor=FLAGS.floor, kappa=FLAGS.kappa,
      score_from=FLAGS.score_from,
      train=TrainConfig(lr=FLAGS.lr, batch_size=FLAGS.batch_size, max_epochs=FLAGS.max_epochs,
                        patience=FLAGS.patience))
  config.validate()
  if FLAGS.seeds < 1:
    raise ValueError(f'--seeds must be >= 1, got {FLAGS.seeds}')
  return config


def config_mismatch(saved: dict, current: dict) -> list[str]:
  """The settings that differ between a saved configuration and this run."""
  keys = sorted(set(saved) | set(current))
  return [f'{k}: saved {saved.get(k)!r}, now {current.get(k)!r}' for k in keys
          if k not in RESUMABLE_DIFFERENCES and saved.get(k) != current.get(k)]


def main(argv):
  del argv
  try:
    widths = parse_widths(FLAGS.widths)
    config = build_config()
    if FLAGS.checkpoint_every_epochs < 0 or FLAGS.max_checkpoints < 1:
      raise ValueError('--checkpoint_every_epochs must be >= 0 and --max_checkpoints >= 1')
    model = create_model(FLAGS.model, widths, 10)  # validates widths before any data is read
    settings = {'model': FLAGS.model, 'widths': list(model.widths), 'dataset': FLAGS.dataset,
                'data_dir': FLAGS.data_dir, 'seeds': FLAGS.seeds, 'split_seed': FLAGS.split_seed,
                'metrics': list(config.metrics), 'fraction': config.fraction, 'floor': config.floor,
                'kappa': config.kappa, 'score_from': config.score_from, 'lr': config.train.lr,
                'batch_size': config.train.batch_size, 'max_epochs': config.train.max_epochs,
                'patience': config.train.patience}
    config_path = os.path.join(FLAGS.out, 'config.json')
    if os.path.exists(config_path):
      with open(config_path) as f:
        try:
          saved = json.load(f)
        except json.JSONDecodeError as e:
          raise ValueError(f'{config_path} is not valid JSON ({e}); move it away to start afresh') from None
      differences = config_mismatch(saved, settings)
      if differences:
        raise ValueError(f'{FLAGS.out} holds a run with a different configuration ({"; ".join(differences)}); '
                         'use another --out or the same settings to resume')
    elif os.path.exists(os.path.join(FLAGS.out, 'results.jsonl')):
      raise ValueError(f'{FLAGS.out} has results.jsonl but no config.json; refusing to mix runs')
    dataset = load_dataset(FLAGS.dataset, FLAGS.data_dir, split_seed=FLAGS.split_seed)
    if dataset.num_classes != 10:
      model = create_model(FLAGS.model, widths, dataset.num_classes)
  except (ValueError, DataError) as e:  # DataError is a ValueError; named for the reader
    sys.exit(f'error: {e}')

  os.makedirs(FLAGS.out, exist_ok=True)
  reporting.atomic_write_text(config_path, json.dumps(settings, indent=2))
  logging.info('%s: train %d, val %d, test %d, image %s', FLAGS.dataset, len(dataset.train_labels),
               len(dataset.val_labels), len(dataset.test_labels), dataset.image_shape)

  data = DeviceData.from_dataset(dataset)
  trainer = Trainer(model, config.train)
  results_path = os.path.join(FLAGS.out, 'results.jsonl')
  checkpointer = Checkpointer(os.path.join(FLAGS.out, 'checkpoints'), FLAGS.max_checkpoints)
  start = time.perf_counter()
  records = run_experiment(model, dataset.image_shape, data, list(range(FLAGS.seeds)), config, trainer,
                           checkpointer, FLAGS.checkpoint_every_epochs,
                           on_record=lambda rs: reporting.write_jsonl(results_path, rs),
                           log=logging.info, log_epochs=FLAGS.verbose_epochs)
  checkpointer.close()
  wall = time.perf_counter() - start
  figures = reporting.save_figures(records, FLAGS.out, title=f'{FLAGS.model} {list(model.widths)} on {FLAGS.dataset}')
  print(reporting.summary_table(records, 'test_accuracy'))
  print(f'wall time {wall:.1f}s (this invocation); results: {results_path}; figures: {", ".join(figures)}')


if __name__ == '__main__':
  app.run(main)
