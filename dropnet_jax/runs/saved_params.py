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

Each checkpoint is written by `tree_save.save_tree`, whole before the call returns: Ctrl-C and SIGTERM
wait for it (no write is left to orbax's threads at exit), a full disk is one OSError naming it. Under
--distributed every process takes part in each write (process 0 writes; see `ParamsStore`).

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

from dropnet_jax.runs import reporting, sparse_params
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

  def __init__(self, directory: str, mode: str, spec: dict[str, Any], *, every_process: bool = False,
               writes: bool = True):
    """`every_process` (--distributed): each process calls `saved_cycle` at the same point with its host copy
    of θ and takes part in orbax's write (its barriers; process 0 writes the arrays, see `tree_save`); only
    the process that `writes` (0) writes spec.json, the manifests and sparse forms, and removes old cycles."""
    if mode not in SAVE_MODES:
      raise ValueError(f'--save_params must be one of {SAVE_MODES}, got {mode!r}')
    self.root, self.mode = os.path.abspath(directory), mode
    self.every_process, self.writes = every_process, writes
    if mode != 'none' and writes:
      os.makedirs(self.root, exist_ok=True)
      reporting.atomic_write_text(os.path.join(self.root, 'spec.json'), json.dumps(spec, indent=2))

  def saved_cycle(self, trial, theta, weight_mask=None) -> None:
    """Saves θ of `trial`'s newest record (rewritten if a resumed run trains that cycle again); with the
    `weight_mask` it was trained under (weight pruning), also the mask and the sparse form beside it."""
    if self.mode == 'none':
      return
    record = trial.records[-1]
    path = _path(self.root, trial.seed, trial.metric, record['cycle'])
    # The dense θ is the same for every metric: saved once, except where processes must agree on every save.
    if record['cycle'] > 0 or self.every_process or not os.path.exists(path):
      # here: entry points import this module for --help, which needs no orbax
      from dropnet_jax.runs.checkpoint import _host_copies, signals_deferred
      from dropnet_jax.runs.tree_save import save_tree
      if self.every_process:
        theta = _host_copies(theta)  # numpy: written by process 0 alone
      with signals_deferred():  # the checkpoint, its manifest and sparse form are whole when an interrupt lands
        save_tree(path, theta)  # one line on a failure (a full disk), nothing in flight at exit
        if self.writes:
          write_manifest(path)
          if weight_mask is not None:
            sparse_params.write(path, theta, weight_mask)
    if self.mode == 'last' and record['cycle'] > 1 and self.writes:
      previous = _path(self.root, trial.seed, trial.metric, record['cycle'] - 1)
      shutil.rmtree(previous, ignore_errors=True)
      for suffix in (MANIFEST_SUFFIX, *sparse_params.SUFFIXES):
        if os.path.exists(previous + suffix):
          os.remove(previous + suffix)


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


# -- records of any run, by selector ------------------------------------------------------------

SELECTOR_HELP = ("RUN_DIR (its seed 0 dense network), RUN_DIR:seed<S>/dense, RUN_DIR:seed<S>/<metric>/cycle<C> "
                 "or RUN_DIR:seed<S>/<metric> (that trial's newest saved cycle); a metric as in results.jsonl, "
                 "e.g. 'min' or 'oneshot s=0.9'")


def parse_selector(selector: str | None) -> tuple[int, str | None, int | None]:
  """(seed, metric, cycle) of a selector: '' or None -> (0, None, 0), 'seed<S>/dense' -> (S, None, 0),
  'seed<S>/<metric>/cycle<C>' -> (S, metric, C), 'seed<S>/<metric>' -> (S, metric, None: the newest saved)."""
  if not selector:
    return 0, None, 0
  parts = selector.strip('/').split('/')
  seed = parts[0][len('seed'):] if parts[0].startswith('seed') else ''
  ok = seed.isdigit() and len(parts) in (2, 3) and all(parts)
  if ok and len(parts) == 2 and parts[1] == 'dense':
    return int(seed), None, 0
  if ok and len(parts) == 3 and parts[2].startswith('cycle') and parts[2][len('cycle'):].isdigit():
    cycle = int(parts[2][len('cycle'):])
    return int(seed), (None if cycle == 0 else parts[1]), cycle
  if ok and len(parts) == 2:
    return int(seed), parts[1], None
  raise ValueError(f'record selector {selector!r}: expected {SELECTOR_HELP}')


EVERY = '*'  # RUN:* = every saved record of the run (where a flag takes several networks)


def split_record_path(value: str, flag: str, *, every: bool = False) -> tuple[str, str | None]:
  """(run directory, record selector or None) of a flag's `RUN[:SELECTOR]` (`RUN:*` too where `every`).

  The one place that splits that spelling (`--networks` of experiments.evaluate, `--init_from`): a
  directory that exists is taken whole (a ':' in its name), else the text after the last ':' is the
  selector, checked by `parse_selector`. Nothing else is read: whether RUN exists and holds saved
  params is the caller's check. Raises ValueError in one line naming `flag`."""
  if not value.strip():
    raise ValueError(f'{flag}: an empty entry')
  if os.path.isdir(value) or ':' not in value:
    return value, None
  path, _, selector = value.rpartition(':')
  if not (every and selector == EVERY):
    try:
      parse_selector(selector)
    except ValueError as e:
      raise ValueError(f'{flag}: {value!r}: {e}') from None
  return path, selector or None


def saved_selectors(run_dir: str) -> list[str]:
  """Every saved record of the run in selector form ('seed0/dense', 'seed0/min/cycle3', ...)."""
  root, out = os.path.join(run_dir, 'params'), []
  for seed in sorted(os.listdir(root)) if os.path.isdir(root) else []:
    if os.path.isdir(os.path.join(root, seed, 'dense')):
      out.append(f'{seed}/dense')
    for metric in sorted(os.listdir(os.path.join(root, seed))) if os.path.isdir(os.path.join(root, seed)) else []:
      cycles = os.path.join(root, seed, metric)
      if metric != 'dense' and os.path.isdir(cycles):
        out += [f'{seed}/{metric}/{c}' for c in sorted(os.listdir(cycles), key=lambda c: (len(c), c))
                if c.startswith('cycle') and os.path.isdir(os.path.join(cycles, c))]
  return out


def _newest_cycle(run_dir: str, seed: int, metric: str) -> int:
  directory = os.path.join(run_dir, 'params', f'seed{seed}', metric)
  cycles = [int(c[len('cycle'):]) for c in (os.listdir(directory) if os.path.isdir(directory) else [])
            if c.startswith('cycle') and c[len('cycle'):].isdigit() and os.path.isdir(os.path.join(directory, c))]
  return max(cycles, default=0)  # nothing past the dense network saved: the dense one


def load_saved(run_dir: str, selector: str | None = None):
  """(model, θ, weight mask or None, record) of one saved record of any run (DropNet, magnitude, ...).

  `selector`: see SELECTOR_HELP (None: seed 0's dense network). θ is the saved dense θ (a weight-pruned
  network's pruned weights exactly 0; the `prune.remove` form); the weight mask is that of a
  weight-pruning record (float32 0/1 per prunable kernel, `pruning.weight_masks`), None for others
  (a DropNet record's unit masks are `masks_from_strings(record['mask'])`). The record is the run's
  results.jsonl row, with 'saved_files' (bytes on disk of the dense, mask and sparse files, from
  `sparse_params`) where a sparse form was saved. Raises ValueError / FileNotFoundError in one line.
  """
  run_dir = os.path.abspath(run_dir)
  spec_path = os.path.join(run_dir, 'params', 'spec.json')
  if not os.path.isfile(spec_path):
    raise FileNotFoundError(f'{run_dir} has no saved params (params/spec.json): not a run directory, or the run '
                            'was made with --save_params=none')
  seed, metric, cycle = parse_selector(selector)
  if cycle is None:
    cycle = _newest_cycle(run_dir, seed, metric)
  path = _path(os.path.join(run_dir, 'params'), seed, metric or '', cycle)
  if not os.path.isdir(path):
    available = saved_selectors(run_dir)
    raise FileNotFoundError(f'{run_dir}: nothing saved for {selector or "seed0/dense"} (saved: '
                            f'{", ".join(available[:12]) or "nothing"}{" ..." if len(available) > 12 else ""})')
  with open(spec_path) as f:
    spec = json.load(f)
  records = [r for r in reporting.read_jsonl(os.path.join(run_dir, 'results.jsonl'))
             if r['seed'] == seed and r['cycle'] == cycle and (cycle == 0 or r['metric'] == metric)]
  if not records:
    raise KeyError(f'{run_dir}/results.jsonl has no record for seed {seed} metric {metric} cycle {cycle}')
  record = dict(records[0])
  sizes = sparse_params.read_sizes(path)
  if sizes is not None:
    record['saved_files'] = sizes
  theta = load_params(run_dir, seed, metric or records[0]['metric'], cycle)
  return model_from_spec(spec), theta, sparse_params.read_mask(path), record
