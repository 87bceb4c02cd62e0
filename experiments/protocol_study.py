r"""The paper's protocol next to the official notebook's, in one figure.

  python -m experiments.protocol_study --model=fc --widths=40,40 --dataset=mnist \
      --data_dir=../shared/data/mnist_subset --metrics=min,max --seeds=1 --out=runs/protocol

Two resumable DropNet runs of --metrics: <out>/paper (our defaults: the exact
selection rule, criteria scored with the best-validation-loss params, the
training set reshuffled every epoch) and <out>/official (the official Keras
notebook's protocol: its selection rule, the `*_official` criteria, scored
with the last epoch's params, no shuffling). Writes the combined
results.jsonl, the figures and the table to <out>, one line per
(protocol, metric).
"""

import dataclasses
import os
import sys

from absl import app

from experiments import common


def official(setup: common.Setup) -> common.Setup:
  """The same setup with the official notebook's protocol."""
  metrics = tuple(f'{m}_official' for m in setup.config.metrics)
  config = dataclasses.replace(setup.config, metrics=metrics, score_params='last',
                               train=dataclasses.replace(setup.config.train, shuffle=False))
  config.validate()
  settings = {**setup.settings, 'metrics': list(metrics), 'score_params': 'last', 'shuffle': False}
  return dataclasses.replace(setup, config=config, settings=settings)


def main(argv):
  del argv
  try:
    paper = common.setup_from_flags()
    runs = {'paper': paper, 'official': official(paper)}
    for name, setup in runs.items():
      common.check_out_dir(os.path.join(common.FLAGS.out, name), setup.settings)
  except ValueError as e:
    sys.exit(f'error: {e}')
  common.run_side_by_side(runs, lambda metric, name: f'{metric.replace("_official", "")} ({name})',
                          title=f'paper vs official protocol: {common.default_title(paper)}')


def run() -> None:
  """The `dropnet-protocol` console command (pyproject.toml [project.scripts])."""
  app.run(main)


if __name__ == '__main__':
  run()
