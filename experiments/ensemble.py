r"""Focal-diversity HQ ensembles of the networks a DropNet run trained: which teams of them to keep.

  python -m experiments.ensemble --run=runs/ens_src --min_fraction=0.2 --max_fraction=0.6 \
      --max_members=20 --betas=0,0.2,0.5 --out=runs/ens_src/ensemble

A *pool* is a set of records of one DropNet run (made with --save_params=all):
by default the final record (last cycle) of each DropNet metric x seed;
`--pool_metrics`, `--pool_seeds`, and either `--pool_cycles` or
`--min_fraction/--max_fraction` narrow it; `--max_members` thins each pool to
evenly spaced members (in metric, seed, cycle order) so that team enumeration
stays small; `--group_by=metric` (or `seed`) makes one pool per DropNet metric
(or seed) instead of one mixed pool (`dropnet_jax.ensemble.pools`). Each
member's saved θ is loaded, and all members' class probabilities on the run's
validation and test sets (the same split: dataset, data_dir and split_seed
come from the run's config.json) are computed in one batched, compiled pass.
The recomputed accuracies must reproduce the records' val/test accuracies,
which guards against a wrong --data_dir or split.

The ensemble deck's table in one command: `--group_by=metric --levels=0,0.2,0.5`
forms a pool per DropNet metric x pruning level (fraction of units pruned: per
seed the cycle whose fraction remaining is closest to 1 - level, ties to the
less pruned one; a level farther than --level_tolerance from every cycle of a
trial is refused naming it) and writes levels_table.md/.csv/.json: per metric x
level the validation-selected HQ team, its diversity measure, β and focal score,
cost, test accuracy and Δ vs the full pool and the best single network (each
seed gives one network per pool: use several seeds). E.g.

  python -m experiments.ensemble --run=runs/ens_src --group_by=metric --levels=0,0.2,0.5 \
      --max_size=4 --betas=0,0.2,0.5 --out=runs/ens_src/levels

Every team of sizes 2..--max_size is scored, HQ runs for each diversity measure
(CK, BD, KW, GD) and beta, and both votings are evaluated; only validation
predictions enter a choice. Cost is members / M and the MACs share (members'
MACs from `accounting.summary` of their masks). `dropnet_jax.ensemble.pipeline`
does all of it; this is its command line.

Writes into --out (default <run>/ensemble; never the DropNet run's own
directory): teams.jsonl, ensemble_table.md, ensemble_accuracy_cost.png,
focal_vs_accuracy.png (see `ensemble.report`), members.jsonl (each member's
record fields, MACs and recomputed accuracies), pools.json (each pool's rows of
members.jsonl), summary.json (per pool: the full pool, the best single member
by validation, each HQ overall pick, the one of them with the best validation
accuracy, the correlation of focal score and test accuracy over all teams, and,
in hindsight only, the best team by test accuracy), config.json (the settings;
`--config=<out>/config.json` loads them back), with --save_proba proba.npz, and
with --levels levels_table.md, levels_table.csv and levels_table.json.
"""

import time

from dropnet_jax.cli import entry
from dropnet_jax.ensemble import pipeline

CONFIG = entry.define(pipeline.EnsembleConfig(), pipeline.KIND, out_required=False,
                      out_help='Output directory (default <run>/ensemble; not the DropNet run itself).')


def main(argv):
  del argv
  start = time.perf_counter()
  try:
    setup = pipeline.prepare(entry.config(CONFIG), entry.FLAGS.out)
  except (ValueError, OSError) as e:  # includes input_pipeline.DataError
    entry.fail(e)
  outcome = pipeline.run(setup)
  print(pipeline.describe(setup, outcome))
  print(f'{time.perf_counter() - start:.1f}s')


def run() -> None:
  """The `dropnet-ensemble` console command (pyproject.toml [project.scripts])."""
  entry.run(main)


if __name__ == '__main__':
  run()
