"""experiments.ensemble end to end: a tiny DropNet run on digits with saved params, its pools, the errors.

The DropNet run is made through its own CLI (subprocess) with --save_params=all;
the ensemble CLI (`dropnet_jax.ensemble.pipeline`) then reloads θ, predicts and
selects; `dropnet_jax.ensemble.pools` chooses the pools. Checks are independent
of the code under test where possible: members against results.jsonl, the
probabilities against a plain per-member model.apply, MACs by hand for Model A,
focal scores against the float64 reference on the *validation* predictions,
and every selection decision against validation accuracies.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from dropnet_jax.runs import reporting

from dropnet_jax.runs import saved_params
from dropnet_jax.ensemble import DIVERSITIES
from dropnet_jax.ensemble import reference as R
from dropnet_jax.ensemble.pools import PoolConfig, select_records, thin
from dropnet_jax.input_pipeline import load_dataset

REPO = Path(__file__).resolve().parents[1]
PNG = b'\x89PNG\r\n\x1a\n'


def run_cli(module: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', module, *args], cwd=REPO, capture_output=True, text=True)


DROPNET_ARGS = ('--dataset=digits', '--widths=8,8', '--metrics=min,random', '--seeds=2', '--max_epochs=2',
                '--fraction=0.3', '--floor=0.4', '--batch_trials', '--save_params=all', '--noverbose')


@pytest.fixture(scope='module')
def dropnet_run(tmp_path_factory) -> Path:
  out = tmp_path_factory.mktemp('ens') / 'run'
  proc = run_cli('experiments.dropnet', *DROPNET_ARGS, f'--out={out}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  return out


def fc_macs(units, inputs=64, classes=10):
  """Model A's MACs by hand: dense layers inputs -> u1 -> u2 -> classes, pruned units removed.

  An emptied layer makes the output a constant (biases only), which compaction folds: 0 MACs.
  """
  if 0 in units:
    return 0
  sizes = [inputs, *units, classes]
  return sum(a * b for a, b in zip(sizes, sizes[1:]))


@pytest.fixture(scope='module')
def default_ensemble(dropnet_run) -> tuple[Path, subprocess.CompletedProcess]:
  """The ensemble of the default pool, written where it goes without --out: <run>/ensemble."""
  proc = run_cli('experiments.ensemble', f'--run={dropnet_run}', '--max_size=3', '--betas=0,0.5', '--save_proba')
  assert proc.returncode == 0, proc.stderr[-3000:]
  return dropnet_run / 'ensemble', proc


def test_default_pool_reproduces_the_run_and_selects_on_validation(dropnet_run, default_ensemble):
  out, proc = default_ensemble
  for name in ('ensemble_accuracy_cost.png', 'focal_vs_accuracy.png'):
    assert (out / name).read_bytes()[:8] == PNG
  assert 'Δ vs full' in (out / 'ensemble_table.md').read_text() and 'full pool' in proc.stdout

  # Default pool: the final cycle of each metric x seed, straight from results.jsonl.
  records = reporting.read_jsonl(dropnet_run / 'results.jsonl')
  final = {}
  for r in records:
    final[(r['metric'], r['seed'])] = max(final.get((r['metric'], r['seed']), 0), r['cycle'])
  members = reporting.read_jsonl(out / 'members.jsonl')
  assert sorted((m['metric'], m['seed'], m['cycle']) for m in members) == sorted(
      (k[0], k[1], c) for k, c in final.items())
  for m in members:
    assert m['macs'] == fc_macs(m['units'])
    assert m['cycle'] > 0 and m['fraction_remaining'] <= 0.4 + 1e-9

  # Probabilities on the run's own val/test split: a plain (unbatched) apply per member, and the records.
  proba = np.load(out / 'proba.npz')
  ds = load_dataset('digits')
  np.testing.assert_array_equal(proba['val_labels'], ds.val_labels)
  np.testing.assert_array_equal(proba['test_labels'], ds.test_labels)
  for i, m in enumerate(members):
    model, theta, masks, record = saved_params.load_network(str(dropnet_run), m['seed'], m['metric'], m['cycle'])
    logits, _ = model.apply({'params': theta}, ds.val_images, masks, train=False)
    np.testing.assert_allclose(proba['val_proba'][i], jax.nn.softmax(logits), atol=1e-5)
    assert abs(m['val_accuracy'] - record['val_accuracy']) * len(ds.val_labels) <= 1
    assert abs(m['test_accuracy'] - record['test_accuracy']) * len(ds.test_labels) <= 1

  val_p, val_y, test_p, test_y = proba['val_proba'], proba['val_labels'], proba['test_proba'], proba['test_labels']
  val_preds = val_p.argmax(-1)
  member_val = (val_preds == val_y).mean(1)
  teams = reporting.read_jsonl(out / 'teams.jsonl')
  full = next(t for t in teams if t['selection'] == 'full')
  assert full['size'] == len(members) and full['cost_members'] == 1.0 and full['cost_macs'] == pytest.approx(1.0)
  assert full['test_accuracy_soft'] == pytest.approx(R.team_accuracy(test_p, test_y, tuple(range(len(members))))[1])
  single = next(t for t in teams if t['selection'] == 'best_single')
  assert member_val[single['members'][0]] == member_val.max()  # chosen on validation
  assert single['members'][0] == int(np.argmax(member_val))

  # Focal scores are those of the validation predictions (float64 reference), and the picks follow them.
  sizes = (2, 3)
  ref_focal, _ = R.focal_scores(val_preds, val_y, sizes)
  hq = [t for t in teams if t['selection'] == 'hq']
  assert {(t['diversity_metric'], t['beta']) for t in hq} == {(d, b) for d in DIVERSITIES for b in (0.0, 0.5)}
  for t in hq:
    team = tuple(t['members'])
    j = DIVERSITIES.index(t['diversity_metric'])
    assert t['focal'][t['diversity_metric']] == pytest.approx(ref_focal[team][j], abs=1e-5)
    plural, soft = R.team_accuracy(val_p, val_y, team)
    assert (t['val_accuracy_plurality'], t['val_accuracy_soft']) == pytest.approx((plural, soft))
    if t['beta'] == 0.0:  # nothing pruned: the size's pick is its most diverse team
      best = min(v[j] for k, v in ref_focal.items() if len(k) == len(team))
      assert ref_focal[team][j] <= best + 1e-5
  for d in DIVERSITIES:
    for beta in (0.0, 0.5):
      picks = [t for t in hq if (t['diversity_metric'], t['beta']) == (d, beta)]
      overall = [t for t in picks if t['overall']]
      assert len(overall) == 1
      best_val = max(t['val_accuracy_soft'] for t in picks)  # overall: best validation accuracy, smallest team
      assert overall[0]['val_accuracy_soft'] == best_val
      assert overall[0]['size'] == min(t['size'] for t in picks if t['val_accuracy_soft'] == best_val)

  summary = json.loads((out / 'summary.json').read_text())
  assert summary[0]['full_test_accuracy'] == pytest.approx(full['test_accuracy_soft'])
  overall = [t for t in hq if t['overall']]
  assert summary[0]['val_selected_pick']['val_accuracy'] == max(t['val_accuracy_soft'] for t in overall)


def test_selection_flags_and_per_seed_pools(dropnet_run, tmp_path):
  out = tmp_path / 'ens'
  proc = run_cli('experiments.ensemble', f'--run={dropnet_run}', '--pool_metrics=min,random',
                 '--min_fraction=0.3', '--max_fraction=1.0', '--group_by=seed', '--max_size=2', '--betas=0.2',
                 '--vote=plurality', f'--out={out}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  config = json.loads((out / 'config.json').read_text())
  assert config['kind'] == 'ensemble' and config['config']['pool']['group'] == 'seed'
  assert config['config']['run'] == str(dropnet_run) and config['config']['betas'] == [0.2]
  pools = json.loads((out / 'pools.json').read_text())
  members = reporting.read_jsonl(out / 'members.jsonl')
  assert set(pools['pools']) == {'seed 0', 'seed 1'}
  for name, rows in pools['pools'].items():
    chosen = [members[i] for i in rows]
    assert {m['seed'] for m in chosen} == {int(name.split()[1])}
    assert all(0.3 <= m['fraction_remaining'] <= 1.0 for m in chosen)
    assert sum(m['cycle'] == 0 for m in chosen) == 1  # the dense θ once, not once per metric
  teams = reporting.read_jsonl(out / 'teams.jsonl')
  assert {t['pool'] for t in teams} == {'seed 0', 'seed 1'} and all(t['size'] <= 2 for t in teams
                                                                   if t['selection'] != 'full')


def test_select_records_and_thin():
  recs = [{'metric': m, 'seed': s, 'cycle': c, 'fraction_remaining': 0.8 ** c,
           'val_accuracy': 0.1 if (m, c) == ('max', 5) else 0.9}
          for m in ('min', 'max') for s in (0, 1) for c in range(6)]
  default = select_records(recs)['all']
  assert [(r['metric'], r['seed'], r['cycle']) for r in default] == [
      ('min', 0, 5), ('min', 1, 5), ('max', 0, 5), ('max', 1, 5)]
  pools = select_records(recs, PoolConfig(cycles=(0, 2), group='metric'))
  assert [(r['seed'], r['cycle']) for r in pools['max']] == [(0, 0), (0, 2), (1, 0), (1, 2)]
  mixed = select_records(recs, PoolConfig(cycles=(0, 1)))['all']
  assert sum(r['cycle'] == 0 for r in mixed) == 2  # one dense per seed
  ranged = select_records(recs, PoolConfig(metrics=('max',), seeds=(1,), min_fraction=0.3, max_fraction=0.7))['all']
  assert [(r['metric'], r['seed'], r['cycle']) for r in ranged] == [('max', 1, c) for c in (2, 3, 4, 5)]
  assert [r['cycle'] for r in thin([{'cycle': c} for c in range(10)], 4)] == [0, 3, 6, 9]
  assert len(thin([{'cycle': c} for c in range(3)], 5)) == 3
  dead_left_out = select_records(recs, PoolConfig(min_member_val_accuracy=0.5, group='metric'))
  assert [(r['seed'], r['cycle']) for r in dead_left_out['min']] == [(0, 5), (1, 5)] and 'max' not in dead_left_out
  with pytest.raises(ValueError, match='empty'):
    select_records(recs, PoolConfig(cycles=(99,)))
  with pytest.raises(ValueError, match='at least 2'):
    select_records(recs, PoolConfig(metrics=('min',), seeds=(0,)))
  with pytest.raises(ValueError, match='not in the run'):
    select_records(recs, PoolConfig(metrics=('median',)))
  with pytest.raises(ValueError, match='either'):
    select_records(recs, PoolConfig(cycles=(1,), min_fraction=0.2))
  with pytest.raises(ValueError, match='duplicates'):
    select_records(recs, PoolConfig(seeds=(1, 1)))
  with pytest.raises(ValueError, match='max_members'):
    select_records(recs, PoolConfig(max_members=1))


def test_bad_input_fails_before_any_work(dropnet_run, tmp_path):
  no_params = tmp_path / 'no_params'
  shutil.copytree(dropnet_run, no_params, ignore=shutil.ignore_patterns('params', 'checkpoints'))
  partial = tmp_path / 'partial'  # params of cycle 0 only, as if other cycles were never saved
  shutil.copytree(dropnet_run, partial, ignore=shutil.ignore_patterns('min', 'random', 'checkpoints'))
  cases = [
      ([f'--run={tmp_path / "missing"}'], 'not a directory'),
      ([f'--run={no_params}'], '--save_params=all'),
      ([f'--run={partial}'], '--save_params=all'),
      ([f'--run={dropnet_run}', '--pool_cycles=99'], 'empty'),
  ]
  for args, needle in cases:
    out = tmp_path / 'out'
    proc = run_cli('experiments.ensemble', *args, f'--out={out}')
    assert proc.returncode != 0, args
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith('error: ') and needle in lines[-1], (args, proc.stderr[-2000:])
    assert not out.exists(), args


def _refused(proc: subprocess.CompletedProcess, needle: str, args) -> None:
  assert proc.returncode != 0, (args, proc.stdout[-2000:])
  lines = proc.stderr.strip().splitlines()
  assert lines and lines[-1].startswith('error: ') and needle in lines[-1], (args, proc.stderr[-2000:])


def test_out_may_not_be_the_dropnet_run(dropnet_run):
  """The old CLI wrote its outputs, config.json included, into --out=<run>: the run could not resume."""
  before = {name: (dropnet_run / name).read_bytes() for name in ('config.json', 'results.jsonl')}
  for out in (dropnet_run, f'{dropnet_run}/', f'{dropnet_run}/.', os.path.relpath(dropnet_run, REPO)):
    proc = run_cli('experiments.ensemble', f'--run={dropnet_run}', '--max_size=2', f'--out={out}')
    _refused(proc, "this run's input", out)
  assert {name: (dropnet_run / name).read_bytes() for name in before} == before
  assert not any((dropnet_run / name).exists() for name in ('teams.jsonl', 'members.jsonl', 'summary.json'))
  # And the DropNet run still resumes (nothing left to train): the same command succeeds.
  proc = run_cli('experiments.dropnet', *DROPNET_ARGS, f'--out={dropnet_run}')
  assert proc.returncode == 0, proc.stderr[-3000:]


def test_bad_out_and_settings_fail_before_any_work(dropnet_run, default_ensemble, tmp_path):
  # --run=<partial> would fail once θ are loaded: the --out refusals below come before that.
  partial = tmp_path / 'partial'
  shutil.copytree(dropnet_run, partial, ignore=shutil.ignore_patterns('min', 'random', 'checkpoints', 'ensemble'))
  other_run = tmp_path / 'other_run'  # another DropNet run (its config.json says kind dropnet)
  shutil.copytree(dropnet_run, other_run, ignore=shutil.ignore_patterns('params', 'checkpoints', 'ensemble'))
  a_file = tmp_path / 'a_file'
  a_file.write_text('not a directory')
  read_only = tmp_path / 'read_only'
  read_only.mkdir()
  read_only.chmod(0o500)
  cases = [
      ([f'--run={partial}', f'--out={other_run}'], 'holds a dropnet run'),
      ([f'--run={partial}', f'--out={a_file}'], 'is a file'),
      ([f'--run={partial}', f'--out={default_ensemble[0]}', '--max_size=4'], 'different configuration'),
  ]
  if not os.access(read_only, os.W_OK):  # root may write anyway
    cases.append(([f'--run={partial}', f'--out={read_only / "ens"}'], 'not writable'))
  fresh = tmp_path / 'fresh'
  for flag, needle in (('--max_negatives=0', 'max_negatives'), ('--betas=0.5,2', 'betas'),
                       ('--betas=0.2,0.2', 'duplicates'), ('--max_size=1', 'max_size'),
                       ('--max_members=1', 'max_members'), ('--min_fraction=0.5', 'either'),
                       ('--min_member_val_accuracy=2', 'min_member_val_accuracy'), ('--batch_size=0', 'batch_size'),
                       ('--data_dir=/nonexistent/data', 'data_dir')):
    extra = [flag, '--pool_cycles=1'] if needle == 'either' else [flag]
    cases.append(([f'--run={dropnet_run}', f'--out={fresh}', *extra], needle))
  cases.append(([f'--out={fresh}'], '--run is required'))
  config_json = (other_run / 'config.json').read_bytes()
  ensemble_config = (default_ensemble[0] / 'config.json').read_bytes()
  try:
    for args, needle in cases:
      _refused(run_cli('experiments.ensemble', *args), needle, args)
  finally:
    read_only.chmod(0o700)
  assert (other_run / 'config.json').read_bytes() == config_json
  assert (default_ensemble[0] / 'config.json').read_bytes() == ensemble_config
  assert not fresh.exists() and not (read_only / 'ens').exists()
  assert sorted(p.name for p in other_run.iterdir()) == sorted(
      p.name for p in dropnet_run.iterdir() if p.name not in ('params', 'checkpoints', 'ensemble'))


def test_config_json_runs_it_again(dropnet_run, default_ensemble, tmp_path):
  """--config=<out>/config.json gives the same settings: same teams, into another directory."""
  out = tmp_path / 'again'
  proc = run_cli('experiments.ensemble', f'--config={default_ensemble[0] / "config.json"}', f'--out={out}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (out / 'teams.jsonl').read_text() == (default_ensemble[0] / 'teams.jsonl').read_text()
  assert (out / 'proba.npz').exists()  # save_proba came back too
