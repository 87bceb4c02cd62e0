r"""The paper's protocol next to the official notebook's, in one figure.

  python -m experiments.protocol_study --model=fc --widths=40,40 --dataset=mnist \
      --data_dir=../shared/data/mnist_subset --metrics=min,max --seeds=1 --out=runs/protocol

Two resumable DropNet runs of the metrics: <out>/paper (our defaults: the exact
selection rule, criteria scored with the best-validation-loss params, the
training set reshuffled every epoch) and <out>/official (the official Keras
notebook's protocol: its selection rule, the `*_official` criteria, scored
with the last epoch's params, no shuffling). Writes the combined
results.jsonl, the figures and the table to <out>, one line per
(protocol, metric).
"""

import dataclasses
import os

from dropnet_jax.cli import entry
from dropnet_jax.config import ExperimentConfig

CONFIG = entry.define(ExperimentConfig(), 'protocol_study')


def official(config: ExperimentConfig) -> ExperimentConfig:
  """The same run with the official notebook's protocol; ValueError names a metric it lacks."""
  from dropnet_jax.pruning import criteria
  d = config.dropnet
  missing = [m for m in d.metrics if f'{m}_official' not in criteria.names()]
  if missing:
    raise ValueError(f'--metrics: the official protocol has no form of {", ".join(missing)} (it has min, max, '
                     'min_layer and max_layer)')
  return dataclasses.replace(config, dropnet=dataclasses.replace(
      d, metrics=tuple(f'{m}_official' for m in d.metrics), score_params='last',
      train=dataclasses.replace(d.train, shuffle=False)))


def main(argv):
  from dropnet_jax.runs import experiment, reporting  # here: --help needs neither
  del argv
  out = entry.FLAGS.out
  try:
    config = entry.config(CONFIG)
    paper = experiment.prepare(config, os.path.join(out, 'paper'))
    runs = {'paper': paper, 'official': paper.into(os.path.join(out, 'official'), official(config))}
    study = experiment.RunDir(out, 'protocol_study', config, data_fingerprint=paper.run_dir.data_fingerprint)
    study.check()
  except ValueError as e:
    entry.fail(e)
  combined = experiment.run_side_by_side(study, runs,
                                         lambda metric, name: f'{metric.replace("_official", "")} ({name})',
                                         title=f'paper vs official protocol: {paper.title()}')
  print(reporting.summary_table(combined, 'test_accuracy'))


def run() -> None:
  """The `dropnet-protocol` console command."""
  entry.run(main)


if __name__ == '__main__':
  run()
