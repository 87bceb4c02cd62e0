"""The ensemble deck's table (`--levels`, dropnet_jax.ensemble.levels): records chosen per pruning level,
and one run's table against runs with one level each.

Choosing a level's records is checked on hand-made records (closest cycle, ties to the less pruned,
out of range refused); the table on a tiny DropNet run on digits (global and layer-wise metrics, two
seeds): one `experiments.ensemble --levels` command gives rows = metrics x levels, each row equal to
what an invocation with that level alone gives, its members the cycles closest to the level (read from
results.jsonl, independently of the code under test) and its Δ columns the differences they claim."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dropnet_jax.ensemble import levels, pipeline
from dropnet_jax.ensemble.pools import PoolConfig, at_level, select_pools, select_records
from dropnet_jax.runs import reporting

REPO = Path(__file__).resolve().parents[1]
LEVELS = (0.0, 0.2, 0.5)
METRICS = ('min', 'min_layer')


def _records(fractions, metrics=('min', 'max'), seeds=(0, 1)):
  return [{'metric': m, 'seed': s, 'cycle': c, 'fraction_remaining': f, 'val_accuracy': 0.9}
          for m in metrics for s in seeds for c, f in enumerate(fractions)]


def test_a_level_takes_the_closest_cycle_ties_to_the_less_pruned_and_refuses_out_of_range():
  recs = _records((1.0, 0.75, 0.5625, 0.4375))
  key = lambda rs: [(r['metric'], r['seed'], r['cycle']) for r in rs]
  assert key(at_level(recs, 0.2, 0.1)) == [('min', 0, 1), ('min', 1, 1), ('max', 0, 1), ('max', 1, 1)]
  # 0.5 remaining: cycles 2 (0.5625) and 3 (0.4375) are equally close; the less pruned one is taken.
  assert {r['cycle'] for r in at_level(recs, 0.5, 0.1)} == {2}
  assert {r['cycle'] for r in at_level(recs, 0.0, 0.0)} == {0}
  with pytest.raises(ValueError, match=r'--levels=0.8: seed 0 min has no cycle with 0.2 \+- 0.1 .*down to 0.438'):
    at_level(recs, 0.8, 0.1)  # the run stopped at 0.4375 remaining: never silently its last cycle
  with pytest.raises(ValueError, match='nearest: cycle 2 at 0.562'):
    at_level(recs, 0.35, 0.05)  # between cycles farther apart than the tolerance

  pools = select_pools(recs, PoolConfig(levels=(0, 0.5), group='metric'))
  assert [(p.name, p.group, p.level) for p in pools] == [
      ('min, 0% pruned', 'min', 0), ('max, 0% pruned', 'max', 0), ('min, 50% pruned', 'min', 0.5),
      ('max, 50% pruned', 'max', 0.5)]
  mixed = select_records(recs, PoolConfig(levels=(0, 0.2)))
  assert list(mixed) == ['0% pruned', '20% pruned']
  assert key(mixed['0% pruned']) == [('min', 0, 0), ('min', 1, 0)]  # the dense θ once per seed
  assert len(mixed['20% pruned']) == 4
  # A level's pool is the pool a selection of that level alone gives.
  assert select_records(recs, PoolConfig(levels=(0.5,), group='metric'))['max, 50% pruned'] == \
      select_records(recs, PoolConfig(levels=(0, 0.5), group='metric'))['max, 50% pruned']
  with pytest.raises(ValueError, match='more seeds'):
    select_records(recs, PoolConfig(levels=(0.2,), seeds=(0,), group='metric'))


@pytest.mark.parametrize('fields,match', [
    (dict(levels=(0.2, 1.0)), r'each in \[0, 1\)'),
    (dict(levels=(0.2, 0.2)), 'duplicates'),
    (dict(levels=()), 'at least one'),
    (dict(levels=(0.2,), cycles=(1,)), 'either --levels'),
    (dict(levels=(0.2,), min_fraction=0.1), 'either --levels'),
    (dict(levels=(0.2,), level_tolerance=-0.1), 'level_tolerance'),
])
def test_bad_levels_are_refused_naming_the_flag(fields, match):
  with pytest.raises(ValueError, match=match):
    PoolConfig(**fields).validate()


def _run(module, *args):
  proc = subprocess.run([sys.executable, '-m', module, *args], cwd=REPO, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


@pytest.fixture(scope='module')
def dropnet_run(tmp_path_factory) -> Path:
  out = tmp_path_factory.mktemp('levels') / 'run'
  _run('experiments.dropnet', '--dataset=digits', '--widths=8,8', f'--metrics={",".join(METRICS)}', '--seeds=2',
       '--max_epochs=2', '--fraction=0.2', '--floor=0.4', '--batch_trials', '--save_params=all', '--noverbose',
       f'--out={out}')
  return out


def _config(run, levels_):
  return pipeline.EnsembleConfig(run=str(run), pool=PoolConfig(levels=levels_, group='metric'), max_size=2,
                                 betas=(0.0, 0.5))


def test_one_command_gives_every_metric_x_level_and_each_row_is_that_levels_own_run(dropnet_run, tmp_path):
  out = tmp_path / 'table'
  proc = _run('experiments.ensemble', f'--run={dropnet_run}', '--group_by=metric', '--levels=0,0.2,0.5',
              '--max_size=2', '--betas=0,0.5', f'--out={out}')
  rows = json.loads((out / 'levels_table.json').read_text())
  assert [(r['group'], r['level']) for r in rows] == [(m, lv) for m in METRICS for lv in LEVELS]
  assert [r['scope'] for r in rows] == ['global'] * 3 + ['layer-wise'] * 3
  markdown = (out / 'levels_table.md').read_text()
  assert markdown in proc.stdout and markdown.count('\n| min') == 6
  with open(out / 'levels_table.csv') as f:
    csv_rows = list(csv.DictReader(f))
  assert [(r['group'], float(r['level'])) for r in csv_rows] == [(r['group'], r['level']) for r in rows]
  assert [float(r['test_accuracy']) for r in csv_rows] == [r['test_accuracy'] for r in rows]

  records = reporting.read_jsonl(dropnet_run / 'results.jsonl')
  members = {(m['seed'], m['metric'], m['cycle']): m for m in reporting.read_jsonl(out / 'members.jsonl')}
  pools = json.loads((out / 'pools.json').read_text())['pools']
  member_rows = list(members.values())
  for r in rows:
    # The pool: per seed, the record of that metric whose fraction remaining is closest to 1 - level.
    want = []
    for seed in (0, 1):
      trial = [x for x in records if x['metric'] == r['group'] and x['seed'] == seed]
      best = min(abs(x['fraction_remaining'] - (1 - r['level'])) for x in trial)
      want.append(min(x['cycle'] for x in trial if abs(x['fraction_remaining'] - (1 - r['level'])) == best))
    name = f'{r["group"]}, {100 * r["level"]:g}% pruned'
    assert [member_rows[i]['cycle'] for i in pools[name]] == want and r['pool_members'] == 2
    assert r['delta_vs_full'] == pytest.approx(r['test_accuracy'] - r['full_test_accuracy'])
    assert r['delta_vs_best_single'] == pytest.approx(r['test_accuracy'] - r['best_single_test_accuracy'])
    assert r['beta'] in (0.0, 0.5) and r['diversity_metric'] in ('CK', 'BD', 'KW', 'GD')

  # Each row equals the row of an invocation with that level alone (the same pools and HQ code).
  for level, want_rows in zip(LEVELS, ([r for r in rows if r['level'] == lv] for lv in LEVELS)):
    setup = pipeline.prepare(_config(dropnet_run, (level,)), str(tmp_path / f'level{level}'))
    outcome = pipeline.run(setup)
    alone = json.loads(json.dumps(levels.level_rows(outcome.results, setup.groups)))
    assert alone == want_rows
