"""Flags and plumbing shared by the experiment entry points (kept thin: the work is in dropnet_jax)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable, Iterator

import numpy as np
from absl import app, flags, logging

from dropnet_jax.training import distributed

from dropnet_jax.runs import progress

from dropnet_jax.runs import reporting
from dropnet_jax.runs.checkpoint import CheckpointError, Checkpointer, newest_meta
from dropnet_jax.loop.driver import stamp_differences
from dropnet_jax.config import AUGMENTATIONS, DropNetConfig, TrainConfig
from dropnet_jax.loop.dropnet import run_experiment
from dropnet_jax.input_pipeline import DATASETS, Dataset, dataset_fingerprint, load_dataset
from dropnet_jax.models import MODELS, create_model, parse_widths
from dropnet_jax.training.optim import OPTIMIZERS, SCHEDULES, OptimizerConfig
from dropnet_jax.runs.lock import RunLock, RunLockedError
from dropnet_jax.runs.saved_params import SAVE_MODES, ParamsStore
from dropnet_jax.training.trainer import DeviceData, Trainer, data_mesh, steps_per_epoch

FLAGS = flags.FLAGS
flags.DEFINE_enum('model', 'fc', sorted(MODELS), 'Model: fc (Model A), conv (Model B), modelc (Model C), resnet18, vgg19.')
flags.DEFINE_list('widths', None, 'Units/filters per masked layer, e.g. 40,40 (default: the model\'s).')
flags.DEFINE_float('width_multiplier', 1.0, 'Without --widths: the model\'s default widths scaled by this (e.g. 0.25 '
                   'for a CPU-sized ResNet18/VGG19).')
flags.DEFINE_enum('dataset', 'digits', DATASETS, 'digits is bundled with scikit-learn (offline default).')
flags.DEFINE_string('data_dir', None, 'Local data files (for mnist: a directory of the four IDX files).')
flags.DEFINE_list('metrics', 'min,max,random,min_layer,max_layer,random_layer',
                  'Criteria to run (dropnet_jax.pruning.criteria: min, max, random, their _layer forms, apoz, apoz_layer, '
                  'oracle, and the official notebook\'s selection rule as *_official).')
flags.DEFINE_integer('seeds', 1, 'Number of seeds, run as 0..N-1.')
flags.DEFINE_float('fraction', 0.2, 'p: fraction of remaining units dropped per cycle, in (0, 1].')
flags.DEFINE_float('floor', 0.1, 'Stop once the fraction of units remaining is <= floor, in (0, 1).')
flags.DEFINE_float('kappa', None, 'Stop once val accuracy <= kappa * dense val accuracy, in (0, 1].')
flags.DEFINE_float('param_budget', None, 'Stop at the first cycle whose compact network has at most this many '
                   'parameters (e.g. 5e6), and report that network.')
flags.DEFINE_float('mac_budget', None, 'Stop at the first cycle whose compact network needs at most this many '
                   'multiply-accumulates per example.')
flags.DEFINE_enum('x_axis', 'fraction', ['fraction', 'params', 'macs'],
                  'x axis of the figures: fraction of units remaining, or the compact network\'s params or MACs.')
flags.DEFINE_integer('max_epochs', 100, 'Maximum epochs per training run.')
flags.DEFINE_integer('patience', 5, 'Early-stopping patience on validation loss.')
flags.DEFINE_integer('batch_size', 32, 'Batch size.')
flags.DEFINE_enum('optimizer', 'sgd', list(OPTIMIZERS), 'sgd (the paper\'s), momentum, adam, adamw, rmsprop, adagrad '
                  'or adadelta, with torch.optim\'s formulas and defaults.')
flags.DEFINE_float('lr', 0.1, 'Peak / initial learning rate (torch\'s default for adadelta is 1.0).')
flags.DEFINE_float('momentum', None, 'momentum: heavy-ball coefficient (default 0.9); rmsprop: momentum (default 0); '
                   'not accepted by the other optimisers.')
flags.DEFINE_bool('nesterov', False, 'Nesterov momentum (--optimizer=momentum).')
flags.DEFINE_float('weight_decay', 0.0, 'L2 coupled into the gradient, as torch\'s weight_decay; decoupled for adamw.')
flags.DEFINE_enum('lr_schedule', 'constant', list(SCHEDULES), 'Learning-rate schedule, counted in optimiser steps.')
flags.DEFINE_float('schedule_epochs', None, 'Length of cosine/linear/warmup_cosine in epochs (default --max_epochs).')
flags.DEFINE_float('min_lr_factor', 0.0, 'Lowest lr as a fraction of --lr (cosine/linear end, cyclic low point).')
flags.DEFINE_float('warmup_epochs', 5.0, 'warmup_cosine: epochs of linear warmup.')
flags.DEFINE_float('warmup_start_factor', 0.0, 'warmup_cosine: the warmup starts at this fraction of --lr.')
flags.DEFINE_float('step_epochs', 30.0, 'step: epochs between learning-rate drops.')
flags.DEFINE_float('lr_gamma', 0.1, 'step: factor of each drop.')
flags.DEFINE_float('cyclic_half_epochs', 2.0, 'cyclic (triangular): epochs from the low point to the peak.')
flags.DEFINE_enum('augment', 'none', list(AUGMENTATIONS), 'On-device training augmentation: random crop with zero '
                  'padding 4 and/or horizontal flip (off by default, as in the paper\'s MNIST/CIFAR runs).')
flags.DEFINE_enum('score_from', 'data', ['data', 'epoch'],
                  'data: score with a pass over all training samples (paper); epoch: from the best epoch\'s running sums.')
flags.DEFINE_enum('score_params', 'best', ['best', 'last'],
                  'θ the criteria score: the best-validation-loss epoch\'s (paper) or the last epoch\'s (official code).')
flags.DEFINE_bool('shuffle', True, 'Reshuffle the training set every epoch (the official notebook did not).')
flags.DEFINE_integer('split_seed', 0, 'Seed of the stratified validation split.')
flags.DEFINE_string('out', None, 'Output directory.', required=True)
flags.DEFINE_bool('verbose', False, 'Also print a line per epoch (by default: a progress bar on a terminal and one '
                  'line per finished cycle).')
flags.DEFINE_alias('verbose_epochs', 'verbose')  # the former name, still accepted
flags.DEFINE_integer('checkpoint_every_epochs', 10, 'Also checkpoint every N epochs inside a cycle (0: only after cycles).')
flags.DEFINE_integer('max_checkpoints', 3, 'Checkpoints kept in <out>/checkpoints.')
flags.DEFINE_bool('batch_trials', False, 'Train all seeds x metrics of a cycle together as lanes of one compiled '
                  'program (the same records). With several devices (or --host_devices on CPU) the trials are '
                  'split over them.')
flags.DEFINE_enum('save_params', 'auto', ['auto', *SAVE_MODES],
                  'Trained params kept in <out>/params: all cycles, the last cycle per trial, or none. auto: all '
                  'for models under 1M parameters, else last.')

flags.DEFINE_bool('distributed', False, 'Several processes (hosts) train the run data-parallel over all their devices '
                  '(jax.distributed; on CPU with gloo collectives). Every process runs the same command; only '
                  'process 0 writes. Without the next three flags they come from the cluster (SLURM, Open MPI).')
flags.DEFINE_string('coordinator_address', None, '--distributed: host:port of process 0\'s coordinator service.')
flags.DEFINE_integer('num_processes', None, '--distributed: number of processes.')
flags.DEFINE_integer('process_id', None, '--distributed: this process\'s index, 0..num_processes-1.')

# Settings that may differ between a run and its resumption (they do not change results).
RESUMABLE_DIFFERENCES = ('data_dir', 'verbose', 'verbose_epochs', 'checkpoint_every_epochs', 'max_checkpoints',
                         'save_params', 'distributed', 'coordinator_address', 'num_processes', 'process_id')


def quiet_logging() -> None:
  """Library logging at WARNING and above (orbax logs every save at INFO, jax its backend search),
  unless --verbosity/-v was given. The run's own lines go through `progress.ProgressMonitor`."""
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)


# Every entry point that imports this module: quiet from flag parsing on, before main runs.
app.call_after_init(quiet_logging)


def initialize_distributed() -> None:
  """--distributed: joins the processes of the run, after flag parsing and before main (and so
  before any jax computation, which would fix the backends to this process alone)."""
  if not FLAGS.distributed:
    if FLAGS.coordinator_address or FLAGS.num_processes is not None or FLAGS.process_id is not None:
      sys.exit('error: --coordinator_address, --num_processes and --process_id need --distributed')
    return
  try:
    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  except (ValueError, RuntimeError) as e:
    sys.exit(f'error: --distributed: {e}')
  logging.info('distributed: %s', distributed.cluster_summary())


app.call_after_init(initialize_distributed)


def trainer_devices():
  """The devices a Trainer spans: every process's with --distributed, else the default (local)."""
  return distributed.global_devices() if FLAGS.distributed else None


def writes_files() -> bool:
  """False in the processes of a distributed run other than process 0: they write nothing."""
  return distributed.is_main()


def optimizer_from_flags() -> OptimizerConfig:
  return OptimizerConfig(
      optimizer=FLAGS.optimizer, lr=FLAGS.lr, momentum=FLAGS.momentum, nesterov=FLAGS.nesterov,
      weight_decay=FLAGS.weight_decay, schedule=FLAGS.lr_schedule, schedule_epochs=FLAGS.schedule_epochs,
      min_lr_factor=FLAGS.min_lr_factor, warmup_epochs=FLAGS.warmup_epochs,
      warmup_start_factor=FLAGS.warmup_start_factor, step_epochs=FLAGS.step_epochs, gamma=FLAGS.lr_gamma,
      cyclic_half_epochs=FLAGS.cyclic_half_epochs)


def build_config() -> DropNetConfig:
  config = DropNetConfig(
      metrics=tuple(FLAGS.metrics), fraction=FLAGS.fraction, floor=FLAGS.floor, kappa=FLAGS.kappa,
      score_from=FLAGS.score_from, score_params=FLAGS.score_params,
      param_budget=FLAGS.param_budget, mac_budget=FLAGS.mac_budget,
      train=TrainConfig(batch_size=FLAGS.batch_size, max_epochs=FLAGS.max_epochs, patience=FLAGS.patience,
                        shuffle=FLAGS.shuffle, augment=FLAGS.augment, optim=optimizer_from_flags()))
  config.validate()
  if FLAGS.seeds < 1:
    raise ValueError(f'--seeds must be >= 1, got {FLAGS.seeds}')
  return config


def config_mismatch(saved: dict, current: dict) -> list[str]:
  """The settings that differ between a saved configuration and this run."""
  keys = sorted(set(saved) | set(current))
  return [f'{k}: saved {saved.get(k)!r}, now {current.get(k)!r}' for k in keys
          if k not in RESUMABLE_DIFFERENCES and saved.get(k) != current.get(k)]



@dataclasses.dataclass
class Setup:
  """Everything an experiment needs, built from the flags and validated before any long work."""
  model: Any
  dataset: Dataset
  config: DropNetConfig
  settings: dict[str, Any]
  seeds: list[int]

  @property
  def data(self) -> DeviceData:
    if not hasattr(self, '_data'):
      if FLAGS.distributed:  # every process loaded the same data: each fills its own devices' replicas
        from jax.sharding import NamedSharding, PartitionSpec
        sharding = NamedSharding(data_mesh(trainer_devices()), PartitionSpec())  # Trainer.replicated's
        self._data = DeviceData(*(distributed.replicate_host_array(a, sharding) for a in (
            self.dataset.train_images, self.dataset.train_labels, self.dataset.val_images,
            self.dataset.val_labels, self.dataset.test_images, self.dataset.test_labels)))
      else:
        self._data = DeviceData.from_dataset(self.dataset)
    return self._data

  def with_config(self, **changes) -> 'Setup':
    """The same setup with some DropNetConfig fields replaced (for studies)."""
    config = dataclasses.replace(self.config, **changes)
    config.validate()
    settings = {**self.settings, **{k: list(v) if isinstance(v, tuple) else v for k, v in changes.items()}}
    return dataclasses.replace(self, config=config, settings=settings)


def setup_from_flags(**config_changes) -> Setup:
  """Validates the flags, then loads the data; raises ValueError (DataError) naming the problem."""
  widths = parse_widths(FLAGS.widths)
  if FLAGS.distributed and FLAGS.batch_trials:
    # Lanes split over the devices are sharded across processes, which the driver's host reads
    # (epoch counts, measurements) do not gather yet.
    raise ValueError('--batch_trials is not supported with --distributed yet; run the trials sequentially')
  config = dataclasses.replace(build_config(), **config_changes)
  config.validate()
  if FLAGS.checkpoint_every_epochs < 0 or FLAGS.max_checkpoints < 1:
    raise ValueError('--checkpoint_every_epochs must be >= 0 and --max_checkpoints >= 1')
  create_model(FLAGS.model, widths, 10, FLAGS.width_multiplier)  # validates --model/--widths before any data is read
  check_out_dir(FLAGS.out, None)
  dataset = load_dataset(FLAGS.dataset, FLAGS.data_dir, split_seed=FLAGS.split_seed)
  model = create_model(FLAGS.model, widths, dataset.num_classes, FLAGS.width_multiplier)
  # The device split and the optimiser's schedule are checked here, before anything is written.
  Trainer(model, config.train, devices=trainer_devices(),
          steps_per_epoch=steps_per_epoch(len(dataset.train_labels), config.train.batch_size))
  settings = {'model': FLAGS.model, 'widths': list(model.widths), 'dataset': FLAGS.dataset,
              'data_dir': FLAGS.data_dir, 'seeds': FLAGS.seeds, 'split_seed': FLAGS.split_seed,
              'metrics': list(config.metrics), 'fraction': config.fraction, 'floor': config.floor,
              'kappa': config.kappa, 'score_from': config.score_from, 'lr': config.train.lr,
              'batch_size': config.train.batch_size, 'max_epochs': config.train.max_epochs,
              'patience': config.train.patience, 'score_params': config.score_params,
              'param_budget': config.param_budget, 'mac_budget': config.mac_budget,
              'shuffle': config.train.shuffle, 'augment': config.train.augment,
              'batch_trials': FLAGS.batch_trials,
              # The optimiser's other settings (the paper's SGD: sgd, no decay, constant).
              **{f'optim_{k}': v for k, v in config.train.optim.to_dict().items() if k != 'lr'},
              # What the data are, wherever they were loaded from: a resume must see the same.
              'data_fingerprint': dataset_fingerprint(dataset)}
  logging.info('%s: train %d, val %d, test %d, image %s', FLAGS.dataset, len(dataset.train_labels),
               len(dataset.val_labels), len(dataset.test_labels), dataset.image_shape)
  return Setup(model, dataset, config, settings, list(range(FLAGS.seeds)))


def stamp(settings: dict[str, Any]) -> dict[str, Any]:
  """The settings a run's results depend on (those a resume may not change), stored in its checkpoints."""
  return {k: v for k, v in settings.items() if k not in RESUMABLE_DIFFERENCES}


def check_out_dir(out: str, settings: dict[str, Any] | None) -> None:
  """Refuses an unusable --out, or one that holds another configuration's run (config.json or, if
  that is gone, the checkpoints' own record of their settings and data) or stray results."""
  if not out:
    raise ValueError('--out is empty; give an output directory')
  if os.path.exists(out) and not os.path.isdir(out):
    raise ValueError(f'--out={out} is a file, not a directory')
  parent = out if os.path.isdir(out) else os.path.dirname(os.path.abspath(out))
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.access(parent, os.W_OK | os.X_OK):
    raise ValueError(f'--out={out}: {parent} is not writable')
  config_path = os.path.join(out, 'config.json')
  if os.path.exists(config_path) and settings is not None:
    with open(config_path) as f:
      try:
        saved = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f'{config_path} is not valid JSON ({e}); move it away to start afresh') from None
    differences = config_mismatch(saved, settings)
    if differences:
      raise ValueError(f'{out} holds a run with a different configuration ({"; ".join(differences)}); '
                       'use another --out or the same settings to resume')
  elif not os.path.exists(config_path) and os.path.exists(os.path.join(out, 'results.jsonl')):
    raise ValueError(f'{out} has results.jsonl but no config.json; refusing to mix runs')
  if settings is not None:  # the checkpoints' own stamp: also when config.json was deleted or edited
    saved_meta = newest_meta(os.path.join(out, 'checkpoints'))
    differences = stamp_differences((saved_meta or {}).get('stamp'), stamp(settings))
    if differences:
      raise ValueError(f'{out}/checkpoints were made with other settings or data ({"; ".join(differences)}); '
                       'use another --out or the same settings to resume')


def results_writer(out: str):
  """A callback writing all records so far to <out>/results.jsonl and results.csv (atomically)."""
  def write(records: list[dict[str, Any]]) -> None:
    if not writes_files():
      return
    reporting.write_jsonl(os.path.join(out, 'results.jsonl'), records)
    reporting.write_csv(os.path.join(out, 'results.csv'), records)
  return write


@contextlib.contextmanager
def open_run(out: str, settings: dict[str, Any]) -> Iterator[Checkpointer]:
  """The run's directory, held for this process: locked against a second run (one line naming the
  holder), config.json written, checkpoints opened; on the way out the last save is finished. Errors
  and Ctrl-C end the program with one line (and nothing half-written)."""
  checkpointer = None
  if not writes_files():  # a distributed run's other processes: no lock, no writes
    try:
      distributed.barrier('open_run')  # process 0 has made the directories and holds the lock
      checkpointer = _SyncedCheckpointer(os.path.join(out, 'checkpoints'), FLAGS.max_checkpoints)
      try:
        yield checkpointer
      finally:
        checkpointer.close()
    except KeyboardInterrupt:
      sys.exit(130)
    except CheckpointError as e:
      sys.exit(f'error: {e}')
    return
  try:
    os.makedirs(out, exist_ok=True)
    with RunLock(out):
      check_out_dir(out, settings)  # again, now that no other run can change it
      reporting.atomic_write_text(os.path.join(out, 'config.json'), json.dumps(settings, indent=2))
      if FLAGS.distributed:
        checkpointer = _SyncedCheckpointer(os.path.join(out, 'checkpoints'), FLAGS.max_checkpoints)
        distributed.barrier('open_run')
      else:
        checkpointer = Checkpointer(os.path.join(out, 'checkpoints'), FLAGS.max_checkpoints)
      try:
        yield checkpointer
      finally:
        checkpointer.close()  # waits for the save in flight: the newest checkpoint is whole
  except KeyboardInterrupt:
    print('interrupted; rerun the same command to resume', file=sys.stderr)
    sys.exit(130)
  except (RunLockedError, CheckpointError) as e:
    sys.exit(f'error: {e}')


class _SyncedCheckpointer(Checkpointer):
  """--distributed: every process restores the same step (no process moves on, and so no process 0
  saves a newer one, until all have read it); saves are written by process 0 only (Checkpointer)."""

  def restore_latest(self, make_template):
    found = super().restore_latest(make_template)
    distributed.barrier('restored')
    return found


class _NoParams:
  """The params store of a distributed run's other processes: saves nothing."""

  def saved_cycle(self, trial, theta) -> None:
    del trial, theta


class _MainParams(ParamsStore):
  """--distributed, process 0: θ (replicated, so its local copy is the value) saved from host memory
  by an orbax checkpointer active in this process alone (no barrier with the others)."""

  def __init__(self, directory: str, mode: str, spec: dict[str, Any]):
    super().__init__(directory, mode, spec)
    import orbax.checkpoint as ocp
    self._checkpointer = ocp.StandardCheckpointer(
        multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=0, active_processes={0}))

  def saved_cycle(self, trial, theta) -> None:
    import jax
    super().saved_cycle(trial, jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), theta))


def make_params_store(out: str, mode: str, spec: dict[str, Any]):
  if not writes_files():
    return _NoParams()
  return (_MainParams if FLAGS.distributed else ParamsStore)(os.path.join(out, 'params'), mode, spec)


def save_params_mode(model, image_shape) -> str:
  """--save_params, with auto resolved: every cycle for small models, the last per trial otherwise."""
  if FLAGS.save_params != 'auto':
    return FLAGS.save_params
  import jax
  from dropnet_jax.models import init_params
  shapes = jax.eval_shape(lambda: init_params(model, jax.random.key(0), image_shape))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  return 'all' if count < 1_000_000 else 'last'


def run_dropnet(out: str, setup: Setup, title: str = '') -> list[dict[str, Any]]:
  """Runs (or resumes) DropNet into `out`: config.json, results.jsonl and .csv, checkpoints/, params/, figures.

  Shows a progress bar on a terminal (elsewhere one line per cycle; per epoch too with --verbose).
  """
  check_out_dir(out, setup.settings)
  # Checks the device split and the optimiser before anything is written.
  trainer = Trainer(setup.model, setup.config.train, devices=trainer_devices(),
                    steps_per_epoch=steps_per_epoch(len(setup.dataset.train_labels), setup.config.train.batch_size))
  mode = save_params_mode(setup.model, setup.dataset.image_shape)
  spec = {'model': setup.settings['model'], 'widths': setup.settings['widths'],
          'num_classes': setup.dataset.num_classes, 'image_shape': list(setup.dataset.image_shape)}
  start = time.perf_counter()
  write = results_writer(out)
  data = trainer.replicate(setup.data) if setup.settings['batch_trials'] else setup.data
  trials = len(setup.seeds) * len(setup.config.metrics)
  cycles = progress.expected_cycles(setup.settings['widths'], setup.config.fraction, setup.config.floor)
  with open_run(out, setup.settings) as checkpointer, progress.ProgressMonitor(trials, cycles) as monitor:
    params_store = make_params_store(out, mode, spec)
    d = setup.dataset
    monitor.log(f'{title or default_title(setup)}: {trials} trial{"s" * (trials != 1)} (seeds x metrics), up to '
                f'{cycles} cycles each; train {len(d.train_labels)}, val {len(d.val_labels)}, '
                f'test {len(d.test_labels)} images -> {out}')
    records = run_experiment(setup.model, setup.dataset.image_shape, data, setup.seeds, setup.config, trainer,
                             checkpointer, FLAGS.checkpoint_every_epochs, on_record=write, log=monitor.log,
                             log_epochs=FLAGS.verbose, batch_trials=setup.settings['batch_trials'],
                             params_store=params_store, monitor=monitor, stamp=stamp(setup.settings))
  logging.info('%s: %d records, %.1fs in this invocation', out, len(records), time.perf_counter() - start)
  if writes_files():
    reporting.save_figures(records, out, title=title or default_title(setup), x_axis=FLAGS.x_axis)
  return records


def run_side_by_side(runs: dict[str, Setup], label: Callable[[str, str], str], title: str) -> list[dict[str, Any]]:
  """Runs (or resumes) each setup into <out>/<name>, then writes the combined records (metric
  relabelled `label(metric, name)`), results.jsonl/.csv, figures and table into <out>: for studies."""
  combined = []
  for name, setup in runs.items():
    records = run_dropnet(os.path.join(FLAGS.out, name), setup)
    combined += [{**r, 'metric': label(r['metric'], name)} for r in records]
  results_writer(FLAGS.out)(combined)
  reporting.save_figures(combined, FLAGS.out, title=title)
  print(reporting.summary_table(combined, 'test_accuracy'))
  return combined


def default_title(setup: Setup) -> str:
  return f'{setup.settings["model"]} {setup.settings["widths"]} on {setup.settings["dataset"]}'
