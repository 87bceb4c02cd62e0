r"""APoZ (average percentage of zeros) next to DropNet's min metric.

  python -m experiments.apoz_study --dataset=mnist --data_dir=../shared/data/mnist_subset --seeds=3 \
      --out=runs/apoz

A DropNet run with metrics defaulting to min,apoz (apoz drops the units whose
activations are zero most often; apoz_layer per layer).
"""

from dropnet_jax.cli import entry
from dropnet_jax.config import DropNetConfig, ExperimentConfig

CONFIG = entry.define(ExperimentConfig(dropnet=DropNetConfig(metrics=('min', 'apoz'))), 'dropnet')


def main(argv):
  from dropnet_jax.runs import experiment, reporting  # here: --help needs neither
  del argv
  try:
    setup = experiment.prepare(entry.config(CONFIG), entry.FLAGS.out)
  except ValueError as e:
    entry.fail(e)
  print(reporting.summary_table(experiment.run(setup), 'test_accuracy'))


def run() -> None:
  """The `dropnet-apoz` console command."""
  entry.run(main)


if __name__ == '__main__':
  run()
