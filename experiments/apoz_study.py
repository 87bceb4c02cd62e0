r"""APoZ (average percentage of zeros) next to DropNet's min metric.

  python -m experiments.apoz_study --dataset=mnist --data_dir=../shared/data/mnist_subset --seeds=3 \
      --out=runs/apoz

The DropNet entry point with --metrics defaulting to min,apoz (apoz drops the
units whose activations are zero most often; apoz_layer per layer).
"""

from absl import app, flags

from experiments import dropnet

flags.FLAGS.set_default('metrics', ['min', 'apoz'])


def run() -> None:
  """The `dropnet-apoz` console command (pyproject.toml [project.scripts])."""
  app.run(dropnet.main)


if __name__ == '__main__':
  run()
