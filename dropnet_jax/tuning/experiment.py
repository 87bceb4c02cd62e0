"""A hyperparameter search (`experiments.tune`) as one library call: a `TuneConfig`, a directory and a
storage in; trials, trials.csv, best.json and Optuna's figures out.

`prepare(config, out, storage)` checks everything before any work (the settings, the model, the run
directory, the storage URL), then loads the data (the training subset taken) and checks the
directory again against the data's fingerprint. `run(setup, worker_command)` opens the study (created,
or continued when it holds the same settings: the run directory's stamp is stored with it), starts
`workers - 1` more processes (`worker_command` plus `--worker_only`), runs trials until the study has
`n_trials` complete or pruned ones, waits for its workers, and writes the outputs and the final
retrain of the best configuration (for `retrain_epochs`, saved as a run's records: `tuning.best`).

The process started without `worker_only` holds the run directory (its lock and config.json) while it
works; worker processes (its own, or other commands with `--worker_only` on the same storage) check
the directory the same way but neither lock it nor write config.json, so they can share it.
"""

from __future__ import annotations

import csv
import dataclasses
import errno
import io
import json
import os
import re
import subprocess
import time
import warnings
from typing import Any, Callable, Sequence

import numpy as np
from absl import logging

from dropnet_jax.input_pipeline import Dataset, dataset_fingerprint, input_norm_for, load_dataset
from dropnet_jax.models import model_from_config
from dropnet_jax.runs.run_dir import RunDir
from dropnet_jax.runs.schedules import subset_train
from dropnet_jax.training.trainer import DeviceData, Trainer, steps_per_epoch
from dropnet_jax.tuning import best as best_lib, runner as runners, study as studies
from dropnet_jax.tuning.config import TuneConfig
from dropnet_jax.tuning.space import complete

FIGURES = ('optimization_history', 'param_importances', 'parallel_coordinate', 'intermediate_values')
# Settings a spawned worker gets its own value of (removed from the command it is started with).
_WORKER_SETTINGS = ('worker_only', 'worker_id', 'workers', 'ready_file')


@dataclasses.dataclass
class Setup:
  """A checked study: its config, model, data (subset taken), directory and storage URL."""
  config: TuneConfig
  model: Any
  dataset: Dataset
  run_dir: RunDir
  storage_url: str

  @property
  def settings(self) -> dict[str, Any]:
    """What is stored with the study (a rerun with other values is refused): the directory's stamp."""
    return self.run_dir.stamp


def redact(url: str) -> str:
  return re.sub(r'//([^:/@]+):[^@]*@', r'//\1:***@', url)


def prepare(config: TuneConfig, out: str, storage: str | None = None) -> Setup:
  """Checks everything, then loads the data; raises ValueError (input_pipeline.DataError) naming the
  problem before anything is written."""
  config.validate()
  m = config.model
  model_from_config(m, 10)  # the model and widths, before any data is read
  run_dir = RunDir(out, 'tune', config)
  run_dir.check()
  url = storage or studies.sqlite_url(out)
  try:
    url = studies.check_storage(url)
  except ValueError as e:
    raise ValueError(f'--storage={redact(url)}: {e}') from None
  d = config.data
  dataset = subset_train(load_dataset(d.dataset, d.data_dir, split_seed=d.split_seed), config.train_subset)
  run_dir.data_fingerprint = dataset_fingerprint(dataset)  # what the trials train on, wherever it was read from
  run_dir.check()
  model = model_from_config(m, dataset.num_classes, input_norm_for(config.data.normalize, dataset))
  # The base training settings (a trial replaces the searched ones) and their schedule, checked now.
  Trainer(model, config.train, steps_per_epoch=steps_per_epoch(len(dataset.train_labels), config.train.batch_size))
  logging.info('%s: train %d, val %d, test %d', d.dataset, len(dataset.train_labels), len(dataset.val_labels),
               len(dataset.test_labels))
  return Setup(config, model, dataset, run_dir, url)


class StorageFailure(ValueError):
  """The study's database failed mid-study (disk full, server gone): one line, the study resumable."""


def _reason(e: BaseException) -> str:
  inner = getattr(e, 'orig', None) or e.__cause__ or e
  inner = getattr(inner, 'orig', None) or inner
  lines = [line for line in str(inner).splitlines() if line.strip()]
  return lines[0][:200] if lines else type(inner).__name__


def run(setup: Setup, worker_command: Sequence[str] = (), log: Callable[[str], None] = print
        ) -> dict[str, Any] | None:
  """`_run` with a failing database or disk reported in one line (StorageFailure): the study is
  consistent in its database, and the same command continues it once the cause is fixed."""
  import optuna
  import sqlalchemy.exc
  try:
    return _run(setup, worker_command, log)
  except (optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError) as e:
    raise StorageFailure(f'the study\'s storage {redact(setup.storage_url)} failed ({_reason(e)}); rerun the '
                         'same command to continue once it is fixed') from None
  except OSError as e:
    if e.errno != errno.ENOSPC:
      raise
    raise StorageFailure(f'no space left on the device writing {e.filename or setup.run_dir.path}; free some '
                         'and rerun the same command to continue') from None


def _run(setup: Setup, worker_command: Sequence[str] = (), log: Callable[[str], None] = print
         ) -> dict[str, Any] | None:
  """Runs trials into the study (see the module docstring); returns best.json's summary, or None in a
  `worker_only` process. `worker_command` starts this entry point (e.g. [python, -m, experiments.tune,
  *its arguments]); with `workers > 1` the extra workers run it with `--worker_only`. A study that
  holds other settings raises ValueError."""
  config, run_dir = setup.config, setup.run_dir
  run_dir.check()
  if config.worker_only:
    os.makedirs(run_dir.path, exist_ok=True)
    run_trials(setup, _open_study(setup, log), log)
    return None
  with run_dir.open():
    study = _open_study(setup, log)
    procs = []
    try:
      if config.workers > 1:
        procs = spawn_workers(config.workers, run_dir.path, worker_command)
      report = run_trials(setup, study, log)
      for p in procs:
        p.wait()
    finally:
      for p in procs:  # only when this process is interrupted or fails
        if p.poll() is None:
          p.terminate()
    return write_outputs(setup, study, report, log)


def _open_study(setup: Setup, log: Callable[[str], None]):
  c = setup.config
  storage = studies.make_storage(setup.storage_url, heartbeat_interval=c.heartbeat_interval,
                                 grace_period=c.grace_period, max_retry=c.max_retry)
  study = studies.open_study(storage, c.study_name, setup.settings,
                             pruner=studies.make_pruner(c.pruner, c.train.max_epochs, c.pruner_warmup,
                                                        c.pruner_startup_trials),
                             seed=c.sampler_seed, worker_id=c.worker_id, startup_trials=c.startup_trials)
  log(f'study {c.study_name} on {redact(setup.storage_url)}: {dict(studies.state_counts(study))}')
  return study


def run_trials(setup: Setup, study, log: Callable[[str], None]) -> studies.WorkerReport:
  """This process's share of the trials; writes <out>/worker_<id>_<pid>.json (its trials and time)."""
  c, dataset = setup.config, setup.dataset
  data = DeviceData.from_dataset(dataset)
  if c.ready_file:
    open(c.ready_file, 'w').close()
  say = lambda s: log(f'[worker {c.worker_id}] {s}')
  space = c.search_space
  if c.objective == 'dropnet':
    objective = runners.DropNetObjective(setup.model, dataset.image_shape, data, c.dropnet, c.units_remaining,
                                         c.trial_seed)
    report = studies.run_worker(study, space, c.train, c.n_trials, dropnet=objective, worker_id=c.worker_id,
                                log=say)
  else:
    lanes = runners.LaneRunner(setup.model, dataset.image_shape, data, seed=c.trial_seed,
                               lanes_per_chunk=c.lanes_per_chunk)
    report = studies.run_worker(study, space, c.train, c.n_trials, runner=lanes, batch=c.batch,
                                worker_id=c.worker_id, log=say)
  setup.run_dir.write_text(f'worker_{c.worker_id}_{os.getpid()}.json', json.dumps(
      {'worker': studies.worker_name(c.worker_id), 'trials': report.trials, 'seconds': report.seconds}))
  log(f'worker {c.worker_id}: {len(report.trials)} trials in {report.seconds:.1f}s '
      f'({3600 * len(report.trials) / max(report.seconds, 1e-9):.0f} trials/hour)')
  return report


def worker_argv(command: Sequence[str], worker_id: int, ready_file: str) -> list[str]:
  """`command` as worker `worker_id`: its own --worker_only, --worker_id, --workers=1 and --ready_file
  (any given in `command`, short or --config.<name>, removed)."""
  out, skip = [], False
  names = {f'--{p}{n}' for n in _WORKER_SETTINGS for p in ('', 'config.')}
  names |= {f'--no{p}{n}' for n in _WORKER_SETTINGS for p in ('', 'config.')}
  for i, arg in enumerate(command):
    if skip:
      skip = False
      continue
    name = arg.split('=', 1)[0]
    if i > 0 and name in names:
      # `--flag value` (no '='): the value is the next argument, except for the bool --worker_only.
      skip = '=' not in arg and not name.endswith('worker_only') and i + 1 < len(command)
      continue
    out.append(arg)
  return out + ['--worker_only', f'--worker_id={worker_id}', '--workers=1', f'--ready_file={ready_file}']


def spawn_workers(n: int, out: str, command: Sequence[str]) -> list[subprocess.Popen]:
  """Starts workers 1..n-1 (logs in <out>/worker_<i>.log); returns once each has its data loaded (or has
  exited), so all workers start asking trials together."""
  if not command:
    raise ValueError('workers > 1 needs the command that starts a worker')
  procs, ready = [], []
  for i in range(1, n):
    ready.append(os.path.join(out, f'worker_{i}.ready'))
    if os.path.exists(ready[-1]):
      os.remove(ready[-1])
    with open(os.path.join(out, f'worker_{i}.log'), 'w') as log:
      procs.append(subprocess.Popen(worker_argv(command, i, ready[-1]), stdout=log, stderr=subprocess.STDOUT,
                                    cwd=os.getcwd()))
  deadline = time.time() + 300
  while time.time() < deadline and not all(os.path.exists(r) or p.poll() is not None for r, p in zip(ready, procs)):
    time.sleep(0.2)
  for r in ready:
    if os.path.exists(r):
      os.remove(r)
  return procs


def trials_rows(study) -> list[dict[str, Any]]:
  rows = []
  names = sorted({p for t in study.trials for p in t.params})
  for t in study.trials:
    dur = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else None
    rows.append({'number': t.number, 'state': t.state.name, 'value': t.value,
                 'best_val_accuracy': t.user_attrs.get('best_val_accuracy'),
                 'epochs': t.user_attrs.get('epochs', len(t.intermediate_values)),
                 'best_epoch': t.user_attrs.get('best_epoch'), 'diverged': t.user_attrs.get('diverged'),
                 'lanes': t.user_attrs.get('lanes'), 'worker': t.user_attrs.get('worker'),
                 'retry_of': t.system_attrs.get('failed_trial'), 'duration_s': dur,
                 'datetime_start': t.datetime_start, **{f'param_{p}': t.params.get(p) for p in names}})
  return rows


def write_outputs(setup: Setup, study, report: studies.WorkerReport, log: Callable[[str], None]) -> dict[str, Any]:
  """trials.csv, best.json (with the final retrain of the best configuration, saved: params/ and
  results.jsonl), param_importances.json and Optuna's figures."""
  from optuna.trial import TrialState

  c, run_dir = setup.config, setup.run_dir
  rows = trials_rows(study)
  buf = io.StringIO()
  if rows:
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  run_dir.write_text('trials.csv', buf.getvalue())
  counts = {s.name: n for s, n in studies.state_counts(study).items()}
  summary = {'study': c.study_name, 'storage': redact(setup.storage_url), 'objective': c.objective, 'trials': counts,
             'this_worker': {'trials': len(report.trials), 'seconds': report.seconds,
                             'trials_per_hour': 3600 * len(report.trials) / max(report.seconds, 1e-9),
                             'batch': c.batch}}
  complete_trials = [t for t in study.trials if t.state == TrialState.COMPLETE]
  if complete_trials:
    best = study.best_trial
    settings = complete(best.params, c.search_space, c.train, c.dropnet if c.objective == 'dropnet' else None)
    summary.update(best_trial=best.number, best_value=best.value, best_params=best.params, best_settings=settings)
    if c.retrain_seeds:
      log(f'retraining the best configuration (trial {best.number}) for {best_lib.retrain_epochs(c)} epochs from '
          f'seeds {best_lib.retrain_seeds(c)}; saved in {run_dir.file("params")} and results.jsonl')
      summary['retrain'] = best_lib.retrain_and_save(setup, settings, best.number)
  run_dir.write_text('best.json', json.dumps(summary, indent=2, default=str))
  best_lib.write_importances(study, run_dir)
  # Parameters every complete trial has (conditional ones, e.g. momentum, would crowd the plots with
  # None); importances by fANOVA (seeded), over the same parameters.
  common = sorted(set.intersection(*[set(t.params) for t in complete_trials])) if complete_trials else []
  kwargs = {'param_importances': {'evaluator': best_lib.importance_evaluator()},
            'parallel_coordinate': {'params': common or None}}
  _figures(study, run_dir, kwargs)
  return summary


def _figures(study, run_dir: RunDir, kwargs: dict[str, dict[str, Any]]) -> None:
  from optuna.visualization import matplotlib as ovm
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  for name in FIGURES:
    try:
      with warnings.catch_warnings():  # optuna warns about small studies (few trials per region)
        warnings.simplefilter('ignore')
        ax = getattr(ovm, f'plot_{name}')(study, **kwargs.get(name, {}))
      fig = (ax.flat[0] if isinstance(ax, np.ndarray) else ax).figure
      fig.set_size_inches(10, 6)
      fig.tight_layout()
      fig.savefig(run_dir.file(f'{name}.png'), dpi=100)
      plt.close(fig)
    except Exception as e:  # e.g. importances need two complete trials with varying params
      logging.warning('figure %s not drawn: %s', name, e)
