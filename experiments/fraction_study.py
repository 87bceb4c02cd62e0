r"""Pruning-fraction study: DropNet with the min metric for several p.

  python -m experiments.fraction_study --dataset=mnist --data_dir=../shared/data/mnist_subset \
      --fractions=0.2,0.3,0.4,0.5,0.9 --seeds=3 --out=runs/fraction

One resumable DropNet run per p in <out>/p<p>/, then combined figures and a
table in <out>, with each p as its own line ("min p=0.2", ...).
"""

import dataclasses
import os

from dropnet_jax.cli import entry
from dropnet_jax.config import ExperimentConfig, FractionStudyConfig

CONFIG = entry.define(FractionStudyConfig(), 'fraction_study')


def main(argv):
  from dropnet_jax.runs import experiment, reporting  # here: --help needs neither
  del argv
  out = entry.FLAGS.out
  try:
    study = entry.config(CONFIG)
    if not study.fractions:
      raise ValueError('--fractions: give at least one p')
    if len(set(study.fractions)) != len(study.fractions):  # one directory per p: a repeated p would run once
      raise ValueError(f'--fractions: each p once, got {",".join(map(str, study.fractions))}')
    base = ExperimentConfig(**{f.name: getattr(study, f.name) for f in dataclasses.fields(ExperimentConfig)})
    # The first p's run is checked with its own p: its directory holds a run of that p (not of --fraction) on a rerun.
    first = dataclasses.replace(base, dropnet=dataclasses.replace(base.dropnet, fraction=study.fractions[0]))
    setup = experiment.prepare(first, os.path.join(out, f'p{study.fractions[0]}'))
    setups = {f'p{p}': setup.derived(os.path.join(out, f'p{p}'), fraction=p) for p in study.fractions}
    study_dir = experiment.RunDir(out, 'fraction_study', study, data_fingerprint=setup.run_dir.data_fingerprint)
    study_dir.check()
  except ValueError as e:
    entry.fail(e)
  combined = experiment.run_side_by_side(study_dir, setups, lambda metric, name: f'{metric} p={name[1:]}',
                                         title=f'pruning fraction p: {setup.title()}')
  print(reporting.summary_table(combined, 'test_accuracy'))


def run() -> None:
  """The `dropnet-fraction` console command."""
  entry.run(main)


if __name__ == '__main__':
  run()
