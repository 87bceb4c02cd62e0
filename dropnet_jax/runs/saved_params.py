"""The trained θ of finished cycles, kept beside a run's checkpoints, and loaded back by record.

Layout under `<out>/params/`: `spec.json` (model name, widths, classes, image
shape: enough to rebuild the model), then one orbax checkpoint per saved
cycle, `seed<S>/dense` for cycle 0 (the dense network, shared by every metric
of the seed) and `seed<S>/<metric>/cycle<C>` for the others. θ is the
best-validation-loss params (with batch-norm statistics where the model has
them): the params the record's accuracies were measured with.

Each checkpoint has a manifest beside it, `<checkpoint>.files.json` (every
file's size and CRC-32): a truncated, deleted or changed file is then reported
in one line naming it before orbax reads anything (orbax's own errors for
such files are pages of tensorstore messages, and its reader threads print
more when a read fails half-way).

Modes (`--save_params`): `all` keeps every cycle (what compaction and
ensemble selection need), `last` only each trial's newest cycle (the one it
stopped at, once finished), `none` nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from typing import Any

from dropnet_jax.runs import reporting
from dropnet_jax.pruning.masks import masks_from_strings
from dropnet_jax.models.compact import model_from_spec

SAVE_MODES = ('all', 'last', 'none')


class SavedParamsError(ValueError):
  """Saved params that are missing or cannot be read (one line naming the trial and path)."""


MANIFEST_SUFFIX = '.files.json'


def _crc32(path: str) -> int:
  crc = 0
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      crc = zlib.crc32(block, crc)
  return crc


def _files(path: str) -> dict[str, list[int]]:
  """{relative path: [size, crc32]} of every file under the checkpoint directory `path`."""
  out = {}
  for root, _, names in os.walk(path):
    for name in names:
      full = os.path.join(root, name)
      out[os.path.relpath(full, path)] = [os.path.getsize(full), _crc32(full)]
  return out


def write_manifest(path: str) -> None:
  reporting.atomic_write_text(path + MANIFEST_SUFFIX, json.dumps(_files(path), sort_keys=True))


def check_manifest(path: str) -> None:
  """Raises SavedParamsError naming the first file of checkpoint `path` that is missing, truncated or
  changed since it was saved; checkpoints saved before manifests existed are not checked."""
  try:
    with open(path + MANIFEST_SUFFIX) as f:
      saved = json.load(f)
  except FileNotFoundError:
    return
  except (OSError, ValueError) as e:
    raise SavedParamsError(f'{path}{MANIFEST_SUFFIX} cannot be read ({e})') from None
  for name, (size, crc) in sorted(saved.items()):
    full = os.path.join(path, name)
    if not os.path.isfile(full):
      raise SavedParamsError(f'{full} is missing: the saved params at {path} are incomplete')
    if os.path.getsize(full) != size:
      raise SavedParamsError(f'{full} is truncated or changed ({os.path.getsize(full)} bytes, saved {size})')
    if _crc32(full) != crc:
      raise SavedParamsError(f'{full} is corrupt (its checksum differs from the one saved)')


def _path(root: str, seed: int, metric: str, cycle: int) -> str:
  if cycle == 0:
    return os.path.join(root, f'seed{seed}', 'dense')
  return os.path.join(root, f'seed{seed}', metric, f'cycle{cycle}')


class ParamsStore:
  """Writes the θ of each finished cycle (`driver.Driver` calls `saved_cycle`)."""

  def __init__(self, directory: str, mode: str, spec: dict[str, Any]):
    if mode not in SAVE_MODES:
      raise ValueError(f'--save_params must be one of {SAVE_MODES}, got {mode!r}')
    self.root, self.mode = os.path.abspath(directory), mode
    import orbax.checkpoint as ocp  # here: entry points import this module for --help, which needs no orbax
    self._checkpointer = ocp.StandardCheckpointer()
    if mode != 'none':
      os.makedirs(self.root, exist_ok=True)
      reporting.atomic_write_text(os.path.join(self.root, 'spec.json'), json.dumps(spec, indent=2))

  def saved_cycle(self, trial, theta) -> None:
    """Saves θ of `trial`'s newest record (rewritten if a resumed run trains that cycle again)."""
    if self.mode == 'none':
      return
    record = trial.records[-1]
    path = _path(self.root, trial.seed, trial.metric, record['cycle'])
    if record['cycle'] > 0 or not os.path.exists(path):  # the dense θ is the same for every metric
      self._checkpointer.save(path, theta, force=True)
      self._checkpointer.wait_until_finished()
      write_manifest(path)
    if self.mode == 'last' and record['cycle'] > 1:
      previous = _path(self.root, trial.seed, trial.metric, record['cycle'] - 1)
      shutil.rmtree(previous, ignore_errors=True)
      if os.path.exists(previous + MANIFEST_SUFFIX):
        os.remove(previous + MANIFEST_SUFFIX)


def load_params(run_dir: str, seed: int, metric: str, cycle: int) -> Any:
  """θ saved for (seed, metric, cycle) of the run in `run_dir`; FileNotFoundError naming what is missing."""
  path = _path(os.path.join(os.path.abspath(run_dir), 'params'), seed, metric, cycle)
  if not os.path.isdir(path):
    raise FileNotFoundError(f'no saved params for seed {seed} metric {metric} cycle {cycle} at {path} '
                            '(was the run made with --save_params=all?)')
  check_manifest(path)
  import orbax.checkpoint as ocp
  try:
    return ocp.StandardCheckpointer().restore(path)
  except Exception as e:  # tensorstore / orbax errors of a truncated, deleted or foreign file
    reason = ' '.join(str(e).split())
    raise SavedParamsError(f'the saved params for seed {seed} metric {metric} cycle {cycle} at {path} cannot be '
                           f'read (truncated or corrupt? {reason[:160]})') from None


def load_network(run_dir: str, seed: int, metric: str, cycle: int):
  """(model, θ, masks, record) of one record of a run: everything to evaluate it again."""
  with open(os.path.join(run_dir, 'params', 'spec.json')) as f:
    spec = json.load(f)
  model = model_from_spec(spec)
  records = [r for r in reporting.read_jsonl(os.path.join(run_dir, 'results.jsonl'))
             if (r['seed'], r['metric'], r['cycle']) == (seed, metric, cycle)]
  if not records:
    raise KeyError(f'{run_dir}/results.jsonl has no record for seed {seed} metric {metric} cycle {cycle}')
  return model, load_params(run_dir, seed, metric, cycle), masks_from_strings(records[0]['mask']), records[0]
