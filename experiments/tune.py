r"""Hyperparameter search with Optuna (dropnet_jax.tuning): resumable, several workers, batched trials.

  python -m experiments.tune --model=fc --widths=40,40 --dataset=mnist \
      --data_dir=../shared/data/mnist_subset --n_trials=30 --max_epochs=25 --retrain_epochs=200 --out=runs/tune_fc

The study lives in <out>/study.db (SQLite; --storage=postgresql://user@host:port/db for a
cluster: a flag of its own, like --out, not written to config.json as it may hold a password).
Rerunning the same command continues it (a killed run's trial is failed once its heartbeat is
--grace_period seconds old, at once when its process is gone from this machine, and retried with
the same parameters) until --n_trials trials are complete or pruned. --workers=N starts N-1 more
processes on the same storage; separate processes (other machines with --storage) may join with
--worker_only. --batch=K trains K trials that share a compiled program's static settings as lanes
of one program (see dropnet_jax.tuning).

Outputs (written by the process started without --worker_only, which holds <out> while it works,
once its workers are done): config.json, trials.csv, best.json (best params and value, trial
counts, the final retrain's test accuracy), optimization_history.png, param_importances.png and
param_importances.json (the same fANOVA importances, seed 0), parallel_coordinate.png,
intermediate_values.png. The final retrain trains the best configuration for --retrain_epochs
(default the trials' --max_epochs) from the trials' θ0 (--retrain_seeds seeds from --trial_seed) and
saves it as a run's records: params/ (spec.json, one checkpoint per seed) and results.jsonl (metric
'tuned', cycle 0; for --objective=dropnet the DropNet records of the best p and criterion), read
back by runs.saved_params.load_network(<out>, seed, 'tuned', 0) and experiments.evaluate.
A pruned trial's value is the one Optuna records (its last reported validation accuracy), in the
log and trials.csv alike; both also give the trial's best epoch's accuracy (best_val_accuracy).
The search space comes from --space=<file.json> (SearchSpace's fields) and the --tune_* flags
(a flag given on the command line overrides the file). The objective is validation accuracy; test
accuracy is only measured by the final retrain of the best configuration. A rerun into a directory
made with other settings or other data is refused before any work; the work is
`dropnet_jax.tuning.experiment` (settings: `dropnet_jax.tuning.config.TuneConfig`).
"""

import json
import sys

from absl import flags

from dropnet_jax.cli import entry
from dropnet_jax import tuning
from dropnet_jax.tuning import config as tune_config

CONFIG = entry.define(tune_config.TuneConfig(), 'tune')
flags.DEFINE_string('storage', None, 'Optuna storage URL (default: sqlite:///<out>/study.db); e.g. '
                    'postgresql://user@host:5432/db (pip install psycopg2-binary). Not written to config.json.')


def _given_space_settings() -> list[str]:
  """The search-space settings given on the command line (they override --space's file)."""
  present = lambda name: name in entry.FLAGS and entry.FLAGS[name].present
  return [leaf.path for leaf in CONFIG.leaves if leaf.path.startswith('space.')
          and (present(f'config.{leaf.path}') or (leaf.flag and present(leaf.flag)))]


def _worker_command() -> list[str]:
  """This entry point as a command, for the workers it starts (`python -m <this module>` in a checkout
  and for the installed console command alike)."""
  module = __spec__.name if __spec__ is not None else None
  start = ['-m', module] if module else [sys.argv[0]]
  return [sys.executable, *start, *sys.argv[1:]]


def main(argv):
  del argv
  try:
    tuning.require_optuna()  # an extra: one line naming the install command, before any work
    from dropnet_jax.tuning import experiment  # here: --help does not need it
    config = tune_config.with_space_file(entry.config(CONFIG, validate=False), _given_space_settings())
    config.validate()
    setup = experiment.prepare(config, entry.FLAGS.out, entry.FLAGS.storage)
    summary = experiment.run(setup, _worker_command(), log=lambda line: print(line, flush=True))
  except ValueError as e:  # includes input_pipeline.DataError and a study with other settings
    entry.fail(e)
  if summary is None:  # --worker_only
    return
  print(json.dumps({k: summary.get(k) for k in ('trials', 'best_trial', 'best_value', 'best_params')}, default=str))
  if 'retrain' in summary:
    print(f'retrain test accuracy: {summary["retrain"]["mean_test_accuracy"]}')
  print(f'outputs in {setup.run_dir.path}')


def run() -> None:
  """The `dropnet-tune` console command (pyproject.toml [project.scripts])."""
  entry.run(main)


if __name__ == '__main__':
  run()
