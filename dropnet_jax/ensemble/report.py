"""Ensemble pools of pruned networks: evaluation, teams.jsonl, the per-pool table and figures.

A *pool* is a set of M trained networks (e.g. all cycles and seeds of one
DropNet metric), described by one dict per member with at least 'metric',
'seed', 'cycle', 'fraction_remaining' and optionally 'macs' (inference cost),
and by its class probabilities on the validation and test sets ((M, N, C)
arrays, e.g. from `voting.predict_proba`). `evaluate_pool` scores every team of
sizes 2..S on the validation set, runs HQ for every diversity measure and beta,
and computes the validation and test accuracy of every team with both votings.
Only validation data enters a choice (HQ, its per-size and overall picks, the
best single member); test accuracy is reported after selection.

Outputs (`write_report`):
  * teams.jsonl: one record per HQ pick (per pool, diversity measure (the
    record's 'diversity_metric'), beta and size; 'overall' marks the pool's
    overall pick) and per baseline ('full': all M members, 'best_single': the
    best member on validation), with members, size,
    beta, focal and whole-set diversity per measure, val/test accuracy with
    plurality and soft voting, and cost as members/M and as MACs share (the
    team's MACs over the whole pool's, None without 'macs');
  * ensemble_table.md: per pool, the baselines and each overall HQ pick: team,
    beta, cost, test accuracy and its change vs the full pool ensemble and vs
    the best single member (selection voting);
  * ensemble_accuracy_cost.png: test accuracy vs cost of every team, HQ picks
    highlighted (colour: diversity measure, marker: beta), one panel per pool,
    the legend beside the panels;
  * focal_vs_accuracy.png: focal score vs test accuracy of every team, one row
    per pool, one column per diversity measure, colour team size, points faint
    where thousands overlap, Pearson's r in each panel.
`pool_summary` is a pool's entry of summary.json (`experiments.ensemble`) and
`describe` its printed lines.
"""

from __future__ import annotations

import dataclasses
import io
import os
from typing import Any, Mapping, Sequence

import numpy as np

from dropnet_jax.runs import reporting
from dropnet_jax.ensemble.diversity import DIVERSITIES
from dropnet_jax.ensemble.focal import focal_diversity
from dropnet_jax.ensemble.hq import HQResult, hq_prune
from dropnet_jax.ensemble.voting import accuracies_by_size

VOTES = ('plurality', 'soft')


@dataclasses.dataclass
class PoolResult:
  """Everything measured on one pool; per-size tuples are indexed like `sizes`."""
  name: str
  members: list[dict[str, Any]]
  sizes: tuple[int, ...]
  teams: tuple[np.ndarray, ...]  # (T_s, s)
  focal: tuple[np.ndarray, ...]  # (T_s, 4), columns DIVERSITIES
  whole: tuple[np.ndarray, ...]  # (T_s, 4) diversity on all validation samples
  val_accuracy: tuple[np.ndarray, ...]  # (T_s, 2), columns VOTES
  test_accuracy: tuple[np.ndarray, ...]
  member_val_accuracy: np.ndarray  # (M,)
  member_test_accuracy: np.ndarray
  full_val_accuracy: np.ndarray  # (2,) the ensemble of all M
  full_test_accuracy: np.ndarray
  hq: dict[tuple[str, float], HQResult]
  vote: str  # voting used for selection and the table

  @property
  def num_members(self) -> int:
    return len(self.members)

  @property
  def macs(self) -> np.ndarray | None:
    """(M,) members' MACs, or None unless every member has a positive 'macs'."""
    macs = [m.get('macs') for m in self.members]
    if any(v is None for v in macs) or sum(macs) <= 0:
      return None
    return np.asarray(macs, np.float64)

  def team_cost(self, members: Sequence[int]) -> tuple[float, float | None]:
    """(members / M, MACs share of the pool or None)."""
    macs = self.macs
    share = None if macs is None else float(macs[list(members)].sum() / macs.sum())
    return len(members) / self.num_members, share

  def costs(self, teams: np.ndarray) -> np.ndarray:
    """(T,) cost of each team (T, s): MACs share when known, else members / M."""
    macs = self.macs
    if macs is None:
      return np.full(len(teams), teams.shape[1] / self.num_members)
    return macs[teams].sum(1) / macs.sum()


def evaluate_pool(name: str, members: Sequence[Mapping[str, Any]], val_proba: np.ndarray,
                  val_labels: np.ndarray, test_proba: np.ndarray, test_labels: np.ndarray, *,
                  max_size: int = 5, betas: Sequence[float] = (0.1,), vote: str = 'soft',
                  max_negatives: int | None = None, seed: int = 0) -> PoolResult:
  """Scores, HQ-prunes and evaluates every team of sizes 2..max_size of one pool."""
  val_proba, test_proba = np.asarray(val_proba, np.float32), np.asarray(test_proba, np.float32)
  val_labels, test_labels = np.asarray(val_labels), np.asarray(test_labels)
  count = len(members)
  if val_proba.shape[0] != count or test_proba.shape[0] != count:
    raise ValueError(f'{count} members but probabilities for {val_proba.shape[0]} (val) / {test_proba.shape[0]} (test)')
  if vote not in VOTES:
    raise ValueError(f'vote must be one of {VOTES}, got {vote!r}')
  max_size = min(max_size, count)
  val_preds = val_proba.argmax(-1)
  member_val = (val_preds == val_labels).mean(1)
  member_test = (test_proba.argmax(-1) == test_labels).mean(1)
  scores = focal_diversity(val_preds, val_labels, val_proba.shape[-1], max_size,
                           member_accuracy=member_val, max_negatives=max_negatives, seed=seed)
  val_acc = accuracies_by_size(val_proba, val_labels, scores.teams)
  test_acc = accuracies_by_size(test_proba, test_labels, scores.teams)
  everyone = (np.arange(count, dtype=np.int32)[None, :],)
  full_val = accuracies_by_size(val_proba, val_labels, everyone)[0][0]
  full_test = accuracies_by_size(test_proba, test_labels, everyone)[0][0]
  column = VOTES.index(vote)
  hq = {}
  for j, diversity in enumerate(DIVERSITIES):
    for beta in betas:
      hq[(diversity, float(beta))] = hq_prune(scores.teams, [f[:, j] for f in scores.focal],
                                           [a[:, column] for a in val_acc], beta, count)
  return PoolResult(name, [dict(m) for m in members], scores.sizes, scores.teams, scores.focal,
                    scores.whole, val_acc, test_acc, member_val, member_test, full_val, full_test,
                    hq, vote)


def _member_brief(m: Mapping[str, Any]) -> dict[str, Any]:
  return {k: m[k] for k in ('metric', 'seed', 'cycle', 'fraction_remaining') if k in m}


def _record(pool: PoolResult, team: Sequence[int], val: Sequence[float], test: Sequence[float],
            focal: np.ndarray | None, whole: np.ndarray | None, **extra) -> dict[str, Any]:
  cost_members, cost_macs = pool.team_cost(team)
  record = {'pool': pool.name, **extra, 'size': len(team), 'members': [int(i) for i in team],
            'member_info': [_member_brief(pool.members[i]) for i in team]}
  record['focal'] = None if focal is None else dict(zip(DIVERSITIES, map(float, focal)))
  record['diversity'] = None if whole is None else dict(zip(DIVERSITIES, map(float, whole)))
  for split, acc in (('val', val), ('test', test)):
    for v, a in zip(VOTES, acc):
      record[f'{split}_accuracy_{v}'] = float(a)
  record.update(cost_members=cost_members, cost_macs=cost_macs)
  return record


def best_single(pool: PoolResult) -> int:
  """The member with the highest validation accuracy (ties: the first)."""
  return int(np.argmax(pool.member_val_accuracy))


def pool_records(pool: PoolResult) -> list[dict[str, Any]]:
  """teams.jsonl records of one pool: the two baselines, then every HQ pick."""
  single = best_single(pool)
  records = [
      _record(pool, range(pool.num_members), pool.full_val_accuracy, pool.full_test_accuracy,
              None, None, selection='full'),
      _record(pool, [single], [pool.member_val_accuracy[single]] * 2,
              [pool.member_test_accuracy[single]] * 2, None, None, selection='best_single'),
  ]
  for (diversity, beta), result in pool.hq.items():
    for i, (s, c) in enumerate(zip(result.sizes, result.chosen)):
      if c < 0:
        continue
      records.append(_record(
          pool, pool.teams[i][c], pool.val_accuracy[i][c], pool.test_accuracy[i][c],
          pool.focal[i][c], pool.whole[i][c], selection='hq', diversity_metric=diversity,
          beta=beta, overall=(s == result.best_size and c == result.best_index)))
  return records


def _team_label(pool: PoolResult, team: Sequence[int]) -> str:
  mixed = len({m.get('metric') for m in pool.members}) > 1
  parts = []
  for i in team:
    m = pool.members[i]
    label = f's{m.get("seed", "?")}c{m.get("cycle", "?")}'
    parts.append(f'{m.get("metric")}:{label}' if mixed else label)
  return ' '.join(parts)


def ensemble_table(pools: Sequence[PoolResult]) -> str:
  """Markdown table: per pool the baselines and each overall HQ pick, test accuracy in %."""
  header = ('| pool | selection | beta | team | size | cost (members) | cost (MACs) | '
            'val acc | test acc | Δ vs full | Δ vs best single |')
  lines = [header, '|' + ' --- |' * (header.count('|') - 1)]
  for pool in pools:
    col = VOTES.index(pool.vote)
    full = pool.full_test_accuracy[col]
    single = pool.member_test_accuracy[best_single(pool)]
    for r in pool_records(pool):
      if r['selection'] == 'hq' and not r['overall']:
        continue
      vote = pool.vote if r['selection'] != 'best_single' else 'soft'  # one member: both votes agree
      test = r[f'test_accuracy_{vote}']
      selection = r['selection'] if r['selection'] != 'hq' else f'HQ {r["diversity_metric"]}'
      macs = '' if r['cost_macs'] is None else f'{r["cost_macs"]:.3f}'
      team = f'all {pool.num_members}' if r['selection'] == 'full' else _team_label(pool, r['members'])
      lines.append(
          f'| {pool.name} | {selection} | {r.get("beta", "")} | {team} '
          f'| {r["size"]} | {r["cost_members"]:.3f} | {macs} | {100 * r[f"val_accuracy_{vote}"]:.2f} '
          f'| {100 * test:.2f} | {100 * (test - full):+.2f} | {100 * (test - single):+.2f} |')
  return '\n'.join(lines) + f'\n\nAccuracies with {pools[0].vote if pools else "soft"} voting; Δ in percentage points of test accuracy.\n'


DIVERSITY_NAMES = {'CK': "CK (Cohen's kappa)", 'BD': 'BD (binary disagreement)', 'KW': 'KW (Kohavi-Wolpert)',
                   'GD': 'GD (generalized diversity)'}
MAX_COLUMNS = 6  # panels per row of the accuracy-vs-cost figure
_SIZE_COLOURS = ('#1b9e77', '#d95f02', '#7570b3', '#e7298a', '#66a61e', '#e6ab02', '#a6761d', '#666666')


def _figure(rows: int, cols: int, width: float, height: float, legend_width: float = 0.0):
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(width * cols + legend_width, height * rows), layout='constrained')
  FigureCanvasAgg(fig)
  return fig, fig.subplots(rows, cols, squeeze=False)


def _save(fig: Any, path: str) -> str:
  buf = io.BytesIO()
  fig.savefig(buf, format='png', dpi=150)
  reporting.atomic_write_bytes(path, buf.getvalue())
  return path


def _point_alpha(count: int) -> float:
  """Opacity for `count` overlapping points: opaque when few, faint when thousands overlap."""
  return float(np.clip(300.0 / max(count, 1), 0.06, 0.8))


def _legend_beside(ax: Any, handles: Sequence[Any], labels: Sequence[str]) -> None:
  """One legend right of `ax`, top-aligned with it: off the data."""
  ax.legend(handles, labels, loc='upper left', bbox_to_anchor=(1.03, 1.0), borderaxespad=0.0, fontsize='small',
            frameon=False, handletextpad=0.5)


def _teams_phrase(pool: PoolResult) -> str:
  total = sum(len(t) for t in pool.teams)
  sizes = f'{pool.sizes[0]}-{pool.sizes[-1]}' if len(pool.sizes) > 1 else f'{pool.sizes[0]}'
  return f'{pool.name}: M={pool.num_members} networks, {total} teams of size {sizes}'


def _pick_label(choosers: Sequence[tuple[str, float]], betas: Sequence[float]) -> str:
  """Which (measure, beta) chose one team, one line per set of betas: 'CK, GD (all β)' / 'BD (β=0.5)'."""
  by_measure = {d: tuple(sorted(b for m, b in choosers if m == d)) for d in DIVERSITIES}
  groups: dict[tuple[float, ...], list[str]] = {}
  for d, chosen in by_measure.items():
    if chosen:
      groups.setdefault(chosen, []).append(d)
  return '\n'.join(f'{", ".join(ds)} (' + ('all β' if list(b) == list(betas) else 'β=' + '/'.join(f'{x:g}' for x in b))
                   + ')' for b, ds in groups.items())


def plot_accuracy_vs_cost(pools: Sequence[PoolResult], path: str) -> str:
  """Test accuracy vs cost of every team per pool, with the two baselines; each team an HQ overall
  pick chose is starred once and labelled with the measures and betas that chose it (several
  picks are often the same team); the legend beside the first row; more than MAX_COLUMNS pools
  (e.g. metrics x levels) wrap into rows."""
  from matplotlib import patheffects
  from matplotlib.lines import Line2D
  cols = min(len(pools), MAX_COLUMNS)  # many pools (e.g. metrics x levels) wrap into rows of panels
  fig, axes = _figure(-(-len(pools) // cols), cols, 4.6, 3.8 + 0.9 * (len(pools) > cols), legend_width=2.2)
  for ax in axes.flat[len(pools):]:
    ax.set_axis_off()
  betas = sorted({b for pool in pools for _, b in pool.hq})
  for ax, pool in zip(axes.flat, pools):
    col = VOTES.index(pool.vote)
    xs = np.concatenate([pool.costs(t) for t in pool.teams])
    ys = np.concatenate([a[:, col] for a in pool.test_accuracy])
    ax.scatter(xs, ys, s=5, c='0.55', alpha=_point_alpha(len(xs)), linewidths=0, rasterized=True)
    picked: dict[tuple[int, int], list[tuple[str, float]]] = {}
    for (diversity, beta), result in pool.hq.items():
      if result.best_index >= 0:
        picked.setdefault((pool.sizes.index(result.best_size), result.best_index), []).append((diversity, beta))
    key = []
    # Numbered by cost; the key under the panel says which measures and betas chose each team.
    points = sorted((float(pool.costs(pool.teams[i][k][None, :])[0]), float(pool.test_accuracy[i][k, col]), choosers)
                    for (i, k), choosers in picked.items())
    for number, (x, y, choosers) in enumerate(points, start=1):
      ax.scatter([x], [y], s=110, marker='*', c='gold', edgecolors='k', linewidths=0.7, zorder=4)
      ax.annotate(str(number), (x, y), xytext=(4, 4), textcoords='offset points', fontsize='small',
                  fontweight='bold', zorder=5, path_effects=[patheffects.withStroke(linewidth=2.5, foreground='white')])
      key.append(f'{number}: ' + _pick_label(choosers, betas).replace('\n', '; '))
    ax.text(0.0, -0.2, '\n'.join(['HQ overall picks:'] + key) if key else '', transform=ax.transAxes, va='top',
            ha='left', fontsize='small')
    ax.axhline(pool.full_test_accuracy[col], color='k', ls='--', lw=1)
    ax.axhline(pool.member_test_accuracy[best_single(pool)], color='k', ls=':', lw=1)
    ax.set_xlabel("cost: the team's MACs / all M members' MACs" if pool.macs is not None
                  else 'cost: team size / M', fontsize='small')
    ax.set_ylabel(f'test accuracy ({pool.vote} voting)')
    ax.set_title(_teams_phrase(pool), fontsize='small')
  entries = [(Line2D([], [], linestyle='none', marker='o', color='0.55', markersize=4), 'every team'),
             (Line2D([], [], color='k', ls='--', lw=1), 'all M members'),
             (Line2D([], [], color='k', ls=':', lw=1), 'best single member\n(chosen on val)'),
             (Line2D([], [], linestyle='none', marker='*', markersize=10, markerfacecolor='gold', markeredgecolor='k'),
              'HQ overall pick\n(numbered; key\nbelow the panel)')]
  entries += [(Line2D([], [], linestyle='none'), name) for name in DIVERSITY_NAMES.values()]
  _legend_beside(axes[0][-1], [h for h, _ in entries], [label for _, label in entries])  # beside the first row
  return _save(fig, path)


def plot_focal_vs_accuracy(pools: Sequence[PoolResult], path: str) -> str:
  """Focal diversity vs test accuracy of every team: rows pools, columns diversity measures, colour
  team size, faint points where thousands overlap; each panel gives Pearson's r over its teams."""
  from matplotlib.lines import Line2D
  fig, axes = _figure(len(pools), len(DIVERSITIES), 3.0, 2.6, legend_width=2.0)
  sizes = sorted({s for pool in pools for s in pool.sizes})
  colour = {s: _SIZE_COLOURS[i % len(_SIZE_COLOURS)] for i, s in enumerate(sizes)}
  for r, (row, pool) in enumerate(zip(axes, pools)):
    col = VOTES.index(pool.vote)
    acc = np.concatenate([a[:, col] for a in pool.test_accuracy])
    for j, (ax, diversity) in enumerate(zip(row, DIVERSITIES)):
      focal = np.concatenate([f[:, j] for f in pool.focal])
      # Most numerous sizes first, so the few teams of the other sizes stay visible on top.
      for i in sorted(range(len(pool.sizes)), key=lambda i: -len(pool.teams[i])):
        ax.scatter(pool.focal[i][:, j], pool.test_accuracy[i][:, col], s=5, c=colour[pool.sizes[i]],
                   alpha=_point_alpha(len(pool.teams[i])), linewidths=0, rasterized=True)
      r_text = f'r = {np.corrcoef(focal, acc)[0, 1]:+.2f}' if focal.std() > 0 and acc.std() > 0 else 'r: n/a'
      ax.set_title(f'{diversity}, {r_text}', fontsize='small')  # in the title: never over the points
      ax.set_xlim(-0.03, 1.03)  # every measure is in [0, 1]: columns compare directly
      if r == len(pools) - 1:
        ax.set_xlabel('focal diversity (lower: more diverse)', fontsize='small')
      if j == 0:
        ax.set_ylabel(f'{pool.name} (M={pool.num_members})\ntest accuracy', fontsize='small')
      ax.tick_params(labelsize='small')
  handles = [Line2D([], [], linestyle='none', marker='o', color=colour[s], markersize=5) for s in sizes]
  handles += [Line2D([], [], linestyle='none')] * len(DIVERSITIES)
  _legend_beside(axes[0][-1], handles, [f'team size {s}' for s in sizes] + list(DIVERSITY_NAMES.values()))
  fig.suptitle(f'Focal diversity vs test accuracy of every team ({pools[0].vote if pools else "soft"} voting); '
               "r: Pearson's correlation over a panel's teams", fontsize='medium')
  return _save(fig, path)


def write_report(pools: Sequence[PoolResult], out_dir: str | os.PathLike[str]) -> list[str]:
  """Writes teams.jsonl, ensemble_table.md and the two figures into `out_dir`; returns their paths."""
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  paths = [os.path.join(out_dir, n) for n in ('teams.jsonl', 'ensemble_table.md',
                                              'ensemble_accuracy_cost.png', 'focal_vs_accuracy.png')]
  reporting.write_jsonl(paths[0], [r for pool in pools for r in pool_records(pool)])
  reporting.atomic_write_text(paths[1], ensemble_table(pools))
  plot_accuracy_vs_cost(pools, paths[2])
  plot_focal_vs_accuracy(pools, paths[3])
  return paths


def pool_summary(pool: PoolResult) -> dict[str, Any]:
  """summary.json entry of one pool: test accuracies (selection voting) of the baselines, each HQ
  overall pick, the one of them with the best validation accuracy, the correlation of focal score and
  test accuracy over all teams, and, in hindsight only, the best team by test accuracy."""
  col = VOTES.index(pool.vote)
  full = float(pool.full_test_accuracy[col])
  single = best_single(pool)
  single_acc = float(pool.member_test_accuracy[single])
  picks = []
  for (diversity, beta), result in pool.hq.items():
    if result.best_index < 0:
      continue
    i = pool.sizes.index(result.best_size)
    team = pool.teams[i][result.best_index]
    test = float(pool.test_accuracy[i][result.best_index, col])
    cost_members, cost_macs = pool.team_cost(team)
    picks.append({'diversity_metric': diversity, 'beta': beta, 'members': team.tolist(), 'size': int(len(team)),
                  'val_accuracy': float(pool.val_accuracy[i][result.best_index, col]), 'test_accuracy': test,
                  'cost_members': cost_members, 'cost_macs': cost_macs,
                  'delta_vs_full': test - full, 'delta_vs_best_single': test - single_acc})
  flat = [(float(a[k, col]), i, k) for i, a in enumerate(pool.test_accuracy) for k in range(len(a))]
  best_acc, i, k = max(flat, key=lambda x: (x[0], -x[1]))
  # One answer chosen on validation only: the HQ pick with the best validation accuracy (ties: smaller team).
  chosen = max(picks, key=lambda p: (p['val_accuracy'], -p['size']), default=None)
  acc = np.concatenate([a[:, col] for a in pool.test_accuracy])
  focal = np.concatenate(pool.focal)
  correlation = {d: float(np.corrcoef(focal[:, j], acc)[0, 1]) if focal[:, j].std() > 0 and acc.std() > 0 else None
                 for j, d in enumerate(DIVERSITIES)}
  return {'pool': pool.name, 'members': pool.num_members, 'vote': pool.vote, 'full_test_accuracy': full,
          'best_single': {'member': single, 'val_accuracy': float(pool.member_val_accuracy[single]),
                          'test_accuracy': single_acc},
          'best_member_test_accuracy_hindsight': float(pool.member_test_accuracy.max()),
          'hq_picks': picks, 'val_selected_pick': chosen, 'focal_test_accuracy_correlation': correlation,
          'hq_picks_above_full': sum(p['delta_vs_full'] > 0 for p in picks),
          'hq_picks_above_best_single': sum(p['delta_vs_best_single'] > 0 for p in picks),
          'best_team_by_test_hindsight': {'members': pool.teams[i][k].tolist(), 'test_accuracy': best_acc,
                                          'beats_full': best_acc > full}}


def describe(summary: Mapping[str, Any]) -> str:
  """Lines per pool: does the validation-selected sub-ensemble beat the full pool / the best single member?"""
  s, pick = summary, summary['val_selected_pick']
  lines = [f'{s["pool"]} (M={s["members"]}, {s["vote"]} voting): full pool {100 * s["full_test_accuracy"]:.2f}%, '
           f'best single by val {100 * s["best_single"]["test_accuracy"]:.2f}% test']
  if pick is not None:
    macs = 'n/a' if pick['cost_macs'] is None else f'{pick["cost_macs"]:.3f}'
    lines.append(f'  HQ pick with the best val accuracy: {pick["diversity_metric"]} beta={pick["beta"]} '
                 f'(size {pick["size"]}, MACs share {macs}): '
                 f'{100 * pick["test_accuracy"]:.2f}% test, {100 * pick["delta_vs_full"]:+.2f} pp vs full, '
                 f'{100 * pick["delta_vs_best_single"]:+.2f} pp vs best single; HQ picks above the full pool: '
                 f'{s["hq_picks_above_full"]}/{len(s["hq_picks"])}, above the best single: '
                 f'{s["hq_picks_above_best_single"]}/{len(s["hq_picks"])}')
  h = s['best_team_by_test_hindsight']
  lines.append('  Pearson r of focal score and test accuracy over all teams: ' + ', '.join(
      f'{d} {"n/a" if r is None else f"{r:+.2f}"}' for d, r in s['focal_test_accuracy_correlation'].items()))
  lines.append(f'  hindsight (test-chosen, not a selection): best team of size <= S {100 * h["test_accuracy"]:.2f}%'
               f' ({"above" if h["beats_full"] else "not above"} the full pool)')
  return '\n'.join(lines)
