r"""Hyperparameter search with Optuna (dropnet_jax.tuning): resumable, several workers, batched trials.

  python -m experiments.tune --model=fc --widths=40,40 --dataset=mnist \
      --data_dir=../shared/data/mnist_subset --n_trials=30 --max_epochs=25 --out=runs/tune_fc

The study lives in <out>/study.db (SQLite; --storage=postgresql://user@host:port/db for a
cluster). Rerunning the same command continues it (a killed run's trial is failed once its
heartbeat is --grace_period seconds old and retried with the same parameters) until --n_trials
trials are complete or pruned. --workers=N starts N-1 more processes on the same storage; separate
processes (other machines with --storage) may join with --worker_only. --batch=K trains K trials
that share a compiled program's static settings as lanes of one program (see tuning.py).

Outputs (written by every process started without --worker_only, when its workers are done):
trials.csv, best.json (best params and value, trial counts, the final retrain's test accuracy),
optimization_history.png, param_importances.png, parallel_coordinate.png, intermediate_values.png.
The search space comes from --space=<file.json> (SearchSpace's fields) and the --tune_* flags
(a flag given on the command line overrides the file). The objective is validation accuracy; test
accuracy is only measured by the final retrain of the best configuration.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import re
import subprocess
import sys
import time
import warnings

import numpy as np
from absl import app, flags, logging

from experiments import common  # defines the shared flags (model, data, optimiser defaults, --out)

FLAGS = flags.FLAGS
flags.DEFINE_enum('objective', 'train', ['train', 'dropnet'], 'train: best validation accuracy of one '
                  'training run; dropnet: best validation accuracy of a DropNet cycle with <= '
                  '--units_remaining of the units left (searches --tune_fractions and --tune_metrics too).')
flags.DEFINE_float('units_remaining', 0.2, 'dropnet objective: X, the fraction of units remaining (DropNet floor).')
flags.DEFINE_string('study_name', 'tune', 'Study name in the storage.')
flags.DEFINE_string('storage', None, 'Optuna storage URL (default: sqlite:///<out>/study.db); e.g. '
                    'postgresql://user@host:5432/db (pip install psycopg2-binary).')
flags.DEFINE_integer('n_trials', 30, 'Stop once the study has this many complete or pruned trials.')
flags.DEFINE_integer('workers', 1, 'Worker processes on the storage (this one and N-1 started by it).')
flags.DEFINE_integer('worker_id', 0, 'This worker\'s index (varies the sampler seed between workers).')
flags.DEFINE_bool('worker_only', False, 'Only run trials: no outputs, no retrain (extra workers).')
flags.DEFINE_string('ready_file', None, 'Internal (--workers): touched once this worker has loaded its data.')
flags.DEFINE_integer('batch', 1, 'Trials trained together as lanes of one compiled program (1: one at a time).')
flags.DEFINE_integer('lanes_per_chunk', None, 'Lanes vmapped together (default: 1 on CPU, all on accelerators).')
flags.DEFINE_integer('sampler_seed', 0, 'TPE sampler seed (mixed with --worker_id and the trials so far).')
flags.DEFINE_integer('startup_trials', 10, 'Random trials before TPE models the results.')
flags.DEFINE_enum('pruner', 'median', ['median', 'hyperband', 'none'], 'Pruner fed every epoch (cycle).')
flags.DEFINE_integer('pruner_warmup', 2, 'median: epochs before a trial may be pruned.')
flags.DEFINE_integer('pruner_startup_trials', 5, 'median: complete trials before any pruning.')
flags.DEFINE_integer('trial_seed', 0, 'θ0 and shuffle order of every trial (common random numbers).')
flags.DEFINE_integer('train_subset', None, 'Use only this many training examples (a seeded random subset).')
flags.DEFINE_integer('retrain_seeds', 1, 'Final retrain of the best configuration from seeds 0..N-1 (0: none).')
flags.DEFINE_integer('heartbeat_interval', 10, 'Seconds between heartbeats of running trials.')
flags.DEFINE_integer('grace_period', 60, 'A running trial without a heartbeat for this long is failed and retried.')
flags.DEFINE_integer('max_retry', 2, 'Retries of a trial failed by its heartbeat.')
flags.DEFINE_string('space', None, 'JSON file with SearchSpace fields (ranges as [low, high]).')
flags.DEFINE_list('tune_optimizers', 'sgd,momentum,adam', 'Optimisers searched.')
flags.DEFINE_list('tune_lr', '1e-5,1e-1', 'Learning-rate range (log).')
flags.DEFINE_list('tune_momentum', '0.5,0.99', 'Momentum range (momentum, rmsprop); empty: not searched.')
flags.DEFINE_list('tune_weight_decay', '', 'Weight-decay range (log), e.g. 1e-6,1e-2; empty: --weight_decay.')
flags.DEFINE_list('tune_batch_sizes', '64,128,256', 'Batch sizes searched.')
flags.DEFINE_list('tune_schedules', 'constant,cosine,step', 'Schedules searched (constant, cosine, linear, '
                  'step, cyclic, warmup_cosine).')
flags.DEFINE_list('tune_min_lr_factor', '0,0.1', 'cosine/linear/cyclic/warmup_cosine floor range.')
flags.DEFINE_list('tune_step_epochs', '2,10', 'step: epochs between drops (integers).')
flags.DEFINE_list('tune_gamma', '0.1,0.5', 'step: drop factor range (log).')
flags.DEFINE_list('tune_cyclic_half_epochs', '1,4', 'cyclic: half-cycle range in epochs (integers).')
flags.DEFINE_list('tune_warmup_epochs', '1,3', 'warmup_cosine: warmup range in epochs (integers).')
flags.DEFINE_list('tune_augments', 'none', 'Augmentations searched (none, flip, crop, crop,flip as crop+flip).')
flags.DEFINE_list('tune_fractions', '0.1,0.5', 'dropnet objective: range of p.')
flags.DEFINE_list('tune_metrics', 'min,min_layer', 'dropnet objective: criteria searched.')

FIGURES = ('optimization_history', 'param_importances', 'parallel_coordinate', 'intermediate_values')
_INTS = ('batch_sizes', 'step_epochs', 'cyclic_half_epochs', 'warmup_epochs')


def search_space(tuning):
  """SearchSpace from --space, overridden by --tune_* flags given on the command line."""
  d = {}
  if FLAGS.space:
    with open(FLAGS.space) as f:
      d = json.load(f)
  for field in dataclasses.fields(tuning.SearchSpace):
    flag = 'tune_' + field.name
    if FLAGS.space and not FLAGS[flag].present:
      continue
    values = [v for v in FLAGS[flag].value if v != '']
    if field.name == 'augments':
      values = [v.replace('+', ',') for v in values]
    if field.name in ('fractions', 'metrics') and FLAGS.objective != 'dropnet':
      d[field.name] = None
    elif field.name in ('optimizers', 'schedules', 'augments', 'metrics'):
      d[field.name] = values
    else:
      conv = int if field.name in _INTS else float
      d[field.name] = [conv(v) for v in values] or None
  return tuning.SearchSpace.from_dict(d)


def subset(dataset, n):
  """The first n of a seeded permutation of the training split (validation and test unchanged)."""
  if n is None or n >= len(dataset.train_labels):
    return dataset
  idx = np.sort(np.random.default_rng(0).permutation(len(dataset.train_labels))[:n])
  return dataclasses.replace(dataset, train_images=dataset.train_images[idx], train_labels=dataset.train_labels[idx])


def study_settings(setup, space) -> dict:
  """What defines the study (stored with it; a rerun with other values is refused)."""
  keep = {k: v for k, v in setup.settings.items() if k not in ('data_dir', 'seeds', 'batch_trials')}
  return {**keep, 'space': space.to_dict(), 'objective': FLAGS.objective, 'units_remaining': FLAGS.units_remaining,
          'trial_seed': FLAGS.trial_seed, 'train_subset': FLAGS.train_subset}


def redact(url: str) -> str:
  return re.sub(r'//([^:/@]+):[^@]*@', r'//\1:***@', url)


def spawn_workers(n: int) -> list[subprocess.Popen]:
  """Starts workers 1..n-1 (logs in <out>/worker_<i>.log); returns once each has its data loaded (or has
  exited), so all workers start asking trials together."""
  procs, ready = [], []
  for i in range(1, n):
    log = open(os.path.join(FLAGS.out, f'worker_{i}.log'), 'w')
    ready.append(os.path.join(FLAGS.out, f'worker_{i}.ready'))
    if os.path.exists(ready[-1]):
      os.remove(ready[-1])
    argv = [sys.executable, '-m', 'experiments.tune', *sys.argv[1:], '--worker_only', f'--worker_id={i}', '--workers=1',
            f'--ready_file={ready[-1]}']
    procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=os.getcwd()))
  deadline = time.time() + 300
  while time.time() < deadline and not all(os.path.exists(r) or p.poll() is not None for r, p in zip(ready, procs)):
    time.sleep(0.2)
  for r in ready:
    if os.path.exists(r):
      os.remove(r)
  return procs


def trials_rows(study) -> list[dict]:
  rows = []
  names = sorted({p for t in study.trials for p in t.params})
  for t in study.trials:
    dur = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else None
    rows.append({'number': t.number, 'state': t.state.name, 'value': t.value,
                 'epochs': t.user_attrs.get('epochs', len(t.intermediate_values)),
                 'best_epoch': t.user_attrs.get('best_epoch'), 'diverged': t.user_attrs.get('diverged'),
                 'lanes': t.user_attrs.get('lanes'), 'worker': t.user_attrs.get('worker'),
                 'retry_of': t.system_attrs.get('failed_trial'), 'duration_s': dur,
                 'datetime_start': t.datetime_start, **{f'param_{p}': t.params.get(p) for p in names}})
  return rows


def write_outputs(tuning, study, space, setup, dataset, report) -> dict:
  from optuna.trial import TrialState
  from optuna.visualization import matplotlib as ovm
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  from dropnet_jax.runs import reporting

  rows = trials_rows(study)
  buf = io.StringIO()
  if rows:
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  reporting.atomic_write_text(os.path.join(FLAGS.out, 'trials.csv'), buf.getvalue())
  counts = {s.name: n for s, n in tuning.state_counts(study).items()}
  summary = {'study': FLAGS.study_name, 'storage': redact(FLAGS.storage or tuning.sqlite_url(FLAGS.out)),
             'objective': FLAGS.objective, 'trials': counts, 'this_worker': {
                 'trials': len(report.trials), 'seconds': report.seconds,
                 'trials_per_hour': 3600 * len(report.trials) / max(report.seconds, 1e-9), 'batch': FLAGS.batch}}
  complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
  if complete:
    best = study.best_trial
    settings = tuning.complete(best.params, space, setup.config.train,
                               setup.config if FLAGS.objective == 'dropnet' else None)
    summary.update(best_trial=best.number, best_value=best.value, best_params=best.params, best_settings=settings)
    seeds = list(range(FLAGS.retrain_seeds))
    if seeds:
      print(f'retraining the best configuration (trial {best.number}) from seeds {seeds}', flush=True)
      summary['retrain'] = retrain(tuning, setup, dataset, space, settings, seeds)
  reporting.atomic_write_text(os.path.join(FLAGS.out, 'best.json'), json.dumps(summary, indent=2, default=str))
  import optuna
  # Parameters every complete trial has (conditional ones, e.g. momentum, would crowd the plots with
  # None); importances by fANOVA (seeded), over the same parameters.
  common_params = sorted(set.intersection(*[set(t.params) for t in complete])) if complete else []
  kwargs = {'param_importances': {'evaluator': optuna.importance.FanovaImportanceEvaluator(seed=0)},
            'parallel_coordinate': {'params': common_params or None}}
  for name in FIGURES:
    try:
      with warnings.catch_warnings():  # optuna warns about small studies (few trials per region)
        warnings.simplefilter('ignore')
        ax = getattr(ovm, f'plot_{name}')(study, **kwargs.get(name, {}))
      fig = (ax.flat[0] if isinstance(ax, np.ndarray) else ax).figure
      fig.set_size_inches(10, 6)
      fig.tight_layout()
      fig.savefig(os.path.join(FLAGS.out, f'{name}.png'), dpi=100)
      plt.close(fig)
    except Exception as e:  # e.g. importances need two complete trials with varying params
      logging.warning('figure %s not drawn: %s', name, e)
  return summary


def retrain(tuning, setup, dataset, space, settings, seeds) -> dict:
  from dropnet_jax.training.trainer import DeviceData
  data = DeviceData.from_dataset(dataset)
  if FLAGS.objective == 'dropnet':
    obj = tuning.DropNetObjective(setup.model, dataset.image_shape, data, setup.config, FLAGS.units_remaining)
    records = obj.run(settings, seeds)
    final = [[r for r in records if r['seed'] == s and r['fraction_remaining'] <= FLAGS.units_remaining + 1e-9]
             for s in seeds]
    runs = [{'seed': s, **({k: f[-1][k] for k in ('cycle', 'fraction_remaining', 'units', 'val_accuracy',
                                                    'test_accuracy')} if f else {'reached': False})}
            for s, f in zip(seeds, final)]
  else:
    runs = tuning.retrain(setup.model, dataset.image_shape, data, tuning.train_config(settings, setup.config.train),
                          seeds)
  tests = [r['test_accuracy'] for r in runs if 'test_accuracy' in r]
  return {'runs': runs, 'mean_test_accuracy': float(np.mean(tests)) if tests else None}


def main(argv):
  del argv
  from dropnet_jax import tuning
  from dropnet_jax.training.trainer import DeviceData
  try:
    if FLAGS.workers < 1 or FLAGS.batch < 1 or FLAGS.n_trials < 1:
      raise ValueError('--workers, --batch and --n_trials must be positive')
    setup = common.setup_from_flags()
    space = search_space(tuning)
    if FLAGS.objective == 'dropnet' and FLAGS.batch != 1:
      raise ValueError('--batch applies to --objective=train (DropNet trials run one at a time)')
    if FLAGS.objective == 'dropnet' and not 0 < FLAGS.units_remaining < 1:
      raise ValueError(f'--units_remaining must be in (0, 1), got {FLAGS.units_remaining}')
    dataset = subset(setup.dataset, FLAGS.train_subset)
    os.makedirs(FLAGS.out, exist_ok=True)
    url = FLAGS.storage or tuning.sqlite_url(FLAGS.out)
    storage = tuning.make_storage(url, heartbeat_interval=FLAGS.heartbeat_interval, grace_period=FLAGS.grace_period,
                                  max_retry=FLAGS.max_retry)
    study = tuning.open_study(storage, FLAGS.study_name, study_settings(setup, space),
                              pruner=tuning.make_pruner(FLAGS.pruner, setup.config.train.max_epochs,
                                                        FLAGS.pruner_warmup, FLAGS.pruner_startup_trials),
                              seed=FLAGS.sampler_seed, worker_id=FLAGS.worker_id, startup_trials=FLAGS.startup_trials)
  except ValueError as e:
    sys.exit(f'error: {e}')
  print(f'study {FLAGS.study_name} on {redact(url)}: {dict(tuning.state_counts(study))}', flush=True)
  data = DeviceData.from_dataset(dataset)
  if FLAGS.ready_file:
    open(FLAGS.ready_file, 'w').close()
  procs = spawn_workers(FLAGS.workers) if FLAGS.workers > 1 else []
  log = lambda s: print(f'[worker {FLAGS.worker_id}] {s}', flush=True)
  if FLAGS.objective == 'dropnet':
    objective = tuning.DropNetObjective(setup.model, dataset.image_shape, data, setup.config, FLAGS.units_remaining,
                                        FLAGS.trial_seed)
    report = tuning.run_worker(study, space, setup.config.train, FLAGS.n_trials, dropnet=objective,
                               worker_id=FLAGS.worker_id, log=log)
  else:
    runner = tuning.LaneRunner(setup.model, dataset.image_shape, data, seed=FLAGS.trial_seed,
                               lanes_per_chunk=FLAGS.lanes_per_chunk)
    report = tuning.run_worker(study, space, setup.config.train, FLAGS.n_trials, runner=runner, batch=FLAGS.batch,
                               worker_id=FLAGS.worker_id, log=log)
  with open(os.path.join(FLAGS.out, f'worker_{FLAGS.worker_id}_{os.getpid()}.json'), 'w') as f:
    json.dump({'worker': tuning.worker_name(FLAGS.worker_id), 'trials': report.trials, 'seconds': report.seconds}, f)
  print(f'worker {FLAGS.worker_id}: {len(report.trials)} trials in {report.seconds:.1f}s '
        f'({3600 * len(report.trials) / max(report.seconds, 1e-9):.0f} trials/hour)', flush=True)
  for p in procs:
    p.wait()
  if FLAGS.worker_only:
    return
  summary = write_outputs(tuning, study, space, setup, dataset, report)
  print(json.dumps({k: summary.get(k) for k in ('trials', 'best_trial', 'best_value', 'best_params')}, default=str))
  if 'retrain' in summary:
    print(f'retrain test accuracy: {summary["retrain"]["mean_test_accuracy"]}')
  print(f'outputs in {FLAGS.out}')


def run() -> None:
  """The `dropnet-tune` console command (pyproject.toml [project.scripts])."""
  flags.FLAGS.set_default('max_epochs', 25)
  app.run(main)


if __name__ == '__main__':
  run()
