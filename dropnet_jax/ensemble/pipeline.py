"""Focal-diversity HQ ensembles of a DropNet run's networks as one library call.

`prepare(config, out)` checks everything before any work and loads it: the
settings, the output directory (a `RunDir` whose input is the DropNet run, so
`out` may not be that run), the run's records and saved θ (`pools`), the run's
validation and test sets (the same split: dataset, data_dir and split_seed come
from the run's config.json; their fingerprint must be the run's), and all
members' class probabilities in one batched, compiled pass (`predict_proba`,
members as lanes). The recomputed accuracies must reproduce the records'
val/test accuracies, which guards against a wrong --data_dir or split.

`run(setup)` scores every team of sizes 2..max_size of each pool, runs HQ for
each diversity measure and beta and evaluates both votings
(`report.evaluate_pool`; only validation predictions enter a choice), and
writes into the directory: teams.jsonl, ensemble_table.md and the two figures
(`report.write_report`), members.jsonl (each member's record fields, MACs and
recomputed accuracies), pools.json (each pool's rows of members.jsonl, the
dataset and how closely the records were reproduced), summary.json (per pool,
`report.pool_summary`), config.json (`RunDir`) and with save_proba proba.npz;
with `pool.levels`, the ensemble deck's table of every group x pruning level
(`levels`: levels_table.md, .csv and .json), from the same pools and HQ runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import jax.numpy as jnp
import numpy as np

from dropnet_jax.ensemble import levels
from dropnet_jax.ensemble import pools as pools_lib
from dropnet_jax.ensemble import report
from dropnet_jax.ensemble.pools import DropNetRun, PoolConfig
from dropnet_jax.ensemble.voting import flax_apply_fn, predict_proba
from dropnet_jax.input_pipeline import Dataset, dataset_fingerprint, load_dataset
from dropnet_jax.runs import reporting
from dropnet_jax.runs.run_dir import RunDir
from dropnet_jax.settings import setting

KIND = 'ensemble'
MAX_TEAMS = 2_000_000  # teams of sizes 2..S per pool; beyond this, scoring takes minutes and GBs
# Recomputed accuracies may differ from the records by float near-ties only (vmapped vs plain matmuls).
ACCURACY_SLACK_SAMPLES = 2


@dataclasses.dataclass(frozen=True)
class EnsembleConfig:
  """An ensemble study of one DropNet run (`experiments.ensemble`)."""
  run: str | None = setting(None, 'Output directory of a DropNet run made with --save_params=all (required).',
                            flag='run')
  pool: PoolConfig = PoolConfig()
  max_size: int = setting(5, 'S: largest team size (teams of sizes 2..S are enumerated).', flag='max_size')
  betas: tuple[float, ...] = setting((0.0, 0.2, 0.5), 'HQ beta values, each in [0, 1].', flag='betas')
  vote: str = setting('soft', 'Voting used for selection and the table.', flag='vote', choices=report.VOTES)
  max_negatives: int | None = setting(None, "Subsample each focal member's negatives to this many (default: all).",
                                      flag='max_negatives')
  seed: int = setting(0, 'Seed of the negative subsample (--max_negatives).', flag='seed')
  data_dir: str | None = setting(None, "Override the run's data_dir (if the data moved or the run was made "
                                 'elsewhere).', flag='data_dir', result=False)
  batch_size: int = setting(1000, 'Images per scanned step of the batched prediction.', flag='batch_size',
                            result=False)
  save_proba: bool = setting(False, "Also write proba.npz (members' val/test probabilities and labels).",
                             flag='save_proba', result=False)

  def validate(self) -> None:
    """Raises ValueError naming the offending setting, before anything is read."""
    if not self.run:
      raise ValueError('--run is required: the output directory of a DropNet run made with --save_params=all')
    self.pool.validate()
    if self.max_size < 2:
      raise ValueError(f'--max_size must be >= 2, got {self.max_size}')
    if not self.betas or any(not (math.isfinite(b) and 0.0 <= b <= 1.0) for b in self.betas):
      raise ValueError(f'--betas must be a non-empty list of values in [0, 1], got {",".join(map(str, self.betas))}')
    if len(set(self.betas)) != len(self.betas):
      raise ValueError(f'--betas: duplicates in {",".join(map(str, self.betas))}')
    if self.vote not in report.VOTES:
      raise ValueError(f'--vote must be one of {", ".join(report.VOTES)}, got {self.vote!r}')
    if self.max_negatives is not None and self.max_negatives < 1:
      raise ValueError(f'--max_negatives must be >= 1 (leave it out for all negatives), got {self.max_negatives}')
    if self.seed < 0:
      raise ValueError(f'--seed must be >= 0, got {self.seed}')
    if self.batch_size < 1:
      raise ValueError(f'--batch_size must be >= 1, got {self.batch_size}')
    if self.data_dir is not None and not os.path.isdir(self.data_dir):
      raise ValueError(f'--data_dir={self.data_dir} is not a directory')


def default_out(config: EnsembleConfig) -> str:
  """<run>/ensemble: where the outputs go without --out."""
  return os.path.join(config.run, 'ensemble')


@dataclasses.dataclass
class Setup:
  """A checked ensemble study: the pools, their members' probabilities, and the directory (nothing written)."""
  config: EnsembleConfig
  source: DropNetRun
  pools: dict[str, list[dict[str, Any]]]  # pool name -> records of the run
  members: list[dict[str, Any]]  # members.jsonl: the union of the pools, with MACs and recomputed accuracies
  dataset: Dataset
  val_proba: np.ndarray  # (M, N_val, C), rows = members
  test_proba: np.ndarray
  max_accuracy_difference: float  # largest |recomputed - recorded| accuracy
  run_dir: RunDir
  groups: dict[str, tuple[str, float | None]] = dataclasses.field(default_factory=dict)  # pool -> (group, level)

  @property
  def rows(self) -> dict[str, list[int]]:
    """Pool name -> rows of `members` (pools.json)."""
    index = {pools_lib.member_key(m): i for i, m in enumerate(self.members)}
    return {name: [index[pools_lib.member_key(r)] for r in recs] for name, recs in self.pools.items()}


def predict_val_test(model, thetas, masks, val_images: np.ndarray, test_images: np.ndarray,
                     batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(M, N_val, C) and (M, N_test, C): validation and test images in one compiled pass."""
  images = jnp.asarray(np.concatenate([val_images, test_images]))
  batch_size = max(1, min(batch_size, len(images)))
  proba = np.asarray(predict_proba(flax_apply_fn(model), thetas, masks, images, batch_size))
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


def _load_data(config: EnsembleConfig, source: DropNetRun) -> Dataset:
  """The run's dataset and split (from --data_dir if given), checked against the run's fingerprint."""
  data = source.config.data
  data_dir = config.data_dir or data.data_dir
  if data_dir and data.dataset != 'digits' and not os.path.isdir(data_dir):
    raise ValueError(f'the run\'s data_dir {data_dir} is not a directory from here; pass --data_dir')
  dataset = load_dataset(data.dataset, data_dir, split_seed=data.split_seed)
  if tuple(dataset.image_shape) != tuple(source.spec['image_shape']):
    raise ValueError(f'the run\'s images are {source.spec["image_shape"]}, {data.dataset} gives {dataset.image_shape}')
  expected = source.stamp.get('data_fingerprint')
  if expected is not None and dataset_fingerprint(dataset) != expected:
    raise ValueError(f'the {data.dataset} data read from {data_dir or "the default source"} are not the data the '
                     'DropNet run was trained on (their fingerprint differs); pass --data_dir with the run\'s data')
  return dataset


def prepare(config: EnsembleConfig, out: str | None = None) -> Setup:
  """Checks everything, loads the members and data and predicts; ValueError (or OSError) names the
  problem, before anything is written. `out` defaults to <run>/ensemble."""
  config.validate()
  run_dir = RunDir(out or default_out(config), KIND, config, inputs=[config.run])
  run_dir.check()  # before reading anything: --out may not be the DropNet run, a file, ...
  source = pools_lib.read_run(config.run)
  chosen = pools_lib.select_pools(source.records, config.pool)
  pools = {p.name: p.records for p in chosen}
  for name, members in pools.items():
    teams = pools_lib.team_count(len(members), config.max_size)
    if teams > MAX_TEAMS:
      raise ValueError(f'pool {name!r}: {len(members)} members with --max_size={config.max_size} give {teams:,} '
                       'teams; lower --max_size or --max_members')
  union = list({pools_lib.member_key(r): r for recs in pools.values() for r in recs}.values())
  model, thetas, masks, macs = pools_lib.load_members(source, union)
  dataset = _load_data(config, source)
  run_dir.data_fingerprint = dataset_fingerprint(dataset)
  run_dir.check()
  val_proba, test_proba = predict_val_test(model, thetas, masks, dataset.val_images, dataset.test_images,
                                           config.batch_size)
  val_acc = (val_proba.argmax(-1) == dataset.val_labels).mean(1)
  test_acc = (test_proba.argmax(-1) == dataset.test_labels).mean(1)
  worst = check_reproduces(union, val_acc, test_acc, len(dataset.val_labels), len(dataset.test_labels))
  members = [{**{k: r[k] for k in ('metric', 'seed', 'cycle', 'fraction_remaining', 'units') if k in r},
              'macs': m, 'recorded_val_accuracy': r['val_accuracy'], 'recorded_test_accuracy': r['test_accuracy'],
              'val_accuracy': float(v), 'test_accuracy': float(t)}
             for r, m, v, t in zip(union, macs, val_acc, test_acc)]
  return Setup(config, source, pools, members, dataset, val_proba, test_proba, worst, run_dir,
               {p.name: (p.group, p.level) for p in chosen})


@dataclasses.dataclass
class Outcome:
  """What `run` measured and wrote."""
  results: list[report.PoolResult]
  summaries: list[dict[str, Any]]
  paths: list[str]


def run(setup: Setup) -> Outcome:
  """Evaluates every pool and writes the outputs into the setup's directory (see the module docstring)."""
  config, run_dir, d = setup.config, setup.run_dir, setup.dataset
  rows = setup.rows
  with run_dir.open():
    results = [report.evaluate_pool(name, [setup.members[i] for i in idx], setup.val_proba[idx], d.val_labels,
                                    setup.test_proba[idx], d.test_labels, max_size=config.max_size,
                                    betas=config.betas, vote=config.vote, max_negatives=config.max_negatives,
                                    seed=config.seed)
               for name, idx in rows.items()]
    paths = report.write_report(results, run_dir.path)
    summaries = [report.pool_summary(p) for p in results]
    if config.pool.levels is not None:
      paths += levels.write_levels_table(levels.level_rows(results, setup.groups), run_dir)
    reporting.write_jsonl(run_dir.file('members.jsonl'), setup.members)
    paths.append(run_dir.file('members.jsonl'))
    paths.append(run_dir.write_text('summary.json', json.dumps(summaries, indent=2)))
    pools = {'pools': rows, 'dataset': setup.source.config.data.dataset,
             'split_seed': setup.source.config.data.split_seed,
             'max_accuracy_difference_vs_records': setup.max_accuracy_difference, 'note': pools_lib.DEDENSE_NOTE}
    paths.append(run_dir.write_text('pools.json', json.dumps(pools, indent=2)))
    if config.save_proba:
      paths.append(run_dir.file('proba.npz'))
      np.savez_compressed(paths[-1], val_proba=setup.val_proba, test_proba=setup.test_proba,
                          val_labels=d.val_labels, test_labels=d.test_labels)
  return Outcome(results, summaries, paths)


def describe(setup: Setup, outcome: Outcome) -> str:
  """The printed report: the table, each pool's lines (`report.describe`) and what was written where."""
  d = setup.dataset
  table = [] if setup.config.pool.levels is None else [
      'Per pruning level (the HQ pick with the best validation accuracy of each pool):',
      levels.markdown(levels.level_rows(outcome.results, setup.groups))]
  return '\n'.join([
      report.ensemble_table(outcome.results), *(report.describe(s) for s in outcome.summaries), *table,
      f'{len(setup.members)} networks, {len(d.val_labels)} val / {len(d.test_labels)} test images; recomputed '
      f'accuracies within {setup.max_accuracy_difference:.1e} of the records; wrote '
      f'{", ".join(os.path.basename(p) for p in outcome.paths)} in {setup.run_dir.path}'])
