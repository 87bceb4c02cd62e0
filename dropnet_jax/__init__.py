"""dropnet_jax: DropNet (Tan & Motani, ICML 2020) and related pruning in JAX/Flax.

The public face (optax-style: a curated API over the packages by concern):

  run(config, out)              DropNet (Algorithm 1) for every seed x metric of an ExperimentConfig,
                                into a run directory (resumable); returns the records
  run_experiment(...)           the same loop in memory, on a model and data you built
  load_results(run_dir)         a run's records (results.jsonl) as a pandas DataFrame, one row per record
  read_records(run_dir)         the same records as a list of dicts (what run returned)
  load_config(run_dir)          a run's ExperimentConfig (config.json), to rerun or vary it
  load_network(run_dir, seed, metric, cycle)   (model, θ, masks) of a saved cycle
  compact(model, θ, masks)      the genuinely smaller network with the same logits
  register_criterion(name)      a new criterion: one pure function, no driver change (replace=True to
                                redefine it, e.g. when a notebook cell runs again)
  ExperimentConfig, DropNetConfig, TrainConfig, ModelConfig, DataConfig, OutputConfig, OptimizerConfig
  create_model, init_params

Names resolve on first use, so `import dropnet_jax` imports no jax (the command line applies
--host_devices before jax starts, and --help stays fast).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = '0.1.0'  # the one place (pyproject.toml reads it; CHANGELOG.md says what changed)

_PUBLIC = {
    'run': ('dropnet_jax.runs.experiment', 'run_config'),
    'run_experiment': ('dropnet_jax.loop.dropnet', 'run_experiment'),
    'load_results': ('dropnet_jax.runs.results', 'load_results'),
    'read_records': ('dropnet_jax.runs.results', 'read_records'),
    'load_config': ('dropnet_jax.runs.experiment', 'load_config'),
    'load_network': ('dropnet_jax.runs.saved_params', 'load_network'),
    'compact': ('dropnet_jax.compaction.compact', 'compact'),
    'register_criterion': ('dropnet_jax.pruning.criteria', 'register'),
    'ExperimentConfig': ('dropnet_jax.config', 'ExperimentConfig'),
    'DropNetConfig': ('dropnet_jax.config', 'DropNetConfig'),
    'TrainConfig': ('dropnet_jax.config', 'TrainConfig'),
    'ModelConfig': ('dropnet_jax.config', 'ModelConfig'),
    'DataConfig': ('dropnet_jax.config', 'DataConfig'),
    'OutputConfig': ('dropnet_jax.config', 'OutputConfig'),
    'OptimizerConfig': ('dropnet_jax.training.optim', 'OptimizerConfig'),
    'create_model': ('dropnet_jax.models', 'create_model'),
    'init_params': ('dropnet_jax.models', 'init_params'),
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
  if name in _PUBLIC:
    module, attribute = _PUBLIC[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_PUBLIC))
