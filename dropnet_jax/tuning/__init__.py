"""Hyperparameter search with Optuna over TrainConfig and DropNet settings, trials batched as lanes.

Modules: `space` (search space, configs), `runner` (lanes, retrain, DropNet objective), `study`
(studies, the worker loop), `liveness` (heartbeats, claims, failing dead workers' trials), `storage`.

What a study searches (`SearchSpace`, from flags or a small JSON file): the optimiser, learning rate
(log scale), momentum (for the optimisers that take one), weight decay (log), batch size (a list of
choices, or an integer range with an optional step or log scale), schedule kind and its parameters,
augmentation, the model's dropout rate (a range), and for the DropNet objective the fraction p and
the criterion. A field with one choice (or an empty range) is not searched: its value is fixed.

Objectives (never the test split):
  'train'    the best validation accuracy over the epochs of one training run (the project's
             early stopping on validation loss still ends a run), reported to the pruner every
             epoch (`trial.report(val_accuracy, epoch)`, `trial.should_prune()`).
  'dropnet'  the best validation accuracy among DropNet cycles with at most X of the units
             remaining (`dropnet.run_experiment` with the trial's p, criterion and training
             settings, floor X), reported every cycle; 0 when X is never reached (divergence).

Every trial starts from the same θ0 and shuffle order (`--trial_seed`, DropNet's seed keys), so
trials differ only by their hyperparameters (common random numbers).

Batched trials. What fixes a compiled training program (`optim` module docstring): the optimiser
kind, batch size, schedule kind and its parameters, augmentation, the dropout rate (a model field:
`trial_model`), and which optimiser terms exist.
What does not: the values of the learning rate, momentum and weight decay, which live in the
optimiser state (`optim.with_hyperparams`). `run_worker` asks a *leader* trial, lets the sampler
choose all its parameters, then asks the rest of the batch with the leader's static parameters
pinned (`PinnedSampler`), so the sampler chooses only their dynamic ones. Trials
with the same static parameters (`group_key`: `template_config` and dropout) train as lanes of one compiled program
(`lanes.Lanes`, lane count fixed per batch so nothing recompiles between batches of the same
static shape); each lane reports every epoch and is pruned on its own (its `done` flag is set, a
frozen lane is not computed on CPU), and each result is told separately. With `batch=1` every trial
runs alone with the one-trial programs, which are cached per static shape in the same way. The
price: a batch of K explores the static parameters with one draw, so they are searched K times
more slowly per trial (use a small batch when the static space is large, or fix static settings).

Storage and workers. `make_storage` opens an Optuna RDB storage (an SQLite file by default,
PostgreSQL for clusters) with a heartbeat: a worker claims each trial as Optuna creates it (its first
heartbeat, name, machine and PID, before any sampling), beats for its running trials from a thread,
and every worker fails the trials whose heartbeat is older than the grace period
(`fail_stale_trials`; at once for workers on this machine whose process is gone:
`fail_dead_local_trials`; never claimed, from a worker killed as it asked: `UnclaimedTrials`) and
re-enqueues them with the same parameters
(`RetryHeartbeatStaleTrialCallback`). `run_worker` stops once `n_trials` trials are complete or
pruned, counting trials that other workers are running or that wait in the queue, so several worker
processes (one `--workers=N` run, or separate commands on one storage) share the work without
losing or repeating a trial; with simultaneous asks a study can end up to (workers - 1) x batch
trials over `n_trials`.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

# Optuna is an optional extra. Without it this package still imports (its settings, `config` and
# `space`, need no Optuna, so `experiments.tune --help` and the tune recipes work), and what needs it
# says how to install it: `require_optuna()` as one line for an entry point, before any work; a name
# below that needs Optuna, as an ImportError with the same words.
OPTUNA_MISSING = "dropnet_jax.tuning needs Optuna: pip install -e '.[tune]'"
try:
  import optuna
except ImportError:
  optuna = None
else:
  warnings.filterwarnings('ignore', category=optuna.exceptions.ExperimentalWarning)
  # Heartbeats are recorded by this package's own thread (`Heartbeat`), not by Study.optimize's.
  warnings.filterwarnings('ignore', message='Heartbeat of storage is supposed to be used with Study.optimize')


def require_optuna() -> None:
  """Raises ValueError (one line naming the install command) unless Optuna is installed."""
  if optuna is None:
    raise ValueError(OPTUNA_MISSING)


_MODULES = {
    'space': ('DYNAMIC', 'SearchSpace', 'complete', 'group_key', 'lane_hyperparams', 'searched_dynamic', 'suggest',
              'template_config', 'train_config', 'trial_model'),
    'runner': ('DropNetObjective', 'LaneResult', 'LaneRunner', 'dropnet_value', 'retrain'),
    'study': ('Heartbeat', 'PinnedSampler', 'UnclaimedTrials', 'WorkerReport', 'fail_dead_local_trials', 'machine_id',
              'make_pruner', 'make_storage', 'open_study', 'run_worker', 'sqlite_url', 'state_counts', 'worker_name'),
}
_PUBLIC = {name: module for module, names in _MODULES.items() for name in names}
__all__ = [*_PUBLIC, 'require_optuna']


def __getattr__(name: str) -> Any:
  """The public names resolve on first use (PEP 562), so that the package imports without Optuna."""
  if name not in _PUBLIC:
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
  try:
    module = importlib.import_module(f'{__name__}.{_PUBLIC[name]}')
  except ImportError as e:
    if optuna is None:
      raise ImportError(OPTUNA_MISSING) from e
    raise
  value = getattr(module, name)
  globals()[name] = value
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_PUBLIC))
