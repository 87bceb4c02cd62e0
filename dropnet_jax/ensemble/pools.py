"""Pools of a DropNet run's saved networks: which records enter, grouped how, loaded as lanes.

A *pool* is a set of records of one DropNet run (made with --save_params=all):
by default the final record (last cycle) of each DropNet metric x seed;
`PoolConfig.metrics`, `.seeds`, and either `.cycles` or `.min_fraction` /
`.max_fraction` narrow it; `.max_members` thins each pool to evenly spaced
members (in metric, seed, cycle order) so that team enumeration stays small;
`.group` makes one pool per DropNet metric or per seed instead of one mixed pool.
Cycle 0 (the dense θ) is shared by every metric of a seed, so a pool keeps it
once per seed (`DEDENSE_NOTE`).

`.levels` (the ensemble deck's pruning levels, e.g. 0 %, 20 %, 50 % of units
pruned) splits every pool by level: at each level each metric x seed gives the
cycle whose fraction of units remaining is closest to 1 - level. A tie (two
cycles equally close) goes to the less pruned cycle, the network the level is
reached with; a cycle farther than `.level_tolerance` from the level is an error
naming the trial (a level beyond where the run stopped is never silently
replaced by its last cycle). One run then yields the pools of every level, and
each is the same pool a run with that level alone yields.

`read_run` reads what the pools are chosen from (config.json, results.jsonl and
params/spec.json of the run); `load_members` loads the chosen records' θ and
masks stacked along a leading member axis (the lanes of `voting.predict_proba`)
with each member's MACs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Sequence

import jax
import numpy as np

from dropnet_jax import settings
from dropnet_jax.compaction import accounting
from dropnet_jax.config import ExperimentConfig
from dropnet_jax.models.compact import model_from_spec
from dropnet_jax.pruning.masks import masks_from_strings
from dropnet_jax.runs import reporting, saved_params
from dropnet_jax.settings import setting

GROUPS = ('none', 'metric', 'seed')
DEDENSE_NOTE = 'cycle 0 (the dense θ) is shared by every metric of a seed; a pool keeps it once per seed'


def _duplicates(values: Sequence[Any] | None) -> list[Any]:
  return sorted({v for v in values or () if list(values).count(v) > 1}, key=str)


@dataclasses.dataclass(frozen=True)
class PoolConfig:
  """Which records of the DropNet run enter the pools, and how they are grouped into pools."""
  metrics: tuple[str, ...] | None = setting(
      None, "DropNet metrics whose records enter the pool (default: all of the run's).", flag='pool_metrics')
  seeds: tuple[int, ...] | None = setting(None, 'Seeds whose records enter the pool (default: all).',
                                          flag='pool_seeds')
  cycles: tuple[int, ...] | None = setting(
      None, "Cycles that enter the pool (0 = dense). Default: each trial's final cycle, unless "
      '--min_fraction/--max_fraction are given.', flag='pool_cycles')
  min_fraction: float | None = setting(
      None, 'Keep records with fraction_remaining >= this (all cycles considered).', flag='min_fraction')
  max_fraction: float | None = setting(
      None, 'Keep records with fraction_remaining <= this (all cycles considered).', flag='max_fraction')
  min_member_val_accuracy: float = setting(
      0.0, 'Leave out members whose recorded validation accuracy is below this (e.g. constant predictors left '
      'by an emptied layer).', flag='min_member_val_accuracy')
  max_members: int = setting(0, 'Thin each pool to at most this many evenly spaced members (0: no limit).',
                             flag='max_members')
  group: str = setting('none', 'none: one pool of all selected records; metric / seed: one pool per DropNet '
                       'metric / seed.', flag='group_by', choices=GROUPS)
  levels: tuple[float, ...] | None = setting(
      None, 'Pruning levels, fractions of units pruned (e.g. 0,0.2,0.5): per level each metric x seed contributes '
      'the cycle whose fraction remaining is closest to 1 - level (ties: the less pruned one), one pool per level '
      '(and per --group_by group); the levels table compares them.', flag='levels')
  level_tolerance: float = setting(
      0.1, '--levels: the chosen cycle must have 1 - level +- this of its units remaining (else an error naming '
      'the trial: the run stopped before that level, or its cycles are farther apart).', flag='level_tolerance')

  def validate(self) -> None:
    """Raises ValueError naming the offending setting (the flag people type)."""
    for flag, values in (('pool_metrics', self.metrics), ('pool_seeds', self.seeds),
                         ('pool_cycles', self.cycles)):
      if values is not None and not values:
        raise ValueError(f'--{flag}: give at least one value, or leave the flag out for all')
      if _duplicates(values):
        raise ValueError(f'--{flag}: duplicates {",".join(map(str, _duplicates(values)))}')
    for flag, values in (('pool_seeds', self.seeds), ('pool_cycles', self.cycles)):
      if any(v < 0 for v in values or ()):
        raise ValueError(f'--{flag} must be non-negative, got {",".join(map(str, values))}')
    for flag in ('min_fraction', 'max_fraction'):
      value = getattr(self, flag)
      if value is not None and not (math.isfinite(value) and 0 <= value <= 1):
        raise ValueError(f'--{flag} must be in [0, 1], got {value}')
    if self.min_fraction is not None and self.max_fraction is not None and self.min_fraction > self.max_fraction:
      raise ValueError(f'--min_fraction={self.min_fraction} is above --max_fraction={self.max_fraction}')
    if self.cycles is not None and (self.min_fraction is not None or self.max_fraction is not None):
      raise ValueError('give either --pool_cycles or --min_fraction/--max_fraction, not both')
    if self.levels is not None:
      if not self.levels:
        raise ValueError('--levels: give at least one level, or leave the flag out')
      if any(not (math.isfinite(v) and 0 <= v < 1) for v in self.levels):
        raise ValueError('--levels are fractions of units pruned, each in [0, 1), got '
                         f'{",".join(map(str, self.levels))}')
      if _duplicates(self.levels):
        raise ValueError(f'--levels: duplicates {",".join(map(str, _duplicates(self.levels)))}')
      if self.cycles is not None or self.min_fraction is not None or self.max_fraction is not None:
        raise ValueError('give either --levels or --pool_cycles / --min_fraction/--max_fraction, not both')
    if not (math.isfinite(self.level_tolerance) and 0 <= self.level_tolerance <= 1):
      raise ValueError(f'--level_tolerance must be in [0, 1], got {self.level_tolerance}')
    if not (math.isfinite(self.min_member_val_accuracy) and 0 <= self.min_member_val_accuracy <= 1):
      raise ValueError(f'--min_member_val_accuracy must be in [0, 1], got {self.min_member_val_accuracy}')
    if self.max_members < 0 or self.max_members == 1:
      raise ValueError(f'--max_members must be 0 (no limit) or at least 2 (an ensemble), got {self.max_members}')
    if self.group not in GROUPS:
      raise ValueError(f'--group_by must be one of {", ".join(GROUPS)}, got {self.group!r}')


@dataclasses.dataclass(frozen=True)
class DropNetRun:
  """What the pools are chosen from: a DropNet run directory's config, params spec and records."""
  path: str
  config: ExperimentConfig
  stamp: dict[str, Any]
  spec: dict[str, Any]  # params/spec.json: model, widths, num_classes, image_shape
  records: list[dict[str, Any]]


def read_run(path: str) -> DropNetRun:
  """The DropNet run in `path`; ValueError naming what is missing."""
  if not os.path.isdir(path):
    raise ValueError(f'--run {path} is not a directory')
  for name in ('config.json', 'results.jsonl'):
    if not os.path.isfile(os.path.join(path, name)):
      raise ValueError(f'--run {path} has no {name}; is it a DropNet run directory (--out of experiments.dropnet)?')
  spec_path = os.path.join(path, 'params', 'spec.json')
  if not os.path.isfile(spec_path):
    raise ValueError(f'--run {path} has no saved params ({spec_path} is missing); rerun the DropNet '
                     'run with --save_params=all (same flags and --out: it resumes and keeps every cycle\'s θ)')
  try:
    with open(os.path.join(path, 'config.json')) as f:
      saved = json.load(f)
    with open(spec_path) as f:
      spec = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f'--run {path}: unreadable config.json or params/spec.json ({e})') from None
  if not isinstance(saved, dict) or saved.get('kind') != 'dropnet' or 'config' not in saved:
    kind = saved.get('kind') if isinstance(saved, dict) else None
    raise ValueError(f'--run {path} is {f"a {kind} run" if kind else "not a DropNet run of this version"}; '
                     'give the --out of experiments.dropnet')
  config = settings.from_dict(ExperimentConfig(), saved['config'], f'--run {path}: config.json')
  return DropNetRun(path, config, saved.get('stamp') or {}, spec,
                    reporting.read_jsonl(os.path.join(path, 'results.jsonl')))


@dataclasses.dataclass(frozen=True)
class Pool:
  """One pool: its name, the --group_by group it holds ('all', a metric, 'seed S') and, with --levels,
  the pruning level (fraction of units pruned) its members were chosen at."""
  name: str
  group: str
  level: float | None
  records: list[dict[str, Any]]


def level_label(level: float) -> str:
  return f'{100 * level:g}% pruned'


def at_level(records: Sequence[dict[str, Any]], level: float, tolerance: float) -> list[dict[str, Any]]:
  """Per metric x seed, the record whose fraction_remaining is closest to 1 - level; of two equally
  close, the less pruned (the earlier cycle). ValueError naming the trial when the closest is farther
  than `tolerance` (the run stopped before that level, or its cycles are farther apart)."""
  target = 1.0 - level
  trials: dict[tuple[str, int], list[dict[str, Any]]] = {}
  for r in records:
    trials.setdefault((r['metric'], int(r['seed'])), []).append(r)
  out = []
  for (metric, seed), recs in trials.items():
    best = min(recs, key=lambda r: (abs(r['fraction_remaining'] - target), -r['fraction_remaining'], r['cycle']))
    if abs(best['fraction_remaining'] - target) > tolerance + 1e-9:
      lowest = min(r['fraction_remaining'] for r in recs)
      raise ValueError(f'--levels={level:g}: seed {seed} {metric} has no cycle with {target:.3g} +- '
                       f'{tolerance:g} of its units remaining (nearest: cycle {best["cycle"]} at '
                       f'{best["fraction_remaining"]:.3g}; its cycles go down to {lowest:.3g}); drop that level or '
                       'raise --level_tolerance')
    out.append(best)
  return out


def select_records(records: Sequence[dict[str, Any]], pool: PoolConfig = PoolConfig()
                   ) -> dict[str, list[dict[str, Any]]]:
  """Pools (name -> records in metric, seed, cycle order) chosen from a run's records (`select_pools`)."""
  return {p.name: p.records for p in select_pools(records, pool)}


def select_pools(records: Sequence[dict[str, Any]], pool: PoolConfig = PoolConfig()) -> list[Pool]:
  """The pools chosen from a run's records, in metric, seed, cycle order within each.

  Without cycles, a fraction range or levels each metric x seed contributes its last
  cycle; with levels, per level its cycle closest to the level (`at_level`), and each
  group's pool is split by level (named '<group>, <level>% pruned', or '<level>%
  pruned' for group none). `min_member_val_accuracy` drops members below it (recorded
  validation accuracy: e.g. networks whose pruning emptied a layer and left a constant
  predictor). Raises ValueError for unknown metrics/seeds, conflicting settings and
  pools with fewer than two members.
  """
  pool.validate()
  run_metrics = list(dict.fromkeys(r['metric'] for r in records))
  run_seeds = sorted({int(r['seed']) for r in records})
  unknown = [m for m in pool.metrics or () if m not in run_metrics]
  if unknown:
    raise ValueError(f'--pool_metrics {",".join(unknown)} not in the run (it has {",".join(run_metrics)})')
  unknown = [s for s in pool.seeds or () if s not in run_seeds]
  if unknown:
    raise ValueError(f'--pool_seeds {",".join(map(str, unknown))} not in the run (it has '
                     f'{",".join(map(str, run_seeds))})')
  metrics = list(pool.metrics or run_metrics)
  seeds = list(pool.seeds if pool.seeds is not None else run_seeds)
  chosen = [r for r in records if r['metric'] in metrics and int(r['seed']) in seeds]
  if pool.levels is not None:
    by_level = [(level, at_level(chosen, level, pool.level_tolerance)) for level in pool.levels]
  elif pool.cycles is not None:
    by_level = [(None, [r for r in chosen if int(r['cycle']) in pool.cycles])]
  elif pool.min_fraction is not None or pool.max_fraction is not None:
    lo = -math.inf if pool.min_fraction is None else pool.min_fraction
    hi = math.inf if pool.max_fraction is None else pool.max_fraction
    by_level = [(None, [r for r in chosen if lo <= r['fraction_remaining'] <= hi])]
  else:
    last: dict[tuple[str, int], dict[str, Any]] = {}
    for r in chosen:
      key = (r['metric'], int(r['seed']))
      if key not in last or r['cycle'] > last[key]['cycle']:
        last[key] = r
    by_level = [(None, list(last.values()))]
  pools: dict[str, Pool] = {}
  for level, level_records in by_level:
    level_records = [r for r in level_records if r['val_accuracy'] >= pool.min_member_val_accuracy]
    level_records.sort(key=lambda r: (metrics.index(r['metric']), int(r['seed']), int(r['cycle'])))
    if not level_records:
      where = '' if level is None else f' at --levels={level:g}'
      raise ValueError(f'the pool is empty{where}: no record of the run matches the selection flags')
    for r in level_records:
      group = {'none': 'all', 'metric': r['metric'], 'seed': f'seed {r["seed"]}'}[pool.group]
      name = group if level is None else (level_label(level) if pool.group == 'none'
                                          else f'{group}, {level_label(level)}')
      members = pools.setdefault(name, Pool(name, group, level, [])).records
      if int(r['cycle']) == 0 and any(int(m['cycle']) == 0 and m['seed'] == r['seed'] for m in members):
        continue  # DEDENSE_NOTE
      members.append(r)
  out = []
  for p in pools.values():
    p = dataclasses.replace(p, records=thin(p.records, pool.max_members))
    if len(p.records) < 2:
      hint = ('more seeds (each metric x seed gives one network per level)' if p.level is not None else
              'e.g. --min_fraction/--max_fraction or more seeds')
      raise ValueError(f'pool {p.name!r} has {len(p.records)} member(s); an ensemble needs at least 2 '
                       f'(widen the selection: {hint})')
    out.append(p)
  return out


def thin(members: Sequence[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
  """At most `limit` members at evenly spaced positions (first and last kept); 0 = all."""
  if limit <= 0 or len(members) <= limit:
    return list(members)
  keep = np.unique(np.round(np.linspace(0, len(members) - 1, limit)).astype(int))
  return [members[i] for i in keep]


def team_count(members: int, max_size: int) -> int:
  """Teams of sizes 2..max_size of `members` networks."""
  return sum(math.comb(members, s) for s in range(2, min(max_size, members) + 1))


def member_key(record: dict[str, Any]) -> tuple[int, str, int]:
  """(seed, metric, cycle): one network of a run."""
  return int(record['seed']), record['metric'], int(record['cycle'])


def load_members(run: DropNetRun, records: Sequence[dict[str, Any]]):
  """(model, θ stacked over members, masks stacked, per-member MACs) of `records`.

  θ shapes are the same for every cycle (pruning masks units, it does not
  shrink layers), so members stack along a new leading axis; masks are inputs.
  """
  spec = run.spec
  model = model_from_spec(spec)
  thetas, masks, macs = [], [], []
  for r in records:
    seed, metric, cycle = member_key(r)
    try:
      theta = saved_params.load_params(run.path, seed, metric, cycle)
    except FileNotFoundError as e:
      raise ValueError(f'{e}; rerun the DropNet run with --save_params=all') from None
    thetas.append(jax.tree.map(np.asarray, theta))
    masks.append(masks_from_strings(r['mask']))
    macs.append(int(accounting.summary(model, spec['image_shape'], masks[-1])['macs']))
  structures = {str(jax.tree.structure(t)) for t in thetas}
  if len(structures) != 1:
    raise ValueError('saved params of the selected records have different structures; pick records of one run')
  stacked = jax.tree.map(lambda *xs: np.stack(xs), *thetas)
  return model, stacked, tuple(np.stack(layer) for layer in zip(*masks)), macs
