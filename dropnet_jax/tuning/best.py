"""The tuned best kept: the best configuration retrained and saved like any run's networks, and the
parameter importances as numbers.

Retrain. A search is affordable only with short trials (the "under 5 M" report: 30 trials x 25
epochs); the best configuration is then trained for real (200 epochs). So the retrain has its own
epoch count (`TuneConfig.retrain_epochs`, default the trials' max_epochs) and starts from the
trials' own θ0 and shuffle order (`trial_seed`; further seeds follow it), so its first run is the
best trial's training, only longer.

Saved as a run's records (`runs.saved_params`), so whatever reads a run's networks reads the tuned
best too (`saved_params.load_network`, `experiments.evaluate`, `init_from`):
  <out>/params/spec.json     the model (with the trial's dropout rate) and image shape;
  <out>/params/seed<S>/...   one orbax checkpoint per retrain seed: θ at the lowest validation loss
                             (the θ the record's accuracies were measured with);
  <out>/results.jsonl        one record per seed: {'seed', 'metric', 'cycle', 'mask', 'units',
                             'fraction_remaining', 'val_accuracy', 'val_loss', 'test_accuracy', ...}.
For the 'train' objective the network is dense: metric 'tuned', cycle 0 (the dense slot,
`params/seed<S>/dense`), so `load_network(out, seed, 'tuned', 0)`. For the 'dropnet' objective the
retrain is a DropNet run with the best p and criterion (its `retrain_epochs` per cycle) and its
records and every cycle's θ are saved as a DropNet run saves them (`--save_params=all`). A rerun that
retrains again first removes the previous retrain's params and records, so they never mix.

Importances: `param_importances.json` beside the figure, from `optuna.importance.get_param_importances`
with the figure's evaluator (fANOVA, seed 0: the same numbers every time, and the ones drawn).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import types
from typing import Any

import numpy as np

from dropnet_jax.loop.driver import RunIO
from dropnet_jax.models.compact import spec_of
from dropnet_jax.models.layers import full_masks
from dropnet_jax.pruning.masks import fraction_remaining, mask_to_strings, units_per_layer
from dropnet_jax.runs import reporting
from dropnet_jax.runs.saved_params import ParamsStore
from dropnet_jax.training.trainer import DeviceData
from dropnet_jax.tuning import runner as runners
from dropnet_jax.tuning.space import train_config, trial_model

METRIC = 'tuned'  # the records' 'metric' of a retrained 'train'-objective best (cycle 0: a dense network)
IMPORTANCE_SEED = 0


def retrain_epochs(config) -> int:
  """The final retrain's max_epochs: `retrain_epochs`, else the trials' own."""
  return config.retrain_epochs if config.retrain_epochs is not None else config.train.max_epochs


def retrain_seeds(config) -> list[int]:
  """The seeds of the final retrain: the trials' own first (`trial_seed`), then the next ones."""
  return [config.trial_seed + i for i in range(config.retrain_seeds)]


def retrain_and_save(setup, settings: dict[str, Any], best_trial: int) -> dict[str, Any]:
  """The best configuration `settings` (of trial `best_trial`) trained again for `retrain_epochs` from
  each retrain seed, saved into the run directory (see the module docstring); best.json's 'retrain'."""
  c, dataset, run_dir = setup.config, setup.dataset, setup.run_dir
  seeds, epochs = retrain_seeds(c), retrain_epochs(c)
  data = DeviceData.from_dataset(dataset)
  model = trial_model(setup.model, settings)
  spec = {**spec_of(model), 'image_shape': list(dataset.image_shape)}
  for stale in ('params', 'results.jsonl'):  # a previous retrain (an earlier best) never mixes in
    path = run_dir.file(stale)
    if os.path.isdir(path):
      shutil.rmtree(path)
    elif os.path.exists(path):
      os.remove(path)
  store = ParamsStore(run_dir.file('params'), 'all', spec)
  if c.objective == 'dropnet':
    base = dataclasses.replace(c.dropnet, train=dataclasses.replace(c.dropnet.train, max_epochs=epochs))
    objective = runners.DropNetObjective(setup.model, dataset.image_shape, data, base, c.units_remaining)
    records = objective.run(settings, seeds, io=RunIO(params_store=store))
    final = [[r for r in records if r['seed'] == s and r['fraction_remaining'] <= c.units_remaining + 1e-9]
             for s in seeds]
    runs = [{'seed': s, **({k: f[-1][k] for k in ('cycle', 'metric', 'fraction_remaining', 'units', 'val_accuracy',
                                                    'test_accuracy')} if f else {'reached': False})}
            for s, f in zip(seeds, final)]
  else:
    masks = full_masks(model)
    trained = {}
    runs = runners.retrain(model, dataset.image_shape, data,
                           dataclasses.replace(train_config(settings, c.train), max_epochs=epochs), seeds,
                           on_trained=lambda seed, theta: trained.__setitem__(seed, theta))
    records = [{'seed': r['seed'], 'metric': METRIC, 'cycle': 0, 'fraction_remaining': fraction_remaining(masks),
                'units': units_per_layer(masks), 'epochs_trained': r['epochs'], 'best_epoch': r['best_epoch'],
                **{k: r[k] for k in ('val_accuracy', 'val_loss', 'test_accuracy', 'test_loss', 'last_test_accuracy')},
                'best_trial': best_trial, 'settings': settings, 'mask': mask_to_strings(masks)} for r in runs]
    for record in records:
      store.saved_cycle(types.SimpleNamespace(seed=record['seed'], metric=METRIC, records=[record]),
                        trained[record['seed']])
  reporting.write_jsonl(run_dir.file('results.jsonl'), records)
  tests = [r['test_accuracy'] for r in runs if 'test_accuracy' in r]
  return {'epochs': epochs, 'seeds': seeds, 'saved': {'params': run_dir.file('params'),
                                                      'records': run_dir.file('results.jsonl'),
                                                      'metric': records[0]['metric'] if records else None},
          'runs': runs, 'mean_test_accuracy': float(np.mean(tests)) if tests else None}


def importance_evaluator():
  """The evaluator of the importances figure and JSON: fANOVA with a fixed seed."""
  import optuna
  return optuna.importance.FanovaImportanceEvaluator(seed=IMPORTANCE_SEED)


def importances(study) -> dict[str, Any]:
  """param_importances.json: optuna's `get_param_importances` (fANOVA, seed 0) over the parameters of
  every complete trial, or None and the reason where Optuna cannot compute them (e.g. < 2 trials)."""
  import optuna
  out: dict[str, Any] = {'evaluator': 'fanova', 'seed': IMPORTANCE_SEED}
  try:
    values = optuna.importance.get_param_importances(study, evaluator=importance_evaluator())
  except (ValueError, RuntimeError) as e:
    return {**out, 'importances': None, 'reason': str(e).splitlines()[0] if str(e) else type(e).__name__}
  return {**out, 'importances': {k: float(v) for k, v in values.items()}}


def write_importances(study, run_dir) -> str:
  return run_dir.write_text('param_importances.json', json.dumps(importances(study), indent=2))
