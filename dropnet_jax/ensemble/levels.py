"""The ensemble deck's table: one row per DropNet metric (or pool group) x pruning level.

The deck reports, per DropNet metric (global and layer-wise) and pruning level (0 %, 20 %, 50 % of
units pruned), the chosen team, β, the cost and the accuracy change. Here one `experiments.ensemble`
run with `--levels` (and `--group_by=metric`) forms every group x level pool (`pools.select_pools`),
evaluates each as any pool is (`report.evaluate_pool`: all teams scored, HQ per diversity measure
and β, validation-only choices), and this module only lays out the result: no second pipeline, and
a row equals what a run with that level alone gives.

A row is a pool's *validation-selected* HQ pick (`report.pool_summary`'s 'val_selected_pick': of
the HQ overall picks of every diversity measure and β, the one with the best validation accuracy;
ties: the smaller team): its members (seed and cycle of each network), size, the diversity measure
and β that chose it and its focal score under that measure (lower: more diverse), cost (members / M
and the MACs share of the pool), test accuracy and its change against the ensemble of the whole pool
and against the pool's best single network (chosen on validation). The level's actual units pruned
(1 - the members' mean fraction remaining) stands beside the nominal level, since a cycle is only
the closest to it. Scope: 'layer-wise' for a metric whose name has '_layer' (min_layer,
max_layer_official, ...), else 'global'; empty when the pools are not one per metric.
Every HQ overall pick of a row's pool (each measure x β) is in the JSON's 'picks'; the per-pool
ensemble_table.md lists them too.

Files: levels_table.md (Markdown, test accuracies in %), levels_table.csv and levels_table.json
(fractions; the CSV without 'picks').
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

import numpy as np

from dropnet_jax.ensemble.diversity import DIVERSITIES
from dropnet_jax.ensemble.report import PoolResult, _team_label, pool_summary
from dropnet_jax.runs import reporting

FILES = ('levels_table.md', 'levels_table.csv', 'levels_table.json')


def scope(metric: str) -> str:
  return 'layer-wise' if '_layer' in metric else 'global'


def level_rows(results: Sequence[PoolResult], groups: Mapping[str, tuple[str, float | None]]
               ) -> list[dict[str, Any]]:
  """One row per pool (see the module docstring), ordered by group (first appearance), then level."""
  rows = []
  for pool in results:
    group, level = groups[pool.name]
    summary = pool_summary(pool)
    fractions = np.asarray([m['fraction_remaining'] for m in pool.members], np.float64)
    per_metric = all(m.get('metric') == group for m in pool.members)
    row: dict[str, Any] = {
        'group': group, 'scope': scope(group) if per_metric else '', 'level': level,
        'units_pruned': float(1 - fractions.mean()), 'fraction_remaining_min': float(fractions.min()),
        'fraction_remaining_max': float(fractions.max()), 'pool_members': pool.num_members, 'vote': pool.vote,
        'full_test_accuracy': summary['full_test_accuracy'],
        'best_single_test_accuracy': summary['best_single']['test_accuracy']}
    pick = summary['val_selected_pick']
    if pick is not None:
      result = pool.hq[(pick['diversity_metric'], pick['beta'])]
      size_index = pool.sizes.index(result.best_size)
      row.update(team=_team_label(pool, pick['members']), team_members=pick['members'], size=pick['size'],
                 diversity_metric=pick['diversity_metric'], beta=pick['beta'],
                 focal=float(pool.focal[size_index][result.best_index, DIVERSITIES.index(pick['diversity_metric'])]),
                 cost_members=pick['cost_members'], cost_macs=pick['cost_macs'], val_accuracy=pick['val_accuracy'],
                 test_accuracy=pick['test_accuracy'], delta_vs_full=pick['delta_vs_full'],
                 delta_vs_best_single=pick['delta_vs_best_single'])
    row['picks'] = summary['hq_picks']
    rows.append(row)
  group_order = list(dict.fromkeys(r['group'] for r in rows))
  return sorted(rows, key=lambda r: (group_order.index(r['group']), -1 if r['level'] is None else r['level']))


def _percent(value: float | None, signed: bool = False) -> str:
  if value is None:
    return ''
  return f'{100 * value:+.2f}' if signed else f'{100 * value:.2f}'


def markdown(rows: Sequence[Mapping[str, Any]]) -> str:
  """The table in Markdown: one line per group x level, accuracies in %, Δ in percentage points."""
  header = ('| group | scope | level (units pruned) | actual | M | team | size | diversity | β | focal '
            '| cost (members) | cost (MACs) | test acc | Δ vs full | Δ vs best single |')
  lines = [header, '|' + ' --- |' * (header.count('|') - 1)]
  for r in rows:
    level = '' if r['level'] is None else f'{100 * r["level"]:g}%'
    macs = '' if r.get('cost_macs') is None else f'{r["cost_macs"]:.3f}'
    if 'team' not in r:
      picked = '| (no HQ pick) | | | | | | | | | |'
    else:
      picked = (f'| {r["team"]} | {r["size"]} | {r["diversity_metric"]} | {r["beta"]:g} | {r["focal"]:.3f} '
                f'| {r["cost_members"]:.3f} | {macs} | {_percent(r["test_accuracy"])} '
                f'| {_percent(r["delta_vs_full"], True)} | {_percent(r["delta_vs_best_single"], True)} |')
    lines.append(f'| {r["group"]} | {r["scope"]} | {level} | {100 * r["units_pruned"]:.1f}% | {r["pool_members"]} '
                 + picked)
  vote = rows[0]['vote'] if rows else 'soft'
  return ('\n'.join(lines) + f'\n\nActual: units pruned, mean over the pool\'s networks (each the cycle closest to '
          f'the level). Team: seed s, cycle c of each member. Test accuracy with {vote} voting; Δ in percentage '
          'points against the whole pool\'s ensemble and the best single network (chosen on validation).\n')


def write_levels_table(rows: Sequence[Mapping[str, Any]], run_dir) -> list[str]:
  """levels_table.md, .csv (without 'picks') and .json into the run directory; their paths."""
  paths = [run_dir.write_text(FILES[0], markdown(rows))]
  paths.append(run_dir.file(FILES[1]))
  reporting.write_csv(paths[-1], [{k: v for k, v in r.items() if k != 'picks'} for r in rows])
  paths.append(run_dir.write_text(FILES[2], json.dumps(list(rows), indent=2)))
  return paths
