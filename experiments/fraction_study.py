r"""Pruning-fraction study: DropNet with the min metric for several p.

  python -m experiments.fraction_study --dataset=mnist --data_dir=../shared/data/mnist_subset \
      --fractions=0.2,0.3,0.4,0.5,0.9 --seeds=3 --out=runs/fraction

One resumable DropNet run per p in <out>/p<p>/, then combined figures and a
table in <out>, with each p as its own line ("min p=0.2", ...).
"""

import os
import sys

from absl import app, flags

from experiments import common

flags.DEFINE_list('fractions', '0.2,0.3,0.4,0.5,0.9', 'Values of p to compare.')
flags.FLAGS.set_default('metrics', ['min'])  # the paper's study; any metrics may be given


def main(argv):
  del argv
  try:
    fractions = [float(p) for p in flags.FLAGS.fractions]
    base = common.setup_from_flags()
    setups = {p: base.with_config(fraction=p) for p in fractions}  # validates every p up front
    for p, s in setups.items():
      common.check_out_dir(os.path.join(common.FLAGS.out, f'p{p}'), s.settings)
  except ValueError as e:
    sys.exit(f'error: --fractions/flags: {e}')
  common.run_side_by_side({f'p{p}': setup for p, setup in setups.items()},
                          lambda metric, name: f'{metric} p={name[1:]}',
                          title=f'pruning fraction p: {common.default_title(base)}')


def run() -> None:
  """The `dropnet-fraction` console command (pyproject.toml [project.scripts])."""
  app.run(main)


if __name__ == '__main__':
  run()
