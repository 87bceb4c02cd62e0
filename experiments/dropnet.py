r"""Runs DropNet (Algorithm 1) and writes results, figures and a summary table.

  python -m experiments.dropnet --model=fc --widths=40,40 --dataset=mnist \
      --data_dir=../shared/data/mnist_subset --metrics=min,max --seeds=1 --out=runs/fc
  python -m experiments.dropnet --config=configs/fc_mnist.py --config.dropnet.train.optim.lr=0.05 --out=runs/fc
  python -m experiments.dropnet --config=runs/fc/config.json --out=runs/fc_again   # the same run again

Writes <out>/config.json, <out>/results.jsonl (one JSON object per seed x
metric x cycle, rewritten atomically after every cycle), <out>/checkpoints/
(a rerun with the same settings resumes from them) and PNG figures.
"""

import time

from dropnet_jax.cli import entry
from dropnet_jax.config import ExperimentConfig

CONFIG = entry.define(ExperimentConfig(), 'dropnet', distributed=True)


def main(argv):
  from dropnet_jax.runs import experiment, reporting  # here: --help needs neither
  del argv
  try:
    setup = experiment.prepare(entry.config(CONFIG), entry.FLAGS.out, distributed=entry.distributed())
  except ValueError as e:  # includes input_pipeline.DataError
    entry.fail(e)
  start = time.perf_counter()
  records = experiment.run(setup)
  if setup.run_dir.writes:
    print(reporting.summary_table(records, 'test_accuracy'))
    print(f'wall time {time.perf_counter() - start:.1f}s (this invocation); results in {setup.run_dir.path}')


def run() -> None:
  """The `dropnet-run` console command."""
  entry.run(main)


if __name__ == '__main__':
  run()
