r"""Focal-diversity HQ ensembles of the networks a DropNet run trained (issue 14, DropNet side).

  python -m experiments.ensemble --run=runs/ens_src --min_fraction=0.2 --max_fraction=0.6 \
      --max_members=20 --betas=0,0.2,0.5 --out=runs/ens_src/ensemble

A *pool* is a set of records of one DropNet run (made with --save_params=all):
by default the final record (last cycle) of each metric x seed; `--pool_metrics`,
`--pool_seeds`, and either `--pool_cycles` or `--min_fraction/--max_fraction`
narrow it; `--max_members` thins each pool to evenly spaced members (in metric,
seed, cycle order) so that team enumeration stays small; `--group_by=metric`
makes one pool per DropNet metric instead of one mixed pool. Each member's
saved θ is loaded, and all members' class probabilities on the run's
validation and test sets (the same split: dataset, data_dir and split_seed
come from the run's config.json) are computed in one batched, compiled pass
(`ensemble.predict_proba`, members as lanes). The recomputed accuracies must
reproduce the records' val/test accuracies, which guards against a wrong
--data_dir or split.

`dropnet_jax.ensemble.evaluate_pool` then scores every team of sizes
2..--max_size, runs HQ for each focal metric and beta and evaluates both
votings; only validation predictions enter a choice. Cost is members / M and
the MACs share (members' MACs from `accounting.summary` of their masks).

Writes into --out (default <run>/ensemble): teams.jsonl, ensemble_table.md,
ensemble_accuracy_cost.png, focal_vs_accuracy.png (see
`ensemble.report`), members.jsonl (each member's record fields, MACs and
recomputed accuracies), summary.json (per pool: the full pool, the best single
member by validation, each HQ overall pick, the one of them with the best
validation accuracy, the correlation of focal score and test accuracy over all
teams, and, in hindsight only, the best team by test accuracy), config.json
(the flags and each pool's rows of members.jsonl), and with --save_proba
proba.npz.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from dropnet_jax import ensemble

from dropnet_jax.compaction import accounting

from dropnet_jax.runs import reporting

from dropnet_jax.runs import saved_params
from dropnet_jax.ensemble.report import VOTES, PoolResult, best_single
from dropnet_jax.input_pipeline import load_dataset
from dropnet_jax.pruning.masks import masks_from_strings
from dropnet_jax.models import create_model

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Declared when run as a program only, so tests can import the pure functions beside other entry points."""
  flags.DEFINE_string('run', None, 'Output directory of a DropNet run made with --save_params=all.', required=True)
  flags.DEFINE_list('pool_metrics', None, 'DropNet metrics whose records enter the pool (default: all of the run\'s).')
  flags.DEFINE_list('pool_seeds', None, 'Seeds whose records enter the pool (default: all).')
  flags.DEFINE_list('pool_cycles', None, 'Cycles that enter the pool (0 = dense). Default: each trial\'s final '
                    'cycle, unless --min_fraction/--max_fraction are given.')
  flags.DEFINE_float('min_fraction', None, 'Keep records with fraction_remaining >= this (all cycles considered).')
  flags.DEFINE_float('max_fraction', None, 'Keep records with fraction_remaining <= this (all cycles considered).')
  flags.DEFINE_float('min_member_val_accuracy', 0.0, 'Leave out members whose recorded validation accuracy is '
                     'below this (e.g. constant predictors left by an emptied layer).')
  flags.DEFINE_integer('max_members', 0, 'Thin each pool to at most this many evenly spaced members (0: no limit).')
  flags.DEFINE_enum('group_by', 'none', ['none', 'metric', 'seed'],
                    'none: one pool of all selected records; metric / seed: one pool per DropNet metric / seed.')
  flags.DEFINE_integer('max_size', 5, 'S: largest team size (teams of sizes 2..S are enumerated).')
  flags.DEFINE_list('betas', '0,0.2,0.5', 'HQ beta values, each in [0, 1].')
  flags.DEFINE_enum('vote', 'soft', list(VOTES), 'Voting used for selection and the table.')
  flags.DEFINE_integer('max_negatives', None, 'Subsample each focal member\'s negatives to this many (default: all).')
  flags.DEFINE_integer('seed', 0, 'Seed of the negative subsample (--max_negatives).')
  flags.DEFINE_string('data_dir', None, 'Override the run\'s data_dir (if the data moved or the run was made '
                      'elsewhere).')
  flags.DEFINE_integer('batch_size', 1000, 'Images per scanned step of the batched prediction.')
  flags.DEFINE_bool('save_proba', False, 'Also write proba.npz (members\' val/test probabilities and labels).')
  flags.DEFINE_string('out', None, 'Output directory (default <run>/ensemble).')


MAX_TEAMS = 2_000_000  # teams of sizes 2..S per pool; beyond this, scoring takes minutes and GBs
# Recomputed accuracies may differ from the records by float near-ties only (vmapped vs plain matmuls).
ACCURACY_SLACK_SAMPLES = 2
DEDENSE_NOTE = 'cycle 0 (the dense θ) is shared by every metric of a seed; a pool keeps it once per seed'


def _ints(values: Sequence[str] | None, flag: str) -> list[int] | None:
  if values is None:
    return None
  try:
    return [int(v) for v in values]
  except ValueError:
    raise ValueError(f'--{flag} must be integers, got {",".join(values)}') from None


def parse_betas(values: Sequence[str]) -> list[float]:
  try:
    betas = [float(v) for v in values]
  except ValueError:
    raise ValueError(f'--betas must be numbers, got {",".join(values)}') from None
  if not betas or any(not 0.0 <= b <= 1.0 for b in betas):
    raise ValueError(f'--betas must be a non-empty list of values in [0, 1], got {",".join(values)}')
  return betas


def read_run(run_dir: str) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
  """(config, params spec, records) of a DropNet run; ValueError naming what is missing."""
  if not os.path.isdir(run_dir):
    raise ValueError(f'--run {run_dir} is not a directory')
  for name in ('config.json', 'results.jsonl'):
    if not os.path.isfile(os.path.join(run_dir, name)):
      raise ValueError(f'--run {run_dir} has no {name}; is it a DropNet run directory (--out of experiments.dropnet)?')
  spec_path = os.path.join(run_dir, 'params', 'spec.json')
  if not os.path.isfile(spec_path):
    raise ValueError(f'--run {run_dir} has no saved params ({spec_path} is missing); rerun the DropNet '
                     'run with --save_params=all (same flags and --out: it resumes and keeps every cycle\'s θ)')
  with open(os.path.join(run_dir, 'config.json')) as f:
    config = json.load(f)
  with open(spec_path) as f:
    spec = json.load(f)
  return config, spec, reporting.read_jsonl(os.path.join(run_dir, 'results.jsonl'))


def select_records(records: Sequence[dict[str, Any]], *, metrics: Sequence[str] | None = None,
                   seeds: Sequence[int] | None = None, cycles: Sequence[int] | None = None,
                   min_fraction: float | None = None, max_fraction: float | None = None,
                   min_val_accuracy: float = 0.0, max_members: int = 0,
                   group_by: str = 'none') -> dict[str, list[dict[str, Any]]]:
  """Pools (name -> records in metric, seed, cycle order) chosen from a run's records.

  Without cycles or a fraction range each metric x seed contributes its last
  cycle. `min_val_accuracy` drops members below it (recorded validation
  accuracy: e.g. networks whose pruning emptied a layer and left a constant
  predictor). Raises ValueError for unknown metrics/seeds, conflicting flags and
  pools with fewer than two members.
  """
  run_metrics = list(dict.fromkeys(r['metric'] for r in records))
  run_seeds = sorted({int(r['seed']) for r in records})
  if cycles is not None and (min_fraction is not None or max_fraction is not None):
    raise ValueError('give either --pool_cycles or --min_fraction/--max_fraction, not both')
  unknown = [m for m in metrics or () if m not in run_metrics]
  if unknown:
    raise ValueError(f'--pool_metrics {",".join(unknown)} not in the run (it has {",".join(run_metrics)})')
  unknown = [s for s in seeds or () if s not in run_seeds]
  if unknown:
    raise ValueError(f'--pool_seeds {",".join(map(str, unknown))} not in the run (it has '
                     f'{",".join(map(str, run_seeds))})')
  metrics = list(metrics or run_metrics)
  seeds = list(seeds if seeds is not None else run_seeds)
  chosen = [r for r in records if r['metric'] in metrics and int(r['seed']) in seeds]
  if cycles is not None:
    chosen = [r for r in chosen if int(r['cycle']) in cycles]
  elif min_fraction is not None or max_fraction is not None:
    lo = -math.inf if min_fraction is None else min_fraction
    hi = math.inf if max_fraction is None else max_fraction
    chosen = [r for r in chosen if lo <= r['fraction_remaining'] <= hi]
  else:
    last: dict[tuple[str, int], dict[str, Any]] = {}
    for r in chosen:
      key = (r['metric'], int(r['seed']))
      if key not in last or r['cycle'] > last[key]['cycle']:
        last[key] = r
    chosen = list(last.values())
  chosen = [r for r in chosen if r['val_accuracy'] >= min_val_accuracy]
  chosen.sort(key=lambda r: (metrics.index(r['metric']), int(r['seed']), int(r['cycle'])))
  if not chosen:
    raise ValueError('the pool is empty: no record of the run matches the selection flags')
  pools: dict[str, list[dict[str, Any]]] = {}
  for r in chosen:
    name = {'none': 'all', 'metric': r['metric'], 'seed': f'seed {r["seed"]}'}[group_by]
    pools.setdefault(name, [])
    if int(r['cycle']) == 0 and any(int(m['cycle']) == 0 and m['seed'] == r['seed'] for m in pools[name]):
      continue  # DEDENSE_NOTE
    pools[name].append(r)
  for name, members in pools.items():
    pools[name] = thin(members, max_members)
    if len(pools[name]) < 2:
      raise ValueError(f'pool {name!r} has {len(pools[name])} member(s); an ensemble needs at least 2 '
                       '(widen the selection, e.g. --min_fraction/--max_fraction or more seeds)')
  return pools


def thin(members: Sequence[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
  """At most `limit` members at evenly spaced positions (first and last kept); 0 = all."""
  if limit <= 0 or len(members) <= limit:
    return list(members)
  keep = np.unique(np.round(np.linspace(0, len(members) - 1, limit)).astype(int))
  return [members[i] for i in keep]


def team_count(members: int, max_size: int) -> int:
  return sum(math.comb(members, s) for s in range(2, min(max_size, members) + 1))


def load_members(run_dir: str, spec: dict[str, Any], records: Sequence[dict[str, Any]]):
  """(model, θ stacked over members, masks stacked, per-member MACs) of `records`.

  θ shapes are the same for every cycle (pruning masks units, it does not
  shrink layers), so members stack along a new leading axis; masks are inputs.
  """
  model = create_model(spec['model'], spec['widths'], spec['num_classes'])
  thetas, masks, macs = [], [], []
  for r in records:
    try:
      theta = saved_params.load_params(run_dir, int(r['seed']), r['metric'], int(r['cycle']))
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


def predict_val_test(model, thetas, masks, val_images: np.ndarray, test_images: np.ndarray,
                     batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(M, N_val, C) and (M, N_test, C): validation and test images in one compiled pass."""
  images = jnp.asarray(np.concatenate([val_images, test_images]))
  batch_size = max(1, min(batch_size, len(images)))
  proba = np.asarray(ensemble.predict_proba(ensemble.flax_apply_fn(model), thetas, masks, images, batch_size))
  return proba[:, :len(val_images)], proba[:, len(val_images):]


def check_reproduces(records, val_acc: np.ndarray, test_acc: np.ndarray, n_val: int, n_test: int) -> float:
  """Largest |recomputed - recorded| accuracy; ValueError if beyond near-tie slack (wrong data or split)."""
  worst = 0.0
  for r, v, t in zip(records, val_acc, test_acc):
    for split, ours, n in (('val', v, n_val), ('test', t, n_test)):
      diff = abs(float(ours) - float(r[f'{split}_accuracy']))
      worst = max(worst, diff)
      if diff * n > ACCURACY_SLACK_SAMPLES + 1e-6:
        raise ValueError(f'seed {r["seed"]} {r["metric"]} cycle {r["cycle"]}: {split} accuracy {ours:.4f} from the '
                         f'saved θ, but the run recorded {r[f"{split}_accuracy"]:.4f}; is --data_dir the run\'s data?')
  return worst


def pool_summary(pool: PoolResult) -> dict[str, Any]:
  """Test accuracies (selection voting) of the baselines, each HQ overall pick, and the hindsight best team."""
  col = VOTES.index(pool.vote)
  full = float(pool.full_test_accuracy[col])
  single = best_single(pool)
  single_acc = float(pool.member_test_accuracy[single])
  picks = []
  for (metric, beta), result in pool.hq.items():
    if result.best_index < 0:
      continue
    i = pool.sizes.index(result.best_size)
    team = pool.teams[i][result.best_index]
    test = float(pool.test_accuracy[i][result.best_index, col])
    picks.append({'diversity_metric': metric, 'beta': beta, 'members': team.tolist(), 'size': int(len(team)),
                  'val_accuracy': float(pool.val_accuracy[i][result.best_index, col]), 'test_accuracy': test,
                  'cost_members': pool.team_cost(team)[0], 'cost_macs': pool.team_cost(team)[1],
                  'delta_vs_full': test - full, 'delta_vs_best_single': test - single_acc})
  flat = [(float(a[k, col]), i, k) for i, a in enumerate(pool.test_accuracy) for k in range(len(a))]
  best_acc, i, k = max(flat, key=lambda x: (x[0], -x[1]))
  # One answer chosen on validation only: the HQ pick with the best validation accuracy (ties: smaller team).
  chosen = max(picks, key=lambda p: (p['val_accuracy'], -p['size']), default=None)
  acc = np.concatenate([a[:, col] for a in pool.test_accuracy])
  focal = np.concatenate(pool.focal)
  correlation = {m: float(np.corrcoef(focal[:, j], acc)[0, 1]) if focal[:, j].std() > 0 and acc.std() > 0 else None
                 for j, m in enumerate(ensemble.METRICS)}
  return {'pool': pool.name, 'members': pool.num_members, 'vote': pool.vote, 'full_test_accuracy': full,
          'best_single': {'member': single, 'val_accuracy': float(pool.member_val_accuracy[single]),
                          'test_accuracy': single_acc},
          'best_member_test_accuracy_hindsight': float(pool.member_test_accuracy.max()),
          'hq_picks': picks, 'val_selected_pick': chosen, 'focal_test_accuracy_correlation': correlation,
          'hq_picks_above_full': sum(p['delta_vs_full'] > 0 for p in picks),
          'hq_picks_above_best_single': sum(p['delta_vs_best_single'] > 0 for p in picks),
          'best_team_by_test_hindsight': {'members': pool.teams[i][k].tolist(), 'test_accuracy': best_acc,
                                          'beats_full': best_acc > full}}


def describe(summary: dict[str, Any]) -> str:
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
      f'{m} {"n/a" if r is None else f"{r:+.2f}"}' for m, r in s['focal_test_accuracy_correlation'].items()))
  lines.append(f'  hindsight (test-chosen, not a selection): best team of size <= S {100 * h["test_accuracy"]:.2f}%'
               f' ({"above" if h["beats_full"] else "not above"} the full pool)')
  return '\n'.join(lines)


SETTINGS = ('run', 'pool_metrics', 'pool_seeds', 'pool_cycles', 'min_fraction', 'max_fraction',
            'min_member_val_accuracy', 'max_members', 'group_by', 'max_size', 'betas', 'vote', 'max_negatives',
            'seed', 'data_dir')


def prepare():
  """Everything checked and loaded before the long work; ValueError/OSError names the bad input."""
  betas = parse_betas(FLAGS.betas)
  if FLAGS.max_size < 2:
    raise ValueError(f'--max_size must be >= 2, got {FLAGS.max_size}')
  if FLAGS.max_members < 0 or FLAGS.batch_size < 1:
    raise ValueError('--max_members must be >= 0 and --batch_size >= 1')
  config, spec, records = read_run(FLAGS.run)
  pools = select_records(records, metrics=FLAGS.pool_metrics, seeds=_ints(FLAGS.pool_seeds, 'pool_seeds'),
                         cycles=_ints(FLAGS.pool_cycles, 'pool_cycles'), min_fraction=FLAGS.min_fraction,
                         max_fraction=FLAGS.max_fraction, min_val_accuracy=FLAGS.min_member_val_accuracy,
                         max_members=FLAGS.max_members, group_by=FLAGS.group_by)
  for name, members in pools.items():
    teams = team_count(len(members), FLAGS.max_size)
    if teams > MAX_TEAMS:
      raise ValueError(f'pool {name!r}: {len(members)} members with --max_size={FLAGS.max_size} give {teams:,} '
                       'teams; lower --max_size or --max_members')
  union = list({(r['seed'], r['metric'], r['cycle']): r for ms in pools.values() for r in ms}.values())
  model, thetas, masks, macs = load_members(FLAGS.run, spec, union)
  data_dir = FLAGS.data_dir or config.get('data_dir')
  if data_dir and config['dataset'] != 'digits' and not os.path.isdir(data_dir):
    raise ValueError(f'the run\'s data_dir {data_dir} is not a directory from here; pass --data_dir')
  dataset = load_dataset(config['dataset'], data_dir, split_seed=int(config.get('split_seed', 0)))
  if tuple(dataset.image_shape) != tuple(spec['image_shape']):
    raise ValueError(f'the run\'s images are {spec["image_shape"]}, {config["dataset"]} gives {dataset.image_shape}')
  return betas, config, pools, union, model, thetas, masks, macs, dataset


def main(argv):
  del argv
  start = time.perf_counter()
  try:
    betas, config, pools, union, model, thetas, masks, macs, dataset = prepare()
  except (ValueError, OSError) as e:  # includes input_pipeline.DataError
    sys.exit(f'error: {e}')

  val_proba, test_proba = predict_val_test(model, thetas, masks, dataset.val_images, dataset.test_images,
                                           FLAGS.batch_size)
  val_acc = (val_proba.argmax(-1) == dataset.val_labels).mean(1)
  test_acc = (test_proba.argmax(-1) == dataset.test_labels).mean(1)
  try:
    worst = check_reproduces(union, val_acc, test_acc, len(dataset.val_labels), len(dataset.test_labels))
  except ValueError as e:
    sys.exit(f'error: {e}')
  members = [{**{k: r[k] for k in ('metric', 'seed', 'cycle', 'fraction_remaining', 'units') if k in r},
              'macs': m, 'recorded_val_accuracy': r['val_accuracy'], 'recorded_test_accuracy': r['test_accuracy'],
              'val_accuracy': float(v), 'test_accuracy': float(t)}
             for r, m, v, t in zip(union, macs, val_acc, test_acc)]
  index = {(m['seed'], m['metric'], m['cycle']): i for i, m in enumerate(members)}
  rows = {name: [index[(r['seed'], r['metric'], r['cycle'])] for r in recs] for name, recs in pools.items()}
  results = [ensemble.evaluate_pool(name, [members[i] for i in idx], val_proba[idx], dataset.val_labels,
                                    test_proba[idx], dataset.test_labels, max_size=FLAGS.max_size, betas=betas,
                                    vote=FLAGS.vote, max_negatives=FLAGS.max_negatives, seed=FLAGS.seed)
             for name, idx in rows.items()]

  out = FLAGS.out or os.path.join(FLAGS.run, 'ensemble')
  os.makedirs(out, exist_ok=True)
  paths = ensemble.write_report(results, out)
  summaries = [pool_summary(p) for p in results]
  reporting.write_jsonl(os.path.join(out, 'members.jsonl'), members)
  reporting.atomic_write_text(os.path.join(out, 'summary.json'), json.dumps(summaries, indent=2))
  settings = {k: FLAGS[k].value for k in SETTINGS}
  settings.update(pools=rows, dataset=config['dataset'], split_seed=config.get('split_seed', 0),
                  max_accuracy_difference_vs_records=worst, note=DEDENSE_NOTE)
  reporting.atomic_write_text(os.path.join(out, 'config.json'), json.dumps(settings, indent=2))
  if FLAGS.save_proba:
    np.savez_compressed(os.path.join(out, 'proba.npz'), val_proba=val_proba, test_proba=test_proba,
                        val_labels=dataset.val_labels, test_labels=dataset.test_labels)
  print(ensemble.ensemble_table(results))
  for s in summaries:
    print(describe(s))
  print(f'{len(members)} networks, {len(dataset.val_labels)} val / {len(dataset.test_labels)} test images; '
        f'recomputed accuracies within {worst:.1e} of the records; {time.perf_counter() - start:.1f}s; '
        f'wrote {", ".join(paths)} and members.jsonl, summary.json in {out}')


def run() -> None:
  """The `dropnet-ensemble` console command (pyproject.toml [project.scripts])."""
  define_flags()
  app.run(main)


if __name__ == '__main__':
  run()
